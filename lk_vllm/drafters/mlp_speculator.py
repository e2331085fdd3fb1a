"""Multi-stage MLP speculator (Wertheimer et al. 2024, "Accelerating Production LLMs with Combined
Token/Embedding Speculators"), in the format of vLLM's ``mlp_speculator`` model.

Stage i reads a state and a token: ``state = GELU(LN_i(proj_i(state) + emb_i(token) * emb_weight /
state_weight))`` and predicts with ``head_i(state)``. Stage 0's state is the target's last hidden state
(after the final norm, optionally L2-normalised and divided by sqrt 2 with ``scale_input``) at the last
accepted position ``t``, and its token is ``t + 1`` (the target's sampled token); stage i's token is the one
stage i-1 proposed (the data's token when training). ``state_weight = 0.5 ** (0.5 / n_predict)``,
``emb_weight = sqrt((1 - state_weight**2) * inner_dim / 2)`` and LN is vLLM's L2 norm with scale and shift,
exactly as vllm/model_executor/models/mlp_speculator.py defines them. Stage i predicts token ``t + 2 + i``.

Format: ``model_type: mlp_speculator``; weights ``emb.{i}.weight`` [V, inner], ``proj.{i}.weight``
([inner, emb_dim] for i = 0, else [inner, inner]), ``head.{i}.weight`` [V, inner], ``ln.{i}.weight|bias``.
With ``tie_weights`` the embeddings, the projections after the first and the norms are shared (written once
per stage, as vLLM loads them). vLLM 0.32's V1 engine serves it through lk-vllm's plugin
(``lk_vllm.plugin.engine.mlp_proposer``), with ``"method": "mlp_speculator"``.
"""

from __future__ import annotations

import math
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
    shift_left,
    shift_mask,
    take,
)


class L2LayerNorm(nn.Module):
    """vLLM's MLPSpeculatorLayerNorm: x / rms(x), then an optional elementwise scale and shift."""

    def __init__(self, size: int, eps: float = 1e-6, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.affine = affine
        if affine:
            self.weight = nn.Parameter(torch.ones(size))
            self.bias = nn.Parameter(torch.zeros(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x * self.weight + self.bias if self.affine else x


class MLPSpeculatorDrafter(Drafter):
    architecture = "mlp_speculator"
    vllm_method = "mlp_speculator"

    def __init__(
        self,
        *,
        vocab_size: int,
        emb_dim: int,
        inner_dim: int = 0,
        n_predict: int = 3,
        tie_weights: bool = False,
        scale_input: bool = False,
        top_k_tokens_per_head=None,
        n_candidates: int = 5,
    ):
        super().__init__()
        self.vocab_size = int(vocab_size)
        self.emb_dim = int(emb_dim)
        self.inner_dim = int(inner_dim) or self.emb_dim
        self.n_predict = int(n_predict)
        self.tie_weights = bool(tie_weights)
        self.scale_input = bool(scale_input)
        self.top_k_tokens_per_head = list(top_k_tokens_per_head or [1] * self.n_predict)
        self.n_candidates = int(n_candidates)
        if self.tie_weights:
            embedding = nn.Embedding(self.vocab_size, self.inner_dim)
            proj_tied = nn.Linear(self.inner_dim, self.inner_dim, bias=False)
            norm = L2LayerNorm(self.inner_dim)
            self.emb = nn.ModuleList([embedding] * self.n_predict)
            self.proj = nn.ModuleList(
                [nn.Linear(self.emb_dim, self.inner_dim, bias=False)] + [proj_tied] * (self.n_predict - 1)
            )
            self.ln = nn.ModuleList([norm] * self.n_predict)
        else:
            self.emb = nn.ModuleList(
                nn.Embedding(self.vocab_size, self.inner_dim) for _ in range(self.n_predict)
            )
            self.proj = nn.ModuleList(
                nn.Linear(self.emb_dim if i == 0 else self.inner_dim, self.inner_dim, bias=False)
                for i in range(self.n_predict)
            )
            self.ln = nn.ModuleList(L2LayerNorm(self.inner_dim) for _ in range(self.n_predict))
        self.head = nn.ModuleList(
            nn.Linear(self.inner_dim, self.vocab_size, bias=False) for _ in range(self.n_predict)
        )
        if self.scale_input:
            self.ln0 = L2LayerNorm(self.emb_dim, affine=False)
        self.state_weight = 0.5 ** (0.5 / self.n_predict)
        self.emb_weight = math.sqrt((1 - self.state_weight**2) * (self.inner_dim / 2))
        self.activation = nn.GELU()
        std = 1.0 / math.sqrt(self.inner_dim)
        for module in self.modules():  # fms-extras' init scale
            if isinstance(module, nn.Embedding | nn.Linear):
                nn.init.normal_(module.weight, std=std)

    @classmethod
    def from_target(
        cls,
        target,
        *,
        n_predict: int = 3,
        inner_dim: int = 0,
        tie_weights: bool = False,
        scale_input: bool = True,
        init_heads_from_target: bool = True,
    ) -> MLPSpeculatorDrafter:
        drafter = cls(
            vocab_size=target.vocab_size,
            emb_dim=target.hidden_size,
            inner_dim=inner_dim,
            n_predict=n_predict,
            tie_weights=tie_weights,
            scale_input=scale_input,
        )
        if init_heads_from_target and drafter.inner_dim == target.hidden_size:
            with torch.no_grad():
                for head in drafter.head:
                    head.weight.copy_(target.lm_head_weight)
                for emb in drafter.emb:
                    emb.weight.copy_(target.embed_weight)
        return drafter

    def target_hidden_size(self) -> int:
        return self.emb_dim

    # ---------------------------------------------------------------------------- math
    def _stages(self, states, num_steps: int, teacher: bool):
        if num_steps > self.n_predict:
            raise ValueError(f"the MLP speculator has {self.n_predict} stages, cannot unroll {num_steps}")
        state = states.final_hidden.to(self.head[0].weight.dtype)
        if self.scale_input:
            state = self.ln0(state) / math.sqrt(2)
        tokens = shift_left(states.input_ids, 1)
        for i in range(num_steps):
            z = self.emb[i](tokens)
            state = self.proj[i](state) + z * (self.emb_weight / self.state_weight)
            state = self.activation(self.ln[i](state))
            yield i, state
            if i + 1 < num_steps:
                tokens = shift_left(states.input_ids, i + 2) if teacher else self.head[i](state).argmax(-1)

    def training_steps(self, states, num_steps: int) -> list[StepOutput]:
        return [
            StepOutput(
                hidden=state,
                head=self.head[i],
                target_shift=i + 1,
                mask=shift_mask(states.attention_mask, i + 1),
            )
            for i, state in self._stages(states, num_steps, teacher=True)
        ]

    @torch.no_grad()
    def propose_all(self, states, num_tokens: int) -> torch.Tensor:
        return torch.stack(
            [self.head[i](state).argmax(-1) for i, state in self._stages(states, num_tokens, teacher=False)],
            dim=-1,
        )

    # ---------------------------------------------------------------------------- checkpoint
    def config_dict(self, export_format: str | None = None, target: dict | None = None) -> dict[str, Any]:
        return {
            "architectures": ["MLPSpeculatorPreTrainedModel"],
            "model_type": "mlp_speculator",
            "vocab_size": self.vocab_size,
            "emb_dim": self.emb_dim,
            "inner_dim": self.inner_dim,
            "n_predict": self.n_predict,
            "top_k_tokens_per_head": self.top_k_tokens_per_head,
            "n_candidates": self.n_candidates,
            "tie_weights": self.tie_weights,
            "scale_input": self.scale_input,
        }

    def export_state_dict(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        state = self.state_dict() if state is None else state
        # Tied modules appear under every stage's name; safetensors needs separate storage for each.
        return {name: tensor.clone() for name, tensor in state.items()}

    @classmethod
    def from_pretrained(cls, directory: str | Path, target=None) -> MLPSpeculatorDrafter:
        directory = Path(directory)
        where = str(directory)
        files = read_drafter_files(directory)
        config = files.config
        require(config, ["vocab_size", "emb_dim", "n_predict"], where)
        drafter = cls(
            vocab_size=int(config["vocab_size"]),
            emb_dim=int(config["emb_dim"]),
            inner_dim=int(config.get("inner_dim") or 0),
            n_predict=int(config["n_predict"]),
            tie_weights=bool(config.get("tie_weights", False)),
            scale_input=bool(config.get("scale_input", False)),
            top_k_tokens_per_head=config.get("top_k_tokens_per_head"),
            n_candidates=int(config.get("n_candidates") or 5),
        )
        state = {name.replace("speculator.", ""): tensor for name, tensor in read_weights(directory).items()}
        expected = drafter.state_dict()
        weights = {name: take(state, name, tuple(t.shape), where).float() for name, t in expected.items()}
        drafter.load_state_dict(weights)
        drafter.training_info = files.record
        return drafter
