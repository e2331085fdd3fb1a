"""Drafter modules, their vLLM semantics, checkpoints and bad input, on a tiny random Llama target (fast)."""

import json
import math

import pytest
import torch

from lk_vllm.drafters import (
    create_drafter,
    detect_architecture,
    load_drafter,
    speculative_config_for,
    target_info,
)
from lk_vllm.drafters.base import TrainingRecord, read_drafter_files
from lk_vllm.errors import UserError
from lk_vllm.target_model import TargetModel

pytestmark = pytest.mark.unit

LAYERS = 4
HIDDEN = 64
VOCAB = 256


def _tiny_llama(seed: int, hidden: int = HIDDEN, vocab: int = VOCAB):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=LAYERS,
        num_attention_heads=hidden // 32,
        num_key_value_heads=1,
        head_dim=32,
        vocab_size=vocab,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # larger weights than HF's init so states differ visibly between layers
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(std=0.2)
    return model


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_target")
    _tiny_llama(0).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def target(target_dir):
    return TargetModel(target_dir)


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 12))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 9:] = False  # right padding on the second row
    return ids, mask


def _randomize(module, seed=2, std=0.2):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if parameter.requires_grad:
                parameter.normal_(std=std) if "norm" not in name else parameter.uniform_(0.5, 1.5)


# ---------------------------------------------------------------------------------------------- target states
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


# ---------------------------------------------------------------------------------------------- EAGLE-3
def _eagle3(target, seed=3, **options):
    draft_to_target = torch.arange(0, VOCAB, 2)  # a truncated draft vocabulary (every other token)
    drafter = create_drafter(
        "eagle3", target, draft_to_target=draft_to_target, aux_layer_ids=[1, 2, 3], **options
    )
    _randomize(drafter, seed)
    return drafter


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
    drafter = _eagle3(target, norm_before_residual=norm_before_residual)
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
    drafter = _eagle3(target)
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
        drafter = _eagle3(target)
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
    drafter = _eagle3(target)
    states = target(ids, mask.flip(1), aux_layer_ids=drafter.aux_layer_ids)
    with pytest.raises(ValueError, match="right-padded"):
        drafter.training_steps(states, 2)


def test_eagle3_gradients_reach_only_drafter_weights(target, batch):
    drafter = _eagle3(target)
    states = target(batch[0], batch[1], aux_layer_ids=drafter.aux_layer_ids)
    steps = drafter.training_steps(states, 3)
    loss = sum(s.pairs(states)[0].logsumexp(-1).mean() for s in steps)
    loss.backward()
    assert drafter.fc.weight.grad is not None and drafter.lm_head.weight.grad is not None
    assert target.embed_weight.grad is None
    assert not any(name.startswith("_embed") for name in drafter.state_dict())


@pytest.mark.parametrize("export_format", ["eagle3", "speculators"])
def test_eagle3_round_trip(tmp_path, target, batch, export_format):
    drafter = _eagle3(target)
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

    reference = _eagle3(target, norm_before_residual=True)
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
    out = _eagle3(target).save_pretrained(tmp_path / "d", target=target_info(target))
    config = json.loads((out / "config.json").read_text())
    del config["eagle_config"], config["eagle_aux_hidden_state_layer_ids"]
    (out / "config.json").write_text(json.dumps(config))
    loaded = load_drafter(out)
    assert loaded.aux_layer_ids is None
    # vLLM's default (2, L // 2, L - 3) repeats a layer on this 4-layer target, which vLLM cannot serve either.
    with pytest.raises(UserError, match=r"distinct, found \[2, 2, 1\]"):
        load_drafter(out, target)


# ---------------------------------------------------------------------------------------------- export checks
def test_export_validates_before_writing(tmp_path, target):
    info = target_info(target)
    existing = tmp_path / "d"
    _eagle3(target).save_pretrained(existing, target=info)
    before = (existing / "model.safetensors").read_bytes()

    bad_head = _eagle3(target)
    bad_head.config.head_dim = 48
    with pytest.raises(UserError, match="head size 48"):
        bad_head.save_pretrained(existing, target=info)

    short = _eagle3(target)
    short.config.max_position_embeddings = 128
    with pytest.raises(UserError, match="max_position_embeddings 128 is below the target's 512"):
        short.save_pretrained(existing, target=info)

    with pytest.raises(UserError, match=r"\[1, 2, 3\] must lie in 0\.\.2"):
        _eagle3(target).save_pretrained(existing, target={**info, "num_hidden_layers": 2})

    nan = _eagle3(target)
    with torch.no_grad():
        nan.fc.weight[0, 0] = float("nan")
    with pytest.raises(UserError, match="fc.weight has NaN"):
        nan.save_pretrained(existing, target=info)

    bad_map = _eagle3(target)
    bad_map.draft_ids[3] = VOCAB + 5
    with pytest.raises(UserError, match="outside the target vocabulary"):
        bad_map.save_pretrained(existing, target=info)

    assert (existing / "model.safetensors").read_bytes() == before  # nothing was touched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # and no temporary directory is left


def test_export_bf16_writes_one_dtype(tmp_path, target):
    out = _eagle3(target).save_pretrained(tmp_path / "d", target=target_info(target), dtype=torch.bfloat16)
    from safetensors.torch import load_file

    dtypes = {t.dtype for t in load_file(str(out / "model.safetensors")).values()}
    assert dtypes == {torch.bfloat16, torch.int64, torch.bool}


# ---------------------------------------------------------------------------------------------- bad input on load
def test_drafter_for_another_target_is_rejected(tmp_path, target, target_dir):
    out = _eagle3(target).save_pretrained(tmp_path / "d", target=target_info(target))
    other_vocab = tmp_path / "other_vocab"
    _tiny_llama(0, vocab=VOCAB + 64).save_pretrained(other_vocab)
    with pytest.raises(UserError, match=f"vocabulary size {VOCAB}.*has {VOCAB + 64}"):
        load_drafter(out, TargetModel(str(other_vocab)))
    other_hidden = tmp_path / "other_hidden"
    _tiny_llama(0, hidden=96).save_pretrained(other_hidden)
    with pytest.raises(UserError, match="hidden states of size 64.*hidden size 96"):
        load_drafter(out, TargetModel(str(other_hidden)))
    retrained = tmp_path / "retrained"
    _tiny_llama(7).save_pretrained(retrained)  # same shapes, other weights: only the fingerprint differs
    with pytest.raises(UserError, match="fingerprint"):
        load_drafter(out, TargetModel(str(retrained)))


def test_corrupt_or_incomplete_checkpoints(tmp_path, target):
    out = _eagle3(target).save_pretrained(tmp_path / "d", target=target_info(target))
    weights = out / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="corrupt safetensors"):
        load_drafter(out)
    weights.write_bytes(data)

    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "hidden_size"}))
    with pytest.raises(UserError, match="lacks required field.*hidden_size"):
        load_drafter(out)
    config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] = [1, 2, 9]
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"0\.\.4.*\[9\]"):
        load_drafter(out, target)
    (out / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_drafter(out)


def test_drafter_files_reader_and_training_record(tmp_path, target):
    out = _eagle3(target).save_pretrained(tmp_path / "d", target=target_info(target))
    files = read_drafter_files(out)
    assert files.config == json.loads((out / "config.json").read_text())
    assert files.record.data == json.loads((out / "lk_training.json").read_text())
    assert files.record.target_path == target.path and files.record.target_fingerprint
    assert load_drafter(out).training_info == files.record

    (out / "lk_training.json").unlink()  # a third-party drafter: an empty record, every accessor None / {}
    empty = read_drafter_files(out).record
    assert (empty.target_path, empty.target_fingerprint, empty.loss, empty.aux_layer_ids, empty.training) == (
        None,
        None,
        None,
        None,
        {},
    )
    (out / "lk_training.json").write_text("[1, 2]")
    with pytest.raises(UserError, match=r"lk_training.json: expected a JSON object, found list$"):
        read_drafter_files(out)
    (out / "lk_training.json").write_text("{oops")
    with pytest.raises(UserError, match=r"lk_training.json: not valid JSON"):
        read_drafter_files(out)
    (out / "config.json").unlink()
    with pytest.raises(
        UserError, match=r"config.json is missing \(expected a drafter checkpoint directory\)"
    ):
        read_drafter_files(out)


@pytest.mark.parametrize(
    "data, loss, ids",
    [
        ({"training": {"loss": "lk_alpha"}, "aux_layer_ids": [1, 2, 3]}, "lk_alpha", [1, 2, 3]),
        (
            {"training": {"loss_kind": "kl", "config": {"model": {"options": {"aux_layer_ids": ["0", 2]}}}}},
            "kl",
            [0, 2],
        ),
        ({"training": "not a section", "target": ["not", "a", "section"]}, None, None),
    ],
)
def test_training_record_accessors(data, loss, ids):
    record = TrainingRecord(data)
    assert (record.loss, record.aux_layer_ids) == (loss, ids)
    assert record.target_path is None and isinstance(record.training, dict)


def test_unknown_format_names_the_supported_ones(tmp_path):
    for config in (
        {"architectures": ["DFlashDraftModel"], "model_type": "qwen3"},
        {"speculators_model_type": "dflash", "speculators_config": {}},
    ):
        with pytest.raises(UserError, match="supported formats: EAGLE-3.*Medusa.*MLP speculator.*draft LM"):
            detect_architecture(config)
    directory = tmp_path / "x"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    with pytest.raises(UserError, match="unknown drafter format"):
        load_drafter(directory)
    with pytest.raises(UserError, match="not a directory"):
        load_drafter(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------- Medusa
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
    _randomize(drafter)
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


# ---------------------------------------------------------------------------------------------- MLP speculator
@pytest.mark.parametrize("tie_weights", [False, True])
def test_mlp_speculator_stage_math_and_round_trip(tmp_path, target, batch, tie_weights):
    drafter = create_drafter("mlp_speculator", target, n_predict=3, tie_weights=tie_weights)
    _randomize(drafter)
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


# ---------------------------------------------------------------------------------------------- draft LM
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
