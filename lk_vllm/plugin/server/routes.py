"""HTTP routes lk-vllm adds to vLLM's OpenAI server, and the ``lk_*`` Prometheus gauges.

* ``GET /v1/speculative/stats?window=60&drafter=NAME``: live statistics (DESIGN.md, "Server"), with the live
  drafter's acceptance drift check (``lk_vllm.plugin.server.drift``).
* ``GET /v1/speculative/history?seconds=600&resolution=5``: the same over time (for the dashboard).
* ``POST /v1/speculative/drafter {"path": ..., "num_speculative_tokens": K}``: swap the drafter (admin key;
  K optional, default the live one; see ``lk_vllm.plugin.server.swap``).
* ``GET /v1/speculative/capture`` and ``POST /v1/speculative/capture {"enabled": true|false}``: the traffic
  capture's counters, and turning it on or off (admin key; see ``lk_vllm.plugin.server.capture``).
* ``GET /dashboard``: the live page (static files in ``lk_vllm/plugin/server/static``, no external resources).

Routes under ``/v1`` are guarded by vLLM's own API-key middleware when an API key is set. Admin routes
additionally need the admin key (``Authorization: Bearer <admin key>`` or ``X-Admin-Key``): 401 without
credentials, 403 with wrong ones, whether or not an API key is set. The admin key and the directory swaps may
load from come from ``$LK_VLLM_ADMIN_KEY`` and ``$LK_VLLM_DRAFTERS_DIR`` (``lk-vllm serve`` sets them).
"""

from __future__ import annotations

import asyncio
import atexit
import hashlib
import json
import logging
import math
import os
import secrets
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import FileResponse, JSONResponse

from lk_vllm.atomic import write_atomic
from lk_vllm.env import ADMIN_KEY_ENV, DRAFTERS_DIR_ENV, STATS_STATE_ENV
from lk_vllm.errors import UserError
from lk_vllm.plugin.server.capture import CaptureMiddleware, CaptureSettings, TrafficCapture
from lk_vllm.plugin.server.drift import DriftMonitor, DriftSettings
from lk_vllm.plugin.server.live_stats import STORE, LiveStatsStore
from lk_vllm.plugin.server.swap import RESTART_HEADER, SwapError, swap_drafter

STATIC_DIR = Path(__file__).parent / "static"
DEFAULT_WINDOW_SECONDS = 60.0
# Where the statistics are kept over engine restarts (set by lk-vllm serve's supervisor; see serving.supervisor).

logger = logging.getLogger("lk_vllm.serving")


def _error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


def check_admin(request: Request, admin_key: str | None) -> JSONResponse | None:
    """None if the request carries the admin key, else the 401/403 response to send."""
    supplied = request.headers.get("x-admin-key")
    if supplied is None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        supplied = token if scheme.lower() == "bearer" and token else None
    if supplied is None:
        return _error(
            401,
            "admin route: send the admin key as 'Authorization: Bearer <key>' or 'X-Admin-Key'",
            **{"WWW-Authenticate": "Bearer"},
        )
    if not admin_key:
        return _error(403, "admin routes are disabled: start the server with --admin-key")
    same = secrets.compare_digest(
        hashlib.sha256(supplied.encode()).digest(), hashlib.sha256(admin_key.encode()).digest()
    )
    return None if same else _error(403, "wrong admin key")


def stats_payload(
    store: LiveStatsStore, window: float, drafter: str | None, drift: DriftMonitor | None = None
) -> dict[str, Any]:
    info = store.drafter
    selected = store.drafters_seen.get(drafter) if drafter else info
    window_summary = store.summary(store.steps(window, drafter))
    baseline = store.baseline
    payload: dict[str, Any] = {
        "drafter": selected.as_json() if selected else None,
        "live_drafter": info.name if info else None,
        "method": selected.method if selected else None,
        "num_speculative_tokens": selected.num_speculative_tokens if selected else 0,
        "sampling": selected.sampling if selected else {},
        "window_seconds": window,
        **window_summary,
        "per_request": {"source": store.per_request_source, "missing": store.per_request_missing},
        "baseline": baseline.describe() if baseline else {"kind": "none", "reason": store.baseline_error},
        "since_start": store.since_start(drafter),
        "drafters": {
            name: {**seen.as_json(), **store.since_start(name)} for name, seen in store.drafters_seen.items()
        },
    }
    if drift is not None and (drafter is None or drafter == (info.name if info else None)):
        payload["drift"] = drift.check(store)  # about the live drafter only
    return payload


def carry_statistics_over(store: LiveStatsStore, path: Path) -> None:
    """Under lk-vllm serve's supervisor, statistics outlive an engine restart: the engine this one replaced left
    its store in ``path`` (read now), and this one leaves its own there when its process exits."""
    try:
        store.merge_snapshot(json.loads(path.read_text()))
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("lk-vllm: statistics of the previous engine not restored from %s: %s", path, exc)

    atexit.register(save_statistics, store, path)


def save_statistics(store: LiveStatsStore, path: Path) -> None:
    write_atomic(path, json.dumps(store.snapshot()))


def _window(value: float | None, default: float) -> float | JSONResponse:
    if value is None:
        return default
    if not math.isfinite(value) or value <= 0:
        return _error(400, f"window must be a positive number of seconds, got {value}")
    return value


class LkRoutes:
    """The routes, bound to a store and (after init) an engine client."""

    def __init__(self, store: LiveStatsStore = STORE) -> None:
        self.store = store
        self.engine_client = None
        self.admin_key = os.environ.get(ADMIN_KEY_ENV) or None
        self.drafters_dir = os.environ.get(DRAFTERS_DIR_ENV) or None
        self.target: str | None = None
        self.swap_lock = asyncio.Lock()
        self.drift = DriftMonitor(DriftSettings.from_env())
        self.capture = TrafficCapture(CaptureSettings.from_env(), self.store)
        if os.environ.get(STATS_STATE_ENV):
            carry_statistics_over(self.store, Path(os.environ[STATS_STATE_ENV]))

    def speculation_off(self) -> JSONResponse | None:
        if self.store.drafter is None:
            return _error(404, "speculative decoding is off on this server (no --speculative-config)")
        return None

    def router(self) -> APIRouter:
        router = APIRouter()

        @router.get("/v1/speculative/stats")
        async def speculative_stats(
            window: float | None = Query(None, description="sliding window in seconds (default 60)"),
            drafter: str | None = Query(None, description="only the steps of this drafter (path or name)"),
        ):
            if (off := self.speculation_off()) is not None:
                return off
            seconds = _window(window, DEFAULT_WINDOW_SECONDS)
            if isinstance(seconds, JSONResponse):
                return seconds
            if drafter is not None and drafter not in self.store.drafters_seen:
                return _error(
                    404, f"drafter {drafter!r} never served here; known: {sorted(self.store.drafters_seen)}"
                )
            return stats_payload(self.store, seconds, drafter, self.drift)

        @router.get("/v1/speculative/history")
        async def speculative_history(
            seconds: float | None = Query(None, description="how far back (default 600)"),
            resolution: float | None = Query(None, description="interval length in seconds (default 5)"),
            drafter: str | None = Query(None),
        ):
            if (off := self.speculation_off()) is not None:
                return off
            span = _window(seconds, 600.0)
            step = _window(resolution, 5.0)
            for value in (span, step):
                if isinstance(value, JSONResponse):
                    return value
            info = self.store.drafter
            return {
                "live_drafter": info.as_json() | {"method": info.method} if info else None,
                "num_speculative_tokens": info.num_speculative_tokens if info else 0,
                "baseline": self.store.baseline is not None,
                "points": self.store.history(span, max(step, 0.5), drafter),
            }

        @router.post("/v1/speculative/drafter")
        async def swap_route(request: Request):
            if (denied := check_admin(request, self.admin_key)) is not None:
                return denied
            if (off := self.speculation_off()) is not None:
                return off
            try:
                body = await request.json()
            except Exception:
                return _error(400, 'expected a JSON body {"path": "<drafter directory>"}')
            if not isinstance(body, dict) or not isinstance(body.get("path"), str) or not body["path"]:
                return _error(400, 'expected a JSON body {"path": "<drafter directory>"}')
            k = body.get("num_speculative_tokens")
            if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
                return _error(400, f"num_speculative_tokens must be an integer >= 1, got {k!r}")
            async with self.swap_lock:
                try:
                    result = await swap_drafter(self, body["path"], k)
                except SwapError as exc:
                    return _error(exc.status, str(exc), **exc.headers)
            if result["status"] == "restart-required":  # for lk-vllm serve's supervisor (serving.supervisor)
                return JSONResponse(result, headers={RESTART_HEADER: "required"})
            return result

        @router.get("/v1/speculative/capture")
        async def capture_status(request: Request):
            if (denied := check_admin(request, self.admin_key)) is not None:
                return denied
            return self.capture.status()

        @router.post("/v1/speculative/capture")
        async def capture_switch(request: Request):
            if (denied := check_admin(request, self.admin_key)) is not None:
                return denied
            try:
                body = await request.json()
            except Exception:
                body = None
            if not isinstance(body, dict) or not isinstance(body.get("enabled"), bool):
                return _error(400, 'expected a JSON body {"enabled": true} or {"enabled": false}')
            try:
                self.capture.set_enabled(body["enabled"])
            except UserError as exc:
                return _error(409, str(exc))
            return self.capture.status()

        @router.get("/dashboard", include_in_schema=False)
        async def dashboard():
            return FileResponse(STATIC_DIR / "dashboard.html", media_type="text/html")

        @router.get("/dashboard/static/{name}", include_in_schema=False)
        async def dashboard_static(name: str):
            files = {p.name: p for p in STATIC_DIR.iterdir() if p.is_file()}
            if name not in files:  # only the files shipped in lk_vllm/plugin/server/static, by exact name
                return _error(404, "not found")
            return FileResponse(files[name])

        return router


class LkCollector:
    """Prometheus collector: the ``lk_*`` gauges, computed from the live store at scrape time."""

    def __init__(
        self,
        store: LiveStatsStore = STORE,
        window: float = DEFAULT_WINDOW_SECONDS,
        drift: DriftMonitor | None = None,
    ) -> None:
        self.store = store
        self.window = window
        self.drift = drift or DriftMonitor()

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily

        if self.store.drafter is None:
            return
        summary = self.store.summary(self.store.steps(self.window))
        nan = float("nan")
        yield GaugeMetricFamily(
            "lk_acceptance_length",
            f"Mean tokens per draft-verify step (bonus included) over the last {self.window:g} s, pooled over "
            "every step of all traffic (vLLM's aggregation)",
            value=summary["acceptance_length"] if summary["acceptance_length"] is not None else nan,
        )
        labelled = GaugeMetricFamily(
            "lk_acceptance_length_aggregated",
            f"Acceptance length over the last {self.window:g} s by aggregation (pooled: 1 + sum accepted / sum "
            "drafts; mean_of_request_means: mean of each finished request's own) and sampling mode "
            "(all, temperature_0, sampled)",
            labels=["aggregation", "sampling"],
        )
        for entry in summary["acceptance_lengths"]:
            labelled.add_metric(
                [entry["aggregation"], entry["sampling"]],
                entry["value"] if entry["value"] is not None else nan,
            )
        yield labelled
        histogram = self.store.since_start()["request_acceptance_histogram"]
        per_request = HistogramMetricFamily(
            "lk_request_acceptance_length",
            "Acceptance length of each finished request (1 + its accepted tokens / its drafts) since start",
            labels=["sampling"],
        )
        for mode, counts in histogram["counts"].items():
            cumulative, running = [], 0
            for bound, count in zip(histogram["upper_bounds"], counts, strict=True):
                running += count
                cumulative.append((str(float(bound)) if bound != "+Inf" else "+Inf", running))
            per_request.add_metric([mode], cumulative, sum_value=histogram["sums"][mode])
        yield per_request
        yield GaugeMetricFamily(
            "lk_speedup",
            f"Measured decode speed-up over the no-speculation baseline, last {self.window:g} s",
            value=summary["speedup"] if summary["speedup"] is not None else nan,
        )
        per_position = GaugeMetricFamily(
            "lk_per_position_acceptance",
            f"Acceptance rate of each draft position over the last {self.window:g} s",
            labels=["position"],
        )
        rates = summary["per_position_acceptance"] or [nan] * self.store.drafter.num_speculative_tokens
        for position, rate in enumerate(rates):
            per_position.add_metric([str(position)], rate)
        yield per_position
        yield from self.drift_metrics()

    def drift_metrics(self):
        from prometheus_client.core import GaugeMetricFamily

        drift = self.drift.check(self.store)
        nan = float("nan")
        window = f"the last {drift['window_seconds']:g} s"
        yield GaugeMetricFamily(
            "lk_acceptance_drift",
            f"1 when the live drafter's acceptance length over {window} is below {drift['threshold']:g} x its "
            "expected one (lk_training.json or its first minutes of traffic), 0 when not, NaN when not judged yet",
            value=nan if drift["drifting"] is None else float(drift["drifting"]),
        )
        ratio = GaugeMetricFamily(
            "lk_acceptance_drift_ratio",
            f"Observed / expected acceptance length over {window}, per sampling mode",
            labels=["sampling"],
        )
        expected = GaugeMetricFamily(
            "lk_expected_acceptance_length",
            "The live drafter's expected acceptance length, per sampling mode",
            labels=["sampling"],
        )
        for check in drift["checks"]:
            ratio.add_metric([check["sampling"]], nan if check["ratio"] is None else check["ratio"])
            expected.add_metric([check["sampling"]], check["expected"])
        yield ratio
        yield expected


_COLLECTOR: LkCollector | None = None


def register_collector(store: LiveStatsStore = STORE, drift: DriftMonitor | None = None) -> LkCollector:
    """Add the lk gauges to the registry vLLM's /metrics serves (once per process)."""
    global _COLLECTOR
    if _COLLECTOR is None:
        from prometheus_client import REGISTRY

        _COLLECTOR = LkCollector(store, drift=drift)
        REGISTRY.register(_COLLECTOR)
    return _COLLECTOR


def attach(app: FastAPI, routes: LkRoutes) -> None:
    app.include_router(routes.router())
    if routes.capture.settings.directory is not None:  # opt-in: without the flag no request is ever looked at
        app.add_middleware(CaptureMiddleware, capture=routes.capture)
    register_collector(routes.store, routes.drift)
