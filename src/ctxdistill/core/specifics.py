"""Specifics: the checkable facts in a text (prices, numbers with units, times, years, phone numbers, e-mail and
web addresses, capitalised names), found by rules, with no model.

Two stages use them: the inputs stage turns a context sentence's specific into a question about it
(selfstudy.py), and the `grounded` rule check (checks.py) passes a reply only when each specific it states
also occurs in the context (or the user's message), so a teacher sample that invents a price, a phone number
or a name is rejected.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_NUM_WORDS = ("one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|fifteen|twenty|thirty|forty|"
              "forty-five|fifty|sixty|ninety|hundred")
_UNITS = (r"(?:business\s+days?|days?|nights?|hours?|weeks?|months?|years?|minutes?|inch(?:es)?|degrees?|"
          r"percent|%|states|countries|pounds|lbs?|miles|kg|cm)")
# Order matters: earlier kinds win where matches overlap (a phone number is not three numbers).
PATTERNS = [
    ("email", r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+"),
    ("web", r"\b(?:https?://)?(?:www\.)?[a-z0-9-]+\.(?:com|org|net|io|co|us|vet)\b(?:/\S*)?"),
    ("phone", r"(?:\+?1[-. ])?\(?\b\d{3}\)?[-. ]\d{3}[-. ]\d{4}\b"),
    ("price", r"\$\s?\d{1,3}(?:,\d{3})+(?:\.\d\d)?|\$\s?\d+(?:\.\d\d)?"),
    ("time", r"\b\d{1,2}(?::\d\d)?\s?(?:[AaPp]\.?[Mm]\b\.?)|\b\d{1,2}:\d\d\b"),
    ("year", r"\b(?:19|20)\d\d\b"),
    ("quantity", r"\b\d+(?:\.\d+)?(?:\s?(?:-|to|or)\s?\d+(?:\.\d+)?)?(?:[\s-]?" + _UNITS + r")?\b%?"),
    ("quantity", r"\b(?:" + _NUM_WORDS + r")(?:\s(?:to|or)\s(?:" + _NUM_WORDS + r"))?[\s-]" + _UNITS + r"\b"),
    ("name", r"(?<![\w])(?:[A-Z][a-z]+[A-Z]?[a-z]*|[A-Z]{2,})(?:[ -](?:[A-Z][a-z]+|[A-Z]{2,}))*\b"),
]
_COMPILED = [(kind, re.compile(p)) for kind, p in PATTERNS]
# Capitalised words that name nothing: abbreviations, and words that start English sentences (dropped from the
# front of a name: "At Brambleworth" -> "Brambleworth"). A sentence's other first words count as names: a
# common word then usually occurs in the context too, so grounding is not misled by it; a lone one is skipped.
_NOT_NAMES = {"I", "OK", "AM", "PM", "Q", "A", "FAQ", "Dr", "Mr", "Mrs", "Ms", "St"}
_STARTERS = set("""a about absolutely after all also an and any are as at be because before but by can
certainly could dear do does every for from give good great hello hey hi how however i if in is it its just
let may my no not of oh ok okay on once or our please so sorry some sure that the their then there these they
this those thank thanks to unfortunately we welcome what when where which while who why will with yes you
your""".split())


@dataclass(frozen=True)
class Specific:
    start: int
    end: int
    kind: str   # email, web, phone, price, time, year, quantity, name
    text: str

    @property
    def key(self) -> str:
        """How it is compared with the context: case-folded, with spacing, '$' and thousands commas dropped."""
        return normalise(self.text)


def normalise(text: str) -> str:
    return re.sub(r"[\s,$]", "", text).casefold().rstrip(".")


def _sentence_start(text: str, i: int) -> bool:
    before = text[:i].rstrip(" \"'(*-")
    return not before or before[-1] in ".!?:\n"


def specifics(text: str, names: bool = True) -> list[Specific]:
    """The specifics in `text`, in order, not overlapping. A run of capitalised words is a name, less a first
    word that starts sentences ("Yes", "Our", "At"); a few abbreviations (AM, PM, I) never are."""
    taken: list[Specific] = []
    for kind, rx in _COMPILED:
        if kind == "name" and not names:
            continue
        for m in rx.finditer(text):
            s, e = m.span()
            if any(s < t.end and t.start < e for t in taken):
                continue
            value = m.group().strip()
            if not value or (kind == "quantity" and not re.search(r"\d|[a-z]", value)):
                continue
            if kind == "name":
                first, _, rest = value.partition(" ")
                if first.casefold() in _STARTERS:  # "At Brambleworth" -> "Brambleworth"; "Yes" -> nothing
                    if not rest:
                        continue
                    s, value = s + len(first) + 1, rest
                elif not rest and _sentence_start(text, s):  # "Call us ...": a verb, most likely
                    continue
                if value in _NOT_NAMES:
                    continue
            taken.append(Specific(s, s + len(value), kind, value))
    return sorted(taken, key=lambda t: t.start)


def ungrounded(reply: str, sources: list[str]) -> list[Specific]:
    """The specifics of `reply` that occur in none of `sources` (the context, the user's message). One with
    digits is grounded when each of its numbers occurs among the sources' numbers ("$59", "59 dollars" and
    "$59.00"'s 59 alike; an invented phone number's area code is not there); one without digits (a name, "five
    business days") when it occurs in the sources as words, case-insensitively. A reply with no specifics has
    none ungrounded."""
    text = " ".join(sources)
    numbers = set(_DIGITS.findall(text.replace(",", "")))
    folded = " ".join(text.split()).casefold()
    out = []
    for sp in specifics(reply):
        digits = _DIGITS.findall(sp.text.replace(",", ""))
        if digits:
            ok = all(d in numbers or ("." in d and d.rstrip("0").rstrip(".") in numbers) for d in digits)
        else:
            ok = re.search(r"(?<!\w)" + re.escape(" ".join(sp.text.split()).casefold()) + r"(?!\w)", folded) is not None
        if not ok:
            out.append(sp)
    return out


_DIGITS = re.compile(r"\d+(?:\.\d+)?")
