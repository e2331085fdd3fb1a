"""The HTTP routes lk-vllm adds to vLLM's server (lk_vllm.plugin.server.routes), on a FastAPI test client
without an engine: the stats and history fields, the admin key, the Prometheus collector, the dashboard's
local files, the capture switch, and the statistics carried over an engine restart."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from server_helpers import ADMIN, TRAFFIC, make_store

from lk_vllm.plugin.server import capture as capture_module
from lk_vllm.plugin.server.live_stats import LiveStatsStore

pytestmark = pytest.mark.unit


ROOT = Path(__file__).resolve().parents[1]


def test_stats_route_fields_and_window_validation(app_with_routes):
    client, routes, *_ = app_with_routes
    routes.store.record_step(
        batch_size=1,
        output_tokens=3,
        timed=False,
        num_drafts=1,
        num_draft_tokens=2,
        num_accepted_tokens=2,
        accepted_per_position=[1, 1],
    )
    body = client.get("/v1/speculative/stats").json()
    for field in (
        "drafter",
        "method",
        "num_speculative_tokens",
        "sampling",
        "acceptance_length",
        "per_position_acceptance",
        "draft_tokens",
        "accepted_tokens",
        "window_seconds",
        "speedup",
        "baseline",
        "since_start",
    ):
        assert field in body, field
    assert body["acceptance_length"] == pytest.approx(3.0) and body["window_seconds"] == 60.0
    assert body["drafter"]["architecture"] == "LlamaForCausalLMEagle3"
    assert client.get("/v1/speculative/stats?window=-1").status_code == 400
    assert client.get("/v1/speculative/stats?window=abc").status_code == 422
    assert client.get("/v1/speculative/stats?drafter=nope").status_code == 404
    history = client.get("/v1/speculative/history?seconds=60&resolution=5").json()
    assert len(history["points"]) == 1 and history["points"][0]["acceptance_length"] == pytest.approx(3.0)


def test_stats_route_answers_404_when_speculation_is_off():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lk_vllm.plugin.server import routes as api

    app = FastAPI()
    app.include_router(api.LkRoutes(LiveStatsStore()).router())
    response = TestClient(app).get("/v1/speculative/stats")
    assert response.status_code == 404 and "speculative decoding is off" in response.json()["error"]


def test_admin_route_needs_the_admin_key(app_with_routes):
    client, routes, *_ = app_with_routes
    assert client.post("/v1/speculative/drafter", json={"path": "x"}).status_code == 401
    assert (
        client.post("/v1/speculative/drafter", json={"path": "x"}, headers={"X-Admin-Key": "no"}).status_code
        == 403
    )
    wrong_bearer = client.post(
        "/v1/speculative/drafter", json={"path": "x"}, headers={"Authorization": "Bearer no"}
    )
    assert wrong_bearer.status_code == 403
    routes.admin_key = None  # no admin key configured: admin routes are closed
    assert client.post("/v1/speculative/drafter", json={"path": "x"}, headers=ADMIN).status_code == 403
    assert routes.engine_client.calls == []


def _scrape(store) -> str:
    """What /metrics shows of the lk collector for this store."""
    from prometheus_client import CollectorRegistry, generate_latest

    from lk_vllm.plugin.server.routes import LkCollector

    registry = CollectorRegistry()
    registry.register(LkCollector(store))
    return generate_latest(registry).decode()


def test_metrics_collector_reports_the_window(app_with_routes):
    _, routes, *_ = app_with_routes
    routes.store.record_step(
        batch_size=1,
        output_tokens=3,
        timed=False,
        num_drafts=2,
        num_draft_tokens=4,
        num_accepted_tokens=3,
        accepted_per_position=[2, 1],
    )
    text = _scrape(routes.store)
    assert "lk_acceptance_length 2.5" in text
    assert 'lk_acceptance_length_aggregated{aggregation="pooled",sampling="all"} 2.5' in text
    assert 'lk_per_position_acceptance{position="0"} 1.0' in text
    assert 'lk_per_position_acceptance{position="1"} 0.5' in text
    assert "lk_speedup NaN" in text  # no baseline: not a number rather than a made-up one


def test_dashboard_uses_only_local_files(app_with_routes):
    client, *_ = app_with_routes
    page = client.get("/dashboard")
    assert page.status_code == 200 and "<svg" in page.text
    for name in ("dashboard.js", "dashboard.css"):
        response = client.get(f"/dashboard/static/{name}")
        assert response.status_code == 200
    assert client.get("/dashboard/static/..%2Froutes.py").status_code == 404
    for path in (ROOT / "lk_vllm" / "plugin" / "server" / "static").iterdir():
        urls = re.findall(r"https?://[^\s\"')]+", path.read_text())
        assert urls in ([], ["http://www.w3.org/2000/svg"]), (path.name, urls)


def test_metrics_collector_labels_both_aggregations_and_the_request_histogram(app_with_routes):
    client, routes, *_ = app_with_routes
    routes.store.record_step(
        batch_size=2,
        output_tokens=26,
        timed=False,
        num_drafts=12,
        num_draft_tokens=24,
        num_accepted_tokens=14,
        accepted_per_position=[9, 5],
        requests=[(10, 10, "temperature_0"), (2, 4, "sampled")],
    )
    text = _scrape(routes.store)
    assert 'lk_acceptance_length_aggregated{aggregation="mean_of_request_means",sampling="all"} 2.5' in text
    assert 'lk_acceptance_length_aggregated{aggregation="pooled",sampling="sampled"} 3.0' in text
    assert 'lk_request_acceptance_length_bucket{le="1.75",sampling="all"} 0.0' in text
    assert 'lk_request_acceptance_length_bucket{le="2.0",sampling="all"} 1.0' in text
    assert 'lk_request_acceptance_length_bucket{le="+Inf",sampling="all"} 2.0' in text
    assert 'lk_request_acceptance_length_sum{sampling="all"} 5.0' in text
    body = client.get("/v1/speculative/stats").json()
    assert body["acceptance_length_mean_of_request_means"] == pytest.approx(2.5)
    assert {"aggregation", "sampling", "value", "source"} <= set(body["acceptance_lengths"][0])


def test_the_capture_route_is_admin_only(tmp_path, monkeypatch):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lk_vllm.plugin.server import routes as api

    monkeypatch.setenv(api.ADMIN_KEY_ENV, "admin-secret")
    monkeypatch.setenv(
        capture_module.CAPTURE_ENV, json.dumps({"directory": str(tmp_path / "c"), "quantile": 0.3})
    )
    routes = api.LkRoutes(make_store(TRAFFIC))
    app = FastAPI()
    api.attach(app, routes)
    client = TestClient(app)
    assert client.get("/v1/speculative/capture").status_code == 401
    assert client.get("/v1/speculative/capture", headers={"X-Admin-Key": "wrong"}).status_code == 403
    admin = {"X-Admin-Key": "admin-secret"}
    status = client.get("/v1/speculative/capture", headers=admin).json()
    assert status["enabled"] and status["quantile"] == 0.3 and status["captured"] == 0
    assert client.post("/v1/speculative/capture", json={"enabled": False}).status_code == 401
    assert client.post("/v1/speculative/capture", json={"enabled": "no"}, headers=admin).status_code == 400
    assert (
        client.post("/v1/speculative/capture", json={"enabled": False}, headers=admin).json()["enabled"]
        is False
    )
    monkeypatch.delenv(capture_module.CAPTURE_ENV)
    unconfigured = TestClient(FastAPI())
    routes = api.LkRoutes(make_store(TRAFFIC))
    api.attach(unconfigured.app, routes)
    reply = unconfigured.post("/v1/speculative/capture", json={"enabled": True}, headers=admin)
    assert reply.status_code == 409 and "--capture-low-acceptance" in reply.json()["error"]


@pytest.mark.unit
def test_statistics_survive_a_restart_per_drafter(tmp_path, monkeypatch):
    """The old server's store, written at its exit, is merged into the new server's: totals, windows and the
    per-drafter split are those of one store that saw every step."""
    from lk_vllm.plugin.server import routes as api
    from lk_vllm.plugin.server.live_stats import DrafterInfo, LiveStatsStore

    def step(store, accepted):
        store.record_step(
            batch_size=2,
            output_tokens=1 + sum(accepted),
            timed=True,
            num_drafts=1,
            num_draft_tokens=len(accepted),
            num_accepted_tokens=sum(accepted),
            accepted_per_position=accepted,
        )

    eagle = DrafterInfo(
        name="/d/eagle", method="eagle3", architecture="LlamaForCausalLMEagle3", num_speculative_tokens=2
    )
    medusa = DrafterInfo(
        name="/d/medusa", method="medusa", architecture="MedusaModel", num_speculative_tokens=2
    )
    reference, old, new = LiveStatsStore(), LiveStatsStore(), LiveStatsStore()
    for store in (reference, old):
        store.set_drafter(eagle)
        for accepted in ([1, 0], [1, 1], [0, 0]):
            step(store, accepted)
    path = tmp_path / "statistics.json"
    api.save_statistics(old, path)
    new.set_drafter(medusa)  # the new engine's stat logger comes first, then the routes read the file
    monkeypatch.setattr(api.atexit, "register", lambda *a: None)
    api.carry_statistics_over(new, path)
    reference.set_drafter(medusa)
    for store in (reference, new):
        step(store, [1, 0])
    assert new.drafter.name == "/d/medusa" and set(new.drafters_seen) == {"/d/eagle", "/d/medusa"}
    for name in (None, "/d/eagle", "/d/medusa"):
        for field in (
            "acceptance_length",
            "per_position_acceptance",
            "draft_tokens",
            "accepted_tokens",
            "steps",
        ):
            assert new.since_start(name)[field] == reference.since_start(name)[field], (name, field)
            assert (
                new.summary(new.steps(600, name))[field]
                == reference.summary(reference.steps(600, name))[field]
            )
    assert new.since_start("/d/eagle")["accepted_tokens"] == 3
