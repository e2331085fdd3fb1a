"""One position's loss in three steps and its autograd function.

1. ``row_statistics``: one pass over the valid rows, chunk by chunk (``kernels._chunk_statistics``), giving per
   row ``alpha``, ``KL``, ``M`` and the log-normalisers; rows whose fp32 sums underflow are recomputed exactly
   (``exact``); unusable rows are flagged.
2. ``reduce_statistics``: the sums over this rank's rows, all-reduced once over the process group (so ``lam``
   uses the global mean alpha); any unusable row raises, on every rank.
3. ``loss_terms``: ``lam``, the means and this rank's share of the loss.

``_LKLossFunction`` holds the per-row values for the backward: one elementwise pass per chunk
(``kernels._gradient_into``) writing the gradient straight into the output; the only ``[N, Vd]`` tensor it
allocates is the gradient itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lk_vllm.losses.checks import _Prepared, _raise_for_bad_rows
from lk_vllm.losses.exact import _exact_backward_rows, _exact_rows
from lk_vllm.losses.kernels import (
    _ALPHA_EXACT_BELOW,
    _COVERAGE_ABOVE,
    _COVERAGE_EXACT_BELOW,
    _gather_cols,
    _gradient_kernel,
    _statistics_kernel,
    _take_rows,
)


@dataclass
class RowStatistics:
    """Per valid row of this rank (what the backward needs, and what the reduction sums)."""

    norms: dict[
        str, torch.Tensor
    ]  # log-normalisers m_d, s_d, m_g, s_g (and coverage with a draft vocabulary)
    alpha: torch.Tensor
    log_alpha: torch.Tensor
    mass: torch.Tensor  # M_i
    kl: torch.Tensor
    exact_rows: torch.Tensor  # rows recomputed in float64
    bad_draft: torch.Tensor  # bool: the draft row is unusable
    bad_target: torch.Tensor  # bool: the target row is unusable (or covers none of the draft ids)


@dataclass(frozen=True)
class BatchStatistics:
    """Sums over valid rows: this rank's and the whole group's."""

    alpha: float
    kl: float
    neg_log_alpha: float
    count: int
    local_alpha: float
    local_kl: float
    local_neg_log_alpha: float
    local_count: int


@dataclass(frozen=True)
class LossTerms:
    """``lam``, this rank's loss and the global means of one position."""

    lam: float
    scale: float  # world_size / N_global: this rank's loss is scale * (its own sum)
    local_loss: float
    alpha: float
    kl: float
    tv: float
    neg_log_alpha: float
    global_loss: float
    num_valid: int


def row_statistics(prepared: _Prepared, chunk_rows: int) -> RowStatistics:
    """Step 1 (no graph: called under ``torch.no_grad``)."""
    draft, target = prepared.draft, prepared.target
    cd = prepared.compute_dtype
    rows, target_index = prepared.rows, prepared.target_index
    d2t, lse = prepared.d2t, prepared.target_lse
    n_local = prepared.num_local
    device = draft.device
    gathered = d2t is not None or lse is not None  # the draft vocabulary is a subset: coverage matters
    names = ["m_d", "s_d", "m_g", "s_g"] + (["coverage"] if gathered else [])
    norms = {name: torch.empty(n_local, dtype=cd, device=device) for name in names}
    draft_min, alpha, mass, kl = (torch.empty(n_local, dtype=cd, device=device) for _ in range(4))
    for start in range(0, n_local, chunk_rows):
        stop = min(start + chunk_rows, n_local)
        target_c = _take_rows(target, target_index, start, stop)
        target_g = _gather_cols(target_c, d2t) if gathered else None
        lse_c = None if lse is None else _take_rows(lse, target_index, start, stop)
        chunk_norms, *values = _statistics_kernel(
            _take_rows(draft, rows, start, stop), target_c, target_g, cd, lse_c
        )
        for name in names:
            norms[name][start:stop] = chunk_norms[name]
        for buffer, value in zip((draft_min, alpha, mass, kl), values, strict=True):
            buffer[start:stop] = value
    coverage = norms.get("coverage")
    lse_d = norms["m_d"] + norms["s_d"]
    # Non-finite normalisers: NaN or +inf in the row, or no finite logit; a single -inf draft logit too.
    bad_draft = ~torch.isfinite(lse_d) | (draft_min == -math.inf)
    underflow = (alpha < _ALPHA_EXACT_BELOW) | ~torch.isfinite(kl)
    if coverage is None:
        bad_target = ~torch.isfinite(norms["m_g"] + norms["s_g"])
    else:
        bad_target = ~torch.isfinite(coverage)
        underflow |= coverage < _COVERAGE_EXACT_BELOW
    if lse is not None:  # a given logsumexp must be finite and cover the draft ids' mass
        lse_rows = lse if target_index is None else lse.index_select(0, target_index)
        bad_target |= ~torch.isfinite(lse_rows) | (coverage > _COVERAGE_ABOVE)
    exact = ~bad_draft & ~bad_target & underflow
    exact_rows = exact.nonzero().squeeze(1)
    alpha.clamp_(max=1.0)  # sum_d min(q, p_g) <= sum_d q = 1; rounding can exceed it by an ulp
    log_alpha = alpha.log()
    bad_coverage = torch.zeros_like(bad_target)
    if exact_rows.numel():
        source = exact_rows if rows is None else rows.index_select(0, exact_rows)
        target_source = exact_rows if target_index is None else target_index.index_select(0, exact_rows)
        log_coverage, exact_kl, exact_log_alpha = _exact_rows(
            draft.index_select(0, source),
            target.index_select(0, target_source),
            d2t,
            None if lse is None else lse.index_select(0, target_source),
        )
        kl[exact_rows] = exact_kl.to(cd)
        log_alpha[exact_rows] = exact_log_alpha.clamp(max=0.0).to(cd)
        alpha[exact_rows] = log_alpha[exact_rows].exp()
        bad_coverage[exact_rows] = log_coverage == -math.inf  # no draft id has target mass, even exactly
    return RowStatistics(
        norms=norms,
        alpha=alpha,
        log_alpha=log_alpha,
        mass=mass,
        kl=kl,
        exact_rows=exact_rows,
        bad_draft=bad_draft,
        bad_target=bad_target | bad_coverage,
    )


def reduce_statistics(rows: RowStatistics, prepared: _Prepared, group, world_size: int) -> BatchStatistics:
    """Step 2: one all-reduce of the sums (float64), then a one-line error on every rank for unusable rows."""
    good = ~(rows.bad_draft | rows.bad_target)
    local = torch.stack(
        [
            rows.alpha[good].double().sum(),
            rows.kl[good].double().sum(),
            -rows.log_alpha[good].double().sum(),
            torch.tensor(float(prepared.num_local), dtype=torch.float64, device=rows.alpha.device),
            rows.bad_draft.sum().double(),
            rows.bad_target.sum().double(),
        ]
    )
    total = local.clone()
    if world_size > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    alpha, kl, nla, count, bad_draft, bad_target = total.tolist()
    local_alpha, local_kl, local_nla, local_count = local[:4].tolist()
    _raise_for_bad_rows(
        int(count), int(bad_draft), int(bad_target), prepared, rows.bad_draft, rows.bad_target, world_size
    )
    return BatchStatistics(
        alpha=alpha,
        kl=kl,
        neg_log_alpha=nla,
        count=int(count),
        local_alpha=local_alpha,
        local_kl=local_kl,
        local_neg_log_alpha=local_nla,
        local_count=int(local_count),
    )


def loss_terms(kind: str, eta: float, batch: BatchStatistics, world_size: int) -> LossTerms:
    """Step 3: ``lam = exp(-eta * mean alpha)`` for LK^lambda (1 for KL, 0 for TV and LK^alpha) and the loss."""
    count = batch.count
    mean_alpha, mean_kl, mean_nla = (
        (value / count if count else math.nan) for value in (batch.alpha, batch.kl, batch.neg_log_alpha)
    )
    lam = {"kl": 1.0, "tv": 0.0, "alpha": 0.0}.get(kind)
    if lam is None:
        lam = math.exp(-eta * mean_alpha) if count else 1.0

    def combine(alpha_sum: float, kl_sum: float, nla_sum: float, n: float) -> float:
        return {
            "kl": kl_sum,
            "tv": n - alpha_sum,
            "alpha": nla_sum,
            "lambda": lam * kl_sum + (1.0 - lam) * (n - alpha_sum),
        }[kind]

    # Each rank's loss is world_size / N_global * (its own sum): the mean over ranks is the global loss,
    # and DDP's gradient averaging reproduces the single-process gradient.
    scale = world_size / count if count else 0.0
    local_sum = combine(batch.local_alpha, batch.local_kl, batch.local_neg_log_alpha, batch.local_count)
    return LossTerms(
        lam=lam,
        scale=scale,
        local_loss=scale * local_sum,
        alpha=mean_alpha,
        kl=mean_kl,
        tv=(1.0 - mean_alpha) if count else math.nan,
        neg_log_alpha=mean_nla,
        global_loss=combine(batch.alpha, batch.kl, batch.neg_log_alpha, count) / count if count else 0.0,
        num_valid=count,
    )


class _LKLossFunction(torch.autograd.Function):
    """This rank's loss (a number ``loss_terms`` computed) with the closed-form gradient of the package
    docstring. Saved for backward: the inputs (references, no copies) and eight numbers per valid row."""

    @staticmethod
    def forward(
        ctx,
        draft,
        target,
        prepared: _Prepared,
        rows: RowStatistics,
        terms: LossTerms,
        kind: str,
        chunk_rows: int,
    ):
        names = list(rows.norms)
        ctx.norm_names = names
        ctx.save_for_backward(
            draft, target, rows.alpha, rows.mass, rows.exact_rows, *(rows.norms[name] for name in names)
        )
        ctx.prepared = prepared
        ctx.kind = kind
        ctx.lam = terms.lam
        ctx.scale = terms.scale
        ctx.chunk_rows = chunk_rows
        return torch.tensor(terms.local_loss, dtype=prepared.compute_dtype, device=draft.device)

    @staticmethod
    def backward(ctx, grad_output):
        draft, target, alpha, mass, exact_rows, *norm_values = ctx.saved_tensors
        norms = dict(zip(ctx.norm_names, norm_values, strict=True))
        prepared: _Prepared = ctx.prepared
        rows, d2t, cd, n_local = prepared.rows, prepared.d2t, prepared.compute_dtype, prepared.num_local
        target_index = prepared.target_index
        kind = ctx.kind
        nothing = (None,) * 6
        grad = torch.zeros_like(draft) if rows is not None or exact_rows.numel() else torch.empty_like(draft)
        if n_local == 0 or ctx.scale == 0.0:
            return grad.zero_(), *nothing
        # (w_kl, w_tv), one small tensor for every kind (so LK's backward holds no more than KL's); ctx.lam is
        # 1 for kl and 0 for tv and alpha.
        lam = ctx.lam
        weights = grad_output.to(cd) * torch.tensor(
            [ctx.scale * lam, ctx.scale * (1.0 - lam)], dtype=cd, device=draft.device
        )
        chunk_rows = ctx.chunk_rows
        direct = rows is None
        for start in range(0, n_local, chunk_rows):
            stop = min(start + chunk_rows, n_local)
            out = (
                grad[start:stop]
                if direct
                else torch.empty(stop - start, draft.shape[1], dtype=grad.dtype, device=draft.device)
            )
            _gradient_kernel(
                _take_rows(draft, rows, start, stop),
                _gather_cols(_take_rows(target, target_index, start, stop), d2t),
                {name: value[start:stop] for name, value in norms.items()},
                mass[start:stop],
                alpha[start:stop],
                weights,
                kind,
                out,
                cd,
            )
            if not direct:
                grad.index_copy_(0, rows[start:stop], out)
        if exact_rows.numel():
            source = exact_rows if rows is None else rows.index_select(0, exact_rows)
            target_source = exact_rows if target_index is None else target_index.index_select(0, exact_rows)
            kl_weight = weights[0] if kind in ("kl", "lambda") else None
            lse = prepared.target_lse
            exact_grad = _exact_backward_rows(
                draft.index_select(0, source),
                target.index_select(0, target_source),
                d2t,
                None if lse is None else lse.index_select(0, target_source),
                kind,
                kl_weight,
                weights[1],
            )
            grad.index_copy_(0, source, exact_grad.to(grad.dtype))
        return grad, *nothing
