"""The answer extractor f: find the final answer inside the teacher's completion.

`extract` returns the answer's character span in the assistant text (prefill + completion), or None
when f fails. It never raises, whatever the text: a failure is a dropped example, counted and reported.
"""

from __future__ import annotations

import re

from ctxdistill.config import ExtractorConfig


# f for one-line answers: the first non-empty line of the teacher's completion (SuperNI outputs, dates, SQL).
FIRST_LINE = {"kind": "regex", "pattern": r"\A\s*([^\n]*\S)"}


def first_line(text: str) -> str:
    """The first line of a reply, stripped: how one-line answers are read off a student's completion."""
    return text.strip().split("\n", 1)[0].strip()


def extract(cfg: ExtractorConfig, text: str) -> tuple[int, int] | None:
    """Span (start, end) of the answer in `text`, trimmed of surrounding whitespace; None if f fails."""
    if cfg.kind == "whole":
        start, end = 0, len(text)
    elif cfg.kind == "marker":
        i = text.rfind(cfg.marker)
        if i < 0:
            return None
        start, end = i + len(cfg.marker), len(text)
    else:
        m = re.search(cfg.pattern, text)
        if m is None or m.start(cfg.group) < 0:
            return None
        start, end = m.span(cfg.group)
    if cfg.stop:
        cut = [j for j in (text.find(c, start, end) for c in cfg.stop) if j >= 0]
        end = min(cut, default=end)
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return (start, end) if end > start else None


def answer_text(cfg: ExtractorConfig, text: str) -> str | None:
    """The extracted answer as a string (for scoring); None if f fails."""
    span = extract(cfg, text)
    return None if span is None else text[span[0]:span[1]]
