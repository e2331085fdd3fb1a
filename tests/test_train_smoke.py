"""One real (shortened) smoke recipe on the default target: `lk-vllm train` prepares the data itself through
vLLM, captures hidden states offline, trains and exports a drafter that loads for the target."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_smoke_recipe_prepares_trains_and_exports(default_target, tmp_path):
    from lk_vllm.assets import lk_home, target_fingerprint
    from lk_vllm.drafters import load_drafter, speculative_config_for
    from lk_vllm.target_model import TargetModel

    home = tmp_path / "home"
    home.mkdir()
    (home / "models").symlink_to(lk_home() / "models")  # the built target; everything else starts empty
    env = {**os.environ, "LK_VLLM_HOME": str(home)}
    command = [
        sys.executable,
        "-m",
        "lk_vllm.cli",
        "train",
        "--recipe",
        "smoke-eagle3",
        "--no-progress",
        "--set",
        "data.limit=12",
        "--set",
        "data.max_tokens=48",
        "--set",
        "data.heldout=2",
        "--set",
        "training.max_steps=4",
        "--set",
        "training.eval_every=2",
        "--output",
        str(tmp_path / "run"),
    ]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "preparing data: the target regenerates sharegpt" in result.stderr

    data_dirs = list((home / "data").iterdir())
    assert len(data_dirs) == 1
    manifest = json.loads((data_dirs[0] / "manifest.json").read_text())
    assert manifest["prompts"] == 12 and manifest["settings"]["target_fingerprint"] == target_fingerprint(
        default_target
    )
    cache = json.loads(next((home / "capture").glob("*/manifest.json")).read_text())
    assert cache["num_samples"] == manifest["samples"] and cache["dtype"] == "bfloat16"

    final = tmp_path / "run" / "final"
    record = json.loads((final / "lk_training.json").read_text())
    training = record["training"]
    assert training["loss"] == "lambda" and training["steps"] == 4 and training["num_steps"] == 3
    assert training["target_fingerprint"] == target_fingerprint(default_target)
    heldout = training["heldout"]
    assert len(heldout["per_position_alpha"]) == 3 and heldout["expected_acceptance_length"] > 1.0
    drafter = load_drafter(final, TargetModel(default_target))
    assert drafter.draft_vocab_size == 8192
    assert speculative_config_for(final, 3)["method"] == "eagle3"
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "eval" in r] == [2, 4]
