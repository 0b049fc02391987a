"""`run`: chain the stages from one config: inputs -> teach -> train (-> export) -> evaluate (-> report)."""

from __future__ import annotations

import json
import time

from ctxdistill.core import distributed
from ctxdistill.core.files import write_atomic
from ctxdistill.config import Config
from ctxdistill.evaluate import evaluate
from ctxdistill.export import export_gguf, export_model, write_card
from ctxdistill.inputs import prepare_on_main
from ctxdistill.core.progress import log
from ctxdistill.teach import teach
from ctxdistill.train import train


def run(cfg: Config, overwrite: bool = False) -> dict | None:
    """Run every stage into `cfg.out` and return the evaluation report.

    Each stage reuses its output when it is up to date (same content hashes), so re-running after
    a failure in a later stage does not redo the teacher pass. With train.mode = "on-policy" there is
    no teacher pass: the teacher scores the student's samples during training.

    With export.merge the student is also written as a standalone model in `<out>/model/` (export.py),
    which is what evaluation scores and whose model card it writes; with export.gguf, as a GGUF file beside it
    (gguf_export.py).

    Under a multi-process launcher (core/distributed.py) every rank calls this: the teacher pass and training
    are shared out, evaluation runs on the main process, and the other ranks return None.

    The wall time of each stage (in this call: a reused stage takes seconds) is logged at the end and written to
    `<out>/stage_seconds.json`.
    """
    stages = ["inputs"] + (["teach"] if cfg.train.mode == "offline" else []) + ["train"] \
        + (["export"] if cfg.export.merge else []) + ["eval"]
    step = iter(range(1, len(stages) + 1))
    seconds: dict[str, float] = {}
    started = [None, time.perf_counter()]  # the stage running, and when it began

    def header(name: str | None) -> None:
        now = time.perf_counter()
        if started[0] is not None:
            seconds[started[0]] = round(now - started[1], 1)
        started[:] = [name, now]
        if name is not None:
            log(f"[{next(step)}/{len(stages)}] {name}")

    header("inputs")
    prepare_on_main(cfg)
    if cfg.train.mode == "offline":
        header("teach")
        teach(cfg, overwrite=overwrite)
    header("train")
    train(cfg, overwrite=overwrite)
    if not distributed.is_main():
        return None
    if cfg.export.merge:
        header("export")
        export_model(cfg)
        export_gguf(cfg)  # with export.gguf: the GGUF and its Modelfile, for llama.cpp and Ollama
    header("eval")
    report = evaluate_and_card(cfg)
    header(None)
    seconds["total"] = round(sum(seconds.values()), 1)
    write_atomic(cfg.out / "stage_seconds.json", json.dumps(seconds, indent=1) + "\n")
    log("wall time per stage: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in seconds.items()))
    return report


def evaluate_and_card(cfg: Config) -> dict:
    """`ctxdistill eval`: the evaluation report; with export.merge the deployable `<out>/model/` is exported first
    when missing or made from another student (export.py), is what is scored, and gets its model card from the
    report."""
    if cfg.export.merge:
        export_model(cfg)
    report = evaluate(cfg)
    if cfg.export.merge:
        write_card(cfg, report)
    return report
