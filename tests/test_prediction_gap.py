"""benchmarks/prediction_gap.py: rows of served vs predicted acceptance against hand computations, and its page."""

from __future__ import annotations

import json

import pytest
from repo_helpers import load_script

pytestmark = pytest.mark.unit

HELDOUT = {"top1_agreement": [0.6, 0.5], "per_position_alpha": [0.5, 0.4]}
EVAL_DATA = [
    {
        "name": "eval-mtbench-t0",
        "dir": "/data/eval-mtbench-t0",
        "temperature": 0.0,
        "datasets": ["mtbench"],
        "samples": 4,
        "positions": 300,
        "top1_agreement": [0.4, 0.5],
        "per_position_alpha": [0.3, 0.3],
        "expected_acceptance_length": 1.39,
        "expected_acceptance_length_greedy": 1.6,
    }
]


def summary(acceptance_length, num_drafts):
    return {"acceptance_length": acceptance_length, "num_drafts": num_drafts}


SERVED = {
    0.0: {**summary(1.5, 30), "datasets": {"mtbench": summary(1.5, 20), "gsm8k": summary(1.5, 10)}},
    1.0: {**summary(1.3, 25), "datasets": {"mtbench": summary(1.3, 25)}},
}


@pytest.fixture(scope="module")
def gap():
    return load_script("benchmarks/prediction_gap.py")


def test_rows_set_served_beside_both_predictions(gap):
    rows = {(r["dataset"], r["temperature"]): r for r in gap.rows({"heldout": HELDOUT}, EVAL_DATA, SERVED, 2)}
    assert set(rows) == {("mtbench", 0.0), ("gsm8k", 0.0), ("all", 0.0), ("mtbench", 1.0), ("all", 1.0)}
    mt = rows[("mtbench", 0.0)]
    assert mt["predicted_eval_data"] == pytest.approx(1 + 0.4 + 0.4 * 0.5)
    assert mt["gap_eval_data_percent"] == pytest.approx(100 * (1.5 - 1.6) / 1.6)
    assert mt["predicted_heldout"] == pytest.approx(1 + 0.6 + 0.6 * 0.5)
    assert mt["gap_heldout_percent"] == pytest.approx(100 * (1.5 - 1.9) / 1.9)
    assert mt["num_drafts"] == 20
    # no eval data of gsm8k, nor any at T=1: only the held-out prediction
    for key in (("gsm8k", 0.0), ("mtbench", 1.0), ("all", 1.0)):
        assert rows[key]["predicted_eval_data"] is None and rows[key]["gap_eval_data_percent"] is None
    assert rows[("all", 1.0)]["predicted_heldout"] == pytest.approx(1 + 0.5 + 0.5 * 0.4)
    assert rows[("all", 0.0)]["predicted_eval_data"] == pytest.approx(1.6)  # the one eval set at T=0


def test_the_page_has_every_row_and_the_json_round_trips(gap, tmp_path):
    document = {
        "command": "python benchmarks/prediction_gap.py --drafter d",
        "created": "2026-12-07T00:00:00+0000",
        "hardware": {"cpu": "a CPU", "logical_cores": 2},
        "drafter": "d",
        "num_speculative_tokens": 2,
        "max_tokens": 96,
        "limit": 4,
        "eval_data": EVAL_DATA,
        "rows": gap.rows({"heldout": HELDOUT}, EVAL_DATA, SERVED, 2),
    }
    gap.write(document, tmp_path / "page")
    page = (tmp_path / "page.md").read_text()
    assert "| mtbench | 0 | 1.500 | 20 | 1.600 | -6.3 | 1.900 | -21.1 |" in page
    assert "| gsm8k | 0 | 1.500 | 10 | - | - | 1.900 | -21.1 |" in page
    assert "| eval-mtbench-t0 | 0 | 4 | 300 | 0.400, 0.500 | 0.300, 0.300 | 1.600 / 1.390 |" in page
    assert json.loads((tmp_path / "page.json").read_text()) == json.loads(json.dumps(document))
