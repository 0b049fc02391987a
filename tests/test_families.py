"""Bring your own model: a tiny random model of each tested family (models.FAMILIES), built from its config with
the SmolLM2 tokenizer plus the family's special tokens and a chat template in the family's style, written for
these tests. For each: the logits every path computes equal `model(...).logits`; the stop tokens come from the
generation config and the template; generation ends at the family's end of turn and the answer holds no marker;
a system prompt goes where the family's template puts it; and `bake` runs end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ctxdistill.cli import main

# Chat templates in each family's style (not copies of theirs): Llama 3's headers, ChatML (Qwen), Mistral v0.1's
# [INST] that refuses a system role, Gemma 2's turns that refuse one, Gemma 3's that fold it into the first user
# turn, Phi-3's role tags.
TEMPLATES = {
    "llama3": ("{{ '<|begin_of_text|>' }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
               "'<|end_header_id|>\n\n' + m['content'] + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
               "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"),
    "qwen3": ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
    "qwen2": ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
    "mistral": ("{{ bos_token }}{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
                "{% endif %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
                "{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"),
    "gemma2": ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
               "{% endif %}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
               "{{ '<start_of_turn>' + role + '\n' + m['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"),
    "gemma3": ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\n\n' %}"
               "{% set turns = messages[1:] %}{% else %}{% set first = '' %}{% set turns = messages %}{% endif %}"
               "{% for m in turns %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
               "{{ '<start_of_turn>' + role + '\n' + (first if loop.first else '') + m['content'] | trim + "
               "'<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"),
    "phi3": ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
             "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"),
}
# family: (model_type, config overrides, added special tokens, bos, eos, the generation config's eos list, turn end)
FAMILIES = {
    "llama3": ("llama", {}, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                             "<|end_of_text|>", "<|eom_id|>"], "<|begin_of_text|>", "<|end_of_text|>",
               ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"], "<|eot_id|>"),
    "qwen2": ("qwen2", {}, [], None, "<|endoftext|>", ["<|im_end|>", "<|endoftext|>"], "<|im_end|>"),
    "qwen3": ("qwen3", {}, [], None, "<|im_end|>", ["<|im_end|>", "<|endoftext|>"], "<|im_end|>"),
    "mistral": ("mistral", {"sliding_window": None}, ["<s>", "</s>"], "<s>", "</s>", ["</s>"], "</s>"),
    "gemma2": ("gemma2", {"final_logit_softcapping": 0.5, "query_pre_attn_scalar": 16},
               ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", ["<eos>", "<end_of_turn>"],
               "<end_of_turn>"),
    "gemma3": ("gemma3_text", {"final_logit_softcapping": 0.5, "query_pre_attn_scalar": 16},
               ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", ["<eos>", "<end_of_turn>"],
               "<end_of_turn>"),
    "phi3": ("phi3", {}, ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], None, "<|endoftext|>",
             ["<|end|>", "<|endoftext|>"], "<|end|>"),
}
SYSTEM = "You are the front desk of Zephyr Clinic. Always name Zephyr Clinic. We open at 8am and close at 6pm daily."
USERS = ["When do you open?", "Can I bring my cat?", "Where are you?", "Do you take walk-ins on Sunday mornings?"]


def family_model(root: Path, family: str, tokenizer_dir: Path, taught: bool = False) -> Path:
    """A tiny random model of `family` as a Hugging Face directory (tokenizer, generation_config.json). With
    `taught`, a few hundred Adam steps teach it to answer anything with " OK" and its end of turn."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    model_type, over, added, bos, eos, gen_eos, _ = FAMILIES[family]
    if taught and "final_logit_softcapping" in over:  # a cap of 0.5 gives the logits-equality test power, but
        over = {**over, "final_logit_softcapping": 30.0}  # leaves no room for a confident reply: Gemma's own cap
    out = root / family
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if added:
        tok.add_special_tokens({"additional_special_tokens": added})
    tok.chat_template = TEMPLATES[family]
    tok.eos_token = eos
    if bos:
        tok.bos_token = bos
    tok.pad_token = eos
    ids = tok.convert_tokens_to_ids
    cfg = AutoConfig.for_model(model_type, vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                               tie_word_embeddings=True, bos_token_id=ids(bos or eos), eos_token_id=ids(eos),
                               pad_token_id=ids(eos), **over)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    if taught:
        _teach_to_end(model, tok, ids(FAMILIES[family][6]))
    model.generation_config = GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=[ids(t) for t in gen_eos],
                                               pad_token_id=ids(eos))
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def _teach_to_end(model, tok, end_id: int, max_steps: int = 150) -> None:
    """Adam on the cross-entropy of " OK" + end of turn after 8 prompts (with and without the system prompt),
    logits at the answer positions only, until the loss is below 0.02."""
    from ctxdistill.core.sampling import answer_positions, logits_at, right_pad
    from ctxdistill.core.templates import chat_text, encode

    answer = encode(tok, " OK") + [end_id]
    seqs = [encode(tok, chat_text(tok, ([{"role": "system", "content": SYSTEM}] if i % 2 else [])
                                   + [{"role": "user", "content": u}])) + answer for i, u in enumerate(USERS * 2)]
    ids, mask = right_pad(seqs, tok.pad_token_id)
    rows, cols = answer_positions([len(q) for q in seqs], [len(answer)] * len(seqs))
    targets = torch.tensor(answer * len(seqs))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(max_steps):
        loss = torch.nn.functional.cross_entropy(logits_at(model, ids, mask, rows, cols), targets)
        if loss.item() < 0.02:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.fixture(scope="module")
def families(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("families")
    return {f: family_model(root, f, tokenizer_dir) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_stop_tokens_come_from_the_generation_config_and_the_template(families, family):
    from ctxdistill.core import models

    tok = models.load_tokenizer(str(families[family]))
    ids = tok.convert_tokens_to_ids
    *_, gen_eos, turn_end = FAMILIES[family]
    assert models.turn_end_id(tok) == ids(turn_end)
    assert set(models.stop_ids(tok)) == {ids(t) for t in gen_eos} | {tok.eos_token_id}
    assert models.stop_ids(tok)[0] == ids(turn_end)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_system_prompt_goes_where_the_family_puts_it(families, family):
    """Every family's teacher prompt holds the system prompt once, before the user's message; a template that
    refuses a system role (Gemma 2, Mistral v0.1 style) gets it at the start of the first user turn."""
    from ctxdistill.core import models
    from ctxdistill.core.templates import Template, chat_text, takes_system

    tok = models.load_tokenizer(str(families[family]))
    text = tok.decode(Template(user="{input}", system=SYSTEM).chat_ids(tok, USERS[0]))
    assert text.count(SYSTEM) == 1 and text.index(SYSTEM) < text.index(USERS[0])
    assert takes_system(tok) == (family not in ("gemma2", "mistral"))
    if not takes_system(tok):
        assert f"{SYSTEM}\n\n{USERS[0]}" in chat_text(tok, [{"role": "system", "content": SYSTEM},
                                                            {"role": "user", "content": USERS[0]}])


def _reference(model, seqs: list[list[int]], answer_lens: list[int]) -> torch.Tensor:
    """`model(...).logits` at the positions predicting each answer token, every sequence run alone."""
    with torch.no_grad():
        return torch.cat([model(input_ids=torch.tensor([s])).logits[0, len(s) - a - 1:len(s) - 1]
                          for s, a in zip(seqs, answer_lens)])


@pytest.mark.parametrize("family", FAMILIES)
def test_our_logits_equal_the_models_own(families, family):
    """At answer positions, `logits_at` (with and without the shared prefix) and the training loss (packed and
    padded, with and without the prefix) agree with `model(...).logits` within 1e-5 in fp32. For Gemma the
    soft-cap matters: the bare LM head differs from the model's logits, so the check has power."""
    from ctxdistill.core import losses, models
    from ctxdistill.core.loop import batch_loss
    from ctxdistill.core.sampling import answer_positions, lm_head, logits_at, prefix_for, right_pad, topk_with_tail
    from ctxdistill.core.templates import Template, encode
    from ctxdistill.store import Example

    d = families[family]
    tok, model = models.load_tokenizer(str(d)), models.load_model(str(d))
    prompts = [Template(user="{input}", system=SYSTEM).chat_ids(tok, u) for u in USERS[:3]]
    answers = [encode(tok, a) for a in (" We open at 8am.", " Yes, cats are welcome.", " In the old mill.")]
    seqs, lens = [p + a for p, a in zip(prompts, answers)], [len(a) for a in answers]
    want = _reference(model, seqs, lens)
    for enabled in (False, True):
        prefix = prefix_for(model, prompts, enabled=enabled)
        p_len = len(prefix) if prefix is not None else 0
        own = [s[p_len:] for s in seqs]
        ids, mask = right_pad(own, tok.pad_token_id)
        rows, cols = answer_positions([len(q) for q in own], lens)
        with torch.no_grad():
            got = logits_at(model, ids, mask, rows, cols, prefix=prefix)
        assert (got - want).abs().max() < 1e-5, (family, enabled)
    if family.startswith("gemma"):
        with torch.no_grad():
            bare = lm_head(model).head(model.model(input_ids=torch.tensor([seqs[0]])).last_hidden_state)[0, -lens[0] - 1:-1]
        assert (bare - want[:lens[0]]).abs().max() > 1e-3
    # The loss: soft labels from the reference logits; the student here is the same model, so every path must
    # give the loss computed from `model(...).logits` by hand.
    top_ids, top_lp, tail = topk_with_tail(want, 8)
    examples, start = [], 0
    for p, a in zip(prompts, answers):
        sl = slice(start, start + len(a))
        examples.append(Example(id=str(start), prompt_ids=p, answer_ids=a, topk_ids=top_ids[sl], topk_logprobs=top_lp[sl],
                                tail_logmass=tail[sl], terminated=False))
        start += len(a)
    hand = losses.mean_loss(*losses.forward_kl(want, top_ids, top_lp, tail)).item()
    for packed in (False, True):
        for share in (False, True):
            with torch.no_grad():
                loss, _ = batch_loss(model, examples, loss="forward_kl", eos_id=models.turn_end_id(tok),
                                     pad_id=tok.pad_token_id, share_prefix=share, packed=packed)
            assert abs(loss.item() - hand) < 1e-5, (family, packed, share)


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_ends_at_the_familys_end_of_turn(tmp_path, tokenizer_dir, family):
    """A model taught to answer " OK" and its end of turn: generation (transformers' and ours, with and without
    the shared prefix) stops there, and the answer holds " OK" only, no turn marker."""
    from ctxdistill.core import models
    from ctxdistill.core.sampling import generate, prefix_for
    from ctxdistill.core.templates import Template, encode

    d = family_model(tmp_path, family, tokenizer_dir, taught=True)
    tok, model = models.load_tokenizer(str(d)), models.load_model(str(d))
    prompts = [Template(user="{input}", system=SYSTEM).chat_ids(tok, u) for u in USERS]
    for prefix, seeds in ((None, None), (prefix_for(model, prompts), None), (None, [1, 2, 3, 4])):
        outs = generate(model, prompts, pad_id=tok.pad_token_id, eos_id=models.stop_ids(tok), max_new_tokens=8,
                        temperature=0.0, batch_size=4, seed=0, prefix=prefix, seeds=seeds)
        assert [o[:2] for o in outs] == [(encode(tok, " OK"), True)] * 4, family


@pytest.mark.parametrize("family", FAMILIES)
def test_bake_end_to_end(tmp_path, tokenizer_dir, family):
    """`bake` on each family's taught model: teach -> train -> eval; the stored answers hold no turn marker and
    end with the family's end of turn (the terminator the student learns)."""
    d = family_model(tmp_path, family, tokenizer_dir, taught=True)
    (tmp_path / "prompt.txt").write_text(SYSTEM)
    (tmp_path / "eval.txt").write_text("\n".join(USERS) + "\n")
    out = tmp_path / "out"
    argv = ["bake", "--system-prompt", tmp_path / "prompt.txt", "--model", d, "--out", out, "--eval", tmp_path / "eval.txt",
            "--n-inputs", "8", "--set", "generation.max_new_tokens=8", "--set", "eval.max_new_tokens=8",
            "--set", "data.synth.max_new_tokens=12", "--set", "teach.samples=1", "--set", "train.epochs=1"]
    assert main([str(a) for a in argv]) == 0
    from ctxdistill.core import models

    from ctxdistill.store import read_store

    tok = models.load_tokenizer(str(d))
    manifest, examples = read_store(out / "teacher")
    assert manifest["terminator_id"] == tok.convert_tokens_to_ids(FAMILIES[family][6])
    stops = set(models.stop_ids(tok))
    assert examples and not any(t in stops for e in examples for t in e.answer_ids)
    assert sum(e.terminated for e in examples) >= len(examples) / 2  # most samples end at the turn end
    assert json.loads((out / "eval" / "report.json").read_text())["n_eval"] == len(USERS)


def test_an_untested_family_is_refused_before_any_work(tmp_path, capsys):
    """A model type outside models.FAMILIES (here GPT-2) is one line naming the tested families, exit 2, and
    nothing written: its forward may do something to the logits that sampling, labels, loss and KL would miss."""
    from transformers import GPT2Config

    d = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(d)
    (tmp_path / "prompt.txt").write_text(SYSTEM)
    out = tmp_path / "out"
    assert main(["bake", "--system-prompt", str(tmp_path / "prompt.txt"), "--model", str(d), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'gpt2' model" in err and "llama, mistral, qwen2" in err
    assert not out.exists()
