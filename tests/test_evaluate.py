"""The torch evaluator (training.evaluate): its chain simulation and the ``lk-vllm eval`` command (fast:
tiny target, no engine; the simulation against vLLM is test_eval.py)."""

import json
import math

import pytest
import torch

from lk_vllm.drafters import create_drafter, target_info
from lk_vllm.errors import UserError
from lk_vllm.target_model import TargetModel
from training.evaluate import expected_alpha, simulate_greedy

pytestmark = pytest.mark.unit


K = 3
MAX_TOKENS = 20


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        vocab_size=128,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    path = tmp_path_factory.mktemp("tiny_target")
    LlamaForCausalLM(config).save_pretrained(path)
    model = TargetModel(str(path))
    model.stop_token_ids = lambda: set()  # never stop early: every request runs MAX_TOKENS tokens
    return model


class ScriptedDrafter:
    """Proposes the true next tokens for the first ``correct`` positions, then a token that is never right."""

    def __init__(self, correct: int):
        self.correct = correct

    def aux_layer_ids_needed(self):
        return None

    def make_proposer(self, states, num_tokens):
        sequence = states.input_ids[0].tolist()

        def propose(anchor):
            truth = sequence[anchor + 2 : anchor + 2 + num_tokens]
            return [t if k < self.correct else -1 for k, t in enumerate(truth)]

        return propose


@pytest.mark.parametrize("correct", [0, 1, K])
def test_chain_simulation_counts_like_vllm(target, correct):
    counts = simulate_greedy(ScriptedDrafter(correct), target, [5, 6, 7], K, MAX_TOKENS)
    # The prefill emits one token; each verification step emits the accepted drafts plus one bonus token.
    expected_drafts = math.ceil((MAX_TOKENS - 1) / (correct + 1))
    assert counts.num_drafts == expected_drafts
    assert counts.accepted_per_position == [expected_drafts if k < correct else 0 for k in range(K)]
    summary = counts.summary()
    assert summary["acceptance_length"] == pytest.approx(1 + correct)
    assert summary["per_position_acceptance"] == [1.0 if k < correct else 0.0 for k in range(K)]


def test_a_drafter_equal_to_the_target_is_always_accepted(target):
    drafter = create_drafter("draft_model", target, num_layers=2)  # every layer: the target itself
    counts = simulate_greedy(drafter, target, [3, 1, 4, 1, 5], K, MAX_TOKENS)
    assert counts.accepted_per_position == [counts.num_drafts] * K
    generator = torch.Generator().manual_seed(0)
    alpha = expected_alpha(drafter, target, [3, 1, 4, 1, 5], K, MAX_TOKENS, 0.7, generator).summary()
    assert alpha["per_position_alpha"] == pytest.approx([1.0] * K, abs=1e-5)
    assert alpha["acceptance_length"] == pytest.approx(K + 1, abs=1e-4)


@pytest.mark.vllm
def test_eval_command_json_on_the_default_target(default_target, tmp_path, capsys):
    from lk_vllm.cli import main

    target = TargetModel(default_target)
    drafter = create_drafter("draft_model", target, num_layers=1)
    directory = drafter.save_pretrained(tmp_path / "lm", target=target_info(target))
    rc = main(
        [
            "eval",
            "--drafter",
            str(directory),
            "--engine",
            "torch",
            "--dataset",
            "mtbench",
            "--limit",
            "1",
            "--max-tokens",
            "6",
            "--num-speculative-tokens",
            "2",
            "--json",
        ]
    )
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert result["target"] == default_target and result["engine"] == "torch"
    assert len(result["per_position_acceptance"]) == 2 and result["acceptance_length"] >= 1.0
    assert result["datasets"]["mtbench"]["acceptance_length"] == result["acceptance_length"]


@pytest.mark.vllm
def test_eval_command_rejects_a_drafter_for_another_target(default_target, target, tmp_path, capsys):
    from lk_vllm.cli import main

    directory = create_drafter("medusa", target, num_heads=2).save_pretrained(
        tmp_path / "m", target=target_info(target)
    )
    rc = main(
        ["eval", "--drafter", str(directory), "--target", default_target, "--engine", "vllm", "--limit", "1"]
    )
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert rc == 1
    assert len(errors) == 1 and errors[0].startswith("lk-vllm eval: error: drafter ")
    assert "vocabulary size 128" in errors[0] and "49152" in errors[0]
    rc = main(["eval", "--drafter", str(directory), "--num-speculative-tokens", "0"])
    assert rc == 1 and "--num-speculative-tokens" in capsys.readouterr().err


def test_eval_refuses_bad_counts_before_loading_anything(tmp_path):
    from training.evaluate import run_eval

    for flag, num_tokens, max_tokens in (("--num-speculative-tokens", 0, 8), ("--max-tokens", 3, 0)):
        with pytest.raises(UserError, match=f"^{flag}: expected an integer >= 1, found 0$"):
            run_eval(str(tmp_path / "no-drafter"), None, ["mtbench"], 2, "torch", num_tokens, max_tokens, 0.0)
