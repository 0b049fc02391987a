"""Batched generation and teacher scoring, shared by the teacher pass and evaluation.

Shared-prefix reuse (DESIGN.md §5): every teacher prompt starts with the same context tokens, so their
KV cache is computed once (`PrefixCache`, batch 1) and shared by every row through cascade attention
(cascade.py): rows hold only their own tokens, left-padded, with positions continuing after the prefix.
"""

from __future__ import annotations

import inspect
from typing import NamedTuple

import torch

from ctxdistill.core.progress import bar


class Labels(NamedTuple):
    """The model's own (unscaled) distribution at each of n generated tokens, recorded while decoding: the
    teacher's soft labels without a second pass."""
    top_ids: torch.Tensor         # [n, k] the k most likely token ids
    top_logprobs: torch.Tensor    # [n, k] their log-probs
    tail_logmass: torch.Tensor    # [n] log of the mass outside the top k
    chosen_logprob: torch.Tensor  # [n] log-prob of the token drawn


class Completion(NamedTuple):
    """One prompt's completion from `generate`."""
    ids: list[int]                # new token ids, up to and not including the stop token
    finished: bool                # a stop token was reached (else max_new_tokens cut it)
    labels: Labels | None = None  # with keep_topk, where our decoder ran (else None)


def cache_kwarg(module) -> str:
    """Name of the KV-cache argument: `cache` in recent transformers, `past_key_values` before."""
    base = module.get_base_model() if hasattr(module, "get_base_model") else module  # peft wraps with **kwargs
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


class PrefixCache:
    """The KV cache of a token prefix shared by many prompts, computed once at batch size 1.

    With `grad=True` (training) the cache keeps its autograd graph: every row's loss backpropagates
    through the one shared copy, which gives the same gradients as running the prefix in every row.
    """

    def __init__(self, model, prefix_ids: list[int], grad: bool = False):
        import contextlib

        from transformers import DynamicCache

        self.ids = list(prefix_ids)
        self.cache = DynamicCache(config=model.config)
        # not inference_mode: the cache may meet autograd-tracked queries later. Only the keys and values are
        # used: logits_to_keep=1 spares the LM head over the prefix ([1, P, vocab]: on the 135M model the head is
        # 28M of its weights' 135M and a fifth of a prefix pass's FLOPs, and the logits 200 KB a token)
        with contextlib.nullcontext() if grad else torch.no_grad():
            model(input_ids=torch.tensor([self.ids], device=model.device), use_cache=True, logits_to_keep=1,
                  **{cache_kwarg(model): self.cache})

    def __len__(self) -> int:
        return len(self.ids)


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


# Decoder types whose attention goes through transformers' attention-function interface with plain
# causal masks (no sliding window, no logit soft-capping), so cascade attention is exact for them, and
# whose masks honour packed rows (restarting positions, see `pack`).
CASCADE_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3"}


def verified(model) -> bool:
    """Whether cascade attention and packed rows are verified exact for this model's type."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = lm.config
    return cfg.model_type in CASCADE_MODEL_TYPES and not getattr(cfg, "sliding_window", None)


def prefix_for(model, prompts: list[list[int]], enabled: bool = True, grad: bool = False) -> PrefixCache | None:
    """A shared-prefix cache for these prompts, or None (no useful shared prefix, or a model type
    cascade attention is not verified for: then the plain path runs, with the same results)."""
    if not enabled or not verified(model):
        return None
    n = shared_prefix(prompts)
    return PrefixCache(model, prompts[0][:n], grad=grad) if n else None


def generate(model, prompts: list[list[int]], *, pad_id: int, eos_id: int | list[int], max_new_tokens: int,
             temperature: float, batch_size: int, seed: int, desc: str = "generate",
             prefix: PrefixCache | None = None, keep_topk: int = 0, done: dict | None = None,
             on_batch=None, seeds: list[int] | None = None) -> list[Completion]:
    """Complete every prompt; return a `Completion` each (new token ids up to, not including, the stop token;
    whether one was reached; the recorded labels).
    `eos_id` may be a list (models.stop_ids: a family's end of turn and its other stop tokens): any of them ends.

    Prompts are sorted by length so each left-padded batch wastes little; results come back in order.
    Sampling is seeded per batch, so a run with the same seed and batch size repeats exactly. With
    `seeds` (one per prompt), each prompt draws from a random stream of its own instead (see
    `draw_tokens`): its completion does not depend on which prompts share its batch, or in what order
    they come, up to the float rounding that a different padding may cause. With `prefix`, every
    prompt must start with `prefix.ids`, whose KV cache is reused instead of recomputed.

    With `keep_topk` = k and a `prefix` or `seeds` (then the decoder is ours, so it can record them), each
    completion's `labels` hold the model's own distribution at every generated token (`Labels`): the teacher's
    soft labels, without a second pass. Otherwise `labels` is None.

    Resuming (evaluation checkpoints): `done` maps batch number -> {prompt index: (ids, finished)} for
    batches an earlier run finished; they are not recomputed. `on_batch(batch_no, {index: (ids,
    finished)})` is called after each batch computed here. Batches are fixed by the prompts and
    batch_size (and seeded by position), so a resumed run computes exactly the batches it lacks.
    """
    from transformers import GenerationConfig

    stops = [eos_id] if isinstance(eos_id, int) else list(eos_id)
    gc = GenerationConfig(max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=stops,
                          do_sample=temperature > 0, num_beams=1)
    if temperature > 0:
        gc.temperature, gc.top_k, gc.top_p = temperature, 0, 1.0  # pure sampling, as in the paper
    p_len = len(prefix) if prefix is not None else 0
    if prefix is not None:
        assert all(p[:p_len] == prefix.ids for p in prompts), "every prompt must start with the shared prefix"
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[Completion] = [Completion([], False)] * len(prompts)
    with bar(desc, len(prompts)) as advance, torch.inference_mode():
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            if done and b // batch_size in done:
                for i, res in done[b // batch_size].items():
                    results[i] = Completion(*res)
                advance(len(idx))
                continue
            width = max(len(prompts[i]) for i in idx) - p_len  # with a shared prefix, rows hold only their own tokens
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):  # left padding: generation continues right after each prompt
                own = prompts[i][p_len:]
                ids[r, width - len(own):] = torch.tensor(own)
                mask[r, width - len(own):] = 1
            ids, mask = ids.to(model.device), mask.to(model.device)
            torch.manual_seed((seed * 1_000_003 + b) % (1 << 63))  # torch takes < 2**64; unchanged below 2**63
            labels = None
            if prefix is None and seeds is None:
                out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gc)
            else:
                gens = None if seeds is None else [torch.Generator().manual_seed(seeds[i]) for i in idx]
                out, labels = _decode(model, prefix, ids, mask, gc, keep_topk, gens)
            for r, i in enumerate(idx):
                new = out[r, width:].tolist()
                n = next((j for j, t in enumerate(new) if t in stops), len(new))
                finished = n < len(new)
                results[i] = Completion(new[:n], finished,
                                        None if labels is None else Labels(*(t[r, :n].cpu() for t in labels)))
            if on_batch is not None:
                on_batch(b // batch_size, {i: results[i][:2] for i in idx})
            advance(len(idx))
    return results


def _decode(model, prefix: PrefixCache | None, ids: torch.Tensor, mask: torch.Tensor, gc,
            keep_topk: int = 0, gens: list[torch.Generator] | None = None) -> tuple[torch.Tensor, tuple | None]:
    """`generate` for rows that all continue `prefix` (cascade attention, see cascade.py), or, with no
    prefix, for plain left-padded rows.

    Token selection repeats transformers' own (fp32 logits, logits / temperature, softmax, one
    multinomial draw per step for the whole batch; finished rows get the pad token), so with the same
    seed it picks the same tokens as `model.generate` on the full prompts. With `gens` (one generator
    per row), each row draws from its own generator instead (`draw_tokens`). With `keep_topk`, also
    returns the per-step top-k + tail of the unscaled logits and the chosen token's log-prob, [B, steps, ...].
    """
    import contextlib

    from transformers import DynamicCache

    from ctxdistill.core.cascade import cascade, prefix_kwargs

    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, head = lm.get_decoder(), lm_head(model)
    stops = torch.tensor(gc.eos_token_id if isinstance(gc.eos_token_id, list) else [gc.eos_token_id], device=ids.device)
    b = ids.shape[0]
    p_len = len(prefix) if prefix is not None else 0
    pos = p_len + (mask.cumsum(-1) - 1).clamp(min=0)  # positions continue after the prefix
    own = DynamicCache(config=lm.config)
    kw = cache_kwarg(decoder)
    out = ids
    steps = []
    unfinished = torch.ones(b, dtype=torch.long, device=ids.device)
    shared = prefix_kwargs(prefix.cache) if prefix is not None else {}
    with cascade(model) if prefix is not None else contextlib.nullcontext():
        hidden = decoder(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{kw: own},
                         **shared).last_hidden_state
        for _ in range(gc.max_new_tokens):
            logits = head(hidden[:, -1]).float()
            if gc.do_sample and gens is not None:
                nxt = draw_tokens(torch.softmax(logits / gc.temperature, dim=-1), gens)
            elif gc.do_sample:
                nxt = torch.multinomial(torch.softmax(logits / gc.temperature, dim=-1), num_samples=1).squeeze(1)
            else:
                nxt = logits.argmax(-1)
            nxt = nxt * unfinished + gc.pad_token_id * (1 - unfinished)
            if keep_topk:
                top_ids, top_lp, tail = topk_with_tail(logits, keep_topk)
                chosen = torch.log_softmax(logits, dim=-1).gather(-1, nxt[:, None])[:, 0]
                steps.append((top_ids, top_lp, tail, chosen))
            out = torch.cat([out, nxt[:, None]], dim=1)
            unfinished = unfinished & (~torch.isin(nxt, stops)).long()
            if not unfinished.any():
                break
            mask = torch.cat([mask, mask.new_ones((b, 1))], dim=1)
            pos = pos[:, -1:] + 1
            hidden = decoder(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, use_cache=True,
                             **{kw: own}, **shared).last_hidden_state
    labels = tuple(torch.stack(parts, dim=1) for parts in zip(*steps)) if steps else None
    return out, labels


def draw_tokens(probs: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
    """One token per row of `probs` [B, V], row r by inverse transform sampling with a uniform number from
    gens[r] (a CPU generator, so the draws are the same on every device): row r's tokens depend on its
    own distribution and generator only, never on the other rows of the batch."""
    u = torch.stack([torch.rand((), generator=g) for g in gens]).to(probs.device)
    return inverse_cdf(probs, u)


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """For each row of `probs` [B, V], the token whose cumulative-probability interval [cdf_before, cdf) holds
    u * total (u [B] in [0, 1)): the first token whose cdf is strictly above it, so a token of probability 0
    (an empty interval) is never drawn, even at u = 0."""
    cdf = probs.cumsum(-1)
    return torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1).clamp_(max=probs.shape[-1] - 1)


def example_seed(seed: int, example_id: str, sample: int) -> int:
    """The sampling seed of one (input, sample) of the teacher pass: from the run's seed and the input's
    id, so it does not depend on the input's position, its shard, the batch or the rank computing it."""
    import hashlib

    digest = hashlib.sha256(f"{seed}\0{example_id}\0{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # torch seeds are < 2**64; keep it positive


class Logits(torch.nn.Module):
    """The model's own logits from its last hidden states, [.., H] -> [.., V]: the LM head (output embeddings),
    then what the family's forward does after it. Every path that turns hidden states into logits (sampling,
    soft labels, the training loss, fidelity's KL, cascade attention and packing) goes through this, so each
    equals `model(...).logits` (tests/test_families.py).

    After the head: Gemma 2 and 3 soft-cap (tanh(x / c) * c, config.final_logit_softcapping); Cohere multiplies
    by config.logit_scale and Granite divides by config.logits_scaling (neither family is accepted today,
    models.FAMILIES, but the rule is here so that adding one is a line). The output keeps the head's dtype.
    """

    def __init__(self, model):
        super().__init__()
        lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.head = lm.get_output_embeddings()
        cfg = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
        self.cap = getattr(cfg, "final_logit_softcapping", None)
        self.scale = getattr(cfg, "logit_scale", None) if cfg.model_type.startswith("cohere") else None
        self.divide = getattr(cfg, "logits_scaling", None) if cfg.model_type.startswith("granite") else None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = self.head(hidden)
        if self.scale:
            x = x * self.scale
        if self.divide:
            x = x / self.divide
        if self.cap:
            x = torch.tanh(x / self.cap) * self.cap
        return x


def lm_head(model) -> Logits:
    """The model's logits as a module of its last hidden states (`Logits`), under any peft wrapper."""
    return Logits(model)


def hidden_at(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
              rows: torch.Tensor, cols: torch.Tensor, prefix: PrefixCache | None = None,
              position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The decoder's last hidden states only at positions (rows[i], cols[i]): [N, H], in the model's dtype.

    `lm_head(model)` of them gives the logits there (`logits_at`); a chunked loss applies the head itself
    (losses.chunked_head_loss). With `prefix`, input_ids/attention_mask/cols cover only what follows the
    shared prefix (right-padded). With `position_ids` and no attention mask, the input is packed (see `pack`).
    """
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    dev = lm.device
    input_ids, rows, cols = input_ids.to(dev), rows.to(dev), cols.to(dev)
    if attention_mask is not None:
        attention_mask = attention_mask.to(dev)
    if position_ids is not None:
        position_ids = position_ids.to(dev)
    if prefix is None:
        hidden = lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  use_cache=False).last_hidden_state  # no KV cache: nothing decodes after this
    else:  # cascade attention: each row's own tokens, positions after the shared prefix
        from ctxdistill.core.cascade import cascade, prefix_kwargs

        b, w = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(len(prefix), len(prefix) + w, device=dev).expand(b, w)
        with cascade(model):
            hidden = lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                      use_cache=False, **prefix_kwargs(prefix.cache)).last_hidden_state
    return hidden[rows, cols]


def logits_at(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
              rows: torch.Tensor, cols: torch.Tensor, prefix: PrefixCache | None = None,
              position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 logits only at positions (rows[i], cols[i]): [N, V].

    Runs the decoder for hidden states (`hidden_at`) and applies the LM head at the selected positions
    only, so a batch never materialises [B, L, V] logits (49152 x L floats per row for SmolLM2). The
    arguments are `hidden_at`'s.
    """
    hidden = hidden_at(model, input_ids, attention_mask, rows, cols, prefix=prefix, position_ids=position_ids)
    return lm_head(model)(hidden).float()


def pack(seqs: list[list[int]], first_position: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Every sequence back to back in one row, no padding: (ids [1, T], positions [1, T], start offsets).

    Positions restart at `first_position` for each sequence. Given restarting positions and no
    attention mask, transformers masks attention block-diagonally (each sequence sees only itself,
    causally), so the result per sequence equals running it alone. Attention then costs T^2 instead of
    sum(L_i^2): right for short rows, wasteful for long ones.
    """
    starts, t = [], 0
    for q in seqs:
        starts.append(t)
        t += len(q)
    ids = torch.tensor([[tok for q in seqs for tok in q]], dtype=torch.long)
    pos = torch.tensor([[first_position + j for q in seqs for j in range(len(q))]], dtype=torch.long)
    return ids, pos, starts


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


def score_answers(model, seqs: list[list[int]], answer_lens: list[int], *, top_k: int, pad_id: int,
                  batch_size: int, prefix: PrefixCache | None = None) -> list[Labels]:
    """Soft labels for the last `answer_lens[i]` tokens of each sequence, scored by `model` in one pass.

    Returns `Labels` per sequence, as `generate` records them: top-k ids [A, k], their log-probs [A, k], the tail
    log-mass [A], and the log-prob of the sequence's own token [A].
    With `prefix`, every sequence starts with `prefix.ids`, whose KV cache is reused (cascade attention).
    Runs under no_grad (not inference_mode): the labels may enter a loss that is backpropagated.
    """
    p_len = len(prefix) if prefix is not None else 0
    out = []
    with torch.no_grad():
        for b in range(0, len(seqs), batch_size):
            chunk, lens = [s[p_len:] for s in seqs[b:b + batch_size]], answer_lens[b:b + batch_size]
            ids, mask = right_pad(chunk, pad_id)
            rows, cols = answer_positions([len(q) for q in chunk], lens)
            logits = logits_at(model, ids, mask, rows, cols, prefix=prefix)
            top_ids, top_lp, tail = topk_with_tail(logits, top_k)
            targets = torch.tensor([t for q, a in zip(chunk, lens) for t in q[len(q) - a:]], device=logits.device)
            own = torch.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0]
            start = 0
            for a in lens:
                out.append(Labels(*(t[start:start + a].cpu().clone() for t in (top_ids, top_lp, tail, own))))
                start += a
    return out


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
