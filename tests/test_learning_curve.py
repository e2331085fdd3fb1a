"""benchmarks/learning_curve.py: segment rates and the bend against hand computations, and the page from fake
run directories."""

from __future__ import annotations

import json
import sys

import pytest
from repo_helpers import load_script
from train_helpers import write_run

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def curve():
    return load_script("benchmarks/learning_curve.py")


def points(values: list[float], step_tokens: int = 50_000) -> list[dict]:
    return [
        {"step": i + 1, "training_tokens": (i + 1) * step_tokens, "al_t0": v, "al_t1": v}
        for i, v in enumerate(values)
    ]


def test_rates_are_gains_per_100k_tokens(curve):
    assert curve.rates(points([1.0, 1.2, 1.25]), "al_t1") == pytest.approx([None, 0.4, 0.1])


def test_bend_is_where_every_later_segment_gains_under_a_quarter_of_the_average(curve):
    # 1.0 -> 1.8 over 250k tokens: average 0.32 per 100k, a quarter is 0.08. Segments: 0.8, 0.6, 0.1, 0.06, 0.04.
    rising_then_flat = points([1.0, 1.4, 1.7, 1.75, 1.78, 1.8])
    assert curve.bend(rising_then_flat, "al_t0")["step"] == 4
    # A dip and recovery after a flat stretch moves the bend past the recovery.
    recovering = points([1.0, 1.4, 1.41, 1.7, 1.71, 1.72])
    assert curve.bend(recovering, "al_t0")["step"] == 4


def test_a_straight_or_short_curve_has_no_bend(curve):
    assert curve.bend(points([1.0, 1.1, 1.2, 1.3]), "al_t1") is None
    assert curve.bend(points([1.0, 1.5]), "al_t1") is None


def test_page_from_runs(curve, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    kl_run = write_run(
        runs, "kl", 0, [(1.1, 1.2), (1.3, 1.4), (1.4, 1.5), (1.41, 1.5)], architecture="eagle3"
    )
    write_run(runs, "alpha", 0, [(1.2, 1.2), (1.4, 1.4), (1.5, 1.5), (1.52, 1.51)], architecture="eagle3")
    record = {"training": {"batch_size": 8, "data": {"train_samples": 16}}}  # half an epoch per step
    (kl_run / "final" / "lk_training.json").write_text(json.dumps(record))
    out = tmp_path / "page"
    monkeypatch.setattr(sys, "argv", ["learning_curve.py", "--runs", str(runs), "--out", str(out)])
    assert curve.main() == 0
    document = json.loads(out.with_suffix(".json").read_text())
    kl = document["curves"]["kl"]
    assert [p["training_tokens"] for p in kl["points"]] == [200, 400, 600, 800]
    assert [p["epochs"] for p in kl["points"]] == [1, 2, 3, 4]
    assert kl["points"][1]["rate_al_t1"] == pytest.approx(0.2 / 200 * 1e5)
    assert kl["average_rate"]["al_t1"] == pytest.approx(0.31 / 600 * 1e5)
    # KL T=1 segments per 100k: 100, 50, 5 against an average of 51.7: bends at step 6 (600 tokens).
    assert kl["bend"]["al_t1"]["step"] == 6
    alpha_t1 = [r["al_t1"] for r in document["ratios"] if r["lk"] == "alpha"]
    assert alpha_t1 == pytest.approx([1.2 / 1.1, 1.4 / 1.3, 1.5 / 1.4, 1.52 / 1.41])
    page = out.with_suffix(".md").read_text()
    assert page.startswith("# Learning curves, KL vs LK: EAGLE-3 on the default target")
    assert "| kl | T=1 | 1.100 -> 1.410 |" in page and "step 6 (600) | 1.400 |" in page
    assert out.with_suffix(".png").stat().st_size > 0


def test_runs_without_evaluations_are_refused_in_one_line(curve, tmp_path, monkeypatch, capsys):
    run = write_run(tmp_path, "kl", 0, [(1.1, 1.2)])
    (run / "log.jsonl").write_text(json.dumps({"step": 1, "tokens": 100}) + "\n")  # stopped before evaluating
    monkeypatch.setattr(sys, "argv", ["learning_curve.py", "--runs", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        curve.main()
    assert exit_info.value.code == 2
    assert f"--runs {tmp_path}: no run directory with a held-out evaluation" in capsys.readouterr().err
