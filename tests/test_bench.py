"""lk-vllm bench (lk_vllm.bench): the command and its argument checks (no engine), and one real run (slow).

The slow test benchmarks the baseline against a draft LM that IS the target (every layer copied): whatever vLLM
does, such a drafter's drafts are always accepted, so the acceptance length must be K + 1 and the outputs at
T=0 must equal the baseline's. The json's acceptance numbers are also checked against the engine's own counter
snapshots, read through a spy.
"""

from __future__ import annotations

import json

import pytest
from bench_helpers import K

from lk_vllm.cli import main

pytestmark = pytest.mark.unit


# ------------------------------------------------------------------------------------------------ the command
def test_bench_is_a_registered_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: lk-vllm bench") and "--drafter" in out and "--concurrency" in out


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

    snapshots = []  # (engine number, counters) in the order the runner read them
    real_read = runner.read_spec_decode_counters

    def spy(llm, num_positions=0):
        counters = real_read(llm, num_positions)
        # Engines are numbered on first sight: id() is reused once the baseline engine is freed.
        if not hasattr(llm, "_test_engine_number"):
            llm._test_engine_number = len({number for number, _ in snapshots})
        snapshots.append((llm._test_engine_number, json.loads(json.dumps(counters))))
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
        assert r["training_expected_source"] == "held-out training samples"
        assert r["acceptance_length_gap_percent"] == pytest.approx(
            100 * (r["acceptance_length"] - expected) / expected
        )
        assert r["architecture"] == "draft_model" and r["loss"] == "kl" and r["num_speculative_tokens"] == K
    assert all(r["speedup"] == 1.0 and r["acceptance_length"] is None for r in base.values())
    assert (real_run["results"] / "tiny.md").read_text().startswith("# Benchmark: tiny")
    assert (real_run["results"] / "tiny.png").read_bytes()[:4] == b"\x89PNG"
