"""The built-in addition task: problem generation, scratchpad format, disjoint splits, numeric scoring."""

import re

import pytest

from ctxdistill.config import ExtractorConfig
from ctxdistill.errors import UserError
from ctxdistill.extract import answer_text
from ctxdistill.tasks import addition


def _check_scratchpad(a, b):
    text = addition.scratchpad(a, b)
    carry, digits = 0, []
    for line in text.splitlines()[:-1]:
        m = re.fullmatch(r"(\d) \+ (\d) \+ (\d) = (\d+), write (\d), carry (\d)", line)
        if m is None:
            assert line == f"write {carry}" and carry == 1
            digits.append(str(carry))
            continue
        x, y, c, s, w, c2 = map(int, m.groups())
        assert c == carry and s == x + y + c and w == s % 10 and c2 == s // 10
        digits.append(str(w))
        carry = c2
    assert int("".join(reversed(digits))) == a + b
    return text


@pytest.mark.parametrize("a, b", [(0, 0), (5, 7), (57, 68), (99999999, 1), (12345678, 87654321), (9, 99999999)])
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
