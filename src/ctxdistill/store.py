"""What one stage hands the next on disk: the inputs' splits (load_split), and the distillation set, a manifest
plus safetensors shards of soft labels, with the hashes that identify it (store_hashes).

Layout of a store directory:
    progress.json           the per-field content hashes it is made from; written first
    shard-00000.safetensors prompt_ids/answer_ids (flat int32 + int64 offsets), topk_ids [T, k] int32,
                            topk_logprobs [T, k] float32, tail_logmass [T] float32 (T = answer tokens)
    shard-00000.jsonl       one line per example: id, input, answer text, teacher completion ("terminated":
                            false for an answer cut at max_new_tokens, trained without a terminator)
    shard-00000.json        the shard's stats and both files' checksums; written last, it marks the
                            shard complete
    manifest.json           written at the end: hashes, config, counts, drops, health metrics

Shard i holds the examples of inputs [i*M, (i+1)*M). A teacher pass killed at any point resumes after
its last complete shard; a corrupted shard is found by checksum and regenerated. Only a store with
manifest.json is complete. A store made from different inputs is never reused or mixed silently.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ctxdistill.config import Config
from ctxdistill.core import models
from ctxdistill.core.errors import UserError
from ctxdistill.core.files import read_jsonl, sha256_file, write_atomic

FORMAT = 2


@dataclass
class Example:
    id: str
    prompt_ids: list[int]          # student prompt (chat + student prefill)
    answer_ids: list[int]          # answer tokens, without the terminator
    topk_ids: torch.Tensor         # [A, k] int32
    topk_logprobs: torch.Tensor    # [A, k] float32, teacher log-probs
    tail_logmass: torch.Tensor     # [A] float32, log(1 - sum(exp(topk_logprobs)))
    terminated: bool = True        # the terminator follows the answer (a hard label); False for a cut-off rollout
    meta: dict = field(default_factory=dict)


def hash_fields(fields: dict) -> dict:
    """sha256 (16 hex) of each field's canonical JSON, plus 'all' over every field."""
    out = {k: hashlib.sha256(json.dumps(v, sort_keys=True).encode()).hexdigest()[:16] for k, v in fields.items()}
    out["all"] = hashlib.sha256(json.dumps(out, sort_keys=True).encode()).hexdigest()[:16]
    return out


def differing(old: dict, new: dict) -> list[str]:
    """Names of the hashed fields that differ between two hash dicts."""
    return [k for k in new if k != "all" and old.get(k) != new[k]]


def _hashes(f: Path) -> dict | None:
    """The input hashes a store's manifest or progress file records; None if missing or unreadable."""
    try:
        h = json.loads(f.read_text())["hashes"]
        return h if isinstance(h, dict) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


class ShardedStore:
    """A store being written shard by shard (see the module docstring for the layout)."""

    def __init__(self, path: Path, hashes: dict, overwrite: bool = False):
        self.path, self.hashes = Path(path), hashes
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"{self.path}: output path exists and is a file")
        if overwrite and self.path.exists():
            shutil.rmtree(self.path)
        if self.path.exists() and any(self.path.iterdir()):
            recorded = next((h for h in (_hashes(self.path / f) for f in ("manifest.json", "progress.json")) if h), None)
            if recorded is None:
                raise UserError(f"{self.path}: exists but is not a ctxdistill store (or its manifest and progress "
                                "files are damaged); use --overwrite to replace it")
            diff = differing(recorded, hashes)
            if diff:
                raise UserError(f"{self.path}: existing store was made with a different {', '.join(diff)}; "
                                "refusing to mix or reuse it (pass --overwrite to replace it)")

    def begin(self) -> None:
        """Create the directory and record the hashes (call once the work can actually start)."""
        self.path.mkdir(parents=True, exist_ok=True)
        if not (self.path / "progress.json").is_file():
            write_atomic(self.path / "progress.json", json.dumps({"hashes": self.hashes}))

    def discard_if_empty(self) -> None:
        """Remove a store that holds no complete shard, so a failed start leaves nothing behind."""
        if self.path.is_dir() and not list(self.path.glob("shard-*.json")):
            shutil.rmtree(self.path)

    def manifest(self) -> dict | None:
        """The manifest if the store is complete and every shard intact, else None."""
        mf = self.path / "manifest.json"
        if not mf.is_file():
            return None
        try:
            manifest = json.loads(mf.read_text())
            n = len(manifest["shards"])
        except (ValueError, KeyError, TypeError):  # damaged: rebuilt from the shards
            return None
        if all(self.shard_stats(i) is not None for i in range(n)):
            return manifest
        return None

    def shard_stats(self, i: int) -> dict | None:
        """Stats of shard i if it is complete and intact; a corrupted shard is deleted, so it is redone."""
        name = f"shard-{i:05d}"
        f = self.path / f"{name}.json"
        if not f.is_file():
            return None
        try:
            stats = json.loads(f.read_text())
            sums = {suffix: stats[f"sha256_{suffix}"] for suffix in ("safetensors", "jsonl")}
        except (ValueError, KeyError, TypeError):  # a damaged stats file: the shard is redone
            stats, sums = None, {}
        for suffix in ("safetensors", "jsonl"):
            data = self.path / f"{name}.{suffix}"
            if stats is None or not data.is_file() or sha256_file(data) != sums[suffix]:
                for g in self.path.glob(f"{name}.*"):
                    g.unlink()
                (self.path / "manifest.json").unlink(missing_ok=True)
                return None
        return stats

    def write_shard(self, i: int, examples: list[Example], stats: dict) -> dict:
        from safetensors.torch import save_file

        name = f"shard-{i:05d}"
        tensors = {
            "prompt_ids": torch.tensor([t for e in examples for t in e.prompt_ids], dtype=torch.int32),
            "prompt_offsets": _offsets([len(e.prompt_ids) for e in examples]),
            "answer_ids": torch.tensor([t for e in examples for t in e.answer_ids], dtype=torch.int32),
            "answer_offsets": _offsets([len(e.answer_ids) for e in examples]),
            "topk_ids": _cat([e.topk_ids for e in examples], torch.int32),
            "topk_logprobs": _cat([e.topk_logprobs for e in examples], torch.float32),
            "tail_logmass": _cat([e.tail_logmass for e in examples], torch.float32),
        }
        tmp = self.path / f".{name}.safetensors.tmp"
        save_file(tensors, str(tmp))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, self.path / f"{name}.safetensors")
        write_atomic(self.path / f"{name}.jsonl",
                     "".join(json.dumps({"id": e.id, **e.meta}, ensure_ascii=False) + "\n" for e in examples))
        stats = {"name": name, **stats, "n": len(examples),
                 "sha256_safetensors": sha256_file(self.path / f"{name}.safetensors"),
                 "sha256_jsonl": sha256_file(self.path / f"{name}.jsonl")}
        write_atomic(self.path / f"{name}.json", json.dumps(stats))  # the commit marker, last
        return stats

    def finish(self, shards: list[dict], manifest: dict) -> dict:
        manifest = {"format": FORMAT, "hashes": self.hashes, **manifest,
                    "n_examples": sum(s["n"] for s in shards), "shards": shards}
        write_atomic(self.path / "manifest.json", json.dumps(manifest, indent=2, ensure_ascii=False))
        return manifest


def read_store(path: Path) -> tuple[dict, list[Example]]:
    """Load a complete store: its manifest and every example, checking each shard's checksums."""
    from safetensors.torch import load_file

    path = Path(path)
    mf = path / "manifest.json"
    if not mf.is_file():
        raise UserError(f"{path}: no complete distillation set here (missing manifest.json); run `ctxdistill teach`")
    try:
        manifest = json.loads(mf.read_text())
        shards = [(sh["name"], sh["sha256_safetensors"], sh["sha256_jsonl"]) for sh in manifest["shards"]]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{mf}: corrupted manifest; re-run `ctxdistill teach`, which rebuilds it from the shards") from None
    examples: list[Example] = []
    for name, *sums in shards:
        for suffix, want in zip(("safetensors", "jsonl"), sums):
            g = path / f"{name}.{suffix}"
            if not g.is_file() or sha256_file(g) != want:
                raise UserError(f"{g}: shard missing or corrupted (checksum mismatch); "
                                "re-run `ctxdistill teach`, which regenerates it")
        t = load_file(str(path / f"{name}.safetensors"))
        metas = [json.loads(line) for line in open(path / f"{name}.jsonl", encoding="utf-8")]
        po, ao = t["prompt_offsets"].tolist(), t["answer_offsets"].tolist()
        for i, meta in enumerate(metas):
            a0, a1 = ao[i], ao[i + 1]
            examples.append(Example(
                id=meta.pop("id"),
                prompt_ids=t["prompt_ids"][po[i]:po[i + 1]].tolist(),
                answer_ids=t["answer_ids"][a0:a1].tolist(),
                topk_ids=t["topk_ids"][a0:a1], topk_logprobs=t["topk_logprobs"][a0:a1],
                tail_logmass=t["tail_logmass"][a0:a1], terminated=meta.get("terminated", True), meta=meta))
    return manifest, examples


def _cat(parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    return torch.cat(parts).to(dtype).contiguous() if parts else torch.zeros((0,), dtype=dtype)


def _offsets(lengths: list[int]) -> torch.Tensor:
    out = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    out[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    return out


def store_hashes(cfg: Config) -> dict:
    """Per-field content hashes of everything that determines the distillation set."""
    train_file = cfg.out / "inputs" / "train.jsonl"
    return hash_fields({
        "model": models.fingerprint(cfg.model.name) + ":" + cfg.model.dtype,
        "teacher_template": [cfg.task.teacher_system, cfg.task.teacher, cfg.task.teacher_prefill]
                            + ([cfg.task.teacher_shots] if cfg.task.teacher_shots else []),  # old stores keep their hash
        "student_template": [cfg.task.student_system, cfg.task.student, cfg.task.student_prefill],
        "extractor": {k: v for k, v in dataclasses.asdict(cfg.task.extractor).items()
                      if k != "keep_unfinished" or v},  # stores made before the field keep their hash
        "generation": dataclasses.asdict(cfg.generation),
        "teach": {"top_k": cfg.teach.top_k, "seed": cfg.teach.seed, "truncate": cfg.teach.truncate,
                  "max_length": cfg.model.max_length, "seeding": "per input id",  # earlier stores: per shard
                  **({"samples": cfg.teach.samples, "select": cfg.teach.select, "checks": cfg.task.checks}
                     if cfg.teach.samples > 1 else {}),  # stores with no selection keep their hash
                  **({"context": "passage+instructions", "passage_words": cfg.data.synth.passage_words}
                     if cfg.teach.context == "passage" else {}),
                  **({"fact_temperature": cfg.teach.fact_temperature}
                     if cfg.data.inputs == "synthesize" and cfg.data.synth.prompt == "passages" else {})},
        "inputs": sha256_file(train_file)[:16] if train_file.is_file() else None,
    })


def load_split(cfg: Config, split: str) -> list[dict]:
    """The rows of one split as the inputs stage wrote them (`<out>/inputs/<split>.jsonl`)."""
    f = cfg.out / "inputs" / f"{split}.jsonl"
    if not f.is_file():
        raise UserError(f"{f}: no inputs here yet; run `ctxdistill inputs CONFIG` first (`ctxdistill run` and the "
                        "stage commands do it for you; from Python: ctxdistill.inputs.prepare_inputs(cfg))")
    return read_jsonl(f, ("id", "input"))
