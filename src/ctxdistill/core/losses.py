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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Maechler 2012)."""
    x = x.clamp(max=-1e-12)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


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


def mean_loss(total: torch.Tensor, count: torch.Tensor | int) -> torch.Tensor:
    """Divide a summed loss by its token count, with clamp_min(1) so an empty batch gives 0."""
    return total / torch.as_tensor(count, dtype=total.dtype).clamp_min(1)


SOFT_LOSSES = {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": jsd}
