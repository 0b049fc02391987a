"""Training time with early stopping (the default) against fixed epochs, alternating in one process.

    python benchmarks/early_stop_cost.py [--task demo|superni] [--rounds 2] [--out FILE]

One teacher pass (the task's shipped config), then `train` runs `--rounds` times each way, alternating
(early stopping, fixed, early stopping, ...), so both see the same machine state; a separate process per way
or the order of a sweep moved the seconds by 10-15% here. Reports each run's training seconds and steps and
the student's held-out score (the same in every round: training is deterministic).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from _common import parser, task_config, write_result
from ctxdistill.evaluate import evaluate
from ctxdistill.inputs import prepare_inputs
from ctxdistill.teach import teach
from ctxdistill.train import train


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--task", choices=["demo", "superni"], default="demo")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path("runs/early_stop_cost"))
    ap.add_argument("--model", help="a model directory instead of the task's (a tiny random model, to smoke-test)")
    a = ap.parse_args()
    base = task_config(a.task, a.workdir, a.model)
    prepare_inputs(base)
    teach(base)
    runs, scores = [], {}
    for _ in range(a.rounds):
        for early_stop in (True, False):
            cfg = dataclasses.replace(base, train=dataclasses.replace(base.train, early_stop=early_stop),
                                      eval=dataclasses.replace(base.eval, systems=["student"]))
            t = time.perf_counter()
            summary = train(cfg, overwrite=True)
            runs.append({"early_stop": early_stop, "train_s": summary["seconds"], "stage_s": round(time.perf_counter() - t, 1),
                         "steps": summary["steps"], "early_stop_record": summary.get("early_stop")})
            if early_stop not in scores:
                scores[early_stop] = evaluate(cfg)["scores"]["student"]
            print({k: v for k, v in runs[-1].items() if k != "early_stop_record"}, flush=True)
    mean = {w: sum(r["train_s"] for r in runs if r["early_stop"] == w) / a.rounds for w in (True, False)}
    res = {"task": a.task, "runs": runs, "student": {"early_stop": scores[True], "fixed": scores[False]},
           "mean_train_s": mean, "ratio_early_stop_to_fixed": round(mean[True] / mean[False], 3)}
    print(f"training time, early stopping / fixed epochs: {res['ratio_early_stop_to_fixed']:.3f} "
          f"({mean[True]:.1f} s / {mean[False]:.1f} s); student {scores[True]:.3f} / {scores[False]:.3f}")
    write_result(res, a.out)


if __name__ == "__main__":
    main()
