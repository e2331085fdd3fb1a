"""``lk-vllm calibrate``: the no-speculation baseline that live speed-up is measured against.

Starts the target in vLLM's async engine (the one the OpenAI server uses) with speculation OFF and the same
step recorder the server uses (``lk_vllm.plugin.stat_logger``), runs ``b`` concurrent greedy requests that
each generate exactly ``--output-tokens`` tokens for every batch size ``b`` in ``--batch-sizes``, and keeps
the decode time per output token of the pure decode steps at each ``b``. The profile is written atomically
under ``lk_home()/calibration``, keyed by target fingerprint, dtype, hardware and vLLM version, and reused by
``lk-vllm serve`` (and by the plugin under plain vLLM) for that key.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from pathlib import Path

from lk_vllm.engine import EngineSettings, add_engine_arguments, apply_engine_env, settings_from_args
from lk_vllm.errors import UserError

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16)
# Varied prompts of similar length so prefix caching and early stops do not change the batch.
_PROMPT_TOPICS = ("rivers", "bridges", "volcanoes", "libraries", "glaciers", "markets", "orchards", "harbours",
                  "deserts", "railways", "forests", "castles", "islands", "bakeries", "lighthouses", "canals")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", nargs="?", default=None, help="target model (default: the embedded default)")
    parser.add_argument("--batch-sizes", default=",".join(map(str, DEFAULT_BATCH_SIZES)),
                        help="comma-separated batch sizes to measure (default 1,2,4,8,16)")
    parser.add_argument("--output-tokens", type=int, default=64, help="tokens generated per request (default 64)")
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


async def _measure(settings: EngineSettings, batch_sizes: list[int], output_tokens: int) -> list[dict]:
    from tqdm import tqdm
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from lk_vllm.plugin.stat_logger import LkStatLogger
    from serving.live_stats import LiveStatsStore

    store = LiveStatsStore()

    class CalibrationLogger(LkStatLogger):
        record_without_speculation = True

        def __init__(self, vllm_config, engine_index: int = 0):
            super().__init__(vllm_config, engine_index)
            self.store = store

    kwargs = settings.llm_kwargs()
    kwargs["max_num_seqs"] = max(kwargs.get("max_num_seqs") or 0, max(batch_sizes))
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs), stat_loggers=[CalibrationLogger])
    params = SamplingParams(max_tokens=output_tokens, ignore_eos=True, temperature=0.0)

    async def one(prompt: str) -> None:
        async for _ in engine.generate(prompt, params, request_id=uuid.uuid4().hex):
            pass

    try:
        await asyncio.gather(*(one(_prompt(i)) for i in range(2)))  # warm-up, not measured
        points = []
        for batch_size in tqdm(batch_sizes, desc="calibrating (speculation off)", file=sys.stderr):
            store.reset()
            await asyncio.gather(*(one(_prompt(i)) for i in range(batch_size)))
            steps = [s for s in store.steps() if s.decode_seconds is not None and s.batch_size == batch_size]
            tokens = sum(s.output_tokens for s in steps)
            seconds = sum(s.decode_seconds for s in steps)
            if tokens == 0:
                raise RuntimeError(f"no pure decode step was recorded at batch size {batch_size}")
            points.append({"batch_size": batch_size, "seconds_per_token": seconds / tokens, "tokens": tokens,
                           "steps": len(steps)})
        return points
    finally:
        engine.shutdown()
        engine = None  # noqa: F841 - its __del__ shuts down again; let it run while the interpreter is whole


def calibrate(settings: EngineSettings, batch_sizes: list[int], output_tokens: int):
    """Measure and cache a profile for ``settings`` (speculation is switched off here)."""
    import dataclasses

    from serving.speedup import BaselineProfile, profile_key_for_settings, profile_path

    settings = dataclasses.replace(settings, speculative_config=None)
    key = profile_key_for_settings(settings)
    started = time.time()
    points = asyncio.run(_measure(settings, batch_sizes, output_tokens))
    profile = BaselineProfile(key=key | {"output_tokens": output_tokens, "seconds": time.time() - started},
                              points=points)
    profile.save(profile_path(key))
    return profile


def run(args: argparse.Namespace) -> int:
    apply_engine_env()
    from lk_vllm.assets import resolve_target
    from lk_vllm.engine import check_cpu_settings, check_vllm_version
    from serving.speedup import load_cached_profile, profile_key_for_settings, profile_path

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
        print(f"lk-vllm calibrate: using the cached baseline {profile_path(key)} (--force to measure again)",
              file=sys.stderr)
    if args.output:
        profile.save(Path(args.output))
    for point in profile.points:
        print(f"  batch {int(point['batch_size']):3d}: {point['seconds_per_token'] * 1000:7.2f} ms/token "
              f"({1 / point['seconds_per_token']:.1f} tokens/s)", file=sys.stderr)
    if args.json:
        print(json.dumps(profile.as_json()))
    return 0


if __name__ == "__main__":
    from lk_vllm.cli import main

    sys.exit(main(["calibrate", *sys.argv[1:]]))
