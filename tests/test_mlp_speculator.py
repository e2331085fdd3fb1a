"""The MLP speculator (lk_vllm.drafters.mlp_speculator): its stage math and checkpoint round trip."""

import json
import math

import pytest
import torch
from drafter_helpers import HIDDEN, randomize

from lk_vllm.drafters import (
    create_drafter,
    load_drafter,
    speculative_config_for,
    target_info,
)
from lk_vllm.errors import UserError

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("tie_weights", [False, True])
def test_mlp_speculator_stage_math_and_round_trip(tmp_path, target, batch, tie_weights):
    drafter = create_drafter("mlp_speculator", target, n_predict=3, tie_weights=tie_weights)
    randomize(drafter)
    states = target(batch[0], batch[1])
    steps = drafter.training_steps(states, 3)
    # Stage 0 by hand, from vLLM's definition.
    x = states.final_hidden
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) / math.sqrt(2)
    state_weight = 0.5 ** (0.5 / 3)
    emb_weight = math.sqrt((1 - state_weight**2) * HIDDEN / 2)
    tokens = torch.cat([batch[0][:, 1:], torch.zeros_like(batch[0][:, :1])], dim=1)
    z = drafter.proj[0](x) + drafter.emb[0].weight[tokens] * emb_weight / state_weight
    z = z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + 1e-6) * drafter.ln[0].weight + drafter.ln[0].bias
    torch.testing.assert_close(steps[0].logits(), drafter.head[0](torch.nn.functional.gelu(z)))
    out = drafter.save_pretrained(tmp_path / "s", target=target_info(target))
    assert json.loads((out / "config.json").read_text())["model_type"] == "mlp_speculator"
    loaded = load_drafter(out, target)
    with torch.no_grad():
        torch.testing.assert_close(loaded.training_steps(states, 3)[2].logits(), steps[2].logits())
    assert speculative_config_for(out, 3)["method"] == "mlp_speculator"  # served through lk-vllm's plugin
    with pytest.raises(UserError, match="it has 3 stages"):
        speculative_config_for(out, 4)
