"""Issue 18's CPU levers for the training step, measured side by side in one run: thread settings and
torch.compile, against the trainer as a user gets it.

    python benchmarks/train_levers.py [--tiny] [--steps 8] [--batch-size 8] [--out FILE]

Each variant has its own copy of the student (LoRA, as the demo and bake train it) and optimiser; they
take the same demo-like batches (train_throughput.make_batches: the demo's country prompts, 6-token
answers with top-20 teacher log-probs) and run `ctxdistill.core.loop.train_step` in turn, step by step,
after one untimed warm-up step each, so machine noise hits all alike. Variants:

- `default`: torch's own thread count (here: one per core);
- `threads_1`: `torch.set_num_threads(1)` around the step;
- `compiled`: the decoder wrapped in `torch.compile(dynamic=True)` (its compile time is reported apart:
  the warm-up step, plus any step that recompiles for a new shape, which is why timed steps are kept apart too).

Inter-op threads (`torch.set_num_interop_threads`) can be set only once per process, before any parallel
work, so they cannot alternate step by step; the training step runs no inter-op parallel work, so they
are not measured.
"""

from __future__ import annotations

import os
import time

from _common import write_result
from train_throughput import build, make_batches, step_args

os.environ.setdefault("CTXDISTILL_QUIET", "1")


def main() -> None:
    args, name = step_args(__doc__)
    import torch

    from ctxdistill.core.loop import StudentLoss, share_of, train_step
    from ctxdistill.core.models import load_tokenizer

    tok = load_tokenizer(name)
    batches = make_batches(tok, args.steps + 1, args.batch_size)
    kw = dict(loss="forward_kl", eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    default_threads = torch.get_num_threads()
    variants = {}
    for v in ("default", "threads_1", "compiled"):
        model, opt, sched = build(name, "lora")
        if v == "compiled":
            base = model.get_base_model()
            base.model = torch.compile(base.model, dynamic=True)
        variants[v] = {"step": (StudentLoss(model, **kw), opt, sched), "threads": 1 if v == "threads_1" else default_threads,
                       "times": [], "losses": []}
    for s, b in enumerate(batches):
        for v, st in variants.items():
            torch.set_num_threads(st["threads"])
            t0 = time.perf_counter()
            loss, _ = train_step(*st["step"], share_of(b, 0, 1), max_grad_norm=1.0)
            st["times"].append(time.perf_counter() - t0)
            st["losses"].append(round(float(loss), 6))
    torch.set_num_threads(default_threads)
    ref = sum(variants["default"]["times"][1:])
    res = {"model": name, "steps": args.steps, "batch_size": args.batch_size, "torch_threads_default": default_threads,
           "torch": torch.__version__, "variants": {}}
    for v, st in variants.items():
        timed = sum(st["times"][1:])
        res["variants"][v] = {"warmup_step_s": round(st["times"][0], 3), "mean_step_s": round(timed / args.steps, 4),
                              "speedup_vs_default": round(ref / timed, 3),
                              "step_s": [round(t, 4) for t in st["times"][1:]], "losses": st["losses"]}
        print(f"{v:>10}: warm-up {st['times'][0]:7.2f} s | mean step {timed / args.steps:.4f} s | "
              f"speed-up vs default {ref / timed:.3f}x | losses {st['losses'][:3]}...", flush=True)
    write_result(res, args.out)


if __name__ == "__main__":
    main()
