"""The CLI as a user meets it: real subprocesses, exit codes, one-line errors, nothing half-written."""

import json
import os
import subprocess
import sys



def cli(*args, cwd=None):
    env = {**os.environ, "CTXDISTILL_QUIET": "1"}
    return subprocess.run([sys.executable, "-m", "ctxdistill", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def assert_user_error(res, *needles):
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    lines = [line for line in res.stderr.splitlines() if line.startswith("ctxdistill: error:")]
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_run_end_to_end_via_cli(tiny_task):
    cfg = tiny_task(**{"generation.samples_per_input": "1"})
    res = cli("run", cfg)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "base and student without the context, teacher with it" in res.stdout and "student" in res.stdout
    rep = json.loads((cfg.parent / "run/eval/report.json").read_text())
    assert rep["commands"] == [f"ctxdistill run {cfg}"]
    # Stages one by one reuse what is up to date.
    res = cli("teach", cfg)
    assert res.returncode == 0 and json.loads(res.stdout)["n_inputs"] == 12


def test_missing_and_unknown_config_fields(tiny_task):
    assert_user_error(cli("teach", tiny_task(**{"task.teacher": None})), "task.teacher", "missing")
    assert_user_error(cli("teach", tiny_task(**{"train.learning_rate": "1e-4"})), "train.learning_rate", "unknown field")


def test_template_without_input(tiny_task):
    assert_user_error(cli("teach", tiny_task(**{"task.student": '"just text"'})), "task.student", "{input}")


def test_missing_config_file(tmp_path):
    assert_user_error(cli("run", tmp_path / "nope.toml"), "nope.toml", "not found")


def test_invalid_toml(tmp_path):
    (tmp_path / "c.toml").write_text("[task\nteacher = 1")
    assert_user_error(cli("run", tmp_path / "c.toml"), "c.toml", "invalid TOML")


def test_empty_jsonl(tiny_task):
    cfg = tiny_task()
    (cfg.parent / "train.jsonl").write_text("\n")
    assert_user_error(cli("teach", cfg), "train.jsonl", "empty")
    assert not (cfg.parent / "run/teacher").exists()


def test_malformed_jsonl_names_line(tiny_task):
    cfg = tiny_task()
    good = (cfg.parent / "train.jsonl").read_text().splitlines()
    (cfg.parent / "train.jsonl").write_text("\n".join(good[:3] + ['{"input": "Peru"'] + good[3:]) + "\n")
    assert_user_error(cli("teach", cfg), "train.jsonl:4", "invalid JSON")


def test_eval_file_without_references(tiny_task):
    cfg = tiny_task()
    (cfg.parent / "eval.jsonl").write_text('{"input": "France"}\n')
    assert_user_error(cli("inputs", cfg), "eval.jsonl:1", "reference")


def test_model_path_that_does_not_exist(tiny_task, tmp_path):
    cfg = tiny_task(**{"model.name": f'"{tmp_path}/no-such-model"'})
    assert_user_error(cli("teach", cfg), "model.name", "does not exist")
    assert not (cfg.parent / "run/teacher").exists()


def test_extractor_that_matches_nothing(tiny_task):
    cfg = tiny_task(**{"task.extractor.pattern": "'NEVER_(MATCHES)'"})
    res = cli("teach", cfg)
    assert_user_error(res, "no usable teacher answers", "extractor matched nothing: 24")
    assert not (cfg.parent / "run/teacher").exists()
    assert not list((cfg.parent / "run").glob("teacher.tmp-*"))


def test_out_dir_that_is_a_file(tiny_task):
    cfg = tiny_task()
    (cfg.parent / "run").write_text("I am a file")
    assert_user_error(cli("teach", cfg), "run", "is a file")


def test_bad_hyperparameter(tiny_task):
    assert_user_error(cli("train", tiny_task(**{"train.lr": "nan"})), "train.lr")
    assert_user_error(cli("train", tiny_task(**{"train.epochs": "-1"})), "train.epochs")


def test_unknown_flag_is_a_usage_error(tiny_task):
    res = cli("teach", tiny_task(), "--frobnicate")
    assert res.returncode == 2 and "unrecognized arguments" in res.stderr and "Traceback" not in res.stderr


def test_train_before_teach(tiny_task):
    assert_user_error(cli("train", tiny_task()), "teacher", "ctxdistill teach")


def test_gpu_only_options_on_a_cpu_machine(tiny_task):
    """device = cuda without CUDA, and float16 on the CPU: one-line errors before any work, nothing written."""
    import torch

    if torch.cuda.is_available():  # pragma: no cover - these are CPU-machine checks
        return
    for stage in ("teach", "train", "run"):
        cfg = tiny_task(**{"model.device": '"cuda"'})
        assert_user_error(cli(stage, cfg), "model.device", "'cuda'", "CUDA is not available")
    cfg = tiny_task(**{"model.dtype": '"float16"'})
    assert_user_error(cli("teach", cfg), "model.dtype", "float16 needs a GPU")
    assert not (cfg.parent / "run/teacher").exists()
    assert_user_error(cli("teach", tiny_task(**{"model.device": '"tpu"'})), "model.device", "unknown device")


def test_bfloat16_without_native_cpu_support_falls_back_with_a_warning(monkeypatch, capsys):
    import torch

    from ctxdistill.core import models
    from ctxdistill.config import ModelConfig

    monkeypatch.setattr(models, "_cpu_has_bf16", lambda: False)  # this machine has AVX512-BF16: emulate one without
    monkeypatch.setattr(models, "_WARNED", set())
    device, dtype = models.placement(ModelConfig(device="cpu", dtype="bfloat16"))
    assert (device.type, dtype) == ("cpu", torch.float32)
    assert "no native bfloat16; using float32" in capsys.readouterr().err
    monkeypatch.setattr(models, "_cpu_has_bf16", lambda: True)
    assert models.placement(ModelConfig(device="cpu", dtype="bfloat16"))[1] == torch.bfloat16


def test_log_lines_are_plain_text_and_never_wrapped(capsys):
    """A warning keeps its brackets (rich would read "[rank 1]" or a regex's class as markup and drop it) and
    stays one line however long (rich wrapped at 80 columns in a log file, breaking a path mid-word)."""
    from ctxdistill.core.progress import warn

    msg = "[rank 1] check (?i)[a-z]+ failed for /tmp/" + "d" * 200 + "/student.ckpt"
    warn(msg)
    err = capsys.readouterr().err
    assert err == f"warning: {msg}\n"
