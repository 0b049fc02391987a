"""ctxdistill against TRL's SDFTTrainer on the same job: time to quality (default), or fixed epochs.

    pip install -e '.[bench]'          # TRL >= 1.16 and datasets: benchmark-only dependencies
    python benchmarks/vs_trl.py [--out FILE] [--tasks demo,superni] [--tiny]                 # time to quality
    python benchmarks/vs_trl.py --mode fixed [--out FILE] [--ways trl_sdft,ctxdistill_offline,ctxdistill_on_policy]

Time to quality (`--mode time-to-quality`): per task, each system's held-out score is recorded against its
wall time while it trains (four evaluations per epoch and one of the final student; the clock stops while
they run). The systems run one after another in fresh processes, task by task: ctxdistill with the
settings a user gets (the task's recipe as shipped: `make demo`'s config, the H1 recipe's for SuperNI,
early stopping on by default), then TRL's SDFTTrainer at 1, 2 and 3 epochs (its best epoch count is the one
whose final student scores best on the task metric). For every metric the report gives the wall time at
which each system first reaches 95% of the teacher's score (the teacher = the model with the context,
greedy, f applied), and their ratio. Tasks: `demo` (country -> capital, exact match and contains) and
`superni` (task1149 item edible, the Super-NaturalInstructions task with the largest teacher gain in H1:
ROUGE-L and contains). TRL's settings are those of the fixed mode below.

Fixed epochs (`--mode fixed`, the earlier benchmark):

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
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROCESS_START = time.perf_counter()

os.environ.setdefault("CTXDISTILL_QUIET", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (command, parser, score_student, scored_training, task_config, vm_hwm_mb,  # noqa: E402
                     write_result)

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


def run_trl(cfg, callbacks: list | None = None):
    """Train with TRL's SDFTTrainer and save the adapter where ctxdistill's evaluate finds a student; return
    the trainer."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    from ctxdistill.core import models
    from ctxdistill.inputs import prepare_inputs
    from ctxdistill.store import load_split

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
    trainer = SDFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=peft,
                          callbacks=callbacks)
    result = trainer.train()
    out = cfg.out / "student"
    trainer.save_model(str(out))
    tok.save_pretrained(out)
    (out / "ctxdistill_config.json").write_text(json.dumps({
        "mode": "trl_sdft", "adapter": True, "steps": result.global_step, "train_loss": result.training_loss}))
    return trainer


def child_train(way: str, cfg) -> dict:
    t0 = time.perf_counter()
    if way == "trl_sdft":
        run_trl(cfg)
    else:
        from ctxdistill.inputs import prepare_inputs
        from ctxdistill.teach import teach
        from ctxdistill.train import train

        prepare_inputs(cfg)
        if cfg.train.mode == "offline":
            teach(cfg, overwrite=True)
        train(cfg, overwrite=True)
    return {"wall_s": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(vm_hwm_mb(), 1)}


def child_eval(way: str, cfg, with_reference_systems: bool) -> dict:
    from ctxdistill.core.metrics import contains
    from ctxdistill.evaluate import evaluate

    systems = ["base", "teacher", "student"] if with_reference_systems else ["student"]
    rep = evaluate(cfg, systems)
    rows = [json.loads(line) for line in open(cfg.out / "eval" / "predictions.jsonl")]
    out = {"scores_exact": rep["scores"],
           "scores_contains": {s: sum(contains(r[s]["prediction"], r["reference"]) for r in rows) / len(rows)
                               for s in systems},
           "examples": [{"input": r["input"], "student": r["student"]["prediction"]} for r in rows[:5]]}
    return out


def spawn(child: str, a, *extra: str) -> dict:
    """Run one child (`--child STAGE:...`) in a fresh interpreter; return its JSON result."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, __file__, "--child", child, "--child-out", f.name, "--workdir", str(a.workdir), *extra]
        if a.tiny_model:
            cmd += ["--tiny-model", a.tiny_model]
        subprocess.run(cmd, check=True)
        return json.loads(Path(f.name).read_text())


def spawn_fixed(stage: str, way: str, a) -> dict:
    return spawn(f"{stage}:{way}", a, "--n-train", str(a.n_train), "--n-eval", str(a.n_eval), "--epochs", str(a.epochs))


# -- time to quality -----------------------------------------------------------------------------------

POINTS_PER_EPOCH = 4
METRICS = {"demo": ("exact", "contains"), "superni": ("rouge_l", "contains")}


def ttq_config(workdir: Path, task: str, system: str, tiny_model: str | None, epochs: int):
    """The job's config: the shipped recipe's settings for ctxdistill; TRL trains from the same config."""
    if task == "demo":
        from ctxdistill.demo import demo_config

        cfg = job_config(workdir / task, system, tiny_model, 128, 64, epochs or demo_config().train.epochs)
    else:
        cfg = task_config(task, workdir / task / system, tiny_model)
        if system.startswith("trl"):
            cfg.train.epochs = epochs
    if tiny_model:  # a smoke test: small, and f takes whatever a random model writes
        from ctxdistill.config import ExtractorConfig

        cfg.data.n_train, cfg.data.n_eval = 16, 8
        cfg.train.epochs = epochs if system.startswith("trl") else 1
        cfg.task.extractor = ExtractorConfig(kind="regex", pattern="(?s)(.+)")
        cfg.generation.temperature = 1.0  # greedy, a random model writes only newlines after "Output:"
    cfg.eval.batch_size = 32
    return cfg


class Clock:
    """Training wall time from process start (this module's import), with the evaluations taken out."""

    def __init__(self):
        self.t0, self.paused = PROCESS_START, 0.0

    def now(self) -> float:
        return time.perf_counter() - self.t0 - self.paused


def child_ttq(task: str, system: str, cfg) -> dict:
    """Train one system, scoring it before its first step, POINTS_PER_EPOCH times per epoch and at the end;
    the curve excludes the time spent scoring. `phases` is where the fixed costs go: the wall time at which
    the imports, the inputs, the teacher pass and the first step were done."""
    from ctxdistill.core import models
    from ctxdistill.inputs import prepare_inputs
    from ctxdistill.store import load_split

    clock, curve, phases = Clock(), [], {"imports_s": round(Clock().now(), 2)}
    prepare_inputs(cfg)
    rows = load_split(cfg, "eval")  # with their references
    phases["inputs_s"] = round(clock.now(), 2)

    def point(model, tok, step: int) -> None:
        t = clock.now()
        t1 = time.perf_counter()
        curve.append({"wall_s": round(t, 2), "step": step, **score_student(model, tok, cfg, rows, METRICS[task])})
        clock.paused += time.perf_counter() - t1

    if system == "ctxdistill":
        import ctxdistill.train as T
        from ctxdistill.core.student import load_student
        from ctxdistill.teach import teach

        teach(cfg, overwrite=True)
        phases["teacher_pass_s"] = round(clock.now(), 2)
        with scored_training(point, POINTS_PER_EPOCH) as held:
            summary = T.train(cfg, overwrite=True)
        point(load_student(cfg), held["tok"], summary["steps"])  # the saved student (early stopping: its best)
        extra = {"steps": summary["steps"], "early_stop": summary.get("early_stop")}
    else:
        from transformers import TrainerCallback

        class Curve(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kw):
                point(model, tok, 0)

            def on_step_end(self, args, state, control, model=None, **kw):
                if state.global_step % self.every == 0 and state.global_step < state.max_steps:
                    point(model, tok, state.global_step)
        cb = Curve()
        cb.every = max(1, math.ceil(len(load_split(cfg, "train")) / cfg.train.batch_size) // POINTS_PER_EPOCH)
        tok = models.load_tokenizer(cfg.model.name)
        trainer = run_trl(cfg, callbacks=[cb])
        point(trainer.model, tok, trainer.state.global_step)
        extra = {"steps": trainer.state.global_step}
    phases["first_step_s"] = curve[0]["wall_s"]  # the point before the first step
    return {"curve": curve, "final": {k: v for k, v in curve[-1].items() if k not in ("wall_s", "step")},
            "wall_s": curve[-1]["wall_s"], "phases": phases, "peak_rss_mb": round(vm_hwm_mb(), 1), **extra}


def child_reference(task: str, cfg) -> dict:
    """Base (no context) and teacher (with it) on the held-out rows, by the task's metrics."""
    from ctxdistill.core.metrics import SCORERS
    from ctxdistill.evaluate import evaluate

    evaluate(cfg, ["base", "teacher"])
    rows = json_lines(cfg.out / "eval" / "predictions.jsonl")
    return {s: {m: round(sum(SCORERS[m](r[s]["prediction"], r["reference"]) for r in rows) / len(rows), 4)
                for m in METRICS[task]} for s in ("base", "teacher")}


def json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def first_reach(curve: list[dict], metric: str, target: float) -> float | None:
    """The wall time of the first point whose score reaches `target`, or None."""
    return next((p["wall_s"] for p in curve if p[metric] >= target - 1e-9), None)


def ttq_main(a) -> None:
    tasks = [t for t in a.tasks.split(",") if t]
    results: dict = {"tasks": {}, "command": command(), "points_per_epoch": POINTS_PER_EPOCH,
                     "model": "tiny-random-llama" if a.tiny_model else "embedded SmolLM2-135M-Instruct"}
    for task in tasks:
        res = {"reference": spawn_ttq("reference", task, "ctxdistill", 0, a), "systems": {}}
        for system, epochs in [("ctxdistill", 0)] + [(f"trl_sdft_{e}ep", e) for e in a.trl_epochs]:
            print(f"[{task}] {system} ...", file=sys.stderr, flush=True)
            res["systems"][system] = spawn_ttq("ttq", task, system, epochs, a)
            print(f"[{task}] {system}: {res['systems'][system]['wall_s']} s, final {res['systems'][system]['final']}",
                  file=sys.stderr, flush=True)
        trl = {k: v for k, v in res["systems"].items() if k.startswith("trl")}
        # TRL's best epoch count: the best final score on the task metric, then on the next one, then the fastest
        res["trl_best"] = max(trl, key=lambda k: (*(trl[k]["final"][m] for m in METRICS[task]), -trl[k]["wall_s"]))
        res["time_to_95"] = {}
        for m in METRICS[task]:
            target = 0.95 * res["reference"]["teacher"][m]
            ours = first_reach(res["systems"]["ctxdistill"]["curve"], m, target)
            theirs = first_reach(res["systems"][res["trl_best"]]["curve"], m, target)
            any_trl = min((t for t in (first_reach(v["curve"], m, target) for v in trl.values()) if t is not None),
                          default=None)
            res["time_to_95"][m] = {"target": round(target, 4), "ctxdistill_s": ours, "trl_best_epochs_s": theirs,
                                    "trl_fastest_any_epochs_s": any_trl,
                                    "ratio": round(theirs / ours, 2) if ours and theirs else None}
        results["tasks"][task] = res
        print(json.dumps({task: {"reference": res["reference"], "trl_best": res["trl_best"],
                                 "finals": {k: v["final"] for k, v in res["systems"].items()},
                                 "time_to_95": res["time_to_95"]}}, indent=2))
        write_result(results, a.out)  # after every task, so a long run keeps what it finished


def spawn_ttq(stage: str, task: str, system: str, epochs: int, a) -> dict:
    return spawn(f"{stage}:{task}:{system}:{epochs}", a)


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--mode", choices=["time-to-quality", "fixed"], default="time-to-quality")
    ap.add_argument("--tasks", default="demo,superni", help="time to quality: demo, superni")
    ap.add_argument("--trl-epochs", default="1,2,3", help="time to quality: TRL's epoch counts to try")
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

    a.trl_epochs = [int(e) for e in a.trl_epochs.split(",") if e]
    if a.child:
        stage, *rest = a.child.split(":")
        if stage in ("ttq", "reference"):
            task, system, epochs = rest
            cfg = ttq_config(a.workdir, task, system, a.tiny_model, int(epochs))
            res = child_ttq(task, system, cfg) if stage == "ttq" else child_reference(task, cfg)
        else:
            way = rest[0]
            cfg = job_config(a.workdir, way, a.tiny_model, a.n_train, a.n_eval, a.epochs)
            res = child_train(way, cfg) if stage == "train" else child_eval(way, cfg, way == "ctxdistill_offline")
        Path(a.child_out).write_text(json.dumps(res))
        return

    if a.tiny:
        from ctxdistill.core.models import tiny_random_llama

        a.n_train, a.n_eval, a.epochs = 16, 8, 1
        a.trl_epochs = [1]
        a.tiny_model = str(tiny_random_llama(a.workdir / "tiny-model", max_position_embeddings=1024))
    if a.mode == "time-to-quality":
        ttq_main(a)
        return
    ways = [w for w in a.ways.split(",") if w]
    results: dict = {}
    for way in ways:
        print(f"[{way}] training ...", file=sys.stderr, flush=True)
        results[way] = spawn_fixed("train", way, a)
        print(f"[{way}] {results[way]['wall_s']} s, peak RSS {results[way]['peak_rss_mb']} MB; evaluating ...",
              file=sys.stderr, flush=True)
        ev = spawn_fixed("eval", way, a)
        results[way].update(score=ev["scores_exact"]["student"], score_contains=ev["scores_contains"]["student"],
                            examples=ev["examples"])
        if way == "ctxdistill_offline":
            results["reference_systems"] = {"exact": ev["scores_exact"], "contains": ev["scores_contains"]}
    results.update(n_train=a.n_train, n_eval=a.n_eval, epochs=a.epochs,
                   model="tiny-random-llama" if a.tiny_model else "embedded SmolLM2-135M-Instruct")

    print(f"\n{'way':<22} {'wall s':>8} {'peak RSS MB':>12} {'exact':>7} {'contains':>9}")
    for way in ways:
        r = results[way]
        print(f"{way:<22} {r['wall_s']:>8.1f} {r['peak_rss_mb']:>12.0f} {r['score']:>7.3f} {r['score_contains']:>9.3f}")
    if "trl_sdft" in results:
        for way in ways:
            if way != "trl_sdft":
                print(f"{way}: {results['trl_sdft']['wall_s'] / results[way]['wall_s']:.2f}x faster than trl_sdft")
    write_result(results, a.out)


if __name__ == "__main__":
    main()
