"""What the losses return: one position's result and a K-position unroll's."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lk_vllm.acceptance import expected_acceptance_length


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
