"""Train-serve parity on the default target (test_eval.py, test_mlp_proposer.py): a drafter trained briefly on
the target's own greedy continuations, and the comparison of the torch simulation's acceptance with vLLM's.
The ``setup`` fixture (the target, the prompts and their continuations) is in tests/conftest.py."""

import pytest
import torch

from lk_vllm.drafters import multi_step_loss

K = 3  # speculative tokens
MAX_TOKENS = 32
NUM_PROMPTS = 4
TOLERANCE = 0.03


def train_drafter(drafter, setup, steps: int, lr: float) -> None:
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


def assert_parity(torch_summary, vllm_summary, minimum: float):
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
