"""Stage 5, report: report.json (for scripts), report.md (for people), report.png (a bar chart)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from ctxdistill.config import Config
from ctxdistill.files import write_atomic

LABELS = {"base": "base, no context", "teacher": "teacher, with context", "student": "student, no context"}


def commands_log(out: Path) -> list[str]:
    f = out / "commands.txt"
    return f.read_text().splitlines() if f.is_file() else []


def build(cfg: Config, scores: dict, dropped: dict, prompt_tokens: dict, n_eval: int) -> dict:
    """The report dict; `scores` are in [0, 1]. Teach-stage drops are included when a store exists."""
    teach = {}
    mf = cfg.out / "teacher" / "manifest.json"
    if mf.is_file():
        m = json.loads(mf.read_text())
        teach = {"n_inputs": m["n_inputs"], "n_examples": m["n_examples"], "dropped": m["dropped"],
                 "extract_fail_rate": m["extract_fail_rate"], "teacher_mean_answer_prob": m["teacher_mean_answer_prob"]}
    rep = {
        "task": cfg.task.name, "metric": cfg.task.scorer, "n_eval": n_eval,
        "scores": {k: round(v, 4) for k, v in scores.items()},
        "dropped": {**{f"teach: {k}": v for k, v in teach.get("dropped", {}).items()}, **{k: v for k, v in dropped.items() if v}},
        "teach": teach,
        "prompt_tokens_mean": {k: round(v, 1) for k, v in prompt_tokens.items()},
        "model": cfg.model.name,
        "commands": commands_log(cfg.out),
    }
    if "teacher" in scores and "student" in scores and scores["teacher"] > 0:
        rep["student_over_teacher"] = round(scores["student"] / scores["teacher"], 3)
    if "teacher" in prompt_tokens and "student" in prompt_tokens:
        rep["inference_token_saving"] = round(prompt_tokens["teacher"] / prompt_tokens["student"], 2)
    return rep


def markdown(rep: dict) -> str:
    lines = [f"# {rep['task']}: context distillation", "",
             f"Metric: {rep['metric']} on {rep['n_eval']} held-out inputs. Model: {rep['model']}.", "",
             "| system | score | mean prompt tokens |", "|---|---|---|"]
    for k, v in rep["scores"].items():
        lines.append(f"| {LABELS.get(k, k)} | {100 * v:.1f}% | {rep['prompt_tokens_mean'].get(k, '')} |")
    lines.append("")
    if "student_over_teacher" in rep:
        lines.append(f"Student / teacher: {rep['student_over_teacher']:.2f}.")
    if "inference_token_saving" in rep:
        lines.append(f"Prompt tokens saved at inference: {rep['inference_token_saving']:.1f}x.")
    if rep.get("teach"):
        t = rep["teach"]
        lines.append(f"Teacher pass: {t['n_examples']} examples from {t['n_inputs']} inputs; "
                     f"teacher mean p(answer token) = {t['teacher_mean_answer_prob']:.3f}; "
                     f"extractor failure rate {100 * t['extract_fail_rate']:.1f}%.")
    if rep["dropped"]:
        lines += ["", "Dropped or failed:", ""] + [f"- {k}: {v}" for k, v in rep["dropped"].items()]
    if rep["commands"]:
        lines += ["", "Commands:", "", "```"] + rep["commands"] + ["```"]
    return "\n".join(lines) + "\n"


def plot(rep: dict, path: Path) -> bool:
    """A bar chart of the scores; skipped (False) when matplotlib is not installed (`pip install ctxdistill[plot]`)."""
    if importlib.util.find_spec("matplotlib") is None:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rep["scores"])
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    bars = ax.bar([LABELS.get(n, n) for n in names], [100 * rep["scores"][n] for n in names],
                  color=["#9e9e9e", "#1f77b4", "#2ca02c"][:len(names)])
    ax.bar_label(bars, fmt="%.1f")
    ax.set_ylabel(f"{rep['metric']} (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{rep['task']} (n={rep['n_eval']})")
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    tmp = path.with_name("." + path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return True


def write(out: Path, rep: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "report.json", json.dumps(rep, indent=2, ensure_ascii=False))
    write_atomic(out / "report.md", markdown(rep))
    plot(rep, out / "report.png")


def print_table(rep: dict) -> None:
    """The before/after table on the terminal (stdout)."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{rep['task']}: {rep['metric']} on {rep['n_eval']} held-out inputs")
    t.add_column("system")
    t.add_column("score", justify="right")
    t.add_column("prompt tokens", justify="right")
    for k, v in rep["scores"].items():
        t.add_row(LABELS.get(k, k), f"{100 * v:.1f}%", str(rep["prompt_tokens_mean"].get(k, "")))
    Console().print(t)
    if "student_over_teacher" in rep:
        Console().print(f"student / teacher = {rep['student_over_teacher']:.2f}")
