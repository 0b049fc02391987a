"""The embedded SmolLM2-135M-Instruct: conversion, loading and a small teacher pass (slow)."""

import json

import pytest

from ctxdistill.demo import demo_config
from ctxdistill.inputs import prepare_inputs
from ctxdistill.core.models import embedded_checkpoint, load_model, load_tokenizer

pytestmark = pytest.mark.slow


def test_embedded_checkpoint_loads_as_plain_hf_model():
    path = embedded_checkpoint()
    assert (path / "model.safetensors").is_file() and "quantization_config" not in json.loads((path / "config.json").read_text())
    tok, model = load_tokenizer("embedded"), load_model("embedded")
    assert model.config.num_hidden_layers == 30 and tok.eos_token_id == 2 == tok.pad_token_id


def test_demo_teacher_pass_on_a_few_countries(tmp_path):
    from ctxdistill.store import read_store
    from ctxdistill.teach import teach

    cfg = demo_config(str(tmp_path / "run"))
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"id": c, "input": c}) + "\n"
                                                  for c in ("France", "Japan", "Egypt", "Germany")))
    (tmp_path / "eval.jsonl").write_text(json.dumps({"input": "Italy", "reference": ["Rome"]}) + "\n")
    cfg.data.superni, cfg.data.train, cfg.data.eval = "", str(tmp_path / "train.jsonl"), str(tmp_path / "eval.jsonl")
    prepare_inputs(cfg)
    manifest = teach(cfg)
    _, examples = read_store(cfg.out / "teacher")
    answers = {e.meta["input"]: e.meta["answer"] for e in examples}
    assert answers["France"] == "Paris" and answers["Japan"] == "Tokyo"
    assert manifest["teacher_mean_answer_prob"] > 0.3


def test_prefix_reuse_equals_plain_path_on_embedded_model(tmp_path):
    """Same greedy tokens and top-k log-probs within 1e-4, with and without the shared-context cache."""
    from ctxdistill.store import read_store
    from ctxdistill.teach import teach

    cfg = demo_config(str(tmp_path / "run"))
    cfg.task.teacher_system = "You are a geography expert. Answer with the capital city of the country. " * 8
    rows = [{"id": c, "input": c} for c in ("France", "Japan", "Egypt", "Germany", "Peru", "Kenya")]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "eval.jsonl").write_text(json.dumps({"input": "Italy", "reference": ["Rome"]}) + "\n")
    cfg.data.superni, cfg.data.train, cfg.data.eval = "", str(tmp_path / "train.jsonl"), str(tmp_path / "eval.jsonl")
    cfg.teach.batch_size = 4
    prepare_inputs(cfg)
    m = teach(cfg, prefix_reuse=True)
    assert m["shared_prefix_tokens"] > 100 and m["labels_recorded"] > 0  # labels recorded while sampling
    _, reuse = read_store(cfg.out / "teacher")
    teach(cfg, overwrite=True, prefix_reuse=False)
    _, plain = read_store(cfg.out / "teacher")
    assert [e.meta["completion"] for e in reuse] == [e.meta["completion"] for e in plain]
    for a, b in zip(reuse, plain):
        assert a.answer_ids == b.answer_ids
        assert (a.topk_ids == b.topk_ids).all()
        assert (a.topk_logprobs - b.topk_logprobs).abs().max() < 1e-4
