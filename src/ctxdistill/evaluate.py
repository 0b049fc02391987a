"""Stage 4, evaluate: held-out inputs scored for the base model, the teacher and the student.

  base     the initial model with the student template (no context), raw completion
  teacher  the initial model with the teacher template (context), answer extracted by f
  student  the trained model with the student template, raw completion

Decoding is greedy so scores are repeatable. Predictions go to `<out>/eval/predictions.jsonl`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections import Counter
from pathlib import Path

from ctxdistill.core import models
from ctxdistill.config import Config
from ctxdistill.core.errors import UserError
from ctxdistill.core.extract import answer_text
from ctxdistill.core.files import write_atomic, write_jsonl
from ctxdistill.core.progress import log
from ctxdistill.core.metrics import SCORERS, bootstrap_interval, exact_match, mean_interval, rouge_l, span_match
from ctxdistill.core.sampling import generate, prefix_for
from ctxdistill.core.templates import student_template, teacher_template
from ctxdistill.prompts import context_text
from ctxdistill.store import load_split



# -- the stage --------------------------------------------------------------------------------------

def predict(model, tok, tpl, rows: list[dict], cfg: Config, desc: str, resume: Path | None = None,
            key: dict | None = None, stats: dict | None = None) -> tuple[list[str], list[int]]:
    """Greedy completions (assistant text including any prefill) and prompt lengths.

    With `resume` (a file), every finished generation batch (eval.batch_size prompts) is appended to it
    at once (fsync'd JSON lines, the first holding `key`); a killed evaluation run again with the same
    key recomputes only the batches it lacks, and gets the same completions as an uninterrupted run.
    A prompt that does not fit the model window with eval.max_new_tokens is an error (never truncated);
    `stats["cut"]` counts completions that reached max_new_tokens without finishing.
    """
    prompts, prefills = [], []
    for r in rows:
        ids, prefill = tpl.render(tok, r["input"])
        prompts.append(ids)
        prefills.append(prefill)
    win = models.window(model, cfg.model)
    for r, ids in zip(rows, prompts):
        if len(ids) + cfg.eval.max_new_tokens > win:
            raise UserError(f"{desc}: prompt for input {r['input'][:40]!r} is {len(ids)} tokens; with eval.max_new_tokens "
                            f"{cfg.eval.max_new_tokens} it is over the model window of {win} tokens (nothing is truncated)")
    done, on_batch = {}, None
    if resume is not None:
        key = {**(key or {}), "prompts": hashlib.sha256(json.dumps(prompts).encode()).hexdigest(),
               "max_new_tokens": cfg.eval.max_new_tokens, "batch_size": cfg.eval.batch_size}
        done = _read_partial(resume, key)
        if done:
            log(f"{desc}: resuming, {len(done)} batch(es) already done ({resume.name})")
        resume.parent.mkdir(parents=True, exist_ok=True)  # rewritten without any torn last line
        write_atomic(resume, "".join(json.dumps(x) + "\n" for x in [{"key": key}] + [
            {"batch": b, "results": {str(i): [ids, fin] for i, (ids, fin) in res.items()}} for b, res in done.items()]))

        def on_batch(b: int, res: dict) -> None:
            _append(resume, {"batch": b, "results": {str(i): [ids, fin] for i, (ids, fin) in res.items()}})
    outs = generate(model, prompts, pad_id=tok.pad_token_id, eos_id=models.stop_ids(tok),
                    max_new_tokens=cfg.eval.max_new_tokens, temperature=0.0, batch_size=cfg.eval.batch_size,
                    seed=0, desc=desc, prefix=prefix_for(model, prompts),  # shared context encoded once
                    done=done, on_batch=on_batch)
    texts = [pf + tok.decode(c.ids, skip_special_tokens=True) for pf, c in zip(prefills, outs)]
    if stats is not None:
        stats["cut"] = sum(not c.finished and len(c.ids) >= cfg.eval.max_new_tokens for c in outs)
    return texts, [len(p) for p in prompts]


def _append(path: Path, obj: dict) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(obj) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _read_partial(path: Path, key: dict) -> dict:
    """Batches finished by an earlier run with the same key; a torn last line (a kill mid-write) is ignored."""
    if not path.is_file():
        return {}
    lines = path.read_text(encoding="utf-8").split("\n")
    try:
        if json.loads(lines[0]).get("key") != key:
            return {}
    except json.JSONDecodeError:
        return {}
    done = {}
    for line in lines[1:]:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            break
        done[rec["batch"]] = {int(i): (ids, fin) for i, (ids, fin) in rec["results"].items()}
    return done


def evaluate(cfg: Config, systems: list[str] | None = None, student: Config | None = None,
             eval_dir: Path | None = None) -> dict:
    """Score each system on the eval split; return the report dict (also written by `report.write`).

    Scores: the reference metric (task.scorer, when the eval split has references), every rule check in
    task.checks, and, with eval.fidelity and all three systems, the reference-free fidelity (fidelity.py).
    `student`: score the student trained under that config (e.g. a composed one, see compose.py) instead
    of `<cfg.out>/student`; `eval_dir`: write there instead of `<cfg.out>/eval`. With export.merge the
    student scored is the deployable model in `<cfg.out>/model/` (pipeline.evaluate_and_card exports it first,
    and writes its model card from this report).
    """
    from ctxdistill import fidelity, report
    from ctxdistill.core.checks import compile_checks, score_checks

    systems = systems or cfg.eval.systems
    rows = load_split(cfg, "eval")
    facts = load_facts(cfg)
    checks = compile_checks(cfg.task.checks, context_text(cfg))
    score = SCORERS.get(cfg.task.scorer)  # None: no references ("none")
    tok = models.load_tokenizer(cfg.model.name)
    s_tpl, t_tpl = student_template(cfg.task), teacher_template(cfg.task)
    preds: dict[str, list[str]] = {}
    prompt_tokens: dict[str, float] = {}
    prompt_ids: dict[str, list[list[int]]] = {}
    dropped: Counter = Counter()
    out = eval_dir or cfg.out / "eval"
    partial = out / ".partial"  # finished generation batches, so a killed evaluation resumes
    with_fidelity = cfg.eval.fidelity and {"base", "teacher", "student"} <= set(systems)

    cut: dict[str, dict] = {s: {} for s in ("base", "teacher", "student")}

    def resume(system: str, model_dir: str) -> dict:
        return {"resume": partial / f"{system}.jsonl", "key": {"system": system, "model": models.fingerprint(model_dir)},
                "stats": cut[system]}

    fact_replies: dict[str, list[str]] = {}

    def predict_system(model, system: str, tpl, model_dir: str) -> list[str]:
        texts, lens = predict(model, tok, tpl, rows, cfg, f"eval: {system}", **resume(system, model_dir))
        prompt_tokens[system] = sum(lens) / len(lens)
        prompt_ids[system] = [tpl.render(tok, r["input"])[0] for r in rows[:fidelity.LATENCY_INPUTS]]
        if facts:  # the closed-book questions, asked the same way
            cut[f"{system} (facts)"] = {}
            fact_texts, _ = predict(model, tok, tpl, facts, cfg, f"eval: {system}, facts",
                                    resume=partial / f"{system}-facts.jsonl", stats=cut[f"{system} (facts)"],
                                    key={"system": system, "model": models.fingerprint(model_dir), "facts": True})
            fact_replies[system] = [a or "" for a in replies(cfg, system, fact_texts, facts)]
        return texts

    base = None
    if "base" in systems or "teacher" in systems or with_fidelity:
        base = models.load_model(cfg.model)
        if "base" in systems:
            preds["base"] = replies(cfg, "base", predict_system(base, "base", s_tpl, cfg.model.name), rows)
        if "teacher" in systems:
            answers = replies(cfg, "teacher", predict_system(base, "teacher", t_tpl, cfg.model.name), rows)
            dropped["teacher: extractor matched nothing (scored 0)"] = sum(a is None for a in answers)
            preds["teacher"] = [a or "" for a in answers]
        if not with_fidelity:
            base = None  # freed before the student loads
    if "student" in systems:
        model, model_dir = student_model(cfg, student)
        preds["student"] = replies(cfg, "student", predict_system(model, "student", s_tpl, str(model_dir)), rows)
    fid = None
    if with_fidelity:
        fid = fidelity.teacher_forced_kl(cfg, tok, base, model, rows)
        fid["agreement"] = {s: {m: round(mean(f(p, [t]) for p, t in zip(preds[s], preds["teacher"])), 4)
                                for m, f in (("exact", exact_match), ("rouge_l", rouge_l))} for s in ("base", "student")}
        fid["cost"] = fidelity.cost(base, {k: prompt_ids[k] for k in ("teacher", "student")})
    del base
    if "student" in systems:
        del model

    for system, st in cut.items():
        if st.get("cut"):
            dropped[f"{system}: completion cut at eval.max_new_tokens (scored as is)"] = st["cut"]
    passed = {s: score_checks(checks, preds[s], [r["input"] for r in rows]) for s in preds}
    per_row = []
    scores = {s: 0.0 for s in preds} if score else {}
    for i, r in enumerate(rows):
        row = {"id": r["id"], "input": r["input"], **({"reference": r["reference"]} if score else {})}
        for s in preds:
            row[s] = {"prediction": preds[s][i]}
            if score:
                row[s]["score"] = v = score(preds[s][i], r["reference"])
                scores[s] += v / len(rows)
            if checks:
                row[s]["checks"] = {c.name: passed[s][c.name][i] for c in checks}
        per_row.append(row)
    check_scores = {c.name: {s: round(mean(passed[s][c.name]), 4) for s in preds} for c in checks}
    write_jsonl(out / "predictions.jsonl", per_row)
    per_item = {"checks": {c.name: {s: [float(v) for v in passed[s][c.name]] for s in preds} for c in checks}}
    if score:
        per_item["scores"] = {s: [r[s]["score"] for r in per_row] for s in preds}
    fact_report = None
    if facts:
        hits = {s: [span_match(a, f["answer"]) for a, f in zip(fact_replies[s], facts)] for s in fact_replies}
        per_item["facts"] = hits
        write_jsonl(out / "facts.jsonl", [{**f, **{s: {"reply": fact_replies[s][i], "hit": bool(hits[s][i])}
                                                    for s in hits}} for i, f in enumerate(facts)])
        fact_report = fact_recall(facts, hits)
    if fid:
        per_item["agreement"] = {s: {m: [f(p, [t]) for p, t in zip(preds[s], preds["teacher"])]
                                     for m, f in (("exact", exact_match), ("rouge_l", rouge_l))} for s in ("base", "student")}
    rep = report.build(cfg, scores, dropped, prompt_tokens, n_eval=len(rows), checks=check_scores, fidelity=fid,
                       facts=fact_report, intervals=intervals(per_item, fid))
    report.write(out, rep)
    shutil.rmtree(partial, ignore_errors=True)
    log(f"eval: wrote {out}/report.json, report.md, report.png")
    return rep


def student_model(cfg: Config, student: Config | None = None):
    """(model, its directory) of the student to score: with export.merge (and no other `student` config), the
    deployable `<out>/model/`, which must have been exported from the student there; else `<out>/student/`
    (full weights or an adapter)."""
    from ctxdistill.core.student import load_student, merged_from

    if cfg.export.merge and student is None:
        model_dir = cfg.out / "model"
        if merged_from(model_dir) != models.fingerprint(str(cfg.out / "student"), full=True):
            raise UserError(f"{model_dir}: not exported from the student in {cfg.out / 'student'} (export.merge is on); "
                            "run `ctxdistill export` first, or `ctxdistill eval`, which does")
        return models.load_model(dataclasses.replace(cfg.model, name=str(model_dir))), model_dir
    return load_student(student or cfg), (student or cfg).out / "student"


def replies(cfg: Config, system: str, texts: list[str], rows: list[dict]) -> list[str | None]:
    """What each system's completion (assistant text, prefill included) is scored as: the teacher's answer
    found by f (None when f fails); for the student and the base model, which both run the student template,
    the text after the student prefill, so the two are compared on the same strings."""
    if system == "teacher":
        return [answer_text(cfg.task.extractor, t) for t in texts]
    prefill = student_template(cfg.task).prefill
    return [t[len(prefill.format(input=r["input"])):].strip() for t, r in zip(texts, rows)]


def load_facts(cfg: Config) -> list[dict]:
    """The closed-book fact questions of data.facts, as the inputs stage wrote them ([] without any)."""
    from ctxdistill.core.files import read_jsonl

    if not cfg.data.facts:
        return []
    f = cfg.out / "inputs" / "facts.jsonl"
    if not f.is_file():
        raise UserError(f"{f}: data.facts is set but the inputs stage has not written its questions; run "
                        "`ctxdistill inputs CONFIG` first")
    return read_jsonl(f, ("id", "input", "answer"))


def fact_recall(facts: list[dict], hits: dict[str, list[float]]) -> dict:
    """Fact recall: the share of fact questions whose reply holds an accepted answer, per system; and per
    fact (the questions asking for it), so a miss can be traced to what the teacher itself knew."""
    by_fact: dict[str, dict] = {}
    for i, f in enumerate(facts):
        d = by_fact.setdefault(f.get("fact", f["id"]), {"questions": 0, **{s: 0 for s in hits}})
        d["questions"] += 1
        for s in hits:
            d[s] += int(hits[s][i])
    return {"n_questions": len(facts), "n_facts": len(by_fact),
            "recall": {s: round(mean(v), 4) for s, v in hits.items()}, "by_fact": by_fact}


def intervals(per_item: dict, fid: dict | None) -> dict:
    """95% bootstrap intervals (over the held-out inputs; for the KL, over the teacher's answers) of every
    score in the report, and of student / teacher for each check and for fact recall (resampling the same
    inputs for both, so the ratio's interval is paired). With 16 to 48 inputs one reply moves a score by 2 to
    6 points; the intervals say how much that is."""
    out: dict = {"checks": {n: {s: mean_interval(v) for s, v in by.items()} for n, by in per_item["checks"].items()}}
    for key in ("scores", "facts"):
        if key in per_item:
            out[key] = {s: mean_interval(v) for s, v in per_item[key].items()}
    if "agreement" in per_item:
        out["agreement"] = {s: {m: mean_interval(v) for m, v in by.items()} for s, by in per_item["agreement"].items()}

    def ratio(by: dict) -> list[float] | None:
        t, st = by.get("teacher"), by.get("student")
        if not t or not st or not sum(t):
            return None
        return bootstrap_interval(lambda idx: sum(st[i] for i in idx) / max(sum(t[i] for i in idx), 1e-9), len(t))
    out["student_over_teacher"] = {"checks": {n: ratio(by) for n, by in per_item["checks"].items()},
                                   **({"facts": ratio(per_item["facts"])} if "facts" in per_item else {})}
    if fid and fid.get("per_answer"):
        kb, ks, nt = zip(*fid.pop("per_answer"))  # KL sums over each answer's tokens (base, student), its tokens
        out["kl"] = {"base": bootstrap_interval(lambda idx: sum(kb[i] for i in idx) / max(sum(nt[i] for i in idx), 1), len(nt)),
                     "student": bootstrap_interval(lambda idx: sum(ks[i] for i in idx) / max(sum(nt[i] for i in idx), 1), len(nt))}
        out["kl_gap_closed"] = bootstrap_interval(
            lambda idx: 1 - sum(ks[i] for i in idx) / max(sum(kb[i] for i in idx), 1e-12), len(nt))
    elif fid is not None and "per_answer" in fid:
        fid.pop("per_answer")
    return out


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


def compare(cfg: Config, inputs: list[str]) -> list[dict]:
    """Greedy replies to `inputs` from the base model (student template), the teacher (teacher template, f
    applied) and the student (`student_model`), side by side: [{input, base, teacher, student}]."""
    rows = [{"id": f"compare-{i}", "input": x} for i, x in enumerate(inputs)]
    tok = models.load_tokenizer(cfg.model.name)
    s_tpl, t_tpl = student_template(cfg.task), teacher_template(cfg.task)
    base = models.load_model(cfg.model)
    out = {"base": replies(cfg, "base", predict(base, tok, s_tpl, rows, cfg, "compare: base")[0], rows),
           "teacher": [a if a is not None else "(f matched nothing)"
                       for a in replies(cfg, "teacher", predict(base, tok, t_tpl, rows, cfg, "compare: teacher")[0], rows)]}
    del base
    model, _ = student_model(cfg)
    out["student"] = replies(cfg, "student", predict(model, tok, s_tpl, rows, cfg, "compare: student")[0], rows)
    return [{"input": r["input"], **{k: v[i] for k, v in out.items()}} for i, r in enumerate(rows)]
