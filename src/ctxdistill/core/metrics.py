"""Reference metrics: pure functions of (prediction, references) -> [0, 1], the best over the references.

  exact     normalised exact match (`normalize`: the SQuAD / Super-NaturalInstructions answer normalisation)
  contains  a normalised reference occurs in the prediction as a whole-word span (lenient: a sentence that
            holds the answer counts)
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


@functools.cache
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(pred: str, refs: list[str]) -> float:
    """ROUGE-L F-measure (rouge-score, stemmed), the best over the references; 0 for an empty prediction."""
    return max((_scorer().score(r, pred)["rougeL"].fmeasure for r in refs), default=0.0)  # score(target, prediction)


SCORERS = {"exact": exact_match, "contains": contains, "rouge_l": rouge_l}
