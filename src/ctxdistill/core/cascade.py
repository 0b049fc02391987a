"""Shared-prefix ("cascade") attention: the context's KV is stored once and read once per step.

Copying the context's KV cache into every row of a batch (the simple way to reuse it) makes each
decode step read B copies of it: at a 4k-token context that is memory-bound (DESIGN.md §5). Here the
per-row cache holds only each row's own tokens. Attention is split in two and merged exactly:

    softmax over [prefix ; own] = (w_p * o_p + w_s * o_s) / (w_p + w_s),  w = exp(lse - max(lse_p, lse_s))

where o_p, lse_p come from all rows' queries against the single prefix copy (one matmul per
KV-head, batch folded into the query rows) and o_s, lse_s from each row against its own tokens.
It plugs into transformers through its attention-function interface, under the name below, for the
duration of a `with cascade(model):` block. The prefix's cache is an argument of the model call,
`decoder(..., **prefix_kwargs(cache))`, which transformers passes down to every layer's attention function
(its attention interface forwards a forward's extra keyword arguments), so no state lives in this module.
"""

from __future__ import annotations

import contextlib

import torch

NAME = "ctxdistill_cascade"
KWARG = "ctxdistill_prefix_kv"  # the keyword argument that carries the prefix's KV cache to the attention function


def _prefix_kv(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(cache, "layers"):
        return cache.layers[layer].keys, cache.layers[layer].values
    return cache.key_cache[layer], cache.value_cache[layer]  # older transformers


def cascade_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """query [B, H, Lq, D]; key/value [B, KVH, S, D] (each row's own tokens); additive mask [B, 1, Lq, S];
    kwargs[KWARG]: the prefix's batch-1 KV cache."""
    if kwargs.get(KWARG) is None:
        raise RuntimeError("cascade attention needs the prefix's cache: call the model with **prefix_kwargs(cache)")
    pk, pv = _prefix_kv(kwargs[KWARG], module.layer_idx)  # [1, KVH, P, D], positions 0..P-1
    b, h, lq, d = query.shape
    kvh = key.shape[1]
    g = h // kvh
    q = query.float()
    # Own part: each row against its own keys (grouped-query heads expanded).
    ks = key.float().repeat_interleave(g, dim=1)
    vs = value.float().repeat_interleave(g, dim=1)
    s = torch.matmul(q, ks.transpose(2, 3)) * scaling
    if attention_mask is not None:
        s = s + attention_mask[..., :ks.shape[-2]].float()
    lse_s = torch.logsumexp(s, dim=-1, keepdim=True)
    o_s = torch.matmul(torch.softmax(s, dim=-1), vs)
    # Shared part: fold (batch, group, query) into rows so the prefix is one matrix per KV head.
    qg = q.view(b, kvh, g, lq, d).transpose(0, 1).reshape(kvh, b * g * lq, d)
    sp = torch.matmul(qg, pk[0].float().transpose(1, 2)) * scaling  # [KVH, B*G*Lq, P]
    lse_p = torch.logsumexp(sp, dim=-1, keepdim=True)
    o_p = torch.matmul(torch.softmax(sp, dim=-1), pv[0].float())
    unfold = lambda t: t.view(kvh, b, g, lq, t.shape[-1]).transpose(0, 1).reshape(b, h, lq, t.shape[-1])  # noqa: E731
    o_p, lse_p = unfold(o_p), unfold(lse_p)
    # Exact merge of the two softmax pieces by their log-sum-exp.
    m = torch.maximum(lse_s, lse_p)
    w_s, w_p = torch.exp(lse_s - m), torch.exp(lse_p - m)
    out = (w_s * o_s + w_p * o_p) / (w_s + w_p)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(NAME, cascade_attention)
    AttentionMaskInterface.register(NAME, eager_mask)  # an additive float mask over each row's own tokens


def prefix_kwargs(prefix_cache) -> dict:
    """The keyword argument of a model call that gives cascade attention the prefix's batch-1 KV cache."""
    return {KWARG: prefix_cache}


@contextlib.contextmanager
def cascade(model):
    """Run `model` with cascade attention inside the block; each call passes its prefix, **prefix_kwargs(cache)."""
    _register()
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    configs = {id(c): c for c in (lm.config, getattr(lm.get_decoder(), "config", lm.config))}.values()
    saved = [(c, c._attn_implementation) for c in configs]
    try:
        for c, _ in saved:
            c._attn_implementation = NAME
        yield
    finally:
        for c, impl in saved:
            c._attn_implementation = impl
