"""Sweep student-training settings on the demo task, reusing one teacher pass.

    python benchmarks/demo_sweep.py --out runs/sweep [--variants lr1e-5,lora]

Prints and writes (runs/sweep/sweep.json) the student's held-out score per variant next to the
base and teacher scores. Used to choose the demo's defaults (docs/results.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

from ctxdistill.demo import demo_config
from ctxdistill.evaluate import evaluate
from ctxdistill.teacher import teach
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
}


def main() -> None:
    ap = argparse.ArgumentParser()
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
                         "final_loss": summary["final_loss"], "seconds": summary["seconds"]}
        print(name, json.dumps(results[name]), flush=True)
        shutil.copy(Path(args.out) / "eval" / "predictions.jsonl", Path(args.out) / f"predictions-{name}.jsonl")
    cfg = dataclasses.replace(base, eval=dataclasses.replace(base.eval, systems=["base", "teacher"]))
    rep = evaluate(cfg)
    results["_reference"] = rep["scores"]
    print("reference", json.dumps(rep["scores"]))
    (Path(args.out) / "sweep.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
