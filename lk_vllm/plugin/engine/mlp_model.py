"""vLLM's own MLP-speculator model, made loadable and runnable as a V1 drafter (see ``mlp_proposer``).

``vllm/model_executor/models/mlp_speculator.py::MLPSpeculator`` still ships in vLLM 0.32 with its layers and
weight loader, but without the proposal loop V0 ran and with a constructor that reads the *engine's* model
config (in V1 that is the target's; drafters are built with the target's ``VllmConfig``). This subclass keeps
vLLM's layers and ``load_weights`` unchanged and only (1) hands the constructor the draft model's config and
(2) adds :meth:`propose`, the chain over the stages (greedy, or sampled) (Wertheimer et al. 2024; the same math as
``lk_vllm.drafters.mlp_speculator``, which trains it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import SimpleNamespace

import torch
from vllm.distributed import get_tensor_model_parallel_world_size, tensor_model_parallel_all_gather
from vllm.model_executor.models.mlp_speculator import MLPSpeculator


class MLPSpeculatorModel(MLPSpeculator):
    """Registered as ``MLPSpeculatorPreTrainedModel`` by lk-vllm's general plugin."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        speculative_config = vllm_config.speculative_config
        if speculative_config is None or speculative_config.draft_model_config is None:
            raise ValueError(
                "an MLP speculator is a drafter: serve a target model with "
                '--speculative-config \'{"method": "mlp_speculator", "model": DIR, ...}\''
            )
        # vLLM's constructor reads only ``vllm_config.model_config.hf_config``: give it the draft's.
        draft = SimpleNamespace(
            model_config=SimpleNamespace(hf_config=speculative_config.draft_model_config.hf_config)
        )
        super().__init__(vllm_config=draft, prefix=prefix)

    def _logits(self, stage: int, state: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits of one stage's head on every tensor-parallel rank (so that all ranks propose
        the same tokens): the head's local vocabulary shard, all-gathered, padding cut off."""
        head = self.head[stage]
        logits = head.quant_method.apply(head, state)
        if get_tensor_model_parallel_world_size() > 1:
            logits = tensor_model_parallel_all_gather(logits)
        return logits[..., : self.vocab_size]

    @torch.inference_mode()
    def propose(
        self,
        hidden_states: torch.Tensor,
        tokens: torch.Tensor,
        num_tokens: int,
        sample: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Drafts [N, num_tokens] for N requests, and their distributions [N, num_tokens, vocab] (None when greedy).

        ``hidden_states`` [N, emb_dim]: the target's last hidden state (after its final norm) at each request's
        last accepted position t; ``tokens`` [N]: the token the target sampled there (t + 1). Stage i reads the
        previous stage's state and token and proposes token t + 2 + i: the argmax of its logits, or with
        ``sample`` (logits -> (tokens, probabilities)) a token drawn from them.
        """
        if num_tokens > len(self.head):  # vLLM builds num_speculative_tokens (<= n_predict) stages
            raise ValueError(
                f"the MLP speculator was built with {len(self.head)} stages, "
                f"cannot propose {num_tokens} tokens"
            )
        state = hidden_states
        if self.scale_input:
            state = self.ln0(state) / math.sqrt(2)
        drafts, probs = [], []
        for stage in range(num_tokens):
            mixed = self.proj[stage](state) + self.emb[stage](tokens) * (self.emb_weight / self.state_weight)
            state = self.activation(self.ln[stage](mixed))
            logits = self._logits(stage, state)
            if sample is None:
                tokens = logits.argmax(dim=-1)
            else:
                tokens, stage_probs = sample(logits)
                probs.append(stage_probs)
            drafts.append(tokens)
        if not drafts:
            return torch.empty(hidden_states.shape[0], 0, dtype=torch.long, device=hidden_states.device), None
        return torch.stack(drafts, dim=1), (torch.stack(probs, dim=1).contiguous() if probs else None)
