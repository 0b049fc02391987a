"""Direct gradient descent on the labelled examples: the paper's baseline for internalising examples.

The student template sees the input and learns the reference answer (hard labels, cross-entropy, then
the terminator), on the same k examples the teacher's context shows. The paper put all examples in one
batch, trained 25 epochs and reported the best epoch; here every epoch is evaluated on the eval split,
and the whole curve is reported with the best epoch. Choosing the best epoch on the eval split flatters
the baseline; the curve shows by how much.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from ctxdistill.config import Config
from ctxdistill.core import models
from ctxdistill.core.errors import UserError
from ctxdistill.core.files import write_atomic
from ctxdistill.core.progress import log
from ctxdistill.store import Example
from ctxdistill.core.templates import encode, student_template


def labelled_examples(cfg: Config, tok, rows: list[dict], tpl=None) -> list[Example]:
    """Training examples with hard targets: [prompt] -> reference[0] + terminator; the prompt is the
    student template unless `tpl` is given."""
    tpl = tpl or student_template(cfg.task)
    out = []
    for r in rows:
        prompt, prefill = tpl.render(tok, r["input"])
        answer = r["reference"][0]
        joint, pre = encode(tok, prefill + answer), encode(tok, prefill)
        if joint[:len(pre)] != pre or len(joint) == len(pre):
            raise UserError(f"baseline: example {r.get('id', r['input'])!r}: the reference {answer!r} is empty or "
                            "does not tokenise cleanly after the student prefill")
        ids = joint[len(pre):]
        empty = torch.zeros(len(ids), 0)
        out.append(Example(id=str(r.get("id", len(out))), prompt_ids=prompt, answer_ids=ids,
                           topk_ids=empty.long(), topk_logprobs=empty, tail_logmass=torch.zeros(len(ids))))
    return out


def prefix_chunks(batch: list[Example], size: int, drop: int = 64) -> list[list[Example]]:
    """Split one step's rows into forward passes of at most `size` rows, sorted by prompt, cutting early
    where the rows' common prompt start would shrink by more than `drop` tokens: rows that share a
    long start (a SPIDER schema) then run together and compute it once (shared prefix). The order and
    grouping inside one step do not change its gradient."""
    chunks, cur, common = [], [], 0
    for e in sorted(batch, key=lambda e: e.prompt_ids):
        if cur:
            lcp = next((i for i, (a, b) in enumerate(zip(cur[0].prompt_ids, e.prompt_ids)) if a != b),
                       min(len(cur[0].prompt_ids), len(e.prompt_ids)))
            if len(cur) == size or lcp < common - drop:
                chunks.append(cur)
                cur = []
            else:
                common = min(common, lcp)
        if not cur:
            cur, common = [e], len(e.prompt_ids)
        else:
            cur.append(e)
    return chunks + [cur] if cur else chunks


def _step(model, opt, sched, batch: list[Example], tc, tok) -> float:
    """One optimiser step on the whole batch, its forward/backward run train.batch_size rows at a time
    (gradient accumulation weighted by target tokens, so the gradient is the whole batch's mean)."""
    from ctxdistill.core.loop import batch_loss

    total = sum(len(e.answer_ids) + 1 for e in batch)
    value = 0.0
    for chunk in prefix_chunks(batch, tc.batch_size):
        loss, _ = batch_loss(model, chunk, loss="ce", eos_id=models.turn_end_id(tok),
                             pad_id=tok.pad_token_id, packed=tc.packing, count=total)
        loss.backward()  # the sum over this chunk / the whole batch's count: accumulates to the batch mean
        value += loss.item()
    if tc.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], tc.max_grad_norm)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return value


def sft(cfg: Config, labelled: list[dict], eval_rows: list[dict], out: Path, *, epochs: int = 25,
        batch_size: int = 0, score: Callable[[str, dict], float] | None = None, eval_every: int = 1) -> dict:
    """Fine-tune the student template directly on `labelled` rows ({"input", "reference": [...]}),
    evaluating after every `eval_every` epochs and the last; write `<out>/curve.json` and return {"curve", "best", ...}.

    batch_size 0 puts every example in one batch (the paper); its forward/backward passes run
    cfg.train.batch_size rows at a time, accumulating gradients. Model, method, lr and the schedule come
    from cfg.train; the loss is cross-entropy. `score(prediction, row)` defaults to cfg.task.scorer
    against row["reference"].
    """
    from ctxdistill.core.metrics import SCORERS
    from ctxdistill.evaluate import predict
    from ctxdistill.core.loop import batch_order, lr_lambda
    from ctxdistill.core.student import seeded_student

    if not labelled:
        raise UserError("baseline: no labelled examples")
    if epochs < 1:
        raise UserError(f"baseline: epochs must be >= 1, got {epochs}")
    score = score or (lambda pred, row, f=SCORERS[cfg.task.scorer]: f(pred, row["reference"]))
    tc = cfg.train
    tok, model = seeded_student(cfg)
    examples = labelled_examples(cfg, tok, labelled)
    bs = batch_size or len(examples)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=tc.lr, weight_decay=tc.weight_decay)
    steps_per_epoch = -(-len(examples) // bs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps_per_epoch * epochs, tc.warmup_ratio))
    gen = torch.Generator().manual_seed(tc.seed)
    lengths = [len(e.prompt_ids) + len(e.answer_ids) + 1 for e in examples]
    s_tpl = student_template(cfg.task)
    curve, t0 = [], time.perf_counter()
    log(f"baseline: gradient descent on {len(examples)} labelled examples, batch {bs}, {epochs} epochs, "
        f"{tc.method}, lr {tc.lr}")
    for epoch in range(1, epochs + 1):
        model.train()
        losses = []
        for idx in batch_order(lengths, bs, gen, False):
            losses.append(_step(model, opt, sched, [examples[i] for i in idx], tc, tok))
        if epoch % eval_every and epoch != epochs:
            continue
        model.eval()
        texts, _ = predict(model, tok, s_tpl, eval_rows, cfg, "")
        preds = [t[len(s_tpl.prefill.format(input=r["input"])):].strip() for t, r in zip(texts, eval_rows)]
        curve.append({"epoch": epoch, "train_loss": sum(losses) / len(losses),
                      "score": sum(score(p, r) for p, r in zip(preds, eval_rows)) / len(eval_rows)})
        log(f"baseline: epoch {epoch}: loss {curve[-1]['train_loss']:.4f}, eval {curve[-1]['score']:.3f}")
    best = max(curve, key=lambda c: c["score"])
    result = {"n_examples": len(examples), "batch_size": bs, "epochs": epochs, "curve": curve, "best": best,
              "final": curve[-1], "seconds": round(time.perf_counter() - t0, 1), "train": cfg.to_dict()["train"],
              "model": cfg.model.name}
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "curve.json", json.dumps(result, indent=2))
    del model
    return result


def sft_from_config(cfg: Config, examples_file: str | Path, *, epochs: int = 25, batch_size: int = 0) -> dict:
    """`ctxdistill baseline sft CONFIG --examples FILE`: the labelled examples from a JSONL file
    ({"input", "reference"} per line), evaluated on the config's eval split, into `<out>/baseline_sft/`."""
    from ctxdistill.inputs import prepare_inputs, read_rows
    from ctxdistill.store import load_split

    labelled = read_rows(Path(examples_file), need_ref=True)
    prepare_inputs(cfg)
    return sft(cfg, labelled, load_split(cfg, "eval"), cfg.out / "baseline_sft", epochs=epochs, batch_size=batch_size)


SFT_TEMPLATES = ("student", "teacher")


def sft_model(cfg: Config, sets: list[tuple[str, list[dict]]], out: Path, overwrite: bool = False) -> dict:
    """Fine-tune on labelled rows and save a full model directory at `out` (`ctxdistill train --sft`).

    `sets`: (template, rows) pairs, template "student" or "teacher" (cfg.task's), rows {"input",
    "reference": [target]}; several pairs are shuffled together (multitask). Hard labels (cross-entropy)
    with cfg.train's method, lr, epochs and batch size, starting from train.init or the model. A LoRA
    adapter is merged, so `out` can serve as a later config's model.name or train.init (a teacher
    prepared by fine-tuning; the Sc->Dir and Sc+Dir baselines). Reused while data, settings and starting
    weights are unchanged.
    """
    from ctxdistill.core.templates import teacher_template
    from ctxdistill.core.loop import fit
    from ctxdistill.core.student import init_fingerprint, save_student, seeded_student, summarize, train_settings
    from ctxdistill.train import epoch_batches

    for which, rows in sets:
        if which not in SFT_TEMPLATES:
            raise UserError(f"train --sft: unknown template {which!r} ({', '.join(SFT_TEMPLATES)})")
        if not rows:
            raise UserError(f"train --sft: no labelled examples for the {which} template")
    ce = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, loss="ce", mode="offline"))
    h = hashlib.sha256(json.dumps([[w, [[r["input"], r["reference"][0]] for r in rows]] for w, rows in sets]).encode())
    data_hash = "sft:" + h.hexdigest()[:16]
    info = out / "ctxdistill_config.json"
    if info.is_file() and not overwrite:
        prev = json.loads(info.read_text())
        if (prev.get("store_hash") == data_hash and train_settings(prev.get("train")) == train_settings(ce)
                and prev.get("init_fingerprint") == init_fingerprint(ce)):
            log(f"train --sft: {out} is up to date; reusing it (pass --overwrite to retrain)")
            return prev
    tok, model = seeded_student(ce)
    examples, counts = [], {}
    for which, rows in sets:
        tpl = teacher_template(cfg.task) if which == "teacher" else student_template(cfg.task)
        examples += labelled_examples(ce, tok, rows, tpl)
        counts[which] = counts.get(which, 0) + len(rows)
    tc = ce.train
    log(f"train --sft: {len(examples)} labelled examples ({counts}), {tc.epochs} epoch(s), {tc.method}, lr {tc.lr}")
    ckpt = out.with_name(out.name + ".ckpt")
    key = {"data": data_hash, "train": train_settings(ce), "init": init_fingerprint(ce)}
    history, elapsed = fit(model, ce, epoch_batches(examples, tc), math.ceil(len(examples) / tc.batch_size),
                           eos_id=models.turn_end_id(tok), pad_id=tok.pad_token_id, ckpt=ckpt, key=key)
    if tc.method == "lora":
        model = model.merge_and_unload()
    summary = summarize(ce, data_hash, len(examples), history, elapsed, adapter=False, sft_templates=counts)
    save_student(model, tok, out, summary, history)
    shutil.rmtree(ckpt, ignore_errors=True)
    log(f"train --sft: loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f} in {elapsed:.0f}s; saved {out}")
    return summary


def sft_model_from_config(cfg: Config, student_file: str | None, teacher_file: str | None,
                          overwrite: bool = False) -> dict:
    """`ctxdistill train CONFIG --sft FILE [--sft-teacher FILE]`: into `<out>/sft/`."""
    from ctxdistill.inputs import read_rows

    sets = [(w, read_rows(Path(f), need_ref=True)) for w, f in (("student", student_file), ("teacher", teacher_file)) if f]
    return sft_model(cfg, sets, cfg.out / "sft", overwrite)
