"""The measured speed-up (lk_vllm.plugin.server.speedup): the calibrated baseline interpolated between
batch sizes, baseline time over live time weighted by traffic, and calibration profiles that cannot be read."""

from __future__ import annotations

import json

import pytest
from server_helpers import make_profile

from lk_vllm.errors import UserError
from lk_vllm.plugin.server import speedup
from lk_vllm.plugin.server.live_stats import DrafterInfo, LiveStatsStore

pytestmark = pytest.mark.unit


def test_baseline_interpolates_between_measured_batch_sizes():
    profile = make_profile([(1, 0.1), (4, 0.04), (8, 0.02)])
    assert profile.seconds_per_token(1) == pytest.approx(0.1)
    assert profile.seconds_per_token(2) == pytest.approx(0.08)
    assert profile.seconds_per_token(6) == pytest.approx(0.03)
    assert profile.seconds_per_token(20) == pytest.approx(0.02)  # clamped at the ends


def test_speedup_is_baseline_time_over_live_time_traffic_weighted():
    store = LiveStatsStore()
    store.set_baseline(make_profile([(1, 0.1), (4, 0.04)]))
    store.set_drafter(DrafterInfo(name="d", method="ngram", architecture="ngram", num_speculative_tokens=2))
    clock = [100.0]

    def step(batch, tokens, seconds):
        clock[0] += seconds
        store.record_step(batch_size=batch, output_tokens=tokens, timed=True, now=clock[0])

    store.record_step(batch_size=1, output_tokens=1, timed=False, now=clock[0])
    step(1, 3, 0.1)  # 3 tokens that would have cost 0.3 s: 3x
    step(4, 8, 0.16)  # 8 tokens at batch 4, 0.32 s without speculation: 2x
    result = speedup.speedup_of_steps(store.steps(), store.baseline)
    assert result["speedup"] == pytest.approx((0.3 + 0.32) / (0.1 + 0.16))
    assert result["speedup_by_batch_size"]["1"]["speedup"] == pytest.approx(3.0)
    assert result["speedup_by_batch_size"]["2-4"]["speedup"] == pytest.approx(2.0)
    assert result["tokens_per_s"] == pytest.approx(11 / 0.26)
    assert speedup.speedup_of_steps(store.steps(), None)["speedup"] is None


def test_profile_load_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="bad.json: expected a JSON calibration profile"):
        speedup.BaselineProfile.load(bad)
    bad.write_text(json.dumps({"points": [{"batch_size": 0, "seconds_per_token": 1}]}))
    with pytest.raises(UserError, match="batch_size >= 1"):
        speedup.BaselineProfile.load(bad)
    with pytest.raises(UserError, match="file not found"):
        speedup.BaselineProfile.load(tmp_path / "missing.json")
    good = make_profile([(2, 0.05), (1, 0.1)])
    good.points.sort(key=lambda p: p["batch_size"])
    path = good.save(tmp_path / "sub" / "p.json")
    assert speedup.BaselineProfile.load(path).seconds_per_token(1) == pytest.approx(0.1)
    assert not list((tmp_path / "sub").glob("*.tmp"))
