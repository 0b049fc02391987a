"""Batched generation and teacher scoring, shared by the teacher pass and evaluation."""

from __future__ import annotations

import torch

from ctxdistill.progress import bar


def generate(model, prompts: list[list[int]], *, pad_id: int, eos_id: int, max_new_tokens: int,
             temperature: float, batch_size: int, seed: int, desc: str = "generate") -> list[tuple[list[int], bool]]:
    """Complete every prompt; return (new token ids up to, not including, eos; whether eos was reached).

    Prompts are sorted by length so each left-padded batch wastes little; results come back in order.
    Sampling is seeded per batch, so a run with the same seed and batch size repeats exactly.
    """
    from transformers import GenerationConfig

    gc = GenerationConfig(max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_id,
                          do_sample=temperature > 0, num_beams=1)
    if temperature > 0:
        gc.temperature, gc.top_k, gc.top_p = temperature, 0, 1.0  # pure sampling, as in the paper
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[tuple[list[int], bool]] = [([], False)] * len(prompts)
    with bar(desc, len(prompts)) as advance, torch.inference_mode():
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            width = max(len(prompts[i]) for i in idx)
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):  # left padding: generation continues right after each prompt
                ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i])
                mask[r, width - len(prompts[i]):] = 1
            torch.manual_seed(seed * 1_000_003 + b)
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gc)
            for r, i in enumerate(idx):
                new = out[r, width:].tolist()
                finished = eos_id in new
                results[i] = (new[:new.index(eos_id)] if finished else new, finished)
            advance(len(idx))
    return results


def logits_at(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """fp32 logits only at positions (rows[i], cols[i]): [N, V].

    Runs the decoder for hidden states and applies the LM head at the selected positions only, so a
    batch never materialises [B, L, V] logits (49152 x L floats per row for SmolLM2).
    """
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return lm.get_output_embeddings()(hidden[rows, cols]).float()


def right_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = torch.tensor(s)
        mask[r, :len(s)] = 1
    return ids, mask


def answer_positions(lengths: list[int], answer_lens: list[int], extra: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of the positions whose next-token logits predict each answer token.

    A sequence of length L ending in an answer of A tokens (+ `extra` trailing tokens such as the
    terminator) predicts answer token j from position L - extra - A - 1 + j.
    """
    rows, cols = [], []
    for r, (n, a) in enumerate(zip(lengths, answer_lens)):
        first = n - extra - a - 1
        rows += [r] * (a + extra)
        cols += list(range(first, first + a + extra))
    return torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)


def topk_with_tail(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k log-probs of fp32 logits [N, V] and the log of the remaining tail mass.

    tail = log(1 - sum_k p) computed as log(-expm1(logsumexp(top-k log-probs))), which stays accurate
    when the top-k hold almost all the mass; clamped at -80 so it is never -inf.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    top_lp, top_ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
    covered = torch.logsumexp(top_lp, dim=-1).clamp(max=-1e-12)
    tail = torch.log(-torch.expm1(covered)).clamp(min=-80.0)
    return top_ids, top_lp, tail
