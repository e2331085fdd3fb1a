"""``lk-vllm demo``: serve the default target with a drafter, send traffic, print the live statistics.

It runs what a user runs: ``lk-vllm serve`` (vLLM's OpenAI server with the lk-vllm plugins) on the embedded
default target, with the default LK drafter (the EAGLE-3 drafter ``lk-vllm models`` installs beside the target),
a drafter directory given by ``--drafter DIR``, or with ``--drafter ngram`` vLLM's built-in n-gram drafter
(prompt lookup: it proposes the tokens that followed the last matching n-gram of the prompt, so it needs no
training and does well on text that repeats earlier text). Then a few streaming chat requests go through the
OpenAI API (``serving.client``), and ``GET /v1/speculative/stats`` gives the acceptance length, the acceptance
per draft position and the measured speed-up. ``--keep-serving`` leaves the server up (dashboard included) until
Ctrl-C; otherwise it is shut down.
"""

from __future__ import annotations

import concurrent.futures
import json
import signal
import sys
import tempfile
import time
from pathlib import Path

from lk_vllm.assets import resolve_target
from lk_vllm.engine import EngineSettings, apply_engine_env
from lk_vllm.errors import UserError
from lk_vllm.plugin.server.speedup import load_cached_profile, profile_key_for_settings
from serving.client import complete, request_json
from serving.launcher import free_port, start_server

# Prompts whose answers repeat earlier text, where an n-gram drafter has something to copy.
DEMO_PROMPTS = [
    "Repeat the following list exactly three times, one item per line: red, orange, yellow, green, blue, purple.",
    "Here is a Python function:\n\ndef add(a, b):\n    return a + b\n\nRewrite it with type hints and a docstring, "
    "keeping the same body.",
    "Copy this sentence twice: The quick brown fox jumps over the lazy dog near the quiet river bank.",
    "Write the numbers from one to twenty in words, separated by commas.",
]
NGRAM_K = 4
NGRAM_CONFIG = {
    "method": "ngram",
    "num_speculative_tokens": NGRAM_K,
    "prompt_lookup_min": 2,
    "prompt_lookup_max": 4,
}


def _step(number: int, text: str) -> None:
    print(f"\n[{number}] {text}", flush=True)


def add_arguments(parser) -> None:
    parser.add_argument(
        "--drafter",
        metavar="DIR",
        default="default",
        help="a drafter directory written by `lk-vllm train`, `default` (the default LK drafter "
        "`lk-vllm models` installs) or `ngram` (vLLM's n-gram drafter, no training); "
        "default: default",
    )
    parser.add_argument(
        "--num-speculative-tokens",
        type=int,
        default=None,
        metavar="K",
        help=f"draft tokens per step (default {NGRAM_K} for n-gram, serve's default for a drafter)",
    )
    parser.add_argument("--requests", type=int, default=8, help="chat requests to send (default 8)")
    parser.add_argument("--concurrency", type=int, default=2, help="requests in flight at a time (default 2)")
    parser.add_argument(
        "--max-tokens", type=int, default=96, help="tokens to generate per request (default 96)"
    )
    parser.add_argument("--port", type=int, default=None, help="port to serve on (default: a free one)")
    parser.add_argument(
        "--keep-serving",
        action="store_true",
        help="keep the server running after the demo traffic, until Ctrl-C",
    )
    parser.add_argument(
        "--log", metavar="FILE", default=None, help="server log file (default: a temporary file)"
    )


def _check(args) -> None:
    for flag, value in (
        ("--requests", args.requests),
        ("--concurrency", args.concurrency),
        ("--max-tokens", args.max_tokens),
    ):
        if value < 1:
            raise UserError(f"{flag}: expected an integer >= 1, got {value}")
    if args.drafter not in _NAMED_DRAFTERS and not Path(args.drafter).expanduser().is_dir():
        raise UserError(
            f"--drafter {args.drafter}: expected a drafter directory, `default` or `ngram`, found "
            "no such directory"
        )


_NAMED_DRAFTERS = ("default", "ngram")


def _serve_arguments(args, target: str) -> tuple[list[str], str]:
    """``lk-vllm serve`` arguments and a description of the drafter."""
    from lk_vllm.assets import install_default_drafter

    drafter, description = None, None
    if args.drafter == "default":
        drafter = install_default_drafter(target=target)
        if drafter is None:
            print("    this installation ships no default drafter; using vLLM's n-gram drafter")
        else:
            description = (
                f"the default LK drafter {drafter} (EAGLE-3 trained with an LK loss for this target; "
                "`--drafter ngram` for vLLM's n-gram drafter)"
            )
    elif args.drafter != "ngram":
        drafter = Path(args.drafter).expanduser().resolve()
        description = f"your drafter {drafter}"
    if drafter is not None:
        flags = ["--drafter", str(drafter)]
        if args.num_speculative_tokens:
            flags += ["--num-speculative-tokens", str(args.num_speculative_tokens)]
        return ["--target", target, *flags], description
    config = dict(NGRAM_CONFIG, num_speculative_tokens=args.num_speculative_tokens or NGRAM_K)
    description = (
        f"vLLM's built-in n-gram drafter (prompt lookup, {config['num_speculative_tokens']} draft tokens "
        "per step): no training needed"
    )
    return ["--target", target, "--speculative-config", json.dumps(config)], description


def _send_traffic(url: str, model: str, args) -> list:
    def one(index: int):
        prompt = DEMO_PROMPTS[index % len(DEMO_PROMPTS)]
        return prompt, complete(
            url,
            model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=args.max_tokens,
            stream=True,
            timeout=600,
        )

    with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
        results = list(pool.map(one, range(args.requests)))
    for prompt, result in results[: len(DEMO_PROMPTS)]:
        own = result.spec_metrics or {}  # the response's own metrics (vLLM's per-request summary)
        print(f"    Q: {prompt[:60]!r}...")
        print(f"    A: {result.text.strip()[:100]!r}...")
        if own.get("num_spec_steps"):
            print(
                f"       ({result.completion_tokens} tokens, acceptance length {own['mean_acceptance_length']:.2f})"
            )
    return [result for _, result in results]


def _print_stats(stats: dict) -> None:
    def rate(value) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    drafter = stats.get("drafter") or {}
    print(
        f"    drafter: {drafter.get('path')} ({drafter.get('architecture')}, method {stats.get('method')}, "
        f"{stats.get('num_speculative_tokens')} draft tokens per step)"
    )
    print(
        f"    acceptance length: {rate(stats.get('acceptance_length'))} tokens per target step "
        "(bonus token included; 1.00 would mean no draft token accepted)"
    )
    positions = ", ".join(rate(r) for r in stats.get("per_position_acceptance") or [])
    print(f"    per-position acceptance: [{positions}]")
    print(
        f"    draft tokens: {stats.get('draft_tokens')}, accepted: {stats.get('accepted_tokens')}, "
        f"decode speed: {rate(stats.get('tokens_per_s'))} tokens/s"
    )
    baseline = stats.get("baseline") or {}
    if stats.get("speedup") is not None:
        print(
            f"    measured speed-up: {stats['speedup']:.2f}x over the no-speculation baseline "
            f"({baseline.get('profile')})"
        )
    else:
        print(f"    measured speed-up: n/a ({baseline.get('reason') or 'no pure decode step timed yet'})")


def run(args) -> int:
    _check(args)
    apply_engine_env()
    print(
        "lk-vllm demo: serve the default target with a drafter, send traffic, watch live acceptance and speed-up."
    )

    _step(1, "Preparing the default target (SmolLM2-135M-Instruct, built once from a PyPI package)...")
    target = resolve_target(None)
    print(f"    target ready: {target}")

    serve_args, description = _serve_arguments(args, target)
    _step(2, f"Drafter: {description}")

    port = args.port or free_port()
    log = Path(args.log) if args.log else Path(tempfile.mkdtemp(prefix="lk-vllm-demo-")) / "server.log"
    _step(3, f"Starting `lk-vllm serve` on http://127.0.0.1:{port} (server log: {log})")
    if load_cached_profile(profile_key_for_settings(EngineSettings(model=target))) is None:
        print(
            "    first run on this machine: serve measures the no-speculation baseline once (about a minute, "
            "cached for later runs), then starts the engine",
            flush=True,
        )
    else:
        print("    the engine takes under a minute to start on a laptop CPU", flush=True)
    last_report = [0.0]

    def progress(seconds: float) -> None:
        if seconds - last_report[0] >= 15:
            last_report[0] = seconds
            text = log.read_text(errors="replace") if log.exists() else ""
            # serve's own progress lines say which phase it is in (see serving.launcher / serving.supervisor)
            phase = (
                "starting the engine"
                if "starting vLLM's server" in text
                else ("measuring the baseline" if "measuring it once" in text else "starting")
            )
            print(f"    ... {phase} ({seconds:.0f} s)", flush=True)

    started = time.monotonic()
    try:
        server = start_server(serve_args, port=port, log_path=log, timeout=1800, progress=progress)
    except (RuntimeError, TimeoutError) as exc:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:]) if log.exists() else ""
        print(f"\n{tail}", file=sys.stderr)
        from lk_vllm.errors import UserError

        raise UserError(f"the server did not start: {exc} (full log: {log})") from None
    try:
        print(f"    server ready after {time.monotonic() - started:.0f} s", flush=True)

        _step(
            4,
            f"Sending {args.requests} streaming chat requests ({args.concurrency} at a time) through the "
            "OpenAI API...",
        )
        traffic_started = time.monotonic()
        results = _send_traffic(server.url, target, args)
        tokens = sum(r.completion_tokens for r in results)
        print(f"    {tokens} tokens in {time.monotonic() - traffic_started:.1f} s")

        _step(5, f"Live statistics (GET {server.url}/v1/speculative/stats):")
        window = time.monotonic() - traffic_started + 1
        _print_stats(request_json(server.url, f"/v1/speculative/stats?window={window:.0f}"))
        print(f"    dashboard: {server.url}/dashboard")
        print(
            f"    Prometheus: {server.url}/metrics (lk_acceptance_length, lk_speedup, lk_per_position_acceptance)"
        )

        if args.keep_serving:
            _step(6, f"Serving on {server.url} until Ctrl-C (OpenAI API at {server.url}/v1, model {target})")
            # A shell starts background jobs with SIGINT ignored, and Python keeps it so; Ctrl-C (or kill -INT)
            # must still end the demo cleanly.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            try:
                while server.process.poll() is None:
                    time.sleep(1)
                print("    the server exited", flush=True)
                return 1
            except KeyboardInterrupt:
                print("\n    Ctrl-C: shutting down", flush=True)
        else:
            _step(6, "Shutting down the server (pass --keep-serving to keep it running)")
    finally:
        server.stop()
    print(
        "\nDone. Next: `lk-vllm train` an LK drafter and serve it with `lk-vllm demo --drafter DIR` or "
        "`lk-vllm serve --drafter DIR` (see README.md)."
    )
    return 0
