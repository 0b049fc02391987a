"""Built-in scratchpad task: addition of two 1..n-digit numbers (paper H6, Table 3).

Inputs are free: each operand's digit count is uniform in 1..max_digits and its value uniform among
numbers with that many digits. Two output formats:
  scratchpad  the column sums right to left with their carries and the digits so far, then
              "Answer: <sum>"; f (extractor kind "marker", marker "Answer:") keeps the sum;
  direct      the sum alone.
Scoring is exact and numeric. Eval problems are drawn disjoint from every training set.
"""

from __future__ import annotations

import random

from ctxdistill.core.errors import UserError

ANSWER_MARKER = "Answer:"


def question(a: int, b: int) -> str:
    return f"{a} + {b}"


def scratchpad(a: int, b: int) -> str:
    """Column by column, least significant first; every line restates what is left of both numbers (an
    exhausted one as 0), the carry in, the column sum, and the sum's digits so far (the column sum's last
    digit in front of the previous line's); then the answer line. Each step copies nearby text or adds
    three single digits, so nothing requires counting positions from the end of a number, which a small
    pretrained model does badly. Written without spaces around digits: SmolLM2 spends a token on each.

    e.g. 57 + 68 -> "57+68, carry 0: 7+8+0=15, so far 5\n
                     5+6, carry 1: 5+6+1=12, so far 25\n
                     carry 1: so far 125\nAnswer: 125"
    """
    total, lines, carry, so_far = a + b, [], 0, ""
    while a or b or not lines:
        x, y = a % 10, b % 10
        s = x + y + carry
        so_far = str(s % 10) + so_far
        lines.append(f"{a}+{b}, carry {carry}: {x}+{y}+{carry}={s}, so far {so_far}")
        a, b, carry = a // 10, b // 10, s // 10
    if carry:
        lines.append(f"carry {carry}: so far {carry}{so_far}")
        so_far = f"{carry}{so_far}"
    assert int(so_far) == total
    return "\n".join(lines + [f"{ANSWER_MARKER} {total}"])


def direct(a: int, b: int) -> str:
    return str(a + b)


def _operand(rng: random.Random, max_digits: int) -> int:
    d = rng.randint(1, max_digits)
    return rng.randint(0 if d == 1 else 10 ** (d - 1), 10 ** d - 1)


def sample(n: int, *, max_digits: int = 8, seed: int = 0, exclude: set = frozenset()) -> list[dict]:
    """n distinct problems {"id", "input", "a", "b", "reference": [sum]}, none of whose (a, b) is in `exclude`."""
    if not isinstance(max_digits, int) or not 1 <= max_digits <= 64:
        raise UserError(f"addition: max_digits must be an integer in 1..64, got {max_digits!r}")
    space = (10 ** max_digits) ** 2
    if n > space - len(exclude):
        raise UserError(f"addition: {n} distinct problems asked for, only {space - len(exclude)} exist with {max_digits} digit(s)")
    rng, seen, rows = random.Random(seed), set(exclude), []
    while len(rows) < n:
        a, b = _operand(rng, max_digits), _operand(rng, max_digits)
        if (a, b) in seen:
            continue
        seen.add((a, b))
        rows.append({"id": f"add-{seed}-{len(rows)}", "input": question(a, b), "a": a, "b": b, "reference": [direct(a, b)]})
    return rows


def split(n_labelled: int, n_train: int, n_eval: int, *, max_digits: int = 8, seed: int = 0) -> tuple[list, list, list]:
    """(labelled problems for teacher preparation and the baselines, unlabelled train inputs, eval problems):
    three disjoint sets, deterministic in `seed`. Eval comes first, so it does not move when the
    training sets grow."""
    evals = sample(n_eval, max_digits=max_digits, seed=seed)
    taken = {(r["a"], r["b"]) for r in evals}
    labelled = sample(n_labelled, max_digits=max_digits, seed=seed + 1, exclude=taken)
    taken |= {(r["a"], r["b"]) for r in labelled}
    train = sample(n_train, max_digits=max_digits, seed=seed + 2, exclude=taken)
    return labelled, [{"id": r["id"], "input": r["input"]} for r in train], evals


def score(prediction: str, reference: list[str]) -> float:
    """1.0 when the prediction, read as an integer (commas and spaces ignored), equals the sum."""
    text = prediction.strip()
    if text.startswith(ANSWER_MARKER):
        text = text[len(ANSWER_MARKER):]
    digits = text.strip().replace(",", "").replace(" ", "")
    return float(digits.isdigit() and any(int(digits) == int(r) for r in reference))
