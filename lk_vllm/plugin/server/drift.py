"""Acceptance drift alarm: the live drafter's windowed acceptance length against what it is expected to reach.

Acceptance that collapses or drifts down raises no error anywhere (a drafter for another data domain, a
target or tokenizer update, a bad swap), so the server compares, on every stats request and Prometheus scrape:

* **expected**, per sampling mode, from the drafter's ``lk_training.json`` (its eval data pooled over datasets,
  else its held-out training samples, ``lk_vllm.acceptance.predicted_rates``): at temperature 0 from the top-1
  agreement, for sampled requests from alpha (measured at T=1: an approximation at other temperatures). Without a training record (or without
  per-request counters to split the traffic by mode) the reference is learned from the drafter's first
  ``--drift-reference-minutes`` of traffic (pooled over every step, all traffic);
* **observed**: the same quantity over the last ``--drift-window`` seconds: the pooled acceptance length of the
  requests of that mode that finished in the window, or of every step for a learned reference.

A check with fewer than ``MIN_DRAFTS`` drafts in the window is not judged (too noisy). When observed / expected
falls below ``--drift-threshold`` (a fraction in (0, 1]), the check and the alarm say so, with the window's
numbers: ``lk_acceptance_drift`` (1 drifting, 0 not, NaN when nothing can be judged yet), the ``drift`` object
of ``/v1/speculative/stats`` and the dashboard banner. Settings reach the vLLM server process in
``$LK_VLLM_DRIFT`` (``lk-vllm serve`` sets it; without it the defaults below apply).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

from lk_vllm import acceptance
from lk_vllm.drafters.base import CONFIG_FILE, read_drafter_files
from lk_vllm.env import DRIFT_ENV
from lk_vllm.errors import UserError

MIN_DRAFTS = 50  # below this many drafts in the window a check is not judged


@dataclasses.dataclass(frozen=True)
class DriftSettings:
    threshold: float = 0.75  # alarm when observed / expected < threshold
    window_seconds: float = 300.0
    reference_seconds: float = (
        300.0  # the first minutes of a drafter's traffic, when it has no training record
    )

    def __post_init__(self) -> None:
        check_threshold(self.threshold)
        for flag, value in (
            ("--drift-window", self.window_seconds),
            ("--drift-reference-minutes", self.reference_seconds / 60),
        ):
            if not (isinstance(value, int | float) and value > 0):
                raise UserError(f"{flag}: expected a positive number, got {value!r}")

    @classmethod
    def from_env(cls) -> DriftSettings:
        text = os.environ.get(DRIFT_ENV)
        return cls(**json.loads(text)) if text else cls()


def check_threshold(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise UserError(
            f"--drift-threshold: expected a fraction in (0, 1] of the expected acceptance length, "
            f"got {value!r}"
        )
    return float(value)


def training_expectation(drafter_path: str, num_speculative_tokens: int) -> dict[str, tuple[float, str]]:
    """(expected acceptance length, where it comes from) per sampling mode from the drafter's
    ``lk_training.json`` (empty if none)."""
    if not (Path(drafter_path) / CONFIG_FILE).is_file():
        return {}
    training = read_drafter_files(drafter_path).record.training
    if not training:
        return {}
    out = {}
    for mode, temperature in (("temperature_0", 0.0), ("sampled", 1.0)):
        predicted = acceptance.predicted_rates(training, temperature, num_speculative_tokens, "all")
        if predicted is not None:
            rates, source = predicted
            out[mode] = (acceptance.expected_acceptance_length(rates), f"lk_training.json {source}")
    return out


class DriftMonitor:
    """Expected acceptance per drafter (cached: training records are read once, learned references are kept
    after the steps they came from leave the store) and the check of a window against it."""

    def __init__(self, settings: DriftSettings | None = None) -> None:
        self.settings = settings or DriftSettings()
        self._expected: dict[str, dict[str, tuple[float, str]]] = {}

    def expected(self, store, info) -> tuple[dict[str, tuple[float, str]], str | None]:
        """({sampling mode: (expected length, where it comes from)}, why there is none yet)."""
        if info.name in self._expected:
            return self._expected[info.name], None
        by_training = training_expectation(info.name, info.num_speculative_tokens)
        if by_training and store.per_request_source:
            self._expected[info.name] = by_training
            return by_training, None
        steps = store.steps(None, info.name)
        minutes = f"{self.settings.reference_seconds / 60:g}"
        if not steps or time.monotonic() - steps[0].time < self.settings.reference_seconds:
            return (
                {},
                f"learning the expected acceptance from the drafter's first {minutes} minutes of traffic",
            )
        first = [s for s in steps if s.time - steps[0].time <= self.settings.reference_seconds]
        learned = store.summary(first)["acceptance_length"]
        if learned is None:
            return {}, f"no drafts in the drafter's first {minutes} minutes of traffic"
        found = {"all": (learned, f"the drafter's first {minutes} minutes of traffic (pooled)")}
        self._expected[info.name] = found
        return found, None

    def check(self, store) -> dict[str, Any]:
        info = store.drafter
        settings = self.settings
        out: dict[str, Any] = {
            "threshold": settings.threshold,
            "window_seconds": settings.window_seconds,
            "drafter": info.name if info else None,
            "drifting": None,
            "checks": [],
            "reason": None,
        }
        if info is None:
            out["reason"] = "speculative decoding is off"
            return out
        expected, reason = self.expected(store, info)
        if not expected:
            out["reason"] = reason
            return out
        window = store.summary(store.steps(settings.window_seconds, info.name))
        observed = {(e["aggregation"], e["sampling"]): e for e in window["acceptance_lengths"]}
        judged = []
        for mode, (value, source) in expected.items():
            entry = observed[("pooled", mode)]
            check = {
                "sampling": mode,
                "expected": value,
                "expected_source": source,
                "observed": entry["value"],
                "aggregation": "pooled",
                "num_drafts": entry["num_drafts"],
                "requests": entry.get("requests"),
                "ratio": None,
                "drifting": None,
            }
            if entry["value"] is not None and entry["num_drafts"] >= MIN_DRAFTS:
                check["ratio"] = entry["value"] / value
                check["drifting"] = check["ratio"] < settings.threshold
                judged.append(check["drifting"])
            out["checks"].append(check)
        if judged:
            out["drifting"] = any(judged)
        else:
            out["reason"] = f"fewer than {MIN_DRAFTS} drafts in the last {settings.window_seconds:g} s"
        return out
