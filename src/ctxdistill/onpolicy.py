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
that does not fit the window with max_new_tokens is an error naming both lengths (templates.fit_prompt).

Each input's rollout draws from a random stream of its own (its id and the step), so under several processes
each rank rolls out only its share of the batch and gets the completions one process would. Like offline
training it checkpoints every train.checkpoint_every steps and a killed run resumes (the steps already taken
are skipped without rolling out), with the rollout counts it had.
"""

from __future__ import annotations

import contextlib
import functools
import math
import shutil
from collections import Counter

import torch

from ctxdistill.core import distributed, models
from ctxdistill.config import Config
from ctxdistill.core.progress import log
from ctxdistill.core.sampling import PrefixCache, example_seed, generate, prefix_for, score_answers
from ctxdistill.prompts import fit_prompts
from ctxdistill.store import Example, load_split, store_hashes
from ctxdistill.core.loop import Share, batch_order, fit, positions
from ctxdistill.core.student import init_fingerprint, save_student, seeded_student, summarize, train_settings, up_to_date


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


STATS = ("rollouts", "finished", "empty", "tokens", "teacher_logp_sum")  # running totals over every rank's rollouts


def rollouts(student, teacher, tok, cfg: Config, idx: list[int], rows: list[dict], t_prompts: list[list[int]],
             s_prompts: list[list[int]], prefix: PrefixCache | None, seed: int) -> tuple[list[Example], Counter]:
    """Steps 1-2 for the inputs `idx`: the student's completions, with the teacher's soft labels; and their counts
    (`STATS`). Input i draws from its own stream, example_seed(seed, its id, 0), so its completion does not depend on
    which inputs share its batch or rank."""
    eos, pad = models.turn_end_id(tok), tok.pad_token_id
    stats: Counter = Counter()
    student.eval()
    prompts = [s_prompts[i] for i in idx]
    outs = generate(student, prompts, pad_id=pad, eos_id=models.stop_ids(tok), max_new_tokens=cfg.generation.max_new_tokens,
                    temperature=cfg.train.rollout_temperature, batch_size=len(idx), seed=seed, desc="",
                    prefix=prefix_for(student, prompts),  # the student's weights move: its prefix is per step
                    seeds=[example_seed(seed, rows[i]["id"], 0) for i in idx])
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
    for i, (a, term), labels in zip(idx, answers, scored):
        stats["tokens"] += len(a)
        stats["teacher_logp_sum"] += float(labels.chosen_logprob.sum())
        examples.append(Example(id=rows[i]["id"], prompt_ids=s_prompts[i], answer_ids=a, topk_ids=labels.top_ids,
                                topk_logprobs=labels.top_logprobs, tail_logmass=labels.tail_logmass, terminated=term))
    return examples, stats


def rollout_share(rank: int, world: int, *, idx: list[int], totals: Counter, **kw) -> Share:
    """This rank's share of one step's batch `idx`: the rollouts of every world-th input from its own, the global
    batch's loss positions, and the step's counts added to `totals` (summed over the ranks, so every rank holds
    the global totals). A rank with no input of its own rolls out the first one as a stand-in, weighted 0."""
    mine = idx[rank::world]
    examples, stats = rollouts(idx=mine or idx[:1], **kw)
    if not mine:
        stats = Counter()
    counts = [positions(examples) if mine else 0] + [stats[k] for k in STATS]
    if world > 1:
        counts = distributed.all_sum(counts)
    totals.update({k: v for k, v in zip(STATS, counts[1:])})
    return Share(examples, int(counts[0]), stand_in=not mine)


def train_on_policy(cfg: Config, overwrite: bool = False) -> dict:
    """On-policy distillation on the train split into `<out>/student/`; return the summary."""
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
    totals: Counter = Counter()
    kw = dict(student=student, teacher=teacher, tok=tok, cfg=cfg, rows=rows, t_prompts=t_prompts,
              s_prompts=s_prompts, prefix=prefix, totals=totals)

    def batches():  # the rollouts run when fit takes the step: a resumed run skips the steps it has
        step = 0
        for epoch in range(tc.epochs):
            for idx in batch_order(lengths, tc.batch_size, gen, tc.group_by_length):
                yield epoch, functools.partial(rollout_share, idx=idx, seed=tc.seed * 1_000_003 + step, **kw)
                step += 1

    log(f"train: on-policy, {len(rows)} inputs, {tc.epochs} epoch(s), {tc.method}, loss {tc.loss}, lr {tc.lr}, "
        f"teacher context prefix {len(prefix) if prefix else 0} tokens{' (reused)' if prefix else ''}")
    ckpt = cfg.out / "student.ckpt"
    key = {"data": data_hash, "train": train_settings(cfg), "init": init_fingerprint(cfg),
           "mixed_precision": distributed.mixed_precision()}
    history, elapsed = fit(student, cfg, batches(), math.ceil(len(rows) / tc.batch_size),
                           eos_id=models.turn_end_id(tok), pad_id=tok.pad_token_id, ckpt=ckpt, key=key, totals=totals)
    summary = summarize(cfg, data_hash, len(rows), history, elapsed, on_policy={
        "rollouts": int(totals["rollouts"]), "finished_rate": totals["finished"] / totals["rollouts"],
        "empty": int(totals["empty"]), "mean_rollout_tokens": totals["tokens"] / totals["rollouts"],
        "teacher_mean_logp": totals["teacher_logp_sum"] / totals["tokens"], "n_truncated": n_truncated,
        "shared_prefix_tokens": len(prefix) if prefix else 0})
    save_student(student, tok, cfg.out / "student", summary, history)
    shutil.rmtree(ckpt, ignore_errors=True)
    log(f"train: loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f} in {elapsed:.0f}s "
        f"({int(totals['rollouts'])} rollouts, {summary['on_policy']['finished_rate']:.0%} finished); saved {cfg.out / 'student'}")
    return summary
