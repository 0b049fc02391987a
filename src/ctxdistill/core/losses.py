"""Distillation losses as pure functions.

The teacher distribution at an answer position is stored sparsely: top-k log-probs plus a tail bucket
holding the remaining mass, so both distributions live on the same k+1 outcomes
(the top-k tokens and "anything else"). Shapes, for N answer positions and vocabulary V:

    student_logits   [N, V]   any float dtype; all math is done in fp32
    topk_ids         [N, k]   int, token ids of the teacher's top-k
    topk_logprobs    [N, k]   teacher log-probs of those tokens
    tail_logmass     [N]      log(1 - sum(exp(topk_logprobs)))
    mask             [N]      bool, False for positions to ignore (padding)

Each loss returns (sum over valid positions, number of valid positions), so the caller divides by a
global token count (under gradient accumulation or across ranks) rather than averaging per batch.
`mean_loss` does the division with clamp_min(1): an all-masked batch gives 0, not NaN.
`chunked_head_loss` applies any of them to hidden states through the LM head, a chunk of positions at a
time, so the [N, V] logits never exist whole (for long answers: `train.loss_chunk`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Maechler 2012).

    Each branch is evaluated only on inputs it is finite for (the other rows get a stand-in, -1): the branch
    torch.where does not select still gets a gradient of 0 times its own, and log1p(-exp(x)) near x = 0 has an
    infinite one, so 0 * inf would make the gradient NaN (a student logit of 7,773 did).
    """
    x = x.clamp(max=-1e-12)
    near = x > -0.6931
    stand_in = torch.full_like(x, -1.0)
    return torch.where(near, torch.log(-torch.expm1(torch.where(near, x, stand_in))),
                       torch.log1p(-torch.exp(torch.where(near, stand_in, x))))


def bucket_logprobs(student_logits: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """Student log-probs on the k+1 buckets (teacher's top-k tokens, then the tail): [N, k+1]."""
    logp = F.log_softmax(student_logits.float(), dim=-1)
    top = logp.gather(-1, topk_ids.long())
    tail = log1mexp(torch.logsumexp(top, dim=-1)).clamp(min=-80.0)
    return torch.cat([top, tail[:, None]], dim=-1)


def teacher_buckets(topk_logprobs: torch.Tensor, tail_logmass: torch.Tensor) -> torch.Tensor:
    """Teacher log-probs on the same k+1 buckets: [N, k+1]."""
    return torch.cat([topk_logprobs.float(), tail_logmass.float()[:, None]], dim=-1)


def _kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row for log-probs [N, B]; terms with p = 0 contribute 0 (x log x -> 0)."""
    p = p_log.exp()
    return torch.where(p > 0, p * (p_log - q_log), torch.zeros_like(p)).sum(-1)


def _masked(per_pos: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if mask is None:
        mask = torch.ones_like(per_pos, dtype=torch.bool)
    per_pos = torch.where(mask, per_pos, torch.zeros_like(per_pos))
    return per_pos.sum(), mask.sum()


def forward_kl(student_logits, topk_ids, topk_logprobs, tail_logmass, *, mask=None):
    """KL(teacher || student) on the top-k + tail buckets (the default; mode-covering)."""
    t = teacher_buckets(topk_logprobs, tail_logmass)
    return _masked(_kl(t, bucket_logprobs(student_logits, topk_ids)), mask)


def reverse_kl(student_logits, topk_ids, topk_logprobs, tail_logmass, *, mask=None):
    """KL(student || teacher) on the top-k + tail buckets (mode-seeking)."""
    t = teacher_buckets(topk_logprobs, tail_logmass)
    return _masked(_kl(bucket_logprobs(student_logits, topk_ids), t), mask)


def jsd(student_logits, topk_ids, topk_logprobs, tail_logmass, *, mask=None, beta: float = 0.5):
    """Generalised Jensen-Shannon divergence: beta*KL(t||m) + (1-beta)*KL(s||m), m = beta*t + (1-beta)*s."""
    t = teacher_buckets(topk_logprobs, tail_logmass)
    s = bucket_logprobs(student_logits, topk_ids)
    # log m = logsumexp(log beta + t, log(1-beta) + s), stable for extreme log-probs.
    w = torch.tensor([beta, 1.0 - beta], dtype=t.dtype, device=t.device).log()
    m = torch.logsumexp(torch.stack([t + w[0], s + w[1]]), dim=0)
    return _masked(beta * _kl(t, m) + (1 - beta) * _kl(s, m), mask)


def cross_entropy(student_logits, targets, *, mask=None):
    """Hard-label cross-entropy -log p_student(target) per position (targets [N] int)."""
    per = F.cross_entropy(student_logits.float(), targets.long(), reduction="none")
    return _masked(per, mask)


def chunked_head_loss(loss_fn, hidden: torch.Tensor, head, *labels: torch.Tensor, chunk: int,
                      mask: torch.Tensor | None = None, **loss_kw) -> tuple[torch.Tensor, torch.Tensor]:
    """`loss_fn(head(hidden), *labels, mask=mask, **loss_kw)`, computed `chunk` positions at a time with
    each chunk's logits recomputed in the backward pass instead of kept. Shapes, for N positions:

        hidden   [N, H]   the decoder's last hidden states at the loss positions (any float dtype)
        head     the LM head: its weight [V, H] (a tensor, logits = hidden @ weight.T) or a module
                 mapping [n, H] -> [n, V] (e.g. model.get_output_embeddings(), a LoRA-wrapped head)
        labels   tensors with leading dimension N, sliced per chunk: (topk_ids, topk_logprobs, tail_logmass)
                 for the soft losses, (targets,) for `cross_entropy`
        mask     [N] bool or None, as in the losses above
        loss_kw  the loss's own keyword hyper-parameters (e.g. beta for `jsd`)

    The head runs in its own dtype (as the model applies it); its output is upcast and the loss computed in
    fp32, as `loss_fn` does on full logits. The result is (sum, count) like `loss_fn`'s, equal to it up to
    float rounding, but at most [chunk, V] logits (and their log-softmax) exist at a time, in the forward
    and in the backward pass (torch.utils.checkpoint, non-reentrant), instead of [N, V]: the price is a
    second head matmul and softmax per chunk in the backward pass. With N <= chunk (one chunk) or without
    autograd (no_grad, nothing requiring grad), nothing is recomputed: one chunk would be recomputed at the
    start of the backward pass, while everything else is still alive, so it would lower no peak, only cost
    time. N = 0 gives (0, 0), still attached to `hidden`'s graph.
    """
    from torch.utils.checkpoint import checkpoint

    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
    apply = head if callable(head) else (lambda h: F.linear(h, head))

    def part(h: torch.Tensor, *labs: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
        return loss_fn(apply(h).float(), *labs, mask=m, **loss_kw)[0]

    n = hidden.shape[0]
    total = hidden[:0].float().sum()  # 0.0, on hidden's graph even when there is no chunk
    params = head.parameters() if isinstance(head, torch.nn.Module) else [head] if torch.is_tensor(head) else []
    recompute = n > chunk and torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in params))
    for s in range(0, n, chunk):
        args = (hidden[s:s + chunk], *(x[s:s + chunk] for x in labels))
        m = None if mask is None else mask[s:s + chunk]
        if recompute:
            total = total + checkpoint(part, *args, m=m, use_reentrant=False, preserve_rng_state=False)
        else:
            total = total + part(*args, m=m)
    count = torch.tensor(n, device=hidden.device) if mask is None else mask.sum()
    return total, count


def mean_loss(total: torch.Tensor, count: torch.Tensor | int) -> torch.Tensor:
    """Divide a summed loss by its token count, with clamp_min(1) so an empty batch gives 0."""
    return total / torch.as_tensor(count, dtype=total.dtype).clamp_min(1)


SOFT_LOSSES = {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": jsd}
