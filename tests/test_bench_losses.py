"""benchmarks/bench_losses.py: the peak-memory measurement against known allocations, the memory claims of the
chunked loss on a small group (LK holds no more than KL; the naive path holds more), the timing allocator's
choices and a partial results page."""

from __future__ import annotations

import json

import pytest
import torch
from repo_helpers import load_script

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/bench_losses.py")


MIB = 1 << 20


def test_allocated_peak_counts_live_tensors(bench):
    def one_at_a_time():
        for _ in range(3):
            torch.empty(MIB, dtype=torch.float32).fill_(1.0)  # 4 MiB, freed at once

    def two_alive():
        first = torch.empty(MIB, dtype=torch.float32)
        second = torch.empty(MIB, dtype=torch.float32)
        del first, second

    assert 4 * MIB <= bench._measure_allocated_peak(one_at_a_time) < 4 * MIB + 64 * 1024
    assert 8 * MIB <= bench._measure_allocated_peak(two_alive) < 8 * MIB + 64 * 1024


def test_allocated_peak_ignores_what_was_live_before(bench):
    kept = torch.ones(4 * MIB, dtype=torch.float32)  # 16 MiB, alive throughout
    assert bench._measure_allocated_peak(lambda: kept.sum()) < MIB


@pytest.mark.parametrize("vocab_draft", [384, 256])
def test_memory_worker_lk_no_more_than_kl(bench, vocab_draft):
    rows, vocab = 96, 384
    spec = {
        "V": vocab,
        "N": rows,
        "Vd": vocab_draft,
        "dtype": "float32",
        "impls": ["chunked", "naive"],
        "mode": "memory",
        "memory_reps": 1,
    }
    result = bench.run_worker(spec)
    peaks = result["peak_bytes"]
    gradient = rows * vocab_draft * 4
    for kind in bench.KINDS:
        assert peaks[f"chunked/{kind}"] >= gradient, kind  # the gradient itself is counted
        assert peaks[f"chunked/{kind}"] < peaks[f"naive/{kind}"], kind
    for kind in ("tv", "alpha", "lambda"):
        assert peaks[f"chunked/{kind}"] <= peaks["chunked/kl"], (kind, peaks)
    assert set(result["rss_peak_bytes"]) == set(peaks)


def test_timing_allocator_choices(bench, monkeypatch, tmp_path):
    assert bench.timing_allocator("glibc") == ("glibc", {})
    label, env = bench.timing_allocator("thp")
    assert env == {"THP_MEM_ALLOC_ENABLE": "1"} and label.startswith("thp")
    fake = tmp_path / "libjemalloc.so.2"
    fake.write_bytes(b"")
    monkeypatch.setattr(bench, "JEMALLOC_PATHS", (str(tmp_path / "missing.so"), str(fake)))
    label, env = bench.timing_allocator("auto")
    assert env["LD_PRELOAD"] == str(fake) and "dirty_decay_ms:-1" in env["MALLOC_CONF"]
    monkeypatch.setattr(bench, "JEMALLOC_PATHS", (str(tmp_path / "missing.so"),))
    assert bench.timing_allocator("auto")[0].startswith("thp")
    with pytest.raises(SystemExit, match="--allocator jemalloc: libjemalloc.so.2 not found"):
        bench.timing_allocator("jemalloc")


def _timing(kinds, seconds):
    return {
        "times": {f"chunked/{kind}": list(seconds[kind]) for kind in kinds},
        "cpu_times": {f"chunked/{kind}": list(seconds[kind]) for kind in kinds},
        "floor_times": [0.01, 0.011],
        "floor_cpu_times": [0.01, 0.011],
        "threads": 2,
    }


def test_group_records_and_partial_page(bench, tmp_path):
    spec = {"V": 1000, "N": 64, "Vd": 1000, "vocab": "full", "dtype": "float32", "impls": ["chunked"]}
    seconds = {"kl": (0.10, 0.20), "tv": (0.11, 0.20), "alpha": (0.12, 0.22), "lambda": (0.10, 0.30)}
    memory = {
        "peak_bytes": {f"chunked/{kind}": 1000 for kind in bench.KINDS},
        "rss_peak_bytes": {f"chunked/{kind}": 1000 + 10 * i for i, kind in enumerate(bench.KINDS)},
    }
    records = bench.group_records(spec, memory, _timing(bench.KINDS, seconds))
    lam = next(r for r in records if r["kind"] == "lambda")
    assert lam["time_ratio_to_kl"] == pytest.approx(1.25)  # median of 1.0 and 1.5, paired per repetition
    assert lam["time_ratio_to_kl_of_minima"] == pytest.approx(1.0)
    assert lam["memory_ratio_to_kl"] == 1.0 and lam["rss_memory_ratio_to_kl"] == pytest.approx(1.03)
    report = {
        "hardware": {"cpu": "x", "logical_cores": 2, "torch_threads": 2, "memory_gb": 1, "torch": "t"},
        "command": "c",
        "method": "m",
        "load": "n/a",
        "wall_seconds": 60,
        "groups_not_yet_run": 3,
        "records": records,
    }
    out = tmp_path / "run"
    bench.write_report(report, out, quiet=True)
    page = out.with_suffix(".md").read_text()
    assert "3 groups not yet run" in page and "peak allocated tensor bytes" in page
    assert "Memory target (LK peak ≤ KL peak): met" in page
    assert json.loads(out.with_suffix(".json").read_text())["headline"]["lk_memory_ratio_to_kl_max"] == 1.0


def test_grid_flags(bench, capsys):
    import argparse

    args = argparse.Namespace(rows=[8192], vocab=[201088, 32000], dtypes=["float32"], draft_vocab=["full"])
    assert [(g["V"], g["Vd"], g["vocab"]) for g in bench.build_groups(args)] == [
        (201088, 201088, "full"),
        (32000, 32000, "full"),
    ]
    args.draft_vocab = ["truncated"]
    assert [g["Vd"] for g in bench.build_groups(args)] == [bench.TRUNCATED_VOCAB, bench.TRUNCATED_VOCAB]
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--memory-fraction", "2", "--out", "/nonexistent/never-written"])
    assert exit_info.value.code == 2
    assert "--memory-fraction: expected a fraction in (0, 0.95], got 2.0" in capsys.readouterr().err
