"""Multi-process runs: who this process is, and the few collective steps the stages need.

ctxdistill does not launch or connect processes itself: `accelerate launch` (or torchrun) starts one
process per device and sets RANK / WORLD_SIZE / LOCAL_RANK; `accelerate.PartialState` then opens the
PyTorch process group (gloo on CPUs, nccl on GPUs). A plain `ctxdistill run` is world size 1 and never
touches torch.distributed.

What runs where (see README "Scaling out"):
  - inputs: the main process writes them; the others wait, then read the same files.
  - teach:  shard i (inputs [i*M, (i+1)*M)) is computed by rank i % world_size; every rank writes its own
            shards into the shared store; after a barrier the main process writes the one manifest.
            Each input is sampled with a seed from its id, so any world size gives the same set.
  - train:  data parallel through `accelerate` (DDP, or FSDP2 from the launch config): each rank takes
            every world_size-th example of the global batch; the loss is normalised by the global number
            of answer tokens. Checkpoints and the student are gathered whole and written by the main process.
  - eval:   the main process alone.

Every barrier has a timeout ($CTXDISTILL_DIST_TIMEOUT seconds, default 1800): a rank that dies makes
the launcher stop the others (torchrun's agent), and a rank stuck for longer fails the run with a
one-line reason instead of hanging forever.
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta

from ctxdistill.core.errors import PREFIX, UserError

TIMEOUT_ENV = "CTXDISTILL_DIST_TIMEOUT"


def launched() -> bool:
    """Whether a launcher started this process as one of several (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def timeout() -> timedelta:
    raw = os.environ.get(TIMEOUT_ENV, "1800")
    try:
        seconds = float(raw)
    except ValueError:
        raise UserError(f"${TIMEOUT_ENV}: must be a number of seconds, got {raw!r}") from None
    if seconds <= 0:
        raise UserError(f"${TIMEOUT_ENV}: must be > 0, got {raw!r}")
    return timedelta(seconds=seconds)


def state():
    """accelerate's PartialState, creating the process group (with our timeout) on first use."""
    from accelerate import PartialState

    cpu = not _cuda()
    if not launched():
        return PartialState(cpu=cpu)
    _die_with_launcher()
    return PartialState(cpu=cpu, timeout=timeout())


def _die_with_launcher() -> None:
    """Linux: have the kernel kill this rank if its launcher dies (even by SIGKILL), so no rank is left
    running, or waiting at a barrier, after the run it belonged to is gone."""
    import ctypes
    import signal
    import sys

    if sys.platform == "linux":
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def rank() -> int:
    return state().process_index if launched() else 0


def world_size() -> int:
    return state().num_processes if launched() else 1


def is_main() -> bool:
    return rank() == 0


def barrier(what: str) -> None:
    """Wait for every rank; fail with one line (naming `what`) if one does not arrive in time."""
    if not launched():
        return
    import torch.distributed as dist

    state()
    try:
        if dist.get_backend() == "gloo":  # names the ranks that did not arrive
            dist.monitored_barrier(timeout=timeout(), wait_all_ranks=True)
        else:
            dist.barrier()
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"rank {rank()}: waiting for the other ranks at '{what}' failed after at most "
                        f"{timeout().total_seconds():.0f}s ({first}); another rank crashed or is stuck") from None


@contextlib.contextmanager
def main_first(what: str):
    """Run the block on the main process first, then on the others (e.g. writing files they then read)."""
    if not is_main():
        barrier(what)
    yield
    if is_main():
        barrier(what)


def accelerator(model):
    """An accelerate Accelerator for training `model`, which is already on its device (models.placement
    puts each rank on cuda:LOCAL_RANK). Mixed precision (bf16 / fp16 autocast) comes from the launch
    config or --mixed_precision, as with any accelerate script; on one process without it this is a
    no-op wrapper (no DDP, no autocast)."""
    from accelerate import Accelerator

    if launched():
        state()  # the process group, with our barrier timeout, before accelerate opens one without it
    return Accelerator(cpu=next(model.parameters()).device.type == "cpu", device_placement=False)


def prepare_training(module, make_optimizer):
    """(accelerator, module, optimizer, engine) for data-parallel training of `module`.

    The engine comes from the launch config: DDP (accelerate's default), or FSDP2 (`distributed_type:
    FSDP`, `fsdp_version: 2`, configs/accelerate/fsdp*.yaml), which shards parameters, gradients and
    optimiser state over the ranks. accelerate applies FSDP only on accelerators (on CPU processes it
    falls back to DDP), so on CPUs ctxdistill applies PyTorch's `fully_shard` itself, the way accelerate's
    FSDP2 does: each transformer layer (the model's `_no_split_modules`), then the whole module.
    `make_optimizer(params)` builds the optimiser over the trainable parameters (after sharding, which
    replaces them). DeepSpeed and FSDP1 are refused with one line.
    """
    acc = accelerator(module)
    if not fsdp():
        module, opt = acc.prepare(module, make_optimizer([p for p in module.parameters() if p.requires_grad]))
        return acc, module, opt, acc.distributed_type.value
    from torch.distributed.tensor import DTensor

    on_cpu = acc.distributed_type.value != "FSDP"
    if on_cpu:  # accelerate would run DDP here, so shard before the optimiser sees the parameters
        _fully_shard(module, reshard=os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() == "true")
        opt = acc.prepare(make_optimizer([p for p in module.parameters() if p.requires_grad]))
    else:
        module, opt = acc.prepare(module, make_optimizer([p for p in module.parameters() if p.requires_grad]))
    held = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in module.parameters())
    share = held / sum(p.numel() for p in module.parameters())
    return acc, module, opt, f"FSDP2{' (CPU)' if on_cpu else ''}, rank 0 holds {share:.1%} of the weights"


def fsdp() -> bool:
    """Whether training shards the student over the ranks (an FSDP2 launch of several processes)."""
    return launched() and engine() == "FSDP2"


def engine() -> str:
    """The training engine the launch asks for ("DDP" or "FSDP2"; accelerate launch passes its config as
    ACCELERATE_USE_* / FSDP_* variables), checked before any work so a refused one costs nothing."""
    flag = lambda name: os.environ.get(name, "false").lower() == "true"  # noqa: E731
    if flag("ACCELERATE_USE_DEEPSPEED") or flag("ACCELERATE_USE_MEGATRON_LM"):
        raise UserError("DeepSpeed and Megatron-LM launches are not supported by ctxdistill's trainer; launch with "
                        "configs/accelerate/ddp.yaml, or fsdp.yaml (FSDP2) to shard a large student")
    if not flag("ACCELERATE_USE_FSDP"):
        return "DDP"
    if os.environ.get("FSDP_VERSION", "1") != "2":
        raise UserError("FSDP: only FSDP2 is supported; set `fsdp_version: 2` in the accelerate config "
                        "(as configs/accelerate/fsdp.yaml does)")
    return "FSDP2"


def _fully_shard(module, reshard: bool) -> None:
    from torch.distributed.fsdp import fully_shard

    layers = set(getattr(module, "_no_split_modules", None) or [])
    if not layers:
        raise UserError("train: FSDP needs the model's transformer layer class (`_no_split_modules`); this model has none")
    for sub in list(module.modules()):
        if type(sub).__name__ in layers:
            fully_shard(sub, reshard_after_forward=reshard)
    fully_shard(module, reshard_after_forward=reshard)


def mixed_precision() -> str:
    """The autocast precision training runs under ("no", "bf16", "fp16"): what `accelerate launch` or
    --mixed_precision put in ACCELERATE_MIXED_PRECISION, which the Accelerator reads. It shapes the
    student, so it is part of the student's reuse key."""
    return os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sum of a list of numbers over all ranks (for logging global means)."""
    if not launched():
        return list(values)
    import torch
    import torch.distributed as dist

    st = state()
    t = torch.tensor(values, dtype=torch.float32 if st.device.type != "cpu" else torch.float64, device=st.device)
    dist.all_reduce(t)
    return t.tolist()


def relaunch(argv: list[str], n: int) -> int:
    """`ctxdistill ... --num-processes N`: the same command under `accelerate launch` with N processes.

    `--multi_gpu` is accelerate's torchrun path (its elastic agent stops every rank when one fails); on a
    machine without CUDA each process takes an equal share of the cores and gloo connects them.
    The ranks' output passes through, except after a user error (`ctxdistill: error: ...`, printed by every
    rank): that line is shown once and the launcher's failure report, a traceback, is left out (exit 2).
    A rank that crashes otherwise keeps the launcher's whole report, which names the rank and the signal.
    (The ranks write to that filter's pipe, not a terminal, so they draw no progress bars; log lines remain.)
    """
    import socket
    import subprocess
    import sys

    if n < 1:
        raise UserError(f"--num-processes must be >= 1, got {n}")
    if launched():
        raise UserError("--num-processes: this process was already started by a launcher; drop the flag")
    with socket.socket() as s:  # a free port for the rendezvous, so two runs on one machine do not collide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    threads = max(1, (os.cpu_count() or 1) // n)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
           "--num_machines", "1", "--main_process_port", str(port), "--num_cpu_threads_per_process", str(threads),
           "--mixed_precision", os.environ.get("ACCELERATE_MIXED_PRECISION", "no"), "--dynamo_backend", "no",
           "-m", "ctxdistill", *argv]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, bufsize=1)
    errors: list[str] = []
    for line in proc.stderr:
        _, *found = line.split(PREFIX)  # two ranks' lines can share one line of the pipe
        if not errors and not found:
            sys.stderr.write(line)
        for msg in (m.strip() for m in found):
            if msg not in errors:
                errors.append(msg)
                sys.stderr.write(f"{PREFIX}{msg}\n")
    rc = proc.wait()
    return 2 if errors else rc

