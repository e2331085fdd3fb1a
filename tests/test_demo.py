"""`lk-vllm demo` end to end, as a new user runs it (`make demo` runs the same command without --keep-serving):
it serves the default target with the default LK drafter (lk_vllm/default_drafter, installed beside the target)
through `lk-vllm serve`, sends traffic, prints the live statistics and the dashboard URL, keeps serving until
Ctrl-C and then shuts the server down cleanly."""

import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import psutil
import pytest

from serving.client import request_json
from serving.launcher import free_port

pytestmark = pytest.mark.e2e


def read_until(process, marker: str, timeout: float) -> str:
    """stdout of ``process`` up to and including the first line containing ``marker``."""
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            raise AssertionError("the demo ended early:\n" + "".join(lines) + process.stderr.read()[-3000:])
        lines.append(line)
        if marker in line:
            return "".join(lines)
    raise AssertionError("the demo did not get there in time:\n" + "".join(lines))


@pytest.mark.slow
def test_demo_serves_sends_traffic_prints_live_stats_and_stops_on_ctrl_c(default_target, tmp_path):
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lk_vllm.cli",
            "demo",
            "--requests",
            "4",
            "--max-tokens",
            "48",
            "--port",
            str(port),
            "--keep-serving",
            "--log",
            str(tmp_path / "server.log"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        out = read_until(process, "until Ctrl-C", timeout=1500)
        for step in ("[1]", "[2]", "[3]", "[4]", "[5]", "[6]"):
            assert step in out
        from lk_vllm.assets import default_drafter_dir

        assert f"the default LK drafter {default_drafter_dir()}" in out  # which drafter, said plainly
        assert "INFO" not in out  # plain-language output; the engine's logs go to the server log
        assert re.search(r"\(\d+ tokens, acceptance length [0-9.]+\)", out)  # each answer's own metrics

        length = float(re.search(r"acceptance length: ([0-9.]+)", out).group(1))
        rates = [
            float(x) for x in re.search(r"per-position acceptance: \[([^\]]*)\]", out).group(1).split(",")
        ]
        draft_tokens, accepted = map(int, re.search(r"draft tokens: (\d+), accepted: (\d+)", out).groups())
        live = request_json(url, "/v1/speculative/stats")
        assert live["method"] == "eagle3" and live["drafter"]["path"] == str(default_drafter_dir())
        assert len(rates) == live["num_speculative_tokens"] and all(0.0 <= r <= 1.0 for r in rates)
        assert rates == sorted(
            rates, reverse=True
        )  # a later position is accepted only after the earlier ones
        assert length == pytest.approx(1 + sum(rates), abs=0.02)  # the same counters, two views
        assert length > 1.0  # the trained drafter gets tokens accepted
        speedup = re.search(r"measured speed-up: ([0-9.]+)x", out)
        assert speedup is not None and float(speedup.group(1)) > 0, (
            out
        )  # measured against the calibrated baseline

        # What it printed is what the live server reports (the demo's traffic is all it has seen).
        stats = request_json(url, "/v1/speculative/stats")["since_start"]
        assert (stats["draft_tokens"], stats["accepted_tokens"]) == (draft_tokens, accepted)
        assert f"{url}/dashboard" in out
        with urllib.request.urlopen(f"{url}/dashboard", timeout=30) as page:
            assert page.status == 200 and "<html" in page.read().decode().lower()
        assert process.poll() is None  # still serving

        process.send_signal(signal.SIGINT)  # Ctrl-C
        rest, errors = process.communicate(timeout=120)
        assert process.returncode == 0, errors[-3000:]
        assert "Done." in rest
        with pytest.raises(urllib.error.URLError):  # the server is gone with it
            urllib.request.urlopen(f"{url}/health", timeout=5)
    finally:
        if process.poll() is None:
            # The demo's server runs in its own session: kill the whole tree, or a failed test leaks an engine.
            for child in psutil.Process(process.pid).children(recursive=True):
                child.kill()
            process.kill()
            process.wait()


def test_demo_help_and_bad_input_are_one_line_errors(tmp_path):
    help_text = subprocess.run(
        [sys.executable, "-m", "lk_vllm.cli", "demo", "--help"], capture_output=True, text=True
    )
    assert (
        help_text.returncode == 0 and "--keep-serving" in help_text.stdout and "--drafter" in help_text.stdout
    )
    missing = subprocess.run(
        [sys.executable, "-m", "lk_vllm.cli", "demo", "--drafter", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [
        f"lk-vllm demo: error: --drafter {tmp_path / 'nope'}: expected a "
        "drafter directory, `default` or `ngram`, found no such directory"
    ]


@pytest.mark.unit
def test_demo_serves_the_default_drafter_ngram_or_a_directory(tmp_path, monkeypatch):
    """Which `lk-vllm serve` arguments each --drafter value gives (no engine)."""
    import argparse

    from lk_vllm import assets
    from serving import demo

    def args(drafter):
        parser = argparse.ArgumentParser()
        demo.add_arguments(parser)
        return parser.parse_args([] if drafter is None else ["--drafter", drafter])

    installed = tmp_path / "installed"
    monkeypatch.setattr(assets, "install_default_drafter", lambda target=None: installed)
    flags, description = demo._serve_arguments(args(None), "T")
    assert flags == ["--target", "T", "--drafter", str(installed)] and "default LK drafter" in description
    flags, description = demo._serve_arguments(args("ngram"), "T")
    assert (
        flags[:3] == ["--target", "T", "--speculative-config"]
        and '"ngram"' in flags[3]
        and "n-gram" in description
    )
    flags, _ = demo._serve_arguments(args(str(tmp_path)), "T")
    assert flags == ["--target", "T", "--drafter", str(tmp_path.resolve())]
    monkeypatch.setattr(assets, "install_default_drafter", lambda target=None: None)  # none shipped: n-gram
    flags, _ = demo._serve_arguments(args(None), "T")
    assert flags[2] == "--speculative-config"
