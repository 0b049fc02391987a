"""Teacher pass: shared-prefix reuse equals the plain path; the sharded store resumes after SIGKILL,
refuses to mix, and regenerates a corrupted shard."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import write_jsonl
from ctxdistill.config import load_config
from ctxdistill.core.errors import UserError
from ctxdistill.inputs import prepare_inputs
from ctxdistill.store import load_split
from ctxdistill.core.models import load_model, load_tokenizer
from ctxdistill.core.sampling import PrefixCache, example_seed, generate, score_answers, shared_prefix
from ctxdistill.store import read_store
from ctxdistill.teach import teach
from ctxdistill.core.templates import teacher_template



def _long_system(n=12):
    return '"' + "You are a meticulous geographer who always names the capital city. " * n + '"'


def assert_same_examples(a, b, atol=1e-4):
    assert [e.id for e in a] == [e.id for e in b]
    for x, y in zip(a, b):
        assert x.answer_ids == y.answer_ids and x.prompt_ids == y.prompt_ids
        assert torch.equal(x.topk_ids, y.topk_ids)
        assert torch.allclose(x.topk_logprobs, y.topk_logprobs, atol=atol)
        assert torch.allclose(x.tail_logmass, y.tail_logmass, atol=atol)


def test_shared_prefix_rules():
    assert shared_prefix([[1, 2, 3, 4] * 5 + [9], [1, 2, 3, 4] * 5 + [8, 7]]) == 20
    assert shared_prefix([[1] * 30, [1] * 30]) == 29  # each prompt keeps a token of its own
    assert shared_prefix([[5, 1, 2], [6, 1, 2]]) == 0  # nothing shared: plain batching
    assert shared_prefix([[1] * 10 + [2], [1] * 10 + [3]]) == 0  # below the minimum worth caching


def test_prefix_reuse_gives_same_greedy_tokens(tiny_task, tiny_model_dir):
    cfg = load_config(tiny_task(**{"task.teacher_system": _long_system()}))
    prepare_inputs(cfg)
    tok, model = load_tokenizer(str(tiny_model_dir)), load_model(str(tiny_model_dir))
    prompts = [teacher_template(cfg.task).render(tok, r["input"])[0] for r in load_split(cfg, "train")]
    n = shared_prefix(prompts)
    assert n > 100
    kw = dict(pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, max_new_tokens=8, temperature=0.0, batch_size=5, seed=0)
    shapes = []  # the prefix pass keeps keys and values only: the LM head runs on its last position
    hook = model.lm_head.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    cache = PrefixCache(model, prompts[0][:n])
    hook.remove()
    assert shapes == [(1, 1, model.config.vocab_size)]
    assert generate(model, prompts, **kw) == generate(model, prompts, prefix=cache, **kw)


def test_each_input_samples_from_its_own_seed_and_records_the_labels_a_scoring_pass_gives(tiny_task, tiny_model_dir):
    """Teacher sampling with per-input seeds (`example_seed`): an input's completion does not depend on its
    position, its batch or the batch seed; the labels recorded while decoding equal a separate scoring pass."""
    cfg = load_config(tiny_task())
    prepare_inputs(cfg)
    tok, model = load_tokenizer(str(tiny_model_dir)), load_model(str(tiny_model_dir))
    rows = load_split(cfg, "train")[:10]
    prompts = [teacher_template(cfg.task).render(tok, r["input"])[0] for r in rows]
    seeds = [example_seed(0, r["id"], 0) for r in rows]
    kw = dict(pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, max_new_tokens=8, temperature=1.0, keep_topk=4)
    alone = generate(model, prompts, batch_size=1, seed=0, seeds=seeds, **kw)
    backwards = generate(model, prompts[::-1], batch_size=1, seed=5, seeds=seeds[::-1], **kw)[::-1]
    assert [a[0] for a in alone] == [b[0] for b in backwards]
    assert len({tuple(a[0]) for a in alone}) > 5  # sampled, not one greedy answer
    other = generate(model, prompts, batch_size=1, seed=0, seeds=[example_seed(1, r["id"], 0) for r in rows], **kw)
    assert [a[0] for a in alone] != [o[0] for o in other]  # another teach.seed, other samples
    batched = generate(model, prompts, batch_size=4, seed=0, seeds=seeds, **kw)  # padded batches: float rounding only
    assert sum(a[0] == b[0] for a, b in zip(alone, batched)) >= 8
    scored = score_answers(model, [p + a[0] for p, a in zip(prompts, alone)], [len(a[0]) for a in alone], top_k=4,
                           pad_id=tok.pad_token_id, batch_size=1)
    for (_, _, recorded), labels in zip(alone, scored):  # the same fields, recorded while sampling or scored after
        assert torch.equal(recorded.top_ids, labels.top_ids)
        torch.testing.assert_close(recorded.top_logprobs, labels.top_logprobs, atol=1e-4, rtol=0)
        torch.testing.assert_close(recorded.tail_logmass, labels.tail_logmass, atol=1e-4, rtol=0)
        torch.testing.assert_close(recorded.chosen_logprob.exp(), labels.chosen_logprob.exp(), atol=1e-4, rtol=0)


def test_the_set_does_not_depend_on_shard_size(tiny_task, tmp_path):
    """Shards of 3 inputs or of 4 (other shards, other batches, as other world sizes would split them): the
    same examples, because each input is sampled with a seed from its id (batch size 1: no padding)."""
    sets = []
    for m in ("3", "4"):
        cfg = load_config(tiny_task(**{"teach.shard_size": m, "teach.batch_size": "1"}))
        cfg.out_dir = str(tmp_path / f"shards-{m}")
        prepare_inputs(cfg)
        teach(cfg)
        sets.append(sorted(read_store(cfg.out / "teacher")[1], key=lambda e: e.id))
    assert len(sets[0]) > 10
    assert_same_examples(*sets)


@pytest.mark.parametrize("samples, temperature", [("1", "0.0"), ("2", "1.0")])
def test_teach_with_and_without_prefix_reuse_agree(tiny_task, samples, temperature):
    over = {"task.teacher_system": _long_system(), "generation.samples_per_input": samples,
            "generation.temperature": temperature, "task.extractor.pattern": "'(?s)\\bis(.+)'"}
    cfg = load_config(tiny_task(**over))
    prepare_inputs(cfg)
    m1 = teach(cfg, prefix_reuse=True)
    assert m1["shared_prefix_tokens"] > 100
    # Labels recorded while sampling: the answer is the generated text after the prefill "... is", so
    # most answers are the generated tokens themselves (not all: random text need not re-tokenise alike).
    assert m1["labels_recorded"] > 0.5 * m1["n_examples"] > 0
    _, with_reuse = read_store(cfg.out / "teacher")
    m2 = teach(cfg, overwrite=True, prefix_reuse=False)
    _, without = read_store(cfg.out / "teacher")
    assert len(with_reuse) > 0 and m2["shared_prefix_tokens"] == 0
    if temperature == "0.0":
        # without a prefix the teacher pass still decodes itself, recording labels too
        assert m2["labels_recorded"] == m1["labels_recorded"]
        assert_same_examples(with_reuse, without)
        return
    # Sampling from a random model's near-uniform distribution: the cascade and the plain attention differ by
    # float rounding (~1e-6 in a logit), which can move one draw across a token boundary, and the sample
    # diverges from there (seen on one machine: 1 of 20 samples). Every other sample must agree exactly.
    same = [(x, y) for x, y in zip(with_reuse, without) if x.answer_ids == y.answer_ids]
    assert [e.id for e in with_reuse] == [e.id for e in without]
    assert len(same) >= len(with_reuse) - max(1, len(with_reuse) // 10)
    assert_same_examples([x for x, _ in same], [y for _, y in same])
    assert abs(m2["labels_recorded"] - m1["labels_recorded"]) <= len(with_reuse) - len(same)


def _teach_cmd(cfg):
    env = {**os.environ, "CTXDISTILL_QUIET": "1"}
    return [sys.executable, "-m", "ctxdistill", "teach", str(cfg)], env


def test_sigkill_then_resume_loses_and_duplicates_nothing(tiny_task, tmp_path):
    from conftest import DEMO_TASK

    inst = json.loads(DEMO_TASK.read_text())["Instances"][:60]
    over = {"teach.shard_size": "4", "teach.batch_size": "4", "generation.max_new_tokens": "24"}
    cfg = tiny_task(**over)
    write_jsonl(cfg.parent / "train.jsonl", [{"id": i["id"], "input": i["input"]} for i in inst])
    cmd, env = _teach_cmd(cfg)
    store = cfg.parent / "run" / "teacher"
    killed_after = []
    for _ in range(2):  # kill twice at different points
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        want = len(list(store.glob("shard-*.json"))) + 2
        deadline = time.time() + 240
        while len(list(store.glob("shard-*.json"))) < want and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "teach finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not (store / "manifest.json").exists()
        killed_after.append(len(list(store.glob("shard-*.json"))))
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    manifest, resumed = read_store(store)
    assert manifest["n_inputs"] == 60 and len(manifest["shards"]) == 15
    ids = [e.id for e in resumed]
    assert len(ids) == len(set(ids))
    assert manifest["n_examples"] + sum(manifest["dropped"].values()) == 120
    # Same artefacts as an uninterrupted run with the same config.
    fresh = load_config(cfg)
    fresh.out_dir = str(tmp_path / "fresh")
    prepare_inputs(fresh)
    teach(fresh)
    fresh_manifest, uninterrupted = read_store(fresh.out / "teacher")
    assert [s["sha256_safetensors"] for s in fresh_manifest["shards"]] == [s["sha256_safetensors"] for s in manifest["shards"]]
    assert_same_examples(resumed, uninterrupted, atol=0)
    assert 0 < killed_after[0] < killed_after[1] < 15


def test_partial_store_from_other_config_is_refused(tiny_task):
    cfg = load_config(tiny_task())
    prepare_inputs(cfg)
    teach(cfg)
    (cfg.out / "teacher" / "manifest.json").unlink()  # as if killed before the end
    other = load_config(tiny_task(**{"generation.max_new_tokens": "7"}))
    prepare_inputs(other)
    with pytest.raises(UserError, match="generation"):
        teach(other)
    other_model = load_config(tiny_task(**{"task.student_system": '"Be brief."'}))
    prepare_inputs(other_model)
    with pytest.raises(UserError, match="student_template"):
        teach(other_model)


def test_corrupted_shard_is_detected_and_regenerated(tiny_task):
    cfg = load_config(tiny_task(**{"teach.shard_size": "4"}))
    prepare_inputs(cfg)
    m1 = teach(cfg)
    shard = cfg.out / "teacher" / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a truncated file
    with pytest.raises(UserError, match="corrupted"):
        read_store(cfg.out / "teacher")
    m2 = teach(cfg)
    assert m2["shards"] == m1["shards"]
    read_store(cfg.out / "teacher")


def test_store_bytes_per_answer_token(tiny_task):
    cfg = load_config(tiny_task(**{"teach.top_k": "20"}))
    prepare_inputs(cfg)
    m = teach(cfg)
    tensors = sum(f.stat().st_size for f in (cfg.out / "teacher").glob("shard-*.safetensors"))
    tokens = sum(s["answer_tokens"] for s in m["shards"])
    assert tokens > 0 and tensors / tokens <= 200
