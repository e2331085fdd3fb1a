"""``lk-vllm send``: replay dataset prompts against a running OpenAI server and report per-request acceptance.

A load generator for a server that is already up (``lk-vllm serve`` or plain vLLM with the lk plugins): the
prompts of the registered datasets (``lk_vllm.datasets``) or a ``.jsonl`` file go out as streaming chat requests
(``serving.client``), ``--concurrency`` at a time, each prompt once or, with ``--duration``, round and round
until the time is up. Each response carries its own speculative-decoding counters (vLLM's per-request summary),
so the report gives both acceptance lengths of these requests: pooled (``1 + sum accepted / sum steps``, what
vLLM's metrics report) and the mean of the per-request means (what SpecForge's benchmark reports). A failed
request is counted with its reason and makes the exit status 1: ``lk-vllm send`` running during a drafter swap
is the check that the swap dropped nothing.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import sys
import threading
import time
from typing import Any

from lk_vllm.acceptance import mean_acceptance_length
from lk_vllm.datasets import load_prompts
from lk_vllm.errors import UserError, require_at_least
from serving.client import HTTPError, complete, request_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url", default="http://127.0.0.1:8000", help="the server (default http://127.0.0.1:8000)"
    )
    parser.add_argument(
        "--model", default=None, help="model name to request (default: the server's first model)"
    )
    parser.add_argument(
        "--dataset",
        action="append",
        required=True,
        help="dataset name (mtbench, humaneval, gsm8k, sharegpt) or a .jsonl file; repeatable",
    )
    parser.add_argument(
        "--split", choices=("train", "eval"), default="eval", help="dataset split (default eval)"
    )
    parser.add_argument(
        "--offset", type=int, default=0, help="skip the first N prompts of each dataset (default 0)"
    )
    parser.add_argument("--limit", type=int, default=None, help="then take at most N prompts of each dataset")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4)")
    parser.add_argument(
        "--max-tokens", type=int, default=128, help="output tokens per request at most (default 128)"
    )
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0)")
    parser.add_argument(
        "--duration",
        type=float,
        default=None,
        metavar="SECONDS",
        help="keep sending (cycling through the prompts) until SECONDS have passed; default: each "
        "prompt once",
    )
    parser.add_argument("--api-key", default=None, help="the server's API key, if it has one")
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds per request at most (default 600)"
    )
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object on stdout")


def _check(args) -> None:
    for flag, value, least in (
        ("--concurrency", args.concurrency, 1),
        ("--max-tokens", args.max_tokens, 1),
        ("--offset", args.offset, 0),
        ("--limit", args.limit, 1),
    ):
        if value is not None:
            require_at_least(flag, value, least)
    if args.temperature < 0:
        raise UserError(f"--temperature: expected a value >= 0, found {args.temperature}")
    for flag, value in (("--duration", args.duration), ("--timeout", args.timeout)):
        if value is not None and not value > 0:
            raise UserError(f"{flag}: expected a positive number of seconds, found {value}")


def load_messages(datasets: list[str], split: str, offset: int, limit: int | None) -> list[list[dict]]:
    messages = []
    for name in datasets:
        prompts = load_prompts(name, split)[offset:]
        if not prompts:
            raise UserError(f"--dataset {name}: no prompts left after --offset {offset}")
        messages += [p.messages for p in prompts[:limit]]
    return messages


def server_model(url: str, api_key: str | None) -> str:
    try:
        models = request_json(url, "/v1/models", api_key=api_key, timeout=30)
    except HTTPError as exc:
        raise UserError(f"--url {url}: GET /v1/models answered HTTP {exc.status}") from None
    except OSError as exc:
        raise UserError(f"--url {url}: expected a running OpenAI server, found {exc}") from None
    data = models.get("data") or []
    if not data:
        raise UserError(f"--url {url}: the server lists no model")
    return data[0]["id"]


def summarise(results: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """The report of finished requests: ``{"ok": bool, "error": str | None, "tokens": int, "steps": int,
    "accepted": int}`` each (steps = target steps that verified a draft, accepted = draft tokens accepted)."""
    done = [r for r in results if r["ok"]]
    failures = [r["error"] for r in results if not r["ok"]]
    steps, accepted = sum(r["steps"] for r in done), sum(r["accepted"] for r in done)
    means = [mean_acceptance_length(r["accepted"], r["steps"]) for r in done if r["steps"]]
    tokens = sum(r["tokens"] for r in done)
    return {
        "requests": len(results),
        "failed": len(failures),
        "errors": failures[:5],
        "completion_tokens": tokens,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(tokens / seconds, 2) if seconds > 0 else None,
        "requests_with_drafts": len(means),
        "acceptance_length_pooled": mean_acceptance_length(accepted, steps),
        "acceptance_length_mean_of_request_means": sum(means) / len(means) if means else None,
    }


def send(
    url: str,
    model: str,
    messages: list[list[dict]],
    *,
    concurrency: int,
    max_tokens: int,
    temperature: float,
    duration: float | None,
    api_key: str | None,
    timeout: float,
    progress=None,
) -> dict[str, Any]:
    """Send the requests (each prompt once, or cycling for ``duration`` seconds) and summarise them."""
    started = time.monotonic()
    lock = threading.Lock()
    results: list[dict[str, Any]] = []
    next_index = [0]

    def take() -> int | None:
        with lock:
            index = next_index[0]
            if duration is None and index >= len(messages):
                return None
            if duration is not None and time.monotonic() - started >= duration:
                return None
            next_index[0] += 1
            return index

    def worker(seed: int) -> None:
        while (index := take()) is not None:
            try:
                result = complete(
                    url,
                    model,
                    messages=messages[index % len(messages)],
                    max_tokens=max_tokens,
                    temperature=temperature,
                    seed=seed + index,
                    stream=True,
                    api_key=api_key,
                    timeout=timeout,
                )
                own = result.spec_metrics or {}
                record = {
                    "ok": True,
                    "tokens": result.completion_tokens,
                    "steps": int(own.get("num_spec_steps") or 0),
                    "accepted": int(own.get("num_accepted_draft_tokens") or 0),
                }
            except Exception as exc:  # noqa: BLE001 - every failure is counted and reported, never raised
                record = {
                    "ok": False,
                    "error": f"request {index}: {str(exc).splitlines()[0] if str(exc) else exc!r}",
                }
            with lock:
                results.append(record)
                if progress is not None:
                    progress(len(results), record)

    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(worker, 1000 * i) for i in range(concurrency)]:
            future.result()
    return summarise(results, time.monotonic() - started)


def _format(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def run(args) -> int:
    _check(args)
    messages = load_messages(args.dataset, args.split, args.offset, args.limit)
    url = args.url.rstrip("/")
    model = args.model or server_model(url, args.api_key)
    planned = f"for {args.duration:g} s" if args.duration else f"{len(messages)} requests"
    print(
        f"lk-vllm send: {planned} to {url} ({model}), {args.concurrency} in flight, {len(messages)} prompts of "
        f"{', '.join(args.dataset)}",
        file=sys.stderr,
    )

    def progress(count: int, record: dict) -> None:
        if not record["ok"]:
            print(f"  failed: {record['error']}", file=sys.stderr)
        elif count % 10 == 0:
            print(f"  {count} requests done", file=sys.stderr)

    report = send(
        url,
        model,
        messages,
        concurrency=args.concurrency,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        duration=args.duration,
        api_key=args.api_key,
        timeout=args.timeout,
        progress=progress,
    )
    if args.json:
        print(json.dumps(report))
    else:
        print(
            f"{report['requests']} requests, {report['failed']} failed, {report['completion_tokens']} tokens in "
            f"{report['seconds']} s; acceptance length pooled {_format(report['acceptance_length_pooled'])}, "
            f"mean of per-request means {_format(report['acceptance_length_mean_of_request_means'])} "
            f"({report['requests_with_drafts']} requests with drafts)"
        )
    return 1 if report["failed"] else 0
