"""The draft LM (lk_vllm.drafters.draft_model): built from the target's first layers."""

import pytest
import torch
from drafter_helpers import LAYERS

from lk_vllm.drafters import (
    create_drafter,
    load_drafter,
    speculative_config_for,
    target_info,
)

pytestmark = pytest.mark.unit


def test_draft_lm_from_all_target_layers_is_the_target(tmp_path, target, batch):
    drafter = create_drafter("draft_model", target, num_layers=LAYERS)
    states = target(batch[0], batch[1])
    (step,) = drafter.training_steps(states, 3)
    assert step.target_shift == 0
    torch.testing.assert_close(step.logits()[step.mask], states.all_logits()[step.mask], atol=1e-5, rtol=1e-5)
    out = drafter.save_pretrained(tmp_path / "lm", target=target_info(target))
    assert "lm_head.weight" not in __import__("safetensors.torch").torch.load_file(
        str(out / "model.safetensors")
    )
    loaded = load_drafter(out, target)
    assert speculative_config_for(out, 4)["method"] == "draft_model"
    # Its proposals are its own greedy continuation, exactly what vLLM's draft_model proposer drafts.
    tokens = batch[0][:1]
    propose = loaded.make_proposer(target(tokens), 3)
    for anchor in (2, 6):
        expected = target.generate_greedy(tokens[0, : anchor + 2].tolist(), 3)
        assert propose(anchor) == expected


def test_draft_lm_first_layers_are_copied(target):
    drafter = create_drafter("draft_model", target, num_layers=2)
    source = target.model.state_dict()
    for name, tensor in drafter.model.state_dict().items():
        torch.testing.assert_close(tensor, source[name])
    assert drafter.model.config.num_hidden_layers == 2
