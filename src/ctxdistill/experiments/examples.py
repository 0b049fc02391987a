"""Internalising concrete examples (paper §4.2, H4/H5): a recipe with `[experiment] kind = "examples"`.

Per group (SPIDER: one per database; dates: one), k labelled examples are shown to the teacher as
earlier chat turns; the student sees the input alone. Compared, for each k:
  teacher          the initial model with the k examples
  student before   the initial model without them
  student after    distilled on the group's unlabelled train inputs (all groups into one student)
  gradient descent the student template fine-tuned directly on the same k examples per group (all in
                   one batch, every epoch evaluated; the best epoch and the last are reported)
Beyond the window (H5): n = max(k) examples, of which only m = min(k) fit one prompt (the emulated window,
`prompt_budget` tokens when set, enforced as the teacher's window). K prompts each hold a random m-subset;
their per-token distributions are averaged (compose.simultaneous(..., average_teachers=True)) and
distilled once, against distilling the m examples of one prompt.

Every system's output is cut at its first line before scoring (one-line answers: a date, a SQL query).
Writes `<out>/report.json` and `report.md`, like the other experiments.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import random
from dataclasses import dataclass
from pathlib import Path

from ctxdistill.config import _build, _check, _f, _int_min, config_from_dict
from ctxdistill.core.errors import UserError
from ctxdistill.core.extract import first_line
from ctxdistill.core.progress import log

TASKS = ("dates", "spider")


@dataclass(kw_only=True)
class ExamplesConfig:
    kind: str = _f(dataclasses.MISSING, "examples")
    task: str = _f(dataclasses.MISSING, "dates (built in) or spider (a SPIDER-format directory, see `spider`).")
    spider: str = _f("", "For task = spider: the directory with examples.jsonl and database/.")
    k: list = _f([4, 8], "Examples shown to the teacher, per group: one column each.")
    n_train: int = _f(64, "Unlabelled inputs distilled per group (SPIDER: at most what is left).")
    n_eval: int = _f(100, "Held-out inputs per group (SPIDER: at most what is left).")
    seed: int = _f(0, "Split and subset seed.")
    sft_epochs: int = _f(25, "Gradient-descent baseline epochs (the paper: 25).")
    sft_eval_every: int = _f(1, "Evaluate the baseline every this many epochs.")
    n_prompts: int = _f(4, "Beyond the window: K teacher prompts, each a random m-subset (0 = skip).")
    prompt_budget: int = _f(0, "Beyond the window: the emulated window in tokens (prompt + answer) every teacher prompt "
                               "must fit; 0 = not enforced.")

    def __post_init__(self) -> None:
        _check(self.task in TASKS, "experiment.task", f"unknown task {self.task!r} ({', '.join(TASKS)})")
        _check(self.task != "spider" or bool(self.spider), "experiment.spider", "is required for task = 'spider'")
        _check(bool(self.k) and all(isinstance(x, int) and x >= 1 for x in self.k), "experiment.k",
               "must be a non-empty list of integers >= 1")
        for name in ("n_train", "n_eval", "sft_epochs", "sft_eval_every"):
            _int_min(getattr(self, name), f"experiment.{name}", 1)
        _int_min(self.n_prompts, "experiment.n_prompts", 0)
        _int_min(self.prompt_budget, "experiment.prompt_budget", 0)


QUICK = {"k": [1, 2], "n_train": 4, "n_eval": 4, "sft_epochs": 2, "n_prompts": 2, "max_new_tokens": 8, "groups": 2}


@dataclass
class Group:
    """One context: a pool of labelled examples, unlabelled train inputs, eval rows, and a scorer."""
    name: str
    examples: list[dict]   # {"id", "input", "reference": [answer], optional "shot": [user, assistant] short form}
    train: list[dict]      # {"id", "input"}
    eval: list[dict]       # {"id", "input", "reference": [...], ...}
    score: object          # (prediction, row) -> {metric: value}; the first metric is the headline


def date_groups(exp: ExamplesConfig) -> list[Group]:
    from ctxdistill.core.metrics import exact_match
    from ctxdistill.tasks import dates

    examples, train, evals = dates.split(max(exp.k), exp.n_train, exp.n_eval, exp.seed)
    return [Group("dates", examples, train, evals, lambda p, r: {"exact": exact_match(p, r["reference"])})]


def spider_groups(exp: ExamplesConfig, root: Path, cache: Path) -> list[Group]:
    """Per database: questions grouped by their gold query (paraphrases stay together), shuffled; the
    first max(k) queries give the examples, then eval rows, then train inputs."""
    from ctxdistill.tasks import spider

    rows = spider.load(root)
    by_db: dict[str, list[list[dict]]] = {}
    for db_id in sorted({r["db_id"] for r in rows}):
        by_query: dict[str, list[dict]] = {}
        for r in rows:
            if r["db_id"] == db_id:
                by_query.setdefault(" ".join(r["query"].split()).lower(), []).append(r)
        queries = list(by_query.values())
        random.Random(f"{exp.seed}:{db_id}").shuffle(queries)
        if len(queries) <= max(exp.k) + 1:  # checked for every database before any is built
            raise UserError(f"{root}: database {db_id} has {len(queries)} distinct queries; k = {max(exp.k)} needs more")
        by_db[db_id] = queries
    groups = []
    for db_id, queries in by_db.items():
        db = spider.build_db(root, db_id, cache)
        schema = spider.schema_text(root, db_id)

        def prompt(q: str) -> str:
            return f"{schema}\n\nWrite one SQLite query that answers the question.\nQuestion: {q}"

        # After the first example the schema is not repeated: a shot is the question alone, so k = 8 costs
        # one schema, not nine, in the teacher's prompt. Shown answers have their whitespace normalised.
        examples = [{"id": g[0]["id"], "input": prompt(g[0]["question"]), "reference": [g[0]["query"]],
                     "shot": [f"Question: {g[0]['question']}", " ".join(g[0]["query"].split())]}
                    for g in queries[:max(exp.k)]]
        rest = [r for g in queries[max(exp.k):] for r in g]
        n_eval = min(exp.n_eval, len(rest) // 2)
        evals = [{"id": r["id"], "input": prompt(r["question"]), "reference": [r["query"]], "db": str(db)}
                 for r in rest[:n_eval]]
        train = [{"id": r["id"], "input": prompt(r["question"])} for r in rest[n_eval:n_eval + exp.n_train]]

        def score(p: str, r: dict) -> dict:
            s = spider.score(r["db"], p, r["reference"][0])
            return {"execution_accuracy": s["exec"], "exact_set_match": s["exact"],
                    "parse_error": float(s["parse_error"]), "exec_error": float(s["exec_error"])}
        groups.append(Group(db_id, examples, train, evals, score))
    return groups


def _shots(examples: list[dict]) -> list[list[str]]:
    """Teacher chat turns: the first example in full, the rest in their short form where a group has one."""
    out = []
    for i, e in enumerate(examples):
        short = e.get("shot", [e["input"], e["reference"][0]])
        out.append([e["input"] if i == 0 else short[0], short[1]])
    return out


def _part(raw: dict, base_dir: Path, out: Path, name: str, group: Group, shots: list[dict], budget: int = 0):
    """A Config distilling `shots` (labelled examples as chat turns) for one group's inputs."""
    from ctxdistill.core.extract import FIRST_LINE
    from ctxdistill.core.files import write_jsonl

    data = out / "data" / group.name
    write_jsonl(data / "train.jsonl", group.train)
    write_jsonl(data / "eval.jsonl", [{k: r[k] for k in ("id", "input", "reference")} for r in group.eval])
    cfg_raw = {**raw, "out_dir": str(out / "parts" / name),
               "task": {"name": name, "teacher": "{input}", "student": "{input}",
                        "teacher_shots": _shots(shots),
                        "extractor": FIRST_LINE, "scorer": "exact"},
               "data": {"train": str(data / "train.jsonl"), "eval": str(data / "eval.jsonl")}}
    if budget:
        cfg_raw["model"] = {**raw.get("model", {}), "max_length": budget}
    return config_from_dict(cfg_raw, base_dir)


def _evaluate(model, tok, parts: list, groups: list[Group], teacher: bool, desc: str) -> dict:
    """Mean of each group scorer's metrics over all eval rows (greedy, first line of the output)."""
    from ctxdistill.evaluate import predict
    from ctxdistill.core.templates import student_template, teacher_template

    totals, n = {}, 0
    for cfg, g in zip(parts, groups):
        tpl = teacher_template(cfg.task) if teacher else student_template(cfg.task)
        texts, _ = predict(model, tok, tpl, g.eval, cfg, f"{desc}, {g.name}")
        for t, r in zip(texts, g.eval):
            for k, v in g.score(first_line(t), r).items():
                totals[k] = totals.get(k, 0.0) + v
            n += 1
    return {k: v / n for k, v in totals.items()}


def load_recipe(path: Path, raw: dict, cls: type = ExamplesConfig):
    """The [experiment] table of a recipe (removed from `raw`) as `cls` (ExamplesConfig, or
    scratchpad.ScratchpadConfig), with the shared sections checked."""
    exp = _build(cls, raw.pop("experiment"), "experiment", str(path))
    for key in ("task", "data"):
        if key in raw:
            raise UserError(f"{path}: [{key}]: an experiment recipe builds its own; remove this table")
    config_from_dict({**raw, "task": {"teacher": "{input}"}, "data": {"train": "x", "eval": "y"}}, path.parent, str(path))
    return exp


def run_examples(path: Path, raw: dict, argv: list[str], quick: bool, out_dir: str | None) -> dict:
    """Run an examples recipe (module docstring); write and return the report."""
    from ctxdistill import compose
    from ctxdistill.core import models
    from ctxdistill.baseline import sft
    from ctxdistill.core.files import sha256_file, write_atomic
    from ctxdistill.core.student import load_student

    exp = load_recipe(path, raw)
    if quick:
        exp.k, exp.n_train, exp.n_eval = QUICK["k"], QUICK["n_train"], QUICK["n_eval"]
        exp.sft_epochs, exp.n_prompts, exp.prompt_budget = QUICK["sft_epochs"], min(exp.n_prompts, QUICK["n_prompts"]), 0
        raw.setdefault("train", {})["epochs"] = 1
        for sec in ("generation", "eval"):
            raw.setdefault(sec, {})["max_new_tokens"] = min(raw.get(sec, {}).get("max_new_tokens", 99), QUICK["max_new_tokens"])
    base_dir = path.parent
    out = Path(out_dir or raw.get("out_dir", f"runs/{path.stem}"))
    out = (out if out.is_absolute() else base_dir / out).resolve()
    raw["out_dir"] = str(out)
    groups = (date_groups(exp) if exp.task == "dates" else
              spider_groups(exp, (base_dir / exp.spider).resolve(), out / "databases"))
    if quick:
        groups = groups[:QUICK["groups"]]
    ks, metric = sorted(set(exp.k)), _metric(groups)
    tok = None
    table: dict[str, dict] = {s: {} for s in SYSTEMS}
    curves = {}
    # Every score is kept with the hash of what produced it (results.json beside it), so a rerun after a
    # kill or a change recomputes only what is missing or stale.
    common = None
    for k in ks:
        col = f"k={k}"
        parts = [_part(raw, base_dir, out, f"k{k}_{g.name}", g, g.examples[:k]) for g in groups]
        common = common or {"model": models.fingerprint(parts[0].model.name),
                            "eval": {s: parts[0].to_dict()[s] for s in ("generation", "eval")},
                            "groups": [[g.name, [r["id"] for r in g.eval]] for g in groups]}
        log(f"experiment: k = {k}: distil {len(groups)} group(s) into one student")
        compose.simultaneous(parts, out / f"k{k}")
        final = compose.stage_config(parts, out / f"k{k}", "")
        tok = tok or models.load_tokenizer(final.model.name)
        tasks = [p.to_dict()["task"] for p in parts]
        base = functools.cache(lambda m=final.model: models.load_model(m))  # loaded only if a score is not cached
        table["teacher"][col] = _cached(out / "results" / f"teacher_k{k}.json", {**common, "tasks": tasks},
                                        lambda: _evaluate(base(), tok, parts, groups, True, f"eval: teacher k={k}"))
        table["student before"][col] = _cached(out / "results" / "before.json", common,  # the student template is k-free
                                               lambda: _evaluate(base(), tok, parts, groups, False, "eval: student before"))
        del base
        student = final.out / "student" / "ctxdistill_config.json"
        table["student after"][col] = _cached(
            out / "results" / f"after_k{k}.json", {**common, "tasks": tasks, "student": sha256_file(student)},
            lambda: _evaluate(load_student(final), tok, parts, groups, False, f"eval: student k={k}"))
        log(f"experiment: k = {k}: gradient descent on the same {k} example(s) per group")
        # One config serves the baseline: every group's student template is '{input}'.
        labelled = [e for g in groups for e in g.examples[:k]]
        res = _cached(out / "results" / f"baseline_k{k}.json",
                      {**common, "labelled": [e["id"] for e in labelled], "train": parts[0].to_dict()["train"],
                       "epochs": exp.sft_epochs, "eval_every": exp.sft_eval_every},
                      lambda: sft(parts[0], labelled, [r for g in groups for r in g.eval], out / f"k{k}" / "baseline_sft",
                                  epochs=exp.sft_epochs, score=_headline(groups), eval_every=exp.sft_eval_every))
        curves[col] = res["curve"]
        table["gradient descent (best epoch)"][col] = {metric: res["best"]["score"], "epoch": res["best"]["epoch"]}
        table["gradient descent (last epoch)"][col] = {metric: res["final"]["score"], "epoch": res["final"]["epoch"]}
    rows = [{"system": s, **{c: v[metric] for c, v in cols.items()}, "details": cols} for s, cols in table.items()]
    report = {"kind": "examples", "task": exp.task, "metric": metric, "quick": quick,
              "experiment": dataclasses.asdict(exp), "command": "ctxdistill " + " ".join(argv),
              "groups": [{"name": g.name, "n_train": len(g.train), "n_eval": len(g.eval)} for g in groups],
              "table": rows, "baseline_curves": curves}
    if exp.n_prompts and len(ks) >= 2:
        report["beyond_window"] = _beyond_window(exp, raw, base_dir, out, groups, ks, tok, report)
    write_atomic(out / "report.json", json.dumps(report, indent=2, ensure_ascii=False))
    write_atomic(out / "report.md", markdown(report))
    return report


def _cached(path: Path, key: dict, compute):
    """compute() unless `path` holds a value computed for the same key (content hash); then that value."""
    from ctxdistill.core.files import write_atomic
    from ctxdistill.store import hash_fields

    h = hash_fields({"key": key})["all"]
    try:
        kept = json.loads(path.read_text())
        if kept.get("key") == h:
            log(f"experiment: {path.name} is up to date; reusing it")
            return kept["value"]
    except (OSError, ValueError, AttributeError):
        pass  # missing or damaged: computed again
    value = compute()
    write_atomic(path, json.dumps({"key": h, "value": value}, indent=2))
    return value


SYSTEMS = ("teacher", "student before", "student after", "gradient descent (best epoch)", "gradient descent (last epoch)")


def _metric(groups: list[Group]) -> str:
    return "exact" if groups[0].name == "dates" else "execution_accuracy"


def _headline(groups: list[Group]):
    by_id = {r["id"]: g for g in groups for r in g.eval}
    metric = _metric(groups)
    return lambda p, r: by_id[r["id"]].score(first_line(p), r)[metric]


def _beyond_window(exp, raw, base_dir, out, groups, ks, tok, report) -> dict:
    """H5: n = max(k) examples, m = min(k) per prompt, K prompts averaged, distilled once."""
    from ctxdistill import compose
    from ctxdistill.core.files import sha256_file
    from ctxdistill.core.templates import teacher_template
    from ctxdistill.train import fit_student
    from ctxdistill.core.student import load_student

    n, m = max(ks), min(ks)
    rng = random.Random(exp.seed)
    subsets = [sorted(rng.sample(range(n), m)) for _ in range(exp.n_prompts)]
    groups_parts = [[_part(raw, base_dir, out, f"avg{j}_{g.name}", g, [g.examples[i] for i in s], exp.prompt_budget)
                     for j, s in enumerate(subsets)] for g in groups]
    examples, hashes, eos = [], [], None
    for g, parts in zip(groups, groups_parts):
        sets, eos, h, _ = compose.distillation_sets(parts)
        ex, _ = compose.averaged_set(parts, sets)
        examples += ex
        hashes += h
    cfg = compose.stage_config([gp[0] for gp in groups_parts], out / "averaged", "")
    log(f"experiment: beyond the window: {n} examples over {exp.n_prompts} prompts of {m}, teachers averaged")
    fit_student(cfg, examples, eos, compose.set_hash(hashes, averaged=True))
    student = cfg.out / "student" / "ctxdistill_config.json"
    score = _cached(out / "results" / "averaged.json",
                    {"student": sha256_file(student), "groups": [[g.name, [r["id"] for r in g.eval]] for g in groups],
                     "eval": {s: cfg.to_dict()[s] for s in ("generation", "eval")}},
                    lambda: _evaluate(load_student(cfg), tok, [gp[0] for gp in groups_parts], groups, False,
                                      "eval: averaged student"))
    full = _part(raw, base_dir, out, f"k{n}_{groups[0].name}", groups[0], groups[0].examples[:n])
    lens = {f"{c} examples": round(sum(len(teacher_template(p.task).render(tok, r["input"])[0]) for r in groups[0].eval)
                                   / len(groups[0].eval), 1)
            for c, p in ((m, groups_parts[0][0]), (n, full))}
    t, metric = {r["system"]: r for r in report["table"]}, _metric(groups)
    return {"n": n, "m": m, "prompts": exp.n_prompts, "subsets": subsets, "prompt_budget": exp.prompt_budget,
            "teacher_prompt_tokens_mean": lens,
            "rows": [{"system": f"teacher, {m} examples in one prompt", "score": t["teacher"][f"k={m}"]},
                     {"system": f"student, distilled from {m} examples in one prompt", "score": t["student after"][f"k={m}"]},
                     {"system": f"student, {n} examples over {exp.n_prompts} prompts of {m}, teachers averaged",
                      "score": score[metric]},
                     {"system": f"teacher, all {n} examples in one prompt (over the emulated window)",
                      "score": t["teacher"][f"k={n}"]}],
            "details": score}


def markdown(rep: dict) -> str:
    ks = [c for c in rep["table"][0] if c.startswith("k=")]
    lines = [f"# examples: {rep['task']} ({rep['metric']})", "", f"`{rep['command']}`", "",
             "| | " + " | ".join(ks) + " |", "|---|" + "---|" * len(ks)]
    for r in rep["table"]:
        lines.append(f"| {r['system']} | " + " | ".join(f"{r[k]:.3f}" for k in ks) + " |")
    if "beyond_window" in rep:
        b = rep["beyond_window"]
        lines += ["", f"Beyond the window: n = {b['n']}, m = {b['m']}, {b['prompts']} prompts "
                      f"(mean teacher prompt tokens: {b['teacher_prompt_tokens_mean']})", "", "| | score |", "|---|---|"]
        lines += [f"| {r['system']} | {r['score']:.3f} |" for r in b["rows"]]
    return "\n".join(lines) + "\n"
