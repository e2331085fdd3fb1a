"""The chunked row kernels: per-row statistics in the forward, the closed-form gradient in the backward, each
compiled once (``_Compiled``) and run over chunks of rows so that no ``[N, V]`` temporary exists."""

from __future__ import annotations

import math
import os
import warnings

import torch
from torch._dynamo import exc as dynamo_exc

from lk_vllm.env import COMPILE_LOSS_ENV

# Rows are processed in chunks of about this many target-vocabulary elements (8 MiB of fp32 per temporary).
_DEFAULT_CHUNK_ELEMENTS = 1 << 21
# Below these, fp32 linear-space sums lose relative precision (terms underflow); such rows are recomputed
# exactly in float64 log space (``lk_vllm.losses.exact``). In real training they are rare.
_ALPHA_EXACT_BELOW = 1e-25
_COVERAGE_EXACT_BELOW = 1e-20
# A given target logsumexp below the draft ids' own (coverage above 1, beyond rounding) is not the full vocabulary's.
_COVERAGE_ABOVE = 1.0 + 1e-3


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


def _chunk_statistics(
    draft: torch.Tensor,
    target: torch.Tensor,
    target_g: torch.Tensor | None,
    cd: torch.dtype,
    target_lse: torch.Tensor | None = None,
):
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


def _gradient_into(
    draft, target_g, norms, mass, alpha, weights, kind: str, out: torch.Tensor, cd: torch.dtype
) -> None:
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
                warnings.warn(
                    f"lk_loss: torch.compile failed ({type(error).__name__}: "
                    f"{str(error).splitlines()[0] if str(error) else ''}); using eager PyTorch",
                    stacklevel=2,
                )
        return self.function(*args)


def _is_compile_error(error: BaseException) -> bool:
    """Whether ``error`` came from compiling (dynamo, inductor, a missing compiler or Triton), not from running:
    an out-of-memory anywhere in its chain counts as running, even when dynamo wrapped it."""
    chain, seen = error, set()
    while chain is not None and id(chain) not in seen:
        if isinstance(chain, torch.OutOfMemoryError):
            return False
        seen.add(id(chain))
        chain = chain.__cause__ or chain.__context__
    return isinstance(
        error,
        dynamo_exc.TorchDynamoException
        | dynamo_exc.FailOnRecompileLimitHit
        | ImportError
        | OSError
        | NotImplementedError,
    )


_statistics_kernel = _Compiled(_chunk_statistics)
_gradient_kernel = _Compiled(_gradient_into)
