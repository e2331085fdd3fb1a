"""Train-serve parity: a briefly trained drafter on the default target has the same mean acceptance length in
the torch simulation and in vLLM (T=0, fixed prompts), for EAGLE-3 (plain and speculators format), Medusa and
the draft LM. Slow: each drafter trains for a few dozen steps and gets its own vLLM engine.

The drafters train on the target's own greedy continuations of the evaluation prompts: then the drafter
learns exactly what the target says and acceptance is far above 1, which is what makes the comparison
meaningful (a random drafter agrees with anything at acceptance length 1).
"""

import pytest
import torch
from train_helpers import FP32_ENGINE, greedy_batch

from lk_vllm.drafters import create_drafter, load_drafter, multi_step_loss, target_info

pytestmark = [pytest.mark.slow, pytest.mark.engine]

K = 3  # speculative tokens
MAX_TOKENS = 32
NUM_PROMPTS = 4
TOLERANCE = 0.03


@pytest.fixture(scope="module")
def setup(default_target):
    from lk_vllm.datasets import load_prompts
    from lk_vllm.target_model import TargetModel

    torch.manual_seed(0)
    target = TargetModel(default_target)
    prompts = load_prompts("mtbench", split="eval", limit=NUM_PROMPTS)
    return {"target": target, "prompts": prompts, **greedy_batch(target, prompts, MAX_TOKENS + K + 1)}


def _train(drafter, setup, steps: int, lr: float) -> None:
    """A minimal loop: KL through lk_vllm.losses over K unrolled steps on the fixed batch."""
    target = setup["target"]
    states = target(setup["input_ids"], setup["mask"], aux_layer_ids=drafter.aux_layer_ids_needed())
    states.cache_all_logits()
    optimizer = torch.optim.AdamW(drafter.trainable_parameters(), lr=lr, weight_decay=0.0)
    drafter.train()
    for _ in range(steps):
        out = multi_step_loss(
            drafter.training_steps(states, K),
            states,
            kind="kl",
            draft_to_target=drafter.draft_to_target,
            loss_mask=setup["loss_mask"],
        )
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    drafter.eval()


def _both_engines(directory, setup):
    from lk_vllm.bench.runner import evaluate_vllm
    from training.evaluate import evaluate_torch

    target = setup["target"]
    drafter = load_drafter(directory, target)
    torch_counts = evaluate_torch(
        drafter, target, setup["prompts"], K, MAX_TOKENS, 0.0, continuations=setup["continuations"]
    )["mtbench"]
    prompt_ids = {"mtbench": [target.chat_prompt_ids(p.messages) for p in setup["prompts"]]}
    vllm_counts = evaluate_vllm(
        str(directory), target.path, prompt_ids, K, MAX_TOKENS, 0.0, settings_overrides=FP32_ENGINE
    )["mtbench"]
    return torch_counts.summary(), vllm_counts.summary()


def _assert_parity(torch_summary, vllm_summary, minimum: float):
    print(f"torch {torch_summary}\nvllm  {vllm_summary}")
    assert torch_summary["acceptance_length"] > minimum, (
        "the drafter did not learn: the comparison means nothing"
    )
    assert vllm_summary["acceptance_length"] == pytest.approx(
        torch_summary["acceptance_length"], rel=TOLERANCE
    )
    for a, b in zip(
        torch_summary["per_position_acceptance"], vllm_summary["per_position_acceptance"], strict=True
    ):
        assert b == pytest.approx(a, abs=0.05)


@pytest.fixture(scope="module")
def eagle3_dir(setup, tmp_path_factory):
    from lk_vllm.vocab import build_draft_vocab

    target = setup["target"]
    draft_to_target = build_draft_vocab(setup["sequences"], target.vocab_size, 2048, target.tokenizer)
    drafter = create_drafter("eagle3", target, draft_to_target=draft_to_target)
    _train(drafter, setup, steps=40, lr=3e-3)
    directory = tmp_path_factory.mktemp("parity") / "eagle3"
    drafter.save_pretrained(directory, target=target_info(target), training={"loss": "kl", "steps": 40})
    return directory


def test_eagle3_parity(eagle3_dir, setup):
    torch_summary, vllm_summary = _both_engines(eagle3_dir, setup)
    _assert_parity(torch_summary, vllm_summary, minimum=1.5)


def test_eagle3_speculators_format_serves_the_same(eagle3_dir, setup, tmp_path):
    """The same weights in the speculators format (as RedHatAI / Nebius publish EAGLE-3 heads)."""
    target = setup["target"]
    drafter = load_drafter(eagle3_dir, target)
    directory = drafter.save_pretrained(
        tmp_path / "speculators", target=target_info(target), export_format="speculators"
    )
    torch_summary, vllm_summary = _both_engines(directory, setup)
    _assert_parity(torch_summary, vllm_summary, minimum=1.5)


def test_medusa_parity(setup, tmp_path):
    target = setup["target"]
    drafter = create_drafter("medusa", target, num_heads=K)
    _train(drafter, setup, steps=40, lr=5e-3)
    directory = drafter.save_pretrained(tmp_path / "medusa", target=target_info(target))
    torch_summary, vllm_summary = _both_engines(directory, setup)
    _assert_parity(torch_summary, vllm_summary, minimum=1.3)


def test_draft_lm_parity(setup, tmp_path):
    target = setup["target"]
    drafter = create_drafter("draft_model", target, num_layers=2)
    _train(drafter, setup, steps=30, lr=1e-3)
    directory = drafter.save_pretrained(tmp_path / "draft_lm", target=target_info(target))
    torch_summary, vllm_summary = _both_engines(directory, setup)
    _assert_parity(torch_summary, vllm_summary, minimum=1.3)
