"""The acceptance drift alarm (lk_vllm.plugin.server.drift) at unit level: the store is fed engine steps as
the stat logger records them, a worse drafter is swapped in, and the stats JSON and the Prometheus gauges must
say so with the window's numbers; the reference learned from a drafter's first minutes; the --drift-threshold
checks (the settings serve hands to the server: test_launcher.py)."""

from __future__ import annotations

import json
import time

import pytest
from train_helpers import FAKE_TARGET_CONFIG

from lk_vllm.errors import UserError
from lk_vllm.plugin.server.drift import MIN_DRAFTS, DriftMonitor, DriftSettings
from lk_vllm.plugin.server.live_stats import DrafterInfo, LiveStatsStore

pytestmark = pytest.mark.unit


K = 2
# Expected acceptance length 1 + 0.8 + 0.8 * 0.5 = 2.2 at T=0, 1 + 0.6 + 0.6 * 0.5 = 1.9 sampled.
HELDOUT = {"top1_agreement": [0.8, 0.5], "per_position_alpha": [0.6, 0.5]}


def _drafter(root, name, heldout=HELDOUT, eval_data=None):
    path = root / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLMEagle3"]}))
    if heldout is not None:
        training = {"loss": "lambda", "heldout": heldout, **({"eval_data": eval_data} if eval_data else {})}
        (path / "lk_training.json").write_text(json.dumps({"training": training}))
    return str(path)


def _serve(
    store, name, requests, accepted_per_request, mode="temperature_0", drafts_per_request=10, now=None
):
    """``requests`` finished requests of this drafter, each with its own counters, one engine step each."""
    if store.drafter is None or store.drafter.name != name:
        store.set_drafter(DrafterInfo(name=name, method="eagle3", architecture="x", num_speculative_tokens=K))
    for _ in range(requests):
        store.record_step(
            batch_size=1,
            output_tokens=drafts_per_request + accepted_per_request,
            timed=False,
            num_drafts=drafts_per_request,
            num_draft_tokens=K * drafts_per_request,
            num_accepted_tokens=accepted_per_request,
            requests=[(drafts_per_request, accepted_per_request, mode)],
            now=now,
        )


@pytest.fixture
def store():
    store = LiveStatsStore()
    store.set_per_request_source("vLLM's per-request speculative-decoding metrics (summary)")
    return store


def test_swapping_in_a_worse_drafter_raises_the_alarm_with_the_windows_numbers(tmp_path, store):
    from prometheus_client import CollectorRegistry, generate_latest

    from lk_vllm.plugin.server.routes import LkCollector, stats_payload

    monitor = DriftMonitor(DriftSettings(threshold=0.75, window_seconds=60))
    registry = CollectorRegistry()
    registry.register(LkCollector(store, drift=monitor))
    good, worse = _drafter(tmp_path, "good"), _drafter(tmp_path, "worse")  # both claim 2.2 at T=0

    _serve(store, good, requests=10, accepted_per_request=12)  # 2.2 per step: as trained
    drift = stats_payload(store, 60, None, monitor)["drift"]
    assert drift["drifting"] is False and drift["reason"] is None
    checks = {c["sampling"]: c for c in drift["checks"]}
    assert checks["sampled"]["drifting"] is None  # no sampled traffic yet: not judged
    check = checks["temperature_0"]
    assert check["expected"] == pytest.approx(2.2)
    assert check["observed"] == pytest.approx(2.2) and check["ratio"] == pytest.approx(1.0)
    assert "lk_acceptance_drift 0.0" in generate_latest(registry).decode()

    _serve(store, worse, requests=10, accepted_per_request=2)  # 1.2 per step: 55% of what it should reach
    drift = stats_payload(store, 60, None, monitor)["drift"]
    assert drift["drifting"] is True and drift["drafter"] == worse and drift["window_seconds"] == 60
    check = {c["sampling"]: c for c in drift["checks"]}["temperature_0"]
    assert check["observed"] == pytest.approx(1.2) and check["ratio"] == pytest.approx(1.2 / 2.2)
    assert check["num_drafts"] == 100 and check["requests"] == 10 and check["drifting"] is True
    text = generate_latest(registry).decode()
    assert "lk_acceptance_drift 1.0" in text
    assert f'lk_acceptance_drift_ratio{{sampling="temperature_0"}} {1.2 / 2.2}' in text
    assert 'lk_expected_acceptance_length{sampling="temperature_0"} 2.2' in text
    # Sampled traffic is judged against alpha (1.9): at 1.8 it is fine, and the T=0 check still drifts.
    _serve(store, worse, requests=10, accepted_per_request=8, mode="sampled")
    checks = {c["sampling"]: c for c in stats_payload(store, 60, None, monitor)["drift"]["checks"]}
    assert checks["sampled"]["expected"] == pytest.approx(1.9) and checks["sampled"]["drifting"] is False
    assert checks["temperature_0"]["drifting"] is True
    # Statistics of another drafter carry no drift check (it is about the live one).
    assert "drift" not in stats_payload(store, 60, good, monitor)


def test_a_threshold_of_one_flags_any_shortfall_and_too_little_traffic_is_not_judged(tmp_path, store):
    drafter = _drafter(tmp_path, "d")
    _serve(store, drafter, requests=1, accepted_per_request=2)  # 10 drafts: below MIN_DRAFTS
    assert MIN_DRAFTS > 10
    drift = DriftMonitor(DriftSettings(threshold=1.0)).check(store)
    assert drift["drifting"] is None and f"fewer than {MIN_DRAFTS} drafts" in drift["reason"]
    _serve(store, drafter, requests=9, accepted_per_request=11)  # 100 drafts, 101 accepted: 2.01 < 2.2
    assert DriftMonitor(DriftSettings(threshold=1.0)).check(store)["drifting"] is True
    assert DriftMonitor(DriftSettings(threshold=0.9)).check(store)["drifting"] is False


def test_without_a_training_record_the_first_minutes_are_the_reference(tmp_path, store):
    drafter = _drafter(tmp_path, "no-record", heldout=None)
    monitor = DriftMonitor(DriftSettings(threshold=0.75, window_seconds=60, reference_seconds=120))
    now = time.monotonic()
    _serve(
        store, drafter, requests=10, accepted_per_request=15, now=now - 10
    )  # 2.5, but only 10 s of traffic
    drift = monitor.check(store)
    assert drift["drifting"] is None and "first 2 minutes of traffic" in drift["reason"]

    store.reset()
    _serve(store, drafter, requests=10, accepted_per_request=15, now=now - 300)  # the first minutes: 2.5
    _serve(store, drafter, requests=10, accepted_per_request=5, now=now - 5)  # now 1.5: 60% of it
    drift = monitor.check(store)
    (check,) = drift["checks"]
    assert check["sampling"] == "all" and check["expected"] == pytest.approx(2.5)
    assert "first 2 minutes" in check["expected_source"]
    assert check["observed"] == pytest.approx(1.5) and drift["drifting"] is True


def test_without_per_request_counters_a_training_record_cannot_be_matched_by_mode(tmp_path):
    store = LiveStatsStore()  # plain vLLM without --per-request-spec-decode-metrics: no per-request source
    drafter = _drafter(tmp_path, "d")
    _serve(store, drafter, requests=10, accepted_per_request=12)
    drift = DriftMonitor(DriftSettings(reference_seconds=60)).check(store)
    assert drift["drifting"] is None and "learning the expected acceptance" in drift["reason"]


@pytest.mark.parametrize("value", [0, -0.5, 1.5, float("nan"), float("inf")])
def test_a_threshold_outside_zero_one_is_a_one_line_error(value, tmp_path):
    with pytest.raises(UserError, match=r"--drift-threshold: expected a fraction in \(0, 1\]"):
        DriftSettings(threshold=value)

    import argparse

    from serving import launcher

    target = tmp_path / "target"
    target.mkdir()
    (target / "config.json").write_text(json.dumps(FAKE_TARGET_CONFIG))
    parser = argparse.ArgumentParser()
    launcher.add_arguments(parser)
    args = parser.parse_args([str(target), "--drift-threshold", str(value)])
    with pytest.raises(UserError) as error:
        launcher.build_server_command(args)
    message = str(error.value)
    assert "--drift-threshold" in message and str(value) in message and "\n" not in message


def test_the_expectation_comes_from_the_eval_data_when_the_drafter_has_some(tmp_path, store):
    from lk_vllm.plugin.server.routes import stats_payload

    # Two eval sets at T=0 pooled by positions (1 : 3): 1 + 0.5 + 0.5 * 0.5 = 1.75; none sampled: held out.
    eval_data = [
        {
            "name": "mt",
            "temperature": 0.0,
            "datasets": ["mtbench"],
            "positions": 10,
            "top1_agreement": [0.2, 0.5],
        },
        {
            "name": "gsm",
            "temperature": 0.0,
            "datasets": ["gsm8k"],
            "positions": 30,
            "top1_agreement": [0.6, 0.5],
        },
    ]
    drafter = _drafter(tmp_path, "with-eval", eval_data=eval_data)
    monitor = DriftMonitor(DriftSettings(threshold=0.75, window_seconds=60))
    _serve(store, drafter, requests=10, accepted_per_request=7)  # 1.7 per step
    _serve(store, drafter, requests=10, accepted_per_request=9, mode="sampled")  # 1.9 per step
    checks = {c["sampling"]: c for c in stats_payload(store, 60, None, monitor)["drift"]["checks"]}
    assert checks["temperature_0"]["expected"] == pytest.approx(1.75)
    assert checks["temperature_0"]["expected_source"] == "lk_training.json eval data mt, gsm"
    assert checks["sampled"]["expected"] == pytest.approx(1.9)
    assert checks["sampled"]["expected_source"] == "lk_training.json held-out training samples"
