"""The same distillation job three ways: TRL's SDFTTrainer, ctxdistill offline, ctxdistill on-policy.

    pip install -e '.[bench]'          # TRL >= 1.16 and datasets: benchmark-only dependencies
    python benchmarks/vs_trl.py [--out FILE] [--ways trl_sdft,ctxdistill_offline,ctxdistill_on_policy] [--tiny]

The job: the demo task (country -> capital, SuperNI task1146) on the embedded SmolLM2-135M-Instruct,
128 training inputs and 64 held-out ones (the demo's deterministic split), LoRA r16/alpha 32 on the
same modules, lr 1e-3 with linear decay to 0 and no warm-up, batch 8, 3 epochs, gradient clipping 1.0,
forward KL on the top-20 + tail bucket, completions of at most 12 tokens.

  trl_sdft              SDFTTrainer (on-policy): the student samples from the bare input (temperature 1),
                        the frozen base model (adapter off) scores with the teacher template
                        `teacher_prompt_template` = our teacher template; distillation_mode topk_logits,
                        distillation_topk 20, distillation_add_tail, distillation_alpha 0 (forward KL),
                        num_generations 1, gradient checkpointing off (SDFTConfig's default is on;
                        ctxdistill does not checkpoint, so this keeps the race about the method).
  ctxdistill_offline    `ctxdistill run` stages: inputs + teacher pass + training (the demo config).
  ctxdistill_on_policy  the same config with train.mode = "on-policy" (rollout temperature 1).

Each way runs in its own fresh process: wall time is from process start to the saved student (model
loading, the teacher pass and training included; evaluation excluded), peak RSS is that process's
VmHWM. Then every student is scored by the same code (ctxdistill's evaluate: greedy, 12 new tokens) on
the 64 held-out inputs, with the task's metric (normalised exact match) and, because a student can
learn to answer in a sentence ("The capital city of France is Paris."), also `contains` (the
reference as a whole-word span). The ways run one after another on the same machine in one call.
TRL cannot express an assistant prefill for its teacher, so its teacher sees our teacher template
without the prefill "The capital city of {input} is"; ctxdistill's teacher uses it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("CTXDISTILL_QUIET", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import vm_hwm_mb  # noqa: E402

WAYS = ("trl_sdft", "ctxdistill_offline", "ctxdistill_on_policy")


def job_config(workdir: Path, way: str, tiny_model: str | None, n_train: int, n_eval: int, epochs: int):
    from ctxdistill.demo import demo_config

    cfg = demo_config(str(workdir / way), tiny_model or "embedded")
    cfg.data.n_train, cfg.data.n_eval = n_train, n_eval
    cfg.train.epochs = epochs
    cfg.eval.batch_size = 32
    if way == "ctxdistill_on_policy":
        cfg.train.mode = "on-policy"
        cfg.train.rollout_temperature = 1.0
    return cfg


def run_trl(cfg) -> None:
    """Train with TRL's SDFTTrainer and save the adapter where ctxdistill's evaluate finds a student."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    from ctxdistill import models
    from ctxdistill.inputs import load_split, prepare_inputs

    prepare_inputs(cfg)
    rows = load_split(cfg, "train")
    tok = models.load_tokenizer(cfg.model.name)
    model = models.load_model(cfg.model)
    tc = cfg.train
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": cfg.task.student.format(input=r["input"])}],
                               "privileged_context": ""} for r in rows])
    args = SDFTConfig(
        output_dir=str(cfg.out / "trl"), per_device_train_batch_size=tc.batch_size, gradient_accumulation_steps=1,
        num_generations=1, num_train_epochs=tc.epochs, learning_rate=tc.lr, lr_scheduler_type="linear",
        warmup_steps=0, weight_decay=tc.weight_decay, max_grad_norm=tc.max_grad_norm, seed=tc.seed,
        max_completion_length=cfg.generation.max_new_tokens, temperature=tc.rollout_temperature,
        distillation_mode="topk_logits", distillation_topk=cfg.teach.top_k, distillation_add_tail=True,
        distillation_alpha=0.0, teacher_model_kind="base",
        teacher_prompt_template=cfg.task.teacher.replace("{input}", "{prompt}") + "{privileged_context}",
        gradient_checkpointing=False,  # SDFTConfig turns it on by default; ctxdistill does not checkpoint
        report_to="none", save_strategy="no", logging_steps=8, use_cpu=True, bf16=False,
        dataloader_num_workers=0, disable_tqdm=True)
    peft = LoraConfig(r=tc.lora_r, lora_alpha=tc.lora_alpha, lora_dropout=tc.lora_dropout,
                      target_modules=list(tc.lora_targets), task_type="CAUSAL_LM")
    trainer = SDFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=peft)
    result = trainer.train()
    out = cfg.out / "student"
    trainer.save_model(str(out))
    tok.save_pretrained(out)
    (out / "ctxdistill_config.json").write_text(json.dumps({
        "mode": "trl_sdft", "adapter": True, "steps": result.global_step, "train_loss": result.training_loss}))


def child_train(way: str, cfg) -> dict:
    t0 = time.perf_counter()
    if way == "trl_sdft":
        run_trl(cfg)
    else:
        from ctxdistill.inputs import prepare_inputs
        from ctxdistill.teacher import teach
        from ctxdistill.train import train

        prepare_inputs(cfg)
        if cfg.train.mode == "offline":
            teach(cfg, overwrite=True)
        train(cfg, overwrite=True)
    return {"wall_s": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(vm_hwm_mb(), 1)}


def child_eval(way: str, cfg, with_reference_systems: bool) -> dict:
    from ctxdistill.evaluate import contains, evaluate

    systems = ["base", "teacher", "student"] if with_reference_systems else ["student"]
    rep = evaluate(cfg, systems)
    rows = [json.loads(line) for line in open(cfg.out / "eval" / "predictions.jsonl")]
    out = {"scores_exact": rep["scores"],
           "scores_contains": {s: sum(contains(r[s]["prediction"], r["reference"]) for r in rows) / len(rows)
                               for s in systems},
           "examples": [{"input": r["input"], "student": r["student"]["prediction"]} for r in rows[:5]]}
    return out


def spawn(stage: str, way: str, a) -> dict:
    """Run one stage of one way in a fresh interpreter; return its JSON result."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, __file__, "--child", f"{stage}:{way}", "--child-out", f.name, "--workdir", str(a.workdir),
               "--n-train", str(a.n_train), "--n-eval", str(a.n_eval), "--epochs", str(a.epochs)]
        if a.tiny_model:
            cmd += ["--tiny-model", a.tiny_model]
        subprocess.run(cmd, check=True)
        return json.loads(Path(f.name).read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--ways", default=",".join(WAYS))
    ap.add_argument("--workdir", type=Path, default=Path("runs/vs_trl"))
    ap.add_argument("--n-train", type=int, default=128)
    ap.add_argument("--n-eval", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="smoke test: a tiny random Llama, 16/8 inputs, 1 epoch")
    ap.add_argument("--tiny-model", help=argparse.SUPPRESS)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.workdir = a.workdir.resolve()

    if a.child:
        stage, way = a.child.split(":")
        cfg = job_config(a.workdir, way, a.tiny_model, a.n_train, a.n_eval, a.epochs)
        res = child_train(way, cfg) if stage == "train" else child_eval(way, cfg, way == "ctxdistill_offline")
        Path(a.child_out).write_text(json.dumps(res))
        return

    if a.tiny:
        from ctxdistill.models import tiny_random_llama

        a.n_train, a.n_eval, a.epochs = 16, 8, 1
        a.tiny_model = str(tiny_random_llama(a.workdir / "tiny-model", max_position_embeddings=1024))
    ways = [w for w in a.ways.split(",") if w]
    results: dict = {}
    for way in ways:
        print(f"[{way}] training ...", file=sys.stderr, flush=True)
        results[way] = spawn("train", way, a)
        print(f"[{way}] {results[way]['wall_s']} s, peak RSS {results[way]['peak_rss_mb']} MB; evaluating ...",
              file=sys.stderr, flush=True)
        ev = spawn("eval", way, a)
        results[way].update(score=ev["scores_exact"]["student"], score_contains=ev["scores_contains"]["student"],
                            examples=ev["examples"])
        if way == "ctxdistill_offline":
            results["reference_systems"] = {"exact": ev["scores_exact"], "contains": ev["scores_contains"]}
    results.update(n_train=a.n_train, n_eval=a.n_eval, epochs=a.epochs,
                   command=" ".join(["python", *sys.argv]),
                   model="tiny-random-llama" if a.tiny_model else "embedded SmolLM2-135M-Instruct")

    print(f"\n{'way':<22} {'wall s':>8} {'peak RSS MB':>12} {'exact':>7} {'contains':>9}")
    for way in ways:
        r = results[way]
        print(f"{way:<22} {r['wall_s']:>8.1f} {r['peak_rss_mb']:>12.0f} {r['score']:>7.3f} {r['score_contains']:>9.3f}")
    if "trl_sdft" in results:
        for way in ways:
            if way != "trl_sdft":
                print(f"{way}: {results['trl_sdft']['wall_s'] / results[way]['wall_s']:.2f}x faster than trl_sdft")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
