"""Example internalisation recipes (kind = "examples") at --quick scale on the tiny random Llama."""

import json
import os
import subprocess
import sys

import pytest

from conftest import SHARED
from ctxdistill.tasks import dates


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "ctxdistill", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "CTXDISTILL_QUIET": "1"}, timeout=600)


def _recipe(tmp_path, tiny_model_dir, task, extra="", model_extra=""):
    p = tmp_path / "recipe.toml"
    p.write_text(f'''out_dir = "out"
[experiment]
kind = "examples"
task = "{task}"
{extra}
[model]
name = "{tiny_model_dir}"
{model_extra}
[generation]
temperature = 1.0
[train]
lr = 1e-3
batch_size = 4
''')
    return p


def test_dates_are_unambiguous_and_splits_disjoint():
    examples, train, evals = dates.split(8, 50, 50, seed=3)
    iso = [r["reference"][0] for r in examples + evals]
    assert len(set(iso)) == len(iso) == 58 and len({r["input"] for r in train}) == 50
    assert dates.split(8, 50, 50, seed=3) == (examples, train, evals)
    assert [dates.FORMATS[3](__import__("datetime").date(2021, 3, d)) for d in (1, 2, 3, 11, 22)] == [
        "the 1st of March, 2021", "the 2nd of March, 2021", "the 3rd of March, 2021", "the 11th of March, 2021",
        "the 22nd of March, 2021"]
    assert dates.shots(examples[:2]) == [[examples[0]["input"], examples[0]["reference"][0]],
                                         [examples[1]["input"], examples[1]["reference"][0]]]


def _check_report(rep, ks):
    assert [r["system"] for r in rep["table"]] == ["teacher", "student before", "student after",
                                                   "gradient descent (best epoch)", "gradient descent (last epoch)"]
    for r in rep["table"]:
        assert all(0.0 <= r[f"k={k}"] <= 1.0 for k in ks)
    assert rep["table"][1]["k=1"] == rep["table"][1]["k=2"]  # student before has no examples either way
    for k in ks:
        curve = rep["baseline_curves"][f"k={k}"]
        assert [c["epoch"] for c in curve] == [1, 2]
        assert rep["table"][3][f"k={k}"] == max(c["score"] for c in curve)
    b = rep["beyond_window"]
    assert (b["n"], b["m"], b["prompts"]) == (2, 1, 2) and all(len(s) == 1 for s in b["subsets"])
    assert b["rows"][0]["score"] == rep["table"][0]["k=1"] and b["rows"][3]["score"] == rep["table"][0]["k=2"]
    tokens = b["teacher_prompt_tokens_mean"]
    assert tokens["2 examples"] > tokens["1 examples"]


def test_dates_quick(tmp_path, tiny_model_dir):
    r = _cli("run", _recipe(tmp_path, tiny_model_dir, "dates"), "--quick")
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((tmp_path / "out/report.json").read_text())
    assert rep["metric"] == "exact" and rep["groups"] == [{"name": "dates", "n_train": 4, "n_eval": 4}]
    _check_report(rep, [1, 2])
    # The teacher of k=2 sees two worked examples as chat turns; the student the date alone.
    task = json.loads((tmp_path / "out/parts/k2_dates/teacher/manifest.json").read_text())["config"]["task"]
    assert len(task["teacher_shots"]) == 2 and task["student"] == task["teacher"] == "{input}"
    s = json.loads((tmp_path / "out/averaged/student/ctxdistill_config.json").read_text())
    assert s["n_examples"] == 4  # one averaged example per input
    # A rerun recomputes nothing: every score is kept with the hash of what produced it.
    kept = sorted(p.name for p in (tmp_path / "out/results").glob("*.json"))
    assert kept == ["after_k1.json", "after_k2.json", "averaged.json", "baseline_k1.json", "baseline_k2.json",
                    "before.json", "teacher_k1.json", "teacher_k2.json"]
    env = {k: v for k, v in os.environ.items() if k != "CTXDISTILL_QUIET"}  # the log says what was reused
    again = subprocess.run([sys.executable, "-m", "ctxdistill", "run", str(_recipe(tmp_path, tiny_model_dir, "dates")),
                            "--quick"], capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("is up to date; reusing it") >= len(kept) and "baseline: epoch" not in again.stderr
    assert json.loads((tmp_path / "out/report.json").read_text())["table"] == rep["table"]


def test_spider_quick(tmp_path, tiny_model_dir):
    # The schema makes prompts longer than the tiny model's 512 positions: widen its window (RoPE).
    r = _cli("run", _recipe(tmp_path, tiny_model_dir, "spider", f'spider = "{SHARED / "spider"}"', "max_length = 4096"),
             "--quick")
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((tmp_path / "out/report.json").read_text())
    assert rep["metric"] == "execution_accuracy" and [g["name"] for g in rep["groups"]] == ["course_teach",
                                                                                          "employee_hire_evaluation"]
    _check_report(rep, [1, 2])
    details = rep["table"][0]["details"]["k=2"]
    assert set(details) == {"execution_accuracy", "exact_set_match", "parse_error", "exec_error"}
    # Paraphrases of a shown example never reach the eval split.
    shown = {e[1] for e in json.loads((tmp_path / "out/parts/k2_course_teach/teacher/manifest.json").read_text())
             ["config"]["task"]["teacher_shots"]}
    evals = [json.loads(line) for line in open(tmp_path / "out/data/course_teach/eval.jsonl")]
    assert evals and not shown & {e["reference"][0] for e in evals}
    assert "CREATE TABLE" in evals[0]["input"] and "Question:" in evals[0]["input"]


@pytest.mark.parametrize("extra, message", [
    ('k = []', "experiment.k: must be a non-empty list of integers >= 1"),
    ('k = [4, 8]\nspider = ""', "experiment.task: unknown task"),
])
def test_bad_examples_recipes(tmp_path, tiny_model_dir, extra, message):
    task = "dates" if "spider" not in extra else "sql"
    r = _cli("run", _recipe(tmp_path, tiny_model_dir, task, extra))
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
