"""Multi-process runs with real processes on the gloo backend (`ctxdistill ... --num-processes N`, which is
`accelerate launch`): the same distillation set and student as one process, resume after a kill (with a
different world size too), and a crashed rank failing the whole run instead of hanging."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import DEMO_TASK, write_jsonl
from ctxdistill.config import load_config
from ctxdistill.inputs import prepare_inputs
from ctxdistill.store import read_store
from ctxdistill.teach import teach
from ctxdistill.train import train

ACCELERATE = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc to find a rank's process")

# LoRA on the tiny model, 4 examples a step (2 per rank), a checkpoint every 3 steps; 12 inputs x 2 samples.
SETTINGS = {"train.method": '"lora"', "train.epochs": "3", "train.batch_size": "4", "train.checkpoint_every": "3",
            "teach.shard_size": "4", "teach.batch_size": "4"}


def _inputs(cfg_path: Path, n: int) -> None:
    inst = json.loads(DEMO_TASK.read_text())["Instances"][:n]
    write_jsonl(cfg_path.parent / "train.jsonl", [{"id": i["id"], "input": i["input"]} for i in inst])


def _launch(stage: str, cfg: Path, n: int, out: Path, accelerate_config: str | None = None, quiet: bool = True):
    """`ctxdistill STAGE --num-processes n`, or with an accelerate config: `accelerate launch --config_file
    configs/accelerate/NAME -m ctxdistill STAGE` (its process count)."""
    env = {**os.environ, "CTXDISTILL_QUIET": "1" if quiet else "", "CTXDISTILL_DIST_TIMEOUT": "120"}
    args = [stage, str(cfg), "--out", str(out)]
    if accelerate_config is None:
        cmd = [sys.executable, "-m", "ctxdistill", *args, "--num-processes", str(n)]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE / accelerate_config),
               "--main_process_port", str(port), "-m", "ctxdistill", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc, timeout=600) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return err


def _single(cfg: Path, out: Path):
    c = load_config(cfg)
    c.out_dir = str(out)
    prepare_inputs(c)
    teach(c)
    train(c)
    return c


def _same_store(a: Path, b: Path) -> None:
    ma, _ = read_store(a)
    mb, _ = read_store(b)
    assert [s["sha256_safetensors"] for s in ma["shards"]] == [s["sha256_safetensors"] for s in mb["shards"]]
    assert [s["sha256_jsonl"] for s in ma["shards"]] == [s["sha256_jsonl"] for s in mb["shards"]]
    strip = lambda m: {k: v for k, v in m.items() if k != "config"}  # noqa: E731 - config names the out_dir
    assert strip(ma) == strip(mb)


def _same_student(a: Path, b: Path, tol: float = 1e-5) -> None:
    wa, wb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < tol
    la = [json.loads(x) for x in (a / "train_log.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (b / "train_log.jsonl").read_text().splitlines()]
    assert [h["step"] for h in la] == [h["step"] for h in lb]
    # the global loss and token counts of every step, all-reduced over the ranks (float sums in another order)
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(la, lb)) < 1e-6
    assert [h["tokens"] for h in la] == [h["tokens"] for h in lb]


def test_two_processes_give_the_same_set_and_student_as_one(tiny_task, tmp_path):
    cfg = tiny_task(**SETTINGS)
    _inputs(cfg, 12)
    one = _single(cfg, tmp_path / "one")
    err = _finish(_launch("run", cfg, 2, tmp_path / "two"))
    assert "Traceback" not in err
    _same_store(one.out / "teacher", tmp_path / "two" / "teacher")  # shards 0, 2 by rank 0; 1 by rank 1
    _same_student(one.out / "student", tmp_path / "two" / "student")
    report = json.loads((tmp_path / "two" / "eval" / "report.json").read_text())  # evaluated once, by rank 0
    assert set(report["scores"]) >= {"base", "teacher", "student"}
    assert (tmp_path / "two" / "commands.txt").read_text().count("\n") == 1  # recorded by rank 0 only


def test_fsdp_shards_the_student_and_matches_one_process_after_a_kill(tiny_task, tmp_path):
    """FSDP2 (configs/accelerate/fsdp_cpu.yaml): full fine-tuning with every weight split over 2 ranks.
    Killed after a checkpoint (gathered whole from the shards), resumed by 2 DDP processes and killed again,
    resumed under FSDP (each rank taking its shards of the whole checkpoint): the saved student (gathered
    again) equals an uninterrupted 1-process run."""
    cfg = tiny_task(**{**SETTINGS, "train.method": '"full"', "train.epochs": "6"})
    _inputs(cfg, 12)
    out = tmp_path / "fsdp"
    ckpt = out / "student.ckpt" / "state.pt"
    proc = _launch("run", cfg, 2, out, accelerate_config="fsdp_cpu.yaml")
    _wait(proc, lambda: _ckpt_step(ckpt) >= 9)
    _kill_all(proc)
    step = _ckpt_step(ckpt)
    proc = _launch("train", cfg, 2, out, quiet=False)  # DDP, from the FSDP checkpoint
    _wait(proc, lambda: _ckpt_step(ckpt) >= 21)
    _kill_all(proc)
    assert f"resuming from {ckpt.parent} at step {step}/36" in " ".join(proc.stderr.read().split())
    err = " ".join(_finish(_launch("run", cfg, 2, out, accelerate_config="fsdp_cpu.yaml", quiet=False)).split())
    assert "2 process(es), FSDP2 (CPU), rank 0 holds" in err and "resuming from" in err
    held = float(err.split("rank 0 holds ")[1].split("%")[0])
    assert 45 < held < 55  # half of every tensor (FSDP2 pads uneven rows)
    one = _single(cfg, tmp_path / "one")
    wa = load_file(one.out / "student" / "model.safetensors")
    wb = load_file(out / "student" / "model.safetensors")
    assert wa.keys() == wb.keys() and len(wa) > 10  # every tensor whole, not one rank's shard
    assert all(wa[k].shape == wb[k].shape for k in wa)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4
    la = [json.loads(x) for x in (one.out / "student" / "train_log.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (out / "student" / "train_log.jsonl").read_text().splitlines()]
    assert len(la) == len(lb) == 36 and max(abs(x["loss"] - y["loss"]) for x, y in zip(la, lb)) < 1e-6


def test_on_policy_training_with_two_processes_matches_one(tiny_task, tmp_path):
    """On-policy under DDP: each rank rolls out only its share of the batch (each input from its own random
    stream, so the same rollouts as one process), in 2 micro-batches (train.grad_accum): the student, the losses
    and the rollout counts (summed over the ranks) equal one process's without accumulation."""
    cfg = tiny_task(**{**SETTINGS, "train.mode": '"on-policy"', "train.epochs": "2"})
    _inputs(cfg, 12)
    c = load_config(cfg)
    c.out_dir = str(tmp_path / "one")
    prepare_inputs(c)
    one = train(c)
    accumulated = cfg.with_name("accumulated.toml")
    accumulated.write_text(cfg.read_text().replace("[train]", "[train]\ngrad_accum = 2", 1))
    assert load_config(accumulated).train.grad_accum == 2
    _finish(_launch("train", accumulated, 2, tmp_path / "two"))
    _same_student(c.out / "student", tmp_path / "two" / "student")
    two = json.loads((tmp_path / "two" / "student" / "ctxdistill_config.json").read_text())
    assert two["on_policy"]["rollouts"] == one["on_policy"]["rollouts"] == 2 * 12
    assert two["on_policy"]["mean_rollout_tokens"] == pytest.approx(one["on_policy"]["mean_rollout_tokens"])


def test_mixed_precision_is_part_of_the_students_reuse_key(tiny_task, tmp_path, monkeypatch):
    from ctxdistill.core.student import up_to_date

    c = load_config(tiny_task(**{"train.epochs": "1"}))
    prepare_inputs(c)
    teach(c)
    summary = train(c)
    assert summary["mixed_precision"] == "no" and up_to_date(c, summary["store_hash"], False) is not None
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # as `accelerate launch --mixed_precision bf16` sets
    assert up_to_date(c, summary["store_hash"], False) is None


def _wait(proc, cond, timeout=300) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert proc.poll() is None, "finished before it could be killed: " + proc.stderr.read()[-2000:]
        assert time.time() < deadline, "no progress"
        time.sleep(0.01)


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun starts the ranks in sessions of their own, so no killpg)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _kill_all(proc) -> None:
    """SIGKILL the launcher and every rank at once, as a machine failure would."""
    for pid in [proc.pid, *_descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def _ckpt_step(path: Path) -> int:
    import torch

    try:
        return torch.load(path, weights_only=False)["step"] if path.exists() else 0
    except Exception:  # mid-rename: try again
        return 0


def test_killed_mid_teach_and_mid_train_resumes_even_with_another_world_size(tiny_task, tmp_path):
    cfg = tiny_task(**{**SETTINGS, "teach.shard_size": "2", "teach.batch_size": "2", "train.epochs": "6"})
    _inputs(cfg, 24)
    out = tmp_path / "two"
    store, ckpt = out / "teacher", out / "student.ckpt" / "state.pt"
    # 1. kill every process while the ranks are writing shards
    proc = _launch("teach", cfg, 2, out)
    _wait(proc, lambda: len(list(store.glob("shard-*.json"))) >= 3)
    _kill_all(proc)
    assert not (store / "manifest.json").exists()
    done_before = {p.name for p in store.glob("shard-*.json")}
    # 2. resume the teacher pass (2 ranks), then start training and kill it after a checkpoint
    proc = _launch("run", cfg, 2, out)
    _wait(proc, lambda: _ckpt_step(ckpt) >= 6)
    _kill_all(proc)
    assert done_before <= {p.name for p in store.glob("shard-*.json")} and (store / "manifest.json").exists()
    # 3. resume training with 3 processes: the same global batches, split three ways
    _finish(_launch("train", cfg, 3, out))
    one = _single(cfg, tmp_path / "one")
    _same_store(one.out / "teacher", store)
    _same_student(one.out / "student", out / "student")
    assert not ckpt.parent.exists()


def _rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of the process the launcher started as RANK=rank (its environment, read from /proc)."""
    for pid in _descendants(launcher):
        try:
            if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return pid
        except OSError:
            continue
    return None


def test_a_rank_that_dies_fails_the_whole_run_quickly(tiny_task, tmp_path):
    cfg = tiny_task(**{**SETTINGS, "teach.shard_size": "2", "teach.batch_size": "2", "generation.max_new_tokens": "24"})
    _inputs(cfg, 200)
    out = tmp_path / "two"
    proc = _launch("teach", cfg, 2, out)
    _wait(proc, lambda: len(list((out / "teacher").glob("shard-*.json"))) >= 2)
    victim = _rank_pid(proc.pid, 1)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    t0 = time.time()
    survivors = [p for p in _descendants(proc.pid) if p != victim]
    _, err = proc.communicate(timeout=120)  # never hangs: the launcher stops rank 0 and fails
    assert proc.returncode != 0 and time.time() - t0 < 60
    assert "rank" in err.lower() and ("SIGKILL" in err or "Signal 9" in err or "-9" in err), err[-2000:]
    assert not (out / "teacher" / "manifest.json").exists()
    time.sleep(1)
    assert not [p for p in survivors if _alive(p)]  # rank 0 and the launcher are gone too


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_gpu_throughput_script_runs(tmp_path):
    """benchmarks/gpu_throughput.py, ready for a GPU: its --smoke mode runs the same code on a tiny model here."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "gpu.json"
    res = subprocess.run([sys.executable, str(root / "benchmarks" / "gpu_throughput.py"), "--smoke", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads(out.read_text())
    assert {"gpu", "peak_bf16_tflops", "train_tok_s", "mfu"} <= set(r) and r["train_tok_s"] > 0 and r["mfu"] > 0  # (a CPU "peak" from tiny matmuls means little)
    assert r["teacher"]["reuse"]["seconds"] > 0 and r["teacher"]["naive"]["seconds"] > 0


def test_accelerate_configs_parse():
    from accelerate.commands.config.config_args import ClusterConfig

    files = sorted(ACCELERATE.glob("*.yaml"))
    assert {f.name for f in files} >= {"ddp.yaml", "ddp_cpu.yaml", "fsdp.yaml", "fsdp_cpu.yaml"}
    for f in files:  # unknown keys or values are a ValueError in accelerate's own loader
        cfg = ClusterConfig.from_yaml_file(f)
        assert cfg.num_processes >= 2
        if f.name.startswith("fsdp"):
            assert cfg.distributed_type.value == "FSDP" and cfg.fsdp_config["fsdp_version"] == 2
        else:
            assert cfg.distributed_type.value == "MULTI_GPU"


def test_bad_process_counts_are_one_line_errors(tiny_task, tmp_path):
    cfg = tiny_task()
    env = {**os.environ, "CTXDISTILL_QUIET": "1"}
    for extra, message in ((["--num-processes", "-1"], "--num-processes must be >= 1, got -1"),
                           (["--num-processes", "2"], "--num-processes: this process was already started by a launcher; drop the flag")):
        run_env = {**env, "WORLD_SIZE": "2"} if "2" in extra else env  # as if inside `accelerate launch`
        r = subprocess.run([sys.executable, "-m", "ctxdistill", "run", str(cfg), *extra], capture_output=True,
                           text=True, env=run_env, timeout=120)
        assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"ctxdistill: error: {message}"]


def test_unsupported_engines_are_refused_before_any_work(tiny_task, tmp_path):
    """A launch config for DeepSpeed, or for FSDP1, fails in one line before the inputs or the teacher pass."""
    cfg = tiny_task()
    out = tmp_path / "out"
    for env, message in (({"ACCELERATE_USE_DEEPSPEED": "true"}, "DeepSpeed and Megatron-LM launches are not supported"),
                         ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "FSDP: only FSDP2 is supported")):
        run_env = {**os.environ, "CTXDISTILL_QUIET": "1", "WORLD_SIZE": "2", **env}  # as accelerate launch sets them
        r = subprocess.run([sys.executable, "-m", "ctxdistill", "run", str(cfg), "--out", str(out)], capture_output=True,
                           text=True, env=run_env, timeout=120)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr
        assert not out.exists()


def test_a_user_error_under_num_processes_is_one_line(tiny_task, tmp_path):
    """`--num-processes 2` with no teacher pass yet: each rank fails with the same user error; it is shown once,
    without the launcher's traceback."""
    cfg = tiny_task()
    r = subprocess.run([sys.executable, "-m", "ctxdistill", "train", str(cfg), "--out", str(tmp_path / "out"),
                        "--num-processes", "2"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "CTXDISTILL_QUIET": "1"})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [f"ctxdistill: error: {tmp_path / 'out' / 'teacher'}: no complete distillation "
                                             "set here (missing manifest.json); run `ctxdistill teach`"]
