"""The target as the trainer sees it (lk_vllm.target_model): auxiliary hidden states by vLLM's rule."""

import pytest
import torch
from drafter_helpers import HIDDEN, LAYERS

from lk_vllm.errors import UserError

pytestmark = pytest.mark.unit


def test_aux_states_follow_vllm_semantics(target, batch):
    ids, _ = batch
    states = target(ids, aux_layer_ids=[LAYERS, 0, 2])  # any order in, ascending out
    assert states.aux_layer_ids == (0, 2, LAYERS)
    reference = target.model(ids, output_hidden_states=True)
    chunks = states.aux_hidden.split(HIDDEN, dim=-1)
    torch.testing.assert_close(chunks[0], reference.hidden_states[0])
    torch.testing.assert_close(chunks[1], reference.hidden_states[2])
    # id L is the last layer's output BEFORE the final norm; transformers' last entry is after it.
    torch.testing.assert_close(target.model.model.norm(chunks[2]), states.final_hidden)
    assert not torch.allclose(chunks[2], reference.hidden_states[LAYERS])
    torch.testing.assert_close(states.all_logits(), reference.logits)
    rows, cols = torch.tensor([0, 1, 1]), torch.tensor([3, 0, 11])
    torch.testing.assert_close(states.logits_at(rows, cols, chunk_size=2), reference.logits[rows, cols])


def test_aux_layer_ids_are_checked(target, batch):
    with pytest.raises(UserError, match="distinct"):
        target(batch[0], aux_layer_ids=[1, 1, 2])
    with pytest.raises(UserError, match=r"0\.\.4"):
        target(batch[0], aux_layer_ids=[1, 2, 5])
