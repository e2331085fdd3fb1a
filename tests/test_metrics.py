"""The bench's records (lk_vllm.bench.metrics): acceptance, speed-up, the gap to training's prediction,
pooling over datasets, and both aggregations stamped with the sampling mode."""

from __future__ import annotations

import pytest
from bench_helpers import K, make_contender, make_plan

from lk_vllm.acceptance import SpecDecodeCounts
from lk_vllm.bench.contenders import BASELINE
from lk_vllm.bench.metrics import build_records, record
from lk_vllm.bench.runner import Cell, Measurement

pytestmark = pytest.mark.unit


def test_record_acceptance_speedup_and_training_gap():
    counts = SpecDecodeCounts(
        num_drafts=10, num_draft_tokens=20, num_accepted_tokens=12, accepted_per_position=(7, 5)
    )
    mine = Measurement(num_requests=2, output_tokens=30, seconds=2.0, counts=counts)
    base = Measurement(num_requests=2, output_tokens=30, seconds=5.0, counts=SpecDecodeCounts())
    r = record(make_contender(), Cell("mtbench", 1.0, 1), mine, make_plan(), base)
    assert r["acceptance_length"] == pytest.approx(2.2)  # 1 + 12 / 10
    assert r["per_position_acceptance"] == pytest.approx([0.7, 0.5])
    assert r["tokens_per_s"] == pytest.approx(15.0)
    assert r["speedup"] == pytest.approx(2.5)  # 15 / 6
    # T=1: alpha of the first K positions: 1 + 0.6 + 0.6 * 0.5 = 1.9
    assert r["training_expected_acceptance_length"] == pytest.approx(1.9)
    assert r["training_per_position_acceptance"] == pytest.approx([0.6, 0.3])
    assert r["acceptance_length_gap_percent"] == pytest.approx(100 * (2.2 - 1.9) / 1.9)
    assert r["draft_sample_method"] == "probabilistic"
    for key in ("architecture", "loss", "dataset", "temperature", "num_speculative_tokens", "concurrency"):
        assert (
            r[key]
            == {
                "architecture": "eagle3",
                "loss": "lambda",
                "dataset": "mtbench",
                "temperature": 1.0,
                "num_speculative_tokens": K,
                "concurrency": 1,
            }[key]
        )


def test_record_at_t0_uses_top1_agreement_and_greedy_drafts():
    counts = SpecDecodeCounts(
        num_drafts=4, num_draft_tokens=8, num_accepted_tokens=4, accepted_per_position=(3, 1)
    )
    r = record(make_contender(), Cell("gsm8k", 0.0, 8), Measurement(1, 9, 3.0, counts), make_plan(), None)
    assert r["training_expected_acceptance_length"] == pytest.approx(1 + 0.8 + 0.8 * 0.5)
    assert r["draft_sample_method"] == "greedy"
    assert r["speedup"] is None  # no baseline in this run


def test_record_prefers_the_eval_data_of_its_dataset_and_temperature():
    counts = SpecDecodeCounts(
        num_drafts=4, num_draft_tokens=8, num_accepted_tokens=4, accepted_per_position=(3, 1)
    )
    drafter = make_contender()
    drafter.training["eval_data"] = [
        {
            "name": "eval-gsm8k-t0",
            "temperature": 0.0,
            "datasets": ["gsm8k"],
            "positions": 40,
            "top1_agreement": [0.5, 0.5],
            "per_position_alpha": [0.4, 0.4],
        }
    ]
    plan = make_plan()
    gsm = record(drafter, Cell("gsm8k", 0.0, 1), Measurement(1, 9, 3.0, counts), plan, None)
    assert gsm["training_expected_acceptance_length"] == pytest.approx(1.75)
    assert gsm["training_expected_source"] == "eval data eval-gsm8k-t0"
    assert gsm["acceptance_length_gap_percent"] == pytest.approx(100 * (2.0 - 1.75) / 1.75)
    mt = record(drafter, Cell("mtbench", 0.0, 1), Measurement(1, 9, 3.0, counts), plan, None)
    assert mt["training_expected_acceptance_length"] == pytest.approx(1 + 0.8 + 0.8 * 0.5)
    assert mt["training_expected_source"] == "held-out training samples"


def test_baseline_record_has_no_acceptance_and_speedup_one():
    base = Measurement(2, 40, 4.0, SpecDecodeCounts())
    r = record(BASELINE, Cell("mtbench", 0.0, 1), base, make_plan(), base)
    assert r["architecture"] == "none" and r["loss"] is None and r["num_speculative_tokens"] == 0
    assert r["acceptance_length"] is None and r["per_position_acceptance"] is None
    assert r["speedup"] == 1.0 and r["tokens_per_s"] == 10.0


def test_overall_pools_tokens_seconds_and_counters():
    plan = make_plan(concurrencies=(1,), temperatures=(0.0,))
    cells = [cell for cell, _ in plan.cells()]
    drafter = make_contender()
    results = {
        "baseline": {
            cells[0]: Measurement(2, 10, 2.0, SpecDecodeCounts()),
            cells[1]: Measurement(2, 30, 4.0, SpecDecodeCounts()),
        },
        drafter.label: {
            cells[0]: Measurement(2, 10, 1.0, SpecDecodeCounts(2, 4, 2, (2, 0))),
            cells[1]: Measurement(2, 30, 2.0, SpecDecodeCounts(6, 12, 9, (5, 4))),
        },
    }
    per_dataset, overall = build_records(plan, [BASELINE, drafter], results)
    assert [(r["drafter"], r["dataset"]) for r in per_dataset] == [
        ("baseline", "mtbench"),
        ("baseline", "gsm8k"),
        ("e3-lambda", "mtbench"),
        ("e3-lambda", "gsm8k"),
    ]
    mine = [r for r in overall if r["drafter"] == "e3-lambda"]
    assert len(mine) == 1 and mine[0]["dataset"] == "all"
    assert mine[0]["tokens_per_s"] == pytest.approx(40 / 3.0)
    assert mine[0]["speedup"] == pytest.approx((40 / 3.0) / (40 / 6.0))
    assert mine[0]["acceptance_length"] == pytest.approx(1 + 11 / 8)
    assert mine[0]["per_position_acceptance"] == pytest.approx([7 / 8, 4 / 8])
    assert per_dataset[3]["speedup"] == pytest.approx(15 / 7.5)


def test_records_carry_both_aggregations_stamped_with_the_sampling_mode():
    from types import SimpleNamespace

    from lk_vllm.acceptance import RequestAcceptance
    from lk_vllm.bench.runner import request_counts

    def completion(histogram):  # vLLM's per-request metrics: draft-verify steps counted by accepted tokens j
        return SimpleNamespace(spec_decode_metrics=SimpleNamespace(histogram=histogram))

    long_request = request_counts(completion([0, 10, 0]))  # 10 steps, 1 accepted each: 2.0
    short_request = request_counts(completion([0, 0, 2]))  # 2 steps, 2 accepted each: 3.0
    assert request_counts(SimpleNamespace(spec_decode_metrics=None)) == RequestAcceptance()
    counts = SpecDecodeCounts(
        num_drafts=12, num_draft_tokens=24, num_accepted_tokens=14, accepted_per_position=(9, 5)
    )
    plan = make_plan(concurrencies=(1,), temperatures=(0.0, 1.0))
    cells = [cell for cell, _ in plan.cells()]
    for cell in cells[:2]:
        r = record(
            make_contender(), cell, Measurement(2, 30, 2.0, counts, long_request + short_request), plan, None
        )
        assert (
            r["acceptance_length"] == pytest.approx(1 + 14 / 12)
            and r["acceptance_length_aggregation"] == "pooled"
        )
        assert r["acceptance_length_mean_of_request_means"] == pytest.approx(2.5)
        mode = "sampled" if cell.temperature > 0 else "temperature_0"
        assert r["sampling"] == mode and {e["sampling"] for e in r["acceptance_lengths"]} == {mode}
        assert [e["aggregation"] for e in r["acceptance_lengths"]] == ["pooled", "mean_of_request_means"]
        assert sum(r["request_acceptance_histogram"]["counts"]) == 2
    results = {
        "e3-lambda": {
            cell: Measurement(1, 10, 1.0, counts, long_request if i % 2 else short_request)
            for i, cell in enumerate(cells)
        }
    }
    _, overall = build_records(plan, [make_contender()], results)  # pooled over datasets: the requests add up
    assert [r["acceptance_length_mean_of_request_means"] for r in overall] == pytest.approx([3.0, 2.0])
