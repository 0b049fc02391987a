"""Progress bars with ETA (rich) for every stage that takes more than a few seconds."""

from __future__ import annotations

import contextlib
import os
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


@contextlib.contextmanager
def bar(description: str, total: int):
    """Yield `advance(n=1)`. Quiet when CTXDISTILL_QUIET is set, stderr is not a terminal, or the
    description is empty (an inner loop under another bar: rich shows one live display at a time)."""
    if not description or os.environ.get("CTXDISTILL_QUIET") or not sys.stderr.isatty():
        yield lambda n=1: None
        return
    cols = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*cols, console=console, transient=False) as p:
        task = p.add_task(description, total=total)
        yield lambda n=1: p.advance(task, n)


def log(msg: str) -> None:
    """A status line on stderr (stdout is kept for results)."""
    if not os.environ.get("CTXDISTILL_QUIET"):
        console.print(msg, highlight=False)


def warn(msg: str) -> None:
    """A warning on stderr, shown even when quiet: partial results the user must know about."""
    console.print(f"warning: {msg}", highlight=False)
