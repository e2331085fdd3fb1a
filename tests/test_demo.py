"""`lk-vllm demo` end to end, as a new user runs it (`make demo` runs exactly this command)."""

import re
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_runs_speculative_decoding_and_reports_acceptance(default_target):
    out = subprocess.run([sys.executable, "-m", "lk_vllm.cli", "demo", "--max-tokens", "48"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    for step in ("[1]", "[2]", "[3]"):
        assert step in out.stdout
    length = float(re.search(r"mean acceptance length: ([0-9.]+)", out.stdout).group(1))
    rates = [float(x) for x in re.search(r"per-position acceptance: \[([^\]]*)\]", out.stdout).group(1).split(",")]
    assert len(rates) == 4 and all(0.0 <= r <= 1.0 for r in rates)
    assert rates == sorted(rates, reverse=True)  # a later position is accepted only after the earlier ones
    assert length == pytest.approx(1 + sum(rates), abs=0.02)  # the same counters, two views
    assert length > 1.0  # the n-gram drafter copies the repeated text
    assert "INFO" not in out.stdout  # plain-language output, not engine logs
