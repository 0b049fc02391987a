"""The paper's experiments (Snell, Klein & Zhong 2022), each a recipe: `ctxdistill run RECIPE.toml [--quick]`.

A recipe is a config file with an `[experiment]` table instead of `[task]`/`[data]`. Each experiment builds
ordinary `Config`s and runs the product's pipeline on them (inputs -> teach -> train -> eval), then tabulates;
the pipeline never imports this package. `ctxdistill run` finds it through the `ctxdistill.recipes` entry
point (pyproject.toml), which names this module: `handles`, `run` and `summary` below.

  instructions.py   superni_instructions (H1), superni_explanations (H2), superni_overwrite (H3)
  examples.py       examples: k concrete examples in the context (dates, SPIDER text-to-SQL), against
                    gradient descent on the same examples, and more examples than fit in one window
  scratchpad.py     scratchpad: a scratchpad teacher distilled into direct answers (addition, H6)
"""

from __future__ import annotations

import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def handles(path: str | Path) -> bool:
    """Whether a config file is an experiment recipe (has an [experiment] table)."""
    try:
        return "experiment" in tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return False  # load_config reports the problem


def run(path: str | Path, argv: list[str], quick: bool = False, out_dir: str | None = None) -> dict:
    """Run a recipe and write `<out>/report.json` and `report.md`; return the report."""
    raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    kind = raw["experiment"].get("kind") if isinstance(raw.get("experiment"), dict) else None
    if kind == "examples":
        from ctxdistill.experiments.examples import run_examples

        return run_examples(Path(path), raw, argv, quick, out_dir)
    if kind == "scratchpad":
        from ctxdistill.experiments.scratchpad import run_scratchpad

        return run_scratchpad(Path(path), raw, argv, quick, out_dir)
    from ctxdistill.experiments.instructions import run_instructions

    return run_instructions(path, argv, quick, out_dir)


def summary(rep: dict) -> dict:
    """What `ctxdistill run` prints of a report: its tables, averages and targets."""
    if rep["kind"] == "examples":
        rep = {**rep, "table": [{k: v for k, v in r.items() if k != "details"} for r in rep["table"]]}
    keys = ("kind", "average", "average_where_teacher_helps", "correlation", "skipped_tasks", "token_ratio", "targets",
            "transfer", "rows" if rep["kind"] == "superni_overwrite" else "table")
    return {k: rep[k] for k in keys if k in rep}


# The names recipes and tests used before the package existed.
is_experiment, run_experiment = handles, run
