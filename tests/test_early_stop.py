"""Early stopping on the distillation loss, and the NaN guard (tiny model).

Early stopping holds out 5% of the distillation set (at least 16 examples, whole inputs), evaluates the
distillation loss on it; when it has not improved for `patience` evaluations it anneals the learning rate to
0 over a cool-down and stops, keeping the best weights; a killed run resumes to the same result. A loss that becomes inf or NaN stops with one line.
"""

import json
import math
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
from ctxdistill.inputs import prepare_inputs
from ctxdistill.store import read_store
from ctxdistill.teach import teach
from ctxdistill.core.loop import EarlyStop, StudentLoss, held_out_loss, lr_lambda
from ctxdistill.train import split_held_out, train

# 100 inputs -> 84 train + 16 held out; full fine-tuning at a high lr for many epochs: the held-out loss
# falls to a minimum, then turns up.
LONG = {"generation.samples_per_input": "1", "train.method": '"full"', "train.lr": "1e-2", "train.epochs": "12",
        "train.batch_size": "4", "train.early_stop_every": "3", "train.early_stop_patience": "2",
        "train.checkpoint_every": "6"}


def _inputs(cfg_path, n=100):
    inst = json.loads(DEMO_TASK.read_text())["Instances"][:n]
    write_jsonl(cfg_path.parent / "train.jsonl", [{"id": i["id"], "input": i["input"]} for i in inst])


def test_held_out_slice_is_whole_inputs_and_five_percent(tiny_task):
    cfg = load_config(tiny_task(**{"generation.samples_per_input": "2"}))
    _inputs(cfg.path("config.toml"), n=200)
    prepare_inputs(cfg)
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


def test_early_stopping_anneals_at_the_plateau_stops_and_keeps_the_best_weights(tiny_task):
    cfg = load_config(tiny_task(**LONG))
    _inputs(cfg.path("config.toml"))
    prepare_inputs(cfg)
    teach(cfg)
    summary = train(cfg)
    es = summary["early_stop"]
    total = 12 * 21  # 84 training examples in batches of 4, 12 epochs
    assert es["held_out"] == 16 and es["stopped_early"] and es["stopped_at"] < total
    assert summary["steps"] == es["stopped_at"] and es["best_step"] < es["stopped_at"]
    losses = dict(map(tuple, es["evals"]))
    # The best is the lowest seen.
    assert es["best_loss"] == pytest.approx(min(losses.values()), abs=1e-6) == pytest.approx(losses[es["best_step"]])
    # The plateau: the 2 evaluations (the patience) after the last improvement are no better; the cool-down
    # starts there and lasts ceil(0.2 x its start) steps, and the loss is evaluated where it ends.
    s, n = es["cooldown_after"], es["cooldown_steps"]
    assert s % 3 == 0 and n == math.ceil(0.2 * s) and es["stopped_at"] == s + n
    assert [st for st, _ in es["evals"]] == list(range(3, s + n + 1, 3)) + ([s + n] if (s + n) % 3 else [])
    # The learning rate falls linearly from its value at the plateau to 0 at the end of the cool-down
    # (a step's `lr` is the rate the next step will use).
    lr = {h["step"]: h["lr"] for h in summary_history(cfg)}
    falls = [lr[t] for t in range(s, s + n + 1)]
    assert falls[-1] == 0 and lr[s] == pytest.approx(1e-2 * (total - s) / total)
    assert all(b - a == pytest.approx(-lr[s] / n) for a, b in zip(falls, falls[1:]))
    # The saved student is the best step's: its held-out loss is the best one, not the last one.
    from ctxdistill.core.student import load_student

    _, examples = read_store(cfg.out / "teacher")
    _, held = split_held_out(examples, cfg.train)
    tok_eos = json.loads((cfg.out / "teacher/manifest.json").read_text())["terminator_id"]
    model = load_student(cfg)
    value = held_out_loss(StudentLoss(model, loss="forward_kl", eos_id=tok_eos, pad_id=tok_eos), held, 4)
    assert value == pytest.approx(es["best_loss"], abs=1e-4)
    if es["best_step"] != es["stopped_at"]:
        assert value < losses[es["stopped_at"]] - 1e-4
    report = json.loads((cfg.out / "student/ctxdistill_config.json").read_text())
    assert report["early_stop"] == es


def summary_history(cfg) -> list[dict]:
    return [json.loads(line) for line in open(cfg.out / "student/train_log.jsonl")]


def test_the_last_step_is_evaluated_off_the_grid(tiny_task):
    """21 steps evaluated every 4: the held-out loss is also taken after step 21, so the kept weights can be
    the last step's (before, a run that ended between evaluations could restore an older step)."""
    cfg = load_config(tiny_task(**{**LONG, "train.epochs": "1", "train.early_stop_every": "4",
                                   "train.early_stop_patience": "100"}))
    _inputs(cfg.path("config.toml"))
    prepare_inputs(cfg)
    teach(cfg)
    es = train(cfg)["early_stop"]
    assert [s for s, _ in es["evals"]] == [4, 8, 12, 16, 20, 21]
    assert es["stopped_at"] == 21 and not es["stopped_early"] and es["cooldown_after"] is None


def test_a_plateau_without_cooldown_stops_at_once():
    """EarlyStop alone: patience counts evaluations without a gain of 0.1% (and 1e-4) over the last gain."""
    stop = EarlyStop(patience=2, cooldown=0.0)
    assert stop.update(3, 1.0) and not stop.plateaued(3)
    assert stop.update(6, 0.9995) and not stop.plateaued(6)  # a new best, but within 0.1%: not a gain
    assert not stop.update(9, 1.5) and stop.plateaued(9)  # the second evaluation without a gain
    assert stop.best_step == 6 and stop.cool_start is None
    cool = EarlyStop(patience=2, cooldown=0.5)
    for step, loss in ((4, 1.0), (8, 1.2), (12, 1.1)):
        cool.update(step, loss)
        assert not cool.plateaued(step)
    assert (cool.cool_start, cool.cool_len, cool.cool_end) == (12, 6, 18)
    # The schedule: linear decay over 100 steps, then from step 12's factor to 0 over 6 steps.
    f = lr_lambda(100, 0.0, cool)
    assert [f(t) for t in (0, 11, 12)] == pytest.approx([1.0, 0.89, 0.88])
    assert [f(t) for t in (15, 18, 40)] == pytest.approx([0.44, 0.0, 0.0])
    restored = EarlyStop(patience=2, cooldown=0.5)
    restored.restore(cool.state())
    assert restored.state() == cool.state() and restored.cool_end == 18


def test_early_stopping_resumes_after_a_kill(tiny_task, tmp_path):
    """SIGKILLed after a checkpoint (and after a new best was saved), the run resumes to the same student,
    the same evaluations and the same best step as an uninterrupted one."""
    cfg = tiny_task(**LONG)
    _inputs(cfg)
    prepare_inputs(load_config(cfg))
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
    prepare_inputs(fresh)
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
    prepare_inputs(load_config(cfg))
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
