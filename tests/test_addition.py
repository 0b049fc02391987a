"""The built-in addition task: problem generation, scratchpad format, disjoint splits, numeric scoring."""

import re

import pytest

from ctxdistill.config import ExtractorConfig
from ctxdistill.core.errors import UserError
from ctxdistill.core.extract import answer_text
from ctxdistill.tasks import addition


LINE = re.compile(r"(\d+)\+(\d+), carry (\d): (\d)\+(\d)\+(\d)=(\d+), so far (\d+)")


def _check_scratchpad(a, b):
    """Re-derive every line from the one before: the numbers lose their last digit, the carry moves on,
    the column sum is right, and "so far" grows by the column's digit; the answer is the sum."""
    text = addition.scratchpad(a, b)
    lines = text.splitlines()
    assert lines[-1] == f"{addition.ANSWER_MARKER} {a + b}"
    x_left, y_left, carry, so_far = a, b, 0, ""
    for line in lines[:-1]:
        m = LINE.fullmatch(line)
        if m is None:
            assert line == f"carry 1: so far 1{so_far}" and carry == 1 and x_left == y_left == 0
            so_far = "1" + so_far
            continue
        xs, ys, c, x, y, c2, s, sf = m.groups()
        assert (int(xs), int(ys), int(c)) == (x_left, y_left, carry)
        assert (int(x), int(y), int(c2)) == (x_left % 10, y_left % 10, carry) and int(s) == int(x) + int(y) + carry
        assert sf == str(int(s) % 10) + so_far
        x_left, y_left, carry, so_far = x_left // 10, y_left // 10, int(s) // 10, sf
    assert int(so_far) == a + b
    return text


@pytest.mark.parametrize("a, b", [(0, 0), (5, 7), (57, 68), (99999999, 1), (12345678, 87654321), (9, 99999999), (100, 5), (10 ** 63, 10 ** 64 - 1)])
def test_scratchpad_is_correct_column_by_column(a, b):
    text = _check_scratchpad(a, b)
    marker = ExtractorConfig(kind="marker", marker=addition.ANSWER_MARKER)
    assert answer_text(marker, text).strip() == str(a + b)


def test_random_scratchpads_and_digit_counts():
    rows = addition.sample(2000, max_digits=8, seed=1)
    for r in rows[:300]:
        _check_scratchpad(r["a"], r["b"])
    lengths = {len(str(r["a"])) for r in rows}
    assert lengths == set(range(1, 9))  # every digit count occurs
    assert len({(r["a"], r["b"]) for r in rows}) == 2000


def test_splits_are_disjoint_and_deterministic():
    labelled, train, evals = addition.split(500, 3000, 2000, seed=0)
    key = lambda r: r["input"]  # noqa: E731
    assert len(evals) == 2000 and not ({key(r) for r in evals} & ({key(r) for r in labelled} | {key(r) for r in train}))
    assert not {key(r) for r in labelled} & {key(r) for r in train}
    assert addition.split(500, 3000, 2000, seed=0) == (labelled, train, evals)
    assert addition.split(10, 10, 2000, seed=0)[2] == evals  # eval does not move when training sets change


def test_score_and_bad_requests():
    assert addition.score(" 125", ["125"]) == 1.0 and addition.score("Answer: 1,250", ["1250"]) == 1.0
    assert addition.score("125.", ["125"]) == 0.0 and addition.score("", ["0"]) == 0.0
    assert addition.score("one hundred", ["100"]) == 0.0
    with pytest.raises(UserError, match="only 100 exist"):
        addition.sample(101, max_digits=1)
    for bad in (0, 65, "8"):
        with pytest.raises(UserError, match="1..64"):
            addition.sample(1, max_digits=bad)
