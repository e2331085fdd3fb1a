"""``lk-vllm serve``'s supervisor: vLLM's OpenAI server as a child process behind a small HTTP proxy.

Why: a drafter of another architecture or shape needs a new engine (vLLM builds the speculative config into it),
and vLLM's server cannot replace its engine while it runs (its shutdown handling and watchdog hold the first
engine client). So ``lk-vllm serve`` listens on the public address itself and runs vLLM's own, unmodified
server (``vllm.entrypoints.launchers.api_server.entry``) on a private Unix socket. Every request, every vLLM
route (streaming and WebSockets included), passes through byte for byte. When a swap needs a restart:

1. the swap route in vLLM (``lk_vllm.plugin.server.swap``) validates the new drafter and answers with the speculative config to
   restart with (header ``X-LK-Restart``; the client never sees that answer);
2. new requests are held here (they wait; after ``--restart-wait`` seconds they get 503 with ``Retry-After``);
   ``/health`` answers 200 ``restarting`` at once, so load balancers keep sending traffic, which waits;
3. requests in flight finish (drain; if they do not within ``--drain-timeout`` the swap is called off, 503);
4. the old server stops (its live statistics are written to a file, ``lk_vllm.plugin.server.routes.carry_statistics_over``), the
   new one starts with the new speculative config and reads them back: statistics stay per drafter;
5. held requests go to the new engine; the swap answers 200 with the restart's timings and counts. If the new
   engine does not start, the previous config is started again and the swap answers 422.

Nothing is ever cut off mid-stream by a swap. ``--no-supervisor`` runs vLLM's server alone (no proxy hop; swaps
that need a restart are then refused).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from lk_vllm.env import STATS_STATE_ENV, SUPERVISED_ENV
from lk_vllm.errors import UserError
from lk_vllm.plugin.server.swap import RESTART_HEADER

SWAP_ROUTE = "/v1/speculative/drafter"
# Headers that belong to one connection, not to the request or response (RFC 9110 §7.6.1), plus those recomputed.
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
}
_WEBSOCKET_HANDSHAKE = {
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-extensions",
    "sec-websocket-protocol",
    "sec-websocket-accept",
}


# An exception line of a Python traceback or log ("TypeError: unhashable type: 'dict'").
_EXCEPTION_LINE = re.compile(r"\b((?:[A-Za-z_]\w*\.)*[A-Z]\w*(?:Error|Exception)): (.+)")
# vLLM's API server reports a dead engine with its own exception after the engine's traceback.
_WRAPPER_MESSAGES = ("root cause above", "Engine core initialization failed")
_LOG_TAIL_CHARS = 1 << 16


def root_cause(log: str) -> str | None:
    """The exception that stopped vLLM, from the tail of its output: the last exception line that is not
    vLLM's own "see root cause above" wrapper (the engine's traceback precedes the API server's)."""
    causes = [
        f"{m.group(1)}: {m.group(2).strip()}" for m in map(_EXCEPTION_LINE.search, log.splitlines()) if m
    ]
    causes = [c for c in causes if not any(w in c for w in _WRAPPER_MESSAGES)]
    return causes[-1][:400] if causes else None


class ChildFailed(Exception):
    """vLLM's server did not come up (or died while starting)."""


class Stopping(Exception):
    """The supervisor was told to stop (SIGINT/SIGTERM) while waiting for something."""


class SwapFailed(Exception):
    def __init__(self, status: int, message: str, **headers: str) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers


def _say(message: str) -> None:
    print(f"lk-vllm serve: {message}", file=sys.stderr, flush=True)


def _error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers or None)


def _request_headers(request: web.Request, drop: set[str] = frozenset()) -> list[tuple[str, str]]:
    return [
        (k, v) for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP and k.lower() not in drop
    ]


def _response_headers(upstream: aiohttp.ClientResponse) -> list[tuple[str, str]]:
    return [(k, v) for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP]


def _descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _reap(processes: list, timeout: float) -> None:
    """Wait for ``processes`` to exit; SIGKILL those still there after ``timeout``."""
    import psutil

    _, alive = psutil.wait_procs(processes, timeout=timeout)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(alive, timeout=10)


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and everything it started (vLLM's engine-core processes)."""
    import psutil

    try:
        processes = [*_descendants(pid), psutil.Process(pid)]
    except psutil.NoSuchProcess:
        return
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it if the supervisor dies without stopping it (Linux)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Supervisor:
    """Runs vLLM's server for a :class:`serving.launcher.ServerCommand` and proxies the public address to it."""

    def __init__(
        self,
        command,
        *,
        host: str,
        port: int,
        restart_wait: float = 300.0,
        drain_timeout: float = 300.0,
        start_timeout: float = 1800.0,
        stop_timeout: float = 120.0,
    ) -> None:
        if restart_wait < 0 or drain_timeout < 0:
            raise UserError("--restart-wait and --drain-timeout: expected seconds >= 0")
        self.command = command
        self.spec = command.speculative_config
        self.host, self.port = host, port
        self.restart_wait, self.drain_timeout = restart_wait, drain_timeout
        self.start_timeout, self.stop_timeout = start_timeout, stop_timeout
        self.workdir = Path(
            tempfile.mkdtemp(prefix="lk-vllm-serve-")
        )  # private (0700): the Unix sockets live here
        self.generation = 0
        self.child: asyncio.subprocess.Process | None = None
        self.session: aiohttp.ClientSession | None = None
        self.expected_exits: set[int] = set()
        self.exit_code = 0
        self.in_flight = 0
        self.restarting = False
        self.restart_started = 0.0
        self.last_start_seconds = 60.0
        self.waited = 0  # requests that arrived while the engine was restarting
        self.rejected = 0  # ... and got 503 after --restart-wait
        self.url: str | None = None
        self.log_tail = ""  # the last output of the current vLLM server
        self.forwarding: list[asyncio.Task] = []

    # ------------------------------------------------------------------------------------------------- running
    def bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise UserError(
                f"--host {self.host} --port {self.port}: cannot listen there ({exc.strerror})"
            ) from None
        return sock

    def run(self) -> int:
        """Serve until SIGINT/SIGTERM (or until vLLM's server dies); returns the exit code."""
        try:
            import uvloop

            run = uvloop.run
        except ImportError:  # pragma: no cover - vLLM depends on uvloop
            run = asyncio.run
        try:
            sock = self.bind()  # before the engine starts: a taken port fails now, not after a minute
            try:
                return run(self.main(sock))
            finally:
                sock.close()
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)

    async def main(self, sock: socket.socket) -> int:
        self.ready = asyncio.Event()
        self.idle = asyncio.Event()
        self.idle.set()
        self.stop = asyncio.Event()
        self.swap_lock = asyncio.Lock()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop.set)
        try:
            await self.start_child(self.spec)
        except ChildFailed as exc:
            _say(f"error: {exc}")
            return 1
        except Stopping:
            await self.stop_child()
            return 130
        app = web.Application(client_max_size=0)  # no body limit of its own: vLLM's server decides
        app.router.add_route("*", "/{tail:.*}", self.handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        await web.SockSite(runner, sock).start()
        host, port = sock.getsockname()[:2]
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
        self.ready.set()
        _say(f"listening on {self.url} (vLLM's server behind lk-vllm's restart supervisor)")
        await self.stop.wait()
        _say("shutting down")
        await self.stop_child()
        await runner.cleanup()
        return self.exit_code

    # ---------------------------------------------------------------------------------------- vLLM's server
    async def start_child(self, spec: dict[str, Any] | None) -> None:
        """Start vLLM's server with ``spec`` on a fresh Unix socket and wait until it is healthy."""
        self.generation += 1
        path = self.workdir / f"vllm-{self.generation}.sock"
        argv = self.command.vllm_argv(spec, ["--uds", str(path)])
        env = {
            **self.command.env,
            SUPERVISED_ENV: "1",
            STATS_STATE_ENV: str(self.workdir / "statistics.json"),
        }
        what = f"{spec.get('method')} {spec.get('model') or ''}".strip() if spec else "no speculation"
        _say(f"starting vLLM's server ({what})")
        started = time.monotonic()
        child = await asyncio.create_subprocess_exec(
            *argv,
            env=env,
            preexec_fn=_die_with_parent,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        loop = asyncio.get_running_loop()
        self.log_tail = ""
        self.forwarding = [
            loop.create_task(self.pass_output(child.stdout, sys.stdout)),
            loop.create_task(self.pass_output(child.stderr, sys.stderr)),
        ]
        loop.create_task(self.watch(child))
        session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=str(path), limit=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=30),
            auto_decompress=False,  # bytes pass through as vLLM sent them
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        )
        try:
            await self.wait_healthy(child, session, started)
        except BaseException:
            await self.stop_child(child, session)
            raise
        self.child, self.session = child, session
        self.last_start_seconds = time.monotonic() - started
        _say(f"vLLM's server is ready after {self.last_start_seconds:.0f} s")

    async def wait_healthy(self, child, session: aiohttp.ClientSession, started: float) -> None:
        while True:
            if child.returncode is not None:
                with contextlib.suppress(TimeoutError):  # the rest of its output, for the cause
                    await asyncio.wait_for(asyncio.gather(*self.forwarding), 10)
                cause = root_cause(self.log_tail)
                raise ChildFailed(
                    f"vLLM's server exited with code {child.returncode} while starting"
                    + (f": {cause} (its log is above)" if cause else " (its log is above)")
                )
            if self.stop.is_set():
                raise Stopping
            if time.monotonic() - started > self.start_timeout:
                raise ChildFailed(f"vLLM's server was not healthy after {self.start_timeout:.0f} s")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
                async with session.get(
                    "http://vllm/health", timeout=aiohttp.ClientTimeout(total=5)
                ) as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.5)

    async def pass_output(self, stream: asyncio.StreamReader, out) -> None:
        """Pass vLLM's output through unchanged, keeping its tail for ``root_cause``."""
        while chunk := await stream.read(1 << 16):
            text = chunk.decode(errors="replace")
            if hasattr(out, "buffer"):
                out.buffer.write(chunk)
            else:  # a replaced sys.stdout (pytest's capture)
                out.write(text)
            out.flush()
            self.log_tail = (self.log_tail + text)[-_LOG_TAIL_CHARS:]

    async def watch(self, child) -> None:
        """vLLM's server exiting on its own (engine death) ends the supervisor with its exit code, as without it."""
        code = await child.wait()
        if child.pid not in self.expected_exits and child is self.child:
            _say(f"vLLM's server exited with code {code}")
            self.exit_code = code or 1
            self.stop.set()

    async def stop_child(self, child=None, session: aiohttp.ClientSession | None = None) -> None:
        """SIGINT (vLLM's own graceful shutdown), then SIGKILL of its process tree after ``stop_timeout``."""
        if child is None:
            child, session = self.child, self.session
        if child is None:
            return
        self.expected_exits.add(child.pid)
        if child.returncode is None:
            engines = _descendants(child.pid)
            child.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(child.wait(), self.stop_timeout)
            except TimeoutError:
                _say(f"vLLM's server did not stop within {self.stop_timeout:.0f} s; killing it")
                _kill_tree(child.pid)
                await child.wait()
            # The engine-core processes must be gone too before another engine starts (on a GPU they hold its memory).
            await asyncio.get_running_loop().run_in_executor(None, _reap, engines, self.stop_timeout)
        if session is not None:
            await session.close()

    # --------------------------------------------------------------------------------------------- proxying
    def retry_after(self) -> str:
        """Seconds until the restart is expected to be over (from the last engine start), at least 1."""
        remaining = self.last_start_seconds - (time.monotonic() - self.restart_started)
        return str(max(1, math.ceil(remaining)))

    async def admit(self) -> web.Response | None:
        """None when the request may go through now; while the engine restarts, wait for it (up to
        ``--restart-wait``), then the 503 to send."""
        if self.ready.is_set():
            return None
        self.waited += 1
        deadline = time.monotonic() + self.restart_wait
        while not self.ready.is_set():
            if self.stop.is_set():
                return _error(503, "the server is shutting down")
            try:
                await asyncio.wait_for(self.ready.wait(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                self.rejected += 1
                return _error(
                    503,
                    f"the engine is restarting with a new drafter and was not back within "
                    f"{self.restart_wait:g} s; retry later",
                    **{"Retry-After": self.retry_after()},
                )
        return None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.method == "POST" and request.path == SWAP_ROUTE:
            return await self.swap(request)
        if self.restarting and request.path == "/health":
            return web.Response(text="restarting", headers={"X-LK-Engine": "restarting"})
        if (refused := await self.admit()) is not None:
            return refused
        self.in_flight += 1  # no await between admit() and here: a restart cannot start in between
        self.idle.clear()
        try:
            if request.headers.get("Upgrade", "").lower() == "websocket":
                return await self.forward_websocket(request)
            return await self.forward(request)
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self.idle.set()

    def upstream_url(self, request: web.Request) -> str:
        return f"http://vllm{request.rel_url}"

    async def forward(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        try:
            upstream = await self.session.request(
                request.method,
                self.upstream_url(request),
                data=body or None,
                headers=_request_headers(request),
                allow_redirects=False,
            )
        except (TimeoutError, aiohttp.ClientConnectionError) as exc:
            return _error(502, f"vLLM's server did not answer: {exc}")
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        for key, value in _response_headers(upstream):
            response.headers.add(key, value)
        if upstream.content_length is not None and "chunked" not in upstream.headers.get(
            "Transfer-Encoding", ""
        ):
            response.content_length = upstream.content_length
        try:
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():  # as it arrives: streams stay streams
                await response.write(chunk)
            await response.write_eof()
        except ConnectionResetError:
            pass  # the client went away; closing the upstream connection below makes vLLM abort the request
        finally:
            if upstream.content.at_eof():
                upstream.release()
            else:
                upstream.close()
        return response

    async def forward_websocket(self, request: web.Request) -> web.StreamResponse:
        protocols = [
            p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()
        ]
        try:
            upstream = await self.session.ws_connect(
                self.upstream_url(request),
                protocols=protocols,
                headers=_request_headers(request, drop=_WEBSOCKET_HANDSHAKE),
            )
        except aiohttp.WSServerHandshakeError as exc:
            return _error(exc.status, f"vLLM's server refused the WebSocket: {exc.message}")
        except (TimeoutError, aiohttp.ClientConnectionError) as exc:
            return _error(502, f"vLLM's server did not answer: {exc}")
        downstream = web.WebSocketResponse(protocols=[upstream.protocol] if upstream.protocol else ())
        await downstream.prepare(request)

        async def pump(source, sink) -> None:
            async for message in source:
                if message.type == aiohttp.WSMsgType.TEXT:
                    await sink.send_str(message.data)
                elif message.type == aiohttp.WSMsgType.BINARY:
                    await sink.send_bytes(message.data)
                else:
                    break

        tasks = [
            asyncio.ensure_future(pump(downstream, upstream)),
            asyncio.ensure_future(pump(upstream, downstream)),
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await upstream.close()
            await downstream.close()
        return downstream

    # ------------------------------------------------------------------------------------------- drafter swap
    async def swap(self, request: web.Request) -> web.StreamResponse:
        """Forward the swap to vLLM's server (which validates it); restart the engine when it says so."""
        async with self.swap_lock:  # one swap at a time; the next one is validated against the new engine
            if (refused := await self.admit()) is not None:
                return refused
            body = await request.read()
            try:
                async with self.session.post(
                    self.upstream_url(request), data=body, headers=_request_headers(request)
                ) as upstream:
                    payload = await upstream.read()
                    status, headers = upstream.status, _response_headers(upstream)
                    restart = upstream.headers.get(RESTART_HEADER) == "required"
            except (TimeoutError, aiohttp.ClientConnectionError) as exc:
                return _error(502, f"vLLM's server did not answer: {exc}")
            if not (restart and status == 200):
                return web.Response(status=status, body=payload, headers=headers)
            plan = json.loads(payload)
            _say(f"drafter swap to {plan['drafter']['path']} needs an engine restart ({plan['reason']})")
            try:
                report = await self.restart(plan["speculative_config"])
            except SwapFailed as exc:
                _say(f"drafter swap failed: {exc}")
                return _error(exc.status, str(exc), **exc.headers)
            _say(f"drafter swap done: engine restarted in {report['seconds']:.0f} s")
            return web.json_response(
                {
                    "status": "swapped",
                    "mode": "engine restart",
                    "reason": plan["reason"],
                    "previous": plan["previous"],
                    "drafter": plan["drafter"],
                    "speculative_config": plan["speculative_config"],
                    "restart": report,
                }
            )

    async def drained(self) -> None:
        while self.in_flight:
            await self.idle.wait()

    async def restart(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Hold new requests, drain, stop vLLM's server, start it with ``spec`` (or the old config again if that
        fails), release the held requests."""
        started = self.restart_started = time.monotonic()
        waited, rejected, in_flight = self.waited, self.rejected, self.in_flight
        self.restarting = True
        self.ready.clear()
        statistics = self.workdir / "statistics.json"
        try:
            try:
                await asyncio.wait_for(self.drained(), self.drain_timeout)
            except TimeoutError:
                raise SwapFailed(
                    503,
                    f"{self.in_flight} requests were still in flight after --drain-timeout "
                    f"{self.drain_timeout:g} s; the swap was called off and the current drafter "
                    "keeps serving",
                    **{"Retry-After": "10"},
                ) from None
            drain_seconds = time.monotonic() - started
            saved_before = statistics.stat().st_mtime if statistics.exists() else None
            await self.stop_child()
            carried = statistics.exists() and statistics.stat().st_mtime != saved_before
            try:
                await self.start_child(spec)
            except ChildFailed as exc:
                reason = str(exc)
                try:
                    await self.start_child(self.spec)
                except ChildFailed as again:
                    self.exit_code = 1
                    self.stop.set()
                    raise SwapFailed(
                        500,
                        f"the new drafter did not start ({reason}) and neither did the previous "
                        f"one ({again}); the server is shutting down",
                    ) from None
                raise SwapFailed(
                    422, f"vLLM could not start the new drafter ({reason}); the previous drafter serves again"
                ) from None
            self.spec = spec
        except Stopping:
            raise SwapFailed(503, "the server is shutting down") from None
        finally:
            self.restarting = False
            self.ready.set()
        return {
            "seconds": round(time.monotonic() - started, 3),
            "drain_seconds": round(drain_seconds, 3),
            "engine_start_seconds": round(self.last_start_seconds, 3),
            "drained_requests": in_flight,
            "waited_requests": self.waited - waited,
            "rejected_requests": self.rejected - rejected,
            "statistics_carried_over": carried,
        }
