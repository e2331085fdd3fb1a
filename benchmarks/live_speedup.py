"""Live speed-up of `lk-vllm serve` against an A/B through the same server: benchmarks/results/live-speedup.{json,md}.

    python benchmarks/live_speedup.py [--limit 6] [--max-tokens 128] [--layout in-process]

For each CPU process layout (see benchmarks/cpu_spec_step.py): serve the default target with vLLM's n-gram
drafter (K=4, the demo's config), send the first --limit MT-Bench prompts one after another (batch 1, T=0),
read the live speed-up from ``/v1/speculative/stats`` (measured against the calibrated baseline); then serve it
without speculation and send the same prompts. A/B speed-up = tokens/s with n-gram / tokens/s without, client
side, same prompts, same server settings. The live figure should agree within 10%.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.cpu_spec_step import LAYOUTS, num  # noqa: E402


def serve_and_send(
    target: str, prompts: list[list[dict]], max_tokens: int, spec: dict | None, env: dict
) -> dict:
    from serving.client import complete, request_json
    from serving.launcher import start_server

    args = ["--target", target, "--max-model-len", "2048"]
    if spec is not None:
        args += ["--speculative-config", json.dumps(spec)]
    log = Path(tempfile.mkdtemp(prefix="lk-live-")) / "server.log"
    server = start_server(args, env=env, log_path=log, timeout=1800)
    try:
        complete(server.url, target, messages=prompts[0], max_tokens=8)  # warm-up
        started, tokens = time.monotonic(), 0
        for messages in prompts:
            tokens += complete(server.url, target, messages=messages, max_tokens=max_tokens).completion_tokens
        seconds = time.monotonic() - started
        stats = None
        if spec is not None:
            window = seconds + 1
            stats = request_json(server.url, f"/v1/speculative/stats?window={window:.0f}")
    finally:
        server.stop()
    return {"tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds, "stats": stats}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--layout", action="append", choices=["worker-process", "in-process"], default=None)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "live-speedup"))
    args = parser.parse_args()

    from lk_vllm.assets import resolve_target
    from lk_vllm.atomic import write_atomic
    from lk_vllm.datasets import load_prompts
    from lk_vllm.engine import vllm_version
    from lk_vllm.plugin.server.speedup import hardware_id
    from serving.demo import NGRAM_CONFIG

    target = resolve_target(None)
    prompts = [p.messages for p in load_prompts("mtbench", limit=args.limit)]
    rows = []
    for layout in args.layout or ["worker-process", "in-process"]:
        env = {**os.environ, **LAYOUTS[layout]}
        print(f"[live-speedup] {layout}: n-gram server", file=sys.stderr, flush=True)
        spec = serve_and_send(target, prompts, args.max_tokens, dict(NGRAM_CONFIG), env)
        print(f"[live-speedup] {layout}: no-speculation server", file=sys.stderr, flush=True)
        plain = serve_and_send(target, prompts, args.max_tokens, None, env)
        stats = spec["stats"] or {}
        ab = spec["tokens_per_second"] / plain["tokens_per_second"]
        live = stats.get("speedup")
        rows.append(
            {
                "layout": layout,
                "ngram_tokens_per_second": spec["tokens_per_second"],
                "plain_tokens_per_second": plain["tokens_per_second"],
                "ab_speedup": ab,
                "live_speedup": live,
                "live_acceptance_length": stats.get("acceptance_length"),
                "live_vs_ab_percent": None if live is None else 100 * (live - ab) / ab,
                "baseline": stats.get("baseline"),
            }
        )
    document = {
        "name": "live-speedup",
        "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python benchmarks/live_speedup.py " + " ".join(sys.argv[1:]),
        "hardware": hardware_id(),
        "vllm_version": vllm_version(),
        "settings": {"limit": args.limit, "max_tokens": args.max_tokens, "speculative_config": NGRAM_CONFIG},
        "rows": rows,
    }

    lines = [
        f"# Live speed-up vs A/B through `lk-vllm serve` ({document['hardware']})",
        "",
        f"`{document['command'].strip()}` ({document['created']}, vLLM {document['vllm_version']}). "
        f"{args.limit} MT-Bench prompts at batch 1, T=0, {args.max_tokens} tokens, n-gram K=4; A/B = client "
        "tokens/s with n-gram / without, two servers in turn; live = `/v1/speculative/stats` speedup "
        "(against the calibrated baseline).",
        "",
        "| layout | n-gram tokens/s | plain tokens/s | A/B speedup | live speedup | live vs A/B | "
        "live acceptance length |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['layout']} | {num(r['ngram_tokens_per_second'], 1)} | "
            f"{num(r['plain_tokens_per_second'], 1)} | {num(r['ab_speedup'])}x | "
            f"{num(r['live_speedup'])}x | {num(r['live_vs_ab_percent'], 1)}% | "
            f"{num(r['live_acceptance_length'])} |"
        )
    out = Path(args.output)
    write_atomic(out.with_suffix(".md"), "\n".join(lines) + "\n")
    write_atomic(out.with_suffix(".json"), json.dumps(document, indent=1) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
