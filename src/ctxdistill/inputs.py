"""Stage 1, inputs: load (later also synthesise) the raw task inputs, split into train and eval.

Writes `<out>/inputs/train.jsonl` ({"id", "input"}) and `<out>/inputs/eval.jsonl` ({"id", "input",
"reference": [...]}) plus `stats.json`. Every later stage reads these files, so a run is reproducible
from its own directory.
"""

from __future__ import annotations

import json
from pathlib import Path

from ctxdistill.config import Config
from ctxdistill.errors import UserError
from ctxdistill.files import read_jsonl, read_jsonl_numbered, write_atomic, write_jsonl


def prepare_inputs(cfg: Config) -> dict:
    """Load or split the task's inputs into `<out>/inputs/`; return the stats."""
    d = cfg.data
    if d.superni:
        from ctxdistill.tasks import superni

        task = superni.load(cfg.path(d.superni))
        train, evals = superni.split(task, d.n_eval, d.n_train, d.seed)
        source = {"superni": str(cfg.path(d.superni)), "n_eval": d.n_eval, "n_train": d.n_train, "seed": d.seed}
    else:
        train = _normalise(read_jsonl_numbered(cfg.path(d.train), ("input",)), cfg.path(d.train), need_ref=False)
        evals = _normalise(read_jsonl_numbered(cfg.path(d.eval), ("input",)), cfg.path(d.eval), need_ref=True)
        source = {"train": str(cfg.path(d.train)), "eval": str(cfg.path(d.eval))}
    overlap = {r["input"] for r in train} & {r["input"] for r in evals}
    stats = {"source": source, "n_train": len(train), "n_eval": len(evals), "train_eval_overlap": len(overlap)}
    out = cfg.out / "inputs"
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "eval.jsonl", evals)
    write_atomic(out / "stats.json", json.dumps(stats, indent=2))
    return stats


def load_split(cfg: Config, split: str) -> list[dict]:
    """Rows of one split, preparing the inputs stage first if it has not run."""
    f = cfg.out / "inputs" / f"{split}.jsonl"
    if not f.is_file():
        prepare_inputs(cfg)
    return read_jsonl(f, ("id", "input"))


def _normalise(rows: list[tuple[int, dict]], path: Path, need_ref: bool) -> list[dict]:
    out = []
    for n, r in rows:
        if not isinstance(r["input"], str) or not r["input"].strip():
            raise UserError(f"{path}:{n}: 'input' must be a non-empty string")
        row = {"id": str(r.get("id", f"{path.stem}-{n}")), "input": r["input"]}
        if need_ref:
            ref = r.get("reference", r.get("references", r.get("output")))
            if ref is None:
                raise UserError(f"{path}:{n}: eval inputs need a 'reference' (a string or a list of strings)")
            refs = ref if isinstance(ref, list) else [ref]
            if not refs or not all(isinstance(x, str) for x in refs):
                raise UserError(f"{path}:{n}: 'reference' must be a string or a non-empty list of strings")
            row["reference"] = refs
        out.append(row)
    ids = [r["id"] for r in out]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise UserError(f"{path}: duplicate id {dup!r}")
    return out
