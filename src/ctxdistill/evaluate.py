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
from ctxdistill.inputs import load_split
from ctxdistill.core.progress import log
from ctxdistill.core.metrics import SCORERS, exact_match, rouge_l
from ctxdistill.core.sampling import generate, prefix_for
from ctxdistill.core.templates import student_template, teacher_template



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
    outs = generate(model, prompts, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id,
                    max_new_tokens=cfg.eval.max_new_tokens, temperature=0.0, batch_size=cfg.eval.batch_size,
                    seed=0, desc=desc, prefix=prefix_for(model, prompts),  # shared context encoded once
                    done=done, on_batch=on_batch)
    texts = [pf + tok.decode(ids, skip_special_tokens=True) for pf, (ids, _) in zip(prefills, outs)]
    if stats is not None:
        stats["cut"] = sum(not fin and len(ids) >= cfg.eval.max_new_tokens for ids, fin in outs)
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
    student scored is the deployable model in `<cfg.out>/model/` (exported first if needed), and its model
    card is written from this report.
    """
    from ctxdistill import export, fidelity, report
    from ctxdistill.core.checks import compile_checks, score_checks

    systems = systems or cfg.eval.systems
    rows = load_split(cfg, "eval")
    checks = compile_checks(cfg.task.checks)
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

    def predict_system(model, system: str, tpl, model_dir: str) -> list[str]:
        texts, lens = predict(model, tok, tpl, rows, cfg, f"eval: {system}", **resume(system, model_dir))
        prompt_tokens[system] = sum(lens) / len(lens)
        prompt_ids[system] = [tpl.render(tok, r["input"])[0] for r in rows[:fidelity.LATENCY_INPUTS]]
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
    rep = report.build(cfg, scores, dropped, prompt_tokens, n_eval=len(rows), checks=check_scores, fidelity=fid)
    report.write(out, rep)
    shutil.rmtree(partial, ignore_errors=True)
    log(f"eval: wrote {out}/report.json, report.md, report.png")
    if cfg.export.merge and student is None and "student" in systems:
        export.write_card(cfg, rep)
    return rep


def student_model(cfg: Config, student: Config | None = None):
    """(model, its directory) of the student to score: with export.merge (and no other `student` config), the
    deployable `<out>/model/`, exported first if needed; else `<out>/student/` (full weights or an adapter)."""
    from ctxdistill import export
    from ctxdistill.train import load_student

    if cfg.export.merge and student is None:
        model_dir = export.export_model(cfg)
        return models.load_model(dataclasses.replace(cfg.model, name=str(model_dir))), model_dir
    return load_student(student or cfg), (student or cfg).out / "student"


def replies(cfg: Config, system: str, texts: list[str], rows: list[dict]) -> list[str | None]:
    """What each system's completion (assistant text, prefill included) is scored as: the teacher's answer
    found by f (None when f fails), the student's text after its prefill, the base model's whole text."""
    if system == "teacher":
        return [answer_text(cfg.task.extractor, t) for t in texts]
    if system == "student":
        prefill = student_template(cfg.task).prefill
        return [t[len(prefill.format(input=r["input"])):].strip() for t, r in zip(texts, rows)]
    return [t.strip() for t in texts]


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
