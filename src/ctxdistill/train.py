"""Stage 3, train: the student learns the teacher's stored answers from the student prompt alone.

Offline training (the paper's method) on the distillation set in `<out>/teacher/`: early stopping's held-out
slice is split off here; the step and the loop are core/loop.py's, where the student starts and how it is saved
core/student.py's, both shared with on-policy training (onpolicy.py, train.mode = "on-policy", the other half of
this stage).
"""

from __future__ import annotations

import math
import random
import shutil

import torch

from ctxdistill.config import Config
from ctxdistill.core import distributed
from ctxdistill.core.errors import UserError
from ctxdistill.core.loop import batch_order, fit
from ctxdistill.core.student import init_fingerprint, save_student, seeded_student, summarize, train_settings, up_to_date
from ctxdistill.core.progress import log
from ctxdistill.store import Example, differing, read_store, store_hashes


def train(cfg: Config, overwrite: bool = False) -> dict:
    """Train the student and save it to `<out>/student/`; return the summary.

    Offline (the default, the paper's method): learn the stored teacher answers in `<out>/teacher/`.
    On-policy: see onpolicy.py.
    """
    if cfg.train.mode == "on-policy":
        from ctxdistill.onpolicy import train_on_policy

        return train_on_policy(cfg, overwrite)
    manifest, examples = read_store(cfg.out / "teacher")
    diff = differing(manifest["hashes"], store_hashes(cfg))
    if diff:
        raise UserError(f"{cfg.out / 'teacher'}: distillation set is stale (different {', '.join(diff)}); "
                        "re-run `ctxdistill teach --overwrite`")
    return fit_student(cfg, examples, manifest["terminator_id"], manifest["hashes"]["all"], overwrite)


def fit_student(cfg: Config, examples: list[Example], eos_id: int, data_hash: str, overwrite: bool = False,
                **extra) -> dict:
    """Offline training on `examples` (one distillation set, or several for compose.simultaneous) into
    `<out>/student/`; reused when a student with the same data, settings and starting weights is there."""
    prev = up_to_date(cfg, data_hash, overwrite)
    if prev is not None:
        return prev
    tc = cfg.train
    tok, model = seeded_student(cfg)
    examples, held_out = split_held_out(examples, tc)
    log(f"train: {len(examples)} examples, {tc.epochs} epoch(s) at most, {tc.method}, loss {tc.loss}, lr {tc.lr}"
        + (f"; early stopping on {len(held_out)} held-out examples" if held_out else ""))
    ckpt = cfg.out / "student.ckpt"
    key = {"data": data_hash, "train": train_settings(cfg), "init": init_fingerprint(cfg),
           "mixed_precision": distributed.mixed_precision()}
    stop: dict = {}
    history, elapsed = fit(model, cfg, epoch_batches(examples, tc), math.ceil(len(examples) / tc.batch_size),
                           eos_id=eos_id, pad_id=tok.pad_token_id, ckpt=ckpt, key=key, held_out=held_out,
                           early_stop=stop)
    summary = summarize(cfg, data_hash, len(examples), history, elapsed, **extra, **({"early_stop": stop} if stop else {}))
    save_student(model, tok, cfg.out / "student", summary, history)
    shutil.rmtree(ckpt, ignore_errors=True)
    log(f"train: loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f} in {elapsed:.0f}s; saved {cfg.out / 'student'}")
    return summary


HELD_OUT_FRACTION, HELD_OUT_MIN = 0.05, 16  # early stopping's slice of the distillation set


def split_held_out(examples: list[Example], tc) -> tuple[list[Example], list[Example]]:
    """(train, held out) for early stopping: 5% of the examples and at least 16, whole inputs (every sample of
    an input on one side), drawn with train.seed. Nothing is held out when early stopping is off, or when the
    set is under 5 x 16 = 80 examples (too few to spare 16; a log line says so)."""
    k = max(HELD_OUT_MIN, math.ceil(HELD_OUT_FRACTION * len(examples)))
    if not tc.early_stop or tc.mode != "offline":
        return examples, []
    if len(examples) < 5 * HELD_OUT_MIN:
        log(f"train: early stopping off: {len(examples)} examples are too few to hold out {HELD_OUT_MIN} "
            f"(it needs {5 * HELD_OUT_MIN})")
        return examples, []
    inputs = sorted({e.id.rsplit("#", 1)[0] for e in examples})
    random.Random(tc.seed).shuffle(inputs)
    per_input: dict[str, int] = {}
    for e in examples:
        per_input[e.id.rsplit("#", 1)[0]] = per_input.get(e.id.rsplit("#", 1)[0], 0) + 1
    picked, n = set(), 0
    for x in inputs:
        if n >= k:
            break
        picked.add(x)
        n += per_input[x]
    held = [e for e in examples if e.id.rsplit("#", 1)[0] in picked]
    return [e for e in examples if e.id.rsplit("#", 1)[0] not in picked], held


def epoch_batches(examples: list[Example], tc):
    """(epoch, examples) for every step of tc.epochs epochs, in the order batch_order draws from tc.seed."""
    gen = torch.Generator().manual_seed(tc.seed)
    lengths = [len(e.prompt_ids) + len(e.answer_ids) + 1 for e in examples]
    for epoch in range(tc.epochs):
        for idx in batch_order(lengths, tc.batch_size, gen, tc.group_by_length):
            yield epoch, [examples[i] for i in idx]


