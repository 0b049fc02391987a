"""The prompts every stage builds from a config: the context as plain text, and for one input row the teacher's
and the student's prompt ids, fitted to the model's window (core/templates.py renders them).

With teach.context = "passage", a self-study question about one fact is answered by a teacher that reads the
context's opening, its rules and that fact's passage (row_teacher_template); every other input, and every
student, sees the task's own templates.
"""

from __future__ import annotations

import dataclasses
import functools

from ctxdistill.config import Config
from ctxdistill.core.errors import UserError
from ctxdistill.core.templates import Template, fit_prompt, student_template, teacher_template


def context_text(cfg: Config) -> str:
    """The context as plain text (the system prompt, then each few-shot turn), for splitting into passages."""
    t = teacher_template(cfg.task)
    parts = [t.system.format(input="")] if t.system else []
    parts += [f"{user}\n{assistant}" for user, assistant in t.shots]
    return "\n\n".join(p.strip() for p in parts if p.strip())


def fit_prompts(cfg: Config, tok, row: dict, win: int) -> tuple[list[int], list[int], bool]:
    """Teacher and student prompt ids for one input row, each fitted to the window (see fit_prompt).
    Records the inputs as used in row['teacher_input'] / row['student_input']."""
    kw = dict(window=win, max_new_tokens=cfg.generation.max_new_tokens, truncate=cfg.teach.truncate)
    t_ids, row["teacher_input"], cut_t = fit_prompt(row_teacher_template(cfg, row), tok, row["input"], what="teacher", **kw)
    s_ids, row["student_input"], cut_s = fit_prompt(student_template(cfg.task), tok, row["input"], what="student", **kw)
    return t_ids, s_ids, cut_t or cut_s


FACT_KINDS = ("detail", "paraphrase", "detail_model")  # self-study questions about one fact


def context_group(cfg: Config, row: dict) -> str:
    """Which context the teacher answers a training input with: 'passage' for a self-study question about one
    fact of a passage when teach.context = 'passage' (the passage gives the fact; measured, the small teacher
    states it more often so), else 'whole' (every other input learns the voice of the whole context)."""
    p = row.get("passage")
    passage = cfg.teach.context == "passage" and row.get("kind") in FACT_KINDS and isinstance(p, int) and p >= 0
    return "passage" if passage else "whole"


def row_temperature(cfg: Config, row: dict) -> float:
    """The teacher's sampling temperature for a training input: teach.fact_temperature for a self-study
    question about one fact (a fact has one right answer: the greedy teacher states the asked one 56% of the
    time, at temperature 1 6%, docs/results.md), generation.temperature for every other."""
    return cfg.teach.fact_temperature if row.get("kind") in FACT_KINDS else cfg.generation.temperature


@functools.lru_cache(maxsize=8)
def _passages(text: str, words: int) -> tuple[tuple, frozenset]:
    """The context's passages, and the indices of those that instruct the assistant."""
    from ctxdistill.selfstudy import is_instructions, split_passages

    ps = tuple(split_passages(text, words))
    return ps, frozenset(j for j, p in enumerate(ps) if is_instructions(p))


def row_teacher_template(cfg: Config, row: dict) -> Template:
    """The teacher template for one training input: the task's (the whole context), or with teach.context =
    'passage', for an input built from passage i, as the system prompt: the context's opening passage (where a
    prompt sets the role and the rules), the other passages that instruct the assistant ("Remember: begin your
    reply with ...", selfstudy.is_instructions) and passage i, in the context's order. A short context the small
    teacher reads better (docs/results.md: the asked fact stated 56% of the time against 38% with the whole
    prompt), which keeps the prompt's rules for the voice."""
    t = teacher_template(cfg.task)
    if context_group(cfg, row) == "whole":
        return t
    from ctxdistill.config import template_literal

    ps, rules = _passages(context_text(cfg), cfg.data.synth.passage_words)
    i = row["passage"]
    if i >= len(ps):
        raise UserError(f"teach.context = 'passage': input {row['id']} names passage {i}, but the context has "
                        f"{len(ps)}; rerun the inputs stage (the context or data.synth.passage_words changed)")
    text = "\n\n".join(p.text for j, p in enumerate(ps) if j in (0, i) or j in rules)
    return dataclasses.replace(t, system=template_literal(text), shots=())
