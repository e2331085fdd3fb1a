"""Train-serve parity: a briefly trained drafter on the default target has the same mean acceptance length in
the torch simulation and in vLLM (T=0, fixed prompts), for EAGLE-3 (plain and speculators format), Medusa and
the draft LM. Slow: each drafter trains for a few dozen steps and gets its own vLLM engine.

The drafters train on the target's own greedy continuations of the evaluation prompts: then the drafter
learns exactly what the target says and acceptance is far above 1, which is what makes the comparison
meaningful (a random drafter agrees with anything at acceptance length 1).
"""

import pytest
from parity_helpers import MAX_TOKENS, K, assert_parity, train_drafter
from train_helpers import FP32_ENGINE

from lk_vllm.drafters import create_drafter, load_drafter, target_info

pytestmark = [pytest.mark.slow, pytest.mark.engine]


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


@pytest.fixture(scope="module")
def eagle3_dir(setup, tmp_path_factory):
    from lk_vllm.vocab import build_draft_vocab

    target = setup["target"]
    draft_to_target = build_draft_vocab(setup["sequences"], target.vocab_size, 2048, target.tokenizer)
    drafter = create_drafter("eagle3", target, draft_to_target=draft_to_target)
    train_drafter(drafter, setup, steps=40, lr=3e-3)
    directory = tmp_path_factory.mktemp("parity") / "eagle3"
    drafter.save_pretrained(directory, target=target_info(target), training={"loss": "kl", "steps": 40})
    return directory


def test_eagle3_parity(eagle3_dir, setup):
    torch_summary, vllm_summary = _both_engines(eagle3_dir, setup)
    assert_parity(torch_summary, vllm_summary, minimum=1.5)


def test_eagle3_speculators_format_serves_the_same(eagle3_dir, setup, tmp_path):
    """The same weights in the speculators format (as RedHatAI / Nebius publish EAGLE-3 heads)."""
    target = setup["target"]
    drafter = load_drafter(eagle3_dir, target)
    directory = drafter.save_pretrained(
        tmp_path / "speculators", target=target_info(target), export_format="speculators"
    )
    torch_summary, vllm_summary = _both_engines(directory, setup)
    assert_parity(torch_summary, vllm_summary, minimum=1.5)


def test_medusa_parity(setup, tmp_path):
    target = setup["target"]
    drafter = create_drafter("medusa", target, num_heads=K)
    train_drafter(drafter, setup, steps=40, lr=5e-3)
    directory = drafter.save_pretrained(tmp_path / "medusa", target=target_info(target))
    torch_summary, vllm_summary = _both_engines(directory, setup)
    assert_parity(torch_summary, vllm_summary, minimum=1.3)


def test_draft_lm_parity(setup, tmp_path):
    target = setup["target"]
    drafter = create_drafter("draft_model", target, num_layers=2)
    train_drafter(drafter, setup, steps=30, lr=1e-3)
    directory = drafter.save_pretrained(tmp_path / "draft_lm", target=target_info(target))
    torch_summary, vllm_summary = _both_engines(directory, setup)
    assert_parity(torch_summary, vllm_summary, minimum=1.3)
