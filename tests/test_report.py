"""The bench's results page (lk_vllm.bench.report): json, markdown and png, the LK-against-KL table and
the paper's layout."""

from __future__ import annotations

import json
import struct

import pytest
from bench_helpers import K, make_contender, make_plan

from lk_vllm.acceptance import SpecDecodeCounts
from lk_vllm.bench.contenders import BASELINE
from lk_vllm.bench.metrics import build_records
from lk_vllm.bench.runner import Measurement

pytestmark = pytest.mark.unit


def _document() -> dict:
    plan = make_plan(datasets=("mtbench",), concurrencies=(1,))
    cells = [cell for cell, _ in plan.cells()]
    kl, lk = make_contender("e3-kl", "kl"), make_contender("e3-lambda", "lambda")
    results = {
        "baseline": {c: Measurement(2, 20, 2.0, SpecDecodeCounts()) for c in cells},
        "e3-kl": {c: Measurement(2, 20, 1.0, SpecDecodeCounts(10, 20, 10, (6, 4))) for c in cells},
        "e3-lambda": {c: Measurement(2, 20, 0.8, SpecDecodeCounts(10, 20, 12, (7, 5))) for c in cells},
    }
    records, overall = build_records(plan, [BASELINE, kl, lk], results)
    return {
        "name": "unit",
        "command": "lk-vllm bench --name unit",
        "target": "/models/t",
        "hardware": "cpu:test x2",
        "vllm_version": "0.32.0",
        "settings": {
            "num_speculative_tokens": K,
            "max_tokens": 16,
            "limit": 2,
            "engine": {"dtype": "float32", "max_num_seqs": 1},
        },
        "method": {"throughput": "tokens/s = output tokens / wall seconds"},
        "records": records,
        "overall": overall,
    }


def test_results_page_json_markdown_png(tmp_path):
    from lk_vllm.bench.report import write_results

    document = _document()
    paths = write_results(document, tmp_path / "results", "unit")
    assert json.loads(paths["json"].read_text()) == document
    for record_ in document["records"]:
        for key in (
            "architecture",
            "loss",
            "dataset",
            "temperature",
            "num_speculative_tokens",
            "acceptance_length",
            "per_position_acceptance",
            "tokens_per_s",
            "speedup",
        ):
            assert key in record_
    md = paths["md"].read_text()
    assert "`lk-vllm bench --name unit`" in md and "![per-position acceptance and speedup](unit.png)" in md
    # e3-lambda over all datasets at T=1: AL 2.20, training-time 1.90, gap +15.8 %, 25 tokens/s, speedup 2.50
    assert "| e3-lambda | eagle3 | lambda | 1 | 1 | 2.20 | - | 1.90 | +15.8 | 25.0 | 2.50 |" in md
    assert "| baseline | none | - | 0 | 1 | - | - | - | - | 10.0 | 1.00 |" in md
    assert "| e3-lambda | mtbench | 0 | 1 | 2.20 | - | 0.70 / 0.50 |" in md
    # LK against KL: 2.2 / 2.0 = +10 %, with the paper's range beside it
    assert "| eagle3 | e3-lambda | lambda | e3-kl | 1 | 1 | 2.20 / 2.00 | +10.0 | +3.5 to +8.2 % |" in md
    png = paths["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width > 800 and height > 300  # two temperature panels and the speedup bars
    assert not list((tmp_path / "results").glob(".*"))  # no temporary files left


def test_no_lk_table_without_a_kl_drafter(tmp_path):
    from lk_vllm.bench.report import render_markdown

    document = _document()
    document["overall"] = [r for r in document["overall"] if r["loss"] != "kl"]
    assert "LK losses against KL" not in render_markdown(document)


def test_paper_layout_pools_concurrencies_per_dataset_and_temperature():
    from lk_vllm.bench.report import paper_layout, render_markdown

    plan = make_plan(datasets=("mtbench", "humaneval", "gsm8k"))
    cells = [cell for cell, _ in plan.cells()]
    drafter = make_contender(label="e3-kl", loss="kl")
    # mtbench T=0: c=1 accepts 2 over 4 drafts (length 1.5), c=8 20 over 12 (2.67): pooled 1 + 22/16 = 2.375,
    # not the mean of the two cells' lengths (2.08).
    counts = {
        ("mtbench", 0.0, 1): SpecDecodeCounts(4, 8, 2, (2, 0)),
        ("mtbench", 0.0, 8): SpecDecodeCounts(12, 24, 20, (12, 8)),
    }
    measured = {
        cell: Measurement(
            2,
            10,
            1.0,
            counts.get((cell.dataset, cell.temperature, cell.concurrency), SpecDecodeCounts(2, 4, 1, (1, 0))),
        )
        for cell in cells
    }
    per_dataset, _ = build_records(plan, [drafter], {drafter.label: measured})
    rows = paper_layout(per_dataset)
    assert len(rows) == 1 and (rows[0]["architecture"], rows[0]["loss"]) == ("eagle3", "kl")
    # every other cell: 1 + 1/2
    assert rows[0]["ours"] == {0.0: "2.38/1.50/1.50", 1.0: "1.50/1.50/1.50"}
    assert rows[0]["paper"] == ("3.75/4.82/4.50", "3.39/4.31/3.88")
    md = render_markdown({"records": per_dataset, "overall": []})
    assert "| eagle3 | kl | e3-kl | 2.38/1.50/1.50 | 1.50/1.50/1.50 | 3.75/4.82/4.50 | 3.39/4.31/3.88 |" in md
    # a drafter with no recorded loss has no paper row
    assert paper_layout([dict(r, loss=None) for r in per_dataset]) == []
