"""Student-trainer throughput against a bare PyTorch loop, for full fine-tuning and LoRA.

    python benchmarks/train_throughput.py [--tiny] [--steps 8] [--batch-size 8] [--out FILE]

Both loops take the same batches of [student prompt, answer, terminator] sequences (student prompts of
the demo's countries, answers of 6 tokens with top-20 teacher log-probs) and do forward + backward +
AdamW step. The trainer is `ctxdistill.core.loop.train_step` (the real step: the prompts' shared prefix run
once with cascade attention, logits only at answer positions, forward KL to top-k + tail, hard-label
terminator, grad clipping, rows packed without padding); it is also timed with the shared prefix and
packing off (`share_prefix=False, packed=False`: a padded batch). The bare loop is
`model(input_ids, attention_mask, labels=...)` (full logits, cross-entropy) + AdamW, nothing else.
Tokens/s counts every sequence token (padding excluded) per step, the same for both; the two loops
alternate step by step after one warm-up step each, so machine noise hits both alike. Peak RSS is
measured in a separate child process per loop (model load included).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path

from _common import parser, vm_hwm_mb, write_result

os.environ.setdefault("CTXDISTILL_QUIET", "1")
DATA = Path(__file__).resolve().parents[1] / "src" / "ctxdistill" / "data" / "task1146_country_capital.json"


def make_batches(tok, n_steps: int, batch_size: int, answer_len: int = 6, k: int = 20):
    import torch

    from ctxdistill.core.sampling import topk_with_tail
    from ctxdistill.store import Example
    from ctxdistill.core.templates import Template

    g = torch.Generator().manual_seed(0)
    countries = [i["input"] for i in json.loads(DATA.read_text())["Instances"]]
    tpl = Template(user="{input}")
    batches = []
    for s in range(n_steps):
        batch = []
        for j in range(batch_size):
            x = countries[(s * batch_size + j) % len(countries)]
            ids, lp, tail = topk_with_tail(torch.randn(answer_len, tok.vocab_size, generator=g) * 3, k)
            batch.append(Example(id=x, prompt_ids=tpl.render(tok, x)[0],
                                 answer_ids=torch.randint(100, 40000, (answer_len,), generator=g).tolist(),
                                 topk_ids=ids.to(torch.int32), topk_logprobs=lp, tail_logmass=tail))
        batches.append(batch)
    return batches


def build(model_name: str, method: str):
    import torch

    from ctxdistill.config import config_from_dict
    from ctxdistill.core.student import setup_model

    cfg = config_from_dict({"model": {"name": model_name}, "task": {"teacher": "{input}"},
                            "data": {"train": "x", "eval": "y"}, "train": {"method": method, "lr": 1e-5}})
    model = setup_model(cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return model, opt, sched


def bare_step(model, opt, batch, pad_id, eos_id):

    from ctxdistill.core.sampling import right_pad

    seqs = [e.prompt_ids + e.answer_ids + [eos_id] for e in batch]
    ids, mask = right_pad(seqs, pad_id)
    labels = ids.masked_fill(mask == 0, -100)
    for r, e in enumerate(batch):  # loss on answer + terminator only, like the trainer
        labels[r, :len(e.prompt_ids)] = -100
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def _rss_child(kind: str, model_name: str, method: str, batch_size: int, q) -> None:
    """Peak RSS (MB) of a fresh process that loads the model and runs 3 steps of one loop."""
    from ctxdistill.core.models import load_tokenizer
    from ctxdistill.core.loop import StudentLoss, share_of, train_step

    tok = load_tokenizer(model_name)
    batches = make_batches(tok, 3, batch_size)
    model, opt, sched = build(model_name, method)
    for b in batches:
        if kind == "trainer":
            train_step(StudentLoss(model, loss="forward_kl", eos_id=tok.eos_token_id, pad_id=tok.pad_token_id),
                       opt, sched, share_of(b, 0, 1), max_grad_norm=1.0)
        else:
            bare_step(model, opt, b, tok.pad_token_id, tok.eos_token_id)
    q.put(vm_hwm_mb())


def peak_rss(kind, model_name, method, batch_size) -> float:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_rss_child, args=(kind, model_name, method, batch_size, q))
    p.start()
    value = q.get()
    p.join()
    return round(value, 1)


def measure(model_name: str, method: str, steps: int, batch_size: int) -> dict:
    from ctxdistill.core.models import load_tokenizer
    from ctxdistill.core.loop import StudentLoss, share_of, train_step

    tok = load_tokenizer(model_name)
    batches = make_batches(tok, steps + 1, batch_size)
    tokens = [sum(len(e.prompt_ids) + len(e.answer_ids) + 1 for e in b) for b in batches]
    trainer, plain, bare = build(model_name, method), build(model_name, method), build(model_name, method)
    t_tr = t_plain = t_bare = 0.0
    kw = dict(loss="forward_kl", eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    ours = StudentLoss(trainer[0], **kw), *trainer[1:]
    unshared = StudentLoss(plain[0], share_prefix=False, packed=False, **kw), *plain[1:]
    for s, b in enumerate(batches):  # step 0 is a warm-up for every loop, not timed
        t0 = time.perf_counter()
        train_step(*ours, share_of(b, 0, 1), max_grad_norm=1.0)
        t1 = time.perf_counter()
        train_step(*unshared, share_of(b, 0, 1), max_grad_norm=1.0)
        t2 = time.perf_counter()
        bare_step(bare[0], bare[1], b, tok.pad_token_id, tok.eos_token_id)
        t3 = time.perf_counter()
        if s:
            t_tr += t1 - t0
            t_plain += t2 - t1
            t_bare += t3 - t2
    n = sum(tokens[1:])
    return {"trainer_tok_s": round(n / t_tr, 1), "bare_tok_s": round(n / t_bare, 1), "ratio": round(t_bare / t_tr, 3),
            "trainer_no_shared_prefix_tok_s": round(n / t_plain, 1),
            "ratio_no_shared_prefix": round(t_bare / t_plain, 3),
            "trainer_peak_rss_mb": peak_rss("trainer", model_name, method, batch_size),
            "bare_peak_rss_mb": peak_rss("bare", model_name, method, batch_size)}


def step_args(doc: str):
    """The arguments of the step benchmarks (this one, train_levers.py), and the model they name."""
    ap = parser(doc)
    ap.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of the embedded model")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    from ctxdistill.core.models import tiny_random_llama

    return args, str(tiny_random_llama(Path(tempfile.mkdtemp()) / "tiny")) if args.tiny else "embedded"


def main() -> None:
    args, model = step_args(__doc__)
    results = {}
    for method in ("full", "lora"):
        r = measure(model, method, args.steps, args.batch_size)
        results[method] = r
        print(f"{method:>4}: trainer {r['trainer_tok_s']:>8.1f} tok/s | bare {r['bare_tok_s']:>8.1f} tok/s | "
              f"ratio {r['ratio']:.3f} | padded, no shared prefix {r['trainer_no_shared_prefix_tok_s']:>8.1f} tok/s, "
              f"ratio {r['ratio_no_shared_prefix']:.3f} | peak RSS trainer {r['trainer_peak_rss_mb']} MB, "
              f"bare {r['bare_peak_rss_mb']} MB", flush=True)
    write_result(results, args.out)


if __name__ == "__main__":
    main()
