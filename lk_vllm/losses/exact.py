"""Rows whose fp32 sums underflow, recomputed exactly in float64 log space (forward and backward)."""

from __future__ import annotations

import torch

from lk_vllm.losses.kernels import _gather_cols


def _exact_rows(
    draft: torch.Tensor, target: torch.Tensor, d2t: torch.Tensor | None, lse: torch.Tensor | None
):
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
