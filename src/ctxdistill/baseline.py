"""Direct gradient descent on the labelled examples: the paper's baseline for internalising examples.

The student template sees the input and learns the reference answer (hard labels, cross-entropy, then
the terminator), on the same k examples the teacher's context shows. The paper put all examples in one
batch, trained 25 epochs and reported the best epoch; here every epoch is evaluated on the eval split,
and the whole curve is reported with the best epoch. Choosing the best epoch on the eval split flatters
the baseline; the curve shows by how much.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch

from ctxdistill.config import Config
from ctxdistill.errors import UserError
from ctxdistill.files import write_atomic
from ctxdistill.progress import log
from ctxdistill.store import Example
from ctxdistill.templates import encode, student_template


def labelled_examples(cfg: Config, tok, rows: list[dict]) -> list[Example]:
    """Training examples with hard targets: [student prompt] -> reference[0] + terminator."""
    tpl = student_template(cfg.task)
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


def _step(model, opt, sched, batch: list[Example], tc, tok) -> float:
    """One optimiser step on the whole batch, its forward/backward run train.batch_size rows at a time
    (gradient accumulation weighted by target tokens, so the gradient is the whole batch's mean)."""
    from ctxdistill.train import batch_loss

    total = sum(len(e.answer_ids) + 1 for e in batch)
    value = 0.0
    for b in range(0, len(batch), tc.batch_size):
        loss, parts = batch_loss(model, batch[b:b + tc.batch_size], loss="ce", eos_id=tok.eos_token_id,
                                 pad_id=tok.pad_token_id, packed=tc.packing)
        (loss * parts["tokens"] / total).backward()
        value += loss.item() * parts["tokens"] / total
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
    from ctxdistill.evaluate import SCORERS, predict
    from ctxdistill.train import batch_order, lr_lambda, seeded_student

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
    from ctxdistill.inputs import load_split, read_rows

    labelled = read_rows(Path(examples_file), need_ref=True)
    return sft(cfg, labelled, load_split(cfg, "eval"), cfg.out / "baseline_sft", epochs=epochs, batch_size=batch_size)
