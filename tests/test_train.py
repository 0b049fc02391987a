"""Student training: on-policy mode, batching, the shared-prefix step, on the tiny random Llama."""

import copy
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from ctxdistill.config import load_config
from ctxdistill.core.errors import UserError
from ctxdistill.core.models import load_model, load_tokenizer
from ctxdistill.pipeline import run
from ctxdistill.core.sampling import answer_positions, logits_at, right_pad, topk_with_tail
from ctxdistill.store import Example
from ctxdistill.core.loop import PACK_MAX_TOKENS, batch_loss, batch_order
from ctxdistill.core.student import setup_model
from ctxdistill.train import train


def test_on_policy_run_trains_without_a_teacher_pass(tiny_task, tiny_model_dir):
    cfg = load_config(tiny_task(**{"train.mode": '"on-policy"'}))
    rep = run(cfg)
    assert not (cfg.out / "teacher").exists()  # no teacher pass: the teacher scores rollouts in training
    summary = json.loads((cfg.out / "student/ctxdistill_config.json").read_text())
    assert summary["mode"] == "on-policy"
    op = summary["on_policy"]
    assert op["rollouts"] == 12 * 2  # 12 inputs x 2 epochs, one rollout each
    assert 0 <= op["finished_rate"] <= 1 and op["mean_rollout_tokens"] >= 1
    assert op["teacher_mean_logp"] < 0 and op["shared_prefix_tokens"] > 0
    before = load_file(str(tiny_model_dir / "model.safetensors"))
    after = load_file(str(cfg.out / "student/model.safetensors"))
    assert not [k for k in before if torch.equal(before[k], after[k])]
    assert set(rep["scores"]) == {"base", "teacher", "student"}
    # Same config again: the student is reused, not retrained.
    assert train(cfg)["seconds"] == summary["seconds"]


def test_on_policy_labels_come_from_the_initial_weights_with_context(tiny_task, tiny_model_dir):
    """With LoRA the teacher is the student with its adapter off: after the adapter has moved, the soft
    labels still equal a fresh initial model's, scored on teacher prompt + the student's own tokens."""
    from ctxdistill.onpolicy import rollouts
    from ctxdistill.core.sampling import prefix_for
    from ctxdistill.prompts import fit_prompts

    cfg = load_config(tiny_task(**{"train.mode": '"on-policy"', "train.method": '"lora"'}))
    tok = load_tokenizer(cfg.model.name)
    student = setup_model(cfg)
    with torch.no_grad():
        for n, p in student.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # the student now differs from the initial weights
    rows = [{"id": "a", "input": "France"}, {"id": "b", "input": "Peru"}, {"id": "c", "input": "Kenya"}]
    t_prompts, s_prompts = zip(*[fit_prompts(cfg, tok, r, 512)[:2] for r in rows])
    with student.disable_adapter():
        prefix = prefix_for(student, list(t_prompts))
    assert prefix is not None
    examples, stats = rollouts(student, None, tok, cfg, [0, 1, 2], rows, list(t_prompts), list(s_prompts), prefix, 0)
    assert student.training and stats["rollouts"] == 3
    base = load_model(str(tiny_model_dir))
    for i, ex in enumerate(examples):
        assert ex.prompt_ids == list(s_prompts[i])
        seq = list(t_prompts[i]) + ex.answer_ids
        ids, mask = right_pad([seq], tok.pad_token_id)
        r, c = answer_positions([len(seq)], [len(ex.answer_ids)])
        with torch.no_grad():
            top_ids, top_lp, tail = topk_with_tail(logits_at(base, ids, mask, r, c), cfg.teach.top_k)
        assert torch.equal(top_ids, ex.topk_ids)
        torch.testing.assert_close(top_lp, ex.topk_logprobs, atol=1e-4, rtol=0)
        with torch.no_grad():  # ... and differ from the moved student's own distribution
            own = topk_with_tail(logits_at(student, ids, mask, r, c), cfg.teach.top_k)[1]
        assert not torch.allclose(own, ex.topk_logprobs, atol=1e-3)


def test_on_policy_teacher_prompt_over_window_names_both_lengths(tiny_task):
    cfg = load_config(tiny_task(**{"train.mode": '"on-policy"', "model.max_length": "40"}))
    run_inputs = __import__("ctxdistill.inputs", fromlist=["prepare_inputs"]).prepare_inputs
    run_inputs(cfg)
    with pytest.raises(UserError, match=r"teacher prompt for input .* is \d+ tokens; with max_new_tokens 6 it "
                                        r"needs \d+, over the model window of 40 tokens"):
        train(cfg)
    assert not (cfg.out / "student").exists()


def test_cli_mode_flag_overrides_config(tiny_task):
    import subprocess
    import sys

    cfg_path = tiny_task(**{"train.epochs": "1"})
    r = subprocess.run([sys.executable, "-m", "ctxdistill", "run", str(cfg_path), "--mode", "on-policy"],
                       capture_output=True, text=True, env={**__import__("os").environ, "CTXDISTILL_QUIET": "1"})
    assert r.returncode == 0, r.stderr
    cfg = load_config(cfg_path)
    assert json.loads((cfg.out / "student/ctxdistill_config.json").read_text())["mode"] == "on-policy"
    assert not (cfg.out / "teacher").exists()
    r = subprocess.run([sys.executable, "-m", "ctxdistill", "train", str(cfg_path), "--mode", "sideways"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "invalid choice" in r.stderr and "Traceback" not in r.stderr


def test_batch_order_covers_every_index_once_and_groups_lengths():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 200, (1000,), generator=gen).tolist()

    def padding(batches):
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches) / sum(lengths)

    grouped = batch_order(lengths, 8, torch.Generator().manual_seed(1), True)
    plain = batch_order(lengths, 8, torch.Generator().manual_seed(1), False)
    for batches in (grouped, plain):
        assert sorted(i for b in batches for i in b) == list(range(1000))
        assert len(batches) == 125
    assert padding(grouped) < 0.2 * padding(plain)
    # Batch order stays shuffled: the first batches are not the shortest ones.
    firsts = [max(lengths[i] for i in b) for b in grouped[:10]]
    assert firsts != sorted(firsts)


def test_unterminated_example_has_no_terminator_label(tiny_model_dir):
    model = load_model(str(tiny_model_dir))
    k = 4
    ex = Example(id="x", prompt_ids=[1, 5, 6], answer_ids=[7, 8], topk_ids=torch.tensor([[7, 1, 2, 3], [8, 1, 2, 3]]),
                 topk_logprobs=torch.full((2, k), -2.0), tail_logmass=torch.full((2,), -1.0))
    _, with_term = batch_loss(model, [ex], loss="forward_kl", eos_id=2, pad_id=2)
    ex.terminated = False
    _, without = batch_loss(model, [ex], loss="forward_kl", eos_id=2, pad_id=2)
    assert (with_term["answer_n"], with_term["terminator_n"]) == (2, 1) and (without["answer_n"], without["terminator_n"]) == (2, 0)
    assert without["terminator_sum"] == 0.0 and with_term["terminator_sum"] > 0
    assert without["answer_sum"] == pytest.approx(with_term["answer_sum"])


def _student_and_batch(cfg, *, seed: int, answer_len):
    """(tokenizer, student, batch): the config's student (LoRA's B matrices made non-zero, so the adapter
    changes the output) and 4 examples of random answers (`answer_len(j)` tokens for row j, row 1 without a
    terminator) with random top-8 teacher labels."""
    from ctxdistill.core.sampling import topk_with_tail
    from ctxdistill.core.templates import Template

    tok = load_tokenizer(cfg.model.name)
    model = setup_model(cfg)
    if cfg.train.method == "lora":
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
    g = torch.Generator().manual_seed(seed)
    batch = []
    for j, x in enumerate(["France", "Papua New Guinea", "Chad", "Saint Vincent and the Grenadines"]):
        a = answer_len(j)
        ids, lp, tail = topk_with_tail(torch.randn(a, tok.vocab_size, generator=g) * 3, 8)
        batch.append(Example(id=x, prompt_ids=Template(user="{input}").render(tok, x)[0],
                             answer_ids=torch.randint(100, 40000, (a,), generator=g).tolist(),
                             topk_ids=ids, topk_logprobs=lp, tail_logmass=tail, terminated=j != 1))
    return tok, model, batch


@pytest.mark.parametrize("method, share, packed", [("full", True, False), ("lora", True, False),
                                                  ("full", False, True), ("full", True, True), ("lora", True, True)])
def test_shared_prefix_and_packed_steps_give_the_plain_loss_and_gradients(tiny_task, method, share, packed):
    """Rows sharing a long prefix (the chat system prompt): running it once with cascade attention and
    backpropagating through the one copy, and/or packing the rows without padding, gives the same loss
    and gradients as the plain padded batch."""
    cfg = load_config(tiny_task(**{"train.method": f'"{method}"'}))
    tok, model, batch = _student_and_batch(cfg, seed=0, answer_len=lambda j: 2 + j)
    results = []
    if packed:  # rows adding up to more than PACK_MAX_TOKENS are padded even with packing on
        _, long_parts = batch_loss(model, [dataclasses.replace(e, prompt_ids=e.prompt_ids * 12) for e in batch],
                                   loss="forward_kl", eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                                   share_prefix=False, packed=True)
        assert long_parts["computed_tokens"] > PACK_MAX_TOKENS and long_parts["pad_tokens"] > 0
    for share_, packed_ in ((False, False), (share, packed)):
        model.zero_grad(set_to_none=True)
        value, parts = batch_loss(model, batch, loss="forward_kl", eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                                  share_prefix=share_, packed=packed_)
        value.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((value.item(), parts, grads))
    (plain, p_parts, p_grads), (shared, s_parts, s_grads) = results
    assert s_parts["seq_tokens"] == p_parts["seq_tokens"]
    if share:
        assert s_parts["computed_tokens"] < 0.6 * p_parts["computed_tokens"]  # the system prompt ran once, not 4 times
    if packed:
        assert s_parts["pad_tokens"] == 0 < p_parts["pad_tokens"]
    assert shared == pytest.approx(plain, rel=1e-5)
    assert set(s_grads) == set(p_grads) and len(p_grads) > 0
    for n in p_grads:
        torch.testing.assert_close(s_grads[n], p_grads[n], atol=1e-5, rtol=1e-3, msg=n)
    assert any(p_grads[n].abs().sum() > 0 for n in p_grads)


@pytest.mark.parametrize("method, loss, packed", [("full", "forward_kl", True), ("lora", "jsd", False),
                                                  ("full", "ce", False)])
def test_chunked_loss_gives_the_same_loss_and_gradients(tiny_task, method, loss, packed):
    """train.loss_chunk: the LM head and the loss in chunks of 3 positions (16 answer positions and 3
    terminators, so chunks end mid-example and the last one is short), recomputed in the backward pass, give
    the loss, its parts and the gradients (the tied head/embedding weight included) of the unchunked step."""
    from ctxdistill.core.loop import StudentLoss

    cfg = load_config(tiny_task(**{"train.method": f'"{method}"', "train.loss": f'"{loss}"', "train.loss_chunk": "3"}))
    assert cfg.train.loss_chunk == 3
    tok, model, batch = _student_and_batch(cfg, seed=1, answer_len=lambda j: 2 + 2 * j)
    results = []
    for chunk in (0, cfg.train.loss_chunk):
        model.zero_grad(set_to_none=True)
        module = StudentLoss(model, loss=loss, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, packed=packed,
                             loss_chunk=chunk)
        value, parts = module(batch)
        value.backward()
        results.append((value.item(), parts, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (plain, p_parts, p_grads), (chunked, c_parts, c_grads) = results
    assert (c_parts["answer_n"], c_parts["terminator_n"]) == (p_parts["answer_n"], p_parts["terminator_n"]) == (20, 3)
    assert c_parts["terminator_sum"] == pytest.approx(p_parts["terminator_sum"], rel=1e-5) and p_parts["terminator_sum"] > 0
    assert chunked == pytest.approx(plain, rel=1e-5) and plain > 0
    assert set(c_grads) == set(p_grads) and len(p_grads) > 0
    for n in p_grads:
        torch.testing.assert_close(c_grads[n], p_grads[n], atol=1e-5, rtol=1e-4, msg=n)
    assert any(p_grads[n].abs().sum() > 0 for n in p_grads)
    if method == "full":
        head = next(n for n in p_grads if "embed_tokens" in n or "lm_head" in n)  # tied: the head's gradient lands here
        assert p_grads[head].abs().sum() > 0
    with torch.no_grad():  # no autograd (held-out loss): nothing to recompute, same value
        assert module(batch)[0].item() == pytest.approx(plain, rel=1e-5)


def test_adamw_on_bfloat16_weights_is_a_warning(tiny_model_dir):
    """Full fine-tuning of bfloat16 weights loses small AdamW updates: fit warns before training. LoRA's adapter
    weights are float32 (peft upcasts them), and a float32 model is fine: no warning."""
    from peft import LoraConfig, get_peft_model

    from ctxdistill.core.loop import low_precision_warning

    model = load_model(str(tiny_model_dir))
    assert low_precision_warning(model) is None
    model.to(torch.bfloat16)
    assert "AdamW updates bfloat16 weights in place" in low_precision_warning(model)
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert low_precision_warning(lora) is None


@pytest.mark.parametrize("method", ["full", "lora"])
def test_gradient_accumulation_gives_the_step_of_one_batch(tiny_task, method):
    """train.grad_accum: 4 examples (answers of 1 to 7 tokens, one without a terminator) as 3 uneven micro-batches,
    or as 8 (four of them empty: stand-ins weighted 0), give the loss, its parts and the SGD update of one batch."""
    from ctxdistill.core.loop import StudentLoss, share_of, train_step
    from ctxdistill.core.student import train_settings

    cfg = load_config(tiny_task(**{"train.method": f'"{method}"', "train.grad_accum": "3"}))
    assert train_settings(cfg) == train_settings(load_config(tiny_task(**{"train.method": f'"{method}"'})))  # not in the reuse key
    tok, model, batch = _student_and_batch(cfg, seed=2, answer_len=lambda j: 1 + 2 * j)
    steps = {}
    for n in (1, 3, 8):
        m = copy.deepcopy(model)
        before = {k: p.detach().clone() for k, p in m.named_parameters() if p.requires_grad}
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        module = StudentLoss(m, loss="forward_kl", eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
        loss, parts = train_step(module, opt, sched, share_of(batch, 0, 1), max_grad_norm=0.0, grad_accum=n)
        steps[n] = loss, parts, {k: before[k] - p.detach() for k, p in m.named_parameters() if p.requires_grad}
    one_loss, one_parts, one_update = steps[1]
    assert any(d.abs().sum() > 0 for d in one_update.values())
    for n in (3, 8):
        loss, parts, update = steps[n]
        assert loss == pytest.approx(one_loss, rel=1e-5)
        assert (parts["tokens"], parts["seq_tokens"]) == (one_parts["tokens"], one_parts["seq_tokens"]) == (19, sum(len(e.prompt_ids) for e in batch) + 19)
        for k in one_update:
            torch.testing.assert_close(update[k], one_update[k], atol=1e-6, rtol=1e-4, msg=k)
