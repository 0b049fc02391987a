"""Progress bars with ETA (rich) for every stage that takes more than a few seconds."""

from __future__ import annotations

import contextlib
import os
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# soft_wrap: a line is never broken by rich (a log file keeps a path whole; a terminal wraps as it likes).
console = Console(stderr=True, soft_wrap=True)


@contextlib.contextmanager
def bar(description: str, total: int):
    """Yield `advance(n=1)`. Quiet when CTXDISTILL_QUIET is set, stderr is not a terminal, the
    description is empty (an inner loop under another bar: rich shows one live display at a time), or
    this is not the main process of a multi-process run."""
    if not description or os.environ.get("CTXDISTILL_QUIET") or not sys.stderr.isatty() or not _main():
        yield lambda n=1: None
        return
    cols = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*cols, console=console, transient=False) as p:
        task = p.add_task(description, total=total)
        yield lambda n=1: p.advance(task, n)


def _main() -> bool:
    """Rank 0, or a single process (the launcher's RANK; no torch.distributed call needed)."""
    return os.environ.get("RANK", "0") == "0"


def log(msg: str) -> None:
    """A status line on stderr (stdout is kept for results), from the main process only."""
    if not os.environ.get("CTXDISTILL_QUIET") and _main():
        console.print(msg, highlight=False, markup=False)  # plain text: "[rank 1]" or a regex is not a style


def warn(msg: str) -> None:
    """A warning on stderr, shown even when quiet (and by every rank): partial results the user must know about."""
    who = "" if _main() else f"[rank {os.environ['RANK']}] "
    console.print(f"{who}warning: {msg}", highlight=False, markup=False)
