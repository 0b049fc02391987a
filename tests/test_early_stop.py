"""Early stopping on the distillation loss, and the NaN guard (tiny model).

Early stopping holds out 5% of the distillation set (at least 16 examples, whole inputs), evaluates the
distillation loss on it, stops when it has not improved for `patience` evaluations, and keeps the best
weights; a killed run resumes to the same result. A loss that becomes inf or NaN stops with one line.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import DEMO_TASK, write_jsonl
from ctxdistill.cli import main
from ctxdistill.config import load_config
from ctxdistill.store import read_store
from ctxdistill.teach import teach
from ctxdistill.core.loop import StudentLoss, held_out_loss
from ctxdistill.train import split_held_out, train

# 100 inputs -> 84 train + 16 held out; full fine-tuning at a high lr for many epochs: the held-out loss
# falls to a minimum (step 18 here), then turns up.
LONG = {"generation.samples_per_input": "1", "train.method": '"full"', "train.lr": "1e-2", "train.epochs": "12",
        "train.batch_size": "4", "train.early_stop_every": "3", "train.early_stop_patience": "2",
        "train.checkpoint_every": "6"}


def _inputs(cfg_path, n=100):
    inst = json.loads(DEMO_TASK.read_text())["Instances"][:n]
    write_jsonl(cfg_path.parent / "train.jsonl", [{"id": i["id"], "input": i["input"]} for i in inst])


def test_held_out_slice_is_whole_inputs_and_five_percent(tiny_task):
    cfg = load_config(tiny_task(**{"generation.samples_per_input": "2"}))
    _inputs(cfg.path("config.toml"), n=200)
    teach(cfg)
    _, examples = read_store(cfg.out / "teacher")
    train_part, held = split_held_out(examples, cfg.train)
    assert 20 <= len(held) <= 22 and len(train_part) + len(held) == len(examples)  # ceil(5% of 400) = 20, by input
    key = lambda e: e.id.rsplit("#", 1)[0]  # noqa: E731
    assert not {key(e) for e in held} & {key(e) for e in train_part}
    assert split_held_out(examples, cfg.train)[1] == held  # the same slice every time (train.seed)
    cfg.train.early_stop = False
    assert split_held_out(examples, cfg.train) == (examples, [])
    cfg.train.early_stop = True
    assert split_held_out(examples[:79], cfg.train) == (examples[:79], [])  # too few to spare 16


def test_early_stopping_stops_and_keeps_the_best_weights(tiny_task):
    cfg = load_config(tiny_task(**LONG))
    _inputs(cfg.path("config.toml"))
    teach(cfg)
    summary = train(cfg)
    es = summary["early_stop"]
    total = 12 * 21  # 84 training examples in batches of 4, 12 epochs
    assert es["held_out"] == 16 and es["stopped_early"] and es["stopped_at"] < total
    assert summary["steps"] == es["stopped_at"] and es["best_step"] < es["stopped_at"]
    losses = dict(map(tuple, es["evals"]))
    # The best is the lowest; the two evaluations after it (the patience) are no better.
    assert es["best_loss"] == pytest.approx(min(losses.values()), abs=1e-6) == pytest.approx(losses[es["best_step"]])
    later = [v for s, v in es["evals"] if s > es["best_step"]]
    assert len(later) == 2 and all(v >= es["best_loss"] for v in later)
    assert [s for s, _ in es["evals"]] == list(range(3, es["stopped_at"] + 1, 3))
    # The saved student is the best step's: its held-out loss is the best one, not the last one.
    from ctxdistill.train import load_student

    _, examples = read_store(cfg.out / "teacher")
    _, held = split_held_out(examples, cfg.train)
    tok_eos = json.loads((cfg.out / "teacher/manifest.json").read_text())["terminator_id"]
    model = load_student(cfg)
    value = held_out_loss(StudentLoss(model, loss="forward_kl", eos_id=tok_eos, pad_id=tok_eos), held, 4)
    assert value == pytest.approx(es["best_loss"], abs=1e-4)
    assert value < losses[es["stopped_at"]] - 1e-4
    report = json.loads((cfg.out / "student/ctxdistill_config.json").read_text())
    assert report["early_stop"] == es


def test_early_stopping_resumes_after_a_kill(tiny_task, tmp_path):
    """SIGKILLed after a checkpoint (and after a new best was saved), the run resumes to the same student,
    the same evaluations and the same best step as an uninterrupted one."""
    cfg = tiny_task(**LONG)
    _inputs(cfg)
    teach(load_config(cfg))
    ckpt = cfg.parent / "run" / "student.ckpt" / "state.pt"
    env = {**os.environ, "CTXDISTILL_QUIET": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ctxdistill", "train", str(cfg)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def step():
        try:
            return torch.load(ckpt, weights_only=False)["step"] if ckpt.exists() else 0
        except Exception:  # mid-rename: try again
            return -1
    deadline = time.time() + 240
    while step() < 12 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (ckpt.parent / "best.pt").is_file() and torch.load(ckpt, weights_only=False)["early_stop"]["evals"]
    res = subprocess.run([sys.executable, "-m", "ctxdistill", "train", str(cfg)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    resumed = json.loads((cfg.parent / "run/student/ctxdistill_config.json").read_text())["early_stop"]
    fresh = load_config(cfg)
    fresh.out_dir = str(tmp_path / "fresh")
    teach(fresh)
    want = train(fresh)["early_stop"]
    assert resumed["evals"] == want["evals"] and resumed["best_step"] == want["best_step"]
    a = load_file(cfg.parent / "run/student/model.safetensors")
    b = load_file(fresh.out / "student/model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_an_infinite_loss_stops_with_one_line_and_keeps_the_last_checkpoint(tiny_task, monkeypatch, capsys):
    """Forced: the third step's loss is inf. Exit 2, one line naming step 3, the step-2 checkpoint intact."""
    from ctxdistill.core import loop as train_mod

    cfg = tiny_task(**{"generation.samples_per_input": "1", "train.checkpoint_every": "1", "train.epochs": "3"})
    teach(load_config(cfg))
    real, calls = train_mod.train_step, []

    def step(*a, **kw):
        loss, parts = real(*a, **kw)
        calls.append(1)
        return (float("inf") if len(calls) == 3 else loss), parts
    monkeypatch.setattr(train_mod, "train_step", step)
    rc = main(["train", str(cfg)])
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("ctxdistill: error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "the loss became inf at step 3" in lines[0] and "last good checkpoint (step 2)" in lines[0]
    state = torch.load(cfg.parent / "run/student.ckpt/state.pt", weights_only=False)
    assert state["step"] == 2 and not (cfg.parent / "run/student").exists()
