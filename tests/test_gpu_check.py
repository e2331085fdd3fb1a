"""scripts/gpu_check.sh on the CPU (what CI can run of it): every stage passes, and a broken stage fails."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def run_check(tmp_path, *flags: str, timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "GPU_CHECK_LOG": str(tmp_path / "gpu-check.log")}
    return subprocess.run(
        [str(ROOT / "scripts" / "gpu_check.sh"), *flags],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_gpu_check_passes_every_stage_on_cpu(default_target, tmp_path):
    done = run_check(
        tmp_path, "--device", "cpu", "--steps", "6", "--seq-len", "96", "--batch", "2", timeout=1200
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert [line.split(":")[0] for line in lines] == ["PASS loss", "PASS train", "PASS ddp", "PASS fsdp2"], (
        done.stdout[-3000:] + done.stderr[-3000:]
    )
    assert "the default target" in lines[1] and "tokens/s" in lines[1]
    assert done.returncode == 0 and done.stdout.rstrip().endswith("PASS (4/4 stages)")
    assert "PASS train" in (tmp_path / "gpu-check.log").read_text()  # the log keeps what was printed


def test_gpu_check_refuses_a_missing_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    done = run_check(tmp_path, "--device", "cuda", timeout=300)
    assert done.returncode != 0
    assert "training.device=cuda: no CUDA device is visible" in done.stdout + done.stderr
