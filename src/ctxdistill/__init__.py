"""ctxdistill: context distillation (Snell, Klein & Zhong, 2022).

The teacher is a model conditioned on `[context] + [input]`; the student, starting from the same
weights, is trained to produce the teacher's answer distribution from `[input]` alone.

    from ctxdistill import load_config, run
    cfg = load_config("task.toml")
    report = run(cfg)

    from ctxdistill import bake     # a prompt, no labels: the same model without it
    report = bake(model="embedded", system_prompt=Path("prompt.txt"), out="runs/my_bake")
"""

from ctxdistill.baking import bake
from ctxdistill.config import Config, load_config
from ctxdistill.core.errors import UserError
from ctxdistill.pipeline import run

__all__ = ["Config", "UserError", "bake", "load_config", "run"]
__version__ = "0.1.0"
