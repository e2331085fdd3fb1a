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

Gradients with respect to the draft logits ``z`` of row ``i`` (closed form, ``function._LKLossFunction``):

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
(``kernels._probabilities``), so they cover the same ids and each row of the TV gradient sums to 0.

There is no gradient with respect to the target logits: the target is a constant (a ``target_logits`` that
requires grad is rejected, so a missing ``.detach()`` cannot silently cost a second graph).

The package: this module is the public API; ``checks`` (input checks, the one-line errors), ``kernels`` (the
chunked, compiled row kernels), ``exact`` (float64 rows where fp32 underflows), ``function`` (one position's
loss in three steps and its autograd function), ``results`` and ``reference`` (the eager float64-capable
reference the tests and the benchmark compare against).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from lk_vllm.losses.checks import KINDS, _check_chunk_size, _check_kind, _prepare
from lk_vllm.losses.function import _LKLossFunction, loss_terms, reduce_statistics, row_statistics
from lk_vllm.losses.kernels import _chunk_rows
from lk_vllm.losses.reference import lk_loss_eager
from lk_vllm.losses.results import LKLossResult, LKMultiLossResult

__all__ = [
    "KINDS",
    "LKLossResult",
    "LKMultiLossResult",
    "lk_loss",
    "lk_loss_eager",
    "lk_loss_multi",
]


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
    chunk_rows = _chunk_rows(prepared.target.shape[1], chunk_size, prepared.draft.device)
    with torch.no_grad():
        rows = row_statistics(prepared, chunk_rows)
        batch = reduce_statistics(rows, prepared, group, world_size)
    terms = loss_terms(kind, float(eta), batch, world_size)
    loss = _LKLossFunction.apply(
        prepared.draft, prepared.target.detach(), prepared, rows, terms, kind, chunk_rows
    )
    return LKLossResult(
        loss=loss,
        kind=kind,
        alpha=terms.alpha,
        lam=terms.lam,
        kl=terms.kl,
        tv=terms.tv,
        neg_log_alpha=terms.neg_log_alpha,
        global_loss=terms.global_loss,
        num_valid=terms.num_valid,
        world_size=world_size,
    )


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


def _resolve_group(distributed: bool | None, process_group) -> tuple[Any, int]:
    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized()
    if not distributed:
        return None, 1
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("distributed=True but torch.distributed is not initialized")
    return process_group, dist.get_world_size(process_group)
