"""Bounded loopback load test of ``lk-vllm serve``: N concurrent clients (half streaming) for a fixed time.

    python benchmarks/serving_load.py [--clients 32] [--seconds 120] [--max-tokens 32] [--target DIR]

Calibrates the no-speculation baseline (`lk-vllm calibrate --force`, batch sizes up to --clients), starts the
server (n-gram speculation, K=4, on the default target unless --target), checks that every
request succeeded and that the server's speculative-decoding counters grew by exactly the sum of the
per-response metrics, and writes benchmarks/results/serving_load.json and .md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PASSAGE = (
    "The old lighthouse keeper climbed the spiral stairs every evening at dusk. He trimmed the wick, polished the "
    "great lens, and wrote the weather in a leather book. Ships passed safely through the narrow channel because "
    "the light never failed. "
)
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--target", default=None)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "serving_load"))
    args = parser.parse_args()

    from lk_vllm.assets import resolve_target
    from lk_vllm.plugin.server.speedup import hardware_id, installed_vllm_version
    from serving.client import complete, request_json
    from serving.launcher import start_server

    target = resolve_target(args.target)
    # A fresh baseline covering the batch sizes this load reaches (the server reads the cached profile).
    import subprocess

    subprocess.run(
        [
            sys.executable,
            "-m",
            "lk_vllm.cli",
            "calibrate",
            "--target",
            target,
            "--force",
            "--max-model-len",
            "1024",
            "--batch-sizes",
            f"1,4,8,16,{args.clients}",
            "--output-tokens",
            "32",
        ],
        check=True,
    )
    serve_args = [
        "--target",
        target,
        "--speculative-config",
        json.dumps(NGRAM),
        "--max-model-len",
        "1024",
        "--max-num-seqs",
        str(args.clients),
    ]
    import tempfile

    log_path = Path(tempfile.gettempdir()) / "lk_serving_load.server.log"
    server = start_server(serve_args, log_path=log_path, timeout=900)
    try:
        complete(server.url, target, prompt=PASSAGE, max_tokens=8)  # warm-up
        before = request_json(server.url, "/v1/speculative/stats")["since_start"]
        deadline = time.monotonic() + args.seconds
        errors: list[str] = []

        def client(index: int) -> list:
            results = []
            while time.monotonic() < deadline:
                try:
                    results.append(
                        complete(
                            server.url,
                            target,
                            prompt=PASSAGE * (1 + index % 3),
                            max_tokens=args.max_tokens,
                            stream=index % 2 == 0,
                            timeout=300,
                        )
                    )
                except Exception as exc:  # counted, reported, and fails the run
                    errors.append(f"client {index}: {exc}")
            return results

        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
            results = [r for rs in pool.map(client, range(args.clients)) for r in rs]
        elapsed = time.monotonic() - started
        time.sleep(1.0)
        stats = request_json(server.url, "/v1/speculative/stats?window=" + str(args.seconds + 30))
        after = stats["since_start"]
    finally:
        server.stop()

    sums = {
        "draft_tokens": sum((r.spec_metrics or {}).get("num_draft_tokens", 0) for r in results),
        "accepted_tokens": sum((r.spec_metrics or {}).get("num_accepted_draft_tokens", 0) for r in results),
        "num_drafts": sum((r.spec_metrics or {}).get("num_spec_steps", 0) for r in results),
        "output_tokens": sum(r.completion_tokens for r in results),
    }
    deltas = {key: after[key] - before[key] for key in sums}
    record = {
        "target": target,
        "hardware": hardware_id(),
        "platform": platform.platform(),
        "vllm_version": installed_vllm_version(),
        "command": " ".join(sys.argv),
        "clients": args.clients,
        "seconds": elapsed,
        "requests": len(results),
        "streaming_requests": sum(1 for r in results if r.first_token is not None),
        "errors": errors,
        "output_tokens_per_s": sums["output_tokens"] / elapsed,
        "per_response_sums": sums,
        "server_counter_deltas": deltas,
        "counters_match": sums == deltas,
        "acceptance_length": stats["acceptance_length"],
        "per_position_acceptance": stats["per_position_acceptance"],
        "speedup": stats["speedup"],
        "speedup_by_batch_size": stats["speedup_by_batch_size"],
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output + ".json").write_text(json.dumps(record, indent=1))
    lines = [
        "# Serving load test (loopback)",
        "",
        f"`{record['command']}` on {record['hardware']}, vLLM {record['vllm_version']}, target {target}, "
        f"n-gram speculation K=4.",
        "",
        "| clients | seconds | requests (streaming) | errors | output tokens/s | acceptance length | counters match |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| {args.clients} | {elapsed:.0f} | {len(results)} ({record['streaming_requests']}) | {len(errors)} | "
        f"{record['output_tokens_per_s']:.1f} | {stats['acceptance_length']:.2f} | {record['counters_match']} |",
        "",
        f"Per-response sums: {sums}",
        "",
        f"Server counter deltas: {deltas}",
    ]
    Path(args.output + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if not errors and record["counters_match"] else 1


if __name__ == "__main__":
    sys.exit(main())
