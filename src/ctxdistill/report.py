"""Stage 5, report: report.json (for scripts), report.md (for people), report.png (a bar chart)."""

from __future__ import annotations

import importlib.util
import json
import textwrap
from pathlib import Path

from ctxdistill.config import Config
from ctxdistill.core.files import write_atomic

LABELS = {"base": "base, no context", "teacher": "teacher, with context", "student": "student, no context"}


def commands_log(out: Path) -> list[str]:
    f = out / "commands.txt"
    return f.read_text().splitlines() if f.is_file() else []


def build(cfg: Config, scores: dict, dropped: dict, prompt_tokens: dict, n_eval: int, checks: dict | None = None,
          fidelity: dict | None = None, facts: dict | None = None, intervals: dict | None = None) -> dict:
    """The report dict; `scores` (the reference metric, empty without references) and `checks` ({name:
    {system: pass rate}}) are in [0, 1]; `fidelity` comes from fidelity.py, `facts` (closed-book fact recall)
    and `intervals` (95% bootstrap intervals of every score) from evaluate.py. Teach-stage drops are included
    when a store exists."""
    teach = {}
    mf = cfg.out / "teacher" / "manifest.json"
    if mf.is_file():
        m = json.loads(mf.read_text())
        teach = {"n_inputs": m["n_inputs"], "n_examples": m["n_examples"], "dropped": m["dropped"],
                 "extract_fail_rate": m["extract_fail_rate"], "teacher_mean_answer_prob": m["teacher_mean_answer_prob"],
                 **({"selection": m["selection"]} if m.get("selection") else {})}
    inputs = {}
    st = cfg.out / "inputs" / "stats.json"
    if st.is_file():
        s = json.loads(st.read_text())
        inputs = {"n_train": s["n_train"], "n_eval": s["n_eval"], **({"synth": s["synth"]} if "synth" in s else {}),
                  **({"train_equal_to_a_fact_question": s["train_equal_to_a_fact_question"]}
                     if "train_equal_to_a_fact_question" in s else {})}
    fid_dropped = {f"fidelity: {k}": v for k, v in (fidelity or {}).get("dropped", {}).items()}
    rep = {
        "task": cfg.task.name, "metric": cfg.task.scorer, "n_eval": n_eval,
        "scores": {k: round(v, 4) for k, v in scores.items()},
        "checks": checks or {},
        "facts": facts or {},
        "fidelity": fidelity or {},
        "intervals": intervals or {},
        "dropped": {**{f"teach: {k}": v for k, v in teach.get("dropped", {}).items()},
                    **{k: v for k, v in {**dropped, **fid_dropped}.items() if v}},
        "inputs": inputs,
        "teach": teach,
        "prompt_tokens_mean": {k: round(v, 1) for k, v in prompt_tokens.items()},
        "model": cfg.model.name,
        "commands": commands_log(cfg.out),
    }
    if "teacher" in scores and "student" in scores and scores["teacher"] > 0:
        rep["student_over_teacher"] = round(scores["student"] / scores["teacher"], 3)
    for name, by in rep["checks"].items():
        if by.get("teacher"):
            rep.setdefault("checks_student_over_teacher", {})[name] = round(by.get("student", 0) / by["teacher"], 3)
    recall = (facts or {}).get("recall", {})
    if recall.get("teacher") and "student" in recall:
        rep["facts_student_over_teacher"] = round(recall["student"] / recall["teacher"], 3)
    if "teacher" in prompt_tokens and "student" in prompt_tokens:
        rep["inference_token_saving"] = round(prompt_tokens["teacher"] / prompt_tokens["student"], 2)
    return rep


def _fmt_pct(v, interval: list | None = None, short: bool = False) -> str:
    """A share as a percentage, with its 95% interval when known: '85.4% (75-94)', or on the terminal
    (`short`) the interval under the value, '85.4%\n75-94'."""
    if v is None:
        return ""
    if not interval:
        return f"{100 * v:.1f}%"
    return _with_interval(f"{100 * v:.1f}%", f"{100 * interval[0]:.0f}", f"{100 * interval[1]:.0f}", short)


def _with_interval(value: str, lo: str, hi: str, short: bool) -> str:
    """'value (lo-hi)', or on the terminal (`short`) the interval on a line under the value."""
    return f"{value}\n{lo}-{hi}" if short else f"{value} ({lo}-{hi})"


def table_rows(rep: dict, short: bool = False) -> tuple[list[str], list[list[str]]]:
    """The before/after table, one row per system: the reference score, each check, the fidelity columns
    (KL to the teacher, agreement with it) and the prompt tokens. Shared by report.md and the terminal (`short`:
    the bare system names, to fit 80 columns)."""
    systems = [s for s in ("base", "teacher", "student") if s in rep["prompt_tokens_mean"]]
    fid = rep.get("fidelity") or {}
    ci = rep.get("intervals") or {}
    def _pct(v, interval=None):  # on the terminal the interval goes under the value: the table fits 80 columns
        return _fmt_pct(v, interval, short)
    head = ["system"]
    cols = []
    if rep["scores"]:
        head.append(f"{rep['metric']} (reference)")
        cols.append(lambda s: _pct(rep["scores"].get(s), ci.get("scores", {}).get(s)))
    for label, (name, by) in zip(check_labels(rep), rep.get("checks", {}).items()):
        head.append(label)
        cols.append(lambda s, by=by, name=name: _pct(by.get(s), ci.get("checks", {}).get(name, {}).get(s)))
    facts = rep.get("facts") or {}
    if facts:
        head.append("fact recall")
        cols.append(lambda s: _pct(facts["recall"].get(s), ci.get("facts", {}).get(s)))
    if fid:
        # the terminal leaves out exact agreement (0 for any reply longer than a few words; report.md has it)
        agreement = ("rouge_l",) if short else ("exact", "rouge_l")
        head += ["KL to teacher"] + [{"exact": "exact = teacher", "rouge_l": "ROUGE-L vs teacher"}[m] for m in agreement]
        kl_ci = ci.get("kl", {})
        def kl(s: str) -> str:
            if s == "teacher":
                return "-"
            if s not in kl_ci:
                return f"{fid['kl'][s]:.3f}"
            lo, hi = (f"{x:.2f}".removeprefix("0") if short else f"{x:.2f}" for x in kl_ci[s])  # '.47' on the terminal
            return _with_interval(f"{fid['kl'][s]:.3f}", lo, hi, short)
        cols.append(kl)
        for m in agreement:
            cols.append(lambda s, m=m: "-" if s == "teacher" else
                        _pct(fid["agreement"][s][m], ci.get("agreement", {}).get(s, {}).get(m)))
    head.append("prompt tokens")
    cols.append(lambda s: str(rep["prompt_tokens_mean"].get(s, "")))
    return head, [[s if short else LABELS.get(s, s)] + [c(s) for c in cols] for s in systems]


def check_labels(rep: dict) -> list[str]:
    """Column labels of the checks, "check N" (names can be long regexes); the lines under the table name them."""
    return [f"check {i}" for i in range(1, len(rep.get("checks", {})) + 1)]


def summary_lines(rep: dict) -> list[str]:
    """One-line facts under the table (the checks' legend and ratios, cost, the teacher pass's health)."""
    lines = []
    ci = rep.get("intervals") or {}
    ratio_ci = ci.get("student_over_teacher", {})

    def between(iv) -> str:
        return f", 95% interval {iv[0]:.2f}-{iv[1]:.2f}" if iv else ""
    if ci:
        lines.append("Ranges: 95% bootstrap intervals over the held-out inputs (KL: over the teacher's answers).")
    if "student_over_teacher" in rep:
        lines.append(f"Student / teacher ({rep['metric']}): {rep['student_over_teacher']:.2f}.")
    ratios = rep.get("checks_student_over_teacher", {})
    for label, name in zip(check_labels(rep), rep.get("checks", {})):
        ratio = (f"student / teacher {ratios[name]:.2f}{between(ratio_ci.get('checks', {}).get(name))}"
                 if name in ratios else "the teacher passes none")
        lines.append(f"{label}: {name} ({ratio}).")
    facts = rep.get("facts") or {}
    if facts:
        r = facts["recall"]
        verdict = ""
        if "facts_student_over_teacher" in rep:
            verdict = f"; student / teacher {rep['facts_student_over_teacher']:.2f}{between(ratio_ci.get('facts'))}"
            if r["student"] > r["teacher"]:
                verdict += ": the student states the facts more often than the prompted model it learned from"
        lines.append(f"Fact recall: {facts['n_questions']} closed-book questions on {facts['n_facts']} facts of the "
                     f"context, answered right when the reply holds an accepted answer{verdict}.")
    fid = rep.get("fidelity") or {}
    if fid:
        closed = fid["kl_gap_closed"]
        gap_ci = ci.get("kl_gap_closed")
        lines.append(f"KL gap closed: {'n/a' if closed is None else f'{closed:.2f}'}"
                     + (f" ({gap_ci[0]:.2f}-{gap_ci[1]:.2f})" if gap_ci else "") + " (1 - KL student / KL base; KL to "
                     f"teacher is the mean per-token KL(teacher with context || model without) over "
                     f"{fid['answer_tokens']} tokens of {fid['n_answers']} teacher answers sampled at temperature "
                     f"{fid['temperature']} on {fid['n_inputs']} held-out inputs; 'exact = / ROUGE-L vs teacher': "
                     "greedy replies against the teacher's).")
        c = fid["cost"]
        lines.append(f"Prompt tokens per request: {c['prompt_tokens']['teacher']} with the context, "
                     f"{c['prompt_tokens']['student']} without ({c['prompt_token_ratio']:.1f}x fewer); prompt latency "
                     f"{c['latency_ms']['teacher']:.0f} ms vs {c['latency_ms']['student']:.0f} ms at batch 1 "
                     f"({c['latency_saved_ms']:.0f} ms saved, {c['latency_ratio']:.1f}x; median of "
                     f"{c['latency_inputs']}, no prompt cache).")
    elif "inference_token_saving" in rep:
        lines.append(f"Prompt tokens saved at inference: {rep['inference_token_saving']:.1f}x.")
    if rep.get("teach"):
        t = rep["teach"]
        lines.append(f"Teacher pass: {t['n_examples']} examples from {t['n_inputs']} inputs; "
                     f"teacher mean p(answer token) = {t['teacher_mean_answer_prob']:.3f}; "
                     f"extractor failure rate {100 * t['extract_fail_rate']:.1f}%.")
        sel = t.get("selection")
        if sel:
            rates = ", ".join(f"{k} {100 * sel['pass_rate_before'][k]:.0f}% -> {100 * sel['pass_rate_after'].get(k, 0):.0f}%"
                              for k in sel["pass_rate_before"])
            lines.append(f"Teacher samples: the best of {sel['samples']} candidates kept for each ({sel['kept']} of "
                         f"{sel['candidates']}, by {' + '.join(sel['rules'])}); pass rates, all candidates -> kept: {rates}.")
    syn = rep.get("inputs", {}).get("synth")
    if syn:
        kinds = (f" {syn['rule_built']} built from the context's sentences, by kind "
                 + ", ".join(f"{k} {v}" for k, v in syn["by_kind"].items())
                 + f", over {len(syn['passages'])} passages;") if syn.get("by_kind") else ""
        lines.append(f"Inputs synthesised ({syn.get('prompt', 'seeds')}): {syn['accepted']} accepted, "
                     f"{syn['accepted'] - syn.get('rule_built', 0)} of {syn['generated']} model generations "
                     f"({syn['duplicates']} duplicates, rejected {syn['rejected'] or 0}, {syn.get('unused', 0)} not "
                     f"needed);{kinds} {rep['inputs']['n_train']} train, {rep['inputs']['n_eval']} held out.")
    return lines


def markdown(rep: dict) -> str:
    what = f"Metric: {rep['metric']}" if rep["scores"] else "No references: reference-free scores only"
    lines = [f"# {rep['task']}: context distillation", "",
             f"{what}, on {rep['n_eval']} held-out inputs. Model: {rep['model']}.", ""]
    head, rows = table_rows(rep)
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += [""] + summary_lines(rep)
    if rep["dropped"]:
        lines += ["", "Dropped or failed:", ""] + [f"- {k}: {v}" for k, v in rep["dropped"].items()]
    if rep["commands"]:
        lines += ["", "Commands:", "", "```"] + rep["commands"] + ["```"]
    return "\n".join(lines) + "\n"


def plot(rep: dict, path: Path) -> bool:
    """Grouped bars, one group per score (reference metric, checks, agreement with the teacher), one bar per
    system; skipped (False) when matplotlib is not installed (`pip install ctxdistill[plot]`)."""
    if importlib.util.find_spec("matplotlib") is None:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ci = rep.get("intervals") or {}
    groups: dict[str, dict] = {}
    spans: dict[str, dict] = {}  # group -> {system: [low, high]}: the 95% intervals, drawn as error bars
    if rep["scores"]:
        groups[rep["metric"]], spans[rep["metric"]] = rep["scores"], ci.get("scores", {})
    for label, (name, by) in zip(check_labels(rep), rep.get("checks", {}).items()):
        groups[label], spans[label] = by, ci.get("checks", {}).get(name, {})
    if rep.get("facts"):
        groups["fact recall\n(closed book)"] = rep["facts"]["recall"]
        spans["fact recall\n(closed book)"] = ci.get("facts", {})
    fid = rep.get("fidelity") or {}
    if fid:
        label = "agrees with teacher\n(ROUGE-L)"
        groups[label] = {s: fid["agreement"][s]["rouge_l"] for s in ("base", "student")}
        spans[label] = {s: v["rouge_l"] for s, v in ci.get("agreement", {}).items()}
    if not groups:
        return False
    systems = [s for s in ("base", "teacher", "student") if any(s in g for g in groups.values())]
    colors = {"base": "#9e9e9e", "teacher": "#1f77b4", "student": "#2ca02c"}
    fig, ax = plt.subplots(figsize=(max(5, 1.8 * len(groups) + 2), 3.4), dpi=120)
    width = 0.8 / len(systems)
    for j, sysname in enumerate(systems):
        xs = [i + (j - (len(systems) - 1) / 2) * width for i, g in enumerate(groups.values()) if sysname in g]
        ys = [100 * g[sysname] for g in groups.values() if sysname in g]
        ivs = [spans.get(k, {}).get(sysname) for k, g in groups.items() if sysname in g]
        err = None
        if all(ivs):  # asymmetric error bars from the bootstrap interval
            err = [[y - 100 * iv[0] for y, iv in zip(ys, ivs)], [100 * iv[1] - y for y, iv in zip(ys, ivs)]]
            err = [[max(0.0, e) for e in row] for row in err]
        bars = ax.bar(xs, ys, width, label=LABELS.get(sysname, sysname), color=colors[sysname], yerr=err,
                      error_kw={"elinewidth": 0.8, "capsize": 2, "ecolor": "#444444"})
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(groups)), [textwrap.fill(g, 22) for g in groups], fontsize=8)
    ax.set_ylabel("%")
    ax.set_ylim(0, 125)  # room above the bars for the legend
    ax.set_yticks(range(0, 101, 20))
    title = f"{rep['task']} (n={rep['n_eval']})"
    if fid and fid.get("kl_gap_closed") is not None:
        title += f"; KL gap closed {fid['kl_gap_closed']:.2f}"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper center", ncol=len(systems), frameon=False)
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
    """The before/after table on the terminal (stdout), and the summary lines under it."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    what = f"{rep['metric']} and fidelity" if rep["scores"] else "reference-free fidelity"
    t = Table(title=f"{rep['task']}: {what} on {rep['n_eval']} held-out inputs",
              caption="base and student without the context, teacher with it")
    head, rows = table_rows(rep, short=True)
    for i, h in enumerate(head):
        t.add_column(h, justify="left" if i == 0 else "right", no_wrap=i == 0)
    for r in rows:
        t.add_row(*(Text(c) for c in r))  # cells as plain text: a check's regex may hold [brackets]
    console = Console()
    console.print(t)
    for line in summary_lines(rep):
        console.print(line, highlight=False, markup=False)
