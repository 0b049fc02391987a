"""The student's training step and loop, shared by offline training (train.py) and on-policy training
(onpolicy.py): the loss over a batch, one optimiser step, the loop with checkpoints, early stopping and the NaN
guard, and saving the student.

setup -> loop -> save, in the spirit of torchtune's single-device KD recipe. Per example the student
sequence is [student prompt, answer ids, terminator]. Only answer positions are in the loss:
  - answer tokens: divergence to the teacher's stored top-k + tail (or hard CE with loss = "ce");
  - the terminator: a hard CE label (DESIGN.md §4: the teacher wants to keep talking after the answer,
    so a soft label there would teach the student never to stop).
The sum over all these positions is divided by their count; the two parts are logged separately.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import math
import os
import shutil
import time
import warnings
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.tensor import DTensor

from ctxdistill.config import Config, ModelConfig
from ctxdistill.core import distributed, losses, models
from ctxdistill.core.errors import UserError
from ctxdistill.core.files import normal_file_mode
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


def train_step(module: StudentLoss, opt, sched, batch: list[Example], *, max_grad_norm: float,
               acc=None) -> tuple[float, dict]:
    """One optimiser step on one (global) batch; returns the loss value and its logged parts.

    With `acc` (an accelerate Accelerator that prepared `module` and `opt`), this rank computes every
    world_size-th example of the batch. Its loss is its sum divided by the *global* number of loss
    positions, times world_size because the data-parallel wrapper averages gradients over ranks: the
    gradient is that of the whole batch's mean, the same as one process on the whole batch.
    """
    rank, world = (acc.process_index, acc.num_processes) if acc is not None else (0, 1)
    count = sum(len(e.answer_ids) + int(e.terminated) for e in batch)
    mine = batch[rank::world]
    value, sums = module(mine or batch[:1], count)
    if not mine:  # fewer examples than ranks: every rank still runs a forward and backward (the gradient
        value, sums = value * 0.0, dict.fromkeys(SUMS, 0)  # all-reduce, FSDP's gathers), adding zeros
    if acc is not None:
        acc.backward(value * world)
    else:
        value.backward()
    if max_grad_norm > 0:
        params = [p for p in module.parameters() if p.requires_grad]
        (acc.clip_grad_norm_ if acc is not None else torch.nn.utils.clip_grad_norm_)(params, max_grad_norm)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    if world > 1:
        sums = dict(zip(SUMS, distributed.all_sum([sums[k] for k in SUMS])))
    return (sums["answer_sum"] + sums["terminator_sum"]) / max(count, 1), logged(sums)


def init_model_config(cfg: Config) -> ModelConfig:
    """Where the student's weights start: the model itself, or `train.init` (an earlier student)."""
    if not cfg.train.init:
        return cfg.model
    if cfg.train.init == models.EMBEDDED:  # e.g. a fine-tuned teacher, and the student from the original weights
        return dataclasses.replace(cfg.model, name=models.EMBEDDED)
    path = cfg.path(cfg.train.init)
    if not path.is_dir():
        raise UserError(f"train.init: {path} is not a model directory (or 'embedded')")
    return dataclasses.replace(cfg.model, name=str(path))


def setup_model(cfg: Config):
    """The student starts from the teacher's initial weights (or train.init); LoRA wraps it with a peft adapter."""
    model = models.load_model(init_model_config(cfg))
    if cfg.train.method == "lora":
        from peft import LoraConfig, get_peft_model

        targets = [t for t in cfg.train.lora_targets if any(n.endswith(t) for n, _ in model.named_modules())]
        if not targets:
            raise UserError(f"train.lora_targets: none of {cfg.train.lora_targets} name a module of this model")
        with warnings.catch_warnings():  # peft calls a transformers API that v5 marks deprecated
            warnings.simplefilter("ignore", FutureWarning)
            model = get_peft_model(model, LoraConfig(r=cfg.train.lora_r, lora_alpha=cfg.train.lora_alpha,
                                                     lora_dropout=cfg.train.lora_dropout, target_modules=targets,
                                                     task_type="CAUSAL_LM"))
    model.train()
    return model


def seeded_student(cfg: Config):
    """(tokenizer, student) with the torch seed set first, so LoRA's initialisation repeats."""
    torch.manual_seed(cfg.train.seed)
    return models.load_tokenizer(cfg.model.name), setup_model(cfg)


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


def up_to_date(cfg: Config, data_hash: str, overwrite: bool) -> dict | None:
    """The summary of an existing student trained on the same data with the same settings (and the same
    mixed precision), else None."""
    out = cfg.out / "student"
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: output path exists and is a file")
    if out.exists() and not overwrite and (out / "ctxdistill_config.json").is_file():
        prev = json.loads((out / "ctxdistill_config.json").read_text())
        if (prev.get("store_hash") == data_hash and train_settings(prev.get("train")) == train_settings(cfg)
                and prev.get("init_fingerprint", "model") == init_fingerprint(cfg)
                and prev.get("mixed_precision", "no") == distributed.mixed_precision()):
            log(f"train: {out} is up to date; reusing it (pass --overwrite to retrain)")
            return prev
    return None


def train_settings(cfg_or_dict) -> dict | None:
    """The [train] settings that shape the result: all but how often checkpoints are written and how the
    loss is chunked (the same loss and gradients up to float rounding)."""
    if cfg_or_dict is None:
        return None
    d = cfg_or_dict if isinstance(cfg_or_dict, dict) else cfg_or_dict.to_dict()["train"]
    return {k: v for k, v in d.items() if k not in ("checkpoint_every", "loss_chunk")}


def init_fingerprint(cfg: Config) -> str:
    """The starting weights' content hash (every byte: an earlier student may differ only in late tensors)."""
    if not cfg.train.init:
        return "model"
    return models.fingerprint(init_model_config(cfg).name, full=True)


def fit(model, cfg: Config, batches, steps_per_epoch: int, *, eos_id: int, pad_id: int,
        ckpt: Path | None = None, key: dict | None = None, held_out: list[Example] | None = None,
        early_stop: dict | None = None) -> tuple[list[dict], float]:
    """The optimisation loop over `batches` ((epoch, examples) pairs, steps_per_epoch x epochs of them).
    Returns the per-step history and the seconds spent.

    With `ckpt`, every train.checkpoint_every steps the trainable weights, optimiser, schedule, RNG state
    and history are saved there (atomically); a later call with the same `key` (data, settings, starting
    weights) resumes after the saved step: `batches` is regenerated from its seed and the steps already
    taken are skipped, so the resumed run takes the same steps as an uninterrupted one.

    With `held_out` (early stopping, see split_held_out), the loss on those examples is evaluated every
    train.early_stop_every steps (0: four times per epoch) and after the last step; each new best's
    trainable weights go to `<ckpt>/best.pt`. After train.early_stop_patience evaluations without one, the
    learning rate is annealed to 0 over train.early_stop_cooldown x the steps taken (see EarlyStop), and
    training stops at the end of that cool-down (at once with a cooldown of 0); the model ends with the best
    weights. The evaluations, the best step, the cool-down and where it stopped are filled into `early_stop`.
    A loss that becomes NaN or infinite stops training with a UserError naming the step; the last checkpoint
    stays as it was.
    """
    tc = cfg.train
    if distributed.fsdp() and tc.mode == "on-policy":
        raise UserError("train: on-policy training samples from the student on every rank, which FSDP's sharded "
                        "weights do not allow; launch it with configs/accelerate/ddp.yaml")
    # Under FSDP every rank must gather each layer the same number of times; a shared prompt prefix is a
    # second pass through the layers whenever a rank's rows share one, so FSDP runs without it.
    student = StudentLoss(model, loss=tc.loss, eos_id=eos_id, pad_id=pad_id, packed=tc.packing,
                          loss_chunk=tc.loss_chunk, share_prefix=not distributed.fsdp())
    if msg := low_precision_warning(model):
        warn(msg)
    with warnings.catch_warnings():  # accelerate's DDP wrapping calls a transformers API that v5 marks deprecated
        warnings.simplefilter("ignore", FutureWarning)
        acc, module, opt, engine = distributed.prepare_training(
            student, lambda params: torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay))
    if acc.num_processes > 1 or acc.mixed_precision != "no":
        log(f"train: {acc.num_processes} process(es), {engine}, mixed precision {acc.mixed_precision}")
    total_steps = steps_per_epoch * tc.epochs
    every = tc.early_stop_every or max(1, steps_per_epoch // 4)
    stopper = EarlyStop(tc.early_stop_patience, tc.early_stop_cooldown) if held_out else None
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total_steps, tc.warmup_ratio, stopper))  # once per global step
    history, t0, start = [], time.perf_counter(), 0
    assert ckpt is not None or not held_out, "early stopping keeps its best weights next to the checkpoint"
    best_file = ckpt / "best.pt" if ckpt is not None else None
    # The best step's weights are kept in memory and written to best_file only before a checkpoint and at the
    # end (a disk write at every new best cost 0.2-0.6 s, up to half a training step); `on_disk`: the step
    # whose best weights the file holds.
    best, on_disk = None, None
    if ckpt is not None:
        state = load_checkpoint(ckpt, key)
        if state is not None:
            if stopper is not None:
                stopper.restore(state.get("early_stop"))
                on_disk = stopper.best_step  # written before that checkpoint
            if state.get("world_size", 1) != acc.num_processes:  # the global batch is the same, so is the step
                log(f"train: the checkpoint was written by {state.get('world_size', 1)} process(es), resuming with "
                    f"{acc.num_processes}: each step's global batch and loss normalisation are unchanged")
            set_state_dict(student, opt.optimizer, model_state_dict=state["trainable"], optim_state_dict=state["opt"],
                           options=StateDictOptions(full_state_dict=True, strict=False))
            sched.load_state_dict(state["sched"])
            torch.set_rng_state(state["rng"])
            history, start = state["history"], state["step"]
            log(f"train: resuming from {ckpt} at step {start}/{total_steps}")
    with bar("train", total_steps) as advance:
        for step, (epoch, batch) in enumerate(batches):
            if step < start:
                continue
            loss, parts = train_step(module, opt, sched, batch, max_grad_norm=tc.max_grad_norm, acc=acc)
            if not math.isfinite(loss):
                last = load_checkpoint(ckpt, key) if ckpt is not None else None
                raise UserError(f"train: the loss became {loss} at step {len(history) + 1}; stopped. "
                                + (f"The last good checkpoint (step {last['step']}) is kept in {ckpt}"
                                   if last else "No checkpoint had been written yet")
                                + "; lower train.lr (now {}) or raise train.warmup_ratio".format(tc.lr))
            history.append({"step": len(history) + 1, "epoch": epoch, "loss": loss, **parts,
                            "lr": sched.get_last_lr()[0]})
            advance()
            # Early stopping evaluates every `every` steps, after the last step, and where a cool-down ends.
            if stopper is not None and ((step + 1) % every == 0 or step + 1 in (total_steps, stopper.cool_end)):
                value = held_out_loss(module, held_out, max(tc.batch_size, HELD_OUT_BATCH))
                if stopper.update(step + 1, value):
                    weights, _ = whole_state(student, None)  # every rank takes part in the gather
                    best = {"step": step + 1, "trainable": weights}
                log(f"train: step {step + 1}: held-out loss {value:.4f} (best {stopper.best_loss:.4f} at step "
                    f"{stopper.best_step})")
                if stopper.plateaued(step + 1):
                    log(f"train: early stop at step {step + 1}: no better held-out loss for {stopper.bad} evaluations")
                    break
                if stopper.cool_start == step + 1:
                    log(f"train: no better held-out loss for {stopper.bad} evaluations at step {step + 1}: "
                        f"annealing the learning rate to 0 over {stopper.cool_len} more steps, then stopping")
                if step + 1 == stopper.cool_end:
                    log(f"train: early stop at step {step + 1}, after the cool-down")
                    break
            if ckpt is not None and tc.checkpoint_every and (step + 1) % tc.checkpoint_every == 0 and step + 1 < total_steps:
                trainable, opt_state = whole_state(student, opt.optimizer)  # every rank takes part in the gather
                if acc.is_main_process:
                    on_disk = write_best(best_file, best, on_disk)  # first: a checkpoint's best is on disk
                    save_checkpoint(ckpt, key, trainable, opt_state, sched, history, world_size=acc.num_processes,
                                    early_stop=stopper.state() if stopper is not None else None)
                distributed.barrier("train: checkpoint saved")
    if stopper is not None:
        if stopper.best_step and stopper.best_step != len(history):  # later steps were worse: back to the best
            if acc.is_main_process:
                write_best(best_file, best, on_disk)
            distributed.barrier("train: best weights saved")  # then every rank reads them (FSDP: its shards)
            kept = torch.load(best_file, map_location="cpu", weights_only=False)
            set_model_state_dict(student, kept["trainable"], options=StateDictOptions(full_state_dict=True, strict=False))
            log(f"train: restored the best weights, from step {kept['step']} of {len(history)}")
        if early_stop is not None:
            early_stop.update({"held_out": len(held_out), "every": every, "patience": tc.early_stop_patience,
                               "evals": stopper.evals, "best_step": stopper.best_step,
                               "best_loss": round(stopper.best_loss, 6), "stopped_at": len(history),
                               "cooldown_after": stopper.cool_start, "cooldown_steps": stopper.cool_len,
                               "stopped_early": len(history) < total_steps})
    return history, time.perf_counter() - t0


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
                    world_size: int = 1, early_stop: dict | None = None) -> None:
    """Write the resumable state under a temporary name, fsync, rename: a kill leaves the previous one."""
    save_weights(ckpt / CKPT_FILE, {
        "key": key, "format": CKPT_FORMAT, "step": len(history), "history": history, "rng": torch.get_rng_state(),
        "world_size": world_size, "trainable": trainable, "opt": opt_state, "sched": sched.state_dict(),
        "early_stop": early_stop})


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


def summarize(cfg: Config, data_hash: str, n_examples: int, history: list[dict], elapsed: float, **extra) -> dict:
    last_epoch = [h for h in history if h["epoch"] == history[-1]["epoch"]]
    return {
        "store_hash": data_hash, "mode": cfg.train.mode, "train": cfg.to_dict()["train"], "config": cfg.to_dict(),
        "n_examples": n_examples, "steps": len(history), "seconds": round(elapsed, 2),
        "answer_tokens_per_s": round(sum(h["tokens"] for h in history) / elapsed, 1),
        # Of the token positions the forward passes ran: padding, and the shared-prefix saving.
        "padding_fraction": round(sum(h["pad_tokens"] for h in history) / sum(h["computed_tokens"] for h in history), 4),
        "computed_per_seq_token": round(sum(h["computed_tokens"] for h in history) / sum(h["seq_tokens"] for h in history), 4),
        "first_loss": history[0]["loss"], "final_loss": sum(h["loss"] for h in last_epoch) / len(last_epoch),
        "adapter": cfg.train.method == "lora", "init_fingerprint": init_fingerprint(cfg),
        "mixed_precision": distributed.mixed_precision(), **extra,
    }


def save_student(model, tok, out, summary: dict, history: list[dict]) -> None:
    """Save a standard HF model (or peft adapter) directory with the config that produced it, atomically
    (the main process of a multi-process run; the others wait until it is there). FSDP-sharded weights
    are gathered first, with every rank taking part."""
    weights = None
    if any(isinstance(p, DTensor) for p in model.parameters()):
        weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        first: dict[int, str] = {}
        for name, p in model.named_parameters(remove_duplicate=False):  # tied weights (embeddings = LM head)
            if first.setdefault(id(p), name) != name:  # are saved once, as save_pretrained does on its own
                weights.pop(name, None)
    if not distributed.is_main():
        distributed.barrier("train: student saved")
        return
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": weights} if weights is not None else {}))
        for f in tmp.glob("*.safetensors"):  # safetensors writes them 0600; the rest of the directory is 0644
            os.chmod(f, normal_file_mode())
        tok.save_pretrained(tmp)
        (tmp / "ctxdistill_config.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
        if history:  # a training run's step log; an export or a merge has none
            with open(tmp / "train_log.jsonl", "w") as fh:
                fh.writelines(json.dumps(h) + "\n" for h in history)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    distributed.barrier("train: student saved")
