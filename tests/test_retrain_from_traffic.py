"""examples/retrain_from_traffic.sh end to end on the default target at a small size: serve the default drafter
with capture on, code traffic, capture, prepare the captured prompts, fine-tune into B, validate B, swap B in
while requests stream (none may fail), measure B. The acceptance gain at full size is reported in
benchmarks/results/retrain-from-traffic.md; a 4-step fine-tune here only has to complete the loop."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from serving.launcher import free_port

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
ROOT = Path(__file__).resolve().parents[1]


def test_the_retrain_loop_completes_and_the_swap_fails_no_request(default_target, tmp_path):
    work = tmp_path / "loop"
    env = {
        **os.environ,
        "TRAFFIC": "40",
        "HELDOUT": "6",
        "STEPS": "4",
        "MAX_TOKENS": "48",
        "WORK": str(work),
        "PORT": str(free_port()),
    }
    result = subprocess.run(
        ["bash", "examples/retrain_from_traffic.sh"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=2400,
    )
    server_log = (
        (work / "server.log").read_text(errors="replace")[-3000:] if (work / "server.log").exists() else ""
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:] + server_log

    traffic = json.loads((work / "traffic.json").read_text())
    assert traffic["requests"] == 40 and traffic["failed"] == 0
    capture = json.loads((work / "capture.json").read_text())
    assert capture["enabled"] is False and capture["captured"] > 0
    captured = [
        json.loads(line)
        for path in (work / "capture").glob("*.jsonl")
        for line in path.read_text().splitlines()
    ]
    assert len(captured) == capture["captured"]
    assert all(
        set(row) >= {"messages"} and "authorization" not in json.dumps(row).lower() for row in captured
    )
    manifest = json.loads((work / "data" / "manifest.json").read_text())
    assert manifest["samples"] > 0

    swap = json.loads((work / "swap.json").read_text())
    assert swap["status"] == "swapped" and swap["drafter"]["path"].endswith("/B")
    during = json.loads((work / "during-swap.json").read_text())
    assert during["requests"] > 0 and during["failed"] == 0
    stats = json.loads((work / "stats.json").read_text())
    assert stats["live_drafter"].endswith("/B")
    for name in ("before", "after"):
        report = json.loads((work / f"{name}.json").read_text())
        assert report["failed"] == 0 and report["acceptance_length_pooled"] >= 1.0
    assert "acceptance length on the held-out code prompts" in result.stdout
