"""benchmarks/kl_vs_lk_seeds.py: the interval against a hand computation, pairing by seed, and the page from
fake run directories and a fake bench json."""

from __future__ import annotations

import json
import math
import sys

import pytest
from repo_helpers import load_script
from train_helpers import write_run

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def seeds():
    return load_script("benchmarks/kl_vs_lk_seeds.py")


def test_interval_is_the_student_t_interval_of_the_mean(seeds):
    got = seeds.mean_interval([1.0, 1.1, 1.2])
    half = 4.303 * 0.1 / math.sqrt(3)  # sample sd 0.1, t(0.975, 2 dof) = 4.303
    assert got["mean"] == pytest.approx(1.1)
    assert (got["low"], got["high"]) == pytest.approx((1.1 - half, 1.1 + half))
    assert seeds.mean_interval([1.3])["low"] is None


def test_ratios_pair_seeds_and_skip_unpaired_ones(seeds):
    got = seeds.paired_ratio({0: 2.0, 1: 3.0, 2: 9.0}, {0: 1.0, 1: 2.0, 5: 1.0})
    assert got["seeds"] == [0, 1]
    assert got["ratios"] == [2.0, 1.5]
    assert seeds.paired_ratio({0: 1.0}, {1: 1.0}) is None


def test_page_from_runs_and_bench(seeds, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    served = {("kl", 0): 1.2, ("kl", 1): 1.3, ("lambda", 0): 1.32, ("lambda", 1): 1.3}
    records = []
    for (loss, seed), al in served.items():
        run = write_run(runs, loss, seed, [(1.1, 1.2), (1.2 + seed / 10, 1.3)])
        record = {
            "drafter_path": str(run / "final"),
            "dataset": "all",
            "temperature": 1.0,
            "acceptance_length": al,
        }
        records.append(record)
    baseline = {"drafter_path": None, "dataset": "all", "temperature": 1.0, "acceptance_length": None}
    bench = {
        "command": "lk-vllm bench ...",
        "hardware": "cpu:test",
        "vllm_version": "0",
        "records": [baseline],
    }
    bench["overall"] = records
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    out = tmp_path / "page"
    argv = [
        "kl_vs_lk_seeds.py",
        "--runs",
        str(runs),
        "--bench",
        str(tmp_path / "bench.json"),
        "--out",
        str(out),
    ]
    monkeypatch.setattr(sys, "argv", argv)
    assert seeds.main() == 0
    document = json.loads(out.with_suffix(".json").read_text())
    (ratio,) = document["served_ratios"]
    assert (ratio["lk"], ratio["dataset"], ratio["seeds"]) == ("lambda", "all", [0, 1])
    assert ratio["ratios"] == pytest.approx([1.1, 1.0])
    heldout = {(c["lk"], c["temperature"]): c["ratios"] for c in document["heldout_ratios"]}
    assert heldout == {("lambda", 0.0): [1.0, 1.0], ("lambda", 1.0): [1.0, 1.0]}
    kl_curve = [p for p in document["mean_curves"] if p["loss"] == "kl"]
    assert [(p["step"], p["training_tokens"]) for p in kl_curve] == [(2, 200), (4, 400)]
    assert kl_curve[1]["al_t1"] == pytest.approx(1.25)  # seeds 0 and 1: 1.2 and 1.3
    page = out.with_suffix(".md").read_text()
    assert "| lambda | all | 1 | 2 | 1.100 / 1.000 |" in page
    assert page.startswith("# KL vs LK with seeds: Medusa on the default target") and "(page.png)" in page
    assert out.with_suffix(".png").stat().st_size > 0


def test_runs_of_two_architectures_are_refused_in_one_line(seeds, tmp_path, monkeypatch, capsys):
    write_run(tmp_path, "kl", 0, [(1.1, 1.2)], architecture="eagle3")
    write_run(tmp_path, "kl", 0, [(1.1, 1.2)], architecture="medusa")
    argv = ["kl_vs_lk_seeds.py", "--runs", str(tmp_path), "--bench", str(tmp_path / "none.json")]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        seeds.main()
    assert exit_info.value.code == 2
    assert (
        f"--runs {tmp_path}: expected runs of one architecture, found eagle3, medusa"
        in capsys.readouterr().err
    )


def test_empty_runs_directory_is_refused_in_one_line(seeds, tmp_path, monkeypatch, capsys):
    argv = ["kl_vs_lk_seeds.py", "--runs", str(tmp_path), "--bench", str(tmp_path / "none.json")]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        seeds.main()
    assert exit_info.value.code == 2
    assert f"--runs {tmp_path}: no run directory" in capsys.readouterr().err
