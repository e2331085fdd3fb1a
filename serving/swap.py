"""Drafter swap on a running server: ``POST /v1/speculative/drafter {"path": ...}``.

What is supported, and what is not (yet):

* **Same architecture and shapes** (the new checkpoint holds exactly the tensors, shapes and dtypes of the live
  drafter's checkpoint, and its config.json has the same architecture and sizes): the weights are reloaded in
  place in every worker through ``engine_client.collective_rpc`` (``lk_vllm.plugin.worker``). The engine core
  runs the RPC between two steps, so requests in flight keep streaming; their next drafts come from the new
  weights. No restart, no failed request.
* **Different architecture or shapes**: answered ``409 Conflict`` with the reason; the old drafter keeps
  serving. Restarting the engine inside a live server is not implemented: restart ``lk-vllm serve --drafter
  NEW`` instead.
* Methods without drafter weights (``ngram``): 409.

Every path is resolved (symlinks included) and must lie inside ``--drafters-dir``; nothing outside it is ever
opened. A drafter whose ``lk_training.json`` names another target is refused (409).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from serving.drafter_info import (
    describe_speculative_config,
    drafter_architecture,
    read_drafter_dir,
    recorded_loss,
)
from serving.live_stats import DrafterInfo

WEIGHTS_FILE = "model.safetensors"
# config.json keys that may differ between two drafters that share a shape (everything else must match).
_CONFIG_KEYS_FREE = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "lk_training"}


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
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100 * 1024 * 1024:
                raise ValueError("header too large")
            header = json.loads(f.read(length))
    except (OSError, ValueError, struct.error) as exc:
        raise SwapError(400, f"{path.name} is not a readable safetensors file: {exc}") from None
    return {
        name: (meta["dtype"], tuple(meta["shape"]))
        for name, meta in header.items()
        if name != "__metadata__" and isinstance(meta, dict)
    }


def check_target(drafter_dir: Path, target: str | None) -> None:
    """Refuse a drafter trained for another target (when its lk_training.json says which)."""
    if not target:
        return
    from lk_vllm.drafters.base import target_mismatch

    mismatch = target_mismatch(read_drafter_dir(drafter_dir)["training"], target)
    if mismatch:
        recorded, live = mismatch
        raise SwapError(409, f"drafter {drafter_dir.name} was trained for target {recorded}, this server runs {live}")


def check_same_shape(current_dir: Path, new_dir: Path) -> None:
    """409 unless the new drafter can be loaded into the live one's parameters."""
    current, new = read_drafter_dir(current_dir)["config"], read_drafter_dir(new_dir)["config"]
    differing = sorted(
        key for key in (set(current) | set(new)) - _CONFIG_KEYS_FREE if current.get(key) != new.get(key)
    )
    if differing:
        raise SwapError(
            409,
            f"the new drafter's config differs in {', '.join(differing)}: only drafters of the same architecture "
            "and shapes can be swapped live; restart `lk-vllm serve --drafter` for this one",
        )
    old_tensors, new_tensors = safetensors_header(current_dir / WEIGHTS_FILE), safetensors_header(new_dir / WEIGHTS_FILE)
    if old_tensors != new_tensors:
        changed = sorted(set(old_tensors) ^ set(new_tensors)) or sorted(
            k for k in old_tensors if old_tensors[k] != new_tensors[k]
        )
        raise SwapError(
            409,
            f"the new drafter's tensors differ ({', '.join(changed[:5])}): only the same shapes can be swapped live; "
            "restart `lk-vllm serve --drafter` for this one",
        )


async def swap_drafter(routes, requested: str) -> dict[str, Any]:
    """Validate and perform a swap; raise SwapError (4xx) with the reason, leaving the old drafter serving."""
    from lk_vllm.plugin.worker import RELOAD_DRAFTER

    store = routes.store
    live: DrafterInfo | None = store.drafter
    new_dir = resolve_inside(routes.drafters_dir, requested)
    if live is None or not Path(live.name).is_dir():
        raise SwapError(409, f"the live drafter ({live.method if live else 'none'}) has no weights to swap")
    live_dir = Path(live.name).resolve()
    check_target(new_dir, routes.target)
    if new_dir == live_dir:
        raise SwapError(409, f"{requested!r} is already the live drafter")
    check_same_shape(live_dir, new_dir)
    if routes.engine_client is None:
        raise SwapError(503, "the engine is not ready", **{"Retry-After": "5"})
    results = await routes.engine_client.collective_rpc(RELOAD_DRAFTER, args=(str(new_dir),))
    details = read_drafter_dir(new_dir)
    training = details["training"]
    info = DrafterInfo(
        name=str(new_dir),
        method=live.method,
        architecture=drafter_architecture(details["config"], live.method),
        loss=recorded_loss(training),
        num_speculative_tokens=live.num_speculative_tokens,
        sampling=live.sampling,
    )
    store.set_drafter(info)
    return {"status": "swapped", "mode": "in-place weight reload", "previous": live.name, "drafter": info.as_json(),
            "workers": results}


__all__ = ["SwapError", "describe_speculative_config", "resolve_inside", "swap_drafter"]
