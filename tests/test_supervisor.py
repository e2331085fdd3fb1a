"""lk-vllm serve's supervisor (serving/supervisor.py) over a stand-in for vLLM's server (tests/fake_vllm.py):
the proxy passes requests, streams and WebSockets through; a swap that needs a restart drains the requests in
flight, holds new ones (or answers 503 + Retry-After after --restart-wait), rolls back when the new server does
not start; Ctrl-C and a dying server end it. No engine: fast tier. The real restart runs in tests/test_swap.py."""

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
