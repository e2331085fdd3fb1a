"""Tiny random targets and drafters for the drafter tests (no vLLM, no download). The fixtures built from them
(``target_dir``, ``target``, ``batch``, ``gemma3``) are in tests/conftest.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from lk_vllm.drafters import create_drafter

# The tiny Llama of the ``target`` fixture.
LAYERS = 4
HIDDEN = 64
VOCAB = 256


def tiny_llama(seed: int, hidden: int = HIDDEN, vocab: int = VOCAB):
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


def randomize(module, seed=2, std=0.2):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if parameter.requires_grad:
                parameter.normal_(std=std) if "norm" not in name else parameter.uniform_(0.5, 1.5)


def make_eagle3(target, seed=3, **options):
    draft_to_target = torch.arange(0, VOCAB, 2)  # a truncated draft vocabulary (every other token)
    drafter = create_drafter(
        "eagle3", target, draft_to_target=draft_to_target, aux_layer_ids=[1, 2, 3], **options
    )
    randomize(drafter, seed)
    return drafter


def drafter_dir(root: Path, name: str, hidden: int = 8, seed: int = 0, extra: dict | None = None) -> Path:
    path = root / name
    path.mkdir(parents=True)
    config = {
        "architectures": ["LlamaForCausalLMEagle3"],
        "hidden_size": hidden,
        "vocab_size": 32,
        **(extra or {}),
    }
    (path / "config.json").write_text(json.dumps(config))
    generator = torch.Generator().manual_seed(seed)
    save_file(
        {"fc.weight": torch.randn(hidden, 3 * hidden, generator=generator)}, str(path / "model.safetensors")
    )
    return path


MLP_CONFIG = {
    "architectures": ["MLPSpeculatorPreTrainedModel"],
    "model_type": "mlp_speculator",
    "vocab_size": 32,
    "emb_dim": 8,
    "inner_dim": 8,
    "n_predict": 3,
    "top_k_tokens_per_head": [1, 1, 1],
}


def mlp_speculator_dirs(tmp_path: Path, **drafter_changes) -> tuple[Path, Path]:
    """A target directory (config only: hidden size 8, vocabulary 32) and an MLP-speculator directory (config and
    random weights, so that it passes `lk-vllm validate`'s static checks, which serve runs)."""
    from lk_vllm.drafters.mlp_speculator import MLPSpeculatorDrafter

    target = tmp_path / "target"
    target.mkdir()
    (target / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "hidden_size": 8,
                "num_attention_heads": 1,
                "num_hidden_layers": 1,
                "vocab_size": 32,
            }
        )
    )
    drafter = tmp_path / "mlp"
    drafter.mkdir()
    config = {**MLP_CONFIG, **drafter_changes}
    (drafter / "config.json").write_text(json.dumps(config))
    weights = MLPSpeculatorDrafter(
        vocab_size=config["vocab_size"],
        emb_dim=config["emb_dim"],
        inner_dim=config["inner_dim"],
        n_predict=config["n_predict"],
    ).export_state_dict()
    save_file(weights, str(drafter / "model.safetensors"))
    return target, drafter


def make_target(kind: str, directory: Path, default_target: str) -> str:
    """A tiny random Qwen2 (``kind`` "qwen2") or Gemma-3 target with the default target's tokenizer files."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
    }
    if kind == "qwen2":
        # Wide initial weights: at the usual 0.02 a random Qwen2 repeats one token, which any drafter predicts.
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=49152, initializer_range=0.3, **common))
    else:
        model = Gemma3ForCausalLM(
            Gemma3TextConfig(
                vocab_size=262144,
                sliding_window=16,
                final_logit_softcapping=None,
                layer_types=["sliding_attention"] * 3 + ["full_attention"],
                **common,
            )
        )
    model.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (Path(default_target) / name).is_file():
            shutil.copy(Path(default_target) / name, directory / name)
    return str(directory)
