"""The distillation set on disk: a manifest plus safetensors shards of soft labels.

Layout of a store directory:
    manifest.json           what produced it (per-field content hashes), counts, drops, health metrics
    shard-00000.safetensors prompt_ids/answer_ids (flat int32 + int64 offsets), topk_ids [T, k] int32,
                            topk_logprobs [T, k] float32, tail_logmass [T] float32 (T = answer tokens)
    shard-00000.jsonl       one line per example: id, input, answer text, teacher completion

The store is written under a temporary name and renamed into place, so a directory called `teacher/`
is always complete. A store whose hashes differ from the current config is never reused silently.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ctxdistill.errors import UserError
from ctxdistill.files import sha256_file

FORMAT = 1


@dataclass
class Example:
    id: str
    prompt_ids: list[int]          # student prompt (chat + student prefill)
    answer_ids: list[int]          # answer tokens, without the terminator
    topk_ids: torch.Tensor         # [A, k] int32
    topk_logprobs: torch.Tensor    # [A, k] float32, teacher log-probs
    tail_logmass: torch.Tensor     # [A] float32, log(1 - sum(exp(topk_logprobs)))
    meta: dict = field(default_factory=dict)


def hash_fields(fields: dict) -> dict:
    """sha256 (16 hex) of each field's canonical JSON, plus 'all' over every field."""
    out = {k: hashlib.sha256(json.dumps(v, sort_keys=True).encode()).hexdigest()[:16] for k, v in fields.items()}
    out["all"] = hashlib.sha256(json.dumps(out, sort_keys=True).encode()).hexdigest()[:16]
    return out


def check_compatible(path: Path, hashes: dict) -> bool:
    """True if a complete store at `path` was made from the same inputs; raise if it differs; False if absent."""
    mf = path / "manifest.json"
    if not mf.is_file():
        if path.exists():
            raise UserError(f"{path}: exists but is not a ctxdistill store (no manifest.json); use --overwrite to replace it")
        return False
    old = json.loads(mf.read_text())["hashes"]
    if old.get("all") == hashes["all"]:
        return True
    diff = [k for k in hashes if k != "all" and old.get(k) != hashes[k]]
    raise UserError(f"{path}: existing store was made with a different {', '.join(diff)}; "
                    "refusing to mix or reuse it (pass --overwrite to replace it)")


class StoreWriter:
    """Collect examples, write them as shards of `shard_size`, and publish the directory atomically."""

    def __init__(self, path: Path, shard_size: int):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"{self.path}: output path exists and is a file")
        self.tmp = self.path.with_name(self.path.name + f".tmp-{os.getpid()}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.shard_size = shard_size
        self.pending: list[Example] = []
        self.shards: list[dict] = []
        self.n = 0

    def add(self, ex: Example) -> None:
        self.pending.append(ex)
        self.n += 1
        if len(self.pending) >= self.shard_size:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        from safetensors.torch import save_file

        name = f"shard-{len(self.shards):05d}"
        exs, self.pending = self.pending, []
        tensors = {
            "prompt_ids": torch.tensor([t for e in exs for t in e.prompt_ids], dtype=torch.int32),
            "prompt_offsets": _offsets([len(e.prompt_ids) for e in exs]),
            "answer_ids": torch.tensor([t for e in exs for t in e.answer_ids], dtype=torch.int32),
            "answer_offsets": _offsets([len(e.answer_ids) for e in exs]),
            "topk_ids": torch.cat([e.topk_ids for e in exs]).to(torch.int32).contiguous(),
            "topk_logprobs": torch.cat([e.topk_logprobs for e in exs]).float().contiguous(),
            "tail_logmass": torch.cat([e.tail_logmass for e in exs]).float().contiguous(),
        }
        save_file(tensors, str(self.tmp / f"{name}.safetensors"))
        with open(self.tmp / f"{name}.jsonl", "w", encoding="utf-8") as fh:
            for e in exs:
                fh.write(json.dumps({"id": e.id, **e.meta}, ensure_ascii=False) + "\n")
        digest = sha256_file(self.tmp / f"{name}.safetensors")
        self.shards.append({"name": name, "n": len(exs), "sha256": digest})

    def finish(self, manifest: dict) -> dict:
        """Write the last shard and the manifest, then rename the directory into place."""
        self._flush()
        manifest = {"format": FORMAT, **manifest, "n_examples": self.n, "shards": self.shards}
        (self.tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
        if self.path.exists():
            shutil.rmtree(self.path)
        os.replace(self.tmp, self.path)
        return manifest

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def read_store(path: Path) -> tuple[dict, list[Example]]:
    """Load a store: its manifest and every example, checking each shard's checksum."""
    from safetensors.torch import load_file

    path = Path(path)
    mf = path / "manifest.json"
    if not mf.is_file():
        raise UserError(f"{path}: no distillation set here (missing manifest.json); run `ctxdistill teach` first")
    manifest = json.loads(mf.read_text())
    examples: list[Example] = []
    for shard in manifest["shards"]:
        f = path / f"{shard['name']}.safetensors"
        if not f.is_file() or sha256_file(f) != shard["sha256"]:
            raise UserError(f"{f}: shard missing or corrupted (checksum mismatch); re-run `ctxdistill teach --overwrite`")
        t = load_file(str(f))
        metas = [json.loads(line) for line in open(path / f"{shard['name']}.jsonl", encoding="utf-8")]
        po, ao = t["prompt_offsets"].tolist(), t["answer_offsets"].tolist()
        for i, meta in enumerate(metas):
            a0, a1 = ao[i], ao[i + 1]
            examples.append(Example(
                id=meta.pop("id"),
                prompt_ids=t["prompt_ids"][po[i]:po[i + 1]].tolist(),
                answer_ids=t["answer_ids"][a0:a1].tolist(),
                topk_ids=t["topk_ids"][a0:a1], topk_logprobs=t["topk_logprobs"][a0:a1],
                tail_logmass=t["tail_logmass"][a0:a1], meta=meta))
    return manifest, examples


def _offsets(lengths: list[int]) -> torch.Tensor:
    out = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    out[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    return out
