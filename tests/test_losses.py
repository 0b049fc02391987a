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


def _chunk_case(name, n, v=40, h=16, k=6, seed=4):
    """(loss_fn, labels, loss kwargs) for `name` on n positions, and student hidden states [n, h] and head [v, h]."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).requires_grad_()
    weight = torch.randn(v, h, generator=g).requires_grad_()
    if name == "ce":
        return losses.cross_entropy, (torch.randint(0, v, (n,), generator=g),), {}, hidden, weight
    labels = teacher_from_logits(torch.randn(n, v, generator=g) * 3, k)
    return losses.SOFT_LOSSES[name], labels, {"beta": 0.3} if name == "jsd" else {}, hidden, weight


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "ce"])
@pytest.mark.parametrize("masked", [False, True])
def test_chunked_head_loss_equals_the_loss_on_full_logits(name, masked):
    """23 positions in chunks of 5 (the last one short), or in one chunk: the same sum, count and gradients
    of the hidden states and the head weight as the loss on all [N, V] logits at once."""
    fn, labels, kw, hidden, weight = _chunk_case(name, 23)
    mask = (torch.arange(23) % 4 != 1) if masked else None
    results = []
    for chunk in (0, 5, 23):
        if chunk:
            total, n = losses.chunked_head_loss(fn, hidden, weight, *labels, chunk=chunk, mask=mask, **kw)
        else:
            total, n = fn(hidden @ weight.T, *labels, mask=mask, **kw)
        results.append((total, int(n), *torch.autograd.grad(total, (hidden, weight))))
    (full, n_full, gh_full, gw_full), *chunked = results
    assert full.item() > 1e-3 and n_full == (17 if masked else 23)
    for total, n, gh, gw in chunked:
        assert n == n_full
        torch.testing.assert_close(total, full, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gh, gh_full, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gw, gw_full, atol=1e-5, rtol=1e-5)
    if masked:
        assert gh[1].abs().max() == 0 and gh[0].abs().max() > 0


def test_chunked_head_loss_takes_the_head_as_a_module():
    fn, labels, kw, hidden, weight = _chunk_case("forward_kl", 11)
    head = torch.nn.Linear(16, 40)
    with torch.no_grad():
        head.weight.copy_(weight)
    total, n = losses.chunked_head_loss(fn, hidden, head, *labels, chunk=4)
    assert int(n) == 11 and total.item() == pytest.approx(fn(head(hidden), *labels)[0].item(), rel=1e-5)
    total.backward()
    assert head.bias.grad is not None and head.bias.grad.abs().sum() > 0


def test_chunked_head_loss_keeps_no_logits_for_backward():
    """What autograd keeps for the backward pass, apart from the inputs (hidden states, head weight): next to
    nothing when chunked (each chunk is recomputed), at least the N x V logits unchunked."""
    fn, labels, kw, hidden, weight = _chunk_case("forward_kl", 64, v=500)
    inputs = {hidden.untyped_storage().data_ptr(), weight.untyped_storage().data_ptr()}
    for chunk in (0, 8):
        kept = [0]

        def pack(t):
            if t.untyped_storage().data_ptr() not in inputs:
                kept[0] += t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if chunk:
                total, _ = losses.chunked_head_loss(fn, hidden, weight, *labels, chunk=chunk)
            else:
                total, _ = fn(hidden @ weight.T, *labels)
        total.backward()
        if chunk:
            assert kept[0] < 64 * 500 / 10, kept
        else:
            assert kept[0] >= 64 * 500, kept


def test_chunked_head_loss_empty_or_all_masked_gives_zero_not_nan():
    for name in ("forward_kl", "reverse_kl", "jsd", "ce"):
        for n, mask in ((0, None), (7, torch.zeros(7, dtype=torch.bool))):
            fn, labels, kw, hidden, weight = _chunk_case(name, n)
            total, count = losses.chunked_head_loss(fn, hidden, weight, *labels, chunk=3, mask=mask, **kw)
            loss = losses.mean_loss(total, count)
            assert int(count) == 0 and loss.item() == 0.0, name
            loss.backward()  # still on the graph: an all-masked batch steps with zero gradients, as unchunked
            assert torch.equal(hidden.grad, torch.zeros_like(hidden)), name
    with pytest.raises(ValueError, match="chunk"):
        losses.chunked_head_loss(fn, hidden, weight, *labels, chunk=0)
