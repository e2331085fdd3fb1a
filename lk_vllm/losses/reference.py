"""The plain-PyTorch reference of ``lk_loss``: autograd through ordinary ops, for tests and the benchmark."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from lk_vllm.losses.checks import _check_kind, _prepare
from lk_vllm.losses.kernels import _gather_cols
from lk_vllm.losses.results import LKLossResult


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
