"""The drafter package's contract (lk_vllm.drafters) on a tiny random Llama target (fast): loading
checkpoints for the wrong target, corrupt or incomplete ones and unknown formats, and the check serve runs on
a drafter directory."""

from __future__ import annotations

import json

import pytest
from drafter_helpers import VOCAB, drafter_dir, make_eagle3, tiny_llama
from train_helpers import FAKE_TARGET_CONFIG

from lk_vllm.drafters import (
    detect_architecture,
    load_drafter,
    target_info,
)
from lk_vllm.errors import UserError
from lk_vllm.target_model import TargetModel

pytestmark = pytest.mark.unit


# ---------------------------------------------------------------------------------------------- bad input on load
def test_drafter_for_another_target_is_rejected(tmp_path, target, target_dir):
    out = make_eagle3(target).save_pretrained(tmp_path / "d", target=target_info(target))
    other_vocab = tmp_path / "other_vocab"
    tiny_llama(0, vocab=VOCAB + 64).save_pretrained(other_vocab)
    with pytest.raises(UserError, match=f"vocabulary size {VOCAB}.*has {VOCAB + 64}"):
        load_drafter(out, TargetModel(str(other_vocab)))
    other_hidden = tmp_path / "other_hidden"
    tiny_llama(0, hidden=96).save_pretrained(other_hidden)
    with pytest.raises(UserError, match="hidden states of size 64.*hidden size 96"):
        load_drafter(out, TargetModel(str(other_hidden)))
    retrained = tmp_path / "retrained"
    tiny_llama(7).save_pretrained(retrained)  # same shapes, other weights: only the fingerprint differs
    with pytest.raises(UserError, match="fingerprint"):
        load_drafter(out, TargetModel(str(retrained)))


def test_corrupt_or_incomplete_checkpoints(tmp_path, target):
    out = make_eagle3(target).save_pretrained(tmp_path / "d", target=target_info(target))
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


def test_drafter_for_another_target_is_refused(tmp_path):
    from lk_vllm.drafters import check_drafter_for_target

    target = tmp_path / "target"
    target.mkdir()
    (target / "config.json").write_text(json.dumps(FAKE_TARGET_CONFIG))
    other_vocab = drafter_dir(tmp_path, "other_vocab", extra={"vocab_size": 64})
    with pytest.raises(UserError, match="vocabulary of 64 tokens, but the target .* has 32"):
        check_drafter_for_target(other_vocab, str(target))
    fingerprinted = drafter_dir(tmp_path, "fp")
    (fingerprinted / "lk_training.json").write_text(
        json.dumps({"target": {"fingerprint": "feedfeedfeedfeed", "path": "/elsewhere"}})
    )
    with pytest.raises(UserError, match="trained for target fingerprint feedfeedfeedfeed"):
        check_drafter_for_target(fingerprinted, str(target))
