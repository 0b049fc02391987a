"""The teacher's answers to inputs (paper §2, steps 1-2): sample a completion y, extract the answer a = f(y), and
align a to token ids that teacher and student share. The teacher pass (teach.py) stores them with soft labels;
the fidelity evaluation (fidelity.py) scores the same kind of answers on held-out inputs.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

from ctxdistill.config import Config
from ctxdistill.core import models
from ctxdistill.core.extract import extract
from ctxdistill.core.sampling import Labels, PrefixCache, example_seed, generate
from ctxdistill.core.templates import encode, student_template, teacher_template


def align_answer(tok, prefix: str, answer: str) -> tuple[str, str, list[int]] | None:
    """Split assistant text at a clean token boundary: (prefix, answer, answer ids), or None.

    BPE merges a leading space into the next word (" Paris"), so whitespace at the end of the prefix
    moves into the answer first. The ids must satisfy tok(prefix + answer) == tok(prefix) + ids: the
    ids the teacher is scored on are exactly those a natural tokenisation of its own text gives.
    """
    stripped = prefix.rstrip()
    answer = prefix[len(stripped):] + answer
    pre, joint = encode(tok, stripped), encode(tok, stripped + answer)
    if joint[:len(pre)] != pre or len(joint) == len(pre):
        return None
    return stripped, answer, joint[len(pre):]


EXTRACT_FAILED = "extractor matched nothing"


@dataclasses.dataclass
class Answer:
    """One sampled teacher answer, extracted and aligned (steps 1-2)."""
    row: int                 # index of its input in the rows passed in
    sample: int              # sample number for that input
    seq: list[int]           # teacher scoring sequence: [teacher chat prompt, prefix of y before a, a]
    answer_ids: list[int]    # a's token ids, the same after the student prompt (checked)
    answer: str
    text: str                # the assistant text: prefill + completion
    finished: bool           # the terminator follows a (False only for a cut completion kept by keep_unfinished)
    recorded: Labels | None  # soft labels recorded while sampling, at a's positions, when they apply
    candidate: int | None = None  # with teach.samples > 1: which of the drawn candidates this is


def sample_answers(model, tok, cfg: Config, rows: list[dict], prompts: list[list[int]],
                   student_prompts: list[list[int]], *, win: int, prefix: PrefixCache | None,
                   seed: int, candidates: int = 1, temperature: float | None = None) -> tuple[list[Answer], Counter]:
    """Steps 1-2: sample y for each (input, sample), extract a = f(y) and align it to token ids shared by
    teacher and student. Returns the kept answers and the drop counts (by reason). Also used by the
    fidelity evaluation, on held-out inputs, so that it scores the same kind of answers training saw."""
    t_tpl, s_tpl = teacher_template(cfg.task), student_template(cfg.task)
    n_samples, eos, pad = cfg.generation.samples_per_input, models.stop_ids(tok), tok.pad_token_id
    drops: Counter = Counter()
    keep_cut = cfg.task.extractor.kind == "whole" and cfg.task.extractor.keep_unfinished

    # 1. Sample y for every (input, sample) pair; with `candidates` = N, N draws for each (teach.samples). A
    # row with a "target" (a self-study recitation: the passage itself) is not sampled: the target is its one
    # answer, and the teacher only scores it (soft labels by the rescoring pass below).
    temperature = cfg.generation.temperature if temperature is None else temperature
    if temperature == 0:
        n_samples = 1  # greedy: one answer per input
    jobs = [(i, s) for i in range(len(rows)) for s in range(1 if "target" in rows[i] else n_samples * candidates)]
    sampled = [(i, s) for i, s in jobs if "target" not in rows[i]]
    drawn = iter(generate(model, [prompts[i] for i, _ in sampled], pad_id=pad, eos_id=eos,
                          max_new_tokens=cfg.generation.max_new_tokens, temperature=temperature,
                          batch_size=cfg.teach.batch_size, seed=seed, desc="teacher: sample", prefix=prefix,
                          keep_topk=cfg.teach.top_k, seeds=[example_seed(seed, rows[i]["id"], s) for i, s in sampled]))
    completions = [(encode(tok, rows[i]["target"]), True, None) if "target" in rows[i] else next(drawn)
                   for i, _ in jobs]

    # 2. a = f(y), aligned to token ids shared by teacher and student.
    kept = []
    for (i, s), (new_ids, finished, recorded) in zip(jobs, completions):
        t_prefill = t_tpl.prefill.format(input=rows[i]["teacher_input"])
        text = t_prefill + tok.decode(new_ids, skip_special_tokens=False)
        if cfg.task.extractor.kind == "whole" and not finished and not keep_cut:
            drops["unfinished (no terminator within max_new_tokens)"] += 1
            continue
        span = extract(cfg.task.extractor, text)
        if span is None:
            drops[EXTRACT_FAILED] += 1
            continue
        aligned = align_answer(tok, text[:span[0]], text[span[0]:span[1]])
        if aligned is None:
            drops["answer has no clean token boundary"] += 1
            continue
        pre, answer, answer_ids = aligned
        # The student emits the same ids after its own prompt (and prefill): check, don't assume.
        s_prefill = s_tpl.prefill.format(input=rows[i]["student_input"])
        if encode(tok, s_prefill + answer) != encode(tok, s_prefill) + answer_ids:
            drops["answer tokens differ between teacher and student"] += 1
            continue
        chat = prompts[i][:len(prompts[i]) - len(encode(tok, t_prefill))]
        seq = chat + encode(tok, pre) + answer_ids
        if len(seq) > win or len(student_prompts[i]) + len(answer_ids) + 1 > win:
            drops["answer does not fit the window"] += 1
            continue
        # The labels recorded while sampling apply when seq is exactly [prompt, first generated tokens].
        start = len(seq) - len(answer_ids) - len(prompts[i])  # index of the first answer token in new_ids
        if recorded is not None and start >= 0 and prompts[i] + new_ids[:len(seq) - len(prompts[i])] == seq:
            recorded = Labels(*(t[start:start + len(answer_ids)] for t in recorded))
        else:
            recorded = None
        # A cut completion kept whole (keep_unfinished) has no terminator to learn; any other answer ends with one.
        kept.append(Answer(i, s, seq, answer_ids, answer, text, finished or not keep_cut, recorded))
    return kept, drops
