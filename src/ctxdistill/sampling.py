"""Batched generation and teacher scoring, shared by the teacher pass and evaluation.

Shared-prefix reuse (DESIGN.md §5): every teacher prompt starts with the same context tokens, so their
KV cache is computed once (`PrefixCache`) and copied for each batch. A batch is laid out as
[prefix | pad | suffix] with attention-mask zeros on the pads; positions come from the mask, so each
suffix continues right after the prefix exactly as in the unshared prompt.
"""

from __future__ import annotations

import copy
import inspect

import torch

from ctxdistill.progress import bar


def cache_kwarg(module) -> str:
    """Name of the KV-cache argument: `cache` in recent transformers, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


class PrefixCache:
    """The KV cache of a token prefix shared by many prompts, computed once at batch size 1."""

    def __init__(self, model, prefix_ids: list[int]):
        from transformers import DynamicCache

        self.ids = list(prefix_ids)
        self.cache = DynamicCache(config=model.config)
        with torch.inference_mode():
            model(input_ids=torch.tensor([self.ids]), use_cache=True, **{cache_kwarg(model): self.cache})

    def __len__(self) -> int:
        return len(self.ids)

    def expand(self, batch: int):
        """A fresh copy of the cache for `batch` rows (generation and scoring append to it)."""
        c = copy.deepcopy(self.cache)
        c.batch_repeat_interleave(batch)
        return c


def shared_prefix(prompts: list[list[int]], min_len: int = 16) -> int:
    """Length of the token prefix common to all prompts, leaving each at least one token of its own;
    0 when shorter than `min_len` (not worth a cache: the caller falls back to plain batching)."""
    if len(prompts) < 2:
        return 0
    n = min(len(p) for p in prompts) - 1
    first = prompts[0]
    for p in prompts[1:]:
        i = 0
        while i < n and p[i] == first[i]:
            i += 1
        n = i
    return n if n >= min_len else 0


def generate(model, prompts: list[list[int]], *, pad_id: int, eos_id: int, max_new_tokens: int,
             temperature: float, batch_size: int, seed: int, desc: str = "generate",
             prefix: PrefixCache | None = None) -> list[tuple[list[int], bool]]:
    """Complete every prompt; return (new token ids up to, not including, eos; whether eos was reached).

    Prompts are sorted by length so each left-padded batch wastes little; results come back in order.
    Sampling is seeded per batch, so a run with the same seed and batch size repeats exactly. With
    `prefix`, every prompt must start with `prefix.ids`, whose KV cache is reused instead of recomputed.
    """
    p_len = len(prefix) if prefix is not None else 0
    if prefix is not None:
        assert all(p[:p_len] == prefix.ids for p in prompts), "every prompt must start with the shared prefix"
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
            for r, i in enumerate(idx):  # left padding (after any shared prefix): generation continues right after each prompt
                suffix = prompts[i][p_len:]
                ids[r, width - len(suffix):] = torch.tensor(suffix)
                mask[r, width - len(suffix):] = 1
                if p_len:
                    ids[r, :p_len], mask[r, :p_len] = torch.tensor(prefix.ids), 1
            torch.manual_seed(seed * 1_000_003 + b)
            extra = {cache_kwarg(model): prefix.expand(len(idx))} if p_len else {}
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gc, **extra)
            for r, i in enumerate(idx):
                new = out[r, width:].tolist()
                finished = eos_id in new
                results[i] = (new[:new.index(eos_id)] if finished else new, finished)
            advance(len(idx))
    return results


def logits_at(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              rows: torch.Tensor, cols: torch.Tensor, prefix: PrefixCache | None = None) -> torch.Tensor:
    """fp32 logits only at positions (rows[i], cols[i]): [N, V].

    Runs the decoder for hidden states and applies the LM head at the selected positions only, so a
    batch never materialises [B, L, V] logits (49152 x L floats per row for SmolLM2). With `prefix`,
    input_ids/attention_mask/cols cover only what follows the shared prefix (right-padded).
    """
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if prefix is None:
        hidden = lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    else:
        b, w = input_ids.shape
        full_mask = torch.cat([torch.ones((b, len(prefix)), dtype=attention_mask.dtype), attention_mask], dim=1)
        positions = torch.arange(len(prefix), len(prefix) + w).expand(b, w)
        decoder = lm.get_decoder()
        hidden = decoder(input_ids=input_ids, attention_mask=full_mask, position_ids=positions, use_cache=True,
                         **{cache_kwarg(decoder): prefix.expand(b)}).last_hidden_state
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
