"""Reference metrics: pure functions of (prediction, references) -> [0, 1], the best over the references.

  exact     normalised exact match (`normalize`: the SQuAD / Super-NaturalInstructions answer normalisation)
  contains  a normalised reference occurs in the prediction as a whole-word span (lenient: a sentence that
            holds the answer counts)
  span      an accepted answer occurs in the prediction, case-insensitively, as a span that does not cut a word
            or number ("45 days" is found in "within 45 days", not in "145 days"): the closed-book fact check
  rouge_l   ROUGE-L F-measure from Google's `rouge-score`, as the Super-NaturalInstructions evaluation computes
            it: `RougeScorer(["rougeL"], use_stemmer=True)` with its default tokenizer (lower case, runs of
            [a-z0-9], Porter stemming), so figures compare with the paper's and the benchmark's

To add a metric: a function here, and its name in SCORERS (then `task.scorer` accepts it, config.py).
"""

from __future__ import annotations

import functools
import re
import string
import unicodedata

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(s: str) -> str:
    """Unicode NFKC, lower case, ASCII punctuation removed, the articles a/an/the removed, whitespace collapsed
    to single spaces (SQuAD's rule, which Super-NaturalInstructions' exact match uses)."""
    s = unicodedata.normalize("NFKC", s).lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def exact_match(pred: str, refs: list[str]) -> float:
    """1 if the normalised prediction equals a normalised reference."""
    p = normalize(pred)
    return float(any(p == normalize(r) for r in refs))


def contains(pred: str, refs: list[str]) -> float:
    """1 if some normalised reference occurs in the prediction as a whole-word span."""
    p = f" {normalize(pred)} "
    return float(any(normalize(r) and f" {normalize(r)} " in p for r in refs))


def span_match(pred: str, answers: list[str]) -> float:
    """1 if some answer occurs in the prediction, case-insensitively (casefold, whitespace collapsed), with no
    letter or digit running on at either end of the match where the answer itself ends in one."""
    p = " ".join(pred.split()).casefold()
    for a in answers:
        a = " ".join(a.split()).casefold()
        if a and re.search((r"(?<![\w])" if a[0].isalnum() else "") + re.escape(a)
                           + (r"(?![\w])" if a[-1].isalnum() else ""), p):
            return 1.0
    return 0.0


def bootstrap_interval(stat, n: int, *, level: float = 0.95, draws: int = 2000, seed: int = 0) -> list[float]:
    """Percentile bootstrap over n items: `stat(indices)` -> float, evaluated on `draws` resamples of
    range(n) with replacement; returns [low, high] of the central `level` interval. Items are the held-out
    inputs (or answers), so the interval shows how much the score would move with another draw of them."""
    import random

    if n == 0:
        return [0.0, 0.0]
    rng = random.Random(seed)
    vals = sorted(stat([rng.randrange(n) for _ in range(n)]) for _ in range(draws))
    lo = vals[int((1 - level) / 2 * draws)]
    hi = vals[min(draws - 1, int((1 + level) / 2 * draws))]
    return [round(lo, 4), round(hi, 4)]


def mean_interval(values: list[float], **kw) -> list[float]:
    """95% bootstrap interval of the mean of per-item scores."""
    return bootstrap_interval(lambda idx: sum(values[i] for i in idx) / len(idx), len(values), **kw)


@functools.cache
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(pred: str, refs: list[str]) -> float:
    """ROUGE-L F-measure (rouge-score, stemmed), the best over the references; 0 for an empty prediction."""
    return max((_scorer().score(r, pred)["rougeL"].fmeasure for r in refs), default=0.0)  # score(target, prediction)


SCORERS = {"exact": exact_match, "contains": contains, "span": span_match, "rouge_l": rouge_l}
