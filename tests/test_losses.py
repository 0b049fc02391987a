"""Math identities of the distillation losses (ctxdistill.core.losses)."""

import math

import pytest
import torch
import torch.nn.functional as F

from ctxdistill.core import losses
from ctxdistill.core.sampling import topk_with_tail


def teacher_from_logits(logits, k):
    ids, lp, tail = topk_with_tail(logits, k)
    return ids, lp, tail


def test_forward_kl_zero_for_identical_and_positive_otherwise():
    torch.manual_seed(0)
    logits = torch.randn(5, 50)
    ids, lp, tail = teacher_from_logits(logits, 8)
    total, n = losses.forward_kl(logits, ids, lp, tail)
    assert n == 5 and abs(total.item()) < 1e-5
    other, _ = losses.forward_kl(torch.randn(5, 50), ids, lp, tail)
    assert other.item() > 1e-3


def test_forward_kl_equals_full_kl_when_topk_covers_vocab():
    torch.manual_seed(1)
    t_logits, s_logits = torch.randn(4, 30), torch.randn(4, 30)
    ids, lp, tail = teacher_from_logits(t_logits, 30)
    total, n = losses.forward_kl(s_logits, ids, lp, tail)
    # F.kl_div takes the *input* as log-probs of the model being trained, the *target* second.
    ref = F.kl_div(F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1), log_target=True, reduction="sum")
    assert total.item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-5)


def test_forward_kl_matches_bucketed_kl_by_hand():
    t_logits, s_logits = torch.tensor([[3.0, 1.0, 0.0, -1.0]]), torch.tensor([[0.0, 2.0, 0.5, 0.0]])
    ids, lp, tail = teacher_from_logits(t_logits, 2)
    p = F.softmax(t_logits, -1)[0]
    q = F.softmax(s_logits, -1)[0]
    pb = torch.stack([p[0], p[1], p[2] + p[3]])
    qb = torch.stack([q[0], q[1], q[2] + q[3]])
    expected = (pb * (pb / qb).log()).sum()
    total, _ = losses.forward_kl(s_logits, ids, lp, tail)
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)


def test_reverse_kl_and_jsd_zero_for_identical():
    logits = torch.randn(3, 40)
    ids, lp, tail = teacher_from_logits(logits, 5)
    assert abs(losses.reverse_kl(logits, ids, lp, tail)[0].item()) < 1e-5
    assert abs(losses.jsd(logits, ids, lp, tail)[0].item()) < 1e-5


def test_jsd_symmetric_and_bounded_by_ln2():
    torch.manual_seed(2)
    a, b = torch.randn(6, 20) * 4, torch.randn(6, 20) * 4
    ab = losses.jsd(b, *teacher_from_logits(a, 20))[0]
    ba = losses.jsd(a, *teacher_from_logits(b, 20))[0]
    assert ab.item() == pytest.approx(ba.item(), rel=1e-4)
    assert 0 < ab.item() / 6 <= math.log(2) + 1e-6


def test_all_masked_batch_gives_zero_not_nan():
    logits = torch.randn(3, 10)
    ids, lp, tail = teacher_from_logits(torch.randn(3, 10), 4)
    for fn in losses.SOFT_LOSSES.values():
        total, n = fn(logits, ids, lp, tail, mask=torch.zeros(3, dtype=torch.bool))
        loss = losses.mean_loss(total, n)
        assert n == 0 and loss.item() == 0.0 and not torch.isnan(loss)
    empty = losses.mean_loss(*losses.cross_entropy(torch.zeros(0, 10), torch.zeros(0, dtype=torch.long)))
    assert empty.item() == 0.0


def test_extreme_logits_stay_finite_with_finite_gradients():
    s = torch.tensor([[1e4, -1e4, 0.0, 5e3], [-1e4, -1e4, -1e4, 1e4]], requires_grad=True)
    ids, lp, tail = teacher_from_logits(torch.tensor([[-1e4, 1e4, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]), 2)
    for fn in losses.SOFT_LOSSES.values():
        total, _ = fn(s, ids, lp, tail)
        assert torch.isfinite(total)
        (g,) = torch.autograd.grad(total, s)
        assert torch.isfinite(g).all()


def test_mask_excludes_positions():
    torch.manual_seed(3)
    s, t = torch.randn(4, 12), torch.randn(4, 12)
    ids, lp, tail = teacher_from_logits(t, 3)
    mask = torch.tensor([True, False, True, False])
    total, n = losses.forward_kl(s, ids, lp, tail, mask=mask)
    kept = losses.forward_kl(s[mask], ids[mask], lp[mask], tail[mask])[0]
    assert n == 2 and total.item() == pytest.approx(kept.item())


def test_cross_entropy_matches_torch():
    s, y = torch.randn(5, 9), torch.randint(0, 9, (5,))
    total, n = losses.cross_entropy(s, y)
    assert losses.mean_loss(total, n).item() == pytest.approx(F.cross_entropy(s, y).item(), rel=1e-6)


def test_tail_mass_is_complement_of_topk():
    logits = torch.randn(2, 100)
    _, lp, tail = topk_with_tail(logits, 10)
    assert (lp.exp().sum(-1) + tail.exp()).tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
