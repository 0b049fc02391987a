"""What the benchmark scripts share: the argument parser's common part, a timer, the peak-memory reading,
writing a result as JSON with the command that produced it, and the training benchmarks' tasks (their
shipped configs, scoring a student while it trains)."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import resource
import sys
import time
from pathlib import Path


def parser(doc: str, out: bool = True) -> argparse.ArgumentParser:
    """An ArgumentParser described by the first paragraph of a script's docstring, with `--out FILE`."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    if out:
        ap.add_argument("--out", help="write the results as JSON here")
    return ap


def command() -> str:
    """The command line that is running, as a user would type it."""
    return " ".join(["python", *sys.argv])


def write_result(res: dict, out: str | None, echo: bool = False) -> None:
    """Add the command to `res` and write it as JSON to `out` (when given); with `echo`, print it too."""
    res.setdefault("command", command())
    text = json.dumps(res, indent=2) + "\n"
    if echo:
        print(text, end="")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)


class Timer:
    """`with timed() as t: ...` then `t.seconds`: wall time by time.perf_counter."""

    seconds = 0.0


@contextlib.contextmanager
def timed():
    t = Timer()
    t0 = time.perf_counter()
    try:
        yield t
    finally:
        t.seconds = time.perf_counter() - t0


def vm_hwm_mb() -> float:
    """This process's peak resident set (VmHWM). Unlike ru_maxrss it is reset by exec, so a spawned
    child does not inherit its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: best effort


# -- the jobs the training benchmarks share -------------------------------------------------------------

SUPERNI_TASK = "task1149_item_check_edible.json"  # the H1 task with the largest teacher gain


def task_config(task: str, out_dir: Path, model: str | None = None):
    """The shipped settings of a benchmark task: `demo` (`make demo`'s config: country -> capital, 171 train,
    60 held out) or `superni` (the H1 recipe's config for task1149, 64 train, 50 held out)."""
    if task == "demo":
        from ctxdistill.demo import demo_config

        return demo_config(str(out_dir), model or "embedded")
    from ctxdistill.experiments.instructions import load_experiment, task_config as superni_config

    root = Path(__file__).resolve().parents[1]
    exp, raw, base = load_experiment(root / "recipes/superni_instructions.toml", out_dir=str(out_dir))
    if model:
        raw = {**raw, "model": {**raw.get("model", {}), "name": model}}
    path = next(t for t in exp.tasks if t.endswith(SUPERNI_TASK))  # as the recipe names it
    return superni_config(exp, raw, base, path, out_dir)[1]


@contextlib.contextmanager
def scored_training(on_point, points_per_epoch: int = 4):
    """While inside, `ctxdistill.train.train` calls `on_point(model, tok, step)` before its first step, then
    every 1/points_per_epoch of an epoch between steps (the cadence of early stopping's evaluations: after
    the held-out loss of that step, before the next step), and after the last step when training runs to
    its ceiling (before early stopping restores its best weights). Yields a dict holding the student being
    trained (`model`, `tok`)."""
    import ctxdistill.train as T

    held: dict = {}
    seeded, batches = T.seeded_student, T.epoch_batches

    def seeded_student(c):  # keep a handle on the student being trained
        held["tok"], held["model"] = seeded(c)
        return held["tok"], held["model"]

    def epoch_batches(examples, tc):
        every = max(1, math.ceil(len(examples) / tc.batch_size) // points_per_epoch)
        i = 0
        for i, item in enumerate(batches(examples, tc)):
            if i % every == 0:
                on_point(held["model"], held["tok"], i)
            yield item
        on_point(held["model"], held["tok"], i + 1)  # after the last step (not reached when training stops early)

    T.seeded_student, T.epoch_batches = seeded_student, epoch_batches
    try:
        yield held
    finally:
        T.seeded_student, T.epoch_batches = seeded, batches


def score_student(model, tok, cfg, rows: list[dict], metrics) -> dict:
    """`metrics` (names in ctxdistill's SCORERS) of `model` under the student template, greedy, on `rows`."""
    from ctxdistill.core.metrics import SCORERS
    from ctxdistill.core.templates import student_template
    from ctxdistill.evaluate import predict, replies

    was_training = model.training
    model.eval()
    texts, _ = predict(model, tok, student_template(cfg.task), rows, cfg, "")
    model.train(was_training)
    preds = replies(cfg, "student", texts, rows)
    return {m: round(sum(SCORERS[m](p, r["reference"]) for p, r in zip(preds, rows)) / len(rows), 4) for m in metrics}
