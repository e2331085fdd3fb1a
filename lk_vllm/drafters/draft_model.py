"""Draft LM: an independent small causal LM with the target's tokenizer and vocabulary (vLLM ``draft_model``).

vLLM runs it as an ordinary LM on the accepted context and drafts K tokens autoregressively; it requires the
draft vocabulary to equal the target's. Training is plain next-token distillation: the draft distribution at
position t is trained against the target's at position t (``target_shift = 0``); with teacher forcing every
drafting step is that same distribution, so ``training_steps`` returns a single step.

``from_target`` builds a Llama with the target's sizes and ``num_layers`` layers, initialised from the
target's embeddings, its first ``num_layers`` decoder layers and its final norm (the head is tied to the
embeddings when the target's is, as in SmolLM2). The checkpoint is a plain HF ``LlamaForCausalLM`` directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lk_vllm.drafters.base import (
    Drafter,
    StepOutput,
    read_drafter_files,
    read_weights,
    require,
    shift_mask,
    take,
    validate_attention_config,
)
from lk_vllm.errors import UserError


class DraftLM(Drafter):
    architecture = "draft_model"
    vllm_method = "draft_model"

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config
        self.vocab_size = int(model.config.vocab_size)

    @classmethod
    def from_target(
        cls, target, *, num_layers: int = 2, copy_layers: bool = True, train_embeddings: bool = False
    ) -> DraftLM:
        from transformers import AutoModelForCausalLM

        if not 1 <= num_layers <= target.num_layers:
            raise UserError(f"draft LM: num_layers must lie in 1..{target.num_layers}, got {num_layers}")
        config = target.config.__class__.from_dict(target.config.to_dict())
        config.num_hidden_layers = num_layers
        for key in ("layer_types",):  # per-layer lists must match the new depth
            value = getattr(config, key, None)
            if isinstance(value, list):
                setattr(config, key, value[:num_layers])
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        source = target.model.state_dict()
        with torch.no_grad():
            own = model.state_dict()
            for name, tensor in own.items():
                is_layer = ".layers." in name
                if name in source and (copy_layers or not is_layer) and source[name].shape == tensor.shape:
                    tensor.copy_(source[name])
        drafter = cls(model.eval())
        drafter.model.get_input_embeddings().weight.requires_grad_(train_embeddings)
        return drafter

    # ---------------------------------------------------------------------------- properties
    def _decoder(self):
        return self.model.get_decoder()

    # ---------------------------------------------------------------------------- math
    def training_steps(self, states, num_steps: int = 1) -> list[StepOutput]:
        out = self._decoder()(
            input_ids=states.input_ids,
            attention_mask=states.attention_mask.long(),
            position_ids=states.position_ids,
            use_cache=False,
        )
        return [
            StepOutput(
                hidden=out.last_hidden_state,
                head=self.model.get_output_embeddings(),
                target_shift=0,
                mask=shift_mask(states.attention_mask, 0),
            )
        ]

    def make_proposer(self, states, num_tokens: int):
        """Drafts as vLLM runs a draft model: the LM's KV cache holds the accepted context; K greedy tokens are
        decoded one by one and the cache is cut back to the context afterwards."""
        from transformers import DynamicCache

        sequence = states.input_ids[0].tolist()
        cache = DynamicCache(config=self.config)
        cached = [0]

        @torch.no_grad()
        def propose(anchor: int) -> list[int]:
            context = anchor + 2  # tokens 0 .. anchor + 1
            tokens = sequence[cached[0] : context]
            drafts: list[int] = []
            for _ in range(num_tokens):
                ids = torch.tensor([tokens])
                start = cache.get_seq_length()
                positions = torch.arange(start, start + len(tokens))[None]
                logits = self.model(
                    input_ids=ids, position_ids=positions, past_key_values=cache, use_cache=True
                ).logits
                drafts.append(int(logits[0, -1].argmax()))
                tokens = [drafts[-1]]
            cache.crop(context)
            cached[0] = context
            return drafts

        return propose

    # ---------------------------------------------------------------------------- checkpoint
    def config_dict(self, export_format: str | None = None, target: dict | None = None) -> dict[str, Any]:
        config = self.config.to_dict()
        config["architectures"] = [type(self.model).__name__]
        config.pop("_name_or_path", None)
        config["torch_dtype"] = "float32"
        return config

    def export_state_dict(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        if state is None:
            state = self.model.state_dict()
        else:  # the drafter's names: the HF model sits under "model."
            state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
        state = dict(state)
        if getattr(self.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # tied: vLLM (and HF) take it from the embeddings
        return state

    def validate(self, target: dict, state: dict, config: dict) -> None:
        validate_attention_config(config, target, "draft LM export")

    @classmethod
    def from_pretrained(cls, directory: str | Path, target=None) -> DraftLM:
        from transformers import AutoConfig, AutoModelForCausalLM

        directory = Path(directory)
        where = str(directory)
        files = read_drafter_files(directory)
        config_dict = files.config
        require(config_dict, ["model_type", "vocab_size", "hidden_size", "num_hidden_layers"], where)
        try:
            config = AutoConfig.from_pretrained(directory)
        except (ValueError, KeyError, OSError) as exc:
            raise UserError(
                f"drafter {where}: config.json is not a causal LM config transformers reads ({exc})"
            ) from exc
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        state = read_weights(directory)
        expected = model.state_dict()
        tied = bool(getattr(config, "tie_word_embeddings", False))
        weights = {}
        for name, tensor in expected.items():
            if name == "lm_head.weight" and tied and name not in state:
                continue
            weights[name] = take(state, name, tuple(tensor.shape), where).float()
        model.load_state_dict(weights, strict=False)
        if tied:
            model.tie_weights()
        drafter = cls(model.eval())
        drafter.training_info = files.record
        return drafter
