"""A minimal OpenAI-API client for a running ``lk-vllm serve`` (standard library only).

Used by ``lk-vllm demo``, the tests and the load benchmark: send a completion or chat request, streaming or not,
and get back the text, token count, client-side timing and the request's own speculative-decoding metrics.
"""

from __future__ import annotations

import dataclasses
import json
import time
import urllib.error
import urllib.request
from typing import Any


class HTTPError(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:300]}")
        self.status = status
        self.body = body


@dataclasses.dataclass
class Completion:
    text: str
    completion_tokens: int
    spec_metrics: dict[str, Any] | None  # the response's metrics.speculative_decoding
    started: float  # time.monotonic() when the request was sent
    first_token: float | None  # when the first text arrived (streaming)
    finished: float
    last_token: float | None = None  # when the last text arrived (streaming)
    chunks: int = 0
    logprobs: list[float] | None = None
    chunk_times: list[float] = dataclasses.field(
        default_factory=list
    )  # arrival of each text chunk (streaming)

    @property
    def decode_seconds_per_token(self) -> float | None:
        """Client-side decode time per token after the first one (streaming only)."""
        if self.first_token is None or self.last_token is None or self.completion_tokens < 2:
            return None
        return (self.last_token - self.first_token) / (self.completion_tokens - 1)


def _headers(api_key: str | None, extra: dict[str, str] | None = None) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    headers.update(extra or {})
    return headers


def request_json(
    url: str,
    path: str,
    body: dict | None = None,
    *,
    api_key: str | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 300.0,
) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        url + path,
        data=data,
        headers=_headers(api_key, headers),
        method="POST" if body is not None else "GET",
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        raise HTTPError(exc.code, exc.read().decode(errors="replace")) from None


def complete(
    url: str,
    model: str,
    *,
    prompt: str | None = None,
    messages: list[dict] | None = None,
    max_tokens: int = 64,
    temperature: float = 0.0,
    stream: bool = False,
    api_key: str | None = None,
    timeout: float = 300.0,
    **extra: Any,
) -> Completion:
    """One /v1/completions (``prompt``) or /v1/chat/completions (``messages``) request."""
    chat = messages is not None
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "temperature": temperature, **extra}
    body.update({"messages": messages} if chat else {"prompt": prompt})
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}  # the metrics ride on the final usage chunk
    path = "/v1/chat/completions" if chat else "/v1/completions"
    req = urllib.request.Request(
        url + path, data=json.dumps(body).encode(), headers=_headers(api_key), method="POST"
    )
    started = time.monotonic()
    try:
        response = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as exc:
        raise HTTPError(exc.code, exc.read().decode(errors="replace")) from None
    with response:
        if not stream:
            data = json.load(response)
            choice = data["choices"][0]
            logprobs = None
            if chat and choice.get("logprobs"):
                logprobs = [item["logprob"] for item in choice["logprobs"]["content"]]
            elif not chat and choice.get("logprobs"):
                logprobs = list(choice["logprobs"]["token_logprobs"])
            return Completion(
                text=choice["message"]["content"] if chat else choice["text"],
                completion_tokens=data["usage"]["completion_tokens"],
                spec_metrics=(data.get("metrics") or {}).get("speculative_decoding"),
                started=started,
                first_token=None,
                finished=time.monotonic(),
                chunks=1,
                logprobs=logprobs,
            )
        text, chunk_times, usage, metrics = [], [], None, None
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                break
            event = json.loads(payload)
            if "error" in event:
                raise HTTPError(500, payload)
            for choice in event.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                if piece:
                    chunk_times.append(time.monotonic())
                    text.append(piece)
            if event.get("usage"):
                usage = event["usage"]
                metrics = (event.get("metrics") or {}).get("speculative_decoding")
        finished = time.monotonic()
    if usage is None:
        raise HTTPError(500, "the stream ended without a usage chunk")
    return Completion(
        text="".join(text),
        completion_tokens=usage["completion_tokens"],
        spec_metrics=metrics,
        started=started,
        first_token=chunk_times[0] if chunk_times else None,
        finished=finished,
        last_token=chunk_times[-1] if chunk_times else None,
        chunks=len(chunk_times),
        chunk_times=chunk_times,
    )
