"""The EAGLE-3 drafter (lk_vllm.drafters.eagle3) on a tiny random Llama target: its unroll against vLLM's
drafting loop, padding, blockwise attention, gradients, its two checkpoint formats, third-party speculators
checkpoints, vLLM's default auxiliary layers, and Gemma-3's RoPE settings written flat."""

from __future__ import annotations

import json
import math

import pytest
import torch
from drafter_helpers import HIDDEN, VOCAB, make_eagle3

from lk_vllm.drafters import (
    create_drafter,
    load_drafter,
    speculative_config_for,
    target_info,
)
from lk_vllm.errors import UserError

pytestmark = pytest.mark.unit


def _eagle3_reference(drafter, target, tokens, anchor, drafted):
    """vLLM's drafting loop written independently: per-position step-0 over the context, then one query per
    later step over a growing key/value cache. ``drafted``: tokens fed at steps 1.. (target ids).
    Returns the draft logits of each step at ``anchor``."""
    layer = drafter.layers[0]
    attn = layer.self_attn
    states = target(tokens[None], aux_layer_ids=drafter.aux_layer_ids)
    embed = target.embed_weight
    cache_k, cache_v = [], []

    def run(token, hidden_in, position):
        e = layer.input_layernorm(embed[token])
        if drafter.norm_before_residual:
            h = layer.hidden_norm(hidden_in)
            residual = h
        else:
            residual, h = hidden_in, layer.hidden_norm(hidden_in)
        x = torch.cat([e, h])[None, None]
        cos, sin = drafter.rotary(x, torch.tensor([[position]]))
        q, k, v = attn.project(x, cos, sin)  # [1, nh, 1, d]
        cache_k.append(k[0, :, 0])
        cache_v.append(v[0, :, 0])
        keys, values = torch.stack(cache_k, 1), torch.stack(cache_v, 1)  # [nh, n, d]
        weights = torch.softmax((q[0, :, 0, None, :] * keys).sum(-1) / math.sqrt(attn.head_dim), dim=-1)
        out = attn.o_proj((weights[..., None] * values).sum(1).reshape(-1))
        residual = out + residual
        pre = layer.mlp(layer.post_attention_layernorm(residual)) + residual
        normed = drafter.norm(pre)
        return drafter.lm_head(normed), (normed if drafter.norm_output else pre)

    for position in range(anchor + 1):  # step 0 over the context (one position at a time, causal)
        g = drafter.combine_hidden_states(states.aux_hidden[0, position])
        logits, hidden = run(int(tokens[position + 1]), g, position)
    outputs = [logits]
    for step, token in enumerate(drafted, start=1):
        logits, hidden = run(int(token), hidden, anchor + step)
        outputs.append(logits)
    return outputs


@pytest.mark.parametrize("norm_before_residual", [False, True])
def test_eagle3_unroll_matches_vllm_drafting_loop(target, norm_before_residual):
    drafter = make_eagle3(target, norm_before_residual=norm_before_residual)
    torch.manual_seed(4)
    tokens = torch.randint(0, VOCAB, (14,))
    states = target(tokens[None], aux_layer_ids=drafter.aux_layer_ids)
    with torch.no_grad():
        steps = drafter.training_steps(states, 3)
        proposals = drafter.propose_all(states, 3)[0]
    assert [s.target_shift for s in steps] == [1, 2, 3]
    for anchor in (0, 5, 9):
        # Teacher forcing: steps read the data's tokens t+2, t+3.
        with torch.no_grad():
            reference = _eagle3_reference(drafter, target, tokens, anchor, tokens[anchor + 2 : anchor + 4])
        for step in range(3):
            torch.testing.assert_close(steps[step].logits()[0, anchor], reference[step], atol=1e-4, rtol=1e-4)
        # Greedy drafting: steps read the previous draft (mapped through d2t), as vLLM does.
        with torch.no_grad():
            first = drafter.draft_ids[_eagle3_reference(drafter, target, tokens, anchor, [])[0].argmax()]
            second = drafter.draft_ids[
                _eagle3_reference(drafter, target, tokens, anchor, [first])[1].argmax()
            ]
            third = drafter.draft_ids[
                _eagle3_reference(drafter, target, tokens, anchor, [first, second])[2].argmax()
            ]
        assert proposals[anchor].tolist() == [int(first), int(second), int(third)]
    # Valid anchors: step k needs tokens up to t + 1 + k.
    assert steps[2].mask[0].tolist() == [True] * 11 + [False] * 3


def test_eagle3_padding_does_not_change_real_positions(target, batch):
    drafter = make_eagle3(target)
    ids, mask = batch
    full = target(ids, mask, aux_layer_ids=drafter.aux_layer_ids)
    alone = target(ids[1:, :9], aux_layer_ids=drafter.aux_layer_ids)
    with torch.no_grad():
        padded = [s.logits()[1, :9] for s in drafter.training_steps(full, 2)]
        single = [s.logits()[0] for s in drafter.training_steps(alone, 2)]
    for k in range(2):
        valid = 9 - (k + 1)
        torch.testing.assert_close(padded[k][:valid], single[k][:valid], atol=1e-5, rtol=1e-5)


def test_eagle3_blockwise_attention_equals_one_block(target, batch, monkeypatch):
    """Later steps' attention in blocks of 4 query rows (each recomputed in backward) gives the values and
    gradients of one block over the whole sequence."""
    from lk_vllm.drafters import eagle3

    ids, mask = batch
    states = target(ids, mask, aux_layer_ids=[1, 2, 3])
    results = []
    for block in (512, 4):
        monkeypatch.setattr(eagle3, "ATTENTION_BLOCK", block)
        drafter = make_eagle3(target)
        steps = drafter.training_steps(states, 3)
        logits = [s.logits() for s in steps]
        weights = torch.linspace(-1, 1, logits[0].shape[-1])
        sum((k + 1) * (x * weights).sum() for k, x in enumerate(logits)).backward()
        results.append(([x.detach() for x in logits], {n: p.grad for n, p in drafter.named_parameters()}))
    (one, one_grads), (blocks, block_grads) = results
    for a, b in zip(one, blocks, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert one_grads.keys() == block_grads.keys()
    for name, grad in one_grads.items():
        torch.testing.assert_close(grad, block_grads[name], atol=1e-4, rtol=1e-4, msg=name)


def test_eagle3_refuses_left_padded_states(target, batch):
    ids, mask = batch
    drafter = make_eagle3(target)
    states = target(ids, mask.flip(1), aux_layer_ids=drafter.aux_layer_ids)
    with pytest.raises(ValueError, match="right-padded"):
        drafter.training_steps(states, 2)


def test_eagle3_gradients_reach_only_drafter_weights(target, batch):
    drafter = make_eagle3(target)
    states = target(batch[0], batch[1], aux_layer_ids=drafter.aux_layer_ids)
    steps = drafter.training_steps(states, 3)
    loss = sum(s.pairs(states)[0].logsumexp(-1).mean() for s in steps)
    loss.backward()
    assert drafter.fc.weight.grad is not None and drafter.lm_head.weight.grad is not None
    assert target.embed_weight.grad is None
    assert not any(name.startswith("_embed") for name in drafter.state_dict())


@pytest.mark.parametrize("export_format", ["eagle3", "speculators"])
def test_eagle3_round_trip(tmp_path, target, batch, export_format):
    drafter = make_eagle3(target)
    out = drafter.save_pretrained(
        tmp_path / "d", target=target_info(target), training={"loss": "kl"}, export_format=export_format
    )
    config = json.loads((out / "config.json").read_text())
    if export_format == "eagle3":
        assert config["architectures"] == ["LlamaForCausalLMEagle3"]
        assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]
        assert config["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]  # where vLLM's V2 runner reads them
    else:
        assert config["speculators_model_type"] == "eagle3"
        assert config["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]
        assert config["speculators_config"]["verifier"]["name_or_path"] == target.path
    assert config["draft_vocab_size"] == VOCAB // 2
    from safetensors.torch import load_file

    weights = load_file(str(out / "model.safetensors"))
    assert "embed_tokens.weight" not in weights  # vLLM shares the target's
    assert weights["d2t"].tolist() == list(range(0, VOCAB // 2))  # target = draft + d2t: 2d = d + d
    assert weights["t2d"].sum() == VOCAB // 2
    record = json.loads((out / "lk_training.json").read_text())
    assert record["target"]["fingerprint"] and record["training"] == {"loss": "kl"}
    loaded = load_drafter(out, target)
    assert loaded.norm_before_residual == drafter.norm_before_residual
    states = target(batch[0], batch[1], aux_layer_ids=drafter.aux_layer_ids)
    with torch.no_grad():
        for a, b in zip(drafter.training_steps(states, 2), loaded.training_steps(states, 2), strict=True):
            torch.testing.assert_close(a.logits(), b.logits())
    spec = speculative_config_for(out, 3)
    assert spec == {"method": "eagle3", "model": str(out.resolve()), "num_speculative_tokens": 3}


def test_third_party_speculators_checkpoint_loads(tmp_path, target, batch):
    """A checkpoint as RedHatAI / Nebius publish them: speculators config, ``midlayer.*`` names, own
    embeddings, norm_before_residual left to vLLM's speculators default (True)."""
    from safetensors.torch import save_file

    from lk_vllm.drafters.eagle3 import speculators_config

    reference = make_eagle3(target, norm_before_residual=True)
    config = speculators_config(
        reference._layer_config(),
        {"draft_vocab_size": VOCAB // 2, "target_hidden_size": HIDDEN},
        [1, 2, 3],
        target_path="meta-llama/Some-Target",
    )
    state = {k.replace("layers.0.", "midlayer."): v for k, v in reference.export_state_dict().items()}
    state["embed_tokens.weight"] = target.embed_weight.detach().clone() * 2  # its own embeddings
    directory = tmp_path / "third_party"
    directory.mkdir()
    save_file(state, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config))
    loaded = load_drafter(directory, target)
    assert loaded.norm_before_residual and loaded.own_embeddings
    reference.set_embeddings(target.embed_weight * 2, own=True)
    states = target(batch[0], batch[1], aux_layer_ids=[1, 2, 3])
    with torch.no_grad():
        torch.testing.assert_close(
            reference.training_steps(states, 2)[1].logits(), loaded.training_steps(states, 2)[1].logits()
        )


def test_eagle3_without_aux_ids_uses_vllm_default(tmp_path, target):
    out = make_eagle3(target).save_pretrained(tmp_path / "d", target=target_info(target))
    config = json.loads((out / "config.json").read_text())
    del config["eagle_config"], config["eagle_aux_hidden_state_layer_ids"]
    (out / "config.json").write_text(json.dumps(config))
    loaded = load_drafter(out)
    assert loaded.aux_layer_ids is None
    # vLLM's default (2, L // 2, L - 3) repeats a layer on this 4-layer target, which vLLM cannot serve either.
    with pytest.raises(UserError, match=r"distinct, found \[2, 2, 1\]"):
        load_drafter(out, target)


@pytest.mark.unit
def test_the_eagle3_exporter_writes_flat_rope_settings_for_gemma3(gemma3, tmp_path):
    from lk_vllm.drafters.eagle3 import drafter_rope_parameters
    from lk_vllm.target_model import TargetModel

    target = TargetModel(gemma3)
    assert drafter_rope_parameters(target.config) == {"rope_theta": 1000000.0, "rope_type": "default"}
    drafter = create_drafter(
        "eagle3", target, draft_to_target=torch.arange(0, 262144, 64), aux_layer_ids=(0, 1, 2)
    )
    config = json.loads(
        (drafter.save_pretrained(tmp_path / "e3", target=target_info(target)) / "config.json").read_text()
    )
    assert config["rope_parameters"] == {"rope_theta": 1000000.0, "rope_type": "default"}
