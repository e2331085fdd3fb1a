"""LK losses for speculative-decoding drafters (arXiv 2602.23881): KL, TV, LK^alpha, LK^lambda.

Notation, per position (row) ``i``:

* ``p = softmax(target_logits[i])`` over the FULL target vocabulary (temperature 1);
* ``q = softmax(draft_logits[i])`` over the draft vocabulary (``Vd`` ids);
* ``p_g[d] = p[draft_to_target[d]]``: the target probability gathered to draft ids, NOT renormalised;
* ``p~ = p_g / sum(p_g)``: the target restricted to the draft ids and renormalised (used only by KL);
* ``alpha_i = sum_d min(q[d], p_g[d])``: the acceptance rate of the draft at this position. Target tokens
  outside the draft vocabulary count 0 (the draft can never propose them), so ``1 - alpha_i`` is the total
  variation distance between ``p`` and ``q`` over the full target vocabulary;
* ``KL_i = KL(p~ || q)``.

Losses (means over valid positions; ``n`` = number of valid positions):

* ``kl``:     ``mean_i KL_i``
* ``tv``:     ``mean_i (1 - alpha_i)``
* ``alpha``:  ``mean_i -log(alpha_i)`` (the log is taken per position, see :func:`lk_loss`)
* ``lambda``: ``lam * mean_i KL_i + (1 - lam) * mean_i (1 - alpha_i)`` with
  ``lam = exp(-eta * stopgrad(mean_i alpha_i))``, one scalar per call (per draft position in a K-step unroll).

Gradients with respect to the draft logits ``z`` of row ``i`` (closed form, computed by :class:`_LKLossFunction`):

* ``d KL_i / dz = q - p~``
* ``d (1 - alpha_i) / dz = q * (M_i - a)`` with ``a[d] = 1 if q[d] < p_g[d] else 0`` and
  ``M_i = sum_d q[d] * a[d]``. This is the paper's ``1/2 q (s - E_q[s])`` with ``s = sign(q - p_g)``, written
  with ``a = (1 - s) / 2``; at ties ``q[d] == p_g[d]`` we take ``a[d] = 0`` (``d min(q, p) / dq = 0``), a valid
  subgradient of the concave ``min``. At ``q == p`` every tie gives ``a = 0`` and the gradient is exactly 0.
* ``d (-log alpha_i) / dz = (1 / alpha_i) * d (1 - alpha_i) / dz = q * M_i / alpha_i - q * a / alpha_i``.
  Both terms are bounded by ``q`` (``q * a <= p_g`` and ``M_i <= alpha_i``), so the gradient stays O(1) even
  when ``alpha_i`` is tiny.
* lambda: ``lam * (q - p~) + (1 - lam) * q * (M_i - a)`` (``lam`` is a constant for the gradient).

Cost: the forward computes every kind's statistics (``alpha``, ``KL``, ``M_i``) in the same fused row loops, and
saves the per-row normalisers, so the backward is one elementwise pass with no reduction for every kind; the TV
term only adds a compare and a select to what KL computes. ``M_i`` and ``a`` come from one expression
(:func:`_probabilities`), so they cover the same ids and each row of the TV gradient sums to 0.

There is no gradient with respect to the target logits: the target is a constant (a ``target_logits`` that
requires grad is rejected, so a missing ``.detach()`` cannot silently cost a second graph).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from lk_vllm.acceptance import expected_acceptance_length
from lk_vllm.env import COMPILE_LOSS_ENV

__all__ = [
    "KINDS",
    "LKLossResult",
    "LKMultiLossResult",
    "lk_loss",
    "lk_loss_eager",
    "lk_loss_multi",
]

KINDS = ("kl", "tv", "alpha", "lambda")

# Rows are processed in chunks of about this many target-vocabulary elements (8 MiB of fp32 per temporary).
_DEFAULT_CHUNK_ELEMENTS = 1 << 21
# Below these, fp32 linear-space sums lose relative precision (terms underflow); such rows are recomputed
# exactly in float64 log space. In real training they are rare, so they cost nothing on average.
_ALPHA_EXACT_BELOW = 1e-25
_COVERAGE_EXACT_BELOW = 1e-20
# A given target logsumexp below the draft ids' own (coverage above 1, beyond rounding) is not the full vocabulary's.
_COVERAGE_ABOVE = 1.0 + 1e-3

# Layout of the per-call statistics vector that is all-reduced across ranks (float64).
_S_ALPHA, _S_KL, _S_NLA, _S_COUNT, _S_BAD_DRAFT, _S_BAD_TARGET, _S_BAD_COVERAGE = range(7)
_NUM_STATS = 7


@dataclass(frozen=True)
class LKLossResult:
    """Result of :func:`lk_loss`.

    ``loss`` is this rank's differentiable loss; the floats are global (identical on every rank and equal to
    what one process holding the whole batch computes). Means over zero valid positions are NaN.
    """

    loss: torch.Tensor
    kind: str
    alpha: float  # mean acceptance rate alpha over valid positions
    lam: float  # weight of the KL term: lam for "lambda", 1.0 for "kl", 0.0 for "tv" and "alpha"
    kl: float  # mean KL(p~ || q)
    tv: float  # mean (1 - alpha): total variation between p and q over the full target vocabulary
    neg_log_alpha: float  # mean -log(alpha)
    global_loss: float  # the single-process loss value; equals the mean of `loss` over ranks
    num_valid: int  # valid positions over all ranks
    world_size: int  # ranks the statistics were reduced over (1 without torch.distributed)


@dataclass(frozen=True)
class LKMultiLossResult:
    """Result of :func:`lk_loss_multi`: ``loss = sum_k gamma**k * positions[k].loss``."""

    loss: torch.Tensor
    positions: tuple[LKLossResult, ...]
    weights: tuple[float, ...]  # gamma**k

    @property
    def per_position_alpha(self) -> list[float]:
        return [r.alpha for r in self.positions]

    @property
    def per_position_lam(self) -> list[float]:
        return [r.lam for r in self.positions]

    @property
    def global_loss(self) -> float:
        return math.fsum(w * r.global_loss for w, r in zip(self.weights, self.positions, strict=True))

    @property
    def expected_acceptance_length(self) -> float | None:
        """``1 + sum_k prod_{j<=k} alpha_j`` (see :mod:`lk_vllm.acceptance`); None if a position had no data."""
        alphas = self.per_position_alpha
        if any(math.isnan(a) for a in alphas):
            return None
        return expected_acceptance_length(alphas)


# --------------------------------------------------------------------------------------------------------------
# Input checking
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _Prepared:
    draft: torch.Tensor  # [N, Vd], contiguous
    target: torch.Tensor  # [N, V] (or a [M, V] table read through target_index), contiguous, no grad
    d2t: torch.Tensor | None  # [Vd] int64 on the logits' device, or None for the identity
    rows: torch.Tensor | None  # int64 indices of valid rows, or None when every row is valid
    target_index: torch.Tensor | None  # the target row of each valid row (None: the same as ``rows``)
    target_lse: torch.Tensor | None  # [M] full-vocabulary logsumexp of each target row; then ``target`` holds
    # only the draft ids' columns [M, Vd] (already gathered, ``d2t`` is None)
    num_local: int
    compute_dtype: torch.dtype
    lead_shape: tuple[int, ...]


def _check_kind(kind: Any, eta: Any) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}; found {kind!r}")
    if isinstance(eta, bool) or not isinstance(eta, int | float) or not math.isfinite(eta) or eta < 0:
        raise ValueError(
            f"eta must be a finite number >= 0 (the paper uses 3, or 10 for MEDUSA); found {eta!r}"
        )


def _check_chunk_size(chunk_size: Any) -> None:
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of rows or None; found {chunk_size!r}")


def _prepare(draft_logits: Any, target_logits: Any, draft_to_target: Any, mask: Any,
             target_rows: Any = None, target_logsumexp: Any = None) -> _Prepared:
    for name, value in (("draft_logits", draft_logits), ("target_logits", target_logits)):
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor; found {type(value).__name__}")
        if not value.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor; found dtype {value.dtype}")
        if value.dim() < 2:
            raise ValueError(f"{name} must have shape [..., vocab]; found shape {tuple(value.shape)}")
    if target_logits.requires_grad:
        raise ValueError(
            "target_logits requires grad, but LK losses treat the target as a constant (no gradient flows to it); "
            "pass target_logits.detach() or compute it under torch.no_grad()"
        )
    if draft_logits.device != target_logits.device:
        raise ValueError(
            f"draft_logits is on {draft_logits.device} but target_logits is on {target_logits.device}; "
            "put both on the same device"
        )
    lead_shape = tuple(draft_logits.shape[:-1])
    if target_rows is not None:
        _check_target_rows(target_rows, lead_shape, target_logits)
    elif tuple(target_logits.shape[:-1]) != lead_shape:
        raise ValueError(
            f"target_logits has shape {tuple(target_logits.shape)} but draft_logits has shape "
            f"{tuple(draft_logits.shape)}: all dimensions but the last (the positions) must match"
        )
    vocab_draft = draft_logits.shape[-1]
    vocab_target = target_logits.shape[-1]
    if vocab_draft == 0:
        raise ValueError(f"draft_logits has an empty vocabulary dimension: shape {tuple(draft_logits.shape)}")
    if vocab_target < vocab_draft:
        raise ValueError(
            f"target_logits has a vocabulary of {vocab_target}, smaller than draft_logits' {vocab_draft}; "
            "the draft vocabulary must be a subset of the target's"
        )
    device = draft_logits.device
    d2t, lse = None, None
    if target_logsumexp is not None:  # target_logits holds the draft ids' columns already
        lse = _check_target_logsumexp(target_logsumexp, target_logits, vocab_draft, draft_to_target)
    elif draft_to_target is None:
        if vocab_target != vocab_draft:
            raise ValueError(
                f"draft_to_target is None (identity) but draft_logits has {vocab_draft} ids and target_logits "
                f"{vocab_target}; pass draft_to_target, the target id of each draft id"
            )
    else:
        d2t = _check_draft_to_target(draft_to_target, vocab_draft, vocab_target, device)
        if vocab_target == vocab_draft and bool((d2t == torch.arange(vocab_draft, device=device)).all()):
            d2t = None  # identity: skip the gathers

    num_rows = math.prod(lead_shape)
    rows = None
    num_local = num_rows
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise ValueError(
                f"mask must be a bool torch.Tensor of shape {lead_shape}; found {type(mask).__name__}"
            )
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor (use mask.bool()); found dtype {mask.dtype}")
        if tuple(mask.shape) != lead_shape:
            raise ValueError(
                f"mask must have shape {lead_shape} (one flag per position of draft_logits); "
                f"found shape {tuple(mask.shape)}"
            )
        flat_mask = mask.reshape(-1).to(device)
        num_local = int(flat_mask.sum())
        if num_local != num_rows:
            rows = flat_mask.nonzero().squeeze(1)

    draft = draft_logits.reshape(num_rows, vocab_draft)
    target = target_logits.reshape(-1, vocab_target)
    target_index = rows
    if target_rows is not None:
        flat = target_rows.reshape(-1).to(device=device, dtype=torch.int64)
        target_index = flat if rows is None else flat.index_select(0, rows)
    if not draft.is_contiguous():
        draft = draft.contiguous()
    if not target.is_contiguous():
        target = target.contiguous()
    use_fp64 = torch.float64 in (draft_logits.dtype, target_logits.dtype, getattr(lse, "dtype", None))
    return _Prepared(
        draft=draft,
        target=target,
        d2t=d2t,
        rows=rows,
        target_index=target_index,
        target_lse=lse,
        num_local=num_local,
        compute_dtype=torch.float64 if use_fp64 else torch.float32,
        lead_shape=lead_shape,
    )


def _check_target_logsumexp(target_logsumexp: Any, target_logits: torch.Tensor, vocab_draft: int,
                            draft_to_target: Any) -> torch.Tensor:
    """The flattened ``[M]`` logsumexp (fp32 or fp64, no grad) after checking it fits ``target_logits``."""
    if not isinstance(target_logsumexp, torch.Tensor) or not target_logsumexp.is_floating_point():
        found = target_logsumexp.dtype if isinstance(target_logsumexp, torch.Tensor) else type(target_logsumexp).__name__
        raise ValueError(f"target_logsumexp must be a floating-point tensor; found {found}")
    if tuple(target_logsumexp.shape) != tuple(target_logits.shape[:-1]):
        raise ValueError(f"target_logsumexp must have shape {tuple(target_logits.shape[:-1])} (one value per row of "
                         f"target_logits); found {tuple(target_logsumexp.shape)}")
    if target_logsumexp.device != target_logits.device:
        raise ValueError(f"target_logsumexp is on {target_logsumexp.device} but target_logits is on "
                         f"{target_logits.device}; put both on the same device")
    if draft_to_target is not None:
        raise ValueError("target_logsumexp is given, so target_logits must already hold the draft ids' columns "
                         "(column d = target id draft_to_target[d]); pass draft_to_target=None")
    if target_logits.shape[-1] != vocab_draft:
        raise ValueError(f"with target_logsumexp, target_logits holds the target's logits at the {vocab_draft} draft "
                         f"ids; found {target_logits.shape[-1]} columns")
    dtype = torch.float64 if target_logsumexp.dtype == torch.float64 else torch.float32
    return target_logsumexp.detach().reshape(-1).to(dtype)


def _check_target_rows(target_rows: Any, lead_shape: tuple[int, ...], target_logits: torch.Tensor) -> None:
    if not isinstance(target_rows, torch.Tensor) or target_rows.is_floating_point() or target_rows.dtype == torch.bool:
        raise ValueError(f"target_rows must be an integer tensor of shape {lead_shape}; found "
                         f"{type(target_rows).__name__ if not isinstance(target_rows, torch.Tensor) else target_rows.dtype}")
    if tuple(target_rows.shape) != lead_shape:
        raise ValueError(f"target_rows must have shape {lead_shape} (one table row per position of draft_logits); "
                         f"found shape {tuple(target_rows.shape)}")
    if target_logits.dim() != 2:
        raise ValueError(f"with target_rows, target_logits must be a [rows, vocab] table; found shape "
                         f"{tuple(target_logits.shape)}")
    if target_rows.numel() and (int(target_rows.min()) < 0 or int(target_rows.max()) >= target_logits.shape[0]):
        raise ValueError(f"target_rows must lie in [0, {target_logits.shape[0]}) (the rows of target_logits); found "
                         f"[{int(target_rows.min())}, {int(target_rows.max())}]")


def _check_draft_to_target(draft_to_target: Any, vocab_draft: int, vocab_target: int, device) -> torch.Tensor:
    hint = (
        " (draft_to_target holds absolute target ids; EAGLE-3 checkpoints store offsets instead, "
        "convert them with torch.arange(len(d2t)) + d2t)"
    )
    d2t = torch.as_tensor(draft_to_target)
    if d2t.is_floating_point() or d2t.is_complex() or d2t.dtype == torch.bool:
        raise ValueError(f"draft_to_target must be an integer tensor; found dtype {d2t.dtype}")
    if tuple(d2t.shape) != (vocab_draft,):
        raise ValueError(
            f"draft_to_target must have shape ({vocab_draft},), one target id per draft id; "
            f"found shape {tuple(d2t.shape)}"
        )
    d2t = d2t.to(device=device, dtype=torch.int64)
    out_of_range = (d2t < 0) | (d2t >= vocab_target)
    if bool(out_of_range.any()):
        bad = out_of_range.nonzero().squeeze(1)
        first = int(bad[0])
        raise ValueError(
            f"draft_to_target has {bad.numel()} ids outside [0, {vocab_target}) (the target vocabulary); "
            f"first: draft id {first} -> {int(d2t[first])}" + hint
        )
    sorted_ids, order = torch.sort(d2t)
    repeated = (sorted_ids[1:] == sorted_ids[:-1]).nonzero().squeeze(1)
    if repeated.numel():
        k = int(repeated[0])
        raise ValueError(
            f"draft_to_target maps {repeated.numel()} draft ids onto target ids already used; first: target id "
            f"{int(sorted_ids[k])} at draft ids {int(order[k])} and {int(order[k + 1])}" + hint
        )
    return d2t


def _describe_bad_rows(name: str, tensor: torch.Tensor, rows: torch.Tensor, d2t: torch.Tensor | None,
                       lse: torch.Tensor | None = None) -> str:
    """Exact account of what is wrong in the given rows (only called on the error path)."""
    values = tensor.index_select(0, rows)
    parts = []
    if lse is not None:
        lse = lse.index_select(0, rows).double()
        bad_lse = ~torch.isfinite(lse)
        if bool(bad_lse.any()):
            parts.append(f"non-finite target_logsumexp in {int(bad_lse.sum())} rows")
        below = torch.isfinite(lse) & (torch.logsumexp(values.double(), dim=1) - lse > math.log(_COVERAGE_ABOVE))
        if bool(below.any()):
            parts.append(f"target_logsumexp below the logsumexp of the draft ids' logits in {int(below.sum())} rows "
                         "(it must be taken over the full target vocabulary)")
    nan_rows = torch.isnan(values).any(1)
    if bool(nan_rows.any()):
        parts.append(f"NaN in {int(nan_rows.sum())} rows")
    pos_rows = torch.isposinf(values).any(1)
    if bool(pos_rows.any()):
        parts.append(f"+inf in {int(pos_rows.sum())} rows")
    if name == "draft_logits":
        neg_rows = torch.isneginf(values).any(1)
        if bool(neg_rows.any()):
            parts.append(f"-inf in {int(neg_rows.sum())} rows")
    else:
        no_finite = ~torch.isfinite(values).any(1) & ~nan_rows & ~pos_rows
        if bool(no_finite.any()):
            parts.append(f"no finite logit in {int(no_finite.sum())} rows")
        if d2t is not None:
            gathered = values.index_select(1, d2t)
            no_draft_mass = ~torch.isfinite(gathered).any(1) & ~nan_rows & ~pos_rows & ~no_finite
            if bool(no_draft_mass.any()):
                parts.append(
                    f"-inf at every draft-vocabulary id in {int(no_draft_mass.sum())} rows (the renormalised "
                    "target p~ of the KL term is undefined there; mask those positions)"
                )
    return ", ".join(parts) if parts else "non-finite values"


# --------------------------------------------------------------------------------------------------------------
# Chunked forward and backward
# --------------------------------------------------------------------------------------------------------------


def _chunk_rows(vocab_target: int, chunk_size: int | None, device: torch.device) -> int:
    """Rows per chunk: ``chunk_size``, else about 2M target-vocabulary elements (a CPU cache's worth) on the
    host, and on a GPU 1/64 of its free memory over the few fp32 ``[rows, V]`` temporaries a chunk needs."""
    if chunk_size is not None:
        return chunk_size
    elements = _DEFAULT_CHUNK_ELEMENTS
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        elements = max(elements, free // 64 // (4 * 4))
    return max(1, elements // vocab_target)


def _take_rows(tensor: torch.Tensor, rows: torch.Tensor | None, start: int, stop: int) -> torch.Tensor:
    if rows is None:
        return tensor[start:stop]
    return tensor.index_select(0, rows[start:stop])


def _gather_cols(tensor: torch.Tensor, d2t: torch.Tensor | None) -> torch.Tensor:
    return tensor if d2t is None else tensor.index_select(1, d2t)


def _log_normaliser(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row ``(m, s)`` with ``logsumexp = m + s``: ``m`` the max, ``s = log sum exp(z - m)`` (in ``[0, log V]``).
    Kept apart so that ``exp((z - m) - s)`` has softmax's precision (``z - m`` is exact near the max and ``s``
    is small); non-finite exactly when the row has NaN, +inf or no finite value."""
    m = logits.amax(dim=1)
    return m, (logits - m.unsqueeze(1)).exp().sum(dim=1).log()


def _probabilities(draft, target_g, norms: dict[str, torch.Tensor], cd: torch.dtype):
    """``(log q, log p~, q, p~, p_g)`` of one chunk ``[rows, Vd]`` from the saved per-row normalisers.

    The forward statistics and the backward both use this one expression, so the backward's ``a = [q < p_g]``
    is the same set the forward summed ``M`` over (a mismatch at near-ties would break ``sum_d grad = 0``).
    """
    log_q = (draft.to(cd) - norms["m_d"].unsqueeze(1)) - norms["s_d"].unsqueeze(1)
    log_p_tilde = (target_g.to(cd) - norms["m_g"].unsqueeze(1)) - norms["s_g"].unsqueeze(1)
    q = log_q.exp()
    p_tilde = log_p_tilde.exp()
    coverage = norms.get("coverage")
    p_g = p_tilde if coverage is None else p_tilde * coverage.unsqueeze(1)
    return log_q, log_p_tilde, q, p_tilde, p_g


def _chunk_statistics(draft: torch.Tensor, target: torch.Tensor, target_g: torch.Tensor | None, cd: torch.dtype,
                      target_lse: torch.Tensor | None = None):
    """Per-row statistics of one chunk: the normalisers (``m_d, s_d, m_g, s_g`` and, with a draft vocabulary,
    ``coverage = sum_d p_g[d]``), ``draft_min`` (a -inf draft logit makes the row unusable), ``alpha``,
    ``mass = M = sum_d q[d] a[d]`` and ``kl = KL(p~ || q)``, each ``[rows]``.

    ``target_g`` is the target gathered to the draft ids, or None for a full draft vocabulary. ``target_lse``,
    when given, is the full vocabulary's logsumexp (then ``target`` is not read). Written as plain
    tensor expressions so that torch.compile fuses everything into a few row loops with no ``[rows, V]`` or
    ``[rows, Vd]`` temporary (see :class:`_Compiled`). ``coverage`` is 0 where the target has finite logits
    but none at the draft ids (the caller rejects such rows), NaN where the target row is unusable.
    """
    z_d = draft.to(cd)
    m_d, s_d = _log_normaliser(z_d)
    norms = {"m_d": m_d, "s_d": s_d}
    if target_g is None:
        norms["m_g"], norms["s_g"] = _log_normaliser(target.to(cd))
        target_g = target
    else:
        m_t, s_t = _log_normaliser(target.to(cd)) if target_lse is None else (target_lse.to(cd), 0.0)
        m_g, s_g = _log_normaliser(target_g.to(cd))
        coverage = ((m_g - m_t) + (s_g - s_t)).exp()
        no_draft_mass = (m_g == -math.inf) & torch.isfinite(m_t + s_t)
        norms.update(m_g=m_g, s_g=s_g, coverage=torch.where(no_draft_mass, 0.0, coverage))
    log_q, log_p_tilde, q, p_tilde, p_g = _probabilities(draft, target_g, norms, cd)
    alpha = torch.minimum(q, p_g).sum(dim=1)
    mass = torch.where(q < p_g, q, 0.0).sum(dim=1)
    # p~ = 0 (a -inf target logit) contributes 0, not 0 * -inf.
    kl = torch.where(p_tilde > 0, p_tilde * (log_p_tilde - log_q), 0.0).sum(dim=1)
    return norms, z_d.amin(dim=1), alpha, mass, kl


def _exact_rows(draft: torch.Tensor, target: torch.Tensor, d2t: torch.Tensor | None, lse: torch.Tensor | None):
    """Float64 log-space statistics for rows where linear-space sums underflow (or a -inf target made 0 * inf).

    Returns ``(log_coverage, kl, log_alpha)`` (as :func:`_chunk_statistics`, but in log space);
    ``log_alpha = logsumexp(min(log q, log p_g))`` is exact even when alpha is far below the smallest float.
    ``log_coverage`` is ``lse_g - lse_t``: -inf exactly when the target has no finite logit among the draft ids.
    ``lse`` is the full vocabulary's logsumexp when ``target`` holds only the draft ids' columns.
    """
    target64 = target.double()
    draft64 = draft.double()
    lse_t = torch.logsumexp(target64, dim=1) if lse is None else lse.double()
    target_g = _gather_cols(target64, d2t)
    lse_g = torch.logsumexp(target_g, dim=1)
    lse_d = torch.logsumexp(draft64, dim=1)
    log_q = draft64 - lse_d.unsqueeze(1)
    log_p_tilde = target_g - lse_g.unsqueeze(1)
    p_tilde = log_p_tilde.exp()
    kl_terms = torch.where(p_tilde > 0, p_tilde * (log_p_tilde - log_q), torch.zeros_like(p_tilde))
    kl = kl_terms.sum(dim=1)
    log_alpha = torch.logsumexp(torch.minimum(log_q, target_g - lse_t.unsqueeze(1)), dim=1)
    return lse_g - lse_t, kl, log_alpha


def _gradient_rows(draft, target_g, norms, mass, alpha, weights, kind: str, cd: torch.dtype) -> torch.Tensor:
    """The gradient of one chunk of rows (``[rows, Vd]`` in ``cd``) for ``kind``.

    ``weights`` is a ``[2]`` tensor ``(w_kl, w_tv)``: the KL term's and the TV term's factors (the upstream
    gradient times 1/n, times ``lam`` and ``1 - lam`` for lambda). ``kl``: ``w_kl * (q - p~)``; ``tv``:
    ``w_tv * q * (M - a)``; ``alpha``: the TV gradient with ``w_tv / alpha`` per row; ``lambda``: both terms.
    ``a = [q < p_g]``; ``M`` (``mass``) was summed over the same ``a`` in the forward, so this is one elementwise
    pass with no reduction: the TV term adds a compare, a select and a multiply to what KL computes anyway. The
    per-row factors are formed inside the kernel, so no kind allocates anything KL does not.
    """
    _, _, q, p_tilde, p_g = _probabilities(draft, target_g, norms, cd)
    w_kl, w_tv = weights[0], weights[1]
    if kind == "kl":
        return w_kl * (q - p_tilde)
    if kind == "alpha":
        # Rows in the exact set (alpha below the clamp) are recomputed afterwards; the clamp keeps them finite.
        tv = (w_tv / alpha.clamp_min(_ALPHA_EXACT_BELOW)).unsqueeze(1)
    else:
        tv = w_tv
    # q * (w_kl + tv * (M - a)) - w_kl * p~: the per-row factor takes one of two values.
    base = tv * mass.unsqueeze(1)
    if kind == "lambda":
        base = base + w_kl
    grad = q * torch.where(q < p_g, base - tv, base)
    return grad - w_kl * p_tilde if kind == "lambda" else grad


def _gradient_into(draft, target_g, norms, mass, alpha, weights, kind: str, out: torch.Tensor, cd: torch.dtype) -> None:
    """:func:`_gradient_rows` written into ``out`` (any float dtype): compiled, the fused loop computes in ``cd``
    and stores straight into ``out``, so no chunk-sized result is allocated and copied."""
    out.copy_(_gradient_rows(draft, target_g, norms, mass, alpha, weights, kind, cd))


class _Compiled:
    """A chunk kernel compiled by torch.compile (inductor: fused C++ loops on CPU, Triton on GPU).

    Eager PyTorch makes a separate pass, with its own temporary, for every elementwise op; fused, the forward
    statistics are a few row loops and the backward one elementwise loop. Compilation happens once per process
    and input variant (shapes are dynamic). If compiling fails (no C++ compiler, an unsupported backend, a
    lowering error) or ``LK_VLLM_COMPILE_LOSS=0``, the same Python function runs eagerly: same formulas, more
    memory traffic. Forward and backward switch together (one flag), so ``a`` is always computed by the same
    code in both. An error while the compiled kernel runs (a CUDA out-of-memory, say) is the caller's: it is
    raised and compilation stays on.
    """

    failed = False  # shared: once one kernel fails to compile, both run eagerly

    def __init__(self, function) -> None:
        self.function = function
        self.compiled = None

    @staticmethod
    def enabled() -> bool:
        return not _Compiled.failed and os.environ.get(COMPILE_LOSS_ENV, "1") != "0"

    def __call__(self, *args):
        if self.enabled():
            try:
                if self.compiled is None:
                    self.compiled = torch.compile(self.function, dynamic=True)
                # One graph per input variant (dtype, draft vocabulary or not, which terms, 1-row chunks): more
                # than dynamo's default 8 in a process that uses several. Past the limit dynamo would run some
                # variants eagerly, and the forward's M and the backward's a could then round differently.
                with torch._dynamo.config.patch(recompile_limit=64, fail_on_recompile_limit_hit=True):
                    return self.compiled(*args)
            except Exception as error:  # compilation problems surface at the first call
                if not _is_compile_error(error):
                    raise
                _Compiled.failed = True
                warnings.warn(f"lk_loss: torch.compile failed ({type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else ''}); using eager PyTorch", stacklevel=2)
        return self.function(*args)


def _is_compile_error(error: BaseException) -> bool:
    """Whether ``error`` came from compiling (dynamo, inductor, a missing compiler or Triton), not from running:
    an out-of-memory anywhere in its chain counts as running, even when dynamo wrapped it."""
    from torch._dynamo import exc as dynamo_exc

    chain, seen = error, set()
    while chain is not None and id(chain) not in seen:
        if isinstance(chain, torch.OutOfMemoryError):
            return False
        seen.add(id(chain))
        chain = chain.__cause__ or chain.__context__
    return isinstance(error, dynamo_exc.TorchDynamoException | dynamo_exc.FailOnRecompileLimitHit | ImportError
                      | OSError | NotImplementedError)


_statistics_kernel = _Compiled(_chunk_statistics)
_gradient_kernel = _Compiled(_gradient_into)


def _exact_backward_rows(
    draft: torch.Tensor,
    target: torch.Tensor,
    d2t: torch.Tensor | None,
    lse: torch.Tensor | None,
    kind: str,
    kl_weight: torch.Tensor | None,
    tv_weight: torch.Tensor,
) -> torch.Tensor:
    """Float64 gradient for the rows handled by :func:`_exact_rows` (same formulas, log-space where needed)."""
    target64 = target.double()
    draft64 = draft.double()
    lse_t = torch.logsumexp(target64, dim=1, keepdim=True) if lse is None else lse.double().unsqueeze(1)
    log_q = torch.log_softmax(draft64, dim=1)
    target_g = _gather_cols(target64, d2t)
    log_p_g = target_g - lse_t
    q = log_q.exp()
    below = log_q < log_p_g
    grad = torch.zeros_like(q)
    if kl_weight is not None:
        grad += kl_weight.double() * (q - torch.softmax(target_g, dim=1))
    if kind == "alpha":
        # tv_weight already carries 1 / alpha in linear space, which underflowed; use the ratio form instead:
        # (M q - q a) / alpha with q a / alpha = exp(log q - log alpha) <= 1 wherever a = 1.
        log_alpha = torch.logsumexp(torch.minimum(log_q, log_p_g), dim=1, keepdim=True)
        ratio = torch.where(below, (log_q - log_alpha).exp(), torch.zeros_like(q))
        grad += tv_weight.double() * (q * ratio.sum(dim=1, keepdim=True) - ratio)
    else:
        q_a = torch.where(below, q, torch.zeros_like(q))
        grad += tv_weight.double() * (q * q_a.sum(dim=1, keepdim=True) - q_a)
    return grad


class _LKLossFunction(torch.autograd.Function):
    """Chunked LK loss with the closed-form gradients of the module docstring.

    Forward: one pass over the rows, chunk by chunk (:func:`_chunk_statistics`), computing per row ``alpha``,
    ``KL``, ``M`` and the log-normalisers; the per-call sums are all-reduced once (so ``lam`` uses the global
    mean alpha), then the loss is formed. Saved for backward: the inputs (references, no copies) and eight
    numbers per valid row. Backward: one elementwise pass per chunk (:func:`_gradient_rows`) writing the
    gradient straight into the output; the only ``[N, Vd]`` tensor it allocates is the gradient itself.
    """

    @staticmethod
    def forward(ctx, draft, target, prepared: _Prepared, kind, eta, chunk_rows, group, world_size, info):
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
            chunk_norms, *values = _statistics_kernel(_take_rows(draft, rows, start, stop), target_c, target_g, cd, lse_c)
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
        if exact_rows.numel():
            source = exact_rows if rows is None else rows.index_select(0, exact_rows)
            target_source = exact_rows if target_index is None else target_index.index_select(0, exact_rows)
            values = _exact_rows(draft.index_select(0, source), target.index_select(0, target_source), d2t,
                                 None if lse is None else lse.index_select(0, target_source))
            log_coverage, exact_kl, exact_log_alpha = values
            kl[exact_rows] = exact_kl.to(cd)
            log_alpha[exact_rows] = exact_log_alpha.clamp(max=0.0).to(cd)
            alpha[exact_rows] = log_alpha[exact_rows].exp()
            exact_coverage_zero = log_coverage == -math.inf
        else:
            exact_coverage_zero = torch.zeros(0, dtype=torch.bool, device=device)
        bad_coverage = torch.zeros_like(bad_target)
        bad_coverage[exact_rows] = exact_coverage_zero
        bad = bad_draft | bad_target | bad_coverage
        good = ~bad

        stats = torch.zeros(_NUM_STATS, dtype=torch.float64, device=device)
        stats[_S_ALPHA] = alpha[good].double().sum()
        stats[_S_KL] = kl[good].double().sum()
        stats[_S_NLA] = -log_alpha[good].double().sum()
        stats[_S_COUNT] = n_local
        stats[_S_BAD_DRAFT] = bad_draft.sum()
        stats[_S_BAD_TARGET] = bad_target.sum()
        stats[_S_BAD_COVERAGE] = bad_coverage.sum()
        local = stats.clone()
        if world_size > 1:
            dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
        _raise_for_bad_rows(stats, local, prepared, bad_draft, bad_target | bad_coverage, world_size)

        count = int(stats[_S_COUNT])
        total = {"alpha": float(stats[_S_ALPHA]), "kl": float(stats[_S_KL]), "nla": float(stats[_S_NLA])}
        mean = {k: (v / count if count else math.nan) for k, v in total.items()}
        lam = {"kl": 1.0, "tv": 0.0, "alpha": 0.0}.get(kind)
        if lam is None:
            lam = math.exp(-eta * mean["alpha"]) if count else 1.0

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
        local_sum = combine(
            float(local[_S_ALPHA]), float(local[_S_KL]), float(local[_S_NLA]), float(local[_S_COUNT])
        )
        loss = torch.tensor(scale * local_sum, dtype=cd, device=device)
        info.update(
            alpha=mean["alpha"],
            kl=mean["kl"],
            tv=(1.0 - mean["alpha"]) if count else math.nan,
            neg_log_alpha=mean["nla"],
            lam=lam,
            global_loss=combine(total["alpha"], total["kl"], total["nla"], count) / count if count else 0.0,
            num_valid=count,
        )

        ctx.norm_names = names
        ctx.save_for_backward(draft, target, alpha, mass, exact_rows, *(norms[name] for name in names))
        ctx.prepared = prepared
        ctx.kind = kind
        ctx.lam = lam
        ctx.scale = scale
        ctx.chunk_rows = chunk_rows
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        draft, target, alpha, mass, exact_rows, *norm_values = ctx.saved_tensors
        norms = dict(zip(ctx.norm_names, norm_values, strict=True))
        prepared: _Prepared = ctx.prepared
        rows, d2t, cd, n_local = prepared.rows, prepared.d2t, prepared.compute_dtype, prepared.num_local
        target_index = prepared.target_index
        kind = ctx.kind
        grad = torch.zeros_like(draft) if rows is not None or exact_rows.numel() else torch.empty_like(draft)
        if n_local == 0 or ctx.scale == 0.0:
            return grad.zero_(), None, None, None, None, None, None, None, None
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
                draft.index_select(0, source), target.index_select(0, target_source), d2t,
                None if lse is None else lse.index_select(0, target_source), kind, kl_weight, weights[1],
            )
            grad.index_copy_(0, source, exact_grad.to(grad.dtype))
        return grad, None, None, None, None, None, None, None, None


def _raise_for_bad_rows(stats, local, prepared: _Prepared, bad_draft, bad_target, world_size: int) -> None:
    """Raise on every rank (after the all-reduce, so no rank is left waiting) if any valid row is unusable."""
    problems = []
    for name, index, local_bad in (
        ("draft_logits", _S_BAD_DRAFT, bad_draft),
        ("target_logits", _S_BAD_TARGET, bad_target),
    ):
        total = int(stats[index]) + (int(stats[_S_BAD_COVERAGE]) if index == _S_BAD_TARGET else 0)
        if not total:
            continue
        where = f"{total} of {int(stats[_S_COUNT])} valid rows"
        if world_size > 1:
            where += f" over {world_size} ranks"
        detail = ""
        local_rows = local_bad.nonzero().squeeze(1)
        if local_rows.numel():
            draft_side = name == "draft_logits"
            index = prepared.rows if draft_side else prepared.target_index
            source = local_rows if index is None else index.index_select(0, local_rows)
            tensor = prepared.draft if draft_side else prepared.target
            lse = None if draft_side else prepared.target_lse
            table = not draft_side and prepared.target_index is not prepared.rows  # read through target_rows
            detail = (
                f" (on this rank: {_describe_bad_rows(name, tensor, source, prepared.d2t, lse)}; first bad row "
                f"{int(source[0])} of the {'target table' if table else 'flattened positions'})"
            )
        problems.append(f"{name} is unusable in {where}{detail}")
    if problems:
        allowed = (
            "draft logits must be finite; target logits may contain -inf (probability 0) but not NaN or +inf, and "
            "need a finite value among the draft-vocabulary ids"
        )
        raise ValueError("; ".join(problems) + f". {allowed}. Masked positions are not checked.")


# --------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------


def _resolve_group(distributed: bool | None, process_group) -> tuple[Any, int]:
    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized()
    if not distributed:
        return None, 1
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("distributed=True but torch.distributed is not initialized")
    return process_group, dist.get_world_size(process_group)


def lk_loss(
    draft_logits: torch.Tensor,
    target_logits: torch.Tensor,
    *,
    kind: str,
    eta: float = 3.0,
    draft_to_target: torch.Tensor | Sequence[int] | None = None,
    mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
    distributed: bool | None = None,
    process_group=None,
    target_rows: torch.Tensor | None = None,
    target_logsumexp: torch.Tensor | None = None,
) -> LKLossResult:
    """KL, TV, LK^alpha or LK^lambda loss of one draft position (see the module docstring for the formulas).

    Args:
        draft_logits: ``[..., Vd]`` draft logits (any float dtype; bf16/fp16 are fine). Math is fp32 (fp64 when
            an input is fp64); the gradient is returned in ``draft_logits.dtype``.
        target_logits: ``[..., V]`` target logits with the same leading shape, ``V >= Vd``; a constant (must not
            require grad). ``-inf`` entries mean probability 0; NaN and ``+inf`` are rejected.
        kind: ``"kl"``, ``"tv"``, ``"alpha"`` or ``"lambda"``.
        eta: LK^lambda's decay, ``lam = exp(-eta * mean alpha)`` (paper: 3; 10 for MEDUSA). Ignored otherwise.
        draft_to_target: ``[Vd]`` absolute target id of each draft id (unique, in ``[0, V)``); None when the
            vocabularies are the same. (EAGLE-3 checkpoints store offsets ``t - d``; add ``arange(Vd)``.)
        mask: bool ``[...]``, True at valid positions; None means all valid. Masked positions are neither
            computed nor checked, and get a zero gradient. No valid position: a zero loss with zero gradient,
            and NaN means.
        chunk_size: rows per chunk (default: about 2M target-vocabulary elements per chunk). The result does not
            depend on it beyond floating-point rounding of the per-row sums.
        distributed: reduce the statistics across ranks; default: when torch.distributed is initialized.
            Every rank of the group must then call with the same ``kind`` (a collective per call).
        process_group: the data-parallel group to reduce over (default: the default group).
        target_rows: integer ``[...]`` (draft_logits' leading shape): position ``i`` is compared with row
            ``target_rows[i]`` of ``target_logits``, then a ``[M, V]`` table that several calls can share (the K
            draft positions of an unroll read overlapping rows) and that is never copied per call.
        target_logsumexp: ``target_logits``' leading shape: the logsumexp of each target row over the FULL
            target vocabulary. When given, ``target_logits`` holds only the target's logits at the draft ids
            (``[..., Vd]``, column ``d`` = target id ``draft_to_target[d]``; pass ``draft_to_target=None``), so a
            caller that knows the normaliser (e.g. cached with the hidden states) never builds ``[N, V]``. Same
            result as passing the full row. A value below the draft columns' own logsumexp is rejected.

    ``-log alpha`` is taken per position, then averaged (the paper's one-hot limit: it equals the NLL). There is
    no clamp: a row whose fp32 ``alpha`` falls below 1e-25 is recomputed in float64 log space
    (``log alpha = logsumexp(min(log q, log p_g))``), so the loss stays exact and finite for any finite logits.

    Distributed convention: the means are global (sums and counts all-reduced, then divided), so ``alpha``,
    ``lam``, ``kl``, ``tv`` and ``global_loss`` equal what one process holding the whole batch computes. Each
    rank's ``loss`` is ``world_size / N_global * sum of its own per-position terms``: the mean of ``loss`` over
    ranks is the global loss, and DDP (which averages gradients over ranks) gets exactly the single-process
    gradient. Without DDP gradient averaging (e.g. a plain all-reduce SUM of gradients), divide by world_size.

    Returns:
        :class:`LKLossResult`.
    """
    _check_kind(kind, eta)
    _check_chunk_size(chunk_size)
    prepared = _prepare(draft_logits, target_logits, draft_to_target, mask, target_rows, target_logsumexp)
    group, world_size = _resolve_group(distributed, process_group)
    info: dict[str, Any] = {}
    chunk_rows = _chunk_rows(prepared.target.shape[1], chunk_size, prepared.draft.device)
    loss = _LKLossFunction.apply(
        prepared.draft,
        prepared.target.detach(),
        prepared,
        kind,
        float(eta),
        chunk_rows,
        group,
        world_size,
        info,
    )
    return LKLossResult(loss=loss, kind=kind, world_size=world_size, **info)


def lk_loss_multi(
    draft_logits: Sequence[torch.Tensor],
    target_logits: Sequence[torch.Tensor],
    *,
    kind: str,
    eta: float = 3.0,
    gamma: float = 0.8,
    draft_to_target: torch.Tensor | Sequence[int] | None = None,
    masks: Sequence[torch.Tensor | None] | torch.Tensor | None = None,
    chunk_size: int | None = None,
    distributed: bool | None = None,
    process_group=None,
    target_rows: Sequence[torch.Tensor] | None = None,
    target_logsumexp: Sequence[torch.Tensor] | None = None,
) -> LKMultiLossResult:
    """LK loss of a K-position draft unroll: ``sum_k gamma**k * L_k`` (the paper's weights, gamma = 0.8).

    Position ``k`` is :func:`lk_loss` of ``draft_logits[k]`` against ``target_logits[k]`` with its own mask,
    so LK^lambda gets its own ``lam_k = exp(-eta * mean alpha_k)`` from its own (global) batch-mean alpha.
    ``masks`` is None, one mask shared by every position, or a sequence with one mask (or None) per position.
    ``target_rows`` (one index tensor per position) reads each position's targets from its ``target_logits``
    table (see :func:`lk_loss`); pass the same table for every position to hold it once. ``target_logsumexp``
    (one per position, matching ``target_logits``) makes those the draft ids' columns (see :func:`lk_loss`).
    """
    if isinstance(draft_logits, torch.Tensor) or isinstance(target_logits, torch.Tensor):
        raise ValueError(
            "draft_logits and target_logits must be sequences of tensors, one per draft position"
        )
    num_positions = len(draft_logits)
    if num_positions == 0:
        raise ValueError("draft_logits is empty: need at least one draft position")
    if len(target_logits) != num_positions:
        raise ValueError(
            f"target_logits has {len(target_logits)} positions but draft_logits has {num_positions}"
        )
    if isinstance(gamma, bool) or not isinstance(gamma, int | float) or not (0.0 < gamma <= 1.0):
        raise ValueError(f"gamma must be in (0, 1] (the paper uses 0.8); found {gamma!r}")
    for name, value in (("target_rows", target_rows), ("target_logsumexp", target_logsumexp)):
        if value is not None and len(value) != num_positions:
            raise ValueError(f"{name} has {len(value)} entries but there are {num_positions} draft positions")
    if masks is None or isinstance(masks, torch.Tensor):
        masks = [masks] * num_positions
    elif len(masks) != num_positions:
        raise ValueError(f"masks has {len(masks)} entries but there are {num_positions} draft positions")
    results = []
    weights = []
    total = None
    for k in range(num_positions):
        result = lk_loss(
            draft_logits[k],
            target_logits[k],
            kind=kind,
            eta=eta,
            draft_to_target=draft_to_target,
            mask=masks[k],
            chunk_size=chunk_size,
            distributed=distributed,
            process_group=process_group,
            target_rows=None if target_rows is None else target_rows[k],
            target_logsumexp=None if target_logsumexp is None else target_logsumexp[k],
        )
        weight = float(gamma) ** k
        term = result.loss * weight
        total = term if total is None else total + term
        results.append(result)
        weights.append(weight)
    return LKMultiLossResult(loss=total, positions=tuple(results), weights=tuple(weights))


def lk_loss_eager(
    draft_logits: torch.Tensor,
    target_logits: torch.Tensor,
    *,
    kind: str,
    eta: float = 3.0,
    draft_to_target: torch.Tensor | Sequence[int] | None = None,
    mask: torch.Tensor | None = None,
) -> LKLossResult:
    """Plain-PyTorch reference of :func:`lk_loss` (single process): autograd through ordinary ops.

    Materialises several ``[N, V]`` tensors; it exists for tests and as the baseline of the loss benchmark.
    ``-log alpha`` has no guard here (it is inf where fp32 alpha underflows to 0).
    """
    _check_kind(kind, eta)
    prepared = _prepare(draft_logits, target_logits, draft_to_target, mask)
    cd = prepared.compute_dtype
    draft, target = prepared.draft, prepared.target
    if prepared.rows is not None:
        draft = draft.index_select(0, prepared.rows)
        target = target.index_select(0, prepared.rows)
    d2t = prepared.d2t
    log_q = torch.log_softmax(draft.to(cd), dim=-1)
    target_c = target.to(cd)
    log_p_g = _gather_cols(torch.log_softmax(target_c, dim=-1), d2t)
    log_p_tilde = torch.log_softmax(_gather_cols(target_c, d2t), dim=-1)
    q = log_q.exp()
    p_tilde = log_p_tilde.exp()
    alpha = torch.minimum(q, log_p_g.exp()).sum(dim=-1)
    kl = torch.where(p_tilde > 0, p_tilde * (log_p_tilde - log_q), 0.0).sum(dim=-1)
    count = prepared.num_local
    if count == 0:
        zero = draft.sum() * 0.0
        lam = 1.0 if kind in ("kl", "lambda") else 0.0
        return LKLossResult(zero, kind, math.nan, lam, math.nan, math.nan, math.nan, 0.0, 0, 1)
    mean_alpha = alpha.mean()
    mean_kl = kl.mean()
    neg_log_alpha = -alpha.log().mean()
    if kind == "kl":
        lam, loss = 1.0, mean_kl
    elif kind == "tv":
        lam, loss = 0.0, 1.0 - mean_alpha
    elif kind == "alpha":
        lam, loss = 0.0, neg_log_alpha
    else:
        lam = math.exp(-eta * float(mean_alpha.detach()))
        loss = lam * mean_kl + (1.0 - lam) * (1.0 - mean_alpha)
    return LKLossResult(
        loss=loss,
        kind=kind,
        alpha=float(mean_alpha.detach()),
        lam=lam,
        kl=float(mean_kl.detach()),
        tv=1.0 - float(mean_alpha.detach()),
        neg_log_alpha=float(neg_log_alpha.detach()),
        global_loss=float(loss.detach()),
        num_valid=count,
        world_size=1,
    )
