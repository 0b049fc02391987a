"""GPU throughput of the real code paths on a random-initialised ~1B Llama (no download).

    python benchmarks/gpu_throughput.py [--out FILE] [--seq 512] [--batch 16] [--context 2048]
    python benchmarks/gpu_throughput.py --smoke      # a tiny model on whatever device is here (CI check)

1. peak: bf16 matmul TFLOP/s of this GPU, measured (8192^3 matmuls), the denominator of MFU.
2. training: `ctxdistill.core.loop.train_step` (StudentLoss under accelerate with bf16 autocast, AdamW,
   full fine-tuning) on batches of `--batch` sequences of `--seq` tokens (the last 64 are the answer,
   with random top-20 soft labels). tokens/s counts every sequence token; MFU = 6 * P * tokens/s / peak.
3. teacher pass: `ctxdistill.core.sampling.generate` on `--inputs` prompts that share a `--context`-token
   prefix (each adds 32 tokens of its own), 32 new tokens each, greedy; once with the prefix's KV cache
   reused (cascade attention), once without. Both pick the same tokens; the ratio is the speed-up.
Writes {"gpu", "peak_bf16_tflops", "train_tok_s", "mfu", "teacher_prefix_speedup_2048", ...} with --out.
"""

from __future__ import annotations

import sys
import time

from _common import parser, write_result

LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, tie_word_embeddings=True)
TINY = dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True)


def sync(dev):
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def peak_tflops(dev, dtype, n: int, iters: int) -> float:
    import torch

    a, b = (torch.randn(n, n, device=dev, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(dev)
    return 2 * n ** 3 * iters / (time.perf_counter() - t0) / 1e12


def build(spec: dict, dev, dtype):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(bos_token_id=1, eos_token_id=0, pad_token_id=0, **spec)
    return LlamaForCausalLM(cfg).to(device=dev, dtype=dtype)


def examples(n: int, seq: int, answer: int, vocab: int, seed: int):
    import torch

    from ctxdistill.core.sampling import topk_with_tail
    from ctxdistill.store import Example

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(2, vocab, (seq - 1,), generator=g).tolist()  # + the terminator = seq tokens
        top_ids, top_lp, tail = topk_with_tail(torch.randn(answer, vocab, generator=g) * 3, 20)
        out.append(Example(id=str(i), prompt_ids=ids[:-answer], answer_ids=ids[-answer:], topk_ids=top_ids,
                           topk_logprobs=top_lp, tail_logmass=tail))
    return out


def train_rate(model, dev, mixed: str, batch: int, seq: int, steps: int, vocab: int) -> float:
    import torch
    from accelerate import Accelerator

    from ctxdistill.core.loop import StudentLoss, share_of, train_step

    model.train()
    acc = Accelerator(mixed_precision=mixed, cpu=dev.type == "cpu", device_placement=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    module, opt = acc.prepare(StudentLoss(model, loss="forward_kl", eos_id=0, pad_id=0, share_prefix=False), opt)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    batches = [examples(batch, seq, 64, vocab, s) for s in range(steps + 2)]
    for b in batches[:2]:  # warm-up
        train_step(module, opt, sched, share_of(b, acc.process_index, acc.num_processes), max_grad_norm=1.0, acc=acc)
    sync(dev)
    t0 = time.perf_counter()
    for b in batches[2:]:
        train_step(module, opt, sched, share_of(b, acc.process_index, acc.num_processes), max_grad_norm=1.0, acc=acc)
    sync(dev)
    return batch * seq * steps / (time.perf_counter() - t0)


def teacher_rates(model, dev, context: int, inputs: int, batch: int, vocab: int) -> dict:
    import torch

    from ctxdistill.core.sampling import PrefixCache, generate

    model.eval()
    g = torch.Generator().manual_seed(1)
    shared = torch.randint(2, vocab, (context,), generator=g).tolist()
    prompts = [shared + torch.randint(2, vocab, (32,), generator=g).tolist() for _ in range(inputs)]
    kw = dict(pad_id=0, eos_id=0, max_new_tokens=32, temperature=0.0, batch_size=batch, seed=0)
    generate(model, prompts[:2], prefix=PrefixCache(model, shared), **kw)  # warm-up, both paths
    generate(model, prompts[:2], **kw)
    out = {}
    for name in ("reuse", "naive"):
        sync(dev)
        t0 = time.perf_counter()
        prefix = PrefixCache(model, shared) if name == "reuse" else None
        res = generate(model, prompts, prefix=prefix, **kw)
        sync(dev)
        secs = time.perf_counter() - t0
        out[name] = {"seconds": round(secs, 3),
                     "tokens_s": round(sum(len(p) + len(r[0]) for p, r in zip(prompts, res)) / secs, 1),
                     "new_tokens": [len(r[0]) for r in res]}
    assert out["reuse"]["new_tokens"] == out["naive"]["new_tokens"], "cascade and plain decoding disagree"
    return out


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--inputs", type=int, default=64)
    ap.add_argument("--gen-batch", type=int, default=32)
    ap.add_argument("--smoke", action="store_true", help="tiny model, few steps: checks the script runs")
    args = ap.parse_args()

    import torch

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cpu" and not args.smoke:
        sys.exit("gpu_throughput.py: no CUDA device here; run it on a GPU (or pass --smoke for a CPU check)")
    spec = TINY if args.smoke else LLAMA_1B
    if args.smoke:
        args.seq, args.batch, args.steps, args.context, args.inputs, args.gen_batch = 128, 2, 2, 64, 4, 2
    bf16 = dev.type == "cuda" and torch.cuda.is_bf16_supported()
    peak = peak_tflops(dev, torch.bfloat16 if bf16 else torch.float32, 256 if args.smoke else 8192, 3 if args.smoke else 50)
    model = build(spec, dev, torch.float32)  # fp32 master weights; bf16 autocast for the compute
    n_params = sum(p.numel() for p in model.parameters())
    tok_s = train_rate(model, dev, "bf16" if bf16 else "no", args.batch, args.seq, args.steps, spec["vocab_size"])
    gen_model = model.to(torch.bfloat16) if bf16 else model
    gen = teacher_rates(gen_model, dev, args.context, args.inputs, args.gen_batch, spec["vocab_size"])
    res = {
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (smoke test)",
        "peak_bf16_tflops": round(peak, 1),
        "train_tok_s": round(tok_s, 1),
        "mfu": round(6 * n_params * tok_s / (peak * 1e12), 4),
        f"teacher_prefix_speedup_{args.context}": round(gen["naive"]["seconds"] / gen["reuse"]["seconds"], 2),
        "teacher": {k: {kk: v[kk] for kk in ("seconds", "tokens_s")} for k, v in gen.items()},
        "setup": {"params": n_params, "seq": args.seq, "batch": args.batch, "steps": args.steps,
                  "context": args.context, "inputs": args.inputs, "gen_batch": args.gen_batch,
                  "train_precision": "bf16 autocast, fp32 master weights" if bf16 else "fp32",
                  "torch": torch.__version__},
    }
    write_result(res, args.out, echo=True)


if __name__ == "__main__":
    main()
