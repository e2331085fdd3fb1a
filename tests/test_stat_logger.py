"""The lk stat logger (lk_vllm.plugin.server.stat_logger) fed vLLM's own stats objects: counts, batch
sizes, decode timing, each finished request's own acceptance, and nothing without speculation."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from lk_vllm.plugin.server.live_stats import LiveStatsStore

pytestmark = pytest.mark.vllm


def _vllm_config(spec=None, model="/no/such/model"):
    return SimpleNamespace(
        speculative_config=spec,
        model_config=SimpleNamespace(model=model, dtype=torch.float32, enforce_eager=True),
    )


def _stats(running, drafts=0, draft_tokens=0, accepted=0, per_pos=(), tokens=1, first_tokens=0, finished=0):
    from vllm.v1.metrics.stats import IterationStats, SchedulerStats
    from vllm.v1.spec_decode.metrics import SpecDecodingStats

    spec = SpecDecodingStats(
        num_spec_tokens=len(per_pos),
        num_drafts=drafts,
        num_draft_tokens=draft_tokens,
        num_accepted_tokens=accepted,
        num_accepted_tokens_per_pos=list(per_pos),
    )
    scheduler = SchedulerStats(num_running_reqs=running, spec_decoding_stats=spec if drafts else None)
    iteration = IterationStats()
    iteration.num_generation_tokens = tokens
    iteration.time_to_first_tokens_iter = [0.1] * first_tokens
    iteration.finished_requests = [object()] * finished
    return scheduler, iteration


@pytest.mark.vllm
def test_stat_logger_records_counts_batch_and_decode_timing(monkeypatch):
    from lk_vllm.plugin.server import live_stats, stat_logger

    store = LiveStatsStore()
    monkeypatch.setattr(live_stats, "STORE", store)
    spec = SimpleNamespace(
        method="ngram",
        model=None,
        num_speculative_tokens=3,
        draft_sample_method="greedy",
        rejection_sample_method="standard",
    )
    logger = stat_logger.LkStatLogger(_vllm_config(spec))
    assert store.drafter.name == "ngram" and store.drafter.num_speculative_tokens == 3
    assert store.baseline is None and "lk-vllm calibrate" in store.baseline_error
    logger.record(*_stats(running=2, tokens=2, first_tokens=2))  # prefill step: not timed
    logger.record(
        *_stats(running=1, drafts=2, draft_tokens=6, accepted=3, per_pos=(2, 1, 0), tokens=5, finished=1)
    )
    steps = store.steps()
    assert [s.decode_seconds is None for s in steps] == [True, False]
    assert steps[1].batch_size == 2  # one still running + one that finished in this step
    summary = store.summary(steps)
    assert summary["num_drafts"] == 2 and summary["draft_tokens"] == 6 and summary["accepted_tokens"] == 3
    assert summary["acceptance_length"] == pytest.approx(2.5)
    assert summary["per_position_acceptance"] == pytest.approx([1.0, 0.5, 0.0])
    assert summary["output_tokens"] == 7


@pytest.mark.vllm
def test_stat_logger_is_inert_without_speculation(monkeypatch):
    from lk_vllm.plugin.server import live_stats, stat_logger

    store = LiveStatsStore()
    monkeypatch.setattr(live_stats, "STORE", store)
    logger = stat_logger.LkStatLogger(_vllm_config(None))
    logger.record(*_stats(running=1, tokens=1))
    assert store.steps() == [] and store.drafter is None


def _finished_request(temperature, accepted_per_step, num_spec_tokens=2):
    """One request finished through vLLM's output processor (lk's patch on), with vLLM's own per-request
    counters: ``accepted_per_step[i]`` draft tokens of K were accepted at step i."""
    from vllm.v1.engine.output_processor import OutputProcessor
    from vllm.v1.metrics.stats import IterationStats, RequestSpecDecodeMetrics, RequestStateStats

    from lk_vllm.plugin.patches import patch_finished_request_spec_metrics

    assert patch_finished_request_spec_metrics() and patch_finished_request_spec_metrics()  # idempotent
    metrics = RequestSpecDecodeMetrics.new(num_spec_tokens)
    for accepted in accepted_per_step:
        metrics.observe(num_draft_tokens=num_spec_tokens, num_accepted=accepted)
    req_state = SimpleNamespace(
        external_req_id="r",
        request_id="r",
        prompt_len=4,
        max_tokens_param=16,
        stats=RequestStateStats(arrival_time=0.0),
        num_cached_tokens=0,
        lora_name=None,
        parent_req=None,
        spec_decode_metrics=metrics,
        temperature=temperature,
    )
    processor = SimpleNamespace(lora_states=SimpleNamespace(request_finished=lambda *args: None))
    iteration = IterationStats()
    OutputProcessor._update_stats_from_finished(processor, req_state, "stop", iteration)
    return iteration.finished_requests[0]


def _ngram_logger(monkeypatch, per_request_level: str):
    """A fresh store and the lk stat logger of an ngram engine with vLLM's per-request metrics at this level."""
    from lk_vllm.plugin.server import live_stats, stat_logger

    store = LiveStatsStore()
    monkeypatch.setattr(live_stats, "STORE", store)
    spec = SimpleNamespace(
        method="ngram",
        model=None,
        num_speculative_tokens=2,
        draft_sample_method="greedy",
        rejection_sample_method="standard",
    )
    config = _vllm_config(spec)
    config.observability_config = SimpleNamespace(per_request_spec_decode_metrics=per_request_level)
    return store, stat_logger.LkStatLogger(config)


@pytest.mark.vllm
def test_stat_logger_records_each_finished_requests_own_acceptance(monkeypatch):
    """Two requests, one long at T=0 (2 tokens per step), one short sampled (3 per step): the two aggregations
    differ, and each number says which aggregation and sampling mode it is."""
    from lk_vllm.plugin.server import stat_logger

    store, logger = _ngram_logger(monkeypatch, "summary")
    scheduler, iteration = _stats(
        running=0, drafts=12, draft_tokens=24, accepted=14, per_pos=(9, 5), tokens=26
    )
    iteration.finished_requests = [_finished_request(0.0, [1] * 10), _finished_request(0.8, [2, 2])]
    assert stat_logger.finished_request_counts(iteration) == [(10, 10, "temperature_0"), (2, 4, "sampled")]
    logger.record(scheduler, iteration)
    summary = store.summary(store.steps())
    assert (
        summary["acceptance_length"] == pytest.approx(1 + 14 / 12)
        and summary["acceptance_length_aggregation"] == "pooled"
    )
    assert summary["acceptance_length_mean_of_request_means"] == pytest.approx(2.5)
    labelled = {(e["aggregation"], e["sampling"]): e["value"] for e in summary["acceptance_lengths"]}
    assert labelled == pytest.approx(
        {
            ("pooled", "all"): 1 + 14 / 12,
            ("mean_of_request_means", "all"): 2.5,
            ("pooled", "temperature_0"): 2.0,
            ("mean_of_request_means", "temperature_0"): 2.0,
            ("pooled", "sampled"): 3.0,
            ("mean_of_request_means", "sampled"): 3.0,
        }
    )
    assert set(summary["aggregations"]) == {"pooled", "mean_of_request_means"}
    histogram = summary["request_acceptance_histogram"]
    assert (
        sum(histogram["counts"]["all"]) == 2
        and histogram["counts"]["sampled"][histogram["upper_bounds"].index(3.0)] == 1
    )
    assert store.per_request_source and store.per_request_missing is None

    copy = LiveStatsStore()  # the statistics carried over an engine restart keep the per-request sums
    copy.merge_snapshot(json.loads(json.dumps(store.snapshot())))
    assert copy.summary(copy.steps())["acceptance_length_mean_of_request_means"] == pytest.approx(2.5)
    assert copy.since_start()["acceptance_length_mean_of_request_means"] == pytest.approx(2.5)


@pytest.mark.vllm
def test_without_per_request_metrics_the_store_says_why(monkeypatch):
    store, _ = _ngram_logger(monkeypatch, "none")
    assert (
        store.per_request_source is None and "--per-request-spec-decode-metrics" in store.per_request_missing
    )
