"""Medusa drafter: K residual MLP heads on the target's last hidden state (Cai et al. 2024).

vLLM 0.32 (vllm/model_executor/models/medusa.py, vllm/v1/spec_decode/medusa.py) feeds every head the target's
hidden state AFTER the final norm at the last accepted position ``t`` (the position whose logits produced the
bonus token ``t + 1``); head k proposes token ``t + 2 + k``. A head is ``num_hidden_layers`` blocks
``x = x + SiLU(W x + b)`` followed by an LM head.

Format (``model_type: medusa``, ``architectures: ["MedusaModel"]``): weights ``blocks.{h}.layers.{l}.weight``
(and ``.bias`` with ``medusa_fc_bias``), LM head(s) ``lm_heads.{h}.weight``. lk-vllm writes one shared LM head
(``original_lm_head: true``, stored as ``lm_heads.0.weight``), initialised from the target's and frozen by
default as in Medusa-1; with a truncated vocabulary (``truncated_vocab_size`` < ``vocab_size``) the head has
one row per draft token and ``token_map`` [Vd] (int64) lists their target ids: vLLM scatters the draft logits
into the full vocabulary with it. Separate per-head LM heads (``original_lm_head: false``) load too, full
vocabulary only (vLLM 0.32 builds them at full size).

vLLM sets the number of heads it builds to ``num_speculative_tokens``, so K must not exceed ``num_heads``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lk_vllm.drafters.base import (
    Drafter,
    StepOutput,
    read_drafter_files,
    read_weights,
    require,
    shift_mask,
    take,
    validate_draft_to_target,
)
from lk_vllm.errors import UserError


class ResidualBlock(nn.Module):
    def __init__(self, hidden_size: int, num_layers: int, bias: bool):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(hidden_size, hidden_size, bias=bias) for _ in range(num_layers))
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + self.act(layer(x))
        return x


class MedusaDrafter(Drafter):
    architecture = "medusa"
    vllm_method = "medusa"

    def __init__(
        self,
        *,
        hidden_size: int,
        vocab_size: int,
        num_heads: int,
        num_layers: int = 1,
        fc_bias: bool = False,
        shared_lm_head: bool = True,
        draft_to_target: torch.Tensor | None = None,
        logit_scale: float = 1.0,
    ):
        super().__init__()
        self.hidden_size = int(hidden_size)
        self.vocab_size = int(vocab_size)
        self.num_heads = int(num_heads)
        self.num_layers = int(num_layers)
        self.fc_bias = bool(fc_bias)
        self.shared_lm_head = bool(shared_lm_head)
        self.logit_scale = float(logit_scale)
        draft_vocab = self.vocab_size if draft_to_target is None else int(draft_to_target.numel())
        if draft_vocab != self.vocab_size and not self.shared_lm_head:
            raise UserError(
                "Medusa: a truncated draft vocabulary needs the shared LM head (original_lm_head)"
            )
        if draft_to_target is not None:
            validate_draft_to_target(draft_to_target.long(), draft_vocab, self.vocab_size, "Medusa drafter")
            self.register_buffer("token_map", draft_to_target.long().clone())
        else:
            self.token_map = None
        self._draft_vocab_size = draft_vocab
        self.blocks = nn.ModuleList(
            ResidualBlock(self.hidden_size, self.num_layers, self.fc_bias) for _ in range(self.num_heads)
        )
        head_count = 1 if self.shared_lm_head else self.num_heads
        self.lm_heads = nn.ModuleList(
            nn.Linear(self.hidden_size, draft_vocab, bias=False) for _ in range(head_count)
        )
        for block in self.blocks:  # Medusa's init: each block starts as the identity
            for layer in block.layers:
                nn.init.zeros_(layer.weight)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)

    @classmethod
    def from_target(
        cls,
        target,
        *,
        num_heads: int = 3,
        num_layers: int = 1,
        draft_to_target: torch.Tensor | None = None,
        shared_lm_head: bool = True,
        train_lm_head: bool = False,
        fc_bias: bool = False,
    ) -> MedusaDrafter:
        """Heads on ``target`` (a TargetModel); LM head(s) copied from the target's (frozen unless ``train_lm_head``)."""
        drafter = cls(
            hidden_size=target.hidden_size,
            vocab_size=target.vocab_size,
            num_heads=num_heads,
            num_layers=num_layers,
            fc_bias=fc_bias,
            shared_lm_head=shared_lm_head,
            draft_to_target=draft_to_target,
        )
        with torch.no_grad():
            rows = (
                target.lm_head_weight if draft_to_target is None else target.lm_head_weight[draft_to_target]
            )
            for head in drafter.lm_heads:
                head.weight.copy_(rows)
                head.weight.requires_grad_(train_lm_head)
        return drafter

    # ---------------------------------------------------------------------------- properties
    @property
    def draft_to_target(self) -> torch.Tensor | None:
        return self.token_map

    def target_hidden_size(self) -> int:
        return self.hidden_size

    def _head(self, index: int):
        lm_head = self.lm_heads[0 if self.shared_lm_head else index]
        if self.logit_scale == 1.0:
            return lm_head
        return lambda hidden: lm_head(hidden) * self.logit_scale

    # ---------------------------------------------------------------------------- math
    def training_steps(self, states, num_steps: int) -> list[StepOutput]:
        if num_steps > self.num_heads:
            raise ValueError(f"Medusa has {self.num_heads} heads, cannot unroll {num_steps} steps")
        hidden = states.final_hidden.to(self.lm_heads[0].weight.dtype)
        return [
            StepOutput(
                hidden=self.blocks[k](hidden),
                head=self._head(k),
                target_shift=k + 1,
                mask=shift_mask(states.attention_mask, k + 1),
            )
            for k in range(num_steps)
        ]

    @torch.no_grad()
    def propose_all(self, states, num_tokens: int) -> torch.Tensor:
        drafts = [step.logits().argmax(-1) for step in self.training_steps(states, num_tokens)]
        drafts = torch.stack(drafts, dim=-1)
        return drafts if self.token_map is None else self.token_map[drafts]

    # ---------------------------------------------------------------------------- checkpoint
    def config_dict(self, export_format: str | None = None, target: dict | None = None) -> dict[str, Any]:
        return {
            "architectures": ["MedusaModel"],
            "model_type": "medusa",
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "num_heads": self.num_heads,
            "num_hidden_layers": self.num_layers,
            "truncated_vocab_size": self._draft_vocab_size,
            "original_lm_head": self.shared_lm_head,
            "medusa_fc_bias": self.fc_bias,
            "logit_scale": self.logit_scale,
        }

    def export_state_dict(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        state = self.state_dict() if state is None else state
        state = {k: v for k, v in state.items() if k != "token_map"}
        if self.token_map is not None:
            state["token_map"] = self.token_map
        return state

    @classmethod
    def from_pretrained(cls, directory: str | Path, target=None) -> MedusaDrafter:
        directory = Path(directory)
        where = str(directory)
        files = read_drafter_files(directory)
        config = files.config
        # vLLM's MedusaConfig accepts any key naming the head/layer counts (e.g. medusa_num_heads).
        for key in list(config):
            if "num" in key and "heads" in key and key != "num_heads":
                config.setdefault("num_heads", config[key])
            elif "num" in key and "layers" in key and key != "num_hidden_layers":
                config.setdefault("num_hidden_layers", config[key])
        require(config, ["hidden_size", "vocab_size", "num_heads"], where)
        vocab = int(config["vocab_size"])
        draft_vocab = int(config.get("truncated_vocab_size") or vocab)
        state = read_weights(directory)
        state = {_canonical_name(k): v for k, v in state.items()}
        token_map = None
        if draft_vocab != vocab:
            token_map = take(state, "token_map", (draft_vocab,), where).long()
            validate_draft_to_target(token_map, draft_vocab, vocab, f"drafter {where} token_map")
        shared = bool(config.get("original_lm_head", False))
        drafter = cls(
            hidden_size=int(config["hidden_size"]),
            vocab_size=vocab,
            num_heads=int(config["num_heads"]),
            num_layers=int(config.get("num_hidden_layers") or 1),
            fc_bias=bool(config.get("medusa_fc_bias", False)),
            shared_lm_head=shared,
            draft_to_target=token_map,
            logit_scale=float(config.get("logit_scale", 1.0)),
        )
        if shared and "lm_head.weight" in state:
            state["lm_heads.0.weight"] = state.pop("lm_head.weight")
        expected = {k: tuple(v.shape) for k, v in drafter.state_dict().items() if k != "token_map"}
        weights = {name: take(state, name, shape, where).float() for name, shape in expected.items()}
        drafter.load_state_dict({**drafter.state_dict(), **weights})
        drafter.training_info = files.record
        return drafter


def check_medusa_tokens(num_speculative_tokens: int, num_heads: int, where: str) -> None:
    if num_speculative_tokens > num_heads:
        raise UserError(
            f"drafter {where}: Medusa has {num_heads} heads, so --num-speculative-tokens must be at most "
            f"{num_heads} (got {num_speculative_tokens})"
        )


def _canonical_name(name: str) -> str:
    """vLLM's renames: a ``medusa_heads.`` prefix is dropped; FasterDecoding's ``{h}.{l}.linear.*`` and
    ``{h}.{n}.weight`` become ``blocks.{h}.layers.{l}.*`` and ``lm_heads.{h}.weight``."""
    name = name.replace("medusa_heads.", "")
    parts = name.split(".")
    if len(parts) >= 3 and parts[0].isdigit() and parts[1].isdigit():
        head, layer, rest = parts[0], parts[1], parts[2:]
        if "linear" in rest:
            return f"blocks.{head}.layers.{layer}." + ".".join(rest[rest.index("linear") + 1 :])
        return f"lm_heads.{head}." + ".".join(rest)
    return name
