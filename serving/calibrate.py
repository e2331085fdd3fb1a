"""``lk-vllm calibrate``: the no-speculation baseline that live speed-up is measured against.

Starts the target in vLLM's own OpenAI server with lk-vllm's plugins and speculation OFF (what ``lk-vllm serve``
runs, on a private local port), streams ``b`` concurrent greedy completions of exactly ``--output-tokens``
tokens for every batch size ``b`` in ``--batch-sizes``, and keeps the decode time per output token while all
``b`` streams decode together. Timing through the server matters on small machines: its per-token work
(detokenising, streaming) slows the engine's steps, and the speculative server's live figures include it too.
The profile is written atomically under ``lk_home()/calibration``, keyed by target fingerprint, dtype, hardware
and vLLM version, and reused by ``lk-vllm serve`` (and by the plugin under plain vLLM) for that key.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from lk_vllm.assets import lk_home, resolve_target
from lk_vllm.engine import (
    EngineSettings,
    add_engine_arguments,
    apply_engine_env,
    check_cpu_settings,
    check_vllm_version,
    settings_from_args,
)
from lk_vllm.errors import UserError
from lk_vllm.plugin import plugins_env_value
from lk_vllm.plugin.server.speedup import (
    BaselineProfile,
    load_cached_profile,
    profile_key_for_settings,
    profile_path,
)
from lk_vllm.targets import add_target_argument
from serving.client import Completion, HTTPError, complete
from serving.launcher import ServerHandle, free_port, vllm_server_argv, wait_healthy

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16)
# Varied prompts of similar length so prefix caching and early stops do not change the batch.
_PROMPT_TOPICS = (
    "rivers",
    "bridges",
    "volcanoes",
    "libraries",
    "glaciers",
    "markets",
    "orchards",
    "harbours",
    "deserts",
    "railways",
    "forests",
    "castles",
    "islands",
    "bakeries",
    "lighthouses",
    "canals",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_target_argument(parser, positional=True)
    parser.add_argument(
        "--batch-sizes",
        default=",".join(map(str, DEFAULT_BATCH_SIZES)),
        help="comma-separated batch sizes to measure (default 1,2,4,8,16)",
    )
    parser.add_argument(
        "--output-tokens", type=int, default=64, help="tokens generated per request (default 64)"
    )
    parser.add_argument("--output", default=None, help="write the profile here too (default: only the cache)")
    parser.add_argument("--force", action="store_true", help="measure again even if a cached profile exists")
    parser.add_argument("--json", action="store_true", help="print the profile as JSON on stdout")
    add_engine_arguments(parser)


def parse_batch_sizes(text: str) -> list[int]:
    try:
        sizes = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise UserError(f"--batch-sizes: expected comma-separated integers, got {text!r}") from None
    if not sizes or sizes[0] < 1:
        raise UserError(f"--batch-sizes: expected integers >= 1, got {text!r}")
    return sizes


def _prompt(index: int) -> str:
    topic = _PROMPT_TOPICS[index % len(_PROMPT_TOPICS)]
    return f"Write a long, detailed essay about {topic}, their history and why people care about them."


def decode_window(completions: list[Completion], batch_size: int) -> dict:
    """Decode time per output token while all ``batch_size`` streams were decoding together.

    The window runs from the last stream's first token (every prefill done) to the first stream's last token
    (nobody has finished); each stream's chunks in it are its decode steps, one token each with speculation off.
    """
    if len(completions) != batch_size or any(len(c.chunk_times) < 2 for c in completions):
        raise RuntimeError(f"batch size {batch_size}: a stream ended before it produced two tokens")
    start = max(c.chunk_times[0] for c in completions)
    end = min(c.chunk_times[-1] for c in completions)
    steps = [sum(start < t <= end for t in c.chunk_times) for c in completions]
    mean_steps = sum(steps) / batch_size
    if mean_steps < 4:
        raise RuntimeError(
            f"batch size {batch_size}: only {mean_steps:.1f} decode steps overlapped in all "
            "streams (raise --output-tokens)"
        )
    return {
        "batch_size": batch_size,
        "seconds_per_token": (end - start) / mean_steps / batch_size,
        "tokens": sum(steps),
        "steps": round(mean_steps),
    }


def _stream_batch(url: str, model: str, batch_size: int, output_tokens: int) -> list[Completion]:
    """``batch_size`` concurrent greedy streams of exactly ``output_tokens`` tokens."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=batch_size) as pool:
        futures = [
            pool.submit(
                complete,
                url,
                model,
                prompt=_prompt(i),
                max_tokens=output_tokens,
                stream=True,
                ignore_eos=True,
                timeout=600.0,
            )
            for i in range(batch_size)
        ]
        return [future.result() for future in futures]


def _measure(settings: EngineSettings, batch_sizes: list[int], output_tokens: int) -> list[dict]:
    """Serve the target with vLLM's own OpenAI server, the way ``lk-vllm serve`` does but with speculation off,
    and time its streams from a client: the baseline carries the server's own per-token cost, as the
    speculative server's live figures do."""
    from tqdm import tqdm

    settings = dataclasses.replace(settings, max_num_seqs=max(settings.max_num_seqs or 0, max(batch_sizes)))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "VLLM_API_KEY"}  # a private, local server
    env["VLLM_PLUGINS"] = plugins_env_value(env.get("VLLM_PLUGINS"))
    log_path = lk_home() / "calibration" / "server.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    argv = vllm_server_argv(settings, ["--host", "127.0.0.1", "--port", str(port)])
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = ServerHandle(url=f"http://127.0.0.1:{port}", process=process, log_path=log_path)
    try:
        with tqdm(desc="starting plain vLLM (speculation off)", unit="s", file=sys.stderr) as bar:
            wait_healthy(server.url, process, timeout=1800, progress=lambda s: bar.update(int(s) - bar.n))
        _stream_batch(server.url, settings.model, 2, 16)  # warm-up, not measured
        return [
            decode_window(_stream_batch(server.url, settings.model, b, output_tokens), b)
            for b in tqdm(batch_sizes, desc="calibrating (speculation off)", file=sys.stderr)
        ]
    except (RuntimeError, TimeoutError, HTTPError) as error:
        raise UserError(f"calibration failed: {error} (vLLM's log: {log_path})") from None
    finally:
        server.stop()


def calibrate(settings: EngineSettings, batch_sizes: list[int], output_tokens: int):
    """Measure and cache a profile for ``settings`` (speculation is switched off here)."""
    settings = dataclasses.replace(settings, speculative_config=None)
    key = profile_key_for_settings(settings)
    started = time.time()
    points = _measure(settings, batch_sizes, output_tokens)
    profile = BaselineProfile(
        key=key | {"output_tokens": output_tokens, "seconds": time.time() - started}, points=points
    )
    profile.save(profile_path(key))
    return profile


def run(args: argparse.Namespace) -> int:
    apply_engine_env()

    batch_sizes = parse_batch_sizes(args.batch_sizes)
    if args.output_tokens < 8:
        raise UserError(f"--output-tokens: expected at least 8, got {args.output_tokens}")
    settings = settings_from_args(args, resolve_target(args.target))
    check_vllm_version()
    check_cpu_settings(settings)
    key = profile_key_for_settings(settings)
    profile = None if args.force else load_cached_profile(key)
    if profile is None:
        profile = calibrate(settings, batch_sizes, args.output_tokens)
        print(f"lk-vllm calibrate: baseline written to {profile_path(key)}", file=sys.stderr)
    else:
        print(
            f"lk-vllm calibrate: using the cached baseline {profile_path(key)} (--force to measure again)",
            file=sys.stderr,
        )
    if args.output:
        profile.save(Path(args.output))
    for point in profile.points:
        print(
            f"  batch {int(point['batch_size']):3d}: {point['seconds_per_token'] * 1000:7.2f} ms/token "
            f"({1 / point['seconds_per_token']:.1f} tokens/s)",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps(profile.as_json()))
    return 0


if __name__ == "__main__":
    from lk_vllm.cli import main

    sys.exit(main(["calibrate", *sys.argv[1:]]))
