"""The student's training step and loop, shared by offline training (train.py) and on-policy training
(onpolicy.py): the loss over a batch, one optimiser step (with gradient accumulation), the loop with checkpoints,
early stopping and the NaN guard. Where the student starts and how it is saved: core/student.py.

setup -> loop -> save, in the spirit of torchtune's single-device KD recipe. Per example the student
sequence is [student prompt, answer ids, terminator]. Only answer positions are in the loss:
  - answer tokens: divergence to the teacher's stored top-k + tail (or hard CE with loss = "ce");
  - the terminator: a hard CE label (DESIGN.md §4: the teacher wants to keep talking after the answer,
    so a soft label there would teach the student never to stop).
The sum over all these positions is divided by their count; the two parts are logged separately.
"""

from __future__ import annotations

import copy
import io
import math
import os
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from ctxdistill.config import Config
from ctxdistill.core import distributed, losses
from ctxdistill.core.errors import UserError
from ctxdistill.core.progress import bar, log, warn
from ctxdistill.core.sampling import answer_positions, hidden_at, lm_head, pack, prefix_for, right_pad, verified
from ctxdistill.store import Example


PACK_MAX_TOKENS = 1024  # longest packed row; a batch whose rows add up to more is padded


def batch_loss(model, batch: list[Example], *, loss: str, eos_id: int, pad_id: int,
               share_prefix: bool = True, packed: bool = True, loss_chunk: int = 0,
               count: int | None = None) -> tuple[torch.Tensor, dict]:
    """Loss over the answer + terminator positions of a batch, and the sums behind it (`SUMS`, see `logged`).

    The loss is the sum over those positions divided by `count`, by default their number here (the mean);
    a data-parallel rank passes the global batch's count instead (see train_step).

    An example with `terminated=False` (an on-policy rollout cut off at max_new_tokens) has no terminator.
    With `share_prefix`, the prompt tokens all rows start with (the chat template's system prompt, a
    shared instruction) run once at batch size 1 and every row attends to that one copy (cascade
    attention); gradients flow back through it. With `packed`, the rows' own tokens go back to back in
    one row with block-diagonal attention instead of a padded batch, when they add up to at most
    PACK_MAX_TOKENS. With `loss_chunk` > 0, the LM head and the loss run that many positions at a time, each
    chunk's logits recomputed in the backward pass (losses.chunked_head_loss): memory for [loss_chunk, V]
    logits instead of [positions, V]. Loss and gradients equal those of the plain padded batch either way (tested).
    """
    term = [int(e.terminated) for e in batch]
    seqs = [e.prompt_ids + e.answer_ids + [eos_id] * t for e, t in zip(batch, term)]
    n_targets = [len(e.answer_ids) + t for e, t in zip(batch, term)]
    # The prefix is taken from the prompts, so every row keeps a prompt token of its own before its answer.
    prefix = prefix_for(model, [e.prompt_ids for e in batch], enabled=share_prefix, grad=True)
    p_len = len(prefix) if prefix is not None else 0
    own = [s[p_len:] for s in seqs]
    rows, cols = answer_positions([len(s) for s in own], n_targets)
    # Packed attention costs (sum of row lengths)^2 per head and layer (a padded batch: rows x longest^2), so
    # long rows are padded instead: on SPIDER's 600-token prompts a packed batch of 8 took 18 GB.
    if packed and verified(model) and sum(map(len, own)) <= PACK_MAX_TOKENS:  # other model types: padded
        ids, pos, starts = pack(own, first_position=p_len)
        cols, rows = cols + torch.tensor(starts)[rows], torch.zeros_like(rows)
        hidden = hidden_at(model, ids, None, rows, cols, prefix=prefix, position_ids=pos)
        computed, n_pad = ids.numel(), 0
    else:
        ids, mask = right_pad(own, pad_id)
        hidden = hidden_at(model, ids, mask, rows, cols, prefix=prefix)  # [sum(A_i + t_i), H]
        computed, n_pad = ids.numel(), ids.numel() - int(mask.sum())
    # Positions come per example as A answer tokens then (if terminated) 1 terminator.
    is_term = torch.tensor([x for e, t in zip(batch, term) for x in [False] * len(e.answer_ids) + [True] * t], dtype=torch.bool,
                           device=hidden.device)
    dev = hidden.device
    if loss == "ce":
        soft_fn, labels = losses.cross_entropy, (torch.tensor([t for e in batch for t in e.answer_ids], device=dev),)
    else:
        soft_fn, labels = losses.SOFT_LOSSES[loss], tuple(torch.cat([getattr(e, k) for e in batch]).to(dev)
                                                         for k in ("topk_ids", "topk_logprobs", "tail_logmass"))
    eos = torch.full((sum(term),), eos_id, device=dev)
    head = lm_head(model)
    if loss_chunk:  # the terminators go through the head too, in chunks of their own
        soft_sum, n_soft = losses.chunked_head_loss(soft_fn, hidden[~is_term], head, *labels, chunk=loss_chunk)
        term_sum, n_term = losses.chunked_head_loss(losses.cross_entropy, hidden[is_term], head, eos, chunk=loss_chunk)
    else:
        logits = head(hidden).float()  # [sum(A_i + t_i), V], fp32
        soft_sum, n_soft = soft_fn(logits[~is_term], *labels)
        term_sum, n_term = losses.cross_entropy(logits[is_term], eos)
    total = losses.mean_loss(soft_sum + term_sum, n_soft + n_term if count is None else count)
    return total, {"answer_sum": soft_sum.item(), "answer_n": int(n_soft), "terminator_sum": term_sum.item(),
                   "terminator_n": int(n_term), "seq_tokens": sum(map(len, seqs)),
                   "computed_tokens": computed + p_len, "pad_tokens": n_pad}


SUMS = ("answer_sum", "answer_n", "terminator_sum", "terminator_n", "seq_tokens", "computed_tokens", "pad_tokens")


def logged(sums: dict) -> dict:
    """A step's logged parts from its sums (which add up across data-parallel ranks): the per-token
    answer and terminator losses, the loss positions, and the token counts of the forward passes."""
    return {"answer": sums["answer_sum"] / max(sums["answer_n"], 1),
            "terminator": sums["terminator_sum"] / max(sums["terminator_n"], 1),
            "tokens": int(sums["answer_n"] + sums["terminator_n"]),
            **{k: int(sums[k]) for k in ("seq_tokens", "computed_tokens", "pad_tokens")}}


class StudentLoss(torch.nn.Module):
    """The student and its loss as one module: forward(examples, count) -> batch_loss's (loss, sums).

    A data-parallel wrapper (DDP or FSDP through accelerate) must see the whole forward pass, and
    batch_loss calls the decoder and the LM head separately (it never materialises [B, L, V] logits);
    wrapping both in one module's forward gives the wrapper that view. `_no_split_modules` (the
    transformer layer class) tells FSDP what to shard as a unit.
    """

    def __init__(self, model, *, loss: str, eos_id: int, pad_id: int, share_prefix: bool = True, packed: bool = True,
                 loss_chunk: int = 0):
        super().__init__()
        self.model = model
        self._no_split_modules = getattr(model, "_no_split_modules", None)
        self.kw = dict(loss=loss, eos_id=eos_id, pad_id=pad_id, share_prefix=share_prefix, packed=packed,
                       loss_chunk=loss_chunk)

    def forward(self, batch: list[Example], count: int | None = None):
        return batch_loss(self.model, batch, count=count, **self.kw)


def low_precision_warning(model) -> str | None:
    """The warning for AdamW on half-precision trainable weights (full fine-tuning with model.dtype = "bfloat16"),
    or None: LoRA's adapter weights are float32 (peft upcasts them), and so are float32 models."""
    low = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()
                  if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16)})
    if not low:
        return None
    return (f"train: AdamW updates {'/'.join(low)} weights in place: an update smaller than about 1/256 of a weight "
            "is lost (bfloat16 keeps 8 bits of mantissa). For full fine-tuning keep model.dtype = \"float32\" and "
            "launch with mixed precision (configs/accelerate/, --mixed_precision bf16), or train LoRA")


def batch_order(lengths: list[int], batch_size: int, gen: torch.Generator, group_by_length: bool) -> list[list[int]]:
    """One epoch of batches (lists of indices) in random order.

    With `group_by_length`, the shuffled indices are cut into pools of 64 batches, each pool sorted by
    length before it is cut into batches, so a batch holds sequences of similar length and pads little;
    the order of the batches is then shuffled. The number of batches is ceil(n / batch_size) either way.
    """
    perm = torch.randperm(len(lengths), generator=gen).tolist()
    if not group_by_length:
        return [perm[b:b + batch_size] for b in range(0, len(perm), batch_size)]
    pool = 64 * batch_size
    batches = []
    for p in range(0, len(perm), pool):
        chunk = sorted(perm[p:p + pool], key=lambda i: lengths[i])
        batches += [chunk[b:b + batch_size] for b in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]


def positions(batch: list[Example]) -> int:
    """The loss positions of some examples: their answer tokens and terminators."""
    return sum(len(e.answer_ids) + int(e.terminated) for e in batch)


class Share(NamedTuple):
    """One process's part of a global batch: its examples, and the loss positions of the whole global batch
    (every rank divides its sum by them). `stand_in`: this process has no example of its own and computes
    `examples` only to take part in the gradient all-reduce, weighted 0 (fewer examples than processes)."""
    examples: list[Example]
    count: int
    stand_in: bool = False


def share_of(batch: list[Example], rank: int, world: int) -> Share:
    """A rank's share of a global batch every rank holds: every world-th example from the rank's own."""
    mine = batch[rank::world]
    return Share(mine or batch[:1], positions(batch), not mine)


def train_step(module: StudentLoss, opt, sched, share: Share, *, max_grad_norm: float, grad_accum: int = 1,
               acc=None) -> tuple[float, dict]:
    """One optimiser step on this process's share of a global batch; returns the loss value and its logged parts.

    The share's loss is its sum divided by the *global* number of loss positions, times world_size under
    several processes (`acc`, an accelerate Accelerator that prepared `module` and `opt`) because the
    data-parallel wrapper averages gradients over ranks: the gradient is that of the whole batch's mean, the
    same as one process on the whole batch. With grad_accum = N the share runs as N micro-batches (every N-th
    example), each backward adding its part of that sum to the gradients: the same gradients as one pass. Each
    micro-batch's backward all-reduces (accelerate's no_sync would skip all but the last: a saving for GPUs not
    measured yet); every rank runs N of them, a micro-batch with no example a stand-in weighted 0.
    """
    world = acc.num_processes if acc is not None else 1
    total = dict.fromkeys(SUMS, 0.0)
    for j in range(grad_accum):
        micro = share.examples[j::grad_accum]
        value, sums = module(micro or share.examples[:1], share.count)
        if share.stand_in or not micro:  # every rank still runs a forward and backward (the gradient
            value, sums = value * 0.0, dict.fromkeys(SUMS, 0)  # all-reduce, FSDP's gathers), adding zeros
        if acc is not None:
            acc.backward(value * world)
        else:
            value.backward()
        total = {k: total[k] + sums[k] for k in SUMS}
    if max_grad_norm > 0:
        params = [p for p in module.parameters() if p.requires_grad]
        (acc.clip_grad_norm_ if acc is not None else torch.nn.utils.clip_grad_norm_)(params, max_grad_norm)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    if world > 1:
        total = dict(zip(SUMS, distributed.all_sum([total[k] for k in SUMS])))
    return (total["answer_sum"] + total["terminator_sum"]) / max(share.count, 1), logged(total)


def held_out_loss(module, examples: list[Example], batch_size: int) -> float:
    """The distillation loss per loss position (answer tokens and terminators) on `examples`, without
    gradients or dropout. Every rank of a multi-process run computes it whole (FSDP needs every rank in every
    gather), so all ranks take the same early-stopping decision."""
    was_training = module.training
    module.eval()
    total = count = 0.0
    try:
        with torch.no_grad():
            for b in range(0, len(examples), batch_size):
                _, sums = module(examples[b:b + batch_size])
                total += sums["answer_sum"] + sums["terminator_sum"]
                count += sums["answer_n"] + sums["terminator_n"]
    finally:
        module.train(was_training)
    return total / max(count, 1)


class EarlyStop:
    """Track the held-out loss. The best is the lowest seen (its weights are kept). A plateau is `patience`
    evaluations in a row that do not improve on the last one that did by 0.1% and by 1e-4 (nats per token:
    smaller gains in a divergence are noise).

    At a plateau the learning rate is still where the schedule (linear decay over the `epochs` ceiling) has
    it, and annealing it to 0 is what lowers the loss at the end of a fixed-epoch run (measured on the demo:
    docs/results.md). So, with `cooldown` > 0, a plateau after step s starts a cool-down: the rate falls
    linearly from its value at s to 0 over ceil(cooldown * s) more steps (the "decay" of a warm-up / stable
    / decay schedule), the held-out loss is evaluated at its end, and training stops there. With cooldown 0
    it stops at the plateau."""

    MIN_DELTA, MIN_ABS = 1e-3, 1e-4

    def __init__(self, patience: int, cooldown: float = 0.0):
        self.patience, self.cooldown = patience, cooldown
        self.evals: list[list] = []  # [step, loss]
        self.best_step, self.best_loss, self.ref_loss, self.bad = 0, math.inf, math.inf, 0
        self.cool_start: int | None = None  # the step the cool-down started after, and its length
        self.cool_len = 0

    def restore(self, state: dict | None) -> None:
        """Take up a checkpoint's `state()` (in place: the learning-rate schedule reads the cool-down from here)."""
        for k, v in (state or {}).items():
            setattr(self, k, v)

    def update(self, step: int, loss: float) -> bool:
        """Record an evaluation; True when it is the lowest so far."""
        self.evals.append([step, round(loss, 6)])
        if self.gain(loss, self.ref_loss):
            self.ref_loss, self.bad = loss, 0
        else:
            self.bad += 1
        if loss < self.best_loss:
            self.best_step, self.best_loss = step, loss
            return True
        return False

    @classmethod
    def gain(cls, loss: float, ref: float) -> bool:
        """Whether `loss` improves on `ref` by more than noise (0.1% and 1e-4)."""
        return loss < min(ref * (1 - cls.MIN_DELTA), ref - cls.MIN_ABS)

    def plateaued(self, step: int) -> bool:
        """After an evaluation at `step`: True when training should stop now; on a plateau with a cooldown,
        starts the cool-down instead (then `cool_end` is the step to stop after)."""
        if self.cool_start is not None or self.bad < self.patience:
            return False
        if self.cooldown <= 0:
            return True
        self.cool_start, self.cool_len = step, max(1, math.ceil(self.cooldown * step))
        return False

    @property
    def cool_end(self) -> int | None:
        return None if self.cool_start is None else self.cool_start + self.cool_len

    def state(self) -> dict:
        return {"evals": self.evals, "best_step": self.best_step, "best_loss": self.best_loss,
                "ref_loss": self.ref_loss, "bad": self.bad, "cool_start": self.cool_start, "cool_len": self.cool_len}


def lr_lambda(total_steps: int, warmup_ratio: float, stopper: EarlyStop | None = None):
    """The learning-rate factor after `step` optimiser steps: linear warm-up, then linear decay to 0 at
    total_steps; once early stopping has started its cool-down (see EarlyStop), linear from that step's
    factor to 0 over the cool-down instead."""
    warm = int(total_steps * warmup_ratio)

    def base(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total_steps - step) / max(1, total_steps - warm))

    def f(step: int) -> float:
        if stopper is None or stopper.cool_start is None or step < stopper.cool_start:
            return base(step)
        return base(stopper.cool_start) * max(0.0, 1 - (step - stopper.cool_start) / stopper.cool_len)
    return f


def fit(model, cfg: Config, batches, steps_per_epoch: int, *, eos_id: int, pad_id: int,
        ckpt: Path | None = None, key: dict | None = None, held_out: list[Example] | None = None,
        early_stop: dict | None = None, totals: dict | None = None) -> tuple[list[dict], float]:
    """The optimisation loop over `batches`, steps_per_epoch x epochs pairs of (epoch, the global batch's
    examples), or of (epoch, a function (rank, world_size) -> this process's `Share`, called only for the steps
    this run takes: on-policy rollouts). Returns the per-step history and the seconds spent.

    With `ckpt`, every train.checkpoint_every steps the trainable weights, optimiser, schedule, RNG states,
    history and the caller's running `totals` (a dict, restored in place) are saved there (atomically); a later
    call with the same `key` (data, settings, starting weights) resumes after the saved step: `batches` is
    regenerated from its seed and the steps already taken are skipped, so the resumed run takes the same steps
    as an uninterrupted one.

    With `held_out` (early stopping, see split_held_out), the loss on those examples is evaluated every
    train.early_stop_every steps (0: four times per epoch) and after the last step; each new best's
    trainable weights go to `<ckpt>/best.pt`. After train.early_stop_patience evaluations without one, the
    learning rate is annealed to 0 over train.early_stop_cooldown x the steps taken (see EarlyStop), and
    training stops at the end of that cool-down (at once with a cooldown of 0); the model ends with the best
    weights. The evaluations, the best step, the cool-down and where it stopped are filled into `early_stop`.
    A loss that becomes NaN or infinite stops training with a UserError naming the step; the last checkpoint
    stays as it was.
    """
    run = Training(model, cfg, steps_per_epoch, eos_id=eos_id, pad_id=pad_id, ckpt=ckpt, key=key,
                   held_out=held_out or [], totals=totals)
    start = run.resume()
    with bar("train", run.total_steps) as advance:
        for step, (epoch, batch) in enumerate(batches):
            if step < start:
                continue
            run.step(epoch, batch)
            advance()
            if run.stops_after(step + 1):
                break
            run.checkpoint(step + 1)
    run.finish(early_stop)
    return run.history, time.perf_counter() - run.t0


class Training:
    """One `fit`, in the order the loop calls its parts: set up (the wrapped student, optimiser, schedule,
    early stopping), `resume` from a checkpoint, then per step `step`, `stops_after` (early stopping) and
    `checkpoint`, and at the end `finish` (back to the best weights).

    Why not transformers' Trainer or accelerate's save_state: the loss needs the stored top-k labels and the
    shared-prefix pass (batch_loss), and the checkpoint keys weights and optimiser state by parameter name, whole,
    so a run resumes under another world size or engine (tested); accelerate's state files are per rank and
    engine. The schedule is a linear warm-up and decay like transformers' get_linear_schedule_with_warmup (whose
    warm-up starts at a factor of 0, ours at 1/warm-up steps: no step is spent at lr 0) plus early stopping's
    cool-down, which that schedule has no hook for, so it is a LambdaLR here (lr_lambda)."""

    def __init__(self, model, cfg: Config, steps_per_epoch: int, *, eos_id: int, pad_id: int, ckpt: Path | None,
                 key: dict | None, held_out: list[Example], totals: dict | None):
        tc = self.tc = cfg.train
        if distributed.fsdp() and tc.mode == "on-policy":
            raise UserError("train: on-policy training samples from the student on every rank, which FSDP's sharded "
                            "weights do not allow; launch it with configs/accelerate/ddp.yaml")
        # Under FSDP every rank must gather each layer the same number of times; a shared prompt prefix is a
        # second pass through the layers whenever a rank's rows share one, so FSDP runs without it.
        self.student = StudentLoss(model, loss=tc.loss, eos_id=eos_id, pad_id=pad_id, packed=tc.packing,
                                   loss_chunk=tc.loss_chunk, share_prefix=not distributed.fsdp())
        if msg := low_precision_warning(model):
            warn(msg)
        with warnings.catch_warnings():  # accelerate's DDP wrapping calls a transformers API that v5 marks deprecated
            warnings.simplefilter("ignore", FutureWarning)
            self.acc, self.module, self.opt, engine = distributed.prepare_training(
                self.student, lambda params: torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay))
        if self.acc.num_processes > 1 or self.acc.mixed_precision != "no":
            log(f"train: {self.acc.num_processes} process(es), {engine}, mixed precision {self.acc.mixed_precision}")
        self.total_steps = steps_per_epoch * tc.epochs
        self.every = tc.early_stop_every or max(1, steps_per_epoch // 4)
        self.held_out = held_out
        self.stopper = EarlyStop(tc.early_stop_patience, tc.early_stop_cooldown) if held_out else None
        self.sched = torch.optim.lr_scheduler.LambdaLR(  # stepped once per global step
            self.opt, lr_lambda(self.total_steps, tc.warmup_ratio, self.stopper))
        assert ckpt is not None or not held_out, "early stopping keeps its best weights next to the checkpoint"
        self.ckpt, self.key, self.totals = ckpt, key, totals
        self.best_file = ckpt / "best.pt" if ckpt is not None else None
        # The best step's weights are kept in memory and written to best_file only before a checkpoint and at the
        # end (a disk write at every new best cost 0.2-0.6 s, up to half a training step); `on_disk`: the step
        # whose best weights the file holds.
        self.best: dict | None = None
        self.on_disk: int | None = None
        self.history: list[dict] = []
        self.t0 = time.perf_counter()

    def resume(self) -> int:
        """Take up this run's checkpoint when there is one; return the number of steps it had taken (0 without)."""
        state = load_checkpoint(self.ckpt, self.key) if self.ckpt is not None else None
        if state is None:
            return 0
        if self.stopper is not None:
            self.stopper.restore(state.get("early_stop"))
            self.on_disk = self.stopper.best_step  # written before that checkpoint
        if state.get("world_size", 1) != self.acc.num_processes:  # the global batch is the same, so is the step
            log(f"train: the checkpoint was written by {state.get('world_size', 1)} process(es), resuming with "
                f"{self.acc.num_processes}: each step's global batch and loss normalisation are unchanged")
        set_state_dict(self.student, self.opt.optimizer, model_state_dict=state["trainable"],
                       optim_state_dict=state["opt"], options=StateDictOptions(full_state_dict=True, strict=False))
        self.sched.load_state_dict(state["sched"])
        set_rng_states(state)
        if self.totals is not None:
            self.totals.clear()
            self.totals.update(state.get("totals") or {})
        self.history = state["history"]
        log(f"train: resuming from {self.ckpt} at step {state['step']}/{self.total_steps}")
        return state["step"]

    def step(self, epoch: int, batch) -> None:
        """One optimiser step on a global batch (see `fit`), recorded in the history; a loss that is not finite
        stops training."""
        rank, world = self.acc.process_index, self.acc.num_processes
        share = batch(rank, world) if callable(batch) else share_of(batch, rank, world)
        loss, parts = train_step(self.module, self.opt, self.sched, share, max_grad_norm=self.tc.max_grad_norm,
                                 grad_accum=self.tc.grad_accum, acc=self.acc)
        if not math.isfinite(loss):
            last = load_checkpoint(self.ckpt, self.key) if self.ckpt is not None else None
            raise UserError(f"train: the loss became {loss} at step {len(self.history) + 1}; stopped. "
                            + (f"The last good checkpoint (step {last['step']}) is kept in {self.ckpt}"
                               if last else "No checkpoint had been written yet")
                            + f"; lower train.lr (now {self.tc.lr}) or raise train.warmup_ratio")
        self.history.append({"step": len(self.history) + 1, "epoch": epoch, "loss": loss, **parts,
                             "lr": self.sched.get_last_lr()[0]})

    def stops_after(self, step: int) -> bool:
        """Early stopping after `step` steps: the held-out loss where an evaluation is due (every `every` steps,
        after the last step, where a cool-down ends), the best weights kept; True when training stops here."""
        st = self.stopper
        if st is None or not (step % self.every == 0 or step in (self.total_steps, st.cool_end)):
            return False
        value = held_out_loss(self.module, self.held_out, max(self.tc.batch_size, HELD_OUT_BATCH))
        if st.update(step, value):
            weights, _ = whole_state(self.student, None)  # every rank takes part in the gather
            self.best = {"step": step, "trainable": weights}
        log(f"train: step {step}: held-out loss {value:.4f} (best {st.best_loss:.4f} at step {st.best_step})")
        if st.plateaued(step):
            log(f"train: early stop at step {step}: no better held-out loss for {st.bad} evaluations")
            return True
        if st.cool_start == step:
            log(f"train: no better held-out loss for {st.bad} evaluations at step {step}: "
                f"annealing the learning rate to 0 over {st.cool_len} more steps, then stopping")
        if step == st.cool_end:
            log(f"train: early stop at step {step}, after the cool-down")
            return True
        return False

    def checkpoint(self, step: int) -> None:
        """Every train.checkpoint_every steps (not after the last): the resumable state, and early stopping's
        best weights first."""
        every = self.tc.checkpoint_every
        if self.ckpt is None or not every or step % every or step >= self.total_steps:
            return
        trainable, opt_state = whole_state(self.student, self.opt.optimizer)  # every rank takes part in the gather
        if self.acc.is_main_process:
            self.on_disk = write_best(self.best_file, self.best, self.on_disk)  # first: a checkpoint's best is on disk
            save_checkpoint(self.ckpt, self.key, trainable, opt_state, self.sched, self.history,
                            world_size=self.acc.num_processes, totals=self.totals,
                            early_stop=self.stopper.state() if self.stopper is not None else None)
        distributed.barrier("train: checkpoint saved")

    def finish(self, early_stop: dict | None) -> None:
        """With early stopping: back to the best weights when later steps were worse, and its record filled into
        `early_stop`."""
        st = self.stopper
        if st is None:
            return
        if st.best_step and st.best_step != len(self.history):
            if self.acc.is_main_process:
                write_best(self.best_file, self.best, self.on_disk)
            distributed.barrier("train: best weights saved")  # then every rank reads them (FSDP: its shards)
            kept = torch.load(self.best_file, map_location="cpu", weights_only=False)
            set_model_state_dict(self.student, kept["trainable"], options=StateDictOptions(full_state_dict=True, strict=False))
            log(f"train: restored the best weights, from step {kept['step']} of {len(self.history)}")
        if early_stop is not None:
            early_stop.update({"held_out": len(self.held_out), "every": self.every, "patience": self.tc.early_stop_patience,
                               "evals": st.evals, "best_step": st.best_step,
                               "best_loss": round(st.best_loss, 6), "stopped_at": len(self.history),
                               "cooldown_after": st.cool_start, "cooldown_steps": st.cool_len,
                               "stopped_early": len(self.history) < self.total_steps})


HELD_OUT_BATCH = 64  # early stopping's held-out examples per forward pass (no gradients: one batch is cheapest)


def write_best(path: Path, best: dict | None, on_disk: int | None) -> int | None:
    """Write early stopping's in-memory best weights to `path` unless that step is there already; return the
    step now on disk."""
    if best is None or best["step"] == on_disk:
        return on_disk
    save_weights(path, best)
    return best["step"]


CKPT_FILE = "state.pt"


CKPT_FORMAT = 2  # trainable weights and optimiser state keyed by parameter name (torch.distributed.checkpoint)


def whole_state(module, opt) -> tuple[dict, dict]:
    """The trainable weights and the optimiser state, whole (gathered from FSDP shards) and on the CPU,
    keyed by parameter name, so a checkpoint resumes under any world size and engine. Every rank must
    call it; under several processes only the main process gets the tensors."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=distributed.launched(), ignore_frozen_params=True)
    if opt is None:  # the weights alone (early stopping's best)
        weights, opt_state = get_model_state_dict(module, options=options), None
    else:
        weights, opt_state = get_state_dict(module, opt, options=options)
    # ignore_frozen_params keeps a frozen weight that is tied to another (SmolLM2's LM head = its embeddings,
    # under LoRA: 28M floats); drop every name of a frozen parameter.
    frozen = {n for n, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}
    weights = {k: v for k, v in weights.items() if k not in frozen}
    if not distributed.launched():
        weights = {k: v.detach().cpu().clone() for k, v in weights.items()}
        opt_state = copy.deepcopy(opt_state)  # decoupled from the live optimiser (the next steps change it)
    return weights, opt_state


def save_checkpoint(ckpt: Path, key: dict | None, trainable: dict, opt_state: dict, sched, history: list[dict],
                    world_size: int = 1, early_stop: dict | None = None, totals: dict | None = None) -> None:
    """Write the resumable state under a temporary name, fsync, rename: a kill leaves the previous one."""
    save_weights(ckpt / CKPT_FILE, {
        "key": key, "format": CKPT_FORMAT, "step": len(history), "history": history, **rng_states(),
        "world_size": world_size, "trainable": trainable, "opt": opt_state, "sched": sched.state_dict(),
        "early_stop": early_stop, "totals": dict(totals) if totals is not None else None})


def rng_states() -> dict:
    """The random states a resumed run needs (dropout draws from them): the CPU's, and on a GPU the current
    device's CUDA state. Like the CPU's, the main process's state is saved and every rank restores it."""
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    return {"rng": torch.get_rng_state(), "cuda_rng": cuda}


def set_rng_states(state: dict) -> None:
    """Restore `rng_states()` from a checkpoint (a CUDA state only where there is a GPU to take it)."""
    torch.set_rng_state(state["rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng"])


def save_weights(path: Path, state: dict) -> None:
    """torch.save under a temporary name, fsync, rename; a failing disk is a UserError and the old file stays."""
    ckpt = path.parent
    ckpt.mkdir(parents=True, exist_ok=True)
    tmp = ckpt / f".{path.name}.tmp-{os.getpid()}"
    try:
        buf = io.BytesIO()  # serialised in memory first, so a failing disk raises a plain OSError below
        torch.save(state, buf)
        with open(tmp, "wb") as fh:
            fh.write(buf.getbuffer())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as e:  # disk full, read-only: the previous checkpoint stays as it was
        tmp.unlink(missing_ok=True)
        raise UserError(f"{path}: cannot save a checkpoint ({e.strerror or e}); the previous one "
                        f"is intact, rerun when there is room") from None


def load_checkpoint(ckpt: Path, key: dict | None) -> dict | None:
    """The saved state when it belongs to this run (same key), else None (a stale one is ignored, with a note)."""
    f = ckpt / CKPT_FILE
    if not f.is_file():
        return None
    try:
        state = torch.load(f, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - a truncated or corrupt file: start over, say so
        log(f"train: ignoring unreadable checkpoint {f} ({type(e).__name__}); starting from step 0")
        return None
    if state.get("key") != key or state.get("format") != CKPT_FORMAT:
        log(f"train: ignoring checkpoint {f}: it belongs to other data, settings or an older ctxdistill; "
            "starting from step 0")
        return None
    return state


