"""The Medusa drafter (lk_vllm.drafters.medusa): heads that start as the target's head, a truncated
vocabulary round trip and vLLM's parameter names."""

import json

import pytest
import torch
from drafter_helpers import VOCAB, randomize

from lk_vllm.drafters import (
    create_drafter,
    load_drafter,
    speculative_config_for,
    target_info,
)
from lk_vllm.errors import UserError

pytestmark = pytest.mark.unit


def test_medusa_heads_start_as_the_target_head(target, batch):
    drafter = create_drafter("medusa", target, num_heads=3)
    states = target(batch[0], batch[1])
    steps = drafter.training_steps(states, 3)
    assert [s.target_shift for s in steps] == [1, 2, 3]
    # Identity blocks and the target's LM head: every head predicts what the target predicts at t.
    torch.testing.assert_close(steps[2].logits(), states.all_logits())
    assert drafter.draft_to_target is None
    assert not drafter.lm_heads[0].weight.requires_grad


def test_medusa_truncated_round_trip_and_vllm_names(tmp_path, target, batch):
    draft_to_target = torch.arange(1, VOCAB, 3)
    drafter = create_drafter(
        "medusa", target, num_heads=2, num_layers=2, draft_to_target=draft_to_target, fc_bias=True
    )
    randomize(drafter)
    out = drafter.save_pretrained(tmp_path / "m", target=target_info(target))
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "medusa" and config["truncated_vocab_size"] == draft_to_target.numel()
    assert config["original_lm_head"] is True
    from safetensors.torch import load_file

    names = set(load_file(str(out / "model.safetensors")))
    assert names == {"token_map", "lm_heads.0.weight"} | {
        f"blocks.{h}.layers.{layer}.{p}" for h in range(2) for layer in range(2) for p in ("weight", "bias")
    }
    loaded = load_drafter(out, target)
    states = target(batch[0], batch[1])
    proposals = loaded.propose_all(states, 2)
    assert set(proposals.flatten().tolist()) <= set(draft_to_target.tolist())
    torch.testing.assert_close(drafter.propose_all(states, 2), proposals)
    assert speculative_config_for(out, 2)["method"] == "medusa"
    with pytest.raises(UserError, match="at most 2"):
        speculative_config_for(out, 3)
