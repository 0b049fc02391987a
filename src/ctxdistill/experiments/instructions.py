"""The paper's Super-NaturalInstructions experiments (H1-H3): internalising instructions, explanations,
and overwriting what an instruction means. A recipe's `[experiment] kind` picks one:

  superni_instructions (H1)  per Super-NaturalInstructions task: base without context, teacher with the
                             definition + k positive + k negative examples, student before and after
                             distillation; averages; inference-token saving (teacher ÷ student prompt).
  superni_explanations (H2)  per task, the same run twice, the teacher's examples without and with their
                             explanations (the student never sees them): the in-context gain from
                             explanations (teacher with - without) against the distilled gain (student
                             after, with - without), and their Pearson correlation over tasks.
  superni_overwrite (H3)     tasks behind ids ("Task 1" ...): the student sees the id and the input, the
                             teacher also the task's instructions. All ids are distilled simultaneously;
                             then the ids are shuffled (every id gets another task) and the new meanings
                             are distilled sequentially from that student, naive (stage k's inputs come
                             from id k's new task) or mixed (from every task). Correct: id k on its new
                             task's inputs against their references; Wrong: id k on its old task's inputs
                             against the old references, i.e. still following the old meaning.

Every experiment writes `<out>/report.json` (its tables, scores in [0, 1], and the command) and
`<out>/report.md`; each task's own artefacts are under `<out>/<task>/`.
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from ctxdistill.config import _build, _check, _f, _int_min, config_from_dict
from ctxdistill.core.errors import UserError
from ctxdistill.core.extract import FIRST_LINE
from ctxdistill.core.progress import log, warn


KINDS = ("superni_instructions", "superni_explanations", "superni_overwrite")  # "examples": examples.py; "scratchpad": scratchpad.py


@dataclass(kw_only=True)
class ExperimentConfig:
    kind: str = _f(dataclasses.MISSING, "superni_instructions (H1), superni_explanations (H2) or superni_overwrite (H3).")
    tasks: list = _f(dataclasses.MISSING, "Super-NaturalInstructions task files (relative to the recipe).")
    n_train: int = _f(64, "Training inputs per task.")
    n_eval: int = _f(50, "Held-out inputs per task.")
    seed: int = _f(0, "Split seed.")
    definition: bool = _f(True, "Teacher context: the task definition.")
    n_positive: int = _f(2, "Teacher context: positive examples.")
    n_negative: int = _f(2, "Teacher context: negative examples.")
    explanations: bool = _f(False, "Teacher context: the examples' explanations.")
    student: str = _f("{input}", "Student template: the raw input by default.")

    def __post_init__(self) -> None:
        _check(self.kind in KINDS, "experiment.kind", f"unknown kind {self.kind!r} ({', '.join(KINDS)})")
        _check(bool(self.tasks) and all(isinstance(t, str) for t in self.tasks), "experiment.tasks",
               "must be a non-empty list of task file paths")
        _int_min(self.n_train, "experiment.n_train", 1)
        _int_min(self.n_eval, "experiment.n_eval", 1)
        _int_min(self.n_positive, "experiment.n_positive", 0)
        _int_min(self.n_negative, "experiment.n_negative", 0)
        if self.kind == "superni_overwrite":
            _check(len(self.tasks) >= 2, "experiment.tasks", "superni_overwrite needs at least 2 tasks to re-map ids")
            _check(self.n_train >= len(self.tasks), "experiment.n_train",
                   f"must be at least the number of tasks ({len(self.tasks)}): mixed stages take n_train / tasks from each")


# --quick: the same recipe at test scale (the tiny model finishes it in well under 2 minutes).
QUICK = {"tasks": 2, "n_train": 8, "n_eval": 4, "epochs": 1, "max_new_tokens": 6}


def load_experiment(path: str | Path, quick: bool = False, out_dir: str | None = None):
    """(ExperimentConfig, raw base sections, recipe directory) from a recipe file."""
    p = Path(path)
    raw = tomllib.loads(p.read_text(encoding="utf-8"))
    exp = _build(ExperimentConfig, raw.pop("experiment"), "experiment", str(p))
    for key in ("task", "data"):
        if key in raw:
            raise UserError(f"{p}: [{key}]: an experiment recipe builds one per task; remove this table")
    if out_dir:
        raw["out_dir"] = out_dir
    if quick:
        exp.tasks = exp.tasks[:QUICK["tasks"]]
        exp.n_train, exp.n_eval = min(exp.n_train, QUICK["n_train"]), min(exp.n_eval, QUICK["n_eval"])
        raw.setdefault("train", {})["epochs"] = QUICK["epochs"]
        for sec in ("generation", "eval"):
            raw.setdefault(sec, {})["max_new_tokens"] = min(raw.get(sec, {}).get("max_new_tokens", 99), QUICK["max_new_tokens"])
    # Validate the shared sections once, with a placeholder task, so mistakes name the recipe file.
    config_from_dict({**raw, "task": {"teacher": "{input}"}, "data": {"train": "x", "eval": "y"}}, p.parent, str(p))
    return exp, raw, p.parent


def task_config(exp: ExperimentConfig, raw: dict, base_dir: Path, task_path: str, out: Path, **parts):
    """An ordinary Config for one SuperNI task: teacher = instructions + input, student = the input."""
    from ctxdistill.tasks import superni

    path = _task_path(base_dir, task_path)
    task = superni.load(path)
    ctx = dict(definition=exp.definition, n_positive=exp.n_positive, n_negative=exp.n_negative,
               explanations=exp.explanations) | parts
    cfg_raw = {**raw, "out_dir": str(out / task.name),
               "task": {"name": task.name, "teacher": superni.teacher_template(task, **ctx), "student": exp.student,
                        # f: the first line of the teacher's answer (SuperNI outputs are one line)
                        "extractor": FIRST_LINE, "scorer": "rouge_l"},
               "data": {"superni": str(path), "n_eval": exp.n_eval, "n_train": exp.n_train, "seed": exp.seed}}
    return task, config_from_dict(cfg_raw, base_dir)


def _scores(cfg) -> dict:
    """ROUGE-L and exact match per system from a finished task's predictions."""
    from ctxdistill.core.metrics import exact_match, rouge_l

    rows = [json.loads(line) for line in open(cfg.out / "eval" / "predictions.jsonl", encoding="utf-8")]
    systems = [k for k in rows[0] if k not in ("id", "input", "reference")]
    return {metric: {s: sum(fn(r[s]["prediction"], r["reference"]) for r in rows) / len(rows) for s in systems}
            for metric, fn in (("rouge_l", rouge_l), ("exact", exact_match))}


def _task_row(cfg, rep: dict, name: str) -> dict:
    """One task's H1 row from a finished pipeline run."""
    sc = _scores(cfg)
    pt = rep["prompt_tokens_mean"]
    return {"task": name,
            "base": sc["rouge_l"]["base"], "teacher": sc["rouge_l"]["teacher"],
            "student_before": sc["rouge_l"]["base"], "student_after": sc["rouge_l"]["student"],
            "exact": {"base": sc["exact"]["base"], "teacher": sc["exact"]["teacher"],
                      "student_after": sc["exact"]["student"]},
            "teacher_prompt_tokens": pt["teacher"], "student_prompt_tokens": pt["student"],
            "token_saving": pt["teacher"] / pt["student"],
            "teacher_beats_base_by_10": sc["rouge_l"]["teacher"] >= sc["rouge_l"]["base"] + 0.10}


def _usable(task) -> bool:
    if any(r.strip() for inst in task.instances for r in inst["reference"]):
        return True
    warn(f"{task.name}: every reference is empty; skipped")
    return False


def superni_instructions(exp: ExperimentConfig, raw: dict, base_dir: Path, out: Path) -> dict:
    """H1: does distillation internalise abstract instructions? One pipeline run per task."""
    from ctxdistill.pipeline import run

    rows, skipped = [], []
    for t in exp.tasks:
        task, cfg = task_config(exp, raw, base_dir, t, out)
        if not _usable(task):
            skipped.append(task.name)
            continue
        log(f"experiment: {task.name}")
        rows.append(_task_row(cfg, run(cfg), task.name))
    if not rows:
        raise UserError("experiment: no task left to run (all skipped)")

    def mean(rs, k):
        return sum(r[k] for r in rs) / len(rs) if rs else None

    cols = ("base", "teacher", "student_before", "student_after", "token_saving")
    good = [r for r in rows if r["teacher_beats_base_by_10"]]
    return {"table": "per-task ROUGE-L (student_before is the initial model with the student template, "
                     "the same as base here)",
            "rows": rows, "average": {k: mean(rows, k) for k in cols},
            "average_where_teacher_helps": {**{k: mean(good, k) for k in cols}, "n_tasks": len(good)},
            "skipped_tasks": skipped}


def pearson(xs: list[float], ys: list[float]) -> float | None:
    """Pearson correlation; None with fewer than 3 points or no variance."""
    n = len(xs)
    if n < 3:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sx, sy = sum((x - mx) ** 2 for x in xs) ** 0.5, sum((y - my) ** 2 for y in ys) ** 0.5
    return sxy / (sx * sy) if sx > 0 and sy > 0 else None


def superni_explanations(exp: ExperimentConfig, raw: dict, base_dir: Path, out: Path) -> dict:
    """H2: do explanations help the distilled student where they help in context? Two runs per task."""
    from ctxdistill.pipeline import run

    rows, skipped = [], []
    for t in exp.tasks:
        runs = {}
        for with_expl in (False, True):
            sub = out / ("with_explanations" if with_expl else "without_explanations")
            task, cfg = task_config(exp, raw, base_dir, t, sub, explanations=with_expl)
            if not _usable(task):
                break
            log(f"experiment: {task.name}, explanations {'on' if with_expl else 'off'}")
            runs[with_expl] = _task_row(cfg, run(cfg), task.name)
        if len(runs) < 2:
            skipped.append(Path(t).stem)
            continue
        off, on = runs[False], runs[True]
        rows.append({"task": off["task"], "base": off["base"],
                     "teacher_without": off["teacher"], "teacher_with": on["teacher"],
                     "student_without": off["student_after"], "student_with": on["student_after"],
                     "in_context_gain": on["teacher"] - off["teacher"],
                     "distilled_gain": on["student_after"] - off["student_after"]})
    if not rows:
        raise UserError("experiment: no task left to run (all skipped)")
    return {"table": "per-task ROUGE-L; gains are with explanations minus without",
            "rows": rows, "correlation": pearson([r["in_context_gain"] for r in rows],
                                                 [r["distilled_gain"] for r in rows]),
            "paper_correlation": 0.75, "skipped_tasks": skipped}


def derangement(n: int, seed: int) -> list[int]:
    """A random permutation p of range(n) with p[k] != k for every k (every id changes meaning)."""
    rng = random.Random(seed)
    while True:
        p = list(range(n))
        rng.shuffle(p)
        if all(p[k] != k for k in range(n)):
            return p


def _id_part(exp: ExperimentConfig, raw: dict, base_dir: Path, out: Path, name: str, task_id: str, task,
             train_rows: list[dict], eval_rows: list[dict]):
    """A Config distilling `task` behind `task_id`: the teacher sees the instructions, both see the id."""
    from ctxdistill.core.files import write_jsonl
    from ctxdistill.tasks import superni

    data = out / "data" / name
    write_jsonl(data / "train.jsonl", [{"id": r["id"], "input": r["input"]} for r in train_rows])
    write_jsonl(data / "eval.jsonl", eval_rows)
    ctx = dict(definition=exp.definition, n_positive=exp.n_positive, n_negative=exp.n_negative,
               explanations=exp.explanations)
    cfg_raw = {**raw, "out_dir": str(out / "parts" / name),
               "task": {"name": name, "teacher": superni.teacher_template(task, task_id=task_id, **ctx),
                        "student": f"{task_id}\n{exp.student}",
                        "extractor": FIRST_LINE, "scorer": "rouge_l"},
               "data": {"train": str(data / "train.jsonl"), "eval": str(data / "eval.jsonl")}}
    return config_from_dict(cfg_raw, base_dir)


def superni_overwrite(exp: ExperimentConfig, raw: dict, base_dir: Path, out: Path) -> dict:
    """H3: overwrite what task ids mean, by sequential distillation after a simultaneous one."""
    from ctxdistill import compose
    from ctxdistill.tasks import superni

    tasks = [superni.load(_task_path(base_dir, t)) for t in exp.tasks]
    for t in tasks:
        if not _usable(t):
            raise UserError(f"experiment: {t.name} has only empty references; superni_overwrite needs every task")
    splits = [superni.split(t, exp.n_eval, 0, exp.seed) for t in tasks]
    n, m = len(tasks), exp.n_train // len(tasks)
    for t, (train, _) in zip(tasks, splits):
        if len(train) < exp.n_train:
            raise UserError(f"{t.name}: {len(train)} training instances, n_train={exp.n_train} needs that many")
    perm = derangement(n, exp.seed)  # id k now means task perm[k]
    ids = [f"Task {k + 1}" for k in range(n)]

    def part(name, k, j, train_rows):  # id k with task j's instructions
        return _id_part(exp, raw, base_dir, out, name, ids[k], tasks[j], train_rows, splits[j][1])

    sim = [part(f"sim_{k + 1}", k, k, splits[k][0][:exp.n_train]) for k in range(n)]
    naive = [part(f"naive_{k + 1}", k, perm[k], splits[perm[k]][0][:exp.n_train]) for k in range(n)]
    mixed = [part(f"mixed_{k + 1}", k, perm[k], [r for j in range(n) for r in splits[j][0][k * m:(k + 1) * m]])
             for k in range(n)]
    log(f"experiment: ids re-mapped {', '.join(f'{ids[k]}: {tasks[k].name} -> {tasks[perm[k]].name}' for k in range(n))}")
    log("experiment: simultaneous distillation of every id")
    s0 = compose.simultaneous(sim, out / "simultaneous")
    before = compose.student_weights(compose.stage_config(sim, out / "simultaneous", ""))
    stages = {}
    for name, parts in (("naive", naive), ("mixed", mixed)):
        log(f"experiment: sequential overwrite, {name}")
        stages[name] = compose.sequential(parts, out / name, init=before)
    systems = {"before": str(before), "naive": stages["naive"][-1]["weights"], "mixed": stages["mixed"][-1]["weights"]}
    per_id = _overwrite_scores(naive, systems, tasks, splits, perm)

    def mean(system, col):
        return sum(r[system][col] for r in per_id) / n

    rows = [{"system": s, "correct": mean(s, "correct"), "wrong": mean(s, "wrong")}
            for s in ("teacher", "before", "naive", "mixed")]
    keep = ("n_examples", "steps", "seconds", "first_loss", "final_loss")
    return {"table": "ROUGE-L, mean over ids. correct: id k on its new task's eval inputs, against their references; "
                     "wrong: id k on its old task's eval inputs, against the old references (following the old "
                     "meaning). The teacher's wrong is the same measure for a model that follows the new meaning: "
                     "the overlap floor between the two tasks' answers.",
            "rows": rows, "per_id": per_id,
            "mapping": [{"id": ids[k], "old": tasks[k].name, "new": tasks[perm[k]].name} for k in range(n)],
            "mixed_fewer_wrong_than_naive": rows[3]["wrong"] < rows[2]["wrong"],
            "paper": {"teacher": {"correct": 0.81}, "before": {"correct": 0.49, "wrong": 0.48},
                      "naive": {"correct": 0.68, "wrong": 0.61}, "mixed": {"correct": 0.70, "wrong": 0.16}},
            "training": {"simultaneous": {k: s0[k] for k in keep},
                         **{name: [{k: s[k] for k in keep} for s in st] for name, st in stages.items()}}}


def _overwrite_scores(new_parts: list, systems: dict, tasks: list, splits: list, perm: list[int]) -> list[dict]:
    """Per id: ROUGE-L and exact match of each system on the correct and the wrong eval set."""
    from ctxdistill.core import models
    from ctxdistill.core.metrics import exact_match, rouge_l
    from ctxdistill.evaluate import predict
    from ctxdistill.core.extract import answer_text
    from ctxdistill.core.templates import student_template, teacher_template

    n = len(tasks)
    per_id = [{"id": f"Task {k + 1}", "old": tasks[k].name, "new": tasks[perm[k]].name} for k in range(n)]
    cfg0 = new_parts[0]
    tok = models.load_tokenizer(cfg0.model.name)
    for system in ("teacher", *systems):
        model = models.load_model(cfg0.model if system == "teacher" else dataclasses.replace(cfg0.model, name=systems[system]))
        for k, cfg in enumerate(new_parts):
            tpl = teacher_template(cfg.task) if system == "teacher" else student_template(cfg.task)
            res = {}
            for col, rows in (("correct", splits[perm[k]][1]), ("wrong", splits[k][1])):
                texts, _ = predict(model, tok, tpl, rows, cfg, f"eval: {system}, {per_id[k]['id']}, {col}")
                preds = [(answer_text(cfg.task.extractor, t) or "") if system == "teacher" else t.strip() for t in texts]
                res[col] = sum(rouge_l(p, r["reference"]) for p, r in zip(preds, rows)) / len(rows)
                res[f"{col}_exact"] = sum(exact_match(p, r["reference"]) for p, r in zip(preds, rows)) / len(rows)
            per_id[k][system] = res
        del model
    return per_id


def _task_path(base_dir: Path, t: str) -> Path:
    return (Path(t) if Path(t).is_absolute() else base_dir / t).resolve()


def run_instructions(path: str | Path, argv: list[str], quick: bool = False, out_dir: str | None = None) -> dict:
    """Run an H1-H3 recipe and write `<out>/report.json` and `report.md`; return the report."""
    from ctxdistill.core.files import write_atomic

    exp, raw, base_dir = load_experiment(path, quick, out_dir)
    out = Path(raw.get("out_dir", f"runs/{Path(path).stem}"))
    out = (out if out.is_absolute() else base_dir / out).resolve()  # per-task configs get absolute paths
    for t in exp.tasks:  # every task file and template checked before the first hour of work
        task_config(exp, raw, base_dir, t, out, explanations=exp.explanations or exp.kind == "superni_explanations")
    out.mkdir(parents=True, exist_ok=True)
    result = {"superni_instructions": superni_instructions, "superni_explanations": superni_explanations,
              "superni_overwrite": superni_overwrite}[exp.kind](exp, raw, base_dir, out)
    report = {"recipe": str(path), "kind": exp.kind, "quick": quick, "experiment": dataclasses.asdict(exp),
              "command": "ctxdistill " + " ".join(argv), **result}
    write_atomic(out / "report.json", json.dumps(report, indent=2, ensure_ascii=False))
    write_atomic(out / "report.md", markdown(report))
    return report


def markdown(rep: dict) -> str:
    lines = [f"# {rep['kind']}", "", f"`{rep['command']}`", ""]
    if rep["kind"] == "superni_overwrite":
        lines += ["| | Correct ↑ | Wrong ↓ | paper Correct | paper Wrong |", "|---|---|---|---|---|"]
        for r in rep["rows"]:
            p = rep["paper"][r["system"]]
            lines.append(f"| {r['system']} | {r['correct']:.3f} | {r['wrong']:.3f} | {p['correct']:.2f} | "
                         f"{p['wrong']:.2f} |" if "wrong" in p else
                         f"| {r['system']} | {r['correct']:.3f} | {r['wrong']:.3f} | {p['correct']:.2f} | – |")
        lines += ["", "| id | old task | new task | " + " | ".join(f"{r['system']} correct / wrong" for r in rep["rows"]) + " |",
                  "|---|---|---|" + "---|" * len(rep["rows"])]
        for r in rep["per_id"]:
            lines.append(f"| {r['id']} | {r['old']} | {r['new']} | " +
                         " | ".join(f"{r[s['system']]['correct']:.3f} / {r[s['system']]['wrong']:.3f}" for s in rep["rows"]) + " |")
        lines += ["", rep["table"]]
        return "\n".join(lines) + "\n"
    if rep["kind"] == "superni_explanations":
        lines += ["| task | base | teacher without | teacher with | student without | student with | "
                  "in-context gain | distilled gain |", "|---|---|---|---|---|---|---|---|"]
        for r in rep["rows"]:
            lines.append(f"| {r['task']} | {r['base']:.3f} | {r['teacher_without']:.3f} | {r['teacher_with']:.3f} | "
                         f"{r['student_without']:.3f} | {r['student_with']:.3f} | {r['in_context_gain']:+.3f} | "
                         f"{r['distilled_gain']:+.3f} |")
        c = rep["correlation"]
        lines += ["", f"Pearson correlation of the gains over {len(rep['rows'])} tasks: "
                      f"{'undefined (fewer than 3 tasks or no variance)' if c is None else f'{c:.2f}'} (paper: 0.75)."]
        return "\n".join(lines) + "\n"
    lines += ["| task | base | teacher | student before | student after | teacher/student prompt tokens |",
              "|---|---|---|---|---|---|"]
    for r in rep["rows"]:
        mark = "" if r["teacher_beats_base_by_10"] else " (teacher does not beat base by 10)"
        lines.append(f"| {r['task']}{mark} | {r['base']:.3f} | {r['teacher']:.3f} | {r['student_before']:.3f} | "
                     f"{r['student_after']:.3f} | {r['token_saving']:.1f}x |")
    for name, avg in (("average", rep["average"]), ("average where teacher helps", rep["average_where_teacher_helps"])):
        if avg["base"] is not None:
            lines.append(f"| **{name}** | {avg['base']:.3f} | {avg['teacher']:.3f} | {avg['student_before']:.3f} | "
                         f"{avg['student_after']:.3f} | {avg['token_saving']:.1f}x |")
    return "\n".join(lines) + "\n"
