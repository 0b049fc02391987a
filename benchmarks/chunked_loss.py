"""Issue 18's chunked LM-head loss (`train.loss_chunk`) against the loss on all answer positions' logits at
once, measured side by side in one run: training-step time and peak memory per answer length.

    python benchmarks/chunked_loss.py [--lengths 8,64,256] [--chunk 256] [--batch-size 8] [--steps 2]
                                      [--seconds 60] [--method lora] [--threads 1] [--tiny] [--out FILE]

The step is forward + backward of `ctxdistill.core.loop.batch_loss` (forward KL to top-20 + tail, hard-label
terminator, shared prefix and packing as the trainer runs them; no optimiser step, so the weights do not
change and both variants meet the same model) on the embedded SmolLM2-135M student (LoRA by default, as the
demo and bake train it). Each row is a demo country prompt followed by `length` random answer tokens with
random top-20 teacher log-probs. Variants: `off` (loss_chunk 0: [N, V] fp32 logits, N = batch x (length + 1))
and `on` (loss_chunk = --chunk, each chunk's logits recomputed in the backward pass; a batch of at most --chunk
positions, e.g. 8 rows x 8 tokens with --chunk 256, is not chunked: then `on` runs the same code as `off`).

Time: per length, one process alternates the two variants step by step (the same batch for both, the order
flipping every pair) after one untimed warm-up step each, so machine noise hits both alike: at least --steps
pairs, more while the length's timing has taken under --seconds. Reported: mean step times, their ratio, and
the median of the per-pair ratios (robust to the load changing mid-run); the loss values of the two are
compared too. Peak memory: VmHWM of a fresh spawned process per (variant, length), which loads the model,
builds the batch, reads VmHWM (`base`), runs one step and reads it again (`peak`); VmHWM starts afresh at
exec, so no process inherits another's peak, and `peak - base` is the step's own addition (the logits' share
of it is what chunking can save). These processes run with glibc's MALLOC_MMAP_THRESHOLD_=65536: every
allocation of 64 KiB or more is its own mapping, returned to the system when freed, so the RSS follows the
live tensors; with glibc's adaptive threshold, freed memory kept in its heap made one variant's peak vary by
~0.5 GB between two runs of this script.

Threads: 1 by default (`--threads 0`: torch's own count). On the shared 2-core machine this was written on,
with other jobs running, two OpenMP threads made the same step 5-35x slower and erratic (an 8-token step:
1.7 s with one thread, 9.6-60 s with two), which would drown the difference being measured.
Length 512 is not in the default set: there a process running one unchunked step peaked at 20.9 GB RSS (on
a 23 GB machine shared with other jobs), and a step took 95-150 s (with two threads).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import tempfile
import time
from pathlib import Path

from _common import parser, vm_hwm_mb, write_result
from train_throughput import build, make_batches

os.environ.setdefault("CTXDISTILL_QUIET", "1")
K = 20


def make_batch(tok, batch_size: int, length: int, seed: int):
    """`batch_size` demo prompts, each with `length` random answer tokens and random top-K teacher log-probs."""
    import torch

    from ctxdistill.store import Example

    g = torch.Generator().manual_seed(seed)
    batch = []
    for j, e in enumerate(make_batches(tok, 1 + seed, batch_size, answer_len=1, k=K)[seed]):
        start = torch.randint(0, tok.vocab_size, (length, 1), generator=g)
        ids = (start + torch.arange(K) * 997) % tok.vocab_size  # K distinct ids per position
        lp = torch.log_softmax(torch.randn(length, K + 1, generator=g) * 3, -1)  # top-K and the tail bucket
        batch.append(Example(id=f"{e.id}-{j}", prompt_ids=e.prompt_ids,
                             answer_ids=torch.randint(100, 40000, (length,), generator=g).tolist(),
                             topk_ids=ids.to(torch.int32), topk_logprobs=lp[:, :K], tail_logmass=lp[:, K]))
    return batch


def step(model, batch, kw, chunk: int) -> float:
    """Forward + backward of batch_loss; the loss value."""
    from ctxdistill.core.loop import batch_loss

    model.zero_grad(set_to_none=True)
    loss, _ = batch_loss(model, batch, loss_chunk=chunk, **kw)
    loss.backward()
    return loss.item()


def _setup(model_name: str, method: str, batch_size: int, length: int):
    from ctxdistill.core.models import load_tokenizer

    tok = load_tokenizer(model_name)
    model = build(model_name, method)[0]
    kw = dict(loss="forward_kl", eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    return tok, model, kw


def _rss_child(model_name: str, method: str, batch_size: int, length: int, chunk: int, threads: int, q) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
    tok, model, kw = _setup(model_name, method, batch_size, length)
    batch = make_batch(tok, batch_size, length, seed=0)
    base = vm_hwm_mb()
    step(model, batch, kw, chunk)
    q.put((base, vm_hwm_mb()))


MMAP_THRESHOLD = "65536"


def peak_rss(model_name: str, method: str, batch_size: int, length: int, chunk: int,
             threads: int) -> tuple[float, float]:
    """(VmHWM before the step, VmHWM after it) in MB, of a fresh process."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_rss_child, args=(model_name, method, batch_size, length, chunk, threads, q))
    old = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = MMAP_THRESHOLD  # read by the child's glibc at its start
    try:
        p.start()
    finally:
        if old is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = old
    base, peak = q.get()
    p.join()
    return round(base, 1), round(peak, 1)


def timed(model, tok, kw, batch_size: int, length: int, chunk: int, steps: int, seconds: float) -> dict:
    """Per variant: step times (after one warm-up step each) and losses, the variants alternating: at least
    `steps` timed pairs, more until `seconds` have passed."""
    out = {v: {"step_s": [], "losses": []} for v in ("off", "on")}
    t_start = time.perf_counter()
    s = -1
    while (s := s + 1) <= steps or time.perf_counter() - t_start < seconds:
        batch = make_batch(tok, batch_size, length, seed=s)
        for v, c in (("off", 0), ("on", chunk)) if s % 2 == 0 else (("on", chunk), ("off", 0)):
            t0 = time.perf_counter()
            loss = step(model, batch, kw, c)
            if s:  # step 0 is the warm-up
                out[v]["step_s"].append(round(time.perf_counter() - t0, 4))
            out[v]["losses"].append(round(loss, 6))
    return out


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--lengths", default="8,64,256", help="answer tokens per row, comma-separated")
    ap.add_argument("--chunk", type=int, default=256, help="train.loss_chunk of the `on` variant")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2, help="least timed steps per variant and length (after a warm-up)")
    ap.add_argument("--seconds", type=float, default=60, help="time each length at least this long (more steps)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--method", default="lora", choices=("lora", "full"))
    ap.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of the embedded model")
    args = ap.parse_args()
    import torch

    from ctxdistill.core.models import tiny_random_llama

    if args.threads:
        torch.set_num_threads(args.threads)
    name = str(tiny_random_llama(Path(tempfile.mkdtemp()) / "tiny")) if args.tiny else "embedded"
    lengths = [int(x) for x in args.lengths.split(",")]
    res = {"model": name, "method": args.method, "batch_size": args.batch_size, "chunk": args.chunk,
           "min_steps": args.steps, "seconds_per_length": args.seconds, "top_k": K,
           "malloc_mmap_threshold_rss": int(MMAP_THRESHOLD), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
           "lengths": {}}
    t_start = time.perf_counter()
    for length in lengths:  # memory first, in fresh processes, while this one holds no model
        res["lengths"][str(length)] = row = {"positions": args.batch_size * (length + 1)}
        for v, c in (("off", 0), ("on", args.chunk)):
            base, peak = peak_rss(name, args.method, args.batch_size, length, c, args.threads)
            row[v] = {"base_rss_mb": base, "peak_rss_mb": peak, "step_rss_mb": round(peak - base, 1)}
        print(f"answer {length:>4}: peak RSS off {row['off']['peak_rss_mb']} MB (step +{row['off']['step_rss_mb']}), "
              f"on {row['on']['peak_rss_mb']} MB (step +{row['on']['step_rss_mb']})", flush=True)
    tok, model, kw = _setup(name, args.method, args.batch_size, 0)
    for length in lengths:
        row = res["lengths"][str(length)]
        t = timed(model, tok, kw, args.batch_size, length, args.chunk, args.steps, args.seconds)
        for v in ("off", "on"):
            row[v].update(mean_step_s=round(sum(t[v]["step_s"]) / len(t[v]["step_s"]), 4), **t[v])
        off, on = row["off"], row["on"]
        row["timed_pairs"] = len(off["step_s"])
        row["time_on_over_off"] = round(on["mean_step_s"] / off["mean_step_s"], 3)
        row["time_on_over_off_median_pair"] = round(statistics.median(a / b for a, b in zip(on["step_s"], off["step_s"])), 3)
        row["peak_rss_on_over_off"] = round(on["peak_rss_mb"] / off["peak_rss_mb"], 3)
        row["step_rss_on_over_off"] = round(on["step_rss_mb"] / max(off["step_rss_mb"], 1e-9), 3)
        row["max_loss_diff"] = max(abs(a - b) for a, b in zip(off["losses"], on["losses"]))
        print(f"answer {length:>4}: step off {off['mean_step_s']:.3f} s, on {on['mean_step_s']:.3f} s "
              f"(on/off {row['time_on_over_off']:.3f}, median pair {row['time_on_over_off_median_pair']:.3f}, "
              f"{row['timed_pairs']} pairs) | peak RSS on/off {row['peak_rss_on_over_off']:.3f}, "
              f"step's own RSS on/off {row['step_rss_on_over_off']:.3f} | max loss diff {row['max_loss_diff']:.2e}",
              flush=True)
    res["seconds"] = round(time.perf_counter() - t_start, 1)
    write_result(res, args.out)


if __name__ == "__main__":
    main()
