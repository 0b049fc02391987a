"""Data-parallel training throughput on CPU cores: 2 processes (gloo) against 1, on the tiny model.

    python benchmarks/ddp_scaling.py [--inputs 96] [--batch-size 16] [--epochs 2] [--fsdp] [--out FILE]

Builds the tiny random Llama (2 layers, hidden 64, the real SmolLM2 tokenizer), runs the teacher pass
once, then trains the same LoRA student on that distillation set three ways, each a real
`ctxdistill train` process started from the same store:
  - one process, 2 threads    (OMP_NUM_THREADS=2)
  - one process, 1 thread     (OMP_NUM_THREADS=1)
  - two processes, 1 thread each (`--num-processes 2`: accelerate launch, DDP over gloo)
  - with --fsdp, also two processes under FSDP2 (configs/accelerate/fsdp_cpu.yaml), 1 thread each
Samples/s = examples x epochs / the seconds of the training loop (the student summary's `seconds`:
model loading and process start-up excluded). Also the largest absolute difference between the
1-process and 2-process adapters (the same global batches, so it should be float noise).
Writes {"one_proc_samples_s", "one_proc_one_thread_samples_s", "two_proc_samples_s", "speedup",
"weights_max_abs_diff", ...} with --out.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import parser, write_result

os.environ.setdefault("CTXDISTILL_QUIET", "1")
ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "src" / "ctxdistill" / "data" / "task1146_country_capital.json"


def config(model: Path, out: Path, batch_size: int, epochs: int) -> str:
    return f"""out_dir = "{out}"
[model]
name = "{model}"
[task]
name = "ddp-scaling"
teacher = "What is the capital city of {{input}}?"
teacher_prefill = "The capital city of {{input}} is"
student = "{{input}}"
[task.extractor]
kind = "regex"
pattern = '(?s)(.+)'
[data]
train = "train.jsonl"
eval = "eval.jsonl"
[generation]
temperature = 1.0
max_new_tokens = 8
samples_per_input = 2
[teach]
top_k = 20
batch_size = 32
[train]
method = "lora"
lr = 1e-3
epochs = {epochs}
batch_size = {batch_size}
checkpoint_every = 0
"""


def train(cfg: Path, out: Path, store: Path, threads: int, procs: int, fsdp: bool = False) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    shutil.copytree(store, out / "teacher")
    shutil.copytree(store.parent / "inputs", out / "inputs")
    cmd = [sys.executable, "-m", "ctxdistill", "train", str(cfg), "--out", str(out)]
    if fsdp:
        cmd[1:3] = ["-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs/accelerate/fsdp_cpu.yaml"),
                    "--num_processes", str(procs), "--main_process_port", "29517", "-m", "ctxdistill"]
    elif procs > 1:
        cmd += ["--num-processes", str(procs)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "student" / "ctxdistill_config.json").read_text())


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--inputs", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--fsdp", action="store_true", help="also 2 processes under FSDP2")
    args = ap.parse_args()

    import torch
    from safetensors.torch import load_file

    from ctxdistill.config import load_config
    from ctxdistill.core.models import tiny_random_llama
    from ctxdistill.inputs import prepare_inputs
    from ctxdistill.teach import teach

    work = Path(tempfile.mkdtemp(prefix="ddp-scaling-"))
    try:
        model = tiny_random_llama(work / "tiny", max_position_embeddings=512)
        inst = json.loads(DATA.read_text())["Instances"][:args.inputs]
        (work / "train.jsonl").write_text("".join(json.dumps({"id": i["id"], "input": i["input"]}) + "\n" for i in inst))
        (work / "eval.jsonl").write_text(json.dumps({"id": "e", "input": "Chad", "reference": "N'Djamena"}) + "\n")
        cfg = work / "config.toml"
        cfg.write_text(config(model, work / "teach", args.batch_size, args.epochs))
        prepare_inputs(load_config(cfg))
        manifest = teach(load_config(cfg))
        store = work / "teach" / "teacher"
        ways = [("one_proc", 2, 1, False), ("one_proc_one_thread", 1, 1, False), ("two_proc", 1, 2, False)]
        runs = {name: train(cfg, work / name, store, threads, procs, fsdp)
                for name, threads, procs, fsdp in ways + [("two_proc_fsdp", 1, 2, True)] * args.fsdp}
        samples = manifest["n_examples"] * args.epochs
        rate = {k: samples / r["seconds"] for k, r in runs.items()}
        adapters = {k: load_file(work / k / "student" / "adapter_model.safetensors") for k in runs}
        a = adapters["one_proc"]
        diff = {k: max((a[n] - w[n]).abs().max().item() for n in a) for k, w in adapters.items()}
        res = {
            "one_proc_samples_s": round(rate["one_proc"], 2),
            "one_proc_one_thread_samples_s": round(rate["one_proc_one_thread"], 2),
            "two_proc_samples_s": round(rate["two_proc"], 2),
            "speedup": round(rate["two_proc"] / rate["one_proc"], 3),
            "speedup_vs_one_thread": round(rate["two_proc"] / rate["one_proc_one_thread"], 3),
            "weights_max_abs_diff": diff["two_proc"],
            **({"two_proc_fsdp_samples_s": round(rate["two_proc_fsdp"], 2),
                "fsdp_speedup": round(rate["two_proc_fsdp"] / rate["one_proc"], 3),
                "fsdp_weights_max_abs_diff": diff["two_proc_fsdp"]} if args.fsdp else {}),
            "final_loss": {k: r["final_loss"] for k, r in runs.items()},
            "setup": {"model": "tiny random Llama (2 layers, hidden 64, vocab 49152), LoRA r=16",
                      "examples": manifest["n_examples"], "epochs": args.epochs, "global_batch": args.batch_size,
                      "steps": runs["one_proc"]["steps"], "cpu_count": os.cpu_count(), "torch": torch.__version__},
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_result(res, args.out, echo=True)


if __name__ == "__main__":
    main()
