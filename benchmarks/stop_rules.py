"""Replay early-stopping rules on the training curves that `demo_sweep.py --curve` recorded.

    python benchmarks/stop_rules.py runs/sweep/sweep.json [--out FILE]

A `*_never` variant of demo_sweep.py holds early stopping's slice out and evaluates it at every evaluation
step, but never stops, and its curve has, at each of those steps, the label-free signals (the held-out
distillation loss, the greedy agreement with the teacher's answers on the slice) next to the task's metric
on the held-out inputs. Any rule that reads those signals would have stopped at some step and kept the
weights of some step (same data, same batches, same schedule up to the stop), so its score is the curve's
score at the step it keeps. The table gives, per rule: where it stops, which step it keeps, that step's
score, and the score as a share of the best fixed-epoch variant's (`lora_ep{n}_fixed`, when the sweep file
has them) and of the run to its ceiling.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from _common import parser, write_result
from ctxdistill.core.loop import EarlyStop


def replay(points: list[dict], signal: str, patience: int, keep: str) -> tuple[int, int]:
    """(the step training stops at, the step whose weights are kept) under one rule.

    signal: "loss" (lower held-out loss), "agreement" (higher greedy agreement), or "agreement+loss" (higher
    agreement, or the same agreement and a better loss). A plateau is `patience` evaluations in a row
    without a better value; keep "best" takes the best value's step (a later step wins a tie in agreement),
    keep "last" the step training stopped at.
    """
    evals = [p for p in points if "held_out_loss" in p and not p.get("final")]
    best = ref = None
    best_step = bad = 0
    for p in evals:
        key = {"loss": (-p["held_out_loss"],), "agreement": (p["agreement"],),
               "agreement+loss": (p["agreement"], -p["held_out_loss"])}[signal]
        if ref is None:
            improved = True
        elif signal == "loss":
            improved = EarlyStop.gain(p["held_out_loss"], -ref[0])
        elif signal == "agreement":
            improved = key > ref
        else:
            improved = key[0] > ref[0] or (key[0] == ref[0] and EarlyStop.gain(p["held_out_loss"], -ref[1]))
        if improved:
            ref, bad = key, 0
        else:
            bad += 1
        if best is None or key > best or (signal != "loss" and key == best):
            best, best_step = key, p["step"]
        if bad >= patience:
            return p["step"], best_step if keep == "best" else p["step"]
    last = evals[-1]["step"]
    return last, best_step if keep == "best" else last


RULES = [(s, p, k) for s in ("loss", "agreement", "agreement+loss") for p in (3, 4, 8) for k in ("best", "last")]


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("sweep", nargs="+", help="sweep.json files written by demo_sweep.py --curve")
    a = ap.parse_args()
    out: dict = {}
    for path in a.sweep:
        sweep = json.loads(Path(path).read_text())
        metric = {"demo": "exact", "superni": "rouge_l"}[sweep.get("task", "demo")]
        fixed = {k: v["student"] for k, v in sweep.items() if k.startswith("lora_ep") and k.endswith("_fixed")}
        best_fixed = max(fixed.values(), default=math.nan)
        for name, res in sweep.items():
            if not name.endswith("_never") or "curve" not in res:
                continue
            by_step = {p["step"]: p for p in res["curve"] if not p.get("final")}
            ceiling = max(by_step)
            rows = []
            for signal, patience, keep in RULES:
                stop, kept = replay(res["curve"], signal, patience, keep)
                score = by_step[kept][metric]
                rows.append({"signal": signal, "patience": patience, "keep": keep, "stopped_at": stop, "kept": kept,
                             "steps_of_ceiling": round(stop / ceiling, 3), metric: score,
                             "of_best_fixed": round(score / best_fixed, 3) if best_fixed else None,
                             "of_ceiling": round(score / by_step[ceiling][metric], 3) if by_step[ceiling][metric] else None})
            out[f"{path}:{name}"] = {"metric": metric, "fixed": fixed, "ceiling_step": ceiling,
                                     "ceiling_score": by_step[ceiling][metric], "rules": rows}
            print(f"\n{path} {name}: {metric} at the ceiling (step {ceiling}) {by_step[ceiling][metric]:.3f}; "
                  f"best fixed-epoch {best_fixed:.3f} {fixed}")
            print(f"{'signal':<15} {'pat':>3} {'keep':<5} {'stop':>5} {'kept':>5} {metric:>7} {'/fixed':>7} {'/ceil':>6}")
            for r in rows:
                print(f"{r['signal']:<15} {r['patience']:>3} {r['keep']:<5} {r['stopped_at']:>5} {r['kept']:>5} "
                      f"{r[metric]:>7.3f} {r['of_best_fixed'] or math.nan:>7.3f} {r['of_ceiling'] or math.nan:>6.3f}")
    write_result(out, a.out)


if __name__ == "__main__":
    main()
