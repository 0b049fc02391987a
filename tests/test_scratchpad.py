"""Scratchpad internalisation (kind = "scratchpad"), `train --sft`, and their bad inputs, on the tiny model."""

import json
import os
import subprocess
import sys

import pytest

from ctxdistill.tasks import addition


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "ctxdistill", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "CTXDISTILL_QUIET": "1"}, timeout=600, cwd=cwd)


def _recipe(tmp_path, model, extra=""):
    p = tmp_path / "recipe.toml"
    p.write_text(f'''out_dir = "out"
[experiment]
kind = "scratchpad"
{extra}
[model]
name = "{model}"
[train]
method = "full"
lr = 1e-2
batch_size = 8
[eval]
batch_size = 8
''')
    return p


def test_quick_recipe_writes_the_table(tmp_path, tiny_model_dir):
    r = _cli("run", _recipe(tmp_path, tiny_model_dir), "--quick")
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [row["system"] for row in rep["table"]] == ["teacher (scratchpad)", "student before", "student after",
                                                       "Sc->Dir", "Sc+Dir"]
    assert all(0.0 <= row["accuracy"] <= 1.0 and row["tokens_per_answer"] > 0 for row in rep["table"])
    tp = rep["teacher_pass"]
    # Every teacher completion is kept or counted as dropped; the report says which.
    assert tp["kept"] + sum(tp["dropped"].values()) == tp["n_inputs"] == 8 and tp["kept"] > 0
    assert rep["training"]["student"]["n_examples"] == tp["kept"]
    assert rep["training"]["Sc+Dir"]["n_examples"] == 2 * rep["training"]["teacher"]["n_examples"] == 16
    assert rep["training"]["teacher"]["steps"] == 100  # sft_epochs at --quick, 8 rows in one batch
    assert rep["n_eval"] == 8 and rep["transfer"]["n"] == 4 and "ctxdistill run" in rep["command"]
    assert (tmp_path / "out" / "report.md").read_text().startswith("# scratchpad")
    # A rerun reuses the fine-tuned teacher and baselines, the teacher pass and the student.
    saved = sorted((tmp_path / "out").glob("*/model/model.safetensors")) + [tmp_path / "out/distil/student/model.safetensors"]
    assert len(saved) == 4
    mtimes = [f.stat().st_mtime_ns for f in saved]
    r2 = _cli("run", _recipe(tmp_path, tiny_model_dir), "--quick")
    assert r2.returncode == 0 and [f.stat().st_mtime_ns for f in saved] == mtimes
    assert json.loads((tmp_path / "out" / "report.json").read_text())["table"] == rep["table"]


@pytest.mark.parametrize("digits, needle", [(0, "1..64"), (65, "1..64"), ("8", "expected int")])
def test_operand_digits_outside_1_to_64_are_rejected(tmp_path, tiny_model_dir, digits, needle):
    r = _cli("run", _recipe(tmp_path, tiny_model_dir, f"max_digits = {json.dumps(digits)}"))
    assert r.returncode == 2 and "experiment.max_digits" in r.stderr and needle in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    with pytest.raises(Exception, match="1..64"):
        addition.sample(3, max_digits=65)


def test_train_sft_saves_full_weights_and_reuses_them(tmp_path, tiny_task, tiny_model_dir):
    cfg = tiny_task(**{"train.method": '"lora"', "train.epochs": "2"})
    data = tmp_path / "labelled.jsonl"
    data.write_text("".join(json.dumps({"input": f"{a} + {a}", "reference": [str(2 * a)]}) + "\n" for a in range(6)))
    r = _cli("train", cfg, "--sft", data, "--sft-teacher", data)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout[:r.stdout.rindex("}") + 1])
    assert out["n_examples"] == 12 and out["steps"] == 2 * 3  # 12 rows, batch 4 (the fixture's), 2 epochs
    model_dir = tmp_path / "run" / "sft"
    assert (model_dir / "model.safetensors").is_file() and not (model_dir / "adapter_config.json").exists()
    from ctxdistill.core.models import load_model
    load_model(str(model_dir))  # a plain model directory: usable as model.name or train.init
    r2 = _cli("train", cfg, "--sft", data)  # different data: retrained, not reused
    assert r2.returncode == 0 and json.loads(r2.stdout[:r2.stdout.rindex("}") + 1])["n_examples"] == 6
    mtime = (model_dir / "model.safetensors").stat().st_mtime_ns
    r3 = _cli("train", cfg, "--sft", data)  # same data and settings: reused
    assert r3.returncode == 0 and (model_dir / "model.safetensors").stat().st_mtime_ns == mtime


def test_train_sft_bad_file_is_one_line(tmp_path, tiny_task):
    cfg = tiny_task()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "1 + 1"}\n')
    r = _cli("train", cfg, "--sft", bad)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "bad.jsonl" in r.stderr
