"""Stage 3, on-policy variant (`train.mode = "on-policy"`): the student samples, the frozen teacher scores.

Offline distillation (the paper's method, the default) learns answers the teacher wrote once, in the
teacher pass. On-policy distillation (as in TRL's SDFT and GKD trainers) learns on the student's own
samples instead. At every optimiser step, for a batch of training inputs:
  1. rollout: the student samples a completion c from T_student(x) (train.rollout_temperature,
     at most generation.max_new_tokens tokens; the prompts' shared prefix encoded once per step);
  2. the frozen teacher scores c after T_teacher(x): top-k + tail at every token of c. The teacher is
     the initial weights: the LoRA adapter switched off, or a frozen copy for full fine-tuning. The
     teacher prompts' shared context is encoded once (PrefixCache) and reused at every step;
  3. one optimiser step on the offline loss (train.batch_loss): soft labels on c's tokens, and the
     terminator a hard label when the student stopped by itself (DESIGN.md §4). A completion that is
     empty (the student stopped at once) is scored as the single token it emitted, the terminator,
     with the teacher's soft label there, so that stopping at once is unlearnt rather than reinforced.
No extractor runs: the student answers directly, so its whole completion is the answer. A teacher prompt
that does not fit the window with max_new_tokens is an error naming both lengths (teacher.fit_prompt).
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter

import torch

from ctxdistill.core import distributed, models
from ctxdistill.config import Config
from ctxdistill.inputs import load_split
from ctxdistill.core.progress import log
from ctxdistill.core.sampling import PrefixCache, generate, prefix_for, score_answers
from ctxdistill.store import Example
from ctxdistill.core.loop import batch_order, fit, save_student, seeded_student, summarize, up_to_date


@contextlib.contextmanager
def frozen_teacher(student, teacher):
    """The teacher's weights: `teacher` when given (full fine-tuning), else the student with its LoRA
    adapter disabled, which is exactly the initial model. Eval mode (no dropout) inside."""
    student.eval()
    try:
        if teacher is not None:
            yield teacher
        else:
            with student.disable_adapter():
                yield student
    finally:
        student.train()


def rollouts(student, teacher, tok, cfg: Config, idx: list[int], rows: list[dict], t_prompts: list[list[int]],
             s_prompts: list[list[int]], prefix: PrefixCache | None, seed: int, stats: Counter) -> list[Example]:
    """Steps 1-2 for the inputs `idx`: the student's completions, with the teacher's soft labels."""
    eos, pad = models.turn_end_id(tok), tok.pad_token_id
    student.eval()
    prompts = [s_prompts[i] for i in idx]
    outs = generate(student, prompts, pad_id=pad, eos_id=models.stop_ids(tok), max_new_tokens=cfg.generation.max_new_tokens,
                    temperature=cfg.train.rollout_temperature, batch_size=len(idx), seed=seed, desc="",
                    prefix=prefix_for(student, prompts))  # the student's weights move: its prefix is per step
    answers = []
    for new_ids, finished, _ in outs:
        stats["rollouts"] += 1
        stats["finished"] += finished
        stats["empty"] += not new_ids
        answers.append((new_ids or [eos], finished and bool(new_ids)))
    with frozen_teacher(student, teacher) as t:
        scored = score_answers(t, [t_prompts[i] + a for i, (a, _) in zip(idx, answers)], [len(a) for a, _ in answers],
                               top_k=cfg.teach.top_k, pad_id=pad, batch_size=len(idx), prefix=prefix)
    examples = []
    for i, (a, term), (top_ids, top_lp, tail, p) in zip(idx, answers, scored):
        stats["tokens"] += len(a)
        stats["teacher_logp_sum"] += float(p.clamp_min(1e-30).log().sum())
        examples.append(Example(id=rows[i]["id"], prompt_ids=s_prompts[i], answer_ids=a, topk_ids=top_ids,
                                topk_logprobs=top_lp, tail_logmass=tail, terminated=term))
    return examples


def train_on_policy(cfg: Config, overwrite: bool = False) -> dict:
    """On-policy distillation on the train split into `<out>/student/`; return the summary."""
    from ctxdistill.teach import fit_prompts, store_hashes

    with distributed.main_first("inputs: prepared"):  # the main process writes them if missing
        rows = load_split(cfg, "train")
    data_hash = store_hashes(cfg)["all"]
    prev = up_to_date(cfg, data_hash, overwrite)
    if prev is not None:
        return prev
    tc = cfg.train
    tok, student = seeded_student(cfg)
    # With LoRA from the teacher's own weights, the teacher is the student with its adapter off; a student
    # that starts elsewhere (train.init) or trains every weight needs a frozen copy of the teacher.
    teacher = None if tc.method == "lora" and not tc.init else models.load_model(cfg.model)
    win = models.window(student, cfg.model)
    t_prompts, s_prompts, n_truncated = [], [], 0
    for row in rows:
        t_ids, s_ids, cut = fit_prompts(cfg, tok, row, win)
        t_prompts.append(t_ids)
        s_prompts.append(s_ids)
        n_truncated += cut
    with frozen_teacher(student, teacher) as t:
        prefix = prefix_for(t, t_prompts)  # the teacher is frozen, so its context KV is computed once
    gen = torch.Generator().manual_seed(tc.seed)
    lengths = [len(p) for p in s_prompts]
    stats: Counter = Counter()

    def batches():
        step = 0
        for epoch in range(tc.epochs):
            for idx in batch_order(lengths, tc.batch_size, gen, tc.group_by_length):
                yield epoch, rollouts(student, teacher, tok, cfg, idx, rows, t_prompts, s_prompts, prefix,
                                      seed=tc.seed * 1_000_003 + step, stats=stats)
                step += 1

    log(f"train: on-policy, {len(rows)} inputs, {tc.epochs} epoch(s), {tc.method}, loss {tc.loss}, lr {tc.lr}, "
        f"teacher context prefix {len(prefix) if prefix else 0} tokens{' (reused)' if prefix else ''}")
    history, elapsed = fit(student, cfg, batches(), math.ceil(len(rows) / tc.batch_size),
                           eos_id=models.turn_end_id(tok), pad_id=tok.pad_token_id)
    summary = summarize(cfg, data_hash, len(rows), history, elapsed, on_policy={
        "rollouts": stats["rollouts"], "finished_rate": stats["finished"] / stats["rollouts"],
        "empty": stats["empty"], "mean_rollout_tokens": stats["tokens"] / stats["rollouts"],
        "teacher_mean_logp": stats["teacher_logp_sum"] / stats["tokens"], "n_truncated": n_truncated,
        "shared_prefix_tokens": len(prefix) if prefix else 0})
    save_student(student, tok, cfg.out / "student", summary, history)
    log(f"train: loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f} in {elapsed:.0f}s "
        f"({stats['rollouts']} rollouts, {summary['on_policy']['finished_rate']:.0%} finished); saved {cfg.out / 'student'}")
    return summary
