"""Kill and resume, five times per stage, with real subprocesses and SIGKILL: nothing lost, nothing
duplicated, the same final artefacts as an uninterrupted run with the same seed."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from conftest import DEMO_TASK, write_jsonl
from ctxdistill.config import load_config
from ctxdistill.inputs import prepare_inputs
from ctxdistill.store import read_store
from ctxdistill.teach import teach
from ctxdistill.train import train

CYCLES = 5
# 180 full fine-tuning steps of the tiny model, a checkpoint every 10: long enough to kill mid-run.
TRAIN_LONG = {"generation.samples_per_input": "1", "train.epochs": "30", "train.batch_size": "2",
              "train.checkpoint_every": "10", "train.method": '"full"'}


def _cmd(stage, cfg):
    return [sys.executable, "-m", "ctxdistill", stage, str(cfg)], {**os.environ, "CTXDISTILL_QUIET": "1"}


def _kill_when(stage, cfg, progressed, rng, timeout=240):
    """Start `ctxdistill STAGE`, wait until `progressed()` says it saved more work, SIGKILL it after a
    random few milliseconds more; return False if it finished first."""
    cmd, env = _cmd(stage, cfg)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    while not progressed() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(rng.uniform(0, 0.05))
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def _inputs(cfg_path, n=60):
    inst = json.loads(DEMO_TASK.read_text())["Instances"][:n]
    write_jsonl(cfg_path.parent / "train.jsonl", [{"id": i["id"], "input": i["input"]} for i in inst])


def test_teacher_pass_killed_five_times(tiny_task, tmp_path):
    cfg = tiny_task(**{"teach.shard_size": "3", "teach.batch_size": "3", "generation.max_new_tokens": "24"})
    _inputs(cfg)
    store = cfg.parent / "run" / "teacher"
    rng, kills = random.Random(0), []
    for _ in range(CYCLES):
        before = len(list(store.glob("shard-*.json")))
        assert _kill_when("teach", cfg, lambda: len(list(store.glob("shard-*.json"))) > before, rng)
        assert not (store / "manifest.json").exists()
        kills.append(len(list(store.glob("shard-*.json"))))
    cmd, env = _cmd("teach", cfg)
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    manifest, resumed = read_store(store)
    ids = [e.id for e in resumed]
    assert len(ids) == len(set(ids)) and manifest["n_examples"] + sum(manifest["dropped"].values()) == 2 * 60
    fresh = load_config(cfg)
    fresh.out_dir = str(tmp_path / "fresh")
    prepare_inputs(fresh)
    teach(fresh)
    fm, _ = read_store(fresh.out / "teacher")
    # Bit-identical shards and manifest contents (paths aside).
    assert [s["sha256_safetensors"] for s in fm["shards"]] == [s["sha256_safetensors"] for s in manifest["shards"]]
    strip = lambda m: {k: v for k, v in m.items() if k != "config"}  # noqa: E731 - config names the out_dir
    assert strip(fm) == strip(manifest)
    assert kills == sorted(kills) and kills[-1] < 20


def _saved_step(ckpt) -> int:
    """The step of the training checkpoint `ckpt` (0 without one, -1 while it is being renamed)."""
    try:
        return torch.load(ckpt, weights_only=False)["step"] if ckpt.exists() else 0
    except Exception:  # mid-rename on a slow disk: try again
        return -1


def _kill_training(cfg, ckpt, rng) -> list[int]:
    """`ctxdistill train` killed CYCLES times, each once it has saved a checkpoint past the last; the steps saved."""
    kills = []
    for _ in range(CYCLES):
        before = _saved_step(ckpt)
        assert _kill_when("train", cfg, lambda: _saved_step(ckpt) > before, rng)
        kills.append(_saved_step(ckpt))
    return kills


def test_training_killed_five_times(tiny_task, tmp_path):
    cfg = tiny_task(**TRAIN_LONG)
    _inputs(cfg, n=12)
    prepare_inputs(load_config(cfg))
    teach(load_config(cfg))
    ckpt = cfg.parent / "run" / "student.ckpt" / "state.pt"

    kills = _kill_training(cfg, ckpt, random.Random(1))
    assert kills == sorted(kills) and len(set(kills)) == CYCLES  # each life saved further progress
    cmd, env = _cmd("train", cfg)
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert not ckpt.parent.exists()  # removed once the student is saved
    resumed = load_file(cfg.parent / "run" / "student" / "model.safetensors")
    log = [json.loads(x) for x in (cfg.parent / "run" / "student" / "train_log.jsonl").read_text().splitlines()]
    assert [h["step"] for h in log] == list(range(1, len(log) + 1)) and len(log) == 30 * 6  # none lost or repeated
    fresh = load_config(cfg)
    fresh.out_dir = str(tmp_path / "fresh")
    prepare_inputs(fresh)
    teach(fresh)
    train(fresh)
    want = load_file(fresh.out / "student" / "model.safetensors")
    assert max((resumed[k] - want[k]).abs().max().item() for k in want) < 1e-5
    fresh_log = [json.loads(x) for x in (fresh.out / "student" / "train_log.jsonl").read_text().splitlines()]
    assert [round(h["loss"], 5) for h in fresh_log] == [round(h["loss"], 5) for h in log]


def test_on_policy_training_killed_five_times(tiny_task, tmp_path):
    """On-policy (the student's rollouts scored by a frozen teacher): killed five times, it resumes from its
    checkpoints without repeating a step, with the rollout counts it had, and ends with the uninterrupted run's
    weights, losses and counts."""
    cfg = tiny_task(**{**TRAIN_LONG, "train.mode": '"on-policy"', "train.epochs": "10", "train.checkpoint_every": "5",
                       "generation.max_new_tokens": "4"})
    _inputs(cfg, n=12)
    ckpt = cfg.parent / "run" / "student.ckpt" / "state.pt"

    kills = _kill_training(cfg, ckpt, random.Random(4))
    assert kills == sorted(kills) and len(set(kills)) == CYCLES
    state = torch.load(ckpt, weights_only=False)
    assert state["totals"]["rollouts"] == 2 * state["step"]  # the counts of every step taken, none twice
    cmd, env = _cmd("train", cfg)
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert not ckpt.parent.exists()
    run = cfg.parent / "run" / "student"
    log = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    assert [h["step"] for h in log] == list(range(1, 10 * 6 + 1))
    fresh = load_config(cfg)
    fresh.out_dir = str(tmp_path / "fresh")
    prepare_inputs(fresh)
    want_summary = train(fresh)
    got_summary = json.loads((run / "ctxdistill_config.json").read_text())
    assert got_summary["on_policy"] == want_summary["on_policy"] and want_summary["on_policy"]["rollouts"] == 10 * 12
    want = load_file(fresh.out / "student" / "model.safetensors")
    resumed = load_file(run / "model.safetensors")
    assert max((resumed[k] - want[k]).abs().max().item() for k in want) < 1e-5
    fresh_log = [json.loads(x) for x in (fresh.out / "student" / "train_log.jsonl").read_text().splitlines()]
    assert [round(h["loss"], 5) for h in fresh_log] == [round(h["loss"], 5) for h in log]


def test_a_checkpoint_carries_the_gpu_random_state_and_resumes_without_a_gpu(tmp_path, monkeypatch):
    """Checkpoints save the CUDA generator's state beside the CPU's (dropout on a GPU draws from it) and restore
    it; one written on a GPU machine resumes on a machine without one. No GPU here: torch.cuda's state functions
    are stood in for, the checkpoint file is real."""
    from ctxdistill.core import loop

    sched = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)]), lambda _: 1.0)
    history = [{"step": 1}]
    gpu_state, restored = torch.arange(16, dtype=torch.uint8), []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: gpu_state.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", restored.append)
    loop.save_checkpoint(tmp_path, {"k": 1}, {}, {}, sched, history)
    state = loop.load_checkpoint(tmp_path, {"k": 1})
    cpu_before = torch.get_rng_state()
    torch.rand(3)  # moves the CPU generator on
    loop.set_rng_states(state)
    assert torch.equal(torch.get_rng_state(), cpu_before) and len(restored) == 1 and torch.equal(restored[0], gpu_state)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same file on a machine without a GPU
    loop.set_rng_states(loop.load_checkpoint(tmp_path, {"k": 1}))
    assert len(restored) == 1 and torch.equal(torch.get_rng_state(), cpu_before)


def test_evaluation_killed_five_times(tiny_task, tmp_path):
    over = {"generation.samples_per_input": "1", "eval.batch_size": "2", "eval.max_new_tokens": "16"}
    cfg = tiny_task(**over)
    _inputs(cfg, n=8)
    inst = json.loads(DEMO_TASK.read_text())["Instances"][100:160]
    write_jsonl(cfg.parent / "eval.jsonl", [{"id": i["id"], "input": i["input"], "reference": i["output"]} for i in inst])
    c = load_config(cfg)
    prepare_inputs(c)
    teach(c)
    train(c)
    partial = cfg.parent / "run" / "eval" / ".partial"

    def batches():
        return sum(len(f.read_text().splitlines()) for f in partial.glob("*.jsonl")) if partial.exists() else 0
    rng, kills = random.Random(2), []
    for _ in range(CYCLES):
        before = batches()
        assert _kill_when("eval", cfg, lambda: batches() > before + 1, rng)
        kills.append(batches())
    assert kills == sorted(kills)
    cmd, env = _cmd("eval", cfg)
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert not partial.exists()
    resumed = (cfg.parent / "run" / "eval" / "predictions.jsonl").read_text()
    fresh = load_config(cfg)
    fresh.out_dir = str(tmp_path / "fresh")
    prepare_inputs(fresh)
    teach(fresh)
    train(fresh)
    from ctxdistill.evaluate import evaluate
    evaluate(fresh)
    assert (fresh.out / "eval" / "predictions.jsonl").read_text() == resumed
    assert len(resumed.splitlines()) == 60


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tiny_task):
    """A real write failure: the process's file-size limit (RLIMIT_FSIZE; Python ignores SIGXFSZ, so
    writes past it fail with EFBIG as on a full disk) is set below the checkpoint's size."""
    import resource

    cfg = tiny_task(**TRAIN_LONG)
    _inputs(cfg, n=12)
    prepare_inputs(load_config(cfg))
    teach(load_config(cfg))
    ckpt = cfg.parent / "run" / "student.ckpt" / "state.pt"
    assert _kill_when("train", cfg, ckpt.exists, random.Random(3))
    good = ckpt.read_bytes()
    limit = len(good) // 2

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    cmd, env = _cmd("train", cfg)
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, preexec_fn=small_files)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [x for x in res.stderr.splitlines() if x.startswith("ctxdistill: error:")]
    assert len(lines) == 1 and "state.pt" in lines[0] and "intact" in lines[0] and "Traceback" not in res.stderr
    assert ckpt.read_bytes() == good and not list(ckpt.parent.glob(".*tmp*"))
    assert not (cfg.parent / "run" / "student").exists()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)  # room again: resumes
    assert res.returncode == 0 and (cfg.parent / "run" / "student" / "model.safetensors").is_file()


def test_same_config_and_seed_give_the_same_set_and_numbers(tiny_task, tmp_path):
    """Determinism on the CPU: two full runs (sampling at temperature 1) from scratch agree exactly."""
    from ctxdistill.pipeline import run

    cfg = tiny_task(**{"generation.temperature": "1.0", "generation.samples_per_input": "2"})
    reps, stores = [], []
    for name in ("a", "b"):
        c = load_config(cfg)
        c.out_dir = str(tmp_path / name)
        reps.append(run(c))
        stores.append(read_store(c.out / "teacher")[0])
    assert [s["sha256_safetensors"] for s in stores[0]["shards"]] == [s["sha256_safetensors"] for s in stores[1]["shards"]]
    assert reps[0]["scores"] == reps[1]["scores"]
    assert (tmp_path / "a/eval/predictions.jsonl").read_text() == (tmp_path / "b/eval/predictions.jsonl").read_text()
    wa = load_file(tmp_path / "a/student/adapter_model.safetensors") if (tmp_path / "a/student/adapter_model.safetensors").exists() \
        else load_file(tmp_path / "a/student/model.safetensors")
    wb = load_file(next((tmp_path / "b/student").glob("*.safetensors")))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_every_corrupted_shard_file_is_detected(tiny_task):
    """Flip a byte in, truncate or delete each file of each shard, and damage the manifest: read_store
    refuses every one by name, and the teacher pass regenerates the same shards."""
    import pytest

    from ctxdistill.core.errors import UserError

    cfg = load_config(tiny_task(**{"teach.shard_size": "4"}))
    prepare_inputs(cfg)
    m = teach(cfg)
    store = cfg.out / "teacher"
    files = sorted(p for p in store.iterdir() if p.name.startswith("shard-") and p.suffix in (".safetensors", ".jsonl"))
    assert len(files) == 2 * len(m["shards"]) >= 6
    tried = detected = 0
    for f in files:
        for how in ("flip", "truncate", "delete"):
            good = f.read_bytes()
            if how == "flip":
                i = len(good) // 2
                f.write_bytes(good[:i] + bytes([good[i] ^ 0x01]) + good[i + 1:])
            elif how == "truncate":
                f.write_bytes(good[:len(good) // 3])
            else:
                f.unlink()
            tried += 1
            with pytest.raises(UserError, match="corrupted") as e:
                read_store(store)
            detected += f.name in str(e.value)
            again = teach(cfg)  # regenerates the damaged shard
            assert [s["sha256_safetensors"] for s in again["shards"]] == [s["sha256_safetensors"] for s in m["shards"]]
            assert f.read_bytes() == good
    (store / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="manifest"):
        read_store(store)
    (store / next(store.glob("shard-*.json")).name).write_text("garbage")  # a damaged shard stats file
    teach(cfg)
    assert detected == tried == 3 * len(files)


def test_a_second_command_in_the_same_out_dir_is_refused_and_a_killed_ones_lock_is_taken_over(tiny_task, capsys):
    """Two commands writing one out_dir would mix their stores and checkpoints: while `ctxdistill train` runs,
    another command there is one line naming its pid (exit 2); once it is SIGKILLed, the next command takes the
    lock it left, runs, and releases it."""
    from ctxdistill.cli import main

    cfg = tiny_task(**TRAIN_LONG)
    _inputs(cfg)
    prepare_inputs(load_config(cfg))
    teach(load_config(cfg))
    lock = load_config(cfg).out / ".ctxdistill.lock"
    cmd, env = _cmd("train", cfg)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not lock.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert lock.read_text().split() == [str(proc.pid)]
    assert main(["teach", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"another ctxdistill command (pid {proc.pid})" in err
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert lock.exists()  # left by the killed run
    assert main(["teach", str(cfg)]) == 0 and not lock.exists()
