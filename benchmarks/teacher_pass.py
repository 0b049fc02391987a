"""Teacher-pass throughput with and without shared-context prefix reuse.

    python benchmarks/teacher_pass.py [--tiny] [--contexts 256,1024,4096] [--inputs 32] [--out FILE]

For each shared-context length, runs the real teacher pass (`ctxdistill.teach.teach`: sampling,
extraction, scoring, store) over the same inputs twice in this process, alternating the order
(reuse first for one length, naive first for the next), with 24 answer tokens per input (greedy,
extractor = the whole 24-token completion). Throughput counts the teacher tokens each example
covers, context + input + answer, over wall time; both paths do the same work, so the ratio is the
speed-up. Also reports the store's bytes per answer token at k=20.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from _common import parser, timed, write_result

os.environ.setdefault("CTXDISTILL_QUIET", "1")
ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "src" / "ctxdistill" / "data" / "task1146_country_capital.json"


def context_text(tok, n_tokens: int) -> str:
    """About n_tokens of real instruction-style context: the task definition and worked examples."""
    task = json.loads(DATA.read_text())
    lines = [task["Definition"][0] + ". Examples follow."]
    for inst in task["Instances"] * 4:
        lines.append(f"Country: {inst['input']}. Capital: {inst['output'][0]}.")
        if len(tok("\n".join(lines), add_special_tokens=False)["input_ids"]) >= n_tokens:
            break
    return "\n".join(lines)


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of the embedded model")
    ap.add_argument("--contexts", default="256,1024,4096")
    ap.add_argument("--inputs", type=int, default=32)
    ap.add_argument("--answer-tokens", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()

    from ctxdistill.config import config_from_dict
    from ctxdistill.core.files import write_jsonl
    from ctxdistill.core.models import load_tokenizer, tiny_random_llama
    from ctxdistill.store import read_store
    from ctxdistill.inputs import prepare_inputs
    from ctxdistill.teach import teach
    from ctxdistill.core.templates import teacher_template

    work = Path(tempfile.mkdtemp(prefix="ctxdistill-bench-"))
    model = str(tiny_random_llama(work / "tiny")) if args.tiny else "embedded"
    tok = load_tokenizer(model)
    countries = [i["input"] for i in json.loads(DATA.read_text())["Instances"]][:args.inputs]
    write_jsonl(work / "train.jsonl", [{"id": str(i), "input": c} for i, c in enumerate(countries)])
    write_jsonl(work / "eval.jsonl", [{"input": "France", "reference": "Paris"}])
    results, store_bytes = {}, None
    for n, ctx_len in enumerate(int(c) for c in args.contexts.split(",")):
        raw = {
            "out_dir": str(work / f"ctx{ctx_len}"),
            "model": {"name": model},
            "task": {"name": "bench", "teacher_system": context_text(tok, ctx_len).replace("{", "{{").replace("}", "}}"),
                     "teacher": "Country: {input}. Describe its capital.", "extractor": {"kind": "regex", "pattern": "(?s)(.+)"}},
            "data": {"train": str(work / "train.jsonl"), "eval": str(work / "eval.jsonl")},
            "generation": {"temperature": 1.0 if args.tiny else 0.0, "max_new_tokens": args.answer_tokens},
            "teach": {"top_k": 20, "batch_size": args.batch_size, "shard_size": args.inputs},
        }
        cfg = config_from_dict(raw)
        timings, manifests = {}, {}
        prepare_inputs(cfg)
        for reuse in ([True, False] if n % 2 == 0 else [False, True]):  # alternate which path goes first
            with timed() as t:
                manifests[reuse] = teach(cfg, overwrite=True, prefix_reuse=reuse)
            timings[reuse] = t.seconds
            if reuse:
                store = cfg.out / "teacher"
                tensors = sum(f.stat().st_size for f in store.glob("shard-*.safetensors"))
                store_bytes = tensors / sum(s["answer_tokens"] for s in manifests[reuse]["shards"])
        m = manifests[True]
        answer_tokens = sum(s["answer_tokens"] for s in m["shards"])
        _, examples = read_store(cfg.out / "teacher")
        tpl = teacher_template(cfg.task)
        prompt_tokens = sum(len(tpl.render(tok, e.meta["input"])[0]) for e in examples)
        covered = prompt_tokens + answer_tokens
        row = {"shared_prefix_tokens": m["shared_prefix_tokens"], "answer_tokens": answer_tokens,
               "reuse_s": round(timings[True], 2), "naive_s": round(timings[False], 2),
               "reuse_tok_s": round(covered / timings[True], 1), "naive_tok_s": round(covered / timings[False], 1),
               "speedup": round(timings[False] / timings[True], 2)}
        results[str(ctx_len)] = row
        print(f"context {ctx_len:>5}: prefix {row['shared_prefix_tokens']:>5} tok | reuse {row['reuse_s']:>7.1f}s "
              f"{row['reuse_tok_s']:>8.1f} tok/s | naive {row['naive_s']:>7.1f}s {row['naive_tok_s']:>8.1f} tok/s | "
              f"speed-up {row['speedup']:.2f}x", flush=True)
    print(f"store: {store_bytes:.1f} bytes per answer token at k=20")
    out = {"model": "tiny-random-llama" if args.tiny else "SmolLM2-135M-Instruct (embedded)", "inputs": args.inputs,
           "batch_size": args.batch_size, "contexts": results, "store_bytes_per_answer_token": round(store_bytes, 1)}
    write_result(out, args.out)


if __name__ == "__main__":
    main()
