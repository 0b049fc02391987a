"""Rescore a run's predictions with ROUGE-L two ways: ctxdistill's own token LCS (the metric before issue 20)
and Google's `rouge-score` as the Super-NaturalInstructions evaluation runs it (core/metrics.py, now).

    python benchmarks/rouge_change.py RUN_DIR/eval/predictions.jsonl [--out FILE]

The predictions are the same text both ways, so any difference is the metric's: rouge-score stems words
(Porter: "cats" = "cat") and tokenises on [a-z0-9] runs like the old one did.
"""

from __future__ import annotations

import json
import re
import unicodedata

from _common import parser, write_result


def old_rouge_l(pred: str, refs: list[str]) -> float:
    """The pre-change metric, kept here as the record: ROUGE-L F1 over lower-cased [a-z0-9] tokens, no stemming."""
    tokens = lambda s: re.findall(r"[a-z0-9]+", unicodedata.normalize("NFKC", s).lower())  # noqa: E731
    p, best = tokens(pred), 0.0
    for ref in refs:
        r = tokens(ref)
        if not p or not r:
            continue
        prev = [0] * (len(r) + 1)  # LCS by dynamic programming, one row at a time
        for a in p:
            cur = [0]
            for j, b in enumerate(r):
                cur.append(prev[j] + 1 if a == b else max(prev[j + 1], cur[j]))
            prev = cur
        if prev[-1]:
            prec, rec = prev[-1] / len(p), prev[-1] / len(r)
            best = max(best, 2 * prec * rec / (prec + rec))
    return best


def main() -> None:
    from ctxdistill.core.metrics import rouge_l

    ap = parser(__doc__)
    ap.add_argument("predictions", help="a run's eval/predictions.jsonl")
    args = ap.parse_args()
    rows = [json.loads(line) for line in open(args.predictions, encoding="utf-8")]
    systems = [k for k in rows[0] if k not in ("id", "input", "reference")]
    res = {"predictions": args.predictions, "n": len(rows), "systems": {}}
    for s in systems:
        old = [old_rouge_l(r[s]["prediction"], r["reference"]) for r in rows]
        new = [rouge_l(r[s]["prediction"], r["reference"]) for r in rows]
        res["systems"][s] = {"old_lcs": round(100 * sum(old) / len(rows), 2), "rouge_score": round(100 * sum(new) / len(rows), 2),
                             "rows_that_differ": sum(abs(a - b) > 1e-9 for a, b in zip(old, new))}
    write_result(res, args.out, echo=True)


if __name__ == "__main__":
    main()
