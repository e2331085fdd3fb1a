"""``lk-vllm train --dry-run``: the per-device memory a recipe needs, estimated before anything is loaded.

The drafter is built on PyTorch's meta device from the target's config.json alone (no weights read), so its
parameter count is exact. The rest is arithmetic over one micro-batch of ``batch_size / ranks /
grad_accumulation`` sequences of ``data.max_length`` tokens (an upper bound: shorter samples need less):

* drafter weights, gradients and AdamW moments: 16 bytes per trainable parameter (fp32 master weights); under
  ``training.parallel: fsdp`` 16/N of them stay sharded and a step holds whole weights and gradients (8 bytes);
* the frozen target: its parameters in the training dtype (bf16 on GPU, fp32 on CPU); with
  ``training.shard_target`` 1/N of its decoder layers plus one whole layer (the one a forward has gathered);
* the batch's target states (final hidden state and the auxiliary layers) and its target-logit table
  (one row per position, shared by the K draft positions; offline, only the draft vocabulary's columns);
* per draft position, the draft logits the loss keeps for backward (plus one gradient at a time);
* activations kept for backward: per token and unrolled step, about ``16 H + 6 heads * head_dim + 4 I``
  values for an EAGLE-3 layer (the inputs of its norms, projections and MLP), K steps (one per head for Medusa,
  per stage for the MLP speculator, the drafter's layers for a draft model);
* transient attention scores of one block of query rows (``lk_vllm.drafters.eagle3.ATTENTION_BLOCK``).

``benchmarks/results/ttt-memory.md`` compares the estimate with measured peaks on CPU.
"""

from __future__ import annotations

import dataclasses

import torch

from lk_vllm.drafters import create_drafter
from lk_vllm.errors import UserError
from training.train import drafter_options

GB = 1e9


@dataclasses.dataclass
class MemoryEstimate:
    parts: dict[str, int]  # bytes per device, by component
    trainable_parameters: int
    tokens_per_micro_batch: int

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def lines(self) -> list[str]:
        width = max(len(name) for name in self.parts)
        out = [f"  {name:<{width}}  {size / GB:8.2f} GB" for name, size in self.parts.items()]
        out.append(f"  {'total':<{width}}  {self.total / GB:8.2f} GB")
        return out


def _meta_drafter(config, target_path: str):
    """The run's drafter and its target, built on the meta device (shapes only; nothing is read but config.json)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lk_vllm.target_model import TargetModel

    try:
        target_config = AutoConfig.from_pretrained(target_path)
    except (OSError, ValueError) as exc:
        raise UserError(f"target {target_path}: cannot read its config.json ({exc})") from None
    draft_vocab = config.model.draft_vocab_size
    if draft_vocab == "auto":  # the largest size auto may choose: an upper bound
        from lk_vllm.vocab import AUTO_FULL_UP_TO, AUTO_SIZES

        vocab = int(target_config.get_text_config().vocab_size)
        draft_vocab = min(vocab, AUTO_SIZES[-1]) if vocab > AUTO_FULL_UP_TO else None
    with torch.device("meta"):
        target = TargetModel(target_path, model=AutoModelForCausalLM.from_config(target_config))
    options = drafter_options(config, target)
    if draft_vocab is not None and draft_vocab < target.vocab_size:
        options["draft_to_target"] = torch.arange(
            draft_vocab
        )  # on the host (it is checked); which ids: immaterial
    with torch.device("meta"):
        drafter = create_drafter(config.model.architecture, target, **options)
    return drafter, target


def estimate_memory(config, target_path: str, device_type: str, world: int = 1) -> MemoryEstimate:
    """Bytes per device for ``config`` on ``device_type`` ("cuda" or "cpu") with ``world`` ranks."""
    drafter, target = _meta_drafter(config, target_path)
    tc = target.config
    gpu = device_type == "cuda"
    precision = config.training.precision
    low = precision == "bf16" or (precision == "auto" and gpu)
    act = 2 if low else 4  # bytes of an activation / logit under bf16 autocast, else fp32
    t = config.training
    sequences = max(1, t.batch_size // max(1, world) // t.grad_accumulation)
    tokens = sequences * config.data.max_length
    hidden, vocab = int(tc.hidden_size), int(tc.vocab_size)
    heads = int(tc.num_attention_heads)
    head_dim = int(getattr(tc, "head_dim", None) or hidden // heads)
    intermediate = int(getattr(tc, "intermediate_size", 4 * hidden))
    steps = config.loss.num_steps
    trainable = sum(p.numel() for p in drafter.trainable_parameters())
    target_params = sum(p.numel() for p in target.model.parameters())
    draft_vocab = drafter.draft_vocab_size
    aux = len(drafter.aux_layer_ids_needed() or ())
    architecture = config.model.architecture
    if architecture == "draft_model":
        layers = int(drafter.config.num_hidden_layers)
        per_token = 1 * layers * (12 * hidden + 6 * heads * head_dim + 4 * intermediate)
    elif architecture == "eagle3":
        per_token = steps * (16 * hidden + 6 * heads * head_dim + 4 * intermediate)
    else:  # Medusa heads / MLP speculator stages: a few hidden-sized tensors per head
        per_token = steps * 8 * hidden
    if (
        t.parallel == "fsdp"
    ):  # 1/N of the fp32 weights, grads and moments, plus whole weights and grads in a step
        drafter_part = {
            f"drafter: whole weights + grads in a step, 1/{world} of weights + grads + AdamW": int(
                (8 + 16 / max(1, world)) * trainable
            )
        }
    else:
        drafter_part = {"drafter weights + grads + AdamW (fp32)": 16 * trainable}
    target_bytes = 2 if low else 4
    if t.shard_target:  # 1/N of the decoder layers, one layer gathered in a forward, the rest whole
        layer_params = sum(p.numel() for p in target.model.get_decoder().layers.parameters())
        target_part = {
            f"target weights ({'bf16' if low else 'fp32'}; layers 1/{world} + one whole)": int(
                (
                    target_params
                    - layer_params
                    + layer_params / max(1, world)
                    + layer_params / int(tc.num_hidden_layers)
                )
                * target_bytes
            )
        }
    else:
        target_part = {f"target weights ({'bf16' if low else 'fp32'})": target_params * target_bytes}
    parts = {
        **drafter_part,
        **target_part,
        "target states of a micro-batch": tokens * hidden * (1 + aux) * act,
        # Offline, a drafter with its own vocabulary needs the draft ids' columns only (the cache holds the
        # normaliser); online the full rows are computed for it.
        "target logits table": tokens * (draft_vocab if t.capture == "offline" else vocab) * act,
        "draft logits kept for backward": tokens * draft_vocab * (steps * act + 4),
        "activations kept for backward": tokens * per_token * act,
    }
    if architecture == "eagle3":
        from lk_vllm.drafters.eagle3 import ATTENTION_BLOCK

        parts["attention scores of one block"] = (
            sequences * heads * min(ATTENTION_BLOCK, config.data.max_length) * config.data.max_length * 4 * 3
        )
    return MemoryEstimate(parts=parts, trainable_parameters=trainable, tokens_per_micro_batch=tokens)


def check_fits(estimate: MemoryEstimate, config, device: torch.device) -> None:
    """Refuse a run whose estimate exceeds the GPU's memory (one line naming the fields to change)."""
    if device.type != "cuda":
        return
    capacity = torch.cuda.get_device_properties(device).total_memory
    if estimate.total > capacity:
        t = config.training
        raise UserError(
            f"training.batch_size={t.batch_size} x data.max_length={config.data.max_length} needs about "
            f"{estimate.total / GB:.1f} GB per GPU (lk-vllm train --dry-run lists it), {device} has "
            f"{capacity / GB:.1f} GB: raise training.grad_accumulation, lower training.batch_size or "
            "data.max_length, or use more GPUs"
        )
