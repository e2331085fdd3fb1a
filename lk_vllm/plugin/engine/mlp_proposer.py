"""Serve ``mlp_speculator`` drafters in vLLM 0.32's V1 engine (issue 7). Installed by the ``lk_general`` plugin.

vLLM 0.32 accepts ``"method": "mlp_speculator"`` in ``SpeculativeConfig`` (and infers it from a drafter whose
``model_type`` is ``mlp_speculator``), but its V1 engine cannot run it: the architecture's registry entry is
commented out, ``GPUModelRunner.__init__`` raises "Unknown speculative decoding method" and
``propose_draft_token_ids`` has no branch for it. vLLM has no proposer plugin point, so lk-vllm adds three
things, in every vLLM process, through the general plugin (serving/README.md, "MLP speculator in vLLM V1"),
and one check:

1. **Model registration** (a supported extension point): ``MLPSpeculatorPreTrainedModel`` ->
   ``lk_vllm.plugin.engine.mlp_model:MLPSpeculatorModel``, vLLM's own ``MLPSpeculator`` layers and weight loader plus
   the proposal loop.
2. **Runner construction** (a patch of ``GPUModelRunner.__init__``, which the CPU runner inherits): for
   ``mlp_speculator`` the runner is built as for ``medusa`` (the method with the same runner needs: no draft
   KV cache, no draft forward in profiling, drafting after the CPU bookkeeping from the target's last hidden
   state; vLLM disables async scheduling for both), then ``MLPSpeculatorProposer`` replaces the Medusa one.
3. **Proposal** (a patch of ``GPUModelRunner.propose_draft_token_ids``): for ``mlp_speculator`` the drafts
   come from ``MLPSpeculatorProposer.propose``; every other method runs vLLM's code unchanged.
4. **Fit check** (a patch of ``SpeculativeConfig.verify_equal_vocab_size_if_draft_model``, vLLM's check that a
   drafter fits its target, run when the engine config is built): an MLP speculator whose hidden size,
   vocabulary or number of stages does not fit is refused there, in the front-end process, before any engine
   process starts, with the mismatch named.

The scheduler counts drafts and accepted tokens per position for every method alike, so the usual counters
(``vllm:spec_decode_num_accepted_tokens_per_pos`` and the rest) report the MLP speculator as they report
EAGLE or Medusa. The patches check the vLLM version and the signatures they wrap, and installing them twice
is a no-op. Drop this module once vLLM serves ``mlp_speculator`` in V1 itself.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from lk_vllm.engine import check_vllm_version
from lk_vllm.plugin import patching
from lk_vllm.plugin.patching import is_patched

METHOD = "mlp_speculator"
ARCHITECTURE = "MLPSpeculatorPreTrainedModel"
MODEL_CLASS = "lk_vllm.plugin.engine.mlp_model:MLPSpeculatorModel"
# The parameters of GPUModelRunner.propose_draft_token_ids in vLLM 0.32.0 (checked before patching).
PROPOSE_PARAMETERS = (
    "self",
    "scheduler_output",
    "sampled_token_ids",
    "sampling_metadata",
    "hidden_states",
    "sample_hidden_states",
    "aux_hidden_states",
    "spec_decode_metadata",
    "common_attn_metadata",
    "slot_mappings",
)


# ------------------------------------------------------------------------------------------ checks
def mlp_speculator_mismatches(
    drafter: dict[str, Any],
    target_hidden_size: int | None,
    target_vocab_size: int | None,
    num_speculative_tokens: int | None = None,
) -> list[str]:
    """What makes an MLP-speculator config (``config.json`` as a dict) unusable with a target; empty if nothing.

    Stage 0 reads the target's last hidden state (``emb_dim`` wide) and every stage embeds and predicts target
    token ids (``vocab_size``); one stage proposes one token (``n_predict`` >= K).
    """
    problems = []
    emb_dim, vocab_size, n_predict = (
        drafter.get("emb_dim"),
        drafter.get("vocab_size"),
        drafter.get("n_predict"),
    )
    if target_hidden_size and emb_dim and int(emb_dim) != int(target_hidden_size):
        problems.append(
            f"it reads target hidden states of size {emb_dim} (emb_dim), "
            f"but the target's hidden size is {target_hidden_size}"
        )
    if target_vocab_size and vocab_size and int(vocab_size) != int(target_vocab_size):
        problems.append(
            f"its vocabulary has {vocab_size} tokens (vocab_size), but the target's has {target_vocab_size}"
        )
    if num_speculative_tokens and n_predict and int(num_speculative_tokens) > int(n_predict):
        problems.append(
            f"it has {n_predict} stages (n_predict), fewer than num_speculative_tokens "
            f"{num_speculative_tokens}"
        )
    return problems


def check_fits_target(speculative_config, target_model_config) -> None:
    """Refuse an MLP speculator that does not fit the target, naming the mismatch (ValueError). Runs where vLLM
    checks that a drafter fits its target, when the engine config is built, before any engine process starts
    (lk-vllm's launcher checks the same earlier, from the files)."""
    draft = speculative_config.draft_model_config
    problems = mlp_speculator_mismatches(
        draft.hf_config.to_dict(),
        target_model_config.get_hidden_size(),
        target_model_config.get_vocab_size(),
        speculative_config.num_speculative_tokens,
    )
    if problems:
        raise ValueError(
            f"MLP speculator {draft.model} does not fit the target {target_model_config.model}: "
            + "; ".join(problems)
        )


# ------------------------------------------------------------------------------------------ proposer
def last_accepted_rows(
    sampled_token_ids: list[list[int]], num_draft_tokens: list[int] | None
) -> tuple[list[int], list[int]]:
    """For each request, the row of the runner's ``sample_hidden_states`` whose logits produced the request's
    last sampled token, and that token: what stage 0 of the MLP speculator reads.

    ``sample_hidden_states`` holds ``num_draft_tokens[i] + 1`` rows per request (one per verified position),
    or one row per request when nothing was verified (``num_draft_tokens`` None). A request that sampled
    nothing (a partial prefill chunk, a discarded request) gets its first row and token 0: the scheduler
    ignores drafts for it.
    """
    rows, tokens = [], []
    offset = 0
    for index, sampled in enumerate(sampled_token_ids):
        rows.append(offset + len(sampled) - 1 if sampled else offset)
        tokens.append(sampled[-1] if sampled else 0)
        offset += 1 if num_draft_tokens is None else num_draft_tokens[index] + 1
    return rows, tokens


class MLPSpeculatorProposer:
    """The V1 proposer for ``mlp_speculator``: K tokens per request per step, in a chain.

    Drafts are greedy (argmax), or with ``draft_sample_method: probabilistic`` (and standard rejection sampling)
    sampled from each stage's distribution at the request's temperature, exactly as vLLM's EAGLE proposer samples
    them (``compute_probs_and_sample_next_token``); the distributions go to the rejection sampler, so the
    acceptance rate is the alpha the LK losses train.
    """

    def __init__(self, vllm_config, device):
        self.vllm_config = vllm_config
        self.speculative_config = vllm_config.speculative_config
        self.device = device
        self.num_speculative_tokens = self.speculative_config.num_speculative_tokens
        self.probabilistic = (
            self.speculative_config.rejection_sample_method == "standard"
            and self.speculative_config.draft_sample_method == "probabilistic"
        )
        self.model = None

    def load_model(self, target_model) -> None:
        """Load the drafter with vLLM's loader (the target is not needed: the MLP speculator has its own
        embeddings and heads)."""
        from vllm.compilation.backends import set_model_tag
        from vllm.model_executor.model_loader import get_model

        with set_model_tag("mlp_speculator"):
            self.model = get_model(
                vllm_config=self.vllm_config, model_config=self.speculative_config.draft_model_config
            )

    def propose(
        self,
        num_speculative_tokens: int,
        sampled_token_ids: list[list[int]],
        sample_hidden_states,
        spec_decode_metadata,
        sampling_metadata,
    ):
        """Drafts [num_requests, K] from this step's target hidden states, and their distributions
        [num_requests, K, vocab] when they were sampled (else None)."""
        import torch
        from vllm.utils.torch_utils import async_tensor_h2d
        from vllm.v1.spec_decode.llm_base_proposer import compute_probs_and_sample_next_token

        if sample_hidden_states.shape[0] == len(sampled_token_ids):
            num_draft_tokens = None  # one row per request: nothing was verified in this step
        else:
            assert spec_decode_metadata is not None, "no speculative-decoding metadata for verified drafts"
            num_draft_tokens = spec_decode_metadata.num_draft_tokens
        rows, tokens = last_accepted_rows(sampled_token_ids, num_draft_tokens)
        rows_tensor = async_tensor_h2d(rows, dtype=torch.long, device=self.device)
        tokens_tensor = async_tensor_h2d(tokens, dtype=torch.long, device=self.device)
        sample = None
        if self.probabilistic and not sampling_metadata.all_greedy:

            def sample(logits):
                return compute_probs_and_sample_next_token(logits, sampling_metadata)

        return self.model.propose(
            sample_hidden_states[rows_tensor], tokens_tensor, num_speculative_tokens, sample
        )

    def _create_draft_vllm_config(self):
        """The config the drafter is built with (the name of vLLM's proposer hook, which lk-vllm's in-place
        drafter reload calls): the engine's own; the model reads the draft config from it."""
        return self.vllm_config

    def dummy_run(self, num_tokens: int, **kwargs) -> None:
        """Nothing to warm up: the drafter has no KV cache and no compiled graph."""


# ------------------------------------------------------------------------------------------ the patches
def _construct_runner(original):
    @functools.wraps(original)
    def __init__(self, vllm_config, *args, **kwargs):
        speculative_config = vllm_config.speculative_config
        if speculative_config is None or speculative_config.method != METHOD:
            return original(self, vllm_config, *args, **kwargs)
        check_fits_target(speculative_config, vllm_config.model_config)  # again, for configs built elsewhere
        # vLLM 0.32 raises for mlp_speculator; build the runner as for Medusa (see the module docstring).
        speculative_config.method = "medusa"
        try:
            original(self, vllm_config, *args, **kwargs)
        finally:
            speculative_config.method = METHOD
        if hasattr(self, "drafter"):  # only the last pipeline-parallel rank drafts
            self.drafter = MLPSpeculatorProposer(vllm_config, self.device)

    return __init__


def _propose_draft_token_ids(original):
    @functools.wraps(original)
    def propose_draft_token_ids(
        self,
        scheduler_output,
        sampled_token_ids,
        sampling_metadata,
        hidden_states,
        sample_hidden_states,
        aux_hidden_states,
        spec_decode_metadata,
        common_attn_metadata,
        slot_mappings,
    ):
        if self.speculative_config.method != METHOD:
            return original(
                self,
                scheduler_output,
                sampled_token_ids,
                sampling_metadata,
                hidden_states,
                sample_hidden_states,
                aux_hidden_states,
                spec_decode_metadata,
                common_attn_metadata,
                slot_mappings,
            )
        drafts, probs = self.drafter.propose(
            scheduler_output.num_spec_tokens_to_schedule,
            sampled_token_ids,
            sample_hidden_states,
            spec_decode_metadata,
            sampling_metadata,
        )
        # Where vLLM's runner keeps sampled drafts' distributions for the next verification (as for EAGLE);
        # None: greedy drafts, which the rejection sampler treats as one-hot.
        self._draft_probs = probs
        self._draft_prob_req_ids = None if probs is None else self.input_batch.req_ids.copy()
        return drafts

    return propose_draft_token_ids


def _verify_draft_fits_target(original):
    @functools.wraps(original)
    def verify_equal_vocab_size_if_draft_model(self):
        original(self)
        if (
            self.method == METHOD
            and self.target_model_config is not None
            and self.draft_model_config is not None
        ):
            check_fits_target(self, self.target_model_config)

    return verify_equal_vocab_size_if_draft_model


def _patch_points():
    """(class, method name, wrapper factory, the parameters it was written for) for every method wrapped."""
    from vllm.config import SpeculativeConfig
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    return (
        (SpeculativeConfig, "verify_equal_vocab_size_if_draft_model", _verify_draft_fits_target, ("self",)),
        (GPUModelRunner, "__init__", _construct_runner, ("self", "vllm_config", "device")),
        (GPUModelRunner, "propose_draft_token_ids", _propose_draft_token_ids, PROPOSE_PARAMETERS),
    )


def install() -> None:
    """Register the model and wrap the methods above (idempotent). Raises RuntimeError on another vLLM."""
    from vllm.model_executor.models import ModelRegistry

    check_vllm_version()
    ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
    for cls, name, make, parameters in _patch_points():
        patching.wrap(cls, name, make, parameters=parameters, why="vLLM V1 serves mlp_speculator drafters")


def installed() -> bool:
    """True when this process's vLLM carries every wrapper."""
    return all(is_patched(inspect.getattr_static(cls, name)) for cls, name, _, _ in _patch_points())
