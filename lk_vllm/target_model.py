"""The target model as the trainer and the torch evaluator see it: an HF causal LM in fp32, frozen.

``TargetModel(path).forward(input_ids, attention_mask)`` returns ``TargetStates``: the final hidden state, the
auxiliary hidden states an EAGLE-3 drafter reads, and lazy access to the target's logits for chosen positions.

Auxiliary hidden states follow vLLM 0.32 exactly (``SupportsEagle3`` in vllm/model_executor/models/llama.py):
layer id ``k`` is the residual stream after ``k`` decoder layers (``hidden_states + residual`` in vLLM's fused
form), id 0 is the token embeddings and id ``L`` is the last layer's output BEFORE the final norm. transformers'
``output_hidden_states`` entry ``L`` is after the norm, so the states are captured with forward hooks on the
embedding and on each decoder layer instead. The drafter's ``fc`` input is the concatenation in ASCENDING
layer-id order, whatever order a config lists them in (vLLM appends them while the layers run).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from lk_vllm.datasets import chat_prompt_ids
from lk_vllm.errors import UserError


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left and right padding both give vLLM's positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclasses.dataclass
class TargetStates:
    """What one target forward gives a drafter. Shapes: B sequences, T positions, H hidden size."""

    input_ids: torch.Tensor  # [B, T] long
    attention_mask: torch.Tensor  # [B, T] bool, True for real tokens
    position_ids: torch.Tensor  # [B, T] long, vLLM's positions
    final_hidden: torch.Tensor  # [B, T, H] after the final norm (what lm_head reads; what Medusa reads)
    aux_hidden: torch.Tensor | None  # [B, T, n*H] aux states in ascending layer-id order, or None
    aux_layer_ids: tuple[int, ...]  # ascending
    lm_head_weight: torch.Tensor  # [V, H] the target's output projection (frozen)
    embed_weight: torch.Tensor  # [V, H] the target's input embeddings (frozen)
    cached_logits: torch.Tensor | None = None  # [B, T, V] once cache_all_logits() ran
    # [B, T] fp32 logsumexp of the target logits over the full vocabulary (the offline cache stores it), so the
    # loss needs the target's logits only at the draft ids.
    final_logsumexp: torch.Tensor | None = None

    @property
    def vocab_size(self) -> int:
        return self.lm_head_weight.shape[0]

    def logits_at(
        self, batch_index: torch.Tensor, positions: torch.Tensor, chunk_size: int = 1024
    ) -> torch.Tensor:
        """Target logits [N, V] at (batch_index[n], positions[n]), computed chunk by chunk from the hidden
        state so [B, T, V] is never held."""
        if self.cached_logits is not None:
            return self.cached_logits[batch_index, positions]
        hidden = self.final_hidden[batch_index, positions].to(self.lm_head_weight.dtype)
        if hidden.shape[0] <= chunk_size:
            return hidden @ self.lm_head_weight.T
        return torch.cat([h @ self.lm_head_weight.T for h in hidden.split(chunk_size)])

    def draft_logits_at(
        self,
        batch_index: torch.Tensor,
        positions: torch.Tensor,
        draft_to_target: torch.Tensor,
        chunk_size: int = 1024,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits [N, Vd] at the draft ids, fp32 logsumexp [N] over the full vocabulary)`` at these
        positions: all the loss needs of the target when the drafter has its own vocabulary. With
        ``final_logsumexp`` only the ``Vd`` rows of the lm_head are multiplied; without it the full logits are
        computed for their logsumexp."""
        if self.final_logsumexp is None or self.cached_logits is not None:
            logits = self.logits_at(batch_index, positions, chunk_size)
            return logits.index_select(1, draft_to_target), torch.logsumexp(logits.float(), dim=1)
        # fp32 products, as the cached normaliser was taken (training.capture.logsumexp_of_logits): in bf16 the
        # two matmuls round their outputs differently (by up to ~0.1 at logit 20), and a row whose mass sits on
        # draft ids would then have a draft logsumexp above the full vocabulary's.
        hidden = self.final_hidden[batch_index, positions].float()
        weight = self.lm_head_weight.index_select(0, draft_to_target).float()
        return hidden @ weight.T, self.final_logsumexp[batch_index, positions].float()

    def all_logits(self) -> torch.Tensor:
        """Target logits [B, T, V] (for short sequences and tests)."""
        if self.cached_logits is not None:
            return self.cached_logits
        return self.final_hidden.to(self.lm_head_weight.dtype) @ self.lm_head_weight.T

    def cache_all_logits(self) -> TargetStates:
        """Compute [B, T, V] once, for states reused over many steps (small data sets, tests)."""
        self.cached_logits = self.all_logits()
        return self


class TargetModel:
    """A frozen HF causal LM (eval mode, no grad; fp32 unless told) that exposes vLLM-equivalent hidden states,
    on ``device`` (default: the CPU)."""

    def __init__(
        self,
        path: str,
        dtype: torch.dtype = torch.float32,
        model=None,
        device=None,
        chat_template: str | None = None,
        shard_layers: bool = False,
    ):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.path = str(path)
        self.chat_template = chat_template  # a file or built-in name in place of the tokenizer's own
        if model is None:
            try:
                AutoConfig.from_pretrained(self.path)
            except (OSError, ValueError) as exc:
                raise UserError(f"target {self.path}: cannot read its config.json ({exc})") from exc
            model = AutoModelForCausalLM.from_pretrained(self.path, dtype=dtype)
        self.model = model.eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.config = self.model.config
        self.num_layers = int(self.config.num_hidden_layers)
        self.hidden_size = int(self.config.hidden_size)
        self.vocab_size = int(self.config.vocab_size)
        self._decoder = self.model.get_decoder()
        self._tokenizer = None
        self.sharded = shard_layers
        if shard_layers:
            self._shard_layers(device)
        elif device is not None:
            self.model.to(device)
        self.device = self.embed_weight.device

    def _shard_layers(self, device) -> None:
        """FSDP2 over the process group: every rank keeps 1/N of each decoder layer and a forward gathers one
        layer at a time, so a target larger than one device runs on N of them. Everything else (embeddings,
        final norm, lm_head: what the loss reads outside a forward) stays whole on every rank. Every rank
        must then run the same number of forwards (``idle``)."""
        whole = [child for name, child in self._decoder.named_children() if name != "layers"]
        whole.append(self.model.get_output_embeddings())
        for module in whole:
            if device is not None:
                module.to(device)
        for layer in self._decoder.layers:
            fully_shard(layer, reshard_after_forward=True)  # moves it to the mesh's device, then shards it
        # The root orders the layers' gathers; its own parameters are the whole ones.
        fully_shard(self._decoder, ignored_params={p for module in whole for p in module.parameters()})

    def layers_sharded(self) -> bool:
        """Whether the decoder layers' weights are FSDP2 shards (what the run log reports)."""
        return isinstance(next(self._decoder.layers.parameters()), DTensor)

    def idle(self) -> None:
        """A forward that is thrown away: a rank with no batch left keeps step with the ranks that have one
        (the sharded layers' gathers are collectives). Nothing to do when the layers are not sharded."""
        if self.sharded:
            self.forward(torch.zeros(1, 1, dtype=torch.long, device=self.device))

    # -------------------------------------------------------------------------------- properties
    @property
    def embed_weight(self) -> torch.Tensor:
        return self.model.get_input_embeddings().weight

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.model.get_output_embeddings().weight

    @property
    def max_position_embeddings(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", 0) or 0)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from lk_vllm.datasets import load_tokenizer

            self._tokenizer = load_tokenizer(self.path, self.chat_template)
        return self._tokenizer

    def default_aux_layer_ids(self) -> tuple[int, int, int]:
        """vLLM's default EAGLE-3 layers, (2, L // 2, L - 3)."""
        n = self.num_layers
        return (2, n // 2, n - 3)

    def check_aux_layer_ids(self, layer_ids: Sequence[int], source: str = "aux layer ids") -> tuple[int, ...]:
        ids = [int(i) for i in layer_ids]
        if len(set(ids)) != len(ids):
            raise UserError(f"{source}: auxiliary layer ids must be distinct, found {ids}")
        bad = [i for i in ids if not 0 <= i <= self.num_layers]
        if bad:
            raise UserError(
                f"{source}: auxiliary layer ids must lie in 0..{self.num_layers} for this {self.num_layers}-layer "
                f"target, found {bad}"
            )
        return tuple(sorted(ids))

    # -------------------------------------------------------------------------------- forward
    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        aux_layer_ids: Sequence[int] | None = None,
    ) -> TargetStates:
        """Run the target on a batch and capture what drafters need (no logits are materialised)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        attention_mask = attention_mask.bool()
        position_ids = position_ids_from_mask(attention_mask)
        ids = self.check_aux_layer_ids(aux_layer_ids) if aux_layer_ids else ()
        captured: dict[int, torch.Tensor] = {}

        def keep(layer_id):
            def hook(_module, _inputs, output):
                captured[layer_id] = output[0] if isinstance(output, tuple) else output

            return hook

        handles = []
        if 0 in ids:
            handles.append(self._decoder.embed_tokens.register_forward_hook(keep(0)))
        for layer_id in ids:
            if layer_id > 0:
                handles.append(self._decoder.layers[layer_id - 1].register_forward_hook(keep(layer_id)))
        try:
            out = self._decoder(
                input_ids=input_ids,
                attention_mask=attention_mask.long(),
                position_ids=position_ids,
                use_cache=False,
            )
        finally:
            for handle in handles:
                handle.remove()
        aux = torch.cat([captured[i] for i in ids], dim=-1) if ids else None
        return TargetStates(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            final_hidden=out.last_hidden_state,
            aux_hidden=aux,
            aux_layer_ids=ids,
            lm_head_weight=self.lm_head_weight,
            embed_weight=self.embed_weight,
        )

    __call__ = forward

    # -------------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate_greedy(self, prompt_ids: Sequence[int], num_tokens: int) -> list[int]:
        """The target's greedy continuation of ``prompt_ids``: exactly ``num_tokens`` tokens, not stopping at
        end-of-sequence (the evaluator decides where a request would stop)."""
        return self.generate(prompt_ids, num_tokens, temperature=0.0)

    @torch.no_grad()
    def generate(
        self, prompt_ids: Sequence[int], num_tokens: int, temperature: float = 0.0, generator=None
    ) -> list[int]:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.config)
        tokens = torch.tensor([list(prompt_ids)], dtype=torch.long)
        out_tokens: list[int] = []
        for _ in range(num_tokens):
            out = self.model(input_ids=tokens, past_key_values=cache, use_cache=True)
            logits = out.logits[0, -1]
            if temperature > 0:
                probs = torch.softmax(logits / temperature, dim=-1)
                token = int(torch.multinomial(probs, 1, generator=generator))
            else:
                token = int(logits.argmax())
            out_tokens.append(token)
            tokens = torch.tensor([[token]], dtype=torch.long)
        return out_tokens

    @torch.no_grad()
    def generate_greedy_batch(self, prompts: Sequence[Sequence[int]], num_tokens: int) -> list[list[int]]:
        """Greedy continuations of several prompts at once (left-padded; ``num_tokens`` each, never stopping).

        Padding changes the arithmetic slightly, so a near-tie can resolve differently than unbatched; use it
        for training data, ``generate_greedy`` where the exact unbatched tokens matter."""
        from transformers import DynamicCache

        if not prompts:
            return []
        width = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(list(prompt))
            mask[row, width - len(prompt) :] = 1
        cache = DynamicCache(config=self.config)
        positions = position_ids_from_mask(mask)
        outputs: list[torch.Tensor] = []
        for _ in range(num_tokens):
            logits = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
            ).logits[:, -1]
            ids = logits.argmax(-1, keepdim=True)
            outputs.append(ids[:, 0])
            mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
            positions = positions[:, -1:] + 1
        return torch.stack(outputs, dim=1).tolist()

    def chat_prompt_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of a chat prompt with the generation prompt appended (the same ids vLLM is given)."""
        return chat_prompt_ids(self.tokenizer, messages)

    def stop_token_ids(self) -> set[int]:
        """Tokens that end a request in vLLM: the tokenizer's EOS and the generation config's EOS ids."""
        stops: set[int] = set()
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        try:
            tokenizer_eos = self.tokenizer.eos_token_id
        except (
            OSError,
            ValueError,
        ):  # a target without tokenizer files (tests): the generation config decides
            tokenizer_eos = None
        for value in [eos, tokenizer_eos]:
            if value is None:
                continue
            stops.update([value] if isinstance(value, int) else value)
        return stops
