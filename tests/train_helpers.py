"""Tiny targets and prepared data sets for the trainer tests (no vLLM, no download). The ``tiny`` fixture (a tiny
target and a data set prepared for it) is in tests/conftest.py."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from training.prepare import SHARD_FORMAT, save_shard

# Engine settings for a parity test: the torch simulation runs the fp32 target, so vLLM serves it in fp32 too
# (on a CPU with native bf16 math an engine defaults to bfloat16, whose rounding would be compared instead).
FP32_ENGINE = {"dtype": "float32"}

# The smallest target config.json transformers and vLLM's model registry accept (no weights): for flag tests.
FAKE_TARGET_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32}


def make_tiny_target(directory: Path, vocab: int = 256, layers: int = 8, seed: int = 0) -> str:
    """A random LlamaForCausalLM (hidden 64, 2 heads of 32) saved as an HF directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    return str(directory)


def make_valid_drafter(
    root: Path, name: str, target, seed: int = 0, architecture: str = "eagle3", **options
) -> Path:
    """A drafter for ``target`` (a TargetModel) that passes lk-vllm validate's static checks: fresh drafters are
    refused as untrained, so every trainable weight gets a little noise."""
    from lk_vllm.drafters import create_drafter, target_info

    torch.manual_seed(seed)
    if architecture == "eagle3":
        options.setdefault("draft_to_target", torch.arange(0, 256, 2))
    drafter = create_drafter(architecture, target, **options)
    with torch.no_grad():
        for parameter in drafter.trainable_parameters():
            parameter.add_(torch.randn_like(parameter) * 0.01)
    return drafter.save_pretrained(root / name, target=target_info(target))


def greedy_batch(target, prompts, length: int) -> dict:
    """The target's own greedy continuations of ``prompts`` (``length`` tokens each) as a right-padded batch with
    a loss mask on the continuations: what a drafter learns exactly, so acceptance lies far above 1."""
    continuations, sequences, starts = {}, [], []
    for prompt in prompts:
        prompt_ids = target.chat_prompt_ids(prompt.messages)
        continuation = target.generate_greedy(prompt_ids, length)
        continuations[(tuple(prompt_ids), length)] = continuation  # evaluate_torch reuses them
        sequences.append(prompt_ids + continuation)
        starts.append(len(prompt_ids))
    width = max(map(len, sequences))
    input_ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.bool)
    loss_mask = torch.zeros_like(mask)
    for row, (sequence, start) in enumerate(zip(sequences, starts, strict=True)):
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        mask[row, : len(sequence)] = True
        loss_mask[row, start : len(sequence)] = True
    return {
        "continuations": continuations,
        "sequences": sequences,
        "input_ids": input_ids,
        "mask": mask,
        "loss_mask": loss_mask,
    }


def make_tiny_data(
    directory: Path,
    target: str,
    num_samples: int = 24,
    vocab: int = 256,
    seed: int = 0,
    lengths: tuple[int, int] = (16, 40),
    masked: bool = False,
    prompt_length: int | None = None,
    settings: dict | None = None,
) -> str:
    """A prepared data set of random token sequences (prompt + 'generated' part) in prepare's format;
    ``settings`` adds to the manifest's prepare settings (e.g. split, temperature, datasets)."""
    from lk_vllm.assets import target_fingerprint

    generator = torch.Generator().manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    samples, ids = [], []
    for i in range(num_samples):
        length = int(torch.randint(lengths[0], lengths[1] + 1, (1,), generator=generator))
        prompt = prompt_length or int(torch.randint(3, 8, (1,), generator=generator))
        tokens = torch.randint(0, vocab, (length,), generator=generator).tolist()
        samples.append((tokens[:prompt], [] if masked else tokens[prompt:]))
        ids.append(f"p{i}")
    if masked:  # all-masked: put every token in the prompt part
        samples = [(p + t, []) for p, t in samples]
    response_tokens = save_shard(directory / "shard-00000.safetensors", samples, ids)
    manifest = {
        "format": SHARD_FORMAT,
        "settings": {"target": target, "target_fingerprint": target_fingerprint(target), **(settings or {})},
        "shards": [{"file": "shard-00000.safetensors", "prompts": num_samples, "samples": num_samples}],
        "samples": num_samples,
        "response_tokens": response_tokens,
    }
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return str(directory)


def serve_args(target, *argv):
    """``lk-vllm serve --target TARGET ARGV...`` parsed as the command parses it (nothing is started)."""
    import argparse

    from serving import launcher

    parser = argparse.ArgumentParser()
    launcher.add_arguments(parser)
    return parser.parse_args(["--target", str(target), *argv])


def train_config(tiny, output, **overrides):
    """The trainer's config for a short run on the ``tiny`` fixture's target and data, written to ``output``."""
    from training.config import load_config

    target, data = tiny
    values = {
        "model.target": target,
        "data.dirs": [data],
        "data.heldout": 4,
        "data.max_length": 64,
        "training.batch_size": 4,
        "training.max_steps": 6,
        "training.eval_every": 3,
        "training.checkpoint_every": 2,
        "training.eval_batch_size": 4,
        "loss.num_steps": 2,
        "optimizer.warmup_steps": 2,
        "optimizer.lr": 3e-3,
        "output": str(output),
    }
    values.update(overrides)
    return load_config(overrides=values)[0]


def train_args(*argv):
    """``lk-vllm train ARGV...`` parsed as the command parses it."""
    import argparse

    from training.train import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def write_run(
    root: Path, loss: str, seed: int, evals: list[tuple[float, float]], architecture: str = "medusa"
) -> Path:
    """A finished run directory as examples/kl_vs_lk_seeds.sh leaves it (config.json, log.jsonl, final/): two
    steps of 100 tokens before each held-out evaluation, ``evals`` being (T=1, T=0) acceptance lengths."""
    run = root / f"{architecture}-{loss}-s{seed}"
    (run / "final").mkdir(parents=True)
    config = {
        "model": {"architecture": architecture},
        "loss": {"kind": loss},
        "training": {"seed": seed, "max_steps": 2 * len(evals)},
    }
    (run / "config.json").write_text(json.dumps(config))
    lines = []
    for i, (t1, t0) in enumerate(evals):
        lines.append({"step": 2 * i + 1, "tokens": 100})
        lines.append({"step": 2 * i + 2, "tokens": 100})
        lines.append(
            {
                "step": 2 * i + 2,
                "eval": {"expected_acceptance_length": t1, "expected_acceptance_length_greedy": t0},
            }
        )
    (run / "log.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return run
