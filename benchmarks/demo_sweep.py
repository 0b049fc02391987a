"""Sweep student-training settings on a benchmark task (the demo, or SuperNI task1149), reusing one teacher pass.

    python benchmarks/demo_sweep.py --out runs/sweep [--task demo|superni] [--variants lora_1e-3,...] [--curve]

Prints and writes (OUT/sweep.json) the student's held-out score per variant next to the base and teacher
scores, with the training seconds, steps and early-stopping record. Used to choose the defaults
(docs/results.md). The task's config is the shipped one (`make demo`'s; the H1 recipe's for SuperNI); a
variant changes only [train] fields.

With `--curve`, every variant is also scored on the held-out inputs four times an epoch while it trains
(the cadence of early stopping's evaluations), and, where early stopping holds out a slice of the
distillation set, the curve records the held-out distillation loss there and the student's greedy
agreement with the teacher's answers on that slice (both label-free). A `*_never` variant holds the
slice out but never stops, so its curve shows what any stopping rule would have kept.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

from _common import parser, score_student, scored_training, task_config, write_result
from ctxdistill.core.metrics import SCORERS
from ctxdistill.core.models import load_tokenizer
from ctxdistill.core.sampling import generate
from ctxdistill.evaluate import evaluate
from ctxdistill.inputs import prepare_inputs
from ctxdistill.store import load_split
from ctxdistill.store import read_store
from ctxdistill.teach import teach
from ctxdistill.train import split_held_out, train
from ctxdistill.core.student import load_student

NEVER = 10 ** 6  # patience that never runs out: the slice is held out and evaluated, training runs to the ceiling

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
    # the learning rate / warm-up around the LoRA default, and curves for replaying stopping rules
    **{f"lora_ep{n}_fixed": {"method": "lora", "lr": 1e-3, "epochs": n, "early_stop": False} for n in range(1, 6)},
    "lora_es_ep3": {"method": "lora", "lr": 1e-3, "epochs": 3, "early_stop": True},
    "lora_es_ep5": {"method": "lora", "lr": 1e-3, "epochs": 5, "early_stop": True},
    **{f"lora_{lr}_warm{w}_fixed": {"method": "lora", "lr": float(lr), "warmup_ratio": w / 100, "epochs": 3,
                                    "early_stop": False}
       for lr in ("5e-4", "1e-3", "2e-3", "4e-3") for w in (0, 10)},
    **{f"lora_{lr}_warm{w}_ep{n}_never": {"method": "lora", "lr": float(lr), "warmup_ratio": w / 100, "epochs": n,
                                          "early_stop": True, "early_stop_patience": NEVER}
       for lr in ("5e-4", "1e-3", "2e-3", "4e-3") for w in (0, 10) for n in (3, 5)},
}
# older names, kept so earlier commands in docs/results.md still run
VARIANTS["lora_5e-4_fixed"] = VARIANTS["lora_5e-4_warm0_fixed"]
VARIANTS["lora_2e-3_fixed"] = VARIANTS["lora_2e-3_warm0_fixed"]
for _n in (3, 5):
    VARIANTS[f"lora_1e-3_ep{_n}_never"] = VARIANTS[f"lora_1e-3_warm0_ep{_n}_never"]

METRICS = {"demo": ("exact", "contains"), "superni": ("rouge_l", "contains")}


def agreement(model, held: list, *, pad_id: int, eos_id: int, batch_size: int) -> float:
    """Share of the held-out examples whose greedy completion from the student prompt is exactly the
    teacher's answer tokens followed by the terminator (label-free: the teacher's answers, no references)."""
    was_training = model.training
    model.eval()
    outs = generate(model, [e.prompt_ids for e in held], pad_id=pad_id, eos_id=eos_id,
                    max_new_tokens=max(len(e.answer_ids) for e in held) + 1, temperature=0.0,
                    batch_size=batch_size, seed=0, desc="")
    model.train(was_training)
    return sum(ids == e.answer_ids and fin for (ids, fin, *_), e in zip(outs, held)) / len(held)


def run_variant(cfg, name: str, metrics, rows: list[dict], curve: bool) -> dict:
    """Train one variant (scoring it while it trains with `curve`) and score the saved student."""
    points: list[dict] = []
    if not curve:
        summary = train(cfg, overwrite=True)
    else:
        _, examples = read_store(cfg.out / "teacher")
        _, held = split_held_out(examples, cfg.train)
        paused, t0 = 0.0, time.perf_counter()

        def on_point(model, tok, step: int) -> None:
            nonlocal paused
            t1 = time.perf_counter()
            p = {"step": step, "train_s": round(t1 - t0 - paused, 1), **score_student(model, tok, cfg, rows, metrics)}
            if held:
                p["agreement"] = agreement(model, held, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id,
                                           batch_size=cfg.eval.batch_size)
            points.append(p)
            paused += time.perf_counter() - t1

        with scored_training(on_point):
            summary = train(cfg, overwrite=True)
        # early stopping's own held-out loss, at the steps it evaluated
        for step, value in (summary.get("early_stop") or {}).get("evals", []):
            for p in points:
                if p["step"] == step:
                    p["held_out_loss"] = value
        last = {"step": summary["steps"], "train_s": summary["seconds"], "final": True}
        if held:  # the saved student: early stopping's best step, or the last
            tok = load_tokenizer(cfg.model.name)
            last["agreement"] = agreement(load_student(cfg), held, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id,
                                          batch_size=cfg.eval.batch_size)
        points.append(last)
    rep = evaluate(cfg)
    res = {"settings": VARIANTS[name], "student": rep["scores"]["student"], "final_loss": summary["final_loss"],
           "seconds": summary["seconds"], "steps": summary.get("steps"), "early_stop": summary.get("early_stop")}
    if curve:
        rows_pred = [json.loads(line) for line in open(cfg.out / "eval" / "predictions.jsonl", encoding="utf-8")]
        points[-1].update({m: round(sum(SCORERS[m](r["student"]["prediction"], r["reference"]) for r in rows_pred)
                                    / len(rows_pred), 4) for m in metrics})
        res["curve"] = points
    return res


def main() -> None:
    ap = parser(__doc__, out=False)
    ap.add_argument("--out", default="runs/sweep")
    ap.add_argument("--task", choices=sorted(METRICS), default="demo")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--curve", action="store_true", help="score every variant four times an epoch while it trains")
    ap.add_argument("--model", help="a model directory instead of the task's (e.g. a tiny random model, to smoke-test)")
    args = ap.parse_args()
    out = Path(args.out)
    base = task_config(args.task, out, args.model)
    metrics = METRICS[args.task]
    results: dict = {"task": args.task}
    prepare_inputs(base)
    teach(base)
    rows = load_split(base, "eval")
    for name in args.variants.split(","):
        cfg = dataclasses.replace(base, train=dataclasses.replace(base.train, **VARIANTS[name]),
                                  eval=dataclasses.replace(base.eval, systems=["student"]))
        results[name] = run_variant(cfg, name, metrics, rows, args.curve)
        print(name, json.dumps({k: v for k, v in results[name].items() if k != "curve"}), flush=True)
        shutil.copy(base.out / "eval" / "predictions.jsonl", out / f"predictions-{name}.jsonl")
        write_result(results, str(out / "sweep.json"))  # after every variant, so a long sweep keeps what it did
    cfg = dataclasses.replace(base, eval=dataclasses.replace(base.eval, systems=["base", "teacher"]))
    rep = evaluate(cfg)
    results["_reference"] = rep["scores"]
    print("reference", json.dumps(rep["scores"]))
    write_result(results, str(out / "sweep.json"))


if __name__ == "__main__":
    main()
