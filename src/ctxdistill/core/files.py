"""Small file helpers shared by the stages: JSONL with line numbers, atomic writes, checksums."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ctxdistill.core.errors import UserError


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def read_jsonl(path: Path, required: tuple[str, ...] = ()) -> list[dict]:
    """Read a JSONL file; every mistake names the file and line. Blank lines are skipped."""
    return [row for _, row in read_jsonl_numbered(path, required)]


def read_jsonl_numbered(path: Path, required: tuple[str, ...] = ()) -> list[tuple[int, dict]]:
    """Like `read_jsonl`, with each row's line number (for error messages about its fields)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        text = path.read_bytes().decode("utf-8-sig")  # tolerate a BOM, refuse other encodings
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (bad byte at offset {e.start})") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: invalid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        for key in required:
            if key not in row:
                raise UserError(f"{path}:{n}: missing field '{key}'")
        rows.append((n, row))
    if not rows:
        raise UserError(f"{path}: empty (no JSON lines)")
    return rows


def normal_file_mode() -> int:
    """The mode `open()` gives a new file under this process's umask (0644 under the usual 022). safetensors
    writes weights through a private temporary file, mode 0600, which other users and model servers cannot read."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_atomic(path: Path, text: str) -> None:
    """Write a file under a temporary name, fsync, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


LOCK = ".ctxdistill.lock"
_HELD: list[Path] = []


def claim_dir(out: Path) -> None:
    """Hold `out` for this command: a second ctxdistill command writing to the same out_dir while this one runs
    is refused in one line (both would write the same stores, checkpoints and reports). The lock file holds the
    holder's pid; one left by a killed run (no such process, or a zombie) is taken over. Released by
    `release_dirs` when the command ends; this process may claim again (a command calling another)."""
    lock = Path(out) / LOCK
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pid = _holder(lock)
            if pid == os.getpid():
                return
            if pid is not None and _alive(pid):
                raise UserError(f"{out}: another ctxdistill command (pid {pid}) is writing here; wait for it to end "
                                f"or give another out_dir (if no such run exists, delete {lock})") from None
            lock.unlink(missing_ok=True)  # left by a killed run
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(f"{os.getpid()}\n")
        _HELD.append(lock)
        return
    raise UserError(f"{out}: could not take {lock}; is another command starting here?")


def release_dirs() -> None:
    """Release every out_dir this process claimed."""
    while _HELD:
        lock = _HELD.pop()
        if _holder(lock) == os.getpid():
            lock.unlink(missing_ok=True)


def _holder(lock: Path) -> int | None:
    try:
        return int(lock.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, killed and not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True
