"""lk-vllm bench: records, the results page and the argument checks (no engine), and one real run (slow).

The slow test benchmarks the baseline against a draft LM that IS the target (every layer copied): whatever vLLM
does, such a drafter's drafts are always accepted, so the acceptance length must be K + 1 and the outputs at
T=0 must equal the baseline's. The json's acceptance numbers are also checked against the engine's own counter
snapshots, read through a spy.
"""

from __future__ import annotations

import json
import shlex
import struct

import pytest

from lk_vllm.acceptance import SpecDecodeCounts, heldout_rates
from lk_vllm.bench.contenders import BASELINE, Contender, drafter_labels
from lk_vllm.bench.metrics import build_records, record
from lk_vllm.bench.runner import Cell, Measurement, Plan
from lk_vllm.bench.workloads import Workload
from lk_vllm.cli import COMMANDS, main

pytestmark = pytest.mark.unit

K = 2
HELDOUT = {"top1_agreement": [0.8, 0.5, 0.4], "per_position_alpha": [0.6, 0.5, 0.2]}


def _drafter(label="e3-lambda", loss="lambda", architecture="eagle3", heldout=HELDOUT) -> Contender:
    return Contender(
        label=label,
        architecture=architecture,
        loss=loss,
        path=f"/runs/{label}",
        speculative_config={
            "method": architecture,
            "num_speculative_tokens": K,
            "draft_sample_method": "probabilistic",
        },
        training={"loss": loss, "heldout": heldout},
    )


def _plan(datasets=("mtbench", "gsm8k"), temperatures=(0.0, 1.0), concurrencies=(1, 8)) -> Plan:
    workloads = tuple(Workload(name, ((1, 2, 3), (4, 5))) for name in datasets)
    return Plan(workloads, temperatures, concurrencies, num_speculative_tokens=K, max_tokens=16)


# ------------------------------------------------------------------------------------------------ records
def test_record_acceptance_speedup_and_training_gap():
    counts = SpecDecodeCounts(
        num_drafts=10, num_draft_tokens=20, num_accepted_tokens=12, accepted_per_position=(7, 5)
    )
    mine = Measurement(num_requests=2, output_tokens=30, seconds=2.0, counts=counts)
    base = Measurement(num_requests=2, output_tokens=30, seconds=5.0, counts=SpecDecodeCounts())
    r = record(_drafter(), Cell("mtbench", 1.0, 1), mine, _plan(), base)
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
    r = record(_drafter(), Cell("gsm8k", 0.0, 8), Measurement(1, 9, 3.0, counts), _plan(), None)
    assert r["training_expected_acceptance_length"] == pytest.approx(1 + 0.8 + 0.8 * 0.5)
    assert r["draft_sample_method"] == "greedy"
    assert r["speedup"] is None  # no baseline in this run


def test_baseline_record_has_no_acceptance_and_speedup_one():
    base = Measurement(2, 40, 4.0, SpecDecodeCounts())
    r = record(BASELINE, Cell("mtbench", 0.0, 1), base, _plan(), base)
    assert r["architecture"] == "none" and r["loss"] is None and r["num_speculative_tokens"] == 0
    assert r["acceptance_length"] is None and r["per_position_acceptance"] is None
    assert r["speedup"] == 1.0 and r["tokens_per_s"] == 10.0


@pytest.mark.parametrize(
    "temperature, heldout", [(0.5, HELDOUT), (1.0, {"per_position_alpha": [0.6]}), (1.0, {})]
)
def test_no_training_expectation_without_a_matching_prediction(temperature, heldout):
    assert heldout_rates({"heldout": heldout}, temperature, K) is None


def test_overall_pools_tokens_seconds_and_counters():
    plan = _plan(concurrencies=(1,), temperatures=(0.0,))
    cells = [cell for cell, _ in plan.cells()]
    drafter = _drafter()
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
    plan = _plan(concurrencies=(1,), temperatures=(0.0, 1.0))
    cells = [cell for cell, _ in plan.cells()]
    for cell in cells[:2]:
        r = record(
            _drafter(), cell, Measurement(2, 30, 2.0, counts, long_request + short_request), plan, None
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
    _, overall = build_records(plan, [_drafter()], results)  # pooled over datasets: the requests add up
    assert [r["acceptance_length_mean_of_request_means"] for r in overall] == pytest.approx([3.0, 2.0])


def test_drafter_labels_are_short_and_unique(tmp_path):
    assert drafter_labels(["runs/kl/best", "runs/lk/best", "other/final"]) == [
        "kl/best",
        "lk/best",
        "other/final",
    ]
    assert drafter_labels(["runs/eagle3-alpha/best"]) == ["eagle3-alpha/best"]
    assert drafter_labels(["runs/a/drafter"]) == ["drafter"]
    assert drafter_labels(["runs/baseline"]) == ["runs/baseline"]
    from lk_vllm.errors import UserError

    with pytest.raises(UserError, match="given twice"):
        drafter_labels(["runs/a", "runs/./a"])


# ------------------------------------------------------------------------------------------------ closed loop
class _FakeEngine:
    """Finishes the oldest in-flight request every second step; records the largest number in flight."""

    def __init__(self):
        self.in_flight, self.most, self.steps = [], 0, 0

    def add_request(self, request_id, prompt, params):
        self.in_flight.append((request_id, len(prompt["prompt_token_ids"])))
        self.most = max(self.most, len(self.in_flight))

    def step(self):
        from types import SimpleNamespace

        self.steps += 1
        if self.steps % 2 or not self.in_flight:
            return [SimpleNamespace(request_id=r, finished=False, outputs=[]) for r, _ in self.in_flight]
        request_id, length = self.in_flight.pop(0)
        return [
            SimpleNamespace(
                request_id=request_id, finished=True, outputs=[SimpleNamespace(token_ids=list(range(length)))]
            )
        ]


@pytest.mark.vllm
@pytest.mark.parametrize("concurrency", [1, 3, 8])
def test_drive_keeps_exactly_c_requests_in_flight(concurrency):
    from lk_vllm.bench.runner import drive

    prompts = [[0] * n for n in range(1, 6)]
    engine, done = _FakeEngine(), []
    tokens, seconds = drive(engine, prompts, [None] * len(prompts), concurrency, lambda: done.append(1))
    assert tokens == sum(range(1, 6))  # each fake answer is as long as its prompt
    assert len(done) == 5 and not engine.in_flight and seconds >= 0
    assert engine.most == min(concurrency, 5)


# ------------------------------------------------------------------------------------------------ the page
def _document() -> dict:
    plan = _plan(datasets=("mtbench",), concurrencies=(1,))
    cells = [cell for cell, _ in plan.cells()]
    kl, lk = _drafter("e3-kl", "kl"), _drafter("e3-lambda", "lambda")
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

    plan = _plan(datasets=("mtbench", "humaneval", "gsm8k"))
    cells = [cell for cell, _ in plan.cells()]
    drafter = _drafter(label="e3-kl", loss="kl")
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


# ------------------------------------------------------------------------------------------------ the command
def test_bench_is_a_registered_command():
    assert COMMANDS["bench"][0] == "lk_vllm.bench"


@pytest.fixture
def no_engine(monkeypatch):
    """Any engine start fails the test: argument errors must come first."""
    import lk_vllm.bench.runner as runner

    def refuse(*args, **kwargs):
        raise AssertionError("an engine was started")

    monkeypatch.setattr(runner, "make_llm", refuse)


def _error(capsys, *argv) -> str:
    capsys.readouterr()  # drop what the test's own set-up printed
    assert main(["bench", *argv]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lk-vllm bench: error: ")
    return err[0]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--num-speculative-tokens", "0"], "--num-speculative-tokens: expected an integer >= 1, found 0"),
        (["--concurrency", "0"], "--concurrency: expected an integer >= 1, found 0"),
        (["--temperature", "-1"], "--temperature must be >= 0"),
        (["--limit", "0"], "--limit: expected an integer >= 1, found 0"),
        (["--max-tokens", "0"], "--max-tokens: expected an integer >= 1, found 0"),
        (["--no-baseline"], "nothing to benchmark"),
        (["--name", "a/b"], "--name must be a plain file name"),
        (["--drafter", "/no/such/drafter"], "--drafter /no/such/drafter: directory not found"),
        # the dataset is looked up after the target is checked, which imports vLLM
        pytest.param(["--dataset", "nosuchset"], "unknown dataset 'nosuchset'", marks=pytest.mark.vllm),
        (["--speculative-config", "{nope"], "expected [LABEL=]JSON object, found invalid JSON"),
        (["--speculative-config", "[1]"], 'expected a JSON object with a "method"'),
        (
            ["--speculative-config", '{"method": "eagle3", "model": "/x"}'],
            "is a drafter; pass its directory with --drafter",
        ),
        (
            ["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 0}'],
            "num_speculative_tokens: expected an integer >= 1, found 0",
        ),
        (["--speculative-config", 'baseline={"method": "ngram"}'], "label 'baseline' is taken"),
        (
            ["--speculative-config", '{"method": "ngram"}', "--speculative-config", '{"method": "ngram"}'],
            "label 'ngram-k3' is taken",
        ),
    ],
)
def test_bad_flags_fail_in_one_line_before_any_engine(no_engine, capsys, tmp_path, argv, message):
    assert message in _error(capsys, *argv, "--out-dir", str(tmp_path))


@pytest.mark.vllm
def test_bad_jsonl_fails_in_one_line(no_engine, capsys, tmp_path):
    bad = tmp_path / "mine.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"nope": 1}\n')
    assert f"{bad}:2: expected a 'messages' list or a 'prompt' string" in _error(
        capsys, "--dataset", str(bad), "--out-dir", str(tmp_path)
    )


def test_a_drafter_for_another_target_is_refused(no_engine, capsys, tmp_path):
    from train_helpers import make_tiny_target

    from lk_vllm.drafters import create_drafter, target_info
    from lk_vllm.target_model import TargetModel

    tiny = TargetModel(make_tiny_target(tmp_path / "tiny", seed=0))
    drafter = create_drafter("medusa", tiny, num_heads=K).save_pretrained(
        tmp_path / "medusa", target=target_info(tiny)
    )
    # The default target has another vocabulary.
    assert "vocabulary size 256" in _error(capsys, "--drafter", str(drafter), "--out-dir", str(tmp_path))
    # A target of the same shapes but other weights: the fingerprint in lk_training.json differs.
    other = make_tiny_target(tmp_path / "other", seed=1)
    assert "was trained for target fingerprint" in _error(
        capsys, "--drafter", str(drafter), "--target", other, "--out-dir", str(tmp_path)
    )


@pytest.mark.vllm
def test_prepare_tokenizes_with_the_chat_template(default_target, tmp_path):
    """Without starting an engine: the plan holds the chat-template ids of the JSONL prompts, the engine
    context fits the longest prompt, and the recorded command line parses back to the same run."""
    import argparse

    from transformers import AutoTokenizer

    from lk_vllm.bench import add_arguments
    from lk_vllm.bench.command import command_line, prepare
    from lk_vllm.datasets import chat_prompt_ids

    data = tmp_path / "mine.jsonl"
    data.write_text(json.dumps({"prompt": "word " * 600}) + "\n" + json.dumps({"prompt": "Hi"}) + "\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        [
            "--dataset",
            str(data),
            "--temperature",
            "0",
            "--max-tokens",
            "2000",
            "--out-dir",
            str(tmp_path / "out"),
        ]
    )
    plan, contenders, settings = prepare(args)
    tokenizer = AutoTokenizer.from_pretrained(default_target)
    expected = [
        tuple(chat_prompt_ids(tokenizer, [{"role": "user", "content": t}])) for t in ("word " * 600, "Hi")
    ]
    assert [w.dataset for w in plan.workloads] == ["mine"]
    assert list(plan.workloads[0].prompt_ids) == expected
    assert contenders == [BASELINE] and plan.temperatures == (0.0,) and plan.concurrencies == (1, 8)
    assert settings.max_model_len == len(expected[0]) + 2000 + 3 + 1 > 2048
    again = parser.parse_args(command_line(args, plan, settings, "x").split()[2:])
    assert (again.dataset, again.temperature, again.max_tokens, again.max_model_len) == (
        [data.stem],
        [0.0],
        2000,
        settings.max_model_len,
    )


@pytest.mark.vllm
def test_speculative_configs_are_labelled_contenders_and_round_trip(default_target, tmp_path):
    """--speculative-config adds a no-training contender with the bench's K unless it names its own, labelled
    METHOD-kK or LABEL=...; the recorded command line gives the same contenders back."""
    import argparse

    from lk_vllm.bench import add_arguments
    from lk_vllm.bench.command import command_line, prepare

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = [
        "--speculative-config",
        '{"method": "ngram", "prompt_lookup_max": 3}',
        "--speculative-config",
        'wide={"method": "ngram", "num_speculative_tokens": 6}',
        "--num-speculative-tokens",
        "4",
        "--limit",
        "1",
        "--out-dir",
        str(tmp_path),
    ]
    plan, contenders, settings = prepare(parser.parse_args(argv))
    assert [c.label for c in contenders] == ["baseline", "ngram-k4", "wide"]
    assert contenders[1].speculative_config == {
        "method": "ngram",
        "prompt_lookup_max": 3,
        "num_speculative_tokens": 4,
    }
    assert contenders[2].speculative_config["num_speculative_tokens"] == 6
    assert (
        contenders[1].architecture == "ngram" and contenders[1].loss is None and not contenders[1].is_baseline
    )
    again = parser.parse_args(shlex.split(command_line(parser.parse_args(argv), plan, settings, "x"))[2:])
    assert [c.speculative_config for c in prepare(again)[1]] == [c.speculative_config for c in contenders]


# ------------------------------------------------------------------------------------------------ a real run
@pytest.fixture(scope="module")
def real_run(default_target, tmp_path_factory):
    """baseline + a draft LM equal to the target, 2 mtbench prompts, T in {0, 1}, concurrency {1, 2}."""
    import lk_vllm.bench.runner as runner
    from lk_vllm.drafters import create_drafter, target_info
    from lk_vllm.target_model import TargetModel

    root = tmp_path_factory.mktemp("bench")
    target = TargetModel(default_target)
    drafter = create_drafter("draft_model", target, num_layers=target.num_layers)
    heldout = {"top1_agreement": [0.9, 0.8], "per_position_alpha": [0.7, 0.6]}
    directory = drafter.save_pretrained(
        root / "same-as-target",
        target=target_info(target),
        training={"loss": "kl", "num_steps": K, "heldout": heldout},
    )
    del target, drafter

    snapshots = []  # (engine, counters) in the order the runner read them
    real_read = runner.read_spec_decode_counters

    def spy(llm, num_positions=0):
        counters = real_read(llm, num_positions)
        snapshots.append((id(llm), json.loads(json.dumps(counters))))
        return counters

    patch = pytest.MonkeyPatch()
    patch.setattr(runner, "read_spec_decode_counters", spy)
    try:
        argv = [
            "bench",
            "--drafter",
            str(directory),
            "--limit",
            "2",
            "--max-tokens",
            "16",
            "--concurrency",
            "1",
            "--concurrency",
            "2",
            "--num-speculative-tokens",
            str(K),
            "--name",
            "tiny",
            "--out-dir",
            str(root / "results"),
        ]
        assert main(argv) == 0
    finally:
        patch.undo()
    document = json.loads((root / "results" / "tiny.json").read_text())
    return {"document": document, "snapshots": snapshots, "results": root / "results"}


@pytest.mark.engine
@pytest.mark.slow
def test_real_bench_matches_vllm_counters_and_measured_speed(real_run):
    document, snapshots = real_run["document"], real_run["snapshots"]
    for key in ("target", "hardware", "vllm_version", "command", "records"):
        assert document[key]
    records = document["records"]
    base = {
        (r["dataset"], r["temperature"], r["concurrency"]): r for r in records if r["drafter"] == "baseline"
    }
    mine = [r for r in records if r["drafter"] != "baseline"]
    assert len(base) == len(mine) == 4  # 1 dataset x 2 temperatures x 2 concurrencies
    # The drafter engine's counter snapshots: (before, after) per cell, in the order of the records.
    engine = snapshots[-1][0]
    ours = [counters for engine_id, counters in snapshots if engine_id == engine]
    assert len(ours) == 2 * len(mine)
    for index, r in enumerate(mine):
        before, after = ours[2 * index], ours[2 * index + 1]
        drafts = after["num_drafts"] - before["num_drafts"]
        accepted = after["num_accepted_tokens"] - before["num_accepted_tokens"]
        assert drafts > 0 and r["num_drafts"] == drafts and r["num_accepted_tokens"] == accepted
        assert r["acceptance_length"] == pytest.approx(1 + accepted / drafts)
        per_position = [
            a - b
            for a, b in zip(after["accepted_per_position"], before["accepted_per_position"], strict=True)
        ]
        assert r["per_position_acceptance"] == pytest.approx([count / drafts for count in per_position])
        # The drafter is the target: every draft is accepted, at T=0 and at T=1.
        assert r["acceptance_length"] == pytest.approx(K + 1, abs=0.1)
        # ... and so in every request: vLLM's per-request counters reached the record (2 prompts per cell).
        assert r["acceptance_length_mean_of_request_means"] == pytest.approx(K + 1, abs=0.1)
        assert r["acceptance_lengths"][1]["requests"] == 2
        assert r["sampling"] == ("temperature_0" if r["temperature"] == 0 else "sampled")
        reference = base[(r["dataset"], r["temperature"], r["concurrency"])]
        assert r["tokens_per_s"] == pytest.approx(r["output_tokens"] / r["seconds"])
        assert reference["tokens_per_s"] == pytest.approx(reference["output_tokens"] / reference["seconds"])
        assert r["speedup"] == pytest.approx(r["tokens_per_s"] / reference["tokens_per_s"])
        if r["temperature"] == 0:  # speculative decoding does not change greedy outputs
            assert r["output_tokens"] == reference["output_tokens"]
        expected = 1 + 0.9 + 0.9 * 0.8 if r["temperature"] == 0 else 1 + 0.7 + 0.7 * 0.6
        assert r["training_expected_acceptance_length"] == pytest.approx(expected)
        assert r["acceptance_length_gap_percent"] == pytest.approx(
            100 * (r["acceptance_length"] - expected) / expected
        )
        assert r["architecture"] == "draft_model" and r["loss"] == "kl" and r["num_speculative_tokens"] == K
    assert all(r["speedup"] == 1.0 and r["acceptance_length"] is None for r in base.values())
    assert (real_run["results"] / "tiny.md").read_text().startswith("# Benchmark: tiny")
    assert (real_run["results"] / "tiny.png").read_bytes()[:4] == b"\x89PNG"
