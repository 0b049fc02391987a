"""compose.simultaneous / compose.sequential on the tiny random Llama, from Python and from a config file."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import country_rows, tiny_toml, write_jsonl
from ctxdistill import compose
from ctxdistill.core import models
from ctxdistill.config import load_config
from ctxdistill.core.errors import UserError
from ctxdistill.store import read_store
from ctxdistill.core.student import load_student


def _part(tmp_path, tiny_model_dir, name, teacher, student, method="lora", **over) -> Path:
    d = tmp_path / name
    d.mkdir(parents=True, exist_ok=True)
    train, evals = country_rows(8, 4)
    write_jsonl(d / "train.jsonl", train)
    write_jsonl(d / "eval.jsonl", evals)
    (d / "cfg.toml").write_text(tiny_toml(tiny_model_dir, d / "run", **{
        "task.name": f'"{name}"', "task.teacher": f'"{teacher}"', "task.student": f'"{student}"',
        "train.method": f'"{method}"', "generation.samples_per_input": "1", **over}))
    return d / "cfg.toml"


def _weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_simultaneous_trains_one_student_on_the_union_of_the_sets(tmp_path, tiny_model_dir):
    parts = [load_config(_part(tmp_path, tiny_model_dir, f"id{k}", f"Task {k}. Capital of {{input}}?", f"Task {k}: {{input}}"))
             for k in (1, 2)]
    s = compose.simultaneous(parts, tmp_path / "sim")
    sizes = [len(read_store(p.out / "teacher")[1]) for p in parts]
    assert s["n_examples"] == sum(sizes) == 16 and [c["n_examples"] for c in s["parts"]] == sizes
    assert s["steps"] == 2 * 4  # 16 examples, batch 4, 2 epochs: both sets in every epoch
    assert (tmp_path / "sim" / "student" / "adapter_model.safetensors").is_file()
    # Reused when nothing changed; retrained when a part's set changes.
    assert compose.simultaneous(parts, tmp_path / "sim")["seconds"] == s["seconds"]
    parts[1].task.teacher = "Capital of {input}, please."
    with pytest.raises(UserError, match="existing store was made with a different teacher_template"):
        compose.simultaneous(parts, tmp_path / "sim")  # a stale part is refused, not silently reused
    assert compose.simultaneous(parts, tmp_path / "sim", overwrite=True)["store_hash"] != s["store_hash"]


def test_sequential_starts_each_stage_from_the_merged_previous_student(tmp_path, tiny_model_dir):
    a = load_config(_part(tmp_path, tiny_model_dir, "a", "Capital of {input}?", "A: {input}"))
    b = load_config(_part(tmp_path, tiny_model_dir, "b", "Country {input}: capital?", "B: {input}"))
    summaries = compose.sequential([a, [b]], tmp_path / "seq")
    first, second = (Path(s["weights"]) for s in summaries)
    assert first == tmp_path / "seq" / "stage1" / "merged" and second == tmp_path / "seq" / "stage2" / "merged"
    assert summaries[1]["train"]["init"] == str(first)
    # Stage 1's merged weights equal its base + adapter; stage 2 starts from them, not from the model.
    stage1 = compose.stage_config([a], tmp_path / "seq" / "stage1", "")
    merged = models.load_model(str(first))
    with torch.no_grad():
        ids = torch.tensor([[1, 400, 500, 600]])
        assert torch.allclose(load_student(stage1)(ids).logits, merged(ids).logits, atol=1e-4)
        base = models.load_model(str(tiny_model_dir))
        assert not torch.allclose(base(ids).logits, merged(ids).logits, atol=1e-4)
    stage2 = compose.stage_config([b], tmp_path / "seq" / "stage2", str(first))
    w2 = _weights(load_student(stage2).merge_and_unload())
    m2 = _weights(models.load_model(str(second)))
    assert all(torch.allclose(w2[k], m2[k]) for k in m2)
    # Rerun: every stage up to date, nothing retrained.
    again = compose.sequential([a, [b]], tmp_path / "seq")
    assert [s["seconds"] for s in again] == [s["seconds"] for s in summaries]


def test_sequential_full_finetuning_chains_student_directories(tmp_path, tiny_model_dir):
    a = load_config(_part(tmp_path, tiny_model_dir, "a", "Capital of {input}?", "A: {input}", method="full"))
    b = load_config(_part(tmp_path, tiny_model_dir, "b", "Country {input}: capital?", "B: {input}", method="full"))
    s1, s2 = compose.sequential([a, b], tmp_path / "seq")
    assert s1["weights"] == str(tmp_path / "seq" / "stage1" / "student") and s2["train"]["init"] == s1["weights"]
    # Retraining stage 1 changes its weights, so stage 2 (same data, same settings) is retrained too.
    a.train.lr = 2e-3
    t1, t2 = compose.sequential([a, b], tmp_path / "seq")
    assert t1["init_fingerprint"] == s1["init_fingerprint"] and t2["init_fingerprint"] != s2["init_fingerprint"]


def test_parts_trained_together_must_share_model_and_train_settings(tmp_path, tiny_model_dir):
    a = load_config(_part(tmp_path, tiny_model_dir, "a", "Capital of {input}?", "A: {input}"))
    b = load_config(_part(tmp_path, tiny_model_dir, "b", "Capital of {input}?", "B: {input}", **{"train.lr": "5e-4"}))
    with pytest.raises(UserError, match=r"part 1 \(b\) has a different \[train\] section"):
        compose.simultaneous([a, b], tmp_path / "x")
    a.train.mode = "on-policy"
    with pytest.raises(UserError, match="train.mode must be 'offline'"):
        compose.simultaneous([a], tmp_path / "x")
    assert not (tmp_path / "x").exists()


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "ctxdistill", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "CTXDISTILL_QUIET": "1"}, timeout=600)


def test_run_a_composition_file(tmp_path, tiny_model_dir):
    a = _part(tmp_path, tiny_model_dir, "a", "Capital of {input}?", "A: {input}")
    b = _part(tmp_path, tiny_model_dir, "b", "Country {input}: capital?", "B: {input}")
    f = tmp_path / "compose.toml"
    f.write_text(f'out_dir = "composed"\n[compose]\nstages = [["{a}"], ["{b}", "{a}"]]\n')
    r = _cli("run", f)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["training"]) == 2 and out["training"][1]["n_examples"] == 16
    assert set(out["eval"]) == {"a", "b"} and "student" in out["eval"]["b"]
    assert (tmp_path / "composed" / "eval" / "b" / "report.json").is_file()
    assert (tmp_path / "composed" / "stage2" / "student").is_dir()
    f.write_text('[compose]\nstages = []\n')
    r = _cli("run", f)
    assert r.returncode == 2 and r.stderr.strip() == f"ctxdistill: error: {f}: compose.stages: must list at least one stage"
    f.write_text(f'[compose]\nstages = ["{a}"]\n[train]\nlr = 1.0\n')
    r = _cli("run", f)
    assert r.returncode == 2 and "[train]: a composition file holds only out_dir and [compose]" in r.stderr


def test_average_teachers_distils_the_mean_of_the_teacher_distributions(tmp_path, tiny_model_dir):
    from ctxdistill.core.templates import teacher_template

    parts = [load_config(_part(tmp_path, tiny_model_dir, name, "{input}", "{input}", **{
        "task.teacher_prefill": None, "task.teacher_shots": shots}))
        for name, shots in (("a", '[["France", "Paris"], ["Peru", "Lima"]]'), ("b", '[["Japan", "Tokyo"]]'))]
    s = compose.simultaneous(parts, tmp_path / "avg", average_teachers=True)
    n_inputs = 8
    assert s["averaged_teachers"] == 2 and s["n_examples"] == n_inputs  # one example per input, not per teacher
    examples, _ = compose.averaged_set(parts, [read_store(p.out / "teacher")[1] for p in parts])
    assert [e.meta["labels"] for e in examples] == ["averaged over 2 teachers"] * n_inputs
    own = [{e.id: e for e in read_store(p.out / "teacher")[1]} for p in parts]
    tok, model = models.load_tokenizer(str(tiny_model_dir)), models.load_model(str(tiny_model_dir))

    def mean_probs(x, answer):  # the two teachers' full distributions at the answer, each by a plain forward pass
        probs = []
        for p in parts:
            prompt = teacher_template(p.task).render(tok, x)[0]
            ids = torch.tensor([prompt + answer])  # f takes the whole completion: nothing before the answer
            with torch.no_grad():
                probs.append(torch.softmax(model(ids).logits[0, -len(answer) - 1:-1].float(), -1))
        return probs, (probs[0] + probs[1]) / 2

    for e in examples:
        # The kept answer is the candidate (one per teacher) the averaged teacher finds most likely ...
        cands = [o[e.id].answer_ids for o in own]
        assert e.answer_ids in cands and e.meta["candidates"] == len({tuple(c) for c in cands})
        logp = [float(mean_probs(e.meta["input"], c)[1].log().gather(-1, torch.tensor(c)[:, None]).sum()) for c in cands]
        assert e.meta["ensemble_logp"] == pytest.approx(max(logp), abs=1e-3)
        # ... and its labels are the top-k of the mean of the two teachers' distributions.
        probs, mean = mean_probs(e.meta["input"], e.answer_ids)
        assert torch.allclose(mean.log().gather(-1, e.topk_ids.long()), e.topk_logprobs, atol=1e-4)
        assert torch.equal(mean.topk(e.topk_ids.shape[1], -1).indices, e.topk_ids.long())
        assert not torch.allclose(probs[0].log().gather(-1, e.topk_ids.long()), e.topk_logprobs, atol=1e-3)
    other = load_config(_part(tmp_path, tiny_model_dir, "c", "{input}", "Q: {input}", **{"task.teacher_prefill": None}))
    with pytest.raises(UserError, match=r"part 1 \(c\) has a different student_template"):
        compose.simultaneous([parts[0], other], tmp_path / "bad", average_teachers=True)


def test_averaged_labels_equal_the_average_of_each_teachers_own_distribution(tmp_path, tiny_model_dir):
    """One input, two candidate answers that share their first words, two teacher contexts: the kept answer's
    labels are the top-k of the average of the two teachers' softmax(model(...).logits), position by position.
    (The shared prefix used to be taken from the scoring sequences, so it ran into the common answer words.)"""
    from ctxdistill.core import models
    from ctxdistill.core.sampling import topk_with_tail
    from ctxdistill.store import Example
    from ctxdistill.core.templates import encode
    from ctxdistill.answers import align_answer
    from ctxdistill.prompts import fit_prompts
    from ctxdistill.teach import averaged_labels

    cfgs = []
    for i, system in enumerate(["Answer with the capital city only.", "You know every capital city of the world."]):
        p = tmp_path / f"c{i}.toml"
        p.write_text(tiny_toml(tiny_model_dir, tmp_path / f"run{i}", **{"task.teacher_system": f'"{system}"'}))
        cfgs.append(load_config(p))
    tok = models.load_tokenizer(str(tiny_model_dir))
    row = {"id": "x", "input": "France"}
    exs = []
    for j, tail in enumerate([" Paris, on the Seine.", " Paris, of course."]):
        text = "The capital city of France is" + tail
        _, _, ids = align_answer(tok, "", text)
        exs.append(Example(id=f"x#{j}", prompt_ids=[1, 2], answer_ids=ids, topk_ids=torch.zeros(len(ids), 4, dtype=torch.int32),
                           topk_logprobs=torch.zeros(len(ids), 4), tail_logmass=torch.zeros(len(ids)),
                           meta={"completion": text}))
    [kept] = averaged_labels(cfgs, [(row, exs)])
    model = models.load_model(cfgs[0].model)
    probs = 0
    for cfg in cfgs:
        t_ids, _, _ = fit_prompts(cfg, tok, dict(row), models.window(model, cfg.model))
        chat = t_ids[:len(t_ids) - len(encode(tok, "The capital city of France is"))]
        seq = chat + kept.answer_ids
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([seq])).logits[0, len(chat) - 1:-1]
        probs = probs + torch.softmax(logits, -1) / len(cfgs)
    top_ids, top_lp, tail = topk_with_tail(probs.log(), cfgs[0].teach.top_k)
    assert torch.equal(kept.topk_ids, top_ids) and (kept.topk_logprobs - top_lp).abs().max() < 1e-4
