"""What the benchmark scripts share: the argument parser's common part, a timer, the peak-memory reading,
and writing a result as JSON with the command that produced it."""

from __future__ import annotations

import argparse
import contextlib
import json
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
