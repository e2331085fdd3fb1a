"""Traffic capture for retraining: ``lk-vllm serve --capture-low-acceptance DIR`` (opt-in, off by default).

The prompts of the requests the drafter serves worst are the data to fine-tune it on. For every chat or
completion request that carries its own speculative-decoding metrics in the response (vLLM's
``--per-request-spec-decode-metrics``, which ``lk-vllm serve`` turns on), the request's acceptance length is
compared with the lowest ``--capture-quantile`` (default 0.2) of the per-request acceptance lengths of the live
drafter's recent traffic in the same sampling mode (the live-stats store, last ``QUANTILE_WINDOW_SECONDS``);
at or below it, the request's prompt is appended to a JSONL file in DIR, one line per request, in the format
``lk-vllm prepare --dataset FILE`` reads (``{"id", "messages"}`` or ``{"id", "prompt"}``; the extra
``acceptance_length``, ``sampling`` and ``time`` keys are ignored there).

Privacy: only the prompt is written (the request's ``messages`` with role and text, or its ``prompt`` string):
never a header (so never the API key), never the response, the client's address or any other body field
(``user``, tools, sampling settings). See serving/README.md, "Traffic capture".

Files rotate at ``ROTATE_BYTES``; capture stops, and says why in its counters, when this server has written
``--capture-max-mb`` or when a write fails (directory not writable, disk full). Serving is never affected:
nothing here raises into a request. ``GET /v1/speculative/capture`` (admin) reads the counters, ``POST`` with
``{"enabled": true|false}`` turns capture on or off (on again also retries after a failure). That choice is
kept in the capture directory (``STATE_FILE``), so it holds after a swap restarts the server, and for a later
server on the same directory: off stays off until an admin turns it on.

Streaming requests carry their metrics only on the final usage chunk, so they are captured only when they ask
for usage (``stream_options.include_usage``) or the server runs with vLLM's ``--enable-force-include-usage``;
they are counted as ``no_acceptance`` otherwise.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from lk_vllm import acceptance
from lk_vllm.atomic import write_atomic
from lk_vllm.env import CAPTURE_ENV
from lk_vllm.errors import UserError

CAPTURED_PATHS = ("/v1/chat/completions", "/v1/completions")
ROTATE_BYTES = 16 * 2**20
STATE_FILE = ".capture-state.json"  # the admin's on/off, read again when a swap restarts the server
QUANTILE_WINDOW_SECONDS = 600.0
# Fewer finished requests than this in the window give no threshold yet: a quantile of a handful says little.
MIN_REQUESTS = 20
THRESHOLD_REFRESH_SECONDS = 5.0  # the store's window is re-read at most this often, not on every request
MAX_JSON_RESPONSE_BYTES = 8 * 2**20  # larger non-streamed responses are not parsed
STREAM_TAIL_BYTES = 64 * 2**10  # the metrics ride on a stream's last chunks

logger = logging.getLogger("lk_vllm.serving")


@dataclasses.dataclass(frozen=True)
class CaptureSettings:
    directory: str | None = None  # None: capture is not configured (and cannot be turned on)
    quantile: float = 0.2
    max_megabytes: float = 1024.0

    def __post_init__(self) -> None:
        if not (isinstance(self.quantile, int | float) and 0.0 < self.quantile < 1.0):
            raise UserError(f"--capture-quantile: expected a fraction in (0, 1), found {self.quantile}")
        if not (
            isinstance(self.max_megabytes, int | float)
            and math.isfinite(self.max_megabytes)
            and self.max_megabytes > 0
        ):
            raise UserError(
                f"--capture-max-mb: expected a positive number of MiB, found {self.max_megabytes}"
            )
        if self.directory is not None and Path(self.directory).exists() and not Path(self.directory).is_dir():
            raise UserError(f"--capture-low-acceptance {self.directory}: expected a directory, found a file")

    @classmethod
    def from_env(cls) -> CaptureSettings:
        text = os.environ.get(CAPTURE_ENV)
        return cls(**json.loads(text)) if text else cls()


def prompt_record(path: str, body: Any) -> dict[str, Any] | None:
    """What is written of a request: its conversation up to the last user turn (text only) or its prompt
    string; None when there is nothing ``lk-vllm prepare`` could read (token ids, a batch of prompts, ...)."""
    if not isinstance(body, dict):
        return None
    if path.endswith("/chat/completions"):
        messages = []
        for message in body.get("messages") or []:
            if not isinstance(message, dict):
                return None
            role = {"developer": "system"}.get(message.get("role"), message.get("role"))
            content = message.get("content")
            if isinstance(content, list):  # content parts: keep the text ones
                content = "".join(
                    part.get("text") or ""
                    for part in content
                    if isinstance(part, dict) and part.get("type") == "text"
                )
            if role in ("system", "user", "assistant") and isinstance(content, str) and content:
                messages.append({"role": role, "content": content})
        while messages and messages[-1]["role"] == "assistant":  # prepare regenerates the answer
            messages.pop()
        return {"messages": messages} if messages and messages[-1]["role"] == "user" else None
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    return {"prompt": prompt} if isinstance(prompt, str) and prompt else None


def request_counts(response: Any) -> tuple[int, int] | None:
    """(draft-verify steps, accepted draft tokens) of the request, from the metrics vLLM puts in its response."""
    metrics = (response.get("metrics") or {}) if isinstance(response, dict) else {}
    spec = metrics.get("speculative_decoding") if isinstance(metrics, dict) else None
    if not isinstance(spec, dict) or not spec.get("num_spec_steps"):
        return None
    return int(spec["num_spec_steps"]), int(spec.get("num_accepted_draft_tokens") or 0)


def quantile(values: list[float], q: float) -> float:
    """The nearest-rank q-quantile: the smallest value with at least a fraction q of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


class TrafficCapture:
    """Decides and writes; its counters are what the admin route shows."""

    def __init__(self, settings: CaptureSettings, store) -> None:
        self.settings = settings
        self.store = store
        self.enabled = settings.directory is not None
        self.stopped: str | None = None  # why capture stopped by itself
        self.seen = 0  # responses with the request's own acceptance
        self.captured = 0
        self.skipped: dict[str, int] = {
            "above_threshold": 0,
            "warming_up": 0,
            "no_acceptance": 0,
            "unreadable_prompt": 0,
            "off": 0,
        }
        self.bytes_written = 0
        self.files: list[str] = []
        self._file: Path | None = None
        self._file_bytes = 0
        self._thresholds: dict[str, float | None] = {}
        self._thresholds_at = -math.inf
        self._lock = threading.Lock()
        if self.enabled:  # an admin's "off" outlives an engine restart (a swap restarts this process)
            try:
                self.enabled = json.loads(self._state_path().read_text()).get("enabled", True) is not False
            except (OSError, ValueError, AttributeError):
                pass

    def _state_path(self) -> Path:
        return Path(self.settings.directory) / STATE_FILE

    @property
    def active(self) -> bool:
        return self.enabled and self.stopped is None

    def set_enabled(self, enabled: bool) -> None:
        if enabled and self.settings.directory is None:
            raise UserError(
                "traffic capture is not configured: start the server with --capture-low-acceptance DIR"
            )
        with self._lock:
            self.enabled = enabled
            if enabled:
                self.stopped = None  # a retry after a failure or the size limit (the limit counts again)
                self.bytes_written, self._file = 0, None
            try:
                self._state_path().parent.mkdir(parents=True, exist_ok=True)
                write_atomic(self._state_path(), json.dumps({"enabled": enabled}))
            except OSError as exc:
                logger.warning("lk-vllm capture: could not keep the on/off state for a restart: %s", exc)

    def thresholds(self) -> dict[str, float | None]:
        """Per sampling mode, the acceptance length at the capture quantile of the live drafter's recent finished
        requests (None with fewer than MIN_REQUESTS)."""
        now = time.monotonic()
        if now - self._thresholds_at >= THRESHOLD_REFRESH_SECONDS:
            live = self.store.drafter
            lengths: dict[str, list[float]] = {mode: [] for mode in acceptance.SAMPLING_MODES}
            for step in self.store.steps(QUANTILE_WINDOW_SECONDS, live.name if live else None):
                for drafts, accepted, mode in step.requests:
                    length = acceptance.mean_acceptance_length(accepted, drafts)
                    if length is not None:
                        lengths[mode].append(length)
            self._thresholds = {
                mode: quantile(values, self.settings.quantile) if len(values) >= MIN_REQUESTS else None
                for mode, values in lengths.items()
            }
            self._thresholds_at = now
        return self._thresholds

    def offer(self, path: str, body: Any, response: Any) -> str:
        """One finished request: capture its prompt if its acceptance is low enough. Returns the outcome
        (``captured`` or a key of ``skipped``); never raises."""
        try:
            return self._offer(path, body, response)
        except Exception as exc:  # noqa: BLE001 - a bug here must not reach the request
            logger.exception("lk-vllm capture: request not considered")
            self._stop(f"internal error: {exc!r}")
            return "error"

    def _offer(self, path: str, body: Any, response: Any) -> str:
        if not self.active:
            self.skipped["off"] += 1
            return "off"
        counts = request_counts(response)
        if counts is None:
            self.skipped["no_acceptance"] += 1
            return "no_acceptance"
        self.seen += 1
        length = acceptance.mean_acceptance_length(counts[1], counts[0])
        mode = acceptance.sampling_mode(body.get("temperature") if isinstance(body, dict) else None)
        threshold = self.thresholds()[mode]
        if threshold is None:
            outcome = "warming_up"
        elif length > threshold:
            outcome = "above_threshold"
        else:
            record = prompt_record(path, body)
            outcome = "unreadable_prompt" if record is None else None
        if outcome is not None:
            self.skipped[outcome] += 1
            return outcome
        line = json.dumps(
            {
                "id": f"capture-{uuid.uuid4().hex[:16]}",
                **record,
                "acceptance_length": round(length, 4),
                "sampling": mode,
                "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            }
        )
        return "captured" if self._write(line + "\n") else "off"

    def _write(self, line: str) -> bool:
        data = line.encode()
        with self._lock:
            if self.stopped is not None or not self.enabled:  # turned off since the request was looked at
                return False
            limit = int(self.settings.max_megabytes * 2**20)
            if self.bytes_written + len(data) > limit:
                self._stop(
                    f"reached --capture-max-mb {self.settings.max_megabytes:g} MiB (POST "
                    '/v1/speculative/capture {"enabled": true} allows as much again)'
                )
                return False
            try:
                if self._file is None or self._file_bytes + len(data) > ROTATE_BYTES:
                    self._file = self._next_file()
                    self._file_bytes = 0
                with open(self._file, "ab") as f:
                    f.write(data)
            except OSError as exc:  # not writable, disk full, directory gone: capture stops, serving goes on
                self._stop(
                    f"write to {self._file or self.settings.directory} failed: "
                    f"{exc.strerror or exc} (errno {exc.errno})"
                )
                return False
            self._file_bytes += len(data)
            self.bytes_written += len(data)
            self.captured += 1
            return True

    def _next_file(self) -> Path:
        directory = Path(self.settings.directory)
        directory.mkdir(parents=True, exist_ok=True)
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S")
        path = directory / f"low-acceptance-{stamp}-{os.getpid()}-{len(self.files):04d}.jsonl"
        path.touch(exist_ok=True)
        self.files.append(path.name)
        return path

    def _stop(self, reason: str) -> None:
        self.stopped = reason
        logger.warning("lk-vllm: traffic capture stopped (serving goes on): %s", reason)

    def status(self) -> dict[str, Any]:
        return {
            "configured": self.settings.directory is not None,
            "enabled": self.enabled,
            "active": self.active,
            "stopped": self.stopped,
            "directory": self.settings.directory,
            "quantile": self.settings.quantile,
            "max_megabytes": self.settings.max_megabytes,
            "thresholds": dict(self._thresholds),
            "seen": self.seen,
            "captured": self.captured,
            "skipped": dict(self.skipped),
            "bytes_written": self.bytes_written,
            "files": list(self.files),
            "current_file": self._file.name if self._file else None,
        }


class CaptureMiddleware:
    """ASGI middleware on vLLM's app: hands each successful chat/completion request body and response to the
    capture, passing every message through unchanged. Inert (no buffering) while capture is not active."""

    def __init__(self, app, capture: TrafficCapture) -> None:
        self.app = app
        self.capture = capture

    async def __call__(self, scope, receive, send):
        if (
            scope["type"] != "http"
            or scope.get("method") != "POST"
            or scope.get("path") not in CAPTURED_PATHS
            or not self.capture.active
        ):
            return await self.app(scope, receive, send)
        request_body = bytearray()
        response_body = bytearray()
        state = {"status": 0, "stream": False, "done": False}

        async def receive_and_keep():
            message = await receive()
            if message["type"] == "http.request":
                request_body.extend(message.get("body", b""))
            return message

        async def send_and_look(message):
            await send(message)
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                headers = dict(message.get("headers") or [])
                state["stream"] = headers.get(b"content-type", b"").startswith(b"text/event-stream")
            elif message["type"] == "http.response.body" and state["status"] == 200 and not state["done"]:
                response_body.extend(message.get("body", b""))
                if state["stream"] and len(response_body) > 2 * STREAM_TAIL_BYTES:
                    del response_body[:-STREAM_TAIL_BYTES]
                too_large = not state["stream"] and len(response_body) > MAX_JSON_RESPONSE_BYTES
                if too_large:
                    response_body.clear()  # not kept in memory; counted as a request without acceptance
                if too_large or not message.get("more_body"):
                    state["done"] = True
                    self._hand_over(scope["path"], bytes(request_body), bytes(response_body), state["stream"])

        await self.app(scope, receive_and_keep, send_and_look)

    def _hand_over(self, path: str, request_body: bytes, response_body: bytes, stream: bool) -> None:
        try:
            body = json.loads(request_body)
            response = (
                _last_chunk_with_metrics(response_body) if stream else json.loads(response_body or b"null")
            )
        except ValueError:
            body, response = None, None
        self.capture.offer(path, body, response)


def _last_chunk_with_metrics(tail: bytes) -> dict | None:
    for line in reversed(tail.decode("utf-8", errors="replace").splitlines()):
        if line.startswith("data: {") and '"speculative_decoding"' in line:
            try:
                return json.loads(line[len("data: ") :])
            except ValueError:
                return None
    return None
