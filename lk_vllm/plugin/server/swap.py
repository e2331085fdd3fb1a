"""Drafter swap on a running server: ``POST /v1/speculative/drafter {"path": ...}``.

* **Same architecture and shapes** (the new checkpoint holds exactly the tensors, shapes and dtypes of the live
  drafter's checkpoint, and its config.json has the same architecture and sizes): the weights are reloaded in
  place in every worker through ``engine_client.collective_rpc`` (``lk_vllm.plugin.engine.worker``). The engine core
  runs the RPC between two steps, so requests in flight keep streaming; their next drafts come from the new
  weights. No restart, no failed request.
* **Different architecture or shapes** (or a server speculating without weights, such as n-gram, or another
  ``num_speculative_tokens``): the engine must restart with a new speculative config. Under ``lk-vllm serve``
  (its supervisor, ``serving.supervisor``, sets ``$LK_VLLM_SUPERVISED``) this route checks the new drafter and
  answers the supervisor with the speculative config to restart with (header ``X-LK-Restart: required``); the
  supervisor drains, restarts and answers the client. Under plain vLLM nothing can restart the engine: 409.

Every path is resolved (symlinks included) and must lie inside ``--drafters-dir``; nothing outside it is ever
opened. A drafter whose ``lk_training.json`` names another target is refused (409); one that fails a static
check of ``lk-vllm validate`` (NaN weights, EAGLE-3 auxiliary layers vLLM would guess or that differ from the
trained ones, a draft vocabulary out of range, ...) is refused with validate's reason (400). Every refusal
leaves the live drafter serving.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from lk_vllm.drafters import check_drafter_for_target, speculative_config_for, with_faithful_sampling
from lk_vllm.drafters.base import read_drafter_files, read_safetensors_header, target_mismatch
from lk_vllm.env import SUPERVISED_ENV
from lk_vllm.errors import UserError
from lk_vllm.plugin.engine.worker import RELOAD_DRAFTER
from lk_vllm.plugin.server.drafter_info import (
    describe_speculative_config,
    drafter_architecture,
)
from lk_vllm.plugin.server.live_stats import DrafterInfo
from lk_vllm.validate import check_drafter

WEIGHTS_FILE = "model.safetensors"
# config.json keys that may differ between two drafters that share a shape (everything else must match).
_CONFIG_KEYS_FREE = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "lk_training"}


# Set by lk-vllm serve's supervisor in the environment of the vLLM server it runs (it can restart the engine).
# Response header by which this route tells the supervisor to restart the engine (never reaches a client).
RESTART_HEADER = "X-LK-Restart"


class SwapError(Exception):
    def __init__(self, status: int, message: str, **headers: str) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers


def resolve_inside(drafters_dir: str | None, requested: str) -> Path:
    """The drafter directory for ``requested`` (relative to ``drafters_dir`` or absolute), which must resolve
    inside ``drafters_dir``."""
    if not drafters_dir:
        raise SwapError(403, "drafter swap is disabled: start the server with --drafters-dir DIR")
    root = Path(drafters_dir).resolve()
    if "\x00" in requested:
        raise SwapError(400, "path contains a NUL byte")
    candidate = Path(requested)
    candidate = (candidate if candidate.is_absolute() else root / candidate).resolve()
    if candidate != root and root not in candidate.parents:
        raise SwapError(403, f"path {requested!r} resolves outside --drafters-dir {root}")
    if not candidate.is_dir():
        raise SwapError(404, f"drafter directory {requested!r} not found in {root}")
    for name in ("config.json", WEIGHTS_FILE):
        if not (candidate / name).is_file():
            raise SwapError(400, f"drafter directory {requested!r} has no {name}")
    return candidate


def safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (dtype, shape) from a safetensors file header, without reading the weights."""
    try:
        return read_safetensors_header(path)
    except UserError as exc:
        raise SwapError(400, f"{path.name}: {exc}") from None


def check_target(drafter_dir: Path, target: str | None) -> None:
    """Refuse a drafter trained for another target (when its lk_training.json says which)."""
    if not target:
        return
    mismatch = target_mismatch(read_drafter_files(drafter_dir).record, target)
    if mismatch:
        recorded, live = mismatch
        raise SwapError(
            409, f"drafter {drafter_dir.name} was trained for target {recorded}, this server runs {live}"
        )


async def validate_static(
    new_dir: Path, requested: str, target: str | None, num_speculative_tokens: int
) -> None:
    """``lk-vllm validate``'s static checks (off the event loop: they read every weight), as a 400."""
    report = await asyncio.to_thread(check_drafter, new_dir, target, num_speculative_tokens)
    if not report.ok:
        raise SwapError(400, f"drafter {requested!r} fails validation: {report.reason}")


def shape_difference(current_dir: Path, new_dir: Path) -> str | None:
    """Why the new drafter cannot be loaded into the live one's parameters, or None if it can."""
    current, new = read_drafter_files(current_dir).config, read_drafter_files(new_dir).config
    old_architecture, new_architecture = drafter_architecture(current, "?"), drafter_architecture(new, "?")
    if old_architecture != new_architecture:
        return f"the new drafter's architectures differ ({old_architecture} -> {new_architecture})"
    differing = sorted(
        key for key in (set(current) | set(new)) - _CONFIG_KEYS_FREE if current.get(key) != new.get(key)
    )
    if differing:
        more = f" and {len(differing) - 6} more" if len(differing) > 6 else ""
        return f"the new drafter's config differs in {', '.join(differing[:6])}{more}"
    old_tensors, new_tensors = (
        safetensors_header(current_dir / WEIGHTS_FILE),
        safetensors_header(new_dir / WEIGHTS_FILE),
    )
    if old_tensors != new_tensors:
        changed = sorted(set(old_tensors) ^ set(new_tensors)) or sorted(
            k for k in old_tensors if old_tensors[k] != new_tensors[k]
        )
        return f"the new drafter's tensors differ ({', '.join(changed[:5])})"
    return None


def restart_config(new_dir: Path, num_speculative_tokens: int, target: str | None) -> dict[str, Any]:
    """The speculative config ``lk-vllm serve --drafter NEW`` would start with (4xx if it would refuse it)."""
    try:
        if target:
            check_drafter_for_target(new_dir, target)
    except UserError as exc:
        raise SwapError(409, str(exc)) from None
    try:
        return with_faithful_sampling(speculative_config_for(new_dir, num_speculative_tokens))
    except UserError as exc:
        raise SwapError(400, str(exc)) from None


def _describe(
    new_dir: Path, method: str, live: DrafterInfo | None, num_speculative_tokens: int
) -> DrafterInfo:
    files = read_drafter_files(new_dir)
    return DrafterInfo(
        name=str(new_dir),
        method=method,
        architecture=drafter_architecture(files.config, method),
        loss=files.record.loss,
        num_speculative_tokens=num_speculative_tokens,
        sampling=live.sampling if live else {},
    )


async def swap_drafter(routes, requested: str, num_speculative_tokens: int | None = None) -> dict[str, Any]:
    """Validate and perform a swap; raise SwapError (4xx) with the reason, leaving the old drafter serving.

    Returns the result, or (under the supervisor, when the engine must restart) ``{"status": "restart-required",
    "speculative_config": ...}`` for the supervisor to act on."""
    store = routes.store
    live: DrafterInfo | None = store.drafter
    new_dir = resolve_inside(routes.drafters_dir, requested)
    check_target(new_dir, routes.target)
    live_dir = Path(live.name).resolve() if live is not None and Path(live.name).is_dir() else None
    k = num_speculative_tokens or (live.num_speculative_tokens if live else 0)
    if new_dir == live_dir and k == live.num_speculative_tokens:
        raise SwapError(409, f"{requested!r} is already the live drafter")
    await validate_static(new_dir, requested, routes.target, k)
    if live_dir is None:
        reason = f"the live drafter ({live.method if live else 'none'}) has no weights to swap"
    elif k != live.num_speculative_tokens:
        reason = f"num_speculative_tokens changes from {live.num_speculative_tokens} to {k}"
    else:
        reason = shape_difference(live_dir, new_dir)
    if reason is not None:
        if not os.environ.get(SUPERVISED_ENV):
            raise SwapError(
                409,
                f"{reason}: only drafters of the same architecture and shapes can be swapped into "
                "plain vLLM; serve with `lk-vllm serve` (it restarts the engine for such swaps) or "
                "restart `lk-vllm serve --drafter` for this one",
            )
        spec = restart_config(new_dir, k, routes.target)
        info = _describe(new_dir, spec["method"], None, k)
        return {
            "status": "restart-required",
            "reason": reason,
            "speculative_config": spec,
            "previous": live.name if live else None,
            "drafter": info.as_json(),
        }
    if routes.engine_client is None:
        raise SwapError(503, "the engine is not ready", **{"Retry-After": "5"})
    results = await routes.engine_client.collective_rpc(RELOAD_DRAFTER, args=(str(new_dir),))
    info = _describe(new_dir, live.method, live, k)
    store.set_drafter(info)
    return {
        "status": "swapped",
        "mode": "in-place weight reload",
        "previous": live.name,
        "drafter": info.as_json(),
        "workers": results,
    }


__all__ = ["RESTART_HEADER", "SwapError", "describe_speculative_config", "resolve_inside", "swap_drafter"]
