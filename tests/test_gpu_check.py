"""scripts/gpu_check.sh on the CPU (what CI can run of it): every stage passes, and a broken stage fails."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_gpu_check_passes_every_stage_on_cpu(default_target, tmp_path):
    done = subprocess.run([str(ROOT / "scripts" / "gpu_check.sh"), "--device", "cpu", "--steps", "6",
                           "--seq-len", "96", "--batch", "2"], capture_output=True, text=True, timeout=1200)
    lines = [line for line in done.stdout.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert [line.split(":")[0] for line in lines] == ["PASS loss", "PASS train", "PASS ddp", "PASS fsdp2"], (
        done.stdout[-3000:] + done.stderr[-3000:])
    assert "the default target" in lines[1] and "tokens/s" in lines[1]
    assert done.returncode == 0 and done.stdout.rstrip().endswith("PASS (4/4 stages)")
    logs = sorted(ROOT.glob("gpu-check-*.log"))
    assert logs and "PASS train" in logs[-1].read_text()
    logs[-1].unlink()


def test_gpu_check_refuses_a_missing_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    done = subprocess.run([str(ROOT / "scripts" / "gpu_check.sh"), "--device", "cuda"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode != 0
    assert "training.device=cuda: no CUDA device is visible" in done.stdout + done.stderr
