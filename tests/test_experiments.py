"""Experiment recipes (Super-NaturalInstructions H1) at --quick scale on the tiny random Llama."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DEMO_TASK
from ctxdistill.core.errors import UserError
from ctxdistill.tasks import superni

ROOT = Path(__file__).resolve().parents[1]


def test_instructions_have_the_superni_parts_each_switchable():
    task = superni.load(DEMO_TASK)
    full = superni.instructions(task, explanations=True)
    assert full.startswith("Definition: ") and "Positive Example 2 -" in full and "Negative Example 2 -" in full
    assert full.count("Explanation: ") == 4 and full.rstrip().endswith("Now complete the following example -")
    bare = superni.instructions(task, definition=False, n_positive=1, n_negative=0)
    assert "Definition" not in bare and "Positive Example 1 -" in bare and "Positive Example 2" not in bare
    assert "Negative" not in bare and "Explanation" not in bare
    tpl = superni.teacher_template(task)
    assert tpl.endswith("Input: {input}\nOutput:") and tpl.format(input="Peru").endswith("Input: Peru\nOutput:")
    with pytest.raises(UserError, match="asked for 3 positive examples, the task has 2"):
        superni.instructions(task, n_positive=3)


def _recipe(tmp_path, tiny_model_dir, tasks, kind="superni_instructions") -> Path:
    p = tmp_path / "recipe.toml"
    p.write_text(f'''out_dir = "out"
[experiment]
kind = "{kind}"
tasks = {json.dumps([str(t) for t in tasks])}
[model]
name = "{tiny_model_dir}"
[generation]
temperature = 1.0
[teach]
batch_size = 8
[train]
lr = 1e-3
batch_size = 4
[eval]
batch_size = 8
''')
    return p


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "ctxdistill", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "CTXDISTILL_QUIET": "1"}, timeout=600)


def test_h1_quick_writes_per_task_rows_and_averages(tmp_path, tiny_model_dir):
    other = json.loads(DEMO_TASK.read_text())
    other["Definition"] = ["Name the capital of the country; answer with the city only {exactly}."]
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks/task9999_capital_copy.json").write_text(json.dumps(other))
    # Task paths relative to the recipe file, run from another directory.
    recipe = _recipe(tmp_path, tiny_model_dir, [DEMO_TASK, "tasks/task9999_capital_copy.json", DEMO_TASK])
    res = _cli("run", os.path.relpath(recipe), "--quick")
    assert res.returncode == 0, res.stderr[-3000:]
    rep = json.loads((tmp_path / "out/report.json").read_text())
    assert rep["quick"] and rep["command"] == f"ctxdistill run {os.path.relpath(recipe)} --quick"
    assert [r["task"] for r in rep["rows"]] == ["task1146_country_capital", "task9999_capital_copy"]  # --quick: 2 tasks
    for r in rep["rows"]:
        for k in ("base", "teacher", "student_before", "student_after"):
            assert 0.0 <= r[k] <= 1.0
        assert r["token_saving"] > 3  # definition + 4 examples vs the bare input
        assert (tmp_path / "out" / r["task"] / "student/ctxdistill_config.json").is_file()
    assert rep["average"]["teacher"] == pytest.approx(sum(r["teacher"] for r in rep["rows"]) / 2)
    md = (tmp_path / "out/report.md").read_text()
    assert md.count("| task | base |") == 1 and "| task9999_capital_copy" in md and "| **average** |" in md
    # The literal braces in the definition reached the teacher prompt unharmed.
    m = json.loads((tmp_path / "out/task9999_capital_copy/teacher/manifest.json").read_text())
    assert "{exactly}" in m["config"]["task"]["teacher"].replace("{{", "{").replace("}}", "}")


def test_h1_bad_task_files(tmp_path, tiny_model_dir):
    raw = json.loads(DEMO_TASK.read_text())
    no_def = {k: v for k, v in raw.items() if k != "Definition"}
    (tmp_path / "nodef.json").write_text(json.dumps(no_def))
    res = _cli("run", _recipe(tmp_path, tiny_model_dir, [tmp_path / "nodef.json"]))
    assert res.returncode == 2 and "nodef.json: missing field 'Definition'" in res.stderr and "Traceback" not in res.stderr
    empty = dict(raw, Instances=[dict(i, output=[""]) for i in raw["Instances"]])
    (tmp_path / "task8888_empty.json").write_text(json.dumps(empty))
    res = _cli("run", _recipe(tmp_path, tiny_model_dir, [tmp_path / "task8888_empty.json", DEMO_TASK]), "--quick")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "task8888_empty: every reference is empty; skipped" in res.stderr
    rep = json.loads((tmp_path / "out/report.json").read_text())
    assert rep["skipped_tasks"] == ["task8888_empty"] and len(rep["rows"]) == 1
    res = _cli("run", _recipe(tmp_path, tiny_model_dir, [DEMO_TASK], kind="superni_everything"))
    assert res.returncode == 2 and "experiment.kind" in res.stderr
    # A bad task anywhere in the list fails before the first task runs.
    (tmp_path / "out").rename(tmp_path / "out.before")
    res = _cli("run", _recipe(tmp_path, tiny_model_dir, [DEMO_TASK, tmp_path / "nodef.json"]))
    assert res.returncode == 2 and "nodef.json: missing field 'Definition'" in res.stderr
    assert not (tmp_path / "out").exists()


def test_h2_quick_compares_teachers_with_and_without_explanations(tmp_path, tiny_model_dir):
    res = _cli("run", _recipe(tmp_path, tiny_model_dir, [DEMO_TASK], kind="superni_explanations"), "--quick")
    assert res.returncode == 0, res.stderr[-3000:]
    rep = json.loads((tmp_path / "out/report.json").read_text())
    (row,) = rep["rows"]
    assert row["in_context_gain"] == pytest.approx(row["teacher_with"] - row["teacher_without"])
    assert row["distilled_gain"] == pytest.approx(row["student_with"] - row["student_without"])
    assert rep["correlation"] is None  # one task: undefined, said so rather than made up
    without = json.loads((tmp_path / "out/without_explanations/task1146_country_capital/teacher/manifest.json").read_text())
    with_ = json.loads((tmp_path / "out/with_explanations/task1146_country_capital/teacher/manifest.json").read_text())
    assert "Explanation:" not in without["config"]["task"]["teacher"]
    assert with_["config"]["task"]["teacher"].count("Explanation:") == 4
    assert with_["config"]["task"]["student"] == without["config"]["task"]["student"] == "{input}"


def test_pearson():
    from ctxdistill.experiments.instructions import pearson

    assert pearson([1, 2, 3, 4], [2, 4, 6, 8]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([1, 2], [1, 2]) is None and pearson([1, 1, 1], [1, 2, 3]) is None


def test_h3_quick_overwrites_ids_naive_and_mixed(tmp_path, tiny_model_dir):
    from conftest import SHARED

    tasks = [SHARED / "superni" / f"{t}.json" for t in ("task833_poem_sentiment_classification",
                                                        "task1193_food_course_classification", "task1189_check_char_in_string")]
    res = _cli("run", _recipe(tmp_path, tiny_model_dir, tasks, kind="superni_overwrite"), "--quick")
    assert res.returncode == 0, res.stderr[-3000:]
    rep = json.loads((tmp_path / "out/report.json").read_text())
    assert [r["system"] for r in rep["rows"]] == ["teacher", "before", "naive", "mixed"]
    assert all(0.0 <= r[c] <= 1.0 for r in rep["rows"] for c in ("correct", "wrong"))
    # --quick keeps 2 tasks, so the re-mapping swaps them.
    assert [(m["id"], m["old"], m["new"]) for m in rep["mapping"]] == [
        ("Task 1", "task833_poem_sentiment_classification", "task1193_food_course_classification"),
        ("Task 2", "task1193_food_course_classification", "task833_poem_sentiment_classification")]
    assert rep["rows"][2]["correct"] == pytest.approx(sum(r["naive"]["correct"] for r in rep["per_id"]) / 2)
    assert rep["mixed_fewer_wrong_than_naive"] == (rep["rows"][3]["wrong"] < rep["rows"][2]["wrong"])
    t = rep["training"]
    assert t["simultaneous"]["n_examples"] == 16 and [s["n_examples"] for s in t["naive"]] == [8, 8]
    # Naive stage 1 (id 1, new task food) distils food inputs only; mixed stage 1 inputs from both tasks.
    out = tmp_path / "out"
    naive1 = [json.loads(line)["id"] for line in open(out / "data/naive_1/train.jsonl")]
    mixed1 = [json.loads(line)["id"] for line in open(out / "data/mixed_1/train.jsonl")]
    assert all(i.startswith("task1193") for i in naive1)
    assert {i.split("-")[0] for i in mixed1} == {"task833", "task1193"} and len(mixed1) == 8
    # The student sees the id and the input; the teacher also the new task's instructions.
    m = json.loads((out / "parts/naive_1/teacher/manifest.json").read_text())["config"]["task"]
    assert m["student"] == "Task 1\n{input}" and "Task 1\nInput: {input}\nOutput:" in m["teacher"]
    assert "food" in m["teacher"].lower() and "poem" not in m["teacher"].lower()
    # Each sequential stage starts from the one before; the first from the simultaneous student (full
    # fine-tuning here, so the student directories themselves; LoRA merges: tests/test_compose.py).
    s2 = json.loads((out / "mixed/stage2/student/ctxdistill_config.json").read_text())
    assert s2["train"]["init"] == str(out / "mixed/stage1/student")
    s1 = json.loads((out / "mixed/stage1/student/ctxdistill_config.json").read_text())
    assert s1["train"]["init"] == str(out / "simultaneous/student")
    md = (out / "report.md").read_text()
    assert "| | Correct ↑ | Wrong ↓ |" in md and "| mixed |" in md
