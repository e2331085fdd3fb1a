"""The bench command's preparation (lk_vllm.bench.command), without starting an engine: prompts tokenized
with the chat template, speculative configs as labelled contenders, and a recorded command line that gives the
same run back."""

from __future__ import annotations

import json
import shlex

import pytest

from lk_vllm.bench.contenders import BASELINE

pytestmark = pytest.mark.vllm


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
