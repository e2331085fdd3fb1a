"""Input checks of the losses, and the one-line errors for unusable rows (named by rank, row and value)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from lk_vllm.losses.kernels import _COVERAGE_ABOVE

KINDS = ("kl", "tv", "alpha", "lambda")


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


def _prepare(
    draft_logits: Any,
    target_logits: Any,
    draft_to_target: Any,
    mask: Any,
    target_rows: Any = None,
    target_logsumexp: Any = None,
) -> _Prepared:
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


def _check_target_logsumexp(
    target_logsumexp: Any, target_logits: torch.Tensor, vocab_draft: int, draft_to_target: Any
) -> torch.Tensor:
    """The flattened ``[M]`` logsumexp (fp32 or fp64, no grad) after checking it fits ``target_logits``."""
    if not isinstance(target_logsumexp, torch.Tensor) or not target_logsumexp.is_floating_point():
        found = (
            target_logsumexp.dtype
            if isinstance(target_logsumexp, torch.Tensor)
            else type(target_logsumexp).__name__
        )
        raise ValueError(f"target_logsumexp must be a floating-point tensor; found {found}")
    if tuple(target_logsumexp.shape) != tuple(target_logits.shape[:-1]):
        raise ValueError(
            f"target_logsumexp must have shape {tuple(target_logits.shape[:-1])} (one value per row of "
            f"target_logits); found {tuple(target_logsumexp.shape)}"
        )
    if target_logsumexp.device != target_logits.device:
        raise ValueError(
            f"target_logsumexp is on {target_logsumexp.device} but target_logits is on "
            f"{target_logits.device}; put both on the same device"
        )
    if draft_to_target is not None:
        raise ValueError(
            "target_logsumexp is given, so target_logits must already hold the draft ids' columns "
            "(column d = target id draft_to_target[d]); pass draft_to_target=None"
        )
    if target_logits.shape[-1] != vocab_draft:
        raise ValueError(
            f"with target_logsumexp, target_logits holds the target's logits at the {vocab_draft} draft "
            f"ids; found {target_logits.shape[-1]} columns"
        )
    dtype = torch.float64 if target_logsumexp.dtype == torch.float64 else torch.float32
    return target_logsumexp.detach().reshape(-1).to(dtype)


def _check_target_rows(target_rows: Any, lead_shape: tuple[int, ...], target_logits: torch.Tensor) -> None:
    if (
        not isinstance(target_rows, torch.Tensor)
        or target_rows.is_floating_point()
        or target_rows.dtype == torch.bool
    ):
        raise ValueError(
            f"target_rows must be an integer tensor of shape {lead_shape}; found "
            f"{type(target_rows).__name__ if not isinstance(target_rows, torch.Tensor) else target_rows.dtype}"
        )
    if tuple(target_rows.shape) != lead_shape:
        raise ValueError(
            f"target_rows must have shape {lead_shape} (one table row per position of draft_logits); "
            f"found shape {tuple(target_rows.shape)}"
        )
    if target_logits.dim() != 2:
        raise ValueError(
            f"with target_rows, target_logits must be a [rows, vocab] table; found shape "
            f"{tuple(target_logits.shape)}"
        )
    if target_rows.numel() and (
        int(target_rows.min()) < 0 or int(target_rows.max()) >= target_logits.shape[0]
    ):
        raise ValueError(
            f"target_rows must lie in [0, {target_logits.shape[0]}) (the rows of target_logits); found "
            f"[{int(target_rows.min())}, {int(target_rows.max())}]"
        )


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


def _describe_bad_rows(
    name: str,
    tensor: torch.Tensor,
    rows: torch.Tensor,
    d2t: torch.Tensor | None,
    lse: torch.Tensor | None = None,
) -> str:
    """Exact account of what is wrong in the given rows (only called on the error path)."""
    values = tensor.index_select(0, rows)
    parts = []
    if lse is not None:
        lse = lse.index_select(0, rows).double()
        bad_lse = ~torch.isfinite(lse)
        if bool(bad_lse.any()):
            parts.append(f"non-finite target_logsumexp in {int(bad_lse.sum())} rows")
        below = torch.isfinite(lse) & (
            torch.logsumexp(values.double(), dim=1) - lse > math.log(_COVERAGE_ABOVE)
        )
        if bool(below.any()):
            parts.append(
                f"target_logsumexp below the logsumexp of the draft ids' logits in {int(below.sum())} rows "
                "(it must be taken over the full target vocabulary)"
            )
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


def _raise_for_bad_rows(
    num_valid: int,
    bad_draft_total: int,
    bad_target_total: int,
    prepared: _Prepared,
    bad_draft: torch.Tensor,
    bad_target: torch.Tensor,
    world_size: int,
) -> None:
    """Raise on every rank (after the all-reduce, so no rank is left waiting) if any valid row is unusable:
    ``*_total`` count the bad rows over all ranks, ``bad_draft`` / ``bad_target`` flag this rank's."""
    problems = []
    for name, total, local_bad in (
        ("draft_logits", bad_draft_total, bad_draft),
        ("target_logits", bad_target_total, bad_target),
    ):
        if not total:
            continue
        where = f"{total} of {num_valid} valid rows"
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
