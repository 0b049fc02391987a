"""Sweep student-training settings on the demo task, reusing one teacher pass.

    python benchmarks/demo_sweep.py --out runs/sweep [--variants lr1e-5,lora]

Prints and writes (runs/sweep/sweep.json) the student's held-out score per variant next to the
base and teacher scores. Used to choose the demo's defaults (docs/results.md).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from _common import parser
from ctxdistill.demo import demo_config
from ctxdistill.evaluate import evaluate
from ctxdistill.teach import teach
from ctxdistill.train import train

VARIANTS = {
    "lr1e-5": {"method": "full", "lr": 1e-5},
    "lr1e-5_ep5": {"method": "full", "lr": 1e-5, "epochs": 5},
    "lr5e-5": {"method": "full", "lr": 5e-5},
    "ce": {"method": "full", "lr": 3e-5, "loss": "ce"},
    "reverse_kl": {"method": "full", "lr": 3e-5, "loss": "reverse_kl"},
    "jsd": {"method": "full", "lr": 3e-5, "loss": "jsd"},
    "lora_3e-4": {"method": "lora", "lr": 3e-4},
    "lora_1e-3": {"method": "lora", "lr": 1e-3},
    "lora_2e-3": {"method": "lora", "lr": 2e-3},
    "lora_1e-3_ep5": {"method": "lora", "lr": 1e-3, "epochs": 5},
    "lora_1e-3_ce": {"method": "lora", "lr": 1e-3, "loss": "ce"},
    "lora_1e-3_grouped": {"method": "lora", "lr": 1e-3, "group_by_length": True},
    "lora_1e-3_on_policy": {"method": "lora", "lr": 1e-3, "mode": "on-policy"},
    "full_default": {"method": "full", "lr": 3e-5},
    "bs4": {"method": "full", "lr": 3e-5, "batch_size": 4},
    # issue 18: a fixed-epoch sweep (early stopping off) against the default (early stopping, epochs a ceiling),
    # and the learning rate / warm-up around the demo's LoRA default
    **{f"lora_ep{n}_fixed": {"method": "lora", "lr": 1e-3, "epochs": n, "early_stop": False} for n in range(1, 6)},
    "lora_es_ep3": {"method": "lora", "lr": 1e-3, "epochs": 3, "early_stop": True},
    "lora_es_ep5": {"method": "lora", "lr": 1e-3, "epochs": 5, "early_stop": True},
    "lora_5e-4_fixed": {"method": "lora", "lr": 5e-4, "early_stop": False},
    "lora_2e-3_fixed": {"method": "lora", "lr": 2e-3, "early_stop": False},
    "lora_1e-3_warm10_fixed": {"method": "lora", "lr": 1e-3, "warmup_ratio": 0.1, "early_stop": False},
    "lora_2e-3_warm10_fixed": {"method": "lora", "lr": 2e-3, "warmup_ratio": 0.1, "early_stop": False},
}


def main() -> None:
    ap = parser(__doc__, out=False)
    ap.add_argument("--out", default="runs/sweep")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args()
    base = demo_config(args.out)
    results = {}
    teach(base)
    for name in args.variants.split(","):
        cfg = dataclasses.replace(base, train=dataclasses.replace(base.train, **VARIANTS[name]),
                                  eval=dataclasses.replace(base.eval, systems=["student"]))
        summary = train(cfg, overwrite=True)
        rep = evaluate(cfg)
        results[name] = {"settings": VARIANTS[name], "student": rep["scores"]["student"],
                         "final_loss": summary["final_loss"], "seconds": summary["seconds"],
                         "steps": summary.get("steps"), "early_stop": summary.get("early_stop")}
        print(name, json.dumps(results[name]), flush=True)
        shutil.copy(Path(args.out) / "eval" / "predictions.jsonl", Path(args.out) / f"predictions-{name}.jsonl")
    cfg = dataclasses.replace(base, eval=dataclasses.replace(base.eval, systems=["base", "teacher"]))
    rep = evaluate(cfg)
    results["_reference"] = rep["scores"]
    print("reference", json.dumps(rep["scores"]))
    (Path(args.out) / "sweep.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
