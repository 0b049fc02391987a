"""Built-in example-internalisation task: a date written one of many ways -> ISO 8601 (YYYY-MM-DD).

The teacher's context is k worked examples (no instruction) as earlier chat turns; the student sees
the date alone. The
references are computed, so inputs are free and scoring is exact. Every format names the month or puts
the year first, so no input is ambiguous (no 03/04/2021).
"""

from __future__ import annotations

import datetime as dt
import random

from ctxdistill.core.errors import UserError


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 11 <= n % 100 <= 13 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


FORMATS = (
    lambda d: f"{d:%B} {d.day}, {d.year}",          # March 5, 2021
    lambda d: f"{d.day} {d:%B} {d.year}",           # 5 March 2021
    lambda d: f"{d:%b} {d.day} {d.year}",           # Mar 5 2021
    lambda d: f"the {_ordinal(d.day)} of {d:%B}, {d.year}",  # the 5th of March, 2021
    lambda d: f"{d:%A}, {d:%B} {d.day}, {d.year}",  # Friday, March 5, 2021
    lambda d: f"{d.year}/{d.month:02d}/{d.day:02d}",  # 2021/03/05
    lambda d: f"{d.day}-{d:%b}-{d.year}",           # 5-Mar-2021
    lambda d: f"{d:%B} {_ordinal(d.day)} {d.year}",  # March 5th 2021
)


def sample(n: int, seed: int, exclude: set[str] = frozenset()) -> list[dict]:
    """n rows {"id", "input", "reference": [iso]} with distinct dates (1950-2049), none in `exclude` (ISO)."""
    rng = random.Random(seed)
    start, days = dt.date(1950, 1, 1), (dt.date(2049, 12, 31) - dt.date(1950, 1, 1)).days
    rows, seen = [], set(exclude)
    while len(rows) < n:
        d = start + dt.timedelta(days=rng.randrange(days + 1))
        iso = d.isoformat()
        if iso in seen:
            continue
        seen.add(iso)
        rows.append({"id": f"date-{seed}-{len(rows)}", "input": rng.choice(FORMATS)(d), "reference": [iso]})
    return rows


def split(n_examples: int, n_train: int, n_eval: int, seed: int = 0) -> tuple[list[dict], list[dict], list[dict]]:
    """(labelled examples for the context and the gradient-descent baseline, train inputs, eval rows),
    deterministic in `seed` and disjoint by date."""
    for name, v in (("n_examples", n_examples), ("n_train", n_train), ("n_eval", n_eval)):
        if v < 1:
            raise UserError(f"dates: {name} must be >= 1, got {v}")
    rows = sample(n_examples + n_train + n_eval, seed)
    examples, train, evals = rows[:n_examples], rows[n_examples:n_examples + n_train], rows[n_examples + n_train:]
    return examples, [{"id": r["id"], "input": r["input"]} for r in train], evals


def shots(examples: list[dict]) -> list[list[str]]:
    """The worked examples as [user, assistant] chat turns (task.teacher_shots): the 135M chat model
    follows examples given as earlier turns (20 held-out dates: 70% exact) but not as one block of
    'Input:/Output:' text in a single message (0%)."""
    return [[e["input"], e["reference"][0]] for e in examples]
