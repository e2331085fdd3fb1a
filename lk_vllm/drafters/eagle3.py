"""EAGLE-3 drafter: one Llama decoder layer over [token embedding ; fc(3 target hidden states)].

The math is vLLM 0.32's ``Eagle3LlamaForCausalLM`` (vllm/model_executor/models/llama_eagle3.py), so what is
trained is what is served:

* first step at target position ``t``: input token ``x[t+1]``, hidden ``fc(aux_t)`` where ``aux_t`` is the
  concatenation of the target's residual stream after layers ``aux_layer_ids`` (ascending), at position ``t``;
* the layer: ``e = input_layernorm(embed(x))``; ``h = hidden_norm(g)`` (the residual is ``g``, or ``h`` with
  ``norm_before_residual``); attention over ``[e ; h]`` (q/k/v take ``2 * hidden``); post-attention norm,
  MLP, final norm, ``lm_head`` over the draft vocabulary; the pre-norm output (post-norm with
  ``norm_output``) is the hidden input of the next step;
* later step ``j`` at anchor ``t``: position ``t + j``, input the previous step's output hidden at the same
  anchor and the token for position ``t + 1 + j``; attention sees the first step's keys at positions
  ``<= t`` and this anchor's own keys of steps ``1..j`` (what vLLM's KV cache holds while drafting).

Training unrolls K steps this way over every anchor at once ("training-time test"): the hidden input is the
drafter's own output; the token is the data's token (teacher forcing). Along an accepted chain the drafted
tokens equal the data's tokens when the data are the target's own greedy output, so on such data this is
exactly what serving computes. Token embeddings are the target's (frozen, not saved: vLLM shares the
target's); ``lm_head`` has ``draft_vocab_size`` rows and ``d2t`` maps draft ids to target ids.

Checkpoint formats: ``eagle3`` (default, a plain HF Llama config with ``architectures:
["LlamaForCausalLMEagle3"]`` and ``eagle_config``) and ``speculators`` (vllm-project/speculators). Both load
into vLLM's built-in class with ``method: eagle3``; the plain format is written by default because vLLM
takes the *target* of a speculators checkpoint served alone from ``verifier.name_or_path``, a path recorded
at training time that is wrong on any other machine; with the plain format the target is always the one the
user names. ``export_format="speculators"`` writes the other form.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lk_vllm.drafters.base import (
    Drafter,
    StepOutput,
    init_linear_,
    read_drafter_files,
    read_weights,
    require,
    shift_left,
    shift_mask,
    take,
    validate_attention_config,
    validate_draft_to_target,
)
from lk_vllm.errors import UserError
from lk_vllm.vocab import from_d2t, to_d2t, to_t2d

PLAIN_ARCHITECTURE = "LlamaForCausalLMEagle3"
SPECULATORS_ARCHITECTURE = "Eagle3Speculator"
# Query rows per block in the later unrolled steps' attention: bounds its scores at ATTENTION_BLOCK x T per head.
ATTENTION_BLOCK = 512
_LAYER_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "hidden_act",
    "max_position_embeddings",
    "rope_parameters",
    "attention_bias",
    "mlp_bias",
    "vocab_size",
)


def drafter_rope_parameters(target_config) -> dict[str, Any]:
    """The RoPE settings of the drafter's one full-attention layer, flat as Llama configs (and vLLM) read them.

    Targets with several attention kinds nest them per layer type (Gemma-3: ``{"full_attention": {...},
    "sliding_attention": {...}}``); the drafter attends over the whole context, so it takes the full-attention
    entry."""
    rope = dict(getattr(target_config, "rope_parameters", None) or {})
    if rope and all(isinstance(v, dict) for v in rope.values()):
        rope = dict(rope.get("full_attention") or next(iter(rope.values())))
    if not rope:
        rope = {
            "rope_type": "default",
            "rope_theta": float(getattr(target_config, "rope_theta", None) or 10000.0),
        }
    return rope


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Eagle3Attention(nn.Module):
    """Llama attention whose queries/keys/values read [embedding ; hidden] (2 * hidden_size wide)."""

    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        bias = bool(getattr(config, "attention_bias", False))
        width = 2 * config.hidden_size
        self.q_proj = nn.Linear(width, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(width, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(width, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q [B, nh, T, d], k and v [B, nh, T, d] (kv heads repeated), RoPE applied at the given cos/sin."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        repeat = self.num_heads // self.num_kv_heads
        if repeat > 1:
            k = k.repeat_interleave(repeat, dim=1)
            v = v.repeat_interleave(repeat, dim=1)
        return q, k, v

    def attend(self, q, context_k, context_v, own_k: list, own_v: list) -> torch.Tensor:
        """Softmax attention of q [B, nh, T, d] over the first step's keys, causally, and per query row over
        its own keys of later steps (lists of [B, nh, T, d], one per step). Batches are right-padded, so a real
        query only ever sees real keys. Memory is linear in T: the first step is one causal SDPA call (flash
        kernels); later steps run ATTENTION_BLOCK query rows at a time, each block recomputed in backward, so
        no [T, T] score matrix exists for the whole sequence."""
        if not own_k:
            out = F.scaled_dot_product_attention(q, context_k, context_v, is_causal=True)
        else:
            t = q.shape[2]
            recompute = torch.is_grad_enabled() and t > ATTENTION_BLOCK
            blocks = []
            for start in range(0, t, ATTENTION_BLOCK):
                stop = min(t, start + ATTENTION_BLOCK)
                args = (
                    q[:, :, start:stop],
                    context_k[:, :, :stop],
                    context_v[:, :, :stop],
                    *(k[:, :, start:stop] for k in own_k),
                    *(v[:, :, start:stop] for v in own_v),
                )
                blocks.append(
                    checkpoint(_attend_block, start, *args, use_reentrant=False)
                    if recompute
                    else _attend_block(start, *args)
                )
            out = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=2)
        b, nh, tq, d = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, tq, nh * d))


def _attend_block(start: int, q, context_k, context_v, *own) -> torch.Tensor:
    """Query rows ``start ..`` of a later step: scores over the context keys up to each row's position, plus
    one score per own key tensor (the row's own entry), softmaxed together."""
    rows, span, steps = q.shape[2], context_k.shape[2], len(own) // 2
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = (q @ context_k.transpose(-1, -2)) * scale
    causal = (
        torch.arange(span, device=q.device)[None, :]
        <= torch.arange(start, start + rows, device=q.device)[:, None]
    )
    scores = scores.masked_fill(~causal, float("-inf"))
    diagonal = torch.stack([(q * k).sum(-1) for k in own[:steps]], dim=-1) * scale  # [B, nh, rows, steps]
    probs = torch.softmax(torch.cat([scores, diagonal], dim=-1), dim=-1)
    out = probs[..., :span] @ context_v
    for s, v in enumerate(own[steps:]):
        out = out + probs[..., span + s, None] * v
    return out


class Eagle3Layer(nn.Module):
    def __init__(self, config, norm_before_residual: bool):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

        self.self_attn = Eagle3Attention(config)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.hidden_norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.norm_before_residual = norm_before_residual


class Eagle3Drafter(Drafter):
    architecture = "eagle3"
    vllm_method = "eagle3"

    def __init__(
        self,
        layer_config: dict[str, Any],
        *,
        draft_vocab_size: int,
        aux_layer_ids: Sequence[int] | None,
        target_hidden_size: int | None = None,
        norm_before_residual: bool = False,
        norm_before_fc: bool = False,
        fc_norm: bool = False,
        norm_output: bool = False,
        draft_to_target: torch.Tensor | None = None,
        num_aux_hidden_states: int = 3,
    ):
        super().__init__()
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding

        fields = {k: v for k, v in layer_config.items() if k in _LAYER_KEYS and v is not None}
        if "rope_parameters" not in fields and layer_config.get("rope_theta") is not None:
            fields["rope_parameters"] = {
                "rope_type": "default",
                "rope_theta": float(layer_config["rope_theta"]),
            }
        self.config = LlamaConfig(num_hidden_layers=1, tie_word_embeddings=False, **fields)
        if self.config.head_dim is None:
            self.config.head_dim = self.config.hidden_size // self.config.num_attention_heads
        hidden = self.config.hidden_size
        self.vocab_size = int(self.config.vocab_size)
        self._draft_vocab_size = int(draft_vocab_size)
        self.aux_layer_ids = tuple(sorted(int(i) for i in aux_layer_ids)) if aux_layer_ids else None
        self.num_aux = len(self.aux_layer_ids) if self.aux_layer_ids else num_aux_hidden_states
        self._target_hidden_size = int(target_hidden_size or hidden)
        self.norm_before_fc = norm_before_fc
        self.use_fc_norm = fc_norm
        self.norm_output = norm_output
        self.norm_before_residual = norm_before_residual
        eps = self.config.rms_norm_eps
        fc_in = self._target_hidden_size * self.num_aux
        if norm_before_fc:
            self.input_norm = LlamaRMSNorm(fc_in, eps=eps)
        if fc_norm:
            self.fc_norm = nn.ModuleList(
                LlamaRMSNorm(self._target_hidden_size, eps=eps) for _ in range(self.num_aux)
            )
        self.fc = nn.Linear(fc_in, hidden, bias=False)
        self.layers = nn.ModuleList([Eagle3Layer(self.config, norm_before_residual)])
        self.norm = LlamaRMSNorm(hidden, eps=eps)
        self.lm_head = nn.Linear(hidden, self._draft_vocab_size, bias=False)
        self.rotary = LlamaRotaryEmbedding(config=self.config)
        if draft_to_target is None and self._draft_vocab_size != self.vocab_size:
            raise UserError(
                f"EAGLE-3 drafter: draft vocabulary {self._draft_vocab_size} < target vocabulary {self.vocab_size} "
                "needs a draft-to-target map"
            )
        if draft_to_target is not None:
            validate_draft_to_target(
                draft_to_target.long(), self._draft_vocab_size, self.vocab_size, "EAGLE-3 drafter"
            )
            self.register_buffer("draft_ids", draft_to_target.long().clone())
        else:
            self.draft_ids = None
        # The token embeddings: the target's (shared, frozen, not exported) unless the checkpoint has its own.
        self._embed: torch.Tensor | None = None
        self.own_embeddings = False
        for module in self.modules():
            if isinstance(module, nn.Linear):
                init_linear_(module, std=0.02)

    # ---------------------------------------------------------------------------- construction
    @classmethod
    def from_target(
        cls,
        target,
        *,
        draft_to_target: torch.Tensor | None = None,
        aux_layer_ids: Sequence[int] | None = None,
        intermediate_size: int | None = None,
        norm_before_residual: bool = False,
    ) -> Eagle3Drafter:
        """A fresh drafter for ``target`` (a TargetModel): its sizes, RoPE and context length, vLLM's default aux
        layers unless given, ``lm_head`` initialised from the target's rows for the draft vocabulary."""
        tc = target.config
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        layer = {
            "hidden_size": tc.hidden_size,
            "intermediate_size": intermediate_size or tc.intermediate_size,
            "num_attention_heads": tc.num_attention_heads,
            "num_key_value_heads": getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads,
            "head_dim": head_dim,
            "rms_norm_eps": tc.rms_norm_eps,
            "hidden_act": getattr(tc, "hidden_act", "silu"),
            "max_position_embeddings": tc.max_position_embeddings,
            "rope_parameters": drafter_rope_parameters(tc),
            "vocab_size": tc.vocab_size,
        }
        ids = target.check_aux_layer_ids(aux_layer_ids or target.default_aux_layer_ids(), "EAGLE-3 drafter")
        draft_vocab = tc.vocab_size if draft_to_target is None else int(draft_to_target.numel())
        drafter = cls(
            layer,
            draft_vocab_size=draft_vocab,
            aux_layer_ids=ids,
            target_hidden_size=tc.hidden_size,
            norm_before_residual=norm_before_residual,
            draft_to_target=draft_to_target,
        )
        with torch.no_grad():
            rows = (
                target.lm_head_weight if draft_to_target is None else target.lm_head_weight[draft_to_target]
            )
            drafter.lm_head.weight.copy_(rows)
        drafter.attach_target(target)
        return drafter

    def attach_target(self, target) -> None:
        """Use the target's token embeddings (and vLLM's default aux layers if the checkpoint names none)."""
        if not self.own_embeddings:
            self._embed = target.embed_weight.detach()  # a plain tensor: never a parameter of the drafter
        if self.aux_layer_ids is None:
            self.aux_layer_ids = target.check_aux_layer_ids(target.default_aux_layer_ids())
        else:
            target.check_aux_layer_ids(self.aux_layer_ids, "EAGLE-3 drafter eagle_aux_hidden_state_layer_ids")

    def set_embeddings(self, weight: torch.Tensor, own: bool) -> None:
        self._embed = weight.detach().float()
        self.own_embeddings = own

    # ---------------------------------------------------------------------------- properties
    @property
    def draft_to_target(self) -> torch.Tensor | None:
        return self.draft_ids

    def target_hidden_size(self) -> int:
        return self._target_hidden_size

    def aux_layer_ids_needed(self) -> tuple[int, ...] | None:
        return self.aux_layer_ids

    # ---------------------------------------------------------------------------- math
    def _embed_ids(self, target_ids: torch.Tensor) -> torch.Tensor:
        if self._embed is None:
            raise RuntimeError("EAGLE-3 drafter has no token embeddings: call attach_target(target) first")
        if (
            self._embed.device != target_ids.device
        ):  # once, when the drafter moved (a plain tensor does not follow)
            self._embed = self._embed.to(target_ids.device)
        # Gather the rows first: converting the whole [V, H] table on every call would copy it each step.
        return F.embedding(target_ids, self._embed).to(self.fc.weight.dtype)

    def combine_hidden_states(self, aux: torch.Tensor) -> torch.Tensor:
        """fc over the target's concatenated aux states (with the optional norms vLLM applies)."""
        if self.norm_before_fc:
            aux = self.input_norm(aux)
        if self.use_fc_norm:
            chunks = aux.chunk(self.num_aux, dim=-1)
            aux = torch.cat([norm(chunk) for norm, chunk in zip(self.fc_norm, chunks, strict=True)], dim=-1)
        return self.fc(aux)

    def _layer(self, token_ids, hidden_in, positions, context, own_k, own_v):
        """One pass of the decoder layer. ``context`` is None for the first step (its own keys become the
        context) or the first step's (k, v). Returns (normed out, next hidden, k, v, context)."""
        layer = self.layers[0]
        embeds = layer.input_layernorm(self._embed_ids(token_ids))
        if layer.norm_before_residual:
            hidden = layer.hidden_norm(hidden_in)
            residual = hidden
        else:
            residual = hidden_in
            hidden = layer.hidden_norm(hidden_in)
        cos, sin = self.rotary(hidden, positions)
        q, k, v = layer.self_attn.project(torch.cat([embeds, hidden], dim=-1), cos, sin)
        if context is None:
            context = (k, v)
            attn = layer.self_attn.attend(q, k, v, [], [])
        else:
            attn = layer.self_attn.attend(q, context[0], context[1], own_k + [k], own_v + [v])
        residual = attn + residual
        hidden = layer.mlp(layer.post_attention_layernorm(residual))
        prenorm = hidden + residual
        out = self.norm(prenorm)
        return out, (out if self.norm_output else prenorm), k, v, context

    def _unroll(self, states, num_steps: int, teacher: bool):
        """Yield (step, normed output [B, T, H]) for ``num_steps`` steps over all anchors. ``teacher``: step j
        reads the data's token t+1+j; else the previous step's greedy draft (as vLLM drafts)."""
        if states.aux_hidden is None or tuple(states.aux_layer_ids) != tuple(self.aux_layer_ids):
            raise ValueError(
                f"target states carry aux layers {states.aux_layer_ids}, the drafter needs {self.aux_layer_ids}"
            )
        input_ids, attention_mask = states.input_ids, states.attention_mask.bool()
        if bool((attention_mask[:, 1:] & ~attention_mask[:, :-1]).any()):
            raise ValueError("EAGLE-3 training states must be right-padded (a real token after padding)")
        hidden = self.combine_hidden_states(states.aux_hidden.to(self.fc.weight.dtype))
        tokens = shift_left(input_ids, 1)
        context, own_k, own_v = None, [], []
        for step in range(num_steps):
            out, hidden, k, v, context = self._layer(
                tokens, hidden, states.position_ids + step, context, own_k, own_v
            )
            if step > 0:
                own_k.append(k)
                own_v.append(v)
            yield step, out
            if step + 1 < num_steps:
                if teacher:
                    tokens = shift_left(input_ids, step + 2)
                else:
                    tokens = self.to_target_ids(self.lm_head(out).argmax(-1))

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids if self.draft_ids is None else self.draft_ids[draft_ids]

    def training_steps(self, states, num_steps: int) -> list[StepOutput]:
        return [
            StepOutput(
                hidden=out,
                head=self.lm_head,
                target_shift=step + 1,
                mask=shift_mask(states.attention_mask, step + 1),
            )
            for step, out in self._unroll(states, num_steps, teacher=True)
        ]

    @torch.no_grad()
    def propose_all(self, states, num_tokens: int) -> torch.Tensor:
        """Greedy drafts [B, T, K] (target ids) at every anchor, computed as vLLM drafts them."""
        drafts = []
        for _, out in self._unroll(states, num_tokens, teacher=False):
            drafts.append(self.to_target_ids(self.lm_head(out).argmax(-1)))
        return torch.stack(drafts, dim=-1)

    # ---------------------------------------------------------------------------- checkpoint
    def _layer_config(self) -> dict[str, Any]:
        full = self.config.to_dict()
        layer = {k: full[k] for k in _LAYER_KEYS if k in full}
        rope = full.get("rope_parameters") or {}
        if "rope_theta" in rope:
            layer["rope_theta"] = rope["rope_theta"]  # for readers that predate rope_parameters
        layer.update({"num_hidden_layers": 1, "tie_word_embeddings": False, "model_type": "llama"})
        return layer

    def config_dict(self, export_format: str | None = None, target: dict | None = None) -> dict[str, Any]:
        export_format = export_format or "eagle3"
        aux = list(self.aux_layer_ids or [])
        extras = {
            "draft_vocab_size": self._draft_vocab_size,
            "target_hidden_size": self._target_hidden_size,
            "norm_before_residual": self.norm_before_residual,
            "norm_before_fc": self.norm_before_fc,
            "fc_norm": self.use_fc_norm,
            "norm_output": self.norm_output,
        }
        if export_format == "eagle3":
            return {
                "architectures": [PLAIN_ARCHITECTURE],
                **self._layer_config(),
                **extras,
                # Both places: vLLM 0.32's V1 model runner reads either, its V2 runner (the GPU default for
                # EAGLE-3) only the top-level key, and silently guesses (2, L/2, L-3) without it.
                "eagle_aux_hidden_state_layer_ids": aux,
                "eagle_config": {"eagle_aux_hidden_state_layer_ids": aux, "use_aux_hidden_state": True},
                "torch_dtype": "float32",
            }
        if export_format == "speculators":
            target_path = target.get("path", "") if target else self.training_info.target_path or ""
            return speculators_config(self._layer_config(), extras, aux, target_path=target_path)
        raise UserError(f"EAGLE-3 export format {export_format!r} is unknown; use 'eagle3' or 'speculators'")

    def export_state_dict(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        state = self.state_dict() if state is None else state
        state = {k: v for k, v in state.items() if not k.startswith("rotary.") and k != "draft_ids"}
        if self.draft_ids is not None:
            state["d2t"] = to_d2t(self.draft_ids)  # vLLM's offset form: target = draft + d2t[draft]
            state["t2d"] = to_t2d(self.draft_ids, self.vocab_size)
        if self.own_embeddings and self._embed is not None:
            state["embed_tokens.weight"] = self._embed
        return state

    def validate(self, target: dict, state: dict, config: dict) -> None:
        validate_attention_config(self._layer_config(), target, "EAGLE-3 export")
        if self.config.hidden_size != target["hidden_size"] and not self.own_embeddings:
            raise UserError(
                f"EAGLE-3 export: drafter hidden size {self.config.hidden_size} must equal the target's "
                f"{target['hidden_size']} to share its embeddings"
            )
        ids = list(self.aux_layer_ids or [])
        layers = int(target.get("num_hidden_layers") or 0)
        if len(set(ids)) != len(ids) or len(ids) != self.num_aux:
            raise UserError(f"EAGLE-3 export: auxiliary layer ids {ids} must be {self.num_aux} distinct ids")
        if layers and any(not 0 <= i <= layers for i in ids):
            raise UserError(f"EAGLE-3 export: auxiliary layer ids {ids} must lie in 0..{layers}")

    @classmethod
    def from_pretrained(cls, directory: str | Path, target=None) -> Eagle3Drafter:
        """Load an EAGLE-3 checkpoint in the plain or the speculators format (ours or a third party's)."""
        directory = Path(directory)
        files = read_drafter_files(directory)
        config = files.config
        where = str(directory)
        if "speculators_config" in config or config.get("speculators_model_type"):
            if config.get("speculators_model_type") != "eagle3":
                raise UserError(
                    f"drafter {where}: speculators model type {config.get('speculators_model_type')!r} is not "
                    "supported; lk-vllm loads speculators 'eagle3' checkpoints"
                )
            require(config, ["transformer_layer_config"], where)
            layer = dict(config["transformer_layer_config"])
            if layer.get("model_type", "llama") != "llama":
                raise UserError(
                    f"drafter {where}: EAGLE-3 layer model_type {layer.get('model_type')!r}; only llama is supported"
                )
            extras = config
            aux = config.get("eagle_aux_hidden_state_layer_ids")
            norm_before_residual = bool(
                config.get("norm_before_residual", True)
            )  # vLLM's speculators default
        else:
            layer = config
            extras = config
            eagle_config = config.get("eagle_config") or {}
            aux = eagle_config.get("eagle_aux_hidden_state_layer_ids") or config.get(
                "eagle_aux_hidden_state_layer_ids"
            )
            if eagle_config.get("use_aux_hidden_state") is False:
                raise UserError(
                    f"drafter {where}: EAGLE-3 heads without auxiliary hidden states are not supported"
                )
            norm_before_residual = bool(config.get("norm_before_residual", False))
        require(layer, ["hidden_size", "num_attention_heads", "intermediate_size", "vocab_size"], where)
        if int(layer.get("num_hidden_layers", 1)) != 1:
            raise UserError(
                f"drafter {where}: EAGLE-3 with {layer.get('num_hidden_layers')} layers; only 1 is supported"
            )
        vocab = int(layer["vocab_size"])
        draft_vocab = int(extras.get("draft_vocab_size") or vocab)
        state = read_weights(directory)
        state = {_canonical_name(name): tensor for name, tensor in state.items()}
        d2t = None
        if draft_vocab != vocab:
            d2t = from_d2t(take(state, "d2t", (draft_vocab,), where))
            validate_draft_to_target(d2t, draft_vocab, vocab, f"drafter {where} d2t")
        drafter = cls(
            layer,
            draft_vocab_size=draft_vocab,
            aux_layer_ids=aux,
            target_hidden_size=extras.get("target_hidden_size"),
            norm_before_residual=norm_before_residual,
            norm_before_fc=bool(extras.get("norm_before_fc", False)),
            fc_norm=bool(extras.get("fc_norm", False)),
            norm_output=bool(extras.get("norm_output", False)),
            draft_to_target=d2t,
            num_aux_hidden_states=int(extras.get("num_aux_hidden_states") or 3),
        )
        expected = {
            k: tuple(v.shape)
            for k, v in drafter.state_dict().items()
            if not k.startswith("rotary.") and k != "draft_ids"
        }
        weights = {name: take(state, name, shape, where) for name, shape in expected.items()}
        drafter.load_state_dict({**drafter.state_dict(), **{k: v.float() for k, v in weights.items()}})
        if "embed_tokens.weight" in state:
            drafter.set_embeddings(
                take(state, "embed_tokens.weight", (vocab, drafter.config.hidden_size), where), own=True
            )
        drafter.training_info = files.record
        if target is not None:
            drafter.attach_target(target)
        return drafter


def _canonical_name(name: str) -> str:
    """Checkpoint names as vLLM maps them: ``midlayer.`` is layer 0; a leading ``model.`` is dropped."""
    if name.startswith("model."):
        name = name[len("model.") :]
    return name.replace("midlayer.", "layers.0.")


def speculators_config(
    layer: dict, extras: dict, aux: list[int], target_path: str, num_tokens: int = 3
) -> dict:
    """A vllm-project/speculators EAGLE-3 config (the format RedHatAI and Nebius publish)."""
    return {
        "architectures": [SPECULATORS_ARCHITECTURE],
        "speculators_model_type": "eagle3",
        "speculators_version": "0.3.0",
        "transformer_layer_config": layer,
        **extras,
        "eagle_aux_hidden_state_layer_ids": aux,
        "speculators_config": {
            "algorithm": "eagle3",
            "default_proposal_method": "greedy",
            "proposal_methods": [
                {
                    "proposal_type": "greedy",
                    "speculative_tokens": num_tokens,
                    "verifier_accept_k": 1,
                    "accept_tolerance": 0.0,
                }
            ],
            "verifier": {"name_or_path": target_path, "architectures": ["LlamaForCausalLM"]},
        },
    }
