"""Internalising step-by-step reasoning (paper §4.3, H6, Table 3): a recipe with `[experiment] kind = "scratchpad"`.

Addition of two 1..max_digits-digit numbers (tasks/addition.py). Every system below starts from the
recipe's [model] (the initial weights) and is trained on the same n_labelled labelled problems:
  teacher (scratchpad)  `train --sft` on their scratchpad solutions under the teacher template (an
                        instruction to work column by column); it writes the carries, then "Answer: <sum>"
  student before        the initial weights answering the bare question directly
  student after         context distillation: the teacher's scratchpads for n_train unlabelled problems are
                        generated, f (marker "Answer:") keeps the sum (a scratchpad that never reaches an
                        answer is dropped and counted), and the student, from the initial weights, learns the
                        teacher's distribution over the sum's tokens from the bare question
  Sc->Dir               the teacher fine-tuned further on the labelled problems' direct answers
  Sc+Dir                the initial weights fine-tuned on both at once (scratchpads under the teacher
                        template, direct answers under the student template, shuffled together)
Direct answers are scored on their first line, the teacher on what f extracts; eval problems are disjoint
from every training set. Tokens per answer count the completion (EOS not counted). Transfer: the demo
task (country -> capital, the demo's prompt and f) scored with the initial weights and the distilled student.

Writes `<out>/report.json` and `report.md`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from ctxdistill.config import _check, _f, _int_min, config_from_dict
from ctxdistill.core.progress import log

INSTRUCTION = "Add the two numbers column by column, right to left, writing each carry. Then give the answer."
PAPER = {"teacher (scratchpad)": 0.93, "student before": 0.0, "student after": 0.95, "Sc->Dir": 0.72, "Sc+Dir": 0.61}
MAX_DIGITS = 64


@dataclass(kw_only=True)
class ScratchpadConfig:
    kind: str = _f(dataclasses.MISSING, "scratchpad")
    max_digits: int = _f(8, "Operands have 1..max_digits digits (1..64; the paper: 8).")
    n_labelled: int = _f(500, "Labelled problems: the teacher's scratchpad fine-tuning and both baselines (the paper: 500).")
    n_train: int = _f(2000, "Unlabelled problems the teacher solves for distillation.")
    n_eval: int = _f(2000, "Held-out problems (at least 2,000 for the reported table).")
    seed: int = _f(0, "Problem sampling seed.")
    sft_epochs: int = _f(0, "Epochs of the fine-tuning runs (teacher, Sc->Dir, Sc+Dir); 0 = [train].epochs.")
    n_transfer: int = _f(60, "Demo-task eval inputs for the transfer check (0 = skip).")

    def __post_init__(self) -> None:
        _check(self.kind == "scratchpad", "experiment.kind", "must be 'scratchpad'")
        _check(isinstance(self.max_digits, int) and 1 <= self.max_digits <= MAX_DIGITS, "experiment.max_digits",
               f"must be an integer in 1..{MAX_DIGITS}, got {self.max_digits!r}")
        for name in ("n_labelled", "n_train", "n_eval"):
            _int_min(getattr(self, name), f"experiment.{name}", 1)
        _int_min(self.sft_epochs, "experiment.sft_epochs", 0)
        _int_min(self.n_transfer, "experiment.n_transfer", 0)


# --quick: one-digit problems on the tiny model; the teacher's fine-tuning runs long enough that its
# completions reach "Answer:" (so distillation has examples), the rest at test scale.
QUICK = {"max_digits": 1, "n_labelled": 8, "n_train": 8, "n_eval": 8, "sft_epochs": 100, "epochs": 1, "n_transfer": 4}


def tokens_for(max_digits: int) -> int:
    """max_new_tokens a scratchpad of max_digits columns needs: at most 33 SmolLM2 tokens a column
    (measured: the longest of 2,000 3-digit scratchpads is 98 tokens, of 8-digit ones 297), with room."""
    return 34 * (max_digits + 1) + 8


def _config(raw: dict, base_dir: Path, out: Path, name: str, model: str, init: str, data: Path):
    cfg_raw = {**raw, "out_dir": str(out / name), "model": {**raw.get("model", {}), "name": model},
               "train": {**raw.get("train", {}), "init": init},
               "task": {"name": "addition", "teacher": "{input}", "teacher_system": INSTRUCTION, "student": "{input}",
                        "extractor": {"kind": "marker", "marker": "Answer:"}, "scorer": "exact"},
               "data": {"train": str(data / "train.jsonl"), "eval": str(data / "eval.jsonl")}}
    return config_from_dict(cfg_raw, base_dir)


def _predict(model, tok, cfg, rows: list[dict], teacher: bool, desc: str) -> dict:
    """Accuracy and mean completion tokens: the teacher through f, a direct answer on its first line."""
    from ctxdistill.evaluate import predict
    from ctxdistill.core.extract import answer_text
    from ctxdistill.core.extract import first_line
    from ctxdistill.tasks import addition
    from ctxdistill.core.templates import encode, student_template, teacher_template

    tpl = teacher_template(cfg.task) if teacher else student_template(cfg.task)
    texts, _ = predict(model, tok, tpl, rows, cfg, desc)
    correct, no_answer = 0.0, 0
    for t, r in zip(texts, rows):
        ans = answer_text(cfg.task.extractor, t) if teacher else first_line(t)
        no_answer += ans is None
        correct += addition.score(ans or "", r["reference"])
    n = len(rows)
    return {"accuracy": correct / n, "tokens_per_answer": sum(len(encode(tok, t)) for t in texts) / n,
            "no_answer": no_answer, "n": n, "examples": [{"input": r["input"], "output": t} for r, t in zip(rows[:3], texts)]}


def _transfer(model, tok, out: Path, n: int) -> float:
    """The demo task's prompted score (its teacher template and f; exact match) for `model`."""
    from ctxdistill.demo import demo_config
    from ctxdistill.core.metrics import SCORERS
    from ctxdistill.evaluate import predict
    from ctxdistill.core.extract import answer_text
    from ctxdistill.inputs import prepare_inputs
    from ctxdistill.store import load_split
    from ctxdistill.core.templates import teacher_template

    cfg = demo_config(str(out / "transfer"))
    cfg.data.n_eval = n
    prepare_inputs(cfg)
    rows = load_split(cfg, "eval")
    texts, _ = predict(model, tok, teacher_template(cfg.task), rows, cfg, "eval: transfer (demo task)")
    exact = SCORERS[cfg.task.scorer]
    return sum(exact(answer_text(cfg.task.extractor, t) or "", r["reference"]) for t, r in zip(texts, rows)) / len(rows)


def load_recipe(path: Path, raw: dict) -> ScratchpadConfig:
    from ctxdistill.experiments.examples import load_recipe as load

    return load(path, raw, ScratchpadConfig)


def run_scratchpad(path: Path, raw: dict, argv: list[str], quick: bool, out_dir: str | None) -> dict:
    """Run a scratchpad recipe (module docstring); write and return the report."""
    from ctxdistill.core import models
    from ctxdistill.baseline import sft_model
    from ctxdistill.core.files import write_atomic, write_jsonl
    from ctxdistill.inputs import prepare_inputs
    from ctxdistill.tasks import addition
    from ctxdistill.teach import teach
    from ctxdistill.train import train
    from ctxdistill.core.student import load_student

    exp = load_recipe(path, raw)
    if quick:
        for k in ("max_digits", "n_labelled", "n_train", "n_eval", "sft_epochs", "n_transfer"):
            setattr(exp, k, QUICK[k])
        raw.setdefault("train", {})["epochs"] = QUICK["epochs"]
    for sec in ("generation", "eval"):  # room for a whole scratchpad (the students stop at EOS)
        raw.setdefault(sec, {}).setdefault("max_new_tokens", tokens_for(exp.max_digits))
    base_dir = path.parent
    out = Path(out_dir or raw.get("out_dir", f"runs/{path.stem}"))
    out = (out if out.is_absolute() else base_dir / out).resolve()
    initial = raw.get("model", {}).get("name", models.EMBEDDED)
    if initial != models.EMBEDDED:
        initial = str((base_dir / initial).resolve()) if (base_dir / initial).exists() else initial

    labelled, train_rows, evals = addition.split(exp.n_labelled, exp.n_train, exp.n_eval,
                                                 max_digits=exp.max_digits, seed=exp.seed)
    data = out / "data"
    write_jsonl(data / "train.jsonl", train_rows)
    write_jsonl(data / "eval.jsonl", [{k: r[k] for k in ("id", "input", "reference")} for r in evals])
    scratch = [{"id": r["id"], "input": r["input"], "reference": [addition.scratchpad(r["a"], r["b"])]} for r in labelled]
    direct = [{"id": r["id"], "input": r["input"], "reference": r["reference"]} for r in labelled]
    write_jsonl(data / "labelled_scratchpad.jsonl", scratch)
    write_jsonl(data / "labelled_direct.jsonl", direct)

    sft_raw = {**raw, "train": {**raw.get("train", {}), **({"epochs": exp.sft_epochs} if exp.sft_epochs else {})}}
    prep = _config(sft_raw, base_dir, out, "teacher_sft", initial, "", data)
    log(f"experiment: teacher: fine-tune on {len(scratch)} scratchpad solutions")
    teacher_dir = out / "teacher_sft" / "model"
    sft_summary = {"teacher": sft_model(prep, [("teacher", scratch)], teacher_dir)}
    cfg = _config(raw, base_dir, out, "distil", str(teacher_dir), initial, data)

    log(f"experiment: distil the teacher's scratchpads on {len(train_rows)} problems into direct answers")
    prepare_inputs(cfg)
    manifest = teach(cfg)
    summary = train(cfg)
    log("experiment: baselines on the same labelled problems")
    sc_dir = out / "sc_to_dir" / "model"
    sft_summary["Sc->Dir"] = sft_model(_config(sft_raw, base_dir, out, "sc_to_dir", initial, str(teacher_dir), data),
                                       [("student", direct)], sc_dir)
    sc_plus = out / "sc_plus_dir" / "model"
    sft_summary["Sc+Dir"] = sft_model(_config(sft_raw, base_dir, out, "sc_plus_dir", initial, "", data),
                                      [("teacher", scratch), ("student", direct)], sc_plus)

    tok = models.load_tokenizer(cfg.model.name)
    rows: dict[str, dict] = {}
    rows["teacher (scratchpad)"] = _predict(models.load_model(cfg.model), tok, cfg, evals, True, "eval: teacher")
    direct_cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, max_new_tokens=exp.max_digits + 8))
    initial_model = models.load_model(dataclasses.replace(cfg.model, name=initial))
    rows["student before"] = _predict(initial_model, tok, direct_cfg, evals, False, "eval: student before")
    student = load_student(cfg)
    rows["student after"] = _predict(student, tok, direct_cfg, evals, False, "eval: student after")
    for name, d in (("Sc->Dir", sc_dir), ("Sc+Dir", sc_plus)):
        rows[name] = _predict(models.load_model(dataclasses.replace(cfg.model, name=str(d))), tok, direct_cfg, evals,
                              False, f"eval: {name}")
    transfer = None
    if exp.n_transfer:
        transfer = {"task": "demo (country -> capital, prompted, f, exact)", "n": exp.n_transfer,
                    "before": _transfer(initial_model, tok, out, exp.n_transfer),
                    "after": _transfer(student, tok, out, exp.n_transfer)}
    t, s = rows["teacher (scratchpad)"], rows["student after"]
    report = {
        "kind": "scratchpad", "quick": quick, "experiment": dataclasses.asdict(exp), "command": "ctxdistill " + " ".join(argv),
        "model": initial, "metric": "accuracy",
        "table": [{"system": k, "accuracy": v["accuracy"], "tokens_per_answer": round(v["tokens_per_answer"], 2),
                   "no_answer": v["no_answer"], "paper": PAPER[k]} for k, v in rows.items()],
        "token_ratio": round(t["tokens_per_answer"] / max(s["tokens_per_answer"], 1e-9), 2),
        "targets": {"student >= 0.9 x teacher": s["accuracy"] >= 0.9 * t["accuracy"],
                    "student > Sc->Dir and Sc+Dir": s["accuracy"] > max(rows["Sc->Dir"]["accuracy"], rows["Sc+Dir"]["accuracy"])},
        "teacher_pass": {"n_inputs": manifest["n_inputs"], "kept": manifest["n_examples"], "dropped": manifest["dropped"],
                         "teacher_mean_answer_prob": manifest.get("teacher_mean_answer_prob")},
        "training": {"student": {k: summary[k] for k in ("n_examples", "steps", "seconds", "first_loss", "final_loss")},
                     **{k: {f: v[f] for f in ("n_examples", "steps", "seconds", "first_loss", "final_loss")}
                        for k, v in sft_summary.items()}},
        "transfer": transfer, "samples": {k: v["examples"] for k, v in rows.items()},
        "n_eval": len(evals), "n_labelled": len(labelled), "n_train": len(train_rows),
    }
    write_atomic(out / "report.json", json.dumps(report, indent=2, ensure_ascii=False))
    write_atomic(out / "report.md", markdown(report))
    return report


def markdown(rep: dict) -> str:
    lines = [f"# scratchpad: {rep['experiment']['max_digits']}-digit addition ({rep['n_eval']} eval problems)", "",
             f"`{rep['command']}`", "", "| | accuracy | tokens per answer | paper |", "|---|---|---|---|"]
    lines += [f"| {r['system']} | {r['accuracy']:.3f} | {r['tokens_per_answer']:.1f} | {r['paper']:.2f} |" for r in rep["table"]]
    tp = rep["teacher_pass"]
    lines += ["", f"Teacher tokens ÷ student tokens per answer: {rep['token_ratio']}x (paper: 8x). "
                  f"Teacher pass: kept {tp['kept']}/{tp['n_inputs']}, dropped {tp['dropped'] or 0}."]
    if rep["transfer"]:
        tr = rep["transfer"]
        lines.append(f"Transfer ({tr['task']}, {tr['n']} inputs): before {tr['before']:.3f}, after {tr['after']:.3f}.")
    return "\n".join(lines) + "\n"
