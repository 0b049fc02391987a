"""Self-study inputs: training messages grounded in the context, passage by passage.

After Cartridges' self-study (Eyuboglu et al. 2025): the context is split into passages, and every passage
gets an equal share of the training inputs, in several kinds of message, so that the teacher's replies state
the context's facts often and in varied words (what makes facts carry over; Allen-Zhu & Li, Physics of
Language Models 3.1). This module holds the text side, with no model: splitting, the kinds built by rules,
the prompts of the kinds the model writes, and the plan of shares. inputs.py runs the model and screens.

Kinds (data.synth.kinds):
  detail        a question about one detail of the passage that names what it asks about, built from the
                passage's own sentences: a specific (a price, a number with its unit, a time, a year, a phone
                number, an address, a name; core/specifics.py) is replaced by a question word, as in an echo
                question ("Brambleworth shipping is free on orders over how much?"). No model.
  restate       a request to restate or structure what the passage covers ("List the key facts about
                returns and refunds as bullet points."). No model; the topic is the passage's heading, or
                its most frequent content words.
  recite        a request for the passage's topic whose answer is the passage itself, not a sample: the teacher
                scores the passage's own words (soft labels along them), so the student learns to restate the
                context (the restatement targets of Physics of LM 3.1 and Deep Context Distillation). No model.
  paraphrase    the model rewrites one of the passage's detail questions the way a customer would ask it
                ("Orders over how much ship free?" -> "How much do I need to spend for free shipping?"), in the
                completion format with a few built-in examples about other businesses, sampled at temperature
                0.7: a small model does this rewrite far better than it writes a question from a passage.
  task          the model writes a message that needs the passage: the passage, then "Message:" lines in the
                paper's few-shot completion format, seeded with the user's seeds or the passage's own detail
                questions, and the model writes the next line.
  general       the model, behind the whole context, writes a message a user might send (prompt = 'context').
  detail_model  the model is shown the passage in a chat turn and asked for a question about one detail. For
                models that follow such an instruction (1B and up); DESIGN.md §7 found the 135M model writes
                a usable one about 1 time in 3.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass

from ctxdistill.core.specifics import Specific, specifics

KINDS = ("detail", "paraphrase", "restate", "recite", "task", "general", "detail_model")
RULE_KINDS = ("detail", "restate", "recite")  # built without the model; the rest are written by it


@dataclass(frozen=True)
class Passage:
    index: int
    text: str
    topic: str
    common: frozenset = frozenset()  # names in most passages (the business's own): never asked for


# -- splitting -------------------------------------------------------------------------------------

_ABBREV = re.compile(r"(?:\b(?:Dr|Mr|Mrs|Ms|St|vs|etc|e\.g|i\.e|No|Inc|Ltd|Ave|Rd)\.)$", re.I)


def sentences(text: str) -> list[str]:
    """Sentences of `text`: lines, split after . ! ? before a capital, digit or quote (not after "Dr.")."""
    out = []
    for line in text.splitlines():
        parts = re.split(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])", line.strip())
        merged: list[str] = []
        for p in parts:
            if merged and _ABBREV.search(merged[-1]):
                merged[-1] += " " + p
            else:
                merged.append(p)
        out += [p.strip() for p in merged if p.strip()]
    return out


def split_passages(text: str, max_words: int = 120, min_words: int = 12) -> list[Passage]:
    """The context as passages: its paragraphs (split at blank lines); a paragraph over `max_words` is cut into
    windows of whole sentences of up to `max_words` (a sentence longer than that is a window of its own); a
    passage under `min_words` joins the one before it (or, the first, the one after). A context of one
    paragraph gives windows of sentences; a short context, one passage."""
    chunks: list[str] = []
    for para in (p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()):
        if len(para.split()) <= max_words:
            chunks.append(para)
            continue
        window: list[str] = []
        for s in sentences(para):
            if window and len(" ".join(window + [s]).split()) > max_words:
                chunks.append(" ".join(window))
                window = []
            window.append(s)
        if window:
            chunks.append(" ".join(window))
    merged: list[str] = []
    for c in chunks:
        if merged and len(c.split()) < min_words:
            merged[-1] += "\n" + c
        elif merged and len(merged[-1].split()) < min_words:
            merged[-1] += "\n" + c
        else:
            merged.append(c)
    words = _everywhere(merged)
    common = _common_names(merged)
    return [Passage(i, t, topic_of(t, words), common) for i, t in enumerate(merged)]


def _common_names(passages: list[str]) -> frozenset:
    """Names (core/specifics.py) in more than half of the passages, case-folded, and each of their words."""
    if len(passages) < 3:
        return frozenset()
    df = Counter(n for p in passages for n in {sp.text.casefold() for sp in specifics(p) if sp.kind == "name"})
    names = {n for n, k in df.items() if k > len(passages) / 2}
    return frozenset(names | {w for n in names for w in n.split()})


# -- topics and restatement requests -----------------------------------------------------------------

_STOP = set("""a about above after again all also always am an and any are as at be because been before being
below both but by can could did do does doing down during each every few for from further get gets had has have
having her here hers him his how i if in into is it its just made make may me more most much must my no nor
not now of off on once only or other our ours out over own per please same she should so some such than that
the their theirs them then there these they this those through to too under until up us very was we were what
when where which while who whom why will with within without would you your yours one two three""".split())


def _content_words(text: str) -> list[str]:
    return [w for w in re.findall(r"[a-z][a-z'-]{3,}", text.lower()) if w not in _STOP]


def _everywhere(passages: list[str]) -> set[str]:
    """Words in most passages (the business's name, "customer"): they say nothing of any one passage's topic."""
    if len(passages) < 3:
        return set()
    df = Counter(w for p in passages for w in set(_content_words(p)))
    return {w for w, n in df.items() if n > len(passages) / 2}


def topic_of(passage: str, everywhere: set[str] = frozenset()) -> str:
    """What a passage is about, as a noun phrase: its heading ("Brambleworth returns: ..." -> "Brambleworth
    returns"), or its two most frequent content words not common to most passages ("vaccines and exams")."""
    head = re.match(r"\s*([^:.\n]{3,48}):\s", passage)
    if head and len(head.group(1).split()) <= 6:
        return re.sub(r"^(?:about|re|on)\s+", "", head.group(1).strip(), flags=re.I)  # "About Brambleworth"
    counts = Counter(w for w in _content_words(passage) if w not in everywhere)
    top = [w for w, _ in counts.most_common(2)]
    return " and ".join(top) if top else "this"


RESTATE_TEMPLATES = (
    "Tell me about {topic}.",
    "Can you summarize {topic} for me?",
    "What should I know about {topic}?",
    "List the key facts about {topic} as bullet points.",
    "Give me the details on {topic} in one short paragraph.",
    "Explain {topic} to me like I'm a new customer.",
    "What are the rules for {topic}?",
    "Put the main points about {topic} in a short table.",
    "Write {topic} as a short FAQ with two questions and answers.",
    "I keep forgetting the details of {topic}. Can you go over them again?",
)


RECITE_TEMPLATES = (
    "What exactly is your policy on {topic}?",
    "Can you quote what you have on {topic}?",
    "Give me the full information about {topic}, word for word.",
    "What is the official wording on {topic}?",
    "Read me your notes on {topic}.",
    "Repeat everything you were told about {topic}.",
)


def restate_requests(p: Passage, templates: tuple = RESTATE_TEMPLATES) -> list[str]:
    """Restatement and structuring requests about the passage's topic, one per template."""
    return [t.format(topic=p.topic) for t in templates]


# -- detail questions, from the passage's own sentences ---------------------------------------------

_UNIT = re.compile(r"(business days?|days?|nights?|hours?|weeks?|months?|years?|minutes?|inch(?:es)?|degrees?|"
                   r"percent|%|states|countries|pounds|miles)\b", re.I)


_QUESTION_WORDS = {"price": "how much", "time": "what time", "phone": "what phone number", "email": "what email address",
                   "web": "what website", "year": "what year"}


def question_word(sp: Specific, before: str) -> str:
    """The question word that stands for a specific in an echo question."""
    if sp.kind in _QUESTION_WORDS:
        return _QUESTION_WORDS[sp.kind]
    if sp.kind == "quantity":
        unit = _UNIT.search(sp.text)
        if unit is None:
            return "how many"
        u = unit.group(1).lower()
        u = "percent" if u == "%" else (u if u.endswith("s") or u == "percent" else u + "s")
        return "what percent" if u == "percent" else f"how many {u}"
    return "who" if re.search(r"(?:\bby|\bDr\.|\bchef|\bvet|\bveterinarian|\bowner|\bfounder|^)\s*$", before) else "what"


_LABEL = re.compile(r"^\s*[A-Z][\w' -]{0,40}:\s+")  # a heading or speaker label: "Brambleworth returns: ", "Reply: "
_INSTRUCTION = re.compile(r"^(?:you|always|never|do not|don't|answer|reply|remember|begin|be|say|mention|when it "
                          r"helps|if you|make sure|use|keep|give)\b", re.I)


def _clauses(sentence: str) -> list[str]:
    """A sentence cut at semicolons and at ", and" / ", but" / ", so" (a question about one detail stays short),
    without a leading heading or speaker label; clauses that instruct the assistant ("Always mention ...",
    "You are ...") are left out: they state no fact a customer would ask for."""
    parts = re.split(r";\s+|,\s+(?:and|but|so|while|otherwise)\s+", _LABEL.sub("", sentence, count=1))
    parts = [_LABEL.sub("", p, count=1).strip(" .") for p in parts]
    return [p for p in parts if len(p.split()) >= 4 and not _INSTRUCTION.match(p)]


def is_instructions(p: Passage) -> bool:
    """Whether most of a passage's sentences instruct the assistant ("You are ...", "Always ...")."""
    ss = sentences(p.text)
    return sum(bool(_INSTRUCTION.match(_LABEL.sub("", x, count=1))) for x in ss) * 2 > len(ss)


def detail_items(p: Passage, common: set[str] = frozenset()) -> list[tuple[str, str]]:
    """Echo questions with the specific each asks for, one per specific of each clause of the passage: the
    specific is replaced by its question word and the clause ends in '?' ("Brambleworth was founded in what
    year by chef Odessa Vance?", "1998"). A name that opens its clause is not asked for: it is the clause's
    subject, most often the business itself ("What ships to Canada?" tests nothing)."""
    out = {}
    for clause in (c for s in sentences(p.text) for c in _clauses(s)):
        for sp in specifics(clause):
            if sp.kind == "name" and (sp.start == 0 or sp.text.casefold() in common):
                continue  # the clause's subject, or the business's own name: "What ships to Canada?" tests nothing
            before = clause[:sp.start]
            word = question_word(sp, before)
            if word == "who":  # "opened by Dr. Walter Penhale" -> "opened by who", not "by Dr. who"
                before = re.sub(r"\b(?:Dr|Mr|Mrs|Ms)\.\s*$", "", before)
            q = before + word + clause[sp.end:]
            q = re.sub(r"\s+", " ", q).strip(" ,;:.") + "?"
            out.setdefault(q[0].upper() + q[1:], sp.text)
    return list(out.items())


def detail_questions(p: Passage, common: set[str] = frozenset()) -> list[str]:
    """The questions of `detail_items`."""
    return [q for q, _ in detail_items(p, common)]


DETAIL_FRAMES = ("{q}", "Quick question: {q}", "Can you tell me: {q}", "I'd like to know: {q}")


def rule_messages(p: Passage, kind: str, rng: random.Random) -> list[str]:
    """Every message of a rule-built kind for a passage, in the order to take them: restatement (or recitation)
    requests shuffled (rng), or detail questions shuffled and each asked once in every frame before any is asked in
    the next frame ("Quick question: ...")."""
    if kind == "recite" and is_instructions(p):
        return []  # "You are the assistant of ...": a reply that recites it would speak to itself
    if kind in ("restate", "recite"):
        msgs = restate_requests(p, RESTATE_TEMPLATES if kind == "restate" else RECITE_TEMPLATES)
        rng.shuffle(msgs)
        return msgs
    qs = detail_questions(p, p.common)
    rng.shuffle(qs)
    return [frame.format(q=q if frame == "{q}" else q[0].lower() + q[1:]) for frame in DETAIL_FRAMES for q in qs]


# -- the kinds the model writes ----------------------------------------------------------------------

TASK_INSTRUCTION = "Write messages that customers might send about this text, each asking for something it covers."
DETAIL_MODEL_INSTRUCTION = ("Write one question a customer could ask about a specific detail in the text above (a "
                            "price, a time, a number or a name). Name what you ask about, so that the question can "
                            "be understood without the text. Reply with the question only.")


def task_prompt(p: Passage, demos: list[str]) -> tuple[str, str]:
    """(user message, assistant continuation) of the completion-format prompt for a 'task' message: the
    passage and the instruction, then the demos as "Message: ..." lines and an open "Message:"."""
    return (f"{TASK_INSTRUCTION}\n\nText:\n{p.text}",
            "".join(f"Message: {d}\n" for d in demos) + "Message:")


# Examples of the rewrite, about businesses that are not the user's (so no fact leaks into the inputs).
PARAPHRASE_DEMOS = (
    ("The shop is open on Saturdays from what time?", "What time do you open on Saturdays?"),
    ("Standard delivery takes how many business days?", "How long does delivery take?"),
    ("The pasta maker costs how much?", "How much is the pasta maker?"),
    ("Orders can be picked up at the what on Main Street?", "Where can I pick up my order?"),
    ("The gym was founded in what year by coach Lina Park?", "When was your gym founded?"),
    ("Members can bring how many guests per month?", "Can I bring a friend with my membership?"),
)
PARAPHRASE_INSTRUCTION = "Rewrite each question the way a customer would ask it, in a few plain words."
PARAPHRASE_TEMPERATURE = 0.7  # greedy repeats one rewrite per question; 0.7 varies them and stays on topic


def paraphrase_prompt(question: str, demos: list[tuple[str, str]]) -> tuple[str, str]:
    """(user message, assistant continuation) of the completion-format rewrite of a detail question."""
    return PARAPHRASE_INSTRUCTION, "".join(f"Question: {a}\nCustomer: {b}\n\n" for a, b in demos) + \
        f"Question: {question}\nCustomer:"


def detail_model_prompt(p: Passage) -> str:
    return f"{p.text}\n\n{DETAIL_MODEL_INSTRUCTION}"


# -- shares ------------------------------------------------------------------------------------------

def plan(n: int, n_passages: int, kinds: list[str], general_share: float = 0.0) -> dict[tuple[int, str], int]:
    """How many inputs each (passage, kind) cell should get. 'general' (not about one passage) is one cell,
    (-1, 'general'), with `general_share` of n (0: an equal share, n / len(kinds)); the rest is split as
    evenly as it goes over every passage and, within it, every other kind. The remainder goes one each to the
    first cells, kind by kind across the passages, so no passage gets more than one more than another."""
    per_passage = [k for k in kinds if k != "general"]
    share = general_share or 1 / len(kinds)
    n_general = (n if not per_passage else round(n * share)) if "general" in kinds else 0
    cells = [(i, k) for k in per_passage for i in range(n_passages)]
    base, extra = divmod(n - n_general, len(cells)) if cells else (0, 0)
    out = {c: base + (j < extra) for j, c in enumerate(cells)}
    if "general" in kinds:
        out[-1, "general"] = n_general
    return out
