"""A stand-in for vLLM's OpenAI server, and lk-vllm serve's supervisor running it (tests/test_supervisor.py).

``python tests/fake_vllm.py child --uds PATH --spec JSON``: an aiohttp app on a Unix socket with the routes the
tests need. ``python tests/fake_vllm.py supervise --port P ...``: serving.supervisor.Supervisor over it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

from aiohttp import web


def child(uds: str, spec: dict) -> None:
    if spec.get("fail"):  # as vLLM dies: the engine's traceback, then the API server's wrapper
        print(
            "(EngineCore pid=1) ERROR Traceback (most recent call last):\n"
            "(EngineCore pid=1) ERROR TypeError: unhashable type: 'dict'",
            file=sys.stderr,
            flush=True,
        )
        print(
            "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(3)
    time.sleep(spec.get("start_delay", 0))  # an engine that takes a while to start

    async def health(request):
        return web.Response(text="")

    async def whoami(request):
        return web.json_response({"spec": spec, "pid": os.getpid()})

    async def echo(request):
        return web.json_response(
            {
                "method": request.method,
                "path": request.path,
                "query": dict(request.query),
                "headers": dict(request.headers),
                "body": await request.text(),
            },
            headers={"X-Upstream": "fake"},
        )

    async def stream(request):
        """SSE: one event, then (with ?gate=FILE) the rest once FILE exists, then [DONE]."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(f"data: {json.dumps({'pid': os.getpid(), 'i': 0})}\n\n".encode())
        gate = request.query.get("gate")
        while gate and not Path(gate).exists():
            await asyncio.sleep(0.05)
        for i in range(1, int(request.query.get("n", 5))):
            await response.write(f"data: {json.dumps({'pid': os.getpid(), 'i': i})}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def swap(request):
        path = (await request.json())["path"]
        if path == "bad":
            return web.json_response({"error": "drafter directory 'bad' not found"}, status=404)
        if path.startswith("restart:"):
            config = {"method": "fake", "model": path.removeprefix("restart:")}
            if config["model"] == "fail":
                config["fail"] = True
            if config["model"] == "slow":
                config["start_delay"] = 4
            plan = {
                "status": "restart-required",
                "reason": "another shape",
                "speculative_config": config,
                "previous": spec.get("model"),
                "drafter": {"path": config["model"]},
            }
            return web.json_response(plan, headers={"X-LK-Restart": "required"})
        return web.json_response({"status": "swapped", "mode": "in-place weight reload"})

    async def websocket(request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            await ws.send_str(f"{os.getpid()}:{message.data}")
        return ws

    async def die(request):
        os._exit(7)

    app = web.Application()
    app.add_routes(
        [
            web.get("/health", health),
            web.get("/whoami", whoami),
            web.route("*", "/echo", echo),
            web.get("/stream", stream),
            web.post("/v1/speculative/drafter", swap),
            web.get("/ws", websocket),
            web.get("/die", die),
        ]
    )
    web.run_app(app, path=uds, print=None)


class FakeCommand:
    """What serving.supervisor needs from serving.launcher.ServerCommand."""

    def __init__(self) -> None:
        self.env = dict(os.environ)
        self.speculative_config = {"method": "fake", "model": "first"}

    def vllm_argv(self, speculative_config, listen):
        return [sys.executable, __file__, "child", *listen, "--spec", json.dumps(speculative_config)]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=("child", "supervise"))
    parser.add_argument("--uds")
    parser.add_argument("--spec", default="{}")
    parser.add_argument("--port", type=int)
    parser.add_argument("--restart-wait", type=float, default=60)
    parser.add_argument("--drain-timeout", type=float, default=60)
    args = parser.parse_args()
    if args.role == "child":
        child(args.uds, json.loads(args.spec))
        return 0
    from serving.supervisor import Supervisor

    return Supervisor(
        FakeCommand(),
        host="127.0.0.1",
        port=args.port,
        restart_wait=args.restart_wait,
        drain_timeout=args.drain_timeout,
        stop_timeout=10,
    ).run()


if __name__ == "__main__":
    sys.exit(main())
