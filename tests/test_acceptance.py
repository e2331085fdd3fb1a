"""Acceptance math: predicted acceptance length from per-position alpha, measured rates from vLLM counters."""

from __future__ import annotations

import random
import subprocess
import sys
import types

import pytest
from bench_helpers import HELDOUT, K
from hypothesis import given, settings
from hypothesis import strategies as st

from lk_vllm.acceptance import (
    Counts,
    SpecDecodeCounts,
    conditional_acceptance,
    cumulative_acceptance,
    draft_acceptance_rate,
    expected_acceptance_length,
    heldout_rates,
    mean_acceptance_length,
    per_position_acceptance,
    predicted_rates,
)

pytestmark = pytest.mark.unit


def test_expected_acceptance_length_values():
    assert expected_acceptance_length([]) == 1.0
    assert expected_acceptance_length([1.0, 1.0, 1.0]) == 4.0
    assert expected_acceptance_length([0.0, 1.0, 1.0]) == 1.0
    assert expected_acceptance_length([0.5, 0.5]) == pytest.approx(1.75)
    assert expected_acceptance_length((0.8, 0.5, 0.25)) == pytest.approx(1 + 0.8 + 0.4 + 0.1)
    assert expected_acceptance_length(iter([0.9])) == pytest.approx(1.9)


@pytest.mark.parametrize("bad", [[1.5], [-0.1], [0.5, float("nan")]])
def test_rates_outside_unit_interval_are_rejected(bad):
    with pytest.raises(ValueError, match=r"per_position_alpha\[\d\] must be an acceptance rate in \[0, 1\]"):
        expected_acceptance_length(bad)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), max_size=8))
def test_cumulative_and_conditional_are_inverse(alphas):
    rates = cumulative_acceptance(alphas)
    assert all(b <= a for a, b in zip([1.0] + rates, rates, strict=False))
    recovered = conditional_acceptance(rates)
    for k, (alpha, back) in enumerate(zip(alphas, recovered, strict=True)):
        reached = rates[k - 1] if k else 1.0
        if reached > 1e-300:
            assert back == pytest.approx(alpha, rel=1e-9, abs=1e-12)
        elif reached == 0.0:
            assert back is None
    assert expected_acceptance_length(alphas) == pytest.approx(1 + sum(rates))


def test_conditional_rejects_increasing_rates():
    with pytest.raises(ValueError, match=r"non-increasing .* rate\[1\]=0.6 > rate\[0\]=0.5"):
        conditional_acceptance([0.5, 0.6])


def test_measured_rates_from_counters():
    assert per_position_acceptance([80, 40, 10], 100) == [0.8, 0.4, 0.1]
    assert mean_acceptance_length(130, 100) == pytest.approx(2.3)
    assert draft_acceptance_rate(130, 300) == pytest.approx(130 / 300)


def test_zero_drafts_means_nothing_measured():
    assert per_position_acceptance([0, 0], 0) is None
    assert mean_acceptance_length(0, 0) is None
    assert draft_acceptance_rate(0, 0) is None
    empty = SpecDecodeCounts(accepted_per_position=(0, 0, 0))
    assert empty.acceptance_length is None and empty.per_position_acceptance is None


@pytest.mark.parametrize(
    "call,message",
    [
        (
            lambda: per_position_acceptance([5, 11], 10),
            r"accepted_per_position\[1\]=11 exceeds num_drafts=10",
        ),
        (
            lambda: mean_acceptance_length(-1, 10),
            r"num_accepted_tokens must be a non-negative integer count; found -1",
        ),
        (
            lambda: mean_acceptance_length(3, 2.5),
            r"num_drafts must be a non-negative integer count; found 2.5",
        ),
        (
            lambda: SpecDecodeCounts(num_drafts=True),
            r"num_drafts must be a non-negative integer count; found True",
        ),
        (lambda: SpecDecodeCounts(accepted_per_position=(1, -2)), r"accepted_per_position\[1\] must be"),
    ],
)
def test_bad_counts_raise(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_counts_window_delta_and_sum():
    earlier = SpecDecodeCounts(
        num_drafts=10, num_draft_tokens=30, num_accepted_tokens=12, accepted_per_position=(7, 4, 1)
    )
    later = SpecDecodeCounts(
        num_drafts=25, num_draft_tokens=75, num_accepted_tokens=30, accepted_per_position=(17, 9, 4)
    )
    window = later - earlier
    assert window == SpecDecodeCounts(15, 45, 18, (10, 5, 3))
    assert window.acceptance_length == pytest.approx(1 + 18 / 15)
    assert window.per_position_acceptance == pytest.approx([10 / 15, 5 / 15, 3 / 15])
    assert window.draft_acceptance_rate == pytest.approx(18 / 45)
    assert earlier + window == later
    padded = SpecDecodeCounts(1, 1, 1, (1,)) + SpecDecodeCounts(2, 6, 3, (2, 1, 0))
    assert padded == SpecDecodeCounts(3, 7, 4, (3, 1, 0))
    assert window.to_dict()["acceptance_length"] == window.acceptance_length


def test_counter_reset_or_reconfiguration_is_an_error():
    earlier = SpecDecodeCounts(10, 30, 12, (7, 4, 1))
    with pytest.raises(ValueError, match=r"num_drafts went down from 10 to 3: the counters were reset"):
        SpecDecodeCounts(3, 9, 2, (2, 0, 0)) - earlier
    with pytest.raises(ValueError, match=r"accepted_per_position\[2\] went down from 1 to 0"):
        SpecDecodeCounts(20, 60, 22, (15, 7, 0)) - earlier
    with pytest.raises(ValueError, match=r"different numbers of positions \(2 vs 3\)"):
        SpecDecodeCounts(20, 60, 22, (15, 7)) - earlier


def test_from_mapping_and_attributes():
    mapping = {
        "num_drafts": 2,
        "num_draft_tokens": 6,
        "num_accepted_tokens": 2,
        "accepted_per_position": [1, 1, 0],
    }
    # vLLM spells the per-position counts num_accepted_tokens_per_pos.
    stats = types.SimpleNamespace(
        num_drafts=2, num_draft_tokens=6, num_accepted_tokens=2, num_accepted_tokens_per_pos=[1, 1, 0]
    )
    assert (
        SpecDecodeCounts.from_mapping(mapping)
        == SpecDecodeCounts.from_mapping(stats)
        == SpecDecodeCounts(2, 6, 2, (1, 1, 0))
    )


@pytest.mark.vllm
@pytest.mark.slow  # importing vLLM takes ~10 s on 2 cores
def test_from_vllm_spec_decoding_stats():
    from vllm.v1.spec_decode.metrics import SpecDecodingStats

    stats = SpecDecodingStats.new(num_spec_tokens=3)
    stats.observe_draft(num_draft_tokens=3, num_accepted_tokens=2)
    stats.observe_draft(num_draft_tokens=3, num_accepted_tokens=0)
    counts = SpecDecodeCounts.from_mapping(stats)
    assert counts == SpecDecodeCounts(2, 6, 2, (1, 1, 0))
    assert counts.acceptance_length == pytest.approx(2.0)
    mapping = {
        "num_drafts": 2,
        "num_draft_tokens": 6,
        "num_accepted_tokens": 2,
        "accepted_per_position": [1, 1, 0],
    }
    assert SpecDecodeCounts.from_mapping(mapping) == counts


def test_simulated_chain_drafting_matches_prediction():
    # Draft K tokens per step; position k is accepted with probability alpha_k if all earlier ones were.
    # The measured counters must agree with the predicted per-position rates and acceptance length.
    alphas = [0.9, 0.7, 0.6, 0.3]
    rng = random.Random(0)
    drafts = 20000
    accepted_per_position = [0] * len(alphas)
    for _ in range(drafts):
        for k, alpha in enumerate(alphas):
            if rng.random() >= alpha:
                break
            accepted_per_position[k] += 1
    counts = SpecDecodeCounts(
        drafts, drafts * len(alphas), sum(accepted_per_position), tuple(accepted_per_position)
    )
    predicted_rates = cumulative_acceptance(alphas)
    for measured, predicted in zip(counts.per_position_acceptance, predicted_rates, strict=True):
        sigma = (predicted * (1 - predicted) / drafts) ** 0.5
        assert abs(measured - predicted) < 5 * sigma
    length_sigma = 4 / drafts**0.5  # acceptance length per draft is within [1, 5]
    assert abs(counts.acceptance_length - expected_acceptance_length(alphas)) < 5 * length_sigma


def test_importing_does_not_import_torch():
    code = "import sys, lk_vllm.acceptance; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_fp32_rounding_above_one_is_clamped_not_rejected():
    # sum(min(p, q)) over a vocabulary in fp32 lands a hair above 1 when q == p
    assert expected_acceptance_length([1.0000000029802323, 1.0]) == 3.0
    with pytest.raises(ValueError):
        expected_acceptance_length([1.001])


def test_pooled_and_mean_of_request_means_differ_when_requests_differ_in_length():
    from lk_vllm.acceptance import REQUEST_ACCEPTANCE_BUCKETS, RequestAcceptance

    long_request = RequestAcceptance.of_request(num_drafts=10, num_accepted_tokens=10)  # 2.0 tokens per step
    short_request = RequestAcceptance.of_request(num_drafts=2, num_accepted_tokens=4)  # 3.0 tokens per step
    both = long_request + short_request
    assert both.requests == 2
    assert both.pooled_acceptance_length == pytest.approx(1 + 14 / 12)  # the long request weighs more
    assert both.mean_of_request_means == pytest.approx(2.5)  # each request weighs the same
    assert both.histogram[REQUEST_ACCEPTANCE_BUCKETS.index(2.0)] == 1
    assert both.histogram[REQUEST_ACCEPTANCE_BUCKETS.index(3.0)] == 1 and sum(both.histogram) == 2
    beyond = RequestAcceptance.of_request(num_drafts=1, num_accepted_tokens=20)  # above every bound: +Inf
    assert beyond.histogram[-1] == 1
    assert RequestAcceptance.of_request(0, 0) == RequestAcceptance()  # never drafted: not a request here
    assert (
        RequestAcceptance().mean_of_request_means is None
        and RequestAcceptance().pooled_acceptance_length is None
    )


def test_counts_add_per_dataset():
    total = Counts(2)
    total.add(Counts(2, num_drafts=4, accepted_per_position=[3, 1]))
    total.add(Counts(2, num_drafts=6, accepted_per_position=[3, 2]))
    summary = total.summary()
    assert summary["num_drafts"] == 10 and summary["num_accepted_tokens"] == 9
    assert summary["acceptance_length"] == pytest.approx(1.9)
    assert Counts(2).summary()["acceptance_length"] is None  # nothing drafted: no number


@pytest.mark.parametrize(
    "temperature, heldout", [(0.5, HELDOUT), (1.0, {"per_position_alpha": [0.6]}), (1.0, {})]
)
def test_no_training_expectation_without_a_matching_prediction(temperature, heldout):
    assert heldout_rates({"heldout": heldout}, temperature, K) is None


def _eval_set(name, temperature, datasets, positions, top1, alpha):
    return {
        "name": name,
        "temperature": temperature,
        "datasets": datasets,
        "positions": positions,
        "top1_agreement": top1,
        "per_position_alpha": alpha,
    }


EVAL_DATA = [
    _eval_set("mt-t0", 0.0, ["mtbench"], 100, [0.5, 0.4], [0.3, 0.2]),
    _eval_set("gsm-t0", 0.0, ["gsm8k"], 300, [0.9, 0.6], [0.7, 0.5]),
    _eval_set("mt-t1", 1.0, ["mtbench"], 50, [0.1, 0.1], [0.45, 0.35]),
]


def test_prediction_from_the_eval_data_of_the_dataset_and_temperature():
    training = {"heldout": HELDOUT, "eval_data": EVAL_DATA}
    assert predicted_rates(training, 0.0, K, "mtbench") == (pytest.approx([0.5, 0.4]), "eval data mt-t0")
    assert predicted_rates(training, 1.0, K, "mtbench") == (pytest.approx([0.45, 0.35]), "eval data mt-t1")
    # all datasets: the sets at this temperature pooled by their positions (1 : 3)
    rates, source = predicted_rates(training, 0.0, K, "all")
    assert rates == pytest.approx([(0.5 + 3 * 0.9) / 4, (0.4 + 3 * 0.6) / 4])
    assert source == "eval data mt-t0, gsm-t0"


@pytest.mark.parametrize(
    "temperature, dataset",
    [(1.0, "gsm8k"), (0.0, "humaneval")],  # no eval set of that temperature and dataset
)
def test_prediction_falls_back_to_the_held_out_training_samples(temperature, dataset):
    rates, source = predicted_rates({"heldout": HELDOUT, "eval_data": EVAL_DATA}, temperature, K, dataset)
    assert rates == heldout_rates({"heldout": HELDOUT}, temperature, K)
    assert source == "held-out training samples"


def test_no_prediction_without_eval_data_or_held_out_rates():
    assert predicted_rates({"heldout": {}}, 0.0, K, "mtbench") is None
    # an eval set with fewer positions than K, or none measured, predicts nothing
    short = [
        _eval_set("mt-t0", 0.0, ["mtbench"], 100, [0.5], [0.3]),
        _eval_set("x", 0.0, ["mtbench"], 0, [0.5, 0.4], [0.3, 0.2]),
    ]
    assert predicted_rates({"eval_data": short}, 0.0, K, "mtbench") is None
