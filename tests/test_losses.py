"""LK losses (lk_vllm.losses): the chunked closed-form implementation against references, properties and
bad input; and under torch.distributed, where two gloo ranks on CPU must reproduce one process holding the
whole batch.

The documented convention (lk_vllm.losses.lk_loss): statistics are global; each rank's loss is
world_size / N_global * (its own sum), so the mean of the rank losses is the single-process loss and DDP's
averaged parameter gradients are the single-process gradients."""

import datetime
import math
import socket
import time

import numpy as np
import pytest
import torch
import torch._inductor.config as inductor_config
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from loss_helpers import F64, loss_and_grad, make_batch

from lk_vllm.acceptance import expected_acceptance_length
from lk_vllm.losses import KINDS, lk_loss, lk_loss_eager, lk_loss_multi

pytestmark = pytest.mark.unit


def numpy_reference(draft, target, d2t, mask, kind, eta=3.0):
    """Per-position formulas of the paper written out in float64 numpy: (loss, alpha, kl, lam)."""
    zd = draft.detach().double().numpy()
    zt = target.detach().double().numpy()
    if mask is not None:
        zd, zt = zd[mask.numpy()], zt[mask.numpy()]
    ids = np.arange(zd.shape[1]) if d2t is None else d2t.numpy()
    p = np.exp(zt - zt.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    q = np.exp(zd - zd.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    p_g = p[:, ids]
    p_tilde = p_g / p_g.sum(1, keepdims=True)
    alpha = np.minimum(q, p_g).sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.where(p_tilde > 0, p_tilde * np.log(p_tilde / q), 0.0).sum(1)
    mean_alpha, mean_kl = alpha.mean(), kl.mean()
    lam = {"kl": 1.0, "tv": 0.0, "alpha": 0.0, "lambda": math.exp(-eta * mean_alpha)}[kind]
    loss = {
        "kl": mean_kl,
        "tv": 1.0 - mean_alpha,
        "alpha": -np.log(alpha).mean(),
        "lambda": lam * mean_kl + (1 - lam) * (1 - mean_alpha),
    }[kind]
    return loss, mean_alpha, mean_kl, lam


# ---------------------------------------------------------------------------------------------------------------
# Values and gradients against references (float64)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("vocab_draft", [40, 17], ids=["full-vocab", "truncated"])
@pytest.mark.parametrize("masked", [0.0, 0.4], ids=["no-mask", "mask"])
@pytest.mark.parametrize("chunk_size", [1, 3, None])
def test_matches_references_float64(kind, vocab_draft, masked, chunk_size):
    draft, target, d2t, mask = make_batch(23, 40, vocab_draft, seed=7, masked=masked)
    kwargs = dict(kind=kind, eta=3.0, draft_to_target=d2t, mask=mask)
    result, grad = loss_and_grad(lk_loss, draft, target, chunk_size=chunk_size, **kwargs)
    eager, eager_grad = loss_and_grad(lk_loss_eager, draft, target, **kwargs)
    loss, alpha, kl, lam = numpy_reference(draft, target, d2t, mask, kind)

    assert result.loss.dtype == F64
    assert float(result.loss.detach()) == pytest.approx(loss, rel=1e-12, abs=1e-14)
    assert result.global_loss == pytest.approx(loss, rel=1e-12, abs=1e-14)
    assert result.alpha == pytest.approx(alpha, rel=1e-12)
    assert result.kl == pytest.approx(kl, rel=1e-12)
    assert result.tv == pytest.approx(1 - alpha, rel=1e-12)
    assert result.lam == pytest.approx(lam, rel=1e-12)
    assert result.num_valid == (23 if mask is None else int(mask.sum()))
    assert float(eager.loss.detach()) == pytest.approx(loss, rel=1e-12, abs=1e-14)
    torch.testing.assert_close(grad, eager_grad, rtol=1e-10, atol=1e-14)
    if mask is not None:
        assert bool((grad[~mask] == 0).all())


@pytest.mark.parametrize("kind", ["kl", "tv", "alpha"])
@pytest.mark.parametrize("vocab_draft", [9, 6], ids=["full-vocab", "truncated"])
def test_gradcheck(kind, vocab_draft):
    draft, target, d2t, mask = make_batch(5, 9, vocab_draft, seed=3, masked=0.3)
    leaf = draft.detach().clone().requires_grad_(True)

    def fn(x):
        return lk_loss(x, target, kind=kind, draft_to_target=d2t, mask=mask, chunk_size=2).loss

    assert torch.autograd.gradcheck(fn, (leaf,), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_lambda_gradient_is_the_fixed_mixture_of_kl_and_tv():
    # gradcheck cannot check LK^lambda: finite differences also move lam, which is a stop-gradient constant.
    # Its gradient must be exactly lam * grad(KL) + (1 - lam) * grad(TV) with lam from the batch.
    draft, target, d2t, mask = make_batch(11, 30, 12, seed=5)
    kwargs = dict(draft_to_target=d2t, mask=mask, chunk_size=4)
    lam_result, lam_grad = loss_and_grad(lk_loss, draft, target, kind="lambda", eta=2.0, **kwargs)
    _, kl_grad = loss_and_grad(lk_loss, draft, target, kind="kl", **kwargs)
    _, tv_grad = loss_and_grad(lk_loss, draft, target, kind="tv", **kwargs)
    lam = lam_result.lam
    assert lam == pytest.approx(math.exp(-2.0 * lam_result.alpha), rel=1e-14)
    torch.testing.assert_close(lam_grad, lam * kl_grad + (1 - lam) * tv_grad, rtol=1e-12, atol=1e-16)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("truncated", [False, True])
def test_tv_gradient_sums_to_zero_at_near_ties(dtype, truncated):
    # M (summed in the forward) and a = [q < p_g] (taken in the backward) must cover the same ids, or the
    # row sums of the TV gradient q * (M - a) stop being 0. A draft equal to the target up to a shift puts
    # every id at a (near-)tie, where a forward/backward mismatch in rounding would show at once.
    gen = torch.Generator().manual_seed(11)
    vocab, vocab_draft = 3000, (1200 if truncated else 3000)
    d2t = torch.randperm(vocab, generator=gen)[:vocab_draft] if truncated else None
    target = (torch.randn(16, vocab, generator=gen, dtype=F64) * 3).to(dtype)
    aligned = target if d2t is None else target[:, d2t]
    for draft in (
        aligned + 0.5,
        aligned + 1e-3 * torch.randn(aligned.shape, generator=gen, dtype=F64).to(dtype),
    ):
        _, grad = loss_and_grad(lk_loss, draft, target, kind="tv", draft_to_target=d2t, chunk_size=5)
        scale = grad.abs().sum(1).clamp_min(1e-30)
        assert float((grad.sum(1).abs() / scale).max()) < (1e-4 if dtype == torch.float32 else 1e-10)


def test_tv_gradient_is_zero_where_the_draft_is_the_target():
    # q == p exactly (identical logits): every id is a tie, a = 0, M = 0, so the TV gradient is exactly 0.
    target = torch.randn(7, 50, generator=torch.Generator().manual_seed(2), dtype=F64) * 2
    _, grad = loss_and_grad(lk_loss, target.clone(), target, kind="tv")
    assert bool((grad == 0).all())


def test_paper_lambda_values():
    # LK_PAPER.md section 1: eta = 3 gives lam = 0.22 at alpha = 0.5, 0.05 at alpha = 1; eta = 10 gives 0.0067.
    target = torch.tensor([[0.0, 0.0, -math.inf, -math.inf]], dtype=F64)
    half = torch.tensor([[-math.inf, 0.0, 0.0, -math.inf]], dtype=F64).clamp_min(-1e4)  # overlap = 1/2
    same = torch.tensor([[5.0, 5.0, -1e4, -1e4]], dtype=F64)
    assert lk_loss(half, target, kind="lambda", eta=3.0).alpha == pytest.approx(0.5, abs=1e-12)
    assert lk_loss(half, target, kind="lambda", eta=3.0).lam == pytest.approx(0.22, abs=0.005)
    assert lk_loss(same, target, kind="lambda", eta=3.0).lam == pytest.approx(0.05, abs=0.001)
    assert lk_loss(half, target, kind="lambda", eta=10.0).lam == pytest.approx(0.0067, abs=0.0001)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", KINDS)
def test_low_precision_inputs(dtype, kind):
    draft, target, d2t, mask = make_batch(64, 300, 100, seed=11, dtype=dtype)
    result, grad = loss_and_grad(
        lk_loss, draft, target, kind=kind, draft_to_target=d2t, mask=mask, chunk_size=7
    )
    assert grad.dtype == dtype
    assert result.loss.dtype == torch.float32
    # Reference: the same (rounded) inputs in float64.
    ref, ref_grad = loss_and_grad(
        lk_loss_eager, draft.double(), target.double(), kind=kind, draft_to_target=d2t, mask=mask
    )
    assert float(result.loss.detach()) == pytest.approx(float(ref.loss.detach()), rel=1e-5, abs=1e-6)
    assert result.alpha == pytest.approx(ref.alpha, rel=1e-5)
    grad_tol = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(
        grad.double(), ref_grad, rtol=grad_tol, atol=grad_tol * float(ref_grad.abs().max())
    )


def test_leading_dimensions_are_positions():
    draft, target, d2t, mask = make_batch(12, 50, 20, seed=2)
    flat, flat_grad = loss_and_grad(lk_loss, draft, target, kind="lambda", draft_to_target=d2t, mask=mask)
    shaped, shaped_grad = loss_and_grad(
        lk_loss,
        draft.view(3, 4, 20),
        target.view(3, 4, 50),
        kind="lambda",
        draft_to_target=d2t,
        mask=mask.view(3, 4),
    )
    assert float(shaped.loss.detach()) == pytest.approx(float(flat.loss.detach()), rel=1e-14)
    assert shaped_grad.shape == (3, 4, 20)
    torch.testing.assert_close(shaped_grad.view(12, 20), flat_grad, rtol=1e-14, atol=0)


def test_no_grad_forward_gives_the_same_statistics():
    draft, target, d2t, mask = make_batch(9, 30, 10, seed=4)
    with torch.no_grad():
        result = lk_loss(draft, target, kind="alpha", draft_to_target=d2t, mask=mask)
    assert not result.loss.requires_grad
    assert float(result.loss.detach()) == pytest.approx(
        numpy_reference(draft, target, d2t, mask, "alpha")[0], rel=1e-12
    )


# ---------------------------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_fully_masked_batch_is_a_finite_zero(kind):
    draft, target, d2t, _ = make_batch(6, 20, 8, seed=1)
    mask = torch.zeros(6, dtype=torch.bool)
    result, grad = loss_and_grad(lk_loss, draft, target, kind=kind, draft_to_target=d2t, mask=mask)
    assert float(result.loss.detach()) == 0.0
    assert result.global_loss == 0.0
    assert result.num_valid == 0
    assert math.isnan(result.alpha) and math.isnan(result.kl)
    assert bool((grad == 0).all())


def test_empty_batch_is_a_finite_zero():
    result, grad = loss_and_grad(
        lk_loss, torch.zeros(0, 5, dtype=F64), torch.zeros(0, 5, dtype=F64), kind="lambda"
    )
    assert float(result.loss.detach()) == 0.0 and grad.shape == (0, 5)


def test_masked_rows_are_not_read():
    draft, target, d2t, mask = make_batch(10, 30, 12, seed=6)
    mask[[2, 5]] = False
    garbage_draft, garbage_target = draft.clone(), target.clone()
    garbage_draft[2] = math.nan
    garbage_target[5] = math.inf
    clean, clean_grad = loss_and_grad(lk_loss, draft, target, kind="lambda", draft_to_target=d2t, mask=mask)
    dirty, dirty_grad = loss_and_grad(
        lk_loss, garbage_draft, garbage_target, kind="lambda", draft_to_target=d2t, mask=mask
    )
    assert float(dirty.loss.detach()) == float(clean.loss.detach())
    assert torch.equal(dirty_grad, clean_grad)
    assert bool((dirty_grad[[2, 5]] == 0).all())


# ---------------------------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------------------------

logit_scale = st.sampled_from([0.1, 1.0, 5.0, 30.0])


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 6),
    vocab=st.integers(2, 40),
    draft_fraction=st.floats(0.1, 1.0),
    scale=logit_scale,
)
def test_alpha_is_one_minus_total_variation(seed, n, vocab, draft_fraction, scale):
    # alpha in [0, 1] and 1 - alpha = TV(p, q) over the full target vocabulary (out-of-draft tokens: q = 0).
    vocab_draft = max(1, int(vocab * draft_fraction))
    draft, target, d2t, _ = make_batch(n, vocab, vocab_draft, seed=seed, scale=scale, masked=0)
    for row in range(n):
        result = lk_loss(draft[row : row + 1], target[row : row + 1], kind="tv", draft_to_target=d2t)
        p = torch.softmax(target[row], 0)
        q_full = torch.zeros(vocab, dtype=F64)
        q_full[d2t if d2t is not None else torch.arange(vocab)] = torch.softmax(draft[row], 0)
        assert 0.0 <= result.alpha <= 1.0
        assert result.tv == pytest.approx(0.5 * float((p - q_full).abs().sum()), abs=1e-12)
        assert result.kl >= -1e-12


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    vocab=st.integers(2, 50),
    shift=st.floats(-50, 50),
    scale=logit_scale,
    perturbation=st.sampled_from([1e-6, 1e-2, 1.0]),
)
def test_alpha_is_one_iff_q_equals_p(seed, vocab, shift, scale, perturbation):
    gen = torch.Generator().manual_seed(seed)
    target = torch.randn(3, vocab, generator=gen, dtype=F64) * scale
    same = lk_loss(target + shift, target, kind="lambda")  # softmax is shift invariant: q == p
    assert same.alpha == pytest.approx(1.0, abs=1e-12)
    assert same.kl == pytest.approx(0.0, abs=1e-12)
    assert same.neg_log_alpha == pytest.approx(0.0, abs=1e-12)
    other = target + perturbation * torch.randn(3, vocab, generator=gen, dtype=F64)
    for row in range(3):
        differ = lk_loss(other[row : row + 1], target[row : row + 1], kind="tv")
        gap = 0.5 * float((torch.softmax(other[row], 0) - torch.softmax(target[row], 0)).abs().sum())
        assert 1.0 - differ.alpha == pytest.approx(gap, rel=1e-6, abs=1e-15)
        if gap > 1e-12:
            assert differ.alpha < 1.0


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 8),
    vocab=st.integers(2, 60),
    scale=st.sampled_from([1.0, 10.0, 1e3]),
    off_value=st.sampled_from([-math.inf, -1e4]),
    truncated=st.booleans(),
)
def test_one_hot_target_makes_lk_alpha_the_nll(seed, n, vocab, scale, off_value, truncated):
    gen = torch.Generator().manual_seed(seed)
    vocab_draft = max(1, vocab // 2) if truncated else vocab
    d2t = torch.randperm(vocab, generator=gen)[:vocab_draft] if truncated else None
    draft = torch.randn(n, vocab_draft, generator=gen, dtype=F64) * scale
    labels = torch.randint(0, vocab_draft, (n,), generator=gen)
    target = torch.full((n, vocab), off_value, dtype=F64)
    target[torch.arange(n), labels if d2t is None else d2t[labels]] = 0.0
    result, grad = loss_and_grad(lk_loss, draft, target, kind="alpha", draft_to_target=d2t)
    leaf = draft.clone().requires_grad_(True)
    nll = F.cross_entropy(leaf, labels)
    (nll_grad,) = torch.autograd.grad(nll, leaf)
    assert float(result.loss.detach()) == pytest.approx(float(nll.detach()), rel=1e-12, abs=1e-12)
    torch.testing.assert_close(grad, nll_grad, rtol=1e-9, atol=1e-15)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 12),
    chunk_a=st.integers(1, 13),
    chunk_b=st.integers(1, 13),
    kind=st.sampled_from(KINDS),
)
def test_independent_of_chunk_size_and_row_order(seed, n, chunk_a, chunk_b, kind):
    draft, target, d2t, mask = make_batch(n, 33, 14, seed=seed, dtype=torch.float32)
    kwargs = dict(kind=kind, draft_to_target=d2t, mask=mask)
    a, grad_a = loss_and_grad(lk_loss, draft, target, chunk_size=chunk_a, **kwargs)
    b, grad_b = loss_and_grad(lk_loss, draft, target, chunk_size=chunk_b, **kwargs)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    c, grad_c = loss_and_grad(
        lk_loss,
        draft[order],
        target[order],
        kind=kind,
        draft_to_target=d2t,
        mask=mask[order],
        chunk_size=chunk_b,
    )
    for other in (b, c):
        assert float(other.loss.detach()) == pytest.approx(float(a.loss.detach()), rel=1e-6, abs=1e-7)
        assert other.alpha == pytest.approx(a.alpha, rel=1e-6, nan_ok=True)
        assert other.lam == pytest.approx(a.lam, rel=1e-6)
    torch.testing.assert_close(grad_b, grad_a, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad_c, grad_a[order], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# Extreme logits
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_logits_stay_finite(kind, dtype):
    draft, target, d2t, mask = make_batch(32, 200, 64, seed=9, scale=1e4, dtype=dtype)
    target[0, :5] = -math.inf  # -inf (probability 0) is allowed in the target
    result, grad = loss_and_grad(
        lk_loss, draft, target, kind=kind, draft_to_target=d2t, mask=mask, chunk_size=5
    )
    assert math.isfinite(float(result.loss.detach()))
    assert all(math.isfinite(v) for v in (result.alpha, result.kl, result.neg_log_alpha, result.lam))
    assert bool(torch.isfinite(grad).all())


def test_tiny_alpha_rows_are_exact():
    # alpha ~ e^-300 underflows fp32 (and its sum of mins); the fp32 path must still give the exact -log alpha
    # and gradient of the float64 computation.
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(6, 40, generator=gen, dtype=F64)
    draft = torch.randn(6, 40, generator=gen, dtype=F64)
    target[:3, 0] += 300.0  # the target is sure of token 0 ...
    draft[:3, 1] += 300.0  # ... the draft of token 1: alpha ~ e^-300 on the first three rows
    result, grad = loss_and_grad(lk_loss, draft.float(), target.float(), kind="alpha", chunk_size=4)
    ref, ref_grad = loss_and_grad(
        lk_loss_eager, draft.float().double(), target.float().double(), kind="alpha"
    )
    assert ref.neg_log_alpha > 100  # the float64 reference does not underflow here
    assert float(result.loss.detach()) == pytest.approx(float(ref.loss.detach()), rel=1e-6)
    assert result.neg_log_alpha == pytest.approx(ref.neg_log_alpha, rel=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-7)


def test_target_with_no_draft_mass_is_rejected_but_tiny_mass_is_exact():
    draft, target, d2t, _ = make_batch(4, 30, 10, seed=8, masked=0)
    target = target.float()
    tiny = target.clone()
    tiny[1, d2t] -= 80.0  # coverage ~ e^-80: below fp32's exact range for sums of p, still positive
    result = lk_loss(draft.float(), tiny, kind="lambda", draft_to_target=d2t)
    ref = lk_loss_eager(draft, tiny.double(), kind="lambda", draft_to_target=d2t)
    assert result.kl == pytest.approx(ref.kl, rel=1e-5)
    assert result.alpha == pytest.approx(ref.alpha, rel=1e-5)
    none = target.clone()
    none[2, d2t] = -math.inf
    with pytest.raises(
        ValueError, match=r"target_logits .* 1 of 4 valid rows.*-inf at every draft-vocabulary id"
    ):
        lk_loss(draft.float(), none, kind="lambda", draft_to_target=d2t)


# ---------------------------------------------------------------------------------------------------------------
# Multi-position
# ---------------------------------------------------------------------------------------------------------------


def test_multi_position_weights_and_own_lambda():
    batches = [make_batch(10, 30, 12, seed=100 + k) for k in range(3)]
    d2t = batches[0][2]
    drafts = [b[0].clone().requires_grad_(True) for b in batches]
    targets = [b[1] for b in batches]
    masks = [b[3] for b in batches]
    multi = lk_loss_multi(
        drafts, targets, kind="lambda", eta=3.0, gamma=0.8, draft_to_target=d2t, masks=masks
    )
    grads = torch.autograd.grad(multi.loss, drafts)
    expected_loss = 0.0
    for k in range(3):
        single, single_grad = loss_and_grad(
            lk_loss, batches[k][0], targets[k], kind="lambda", eta=3.0, draft_to_target=d2t, mask=masks[k]
        )
        assert multi.per_position_alpha[k] == single.alpha
        assert multi.per_position_lam[k] == pytest.approx(math.exp(-3.0 * single.alpha), rel=1e-14)
        expected_loss += 0.8**k * float(single.loss.detach())
        torch.testing.assert_close(grads[k], 0.8**k * single_grad, rtol=1e-12, atol=1e-16)
    assert len(set(multi.per_position_lam)) == 3
    assert float(multi.loss.detach()) == pytest.approx(expected_loss, rel=1e-14)
    assert multi.global_loss == pytest.approx(expected_loss, rel=1e-14)
    assert multi.weights == pytest.approx((1.0, 0.8, 0.64))
    assert multi.expected_acceptance_length == pytest.approx(
        expected_acceptance_length(multi.per_position_alpha)
    )


def test_perfect_draft_in_fp32_reports_alpha_at_most_one():
    # q == p up to fp32 rounding: sum_d min(q, p) may round above 1; the reported alpha must not, so that the
    # acceptance math (which rejects rates above 1) accepts it.
    gen = torch.Generator().manual_seed(3)
    targets = [torch.randn(64, 5000, generator=gen) * 4 for _ in range(3)]
    multi = lk_loss_multi([t + 1.0 for t in targets], targets, kind="lambda")
    assert all(0.999 < a <= 1.0 for a in multi.per_position_alpha)
    assert multi.expected_acceptance_length == pytest.approx(4.0, abs=1e-3)


def test_multi_position_shared_mask_and_errors():
    draft, target, d2t, mask = make_batch(8, 20, 20, seed=1)
    multi = lk_loss_multi([draft, draft], [target, target], kind="kl", masks=mask)
    assert multi.positions[0].num_valid == multi.positions[1].num_valid == int(mask.sum())
    with pytest.raises(ValueError, match="target_logits has 1 positions but draft_logits has 2"):
        lk_loss_multi([draft, draft], [target], kind="kl")
    with pytest.raises(ValueError, match="masks has 3 entries"):
        lk_loss_multi([draft, draft], [target, target], kind="kl", masks=[mask] * 3)
    with pytest.raises(ValueError, match="gamma"):
        lk_loss_multi([draft], [target], kind="kl", gamma=0.0)
    with pytest.raises(ValueError, match="sequences of tensors"):
        lk_loss_multi(draft, target, kind="kl")


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------


def bad_input_cases():
    draft = torch.randn(4, 6)
    target = torch.randn(4, 10)
    d2t = torch.tensor([0, 2, 4, 6, 8, 9])
    nan_draft = draft.clone()
    nan_draft[[1, 3], 2] = math.nan
    inf_target = target.clone()
    inf_target[0, 7] = math.inf
    return [
        (
            dict(draft_logits=draft, target_logits=torch.randn(5, 10), draft_to_target=d2t),
            r"target_logits has shape \(5, 10\).*draft_logits has shape \(4, 6\)",
        ),
        (
            dict(draft_logits=torch.randn(4, 12), target_logits=target),
            r"target_logits has a vocabulary of 10, smaller than draft_logits' 12",
        ),
        (
            dict(draft_logits=draft, target_logits=target),
            r"draft_to_target is None .* 6 ids and target_logits 10",
        ),
        (
            dict(draft_logits=draft, target_logits=target, draft_to_target=torch.tensor([0, 1, 2, 3, 4, 10])),
            r"draft_to_target has 1 ids outside \[0, 10\).*draft id 5 -> 10",
        ),
        (
            dict(draft_logits=draft, target_logits=target, draft_to_target=torch.tensor([0, 1, 2, 3, -1, 5])),
            r"draft_to_target has 1 ids outside",
        ),
        (
            dict(draft_logits=draft, target_logits=target, draft_to_target=torch.tensor([0, 1, 2, 3, 3, 5])),
            r"draft_to_target maps 1 draft ids onto target ids already used; first: target id 3 at draft ids 3 and 4",
        ),
        (
            dict(draft_logits=draft, target_logits=target, draft_to_target=torch.tensor([0, 1, 2])),
            r"draft_to_target must have shape \(6,\).*found shape \(3,\)",
        ),
        (
            dict(draft_logits=draft, target_logits=target, draft_to_target=d2t.float()),
            r"draft_to_target must be an integer tensor; found dtype torch.float32",
        ),
        (
            dict(
                draft_logits=draft,
                target_logits=target,
                draft_to_target=d2t,
                mask=torch.ones(5, dtype=torch.bool),
            ),
            r"mask must have shape \(4,\).*found shape \(5,\)",
        ),
        (
            dict(draft_logits=draft, target_logits=target, draft_to_target=d2t, mask=torch.ones(4)),
            r"mask must be a bool tensor .*found dtype torch.float32",
        ),
        (
            dict(draft_logits=nan_draft, target_logits=target, draft_to_target=d2t),
            r"draft_logits is unusable in 2 of 4 valid rows \(on this rank: NaN in 2 rows",
        ),
        (
            dict(draft_logits=draft, target_logits=inf_target, draft_to_target=d2t),
            r"target_logits is unusable in 1 of 4 valid rows \(on this rank: \+inf in 1 rows",
        ),
        (
            dict(draft_logits=draft.int(), target_logits=target, draft_to_target=d2t),
            r"draft_logits must be a floating-point tensor; found dtype torch.int32",
        ),
        (
            dict(draft_logits=draft[0], target_logits=target[0], draft_to_target=d2t),
            r"draft_logits must have shape \[..., vocab\]; found shape \(6,\)",
        ),
        (
            dict(draft_logits=draft, target_logits=target.clone().requires_grad_(True), draft_to_target=d2t),
            r"target_logits requires grad",
        ),
    ]


@pytest.mark.parametrize("kwargs,message", bad_input_cases())
def test_bad_input_raises_value_error_naming_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lk_loss(**kwargs, kind="lambda")


def test_draft_neg_inf_and_all_neg_inf_target_rows_are_described():
    draft = torch.randn(3, 5)
    target = torch.randn(3, 5)
    draft[0, 1] = -math.inf
    with pytest.raises(
        ValueError, match=r"draft_logits is unusable in 1 of 3 valid rows \(on this rank: -inf in 1 rows"
    ):
        lk_loss(draft, target, kind="kl")
    target[2] = -math.inf
    with pytest.raises(ValueError, match=r"target_logits is unusable in 1 of 3 .*no finite logit in 1 rows"):
        lk_loss(torch.randn(3, 5), target, kind="kl")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(kind="kld"), r"kind must be one of \('kl', 'tv', 'alpha', 'lambda'\); found 'kld'"),
        (dict(kind="lambda", eta=-1.0), r"eta must be a finite number >= 0.*found -1.0"),
        (dict(kind="lambda", eta=math.nan), r"eta must be a finite number"),
        (dict(kind="kl", chunk_size=0), r"chunk_size must be a positive number of rows or None; found 0"),
        (dict(kind="kl", distributed=True), r"distributed=True but torch.distributed is not initialized"),
    ],
)
def test_bad_options_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lk_loss(torch.randn(2, 4), torch.randn(2, 4), **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Targets read from a shared table by index
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("vocab_draft", [40, 17], ids=["full-vocab", "truncated"])
@pytest.mark.parametrize("masked", [0.0, 0.4], ids=["no-mask", "mask"])
def test_target_rows_read_a_shared_table(kind, vocab_draft, masked):
    """Positions read through target_rows give what the gathered copy gives, against the float64 reference;
    the table is not copied, and rows may repeat and come in any order."""
    draft, table, d2t, mask = make_batch(23, 40, vocab_draft, seed=11, masked=masked)
    rows = torch.randint(0, 23, (23,), generator=torch.Generator().manual_seed(3))
    kwargs = dict(kind=kind, eta=3.0, draft_to_target=d2t, mask=mask, chunk_size=4)
    result, grad = loss_and_grad(lk_loss, draft, table, target_rows=rows, **kwargs)
    copied, copied_grad = loss_and_grad(lk_loss, draft, table[rows], **kwargs)
    loss, alpha, _, _ = numpy_reference(draft, table[rows], d2t, mask, kind)
    assert float(result.loss.detach()) == pytest.approx(loss, rel=1e-12, abs=1e-14)
    assert result.alpha == pytest.approx(alpha, rel=1e-12)
    assert float(result.loss.detach()) == pytest.approx(float(copied.loss.detach()), rel=1e-13, abs=1e-15)
    torch.testing.assert_close(grad, copied_grad, rtol=1e-12, atol=1e-15)


def test_target_rows_exact_rows_and_multi_position():
    # The float64 recomputation of tiny-alpha rows reads the right table row too.
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(5, 40, generator=gen)
    table[2, 0] += 300.0  # row 2: the target is sure of token 0
    draft = torch.randn(4, 40, generator=gen)
    draft[1, 1] += 300.0  # position 1 reads row 2 and is sure of token 1: alpha ~ e^-300
    rows = torch.tensor([0, 2, 4, 1])
    result, grad = loss_and_grad(lk_loss, draft, table, target_rows=rows, kind="alpha", chunk_size=2)
    ref, ref_grad = loss_and_grad(lk_loss_eager, draft.double(), table[rows].double(), kind="alpha")
    assert ref.neg_log_alpha > 50
    assert result.neg_log_alpha == pytest.approx(ref.neg_log_alpha, rel=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-7)
    drafts = [draft, draft[:3]]
    multi = lk_loss_multi(drafts, [table, table], target_rows=[rows, rows[1:]], kind="lambda", gamma=0.8)
    gathered = lk_loss_multi(drafts, [table[rows], table[rows[1:]]], kind="lambda", gamma=0.8)
    assert float(multi.loss) == pytest.approx(float(gathered.loss), rel=1e-6)


def test_bad_target_rows_are_refused():
    draft, table, _, _ = make_batch(6, 10, 10, seed=1, masked=0.0)
    with pytest.raises(ValueError, match=r"target_rows must lie in \[0, 6\).*\[0, 6\]"):
        lk_loss(draft, table, target_rows=torch.tensor([0, 1, 2, 3, 4, 6]), kind="kl")
    with pytest.raises(ValueError, match=r"target_rows must have shape \(6,\)"):
        lk_loss(draft, table, target_rows=torch.tensor([0, 1]), kind="kl")
    with pytest.raises(ValueError, match="integer tensor"):
        lk_loss(draft, table, target_rows=torch.zeros(6), kind="kl")
    with pytest.raises(ValueError, match=r"\[rows, vocab\] table"):
        lk_loss(draft[None], table[None], target_rows=torch.zeros(1, 6, dtype=torch.long), kind="kl")
    with pytest.raises(ValueError, match="target_rows has 1 entries"):
        lk_loss_multi([draft, draft], [table, table], target_rows=[torch.arange(6)], kind="kl")


# ---------------------------------------------------------------------------------------------------------------
# Targets given as the draft ids' columns plus the full-vocabulary logsumexp
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("masked", [0.0, 0.4], ids=["no-mask", "mask"])
@pytest.mark.parametrize("table", [False, True], ids=["rows", "table"])
def test_columns_and_logsumexp_equal_the_full_rows(kind, masked, table):
    """The draft ids' columns with the full row's logsumexp are all the loss needs: same loss, statistics and
    gradient as the full rows, against the float64 reference, also read through target_rows."""
    draft, target, d2t, mask = make_batch(23, 40, 17, seed=12, masked=masked)
    kwargs = dict(kind=kind, eta=3.0, mask=mask, chunk_size=4)
    rows = torch.randint(0, 23, (23,), generator=torch.Generator().manual_seed(4)) if table else None
    reference_target = target[rows] if table else target
    lse = torch.logsumexp(target, dim=1)
    result, grad = loss_and_grad(
        lk_loss, draft, target[:, d2t], target_logsumexp=lse, target_rows=rows, **kwargs
    )
    full, full_grad = loss_and_grad(lk_loss, draft, reference_target, draft_to_target=d2t, **kwargs)
    loss, alpha, kl, _ = numpy_reference(draft, reference_target, d2t, mask, kind)
    assert float(result.loss.detach()) == pytest.approx(loss, rel=1e-12, abs=1e-14)
    assert (result.alpha, result.kl) == (pytest.approx(alpha, rel=1e-12), pytest.approx(kl, rel=1e-12))
    torch.testing.assert_close(grad, full_grad, rtol=1e-12, atol=1e-15)


def test_columns_and_logsumexp_in_fp32_multi_position_and_exact_rows():
    gen = torch.Generator().manual_seed(1)
    target = torch.randn(6, 60, generator=gen) * 2
    d2t = torch.randperm(60, generator=gen)[:20]
    draft = torch.randn(6, 20, generator=gen)
    draft[2, 0] += 300.0  # row 2: sure of a token the target gives ~e^-300: the float64 exact path
    lse = torch.logsumexp(target, dim=1)
    for kind in ("alpha", "lambda"):
        result, grad = loss_and_grad(lk_loss, draft, target[:, d2t], target_logsumexp=lse, kind=kind)
        ref, ref_grad = loss_and_grad(
            lk_loss_eager, draft.double(), target.double(), draft_to_target=d2t, kind=kind
        )
        assert result.neg_log_alpha == pytest.approx(ref.neg_log_alpha, rel=1e-5)
        torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)
    columns = target[:, d2t]
    multi = lk_loss_multi(
        [draft, draft[:4]],
        [columns, columns],
        target_rows=[torch.arange(6), torch.arange(4)],
        target_logsumexp=[lse, lse],
        kind="lambda",
    )
    full = lk_loss_multi([draft, draft[:4]], [target, target[:4]], draft_to_target=d2t, kind="lambda")
    assert float(multi.loss) == pytest.approx(float(full.loss), rel=1e-5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"target_logsumexp": torch.zeros(5)}, r"target_logsumexp must have shape \(6,\)"),
        ({"target_logsumexp": torch.zeros(6, dtype=torch.long)}, "must be a floating-point tensor"),
        ({"draft_to_target": torch.arange(8)}, "pass draft_to_target=None"),
        ({"target_logits": torch.zeros(6, 9)}, "logits at the 8 draft ids; found 9 columns"),
        ({"target_logsumexp": torch.full((6,), math.nan)}, "non-finite target_logsumexp in 6 rows"),
        (
            {"target_logsumexp": torch.full((6,), -5.0)},
            "below the logsumexp of the draft ids' logits in 6 rows",
        ),
    ],
)
def test_bad_logsumexp_is_refused(change, message):
    kwargs = {
        "target_logits": torch.zeros(6, 8),
        "target_logsumexp": torch.full((6,), math.log(100.0)),
        **change,
    }
    with pytest.raises(ValueError, match=message):
        lk_loss(torch.zeros(6, 8), kind="kl", **kwargs)
    with pytest.raises(ValueError, match="target_logsumexp has 1 entries"):
        lk_loss_multi(
            [torch.zeros(6, 8)] * 2, [torch.zeros(6, 8)] * 2, target_logsumexp=[torch.zeros(6)], kind="kl"
        )


# ---------------------------------------------------------------------------------------------------------------
# Chunking
# ---------------------------------------------------------------------------------------------------------------


def test_one_chunk_for_everything_equals_one_row_chunks():
    draft, target, d2t, mask = make_batch(37, 50, 21, seed=5, dtype=torch.float32)
    kwargs = dict(kind="lambda", draft_to_target=d2t, mask=mask)
    small, small_grad = loss_and_grad(lk_loss, draft, target, chunk_size=1, **kwargs)
    large, large_grad = loss_and_grad(lk_loss, draft, target, chunk_size=1 << 20, **kwargs)
    assert float(large.loss) == pytest.approx(float(small.loss), rel=1e-6)
    assert large.alpha == pytest.approx(small.alpha, rel=1e-6)
    torch.testing.assert_close(large_grad, small_grad, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# Under torch.distributed: two gloo ranks against one process
# ---------------------------------------------------------------------------------------------------------------


WORLD_SIZE = 2
HIDDEN, VOCAB, VOCAB_DRAFT, POSITIONS = 8, 40, 16, 2
# Uneven shards, with rank 1 holding rows whose mask is mostly False: per-rank means would differ from
# the global mean, so only a correct global reduction passes.
SHARDS = [(0, 5), (5, 14)]


def make_problem():
    gen = torch.Generator().manual_seed(1234)
    hidden = torch.randn(POSITIONS, 14, HIDDEN, generator=gen, dtype=torch.float64)
    targets = torch.randn(POSITIONS, 14, VOCAB, generator=gen, dtype=torch.float64) * 2
    masks = torch.rand(POSITIONS, 14, generator=gen) > 0.25
    masks[:, 8:12] = False
    d2t = torch.randperm(VOCAB, generator=gen)[:VOCAB_DRAFT]
    return hidden, targets, masks, d2t


def make_model():
    torch.manual_seed(0)
    return torch.nn.Linear(HIDDEN, VOCAB_DRAFT, dtype=torch.float64)


def run_case(model, hidden, targets, masks, d2t, kind, rows):
    """Loss of one kind on the given rows; returns (floats, parameter gradients)."""
    start, stop = rows
    model.zero_grad()
    drafts = [model(hidden[k, start:stop]) for k in range(POSITIONS)]
    multi = lk_loss_multi(
        drafts,
        [targets[k, start:stop] for k in range(POSITIONS)],
        kind=kind,
        eta=3.0,
        draft_to_target=d2t,
        masks=[masks[k, start:stop] for k in range(POSITIONS)],
        chunk_size=2,
    )
    multi.loss.backward()
    first = multi.positions[0]
    values = {
        "loss": float(multi.loss.detach()),
        "global_loss": multi.global_loss,
        "alpha": multi.per_position_alpha,
        "lam": multi.per_position_lam,
        "kl": first.kl,
        "tv": first.tv,
        "num_valid": first.num_valid,
        "world_size": first.world_size,
    }
    grads = [p.grad.detach().clone() for p in model.parameters()]
    return values, grads


def rank_cases(rank, model, problem):
    """Everything one rank computes; under a process group the losses reduce over both ranks."""
    hidden, targets, masks, d2t = problem
    results = {}
    for kind in KINDS:
        results[kind] = run_case(model, hidden, targets, masks, d2t, kind, SHARDS[rank])

    # A rank whose shard is fully masked still takes part (lam comes from the other rank's rows).
    gen = torch.Generator().manual_seed(7)
    draft = torch.randn(4, VOCAB_DRAFT, generator=gen, dtype=torch.float64)
    target = torch.randn(4, VOCAB, generator=gen, dtype=torch.float64)
    mask = torch.full((4,), rank == 1)
    one = lk_loss(draft, target, kind="lambda", draft_to_target=d2t, mask=mask)
    results["one_rank_empty"] = {"lam": one.lam, "num_valid": one.num_valid, "loss": float(one.loss.detach())}

    # Bad input on one rank must raise on both (after the collective), not leave the other waiting.
    bad = torch.randn(4, VOCAB_DRAFT, dtype=torch.float64)
    if rank == 1:
        bad[2, 3] = math.nan
    try:
        lk_loss(bad, torch.randn(4, VOCAB, dtype=torch.float64), kind="alpha", draft_to_target=d2t)
        results["bad_input"] = "no error"
    except ValueError as error:
        results["bad_input"] = str(error)
    return results


def worker(rank, port, out_dir):
    torch.set_num_threads(1)
    # Two ranks share the machine: compile in-process, no pool of compile workers per rank.
    inductor_config.compile_threads = 1
    problem = make_problem()
    # Compile every kernel before joining the group, so that no rank waits in a collective (with its
    # timeout running) while the other compiles: the timeout then measures a hang, not the machine's speed.
    rank_cases(rank, make_model(), problem)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=60),
    )
    results = rank_cases(rank, torch.nn.parallel.DistributedDataParallel(make_model()), problem)
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("lk_dist")
    context = mp.start_processes(
        worker, args=(free_port(), str(out_dir)), nprocs=WORLD_SIZE, join=False, start_method="spawn"
    )
    # A stuck collective fails its rank after the group's 60 s timeout, and join() raises that rank's error;
    # this deadline only keeps a hang outside any collective from blocking the suite.
    deadline = time.monotonic() + 900
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("distributed workers did not exit in 900 s (a rank hangs outside any collective)")
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


@pytest.fixture(scope="module")
def single_process():
    hidden, targets, masks, d2t = make_problem()
    model = make_model()
    return {kind: run_case(model, hidden, targets, masks, d2t, kind, (0, 14)) for kind in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_two_ranks_match_one_process(rank_results, single_process, kind):
    single_values, single_grads = single_process[kind]
    for rank in range(WORLD_SIZE):
        values, grads = rank_results[rank][kind]
        assert values["world_size"] == WORLD_SIZE
        assert values["num_valid"] == single_values["num_valid"]
        assert values["lam"] == pytest.approx(single_values["lam"], rel=1e-12)
        assert values["alpha"] == pytest.approx(single_values["alpha"], rel=1e-12)
        assert values["kl"] == pytest.approx(single_values["kl"], rel=1e-12)
        assert values["tv"] == pytest.approx(single_values["tv"], rel=1e-12)
        assert values["global_loss"] == pytest.approx(single_values["loss"], rel=1e-12)
        # DDP averaged the gradients over ranks: they must be the single-process gradients.
        for grad, single_grad in zip(grads, single_grads, strict=True):
            torch.testing.assert_close(grad, single_grad, rtol=1e-10, atol=1e-14)
    rank_losses = [rank_results[rank][kind][0]["loss"] for rank in range(WORLD_SIZE)]
    assert sum(rank_losses) / WORLD_SIZE == pytest.approx(single_values["loss"], rel=1e-12)
    assert rank_losses[0] != pytest.approx(rank_losses[1])  # the shards really differ


def test_lambda_differs_per_position_and_from_local_means(rank_results, single_process):
    lams = single_process["lambda"][0]["lam"]
    assert lams[0] != pytest.approx(lams[1])
    # A rank-local mean alpha would have given another lam: the shards have different mean alpha.
    hidden, targets, masks, d2t = make_problem()
    model = make_model()
    local, _ = run_case(model, hidden, targets, masks, d2t, "lambda", SHARDS[0])
    assert local["lam"][0] != pytest.approx(lams[0], rel=1e-6)


def test_rank_with_no_valid_rows_takes_part(rank_results):
    empty, other = rank_results[0]["one_rank_empty"], rank_results[1]["one_rank_empty"]
    assert empty["num_valid"] == other["num_valid"] == 4
    assert empty["lam"] == other["lam"]
    assert empty["loss"] == 0.0


def test_bad_input_on_one_rank_raises_on_every_rank(rank_results):
    for rank in range(WORLD_SIZE):
        message = rank_results[rank]["bad_input"]
        assert "draft_logits is unusable in 1 of 8 valid rows over 2 ranks" in message
    assert "NaN in 1 rows" in rank_results[1]["bad_input"]
    assert "on this rank" not in rank_results[0]["bad_input"]
