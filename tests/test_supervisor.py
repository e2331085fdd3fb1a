"""lk-vllm serve's supervisor (serving/supervisor.py) over a stand-in for vLLM's server (tests/fake_vllm.py): the
proxy passes requests, streams and WebSockets through; a swap that needs a restart drains the requests in flight,
holds new ones (or answers 503 + Retry-After after --restart-wait), rolls back when the new server does not start;
Ctrl-C and a dying server end it. No engine: fast tier. The real restart runs in tests/test_serving_swap.py."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from serving.client import HTTPError, request_json
from serving.launcher import ServerHandle, free_port, wait_healthy

pytestmark = pytest.mark.e2e

FAKE = Path(__file__).with_name("fake_vllm.py")


@pytest.fixture
def supervisor(tmp_path):
    handles = []

    def start(*flags: str) -> ServerHandle:
        port = free_port()
        log = tmp_path / f"supervisor-{port}.log"
        with open(log, "ab") as out:
            process = subprocess.Popen(
                [sys.executable, str(FAKE), "supervise", "--port", str(port), *flags],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        handle = ServerHandle(url=f"http://127.0.0.1:{port}", process=process, log_path=log)
        handles.append(handle)
        wait_healthy(handle.url, process, timeout=60)
        return handle

    yield start
    for handle in handles:
        handle.stop()


def stream_lines(url: str, path: str, opened: concurrent.futures.Future | None = None) -> list[str]:
    """The ``data:`` payloads of an SSE response, read as they arrive."""
    lines = []
    with urllib.request.urlopen(url + path, timeout=60) as response:
        for raw in response:
            line = raw.decode().strip()
            if line.startswith("data:"):
                lines.append(line[5:].strip())
                if opened is not None and not opened.done():
                    opened.set_result(lines[0])
    return lines


def swap(url: str, path: str) -> dict:
    return request_json(url, "/v1/speculative/drafter", {"path": path})


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def restarting(url: str) -> bool:
    with urllib.request.urlopen(url + "/health", timeout=5) as response:
        return response.headers.get("X-LK-Engine") == "restarting"


def test_requests_streams_and_websockets_pass_through(supervisor, tmp_path):
    server = supervisor()
    request = urllib.request.Request(
        server.url + "/echo?a=1&b=x%20y",
        data=b'{"k": "v"}',
        method="PUT",
        headers={"Authorization": "Bearer key", "X-Custom": "1", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        echoed = json.load(response)
        assert response.headers["X-Upstream"] == "fake"
    assert (
        echoed["method"] == "PUT" and echoed["path"] == "/echo" and echoed["query"] == {"a": "1", "b": "x y"}
    )
    assert echoed["body"] == '{"k": "v"}'
    assert echoed["headers"]["Authorization"] == "Bearer key" and echoed["headers"]["X-Custom"] == "1"
    assert echoed["headers"]["Content-Type"] == "application/json"

    # A stream reaches the client event by event: its first event arrives while the rest is still held back
    # by the server (a buffering proxy would never deliver it, and the future would time out).
    gate = tmp_path / "gate"
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        opened = concurrent.futures.Future()
        lines = pool.submit(stream_lines, server.url, f"/stream?n=4&gate={gate}", opened)
        assert json.loads(opened.result(timeout=30))["i"] == 0
        gate.touch()
        assert [json.loads(x)["i"] for x in lines.result(timeout=30)[:-1]] == [0, 1, 2, 3]

    async def websocket():
        import aiohttp

        async with aiohttp.ClientSession() as session, session.ws_connect(server.url + "/ws") as ws:
            await ws.send_str("hello")
            return (await ws.receive()).data

    assert asyncio.run(websocket()).endswith(":hello")


def test_restart_swap_drains_in_flight_and_holds_new_requests(supervisor, tmp_path):
    server = supervisor()
    first = request_json(server.url, "/whoami")
    gate = tmp_path / "gate"
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        opened = concurrent.futures.Future()
        in_flight = pool.submit(stream_lines, server.url, f"/stream?n=6&gate={gate}", opened)
        opened.result(timeout=30)
        swapped = pool.submit(swap, server.url, "restart:second")
        wait_until(lambda: restarting(server.url))
        held = pool.submit(request_json, server.url, "/whoami")
        time.sleep(1.0)
        assert (
            not held.done() and not swapped.done()
        )  # the restart waits for the stream, new requests wait for it
        gate.touch()
        lines = in_flight.result(timeout=30)
        result = swapped.result(timeout=60)
        after = held.result(timeout=60)
    assert lines[-1] == "[DONE]" and len(lines) == 7  # the stream in flight finished on the old server
    assert {json.loads(x)["pid"] for x in lines[:-1]} == {first["pid"]}
    assert result["status"] == "swapped" and result["mode"] == "engine restart"
    assert result["previous"] == "first" and result["drafter"] == {"path": "second"}
    assert (
        result["restart"]["drained_requests"] >= 1 and result["restart"]["waited_requests"] >= 1
    )  # + /health polls
    assert result["restart"]["rejected_requests"] == 0
    assert after["spec"]["model"] == "second" and after["pid"] != first["pid"]
    assert not restarting(server.url)


def test_requests_past_the_restart_wait_get_503_with_retry_after(supervisor):
    server = supervisor("--restart-wait", "0.5")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        swapped = pool.submit(swap, server.url, "restart:slow")  # the new server takes 4 s to start
        wait_until(lambda: restarting(server.url))
        with pytest.raises(HTTPError) as refused:
            request_json(server.url, "/whoami")
        result = swapped.result(timeout=60)
    assert refused.value.status == 503 and "restarting" in refused.value.body
    assert result["restart"]["rejected_requests"] >= 1
    assert request_json(server.url, "/whoami")["spec"]["model"] == "slow"


def test_retry_after_header_is_a_number_of_seconds(supervisor):
    server = supervisor("--restart-wait", "0")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        swapped = pool.submit(swap, server.url, "restart:slow")
        wait_until(lambda: restarting(server.url))
        try:
            urllib.request.urlopen(server.url + "/whoami", timeout=30)
            raise AssertionError("expected 503")
        except urllib.error.HTTPError as error:
            assert error.code == 503 and int(error.headers["Retry-After"]) >= 1
        swapped.result(timeout=60)


def test_a_new_server_that_does_not_start_is_rolled_back(supervisor):
    server = supervisor()
    first = request_json(server.url, "/whoami")
    with pytest.raises(HTTPError) as failed:
        swap(server.url, "restart:fail")
    assert failed.value.status == 422 and "previous drafter serves again" in failed.value.body
    assert "TypeError: unhashable type: 'dict'" in failed.value.body  # the engine's cause, not vLLM's wrapper
    again = request_json(server.url, "/whoami")
    assert again["spec"]["model"] == "first" and again["pid"] != first["pid"]


def test_refused_and_in_place_swaps_pass_through_without_restart(supervisor):
    server = supervisor()
    pid = request_json(server.url, "/whoami")["pid"]
    with pytest.raises(HTTPError) as refused:
        swap(server.url, "bad")
    assert refused.value.status == 404 and "not found" in refused.value.body
    assert swap(server.url, "same-shape")["mode"] == "in-place weight reload"
    assert request_json(server.url, "/whoami")["pid"] == pid


def test_swap_is_called_off_when_requests_do_not_drain(supervisor, tmp_path):
    server = supervisor("--drain-timeout", "1")
    pid = request_json(server.url, "/whoami")["pid"]
    gate = tmp_path / "gate"
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        opened = concurrent.futures.Future()
        in_flight = pool.submit(stream_lines, server.url, f"/stream?n=3&gate={gate}", opened)
        opened.result(timeout=30)
        with pytest.raises(HTTPError) as called_off:
            swap(server.url, "restart:second")
        gate.touch()
        assert in_flight.result(timeout=30)[-1] == "[DONE]"
    assert called_off.value.status == 503 and "called off" in called_off.value.body
    assert request_json(server.url, "/whoami")["pid"] == pid


def test_ctrl_c_stops_the_server_and_a_dying_server_ends_the_supervisor(supervisor):
    import psutil

    server = supervisor()
    child = request_json(server.url, "/whoami")["pid"]
    server.process.send_signal(signal.SIGINT)
    assert server.process.wait(30) == 0
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE

    dying = supervisor()
    with pytest.raises((HTTPError, OSError)):
        urllib.request.urlopen(dying.url + "/die", timeout=30)
    assert dying.process.wait(30) == 7


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


@pytest.mark.unit
def test_swap_route_asks_the_supervisor_for_a_restart_only_when_supervised(tmp_path, monkeypatch):
    """vLLM's side of a restart swap (lk_vllm.plugin.server.swap): under the supervisor a drafter of another architecture is
    checked and answered with the speculative config to restart with; unusable ones are 4xx; without the
    supervisor the same request is 409, and the live drafter never changes."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from train_helpers import make_tiny_target, make_valid_drafter

    from lk_vllm.plugin.server import routes as api
    from lk_vllm.plugin.server import swap
    from lk_vllm.plugin.server.live_stats import DrafterInfo, LiveStatsStore
    from lk_vllm.target_model import TargetModel

    drafters = tmp_path / "drafters"
    target = TargetModel(make_tiny_target(tmp_path / "target", layers=2))
    for name, heads in (("medusa", 2), ("one_head", 1)):
        make_valid_drafter(drafters, name, target, architecture="medusa", num_heads=heads)
    monkeypatch.setenv(api.ADMIN_KEY_ENV, "admin")
    monkeypatch.setenv(api.DRAFTERS_DIR_ENV, str(drafters))
    store = LiveStatsStore()
    store.set_drafter(
        DrafterInfo(name="ngram", method="ngram", architecture="ngram", num_speculative_tokens=2)
    )
    routes = api.LkRoutes(store)
    app = FastAPI()
    app.include_router(routes.router())
    client = TestClient(app)

    def post(path, **extra):
        return client.post(
            "/v1/speculative/drafter", json={"path": path, **extra}, headers={"X-Admin-Key": "admin"}
        )

    unsupervised = post("medusa")
    assert unsupervised.status_code == 409 and "no weights to swap" in unsupervised.json()["error"]
    monkeypatch.setenv(swap.SUPERVISED_ENV, "1")
    planned = post("medusa")
    assert planned.status_code == 200 and planned.headers[swap.RESTART_HEADER] == "required"
    plan = planned.json()
    assert plan["status"] == "restart-required" and plan["previous"] == "ngram"
    assert plan["speculative_config"] == {
        "method": "medusa",
        "model": str(drafters / "medusa"),
        "num_speculative_tokens": 2,
        "rejection_sample_method": "standard",
    }
    assert post("one_head").status_code == 400 and "1 heads" in post("one_head").json()["error"]
    assert post("medusa", num_speculative_tokens=0).status_code == 400
    assert post("medusa", num_speculative_tokens=3).status_code == 400  # more than its 2 heads
    assert store.drafter.name == "ngram"


@pytest.mark.unit
def test_a_taken_port_is_a_one_line_error_before_anything_starts():
    import socket

    from fake_vllm import FakeCommand

    from lk_vllm.errors import UserError
    from serving.supervisor import Supervisor

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        supervisor = Supervisor(FakeCommand(), host="127.0.0.1", port=taken.getsockname()[1])
        with pytest.raises(UserError, match="cannot listen there"):
            supervisor.run()
    assert not supervisor.workdir.exists() and supervisor.child is None


@pytest.mark.unit
def test_root_cause_is_the_engines_exception_not_vllms_wrapper():
    from serving.supervisor import root_cause

    log = (
        'INFO starting\n(EngineCore pid=7) ERROR   File "x.py", line 3, in get_rope\n'
        "(EngineCore pid=7) ERROR TypeError: unhashable type: 'dict'\n"
        "Traceback (most recent call last):\n"
        "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}\n"
    )
    assert root_cause(log) == "TypeError: unhashable type: 'dict'"
    assert root_cause("pydantic_core._pydantic_core.ValidationError: 1 validation error") == (
        "pydantic_core._pydantic_core.ValidationError: 1 validation error"
    )
    assert root_cause("INFO all fine\nWARNING no errors here\n") is None
