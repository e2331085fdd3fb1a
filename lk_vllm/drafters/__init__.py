"""Drafter architectures and their vLLM-native checkpoints.

Architectures (registry name -> class, vLLM ``method``):

| name             | class                  | reads from the target                        | vLLM 0.32 method |
|------------------|------------------------|----------------------------------------------|------------------|
| ``eagle3``         | ``Eagle3Drafter``        | 3 aux hidden states + token embeddings       | ``eagle3``         |
| ``medusa``         | ``MedusaDrafter``        | last hidden state (after the final norm)     | ``medusa``         |
| ``mlp_speculator`` | ``MLPSpeculatorDrafter`` | last hidden state + sampled tokens           | ``mlp_speculator`` (plugin) |
| ``draft_model``    | ``DraftLM``              | nothing (an independent small causal LM)      | ``draft_model``    |

API for the trainer (training/train.py) and the evaluator::

    from lk_vllm.target_model import TargetModel
    from lk_vllm.drafters import create_drafter, load_drafter, target_info, speculative_config_for, multi_step_loss

    target = TargetModel(path)                                   # fp32, frozen
    drafter = create_drafter("eagle3", target, draft_to_target=d2t_ids)   # or load_drafter(dir, target)
    states = target(input_ids, attention_mask, aux_layer_ids=drafter.aux_layer_ids_needed())
    steps = drafter.training_steps(states, num_steps=K)           # list[StepOutput], one per unrolled step
    out = multi_step_loss(steps, states, kind="lambda", eta=3.0, gamma=0.8,
                          draft_to_target=drafter.draft_to_target,
                          loss_mask=response_mask)                # {"loss", "alpha" per step, ...}
    out["loss"].backward(); optimizer.step()
    drafter.save_pretrained(dir, target=target_info(target), training={...})   # atomic, validated
    speculative_config_for(dir, k=3)                              # the dict for EngineSettings

``StepOutput`` (see base.py): ``hidden`` [B, T, Hd] and ``head`` (-> draft logits over the draft vocabulary),
``target_shift`` and ``mask`` [B, T]. The draft distribution at anchor ``t`` is trained against the target
distribution at position ``t + target_shift``; ``step.pairs(states, loss_mask)`` returns the
(draft logits [N, Vd], target logits [N, V]) rows for ``lk_vllm.losses.lk_loss``. ``loss_mask`` [B, T] marks
the tokens to be predicted (response tokens); the step at anchor ``t`` predicts token ``t + target_shift + 1``.

What "step k" means per architecture (anchor ``t`` = the position whose target logits produced the token the
drafter starts from, vLLM's convention):

* EAGLE-3: K steps of the training-time test; step k predicts token ``t + 2 + k`` (``target_shift = k + 1``).
* Medusa / MLP speculator: head / stage k predicts token ``t + 2 + k`` (``target_shift = k + 1``).
* Draft LM: one step only, plain next-token distillation (``target_shift = 0``): teacher-forced, every
  drafting step of a causal LM is the same distribution, so K copies would only repeat the loss.

Checkpoints (``save_pretrained``: validated first, written to a temporary sibling directory, then renamed):

* EAGLE-3: a plain EAGLE-3 config (``architectures: ["LlamaForCausalLMEagle3"]``, the aux layer ids both
  top-level and in ``eagle_config``: vLLM's V2 model runner reads only the former) by default, or
  ``export_format="speculators"``. Both load into vLLM's built-in ``Eagle3LlamaForCausalLM``; the plain one is the default because a speculators checkpoint served on its
  own makes vLLM take the TARGET from ``verifier.name_or_path`` (a training-time path). Third-party
  speculators-format EAGLE-3 heads load with ``load_drafter`` too. Embeddings are not written (vLLM shares
  the target's); ``d2t`` is vLLM's offset form (target id = draft id + d2t[draft id]), ``t2d`` a bool mask.
* Medusa: ``model_type: medusa`` with one shared LM head (``original_lm_head``) and ``token_map`` when the
  vocabulary is truncated. MLP speculator: vLLM's ``mlp_speculator`` format. Draft LM: a plain HF Llama.

``draft_to_target`` is a LongTensor [Vd] (None: the draft vocabulary is the target's). ``lk_training.json``
records the target (path, fingerprint, sizes) and whatever the trainer passes as ``training=`` (loss kind,
eta, steps, data, expected acceptance length per position on held-out data, ...).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lk_vllm.drafters.base import (
    CPU_ATTENTION_HEAD_SIZES,
    Drafter,
    StepOutput,
    check_drafter_matches_target,
    read_drafter_files,
    read_json_object,
    target_info,
    target_mismatch,
)
from lk_vllm.errors import UserError, require_at_least
from lk_vllm.losses import lk_loss_multi

ARCHITECTURES = ("eagle3", "medusa", "mlp_speculator", "draft_model")
SUPPORTED_FORMATS = (
    "EAGLE-3 (plain config with architectures LlamaForCausalLMEagle3/Eagle3LlamaForCausalLM, "
    "or speculators format with speculators_model_type eagle3)",
    "Medusa (model_type medusa)",
    "MLP speculator (model_type mlp_speculator)",
    "draft LM (a Llama-family *ForCausalLM checkpoint)",
)

__all__ = [
    "ARCHITECTURES",
    "CPU_ATTENTION_HEAD_SIZES",
    "Drafter",
    "StepOutput",
    "create_drafter",
    "detect_architecture",
    "drafter_class",
    "load_drafter",
    "multi_step_loss",
    "speculative_config_for",
    "target_info",
]


def drafter_class(architecture: str) -> type[Drafter]:
    if architecture == "eagle3":
        from lk_vllm.drafters.eagle3 import Eagle3Drafter

        return Eagle3Drafter
    if architecture == "medusa":
        from lk_vllm.drafters.medusa import MedusaDrafter

        return MedusaDrafter
    if architecture == "mlp_speculator":
        from lk_vllm.drafters.mlp_speculator import MLPSpeculatorDrafter

        return MLPSpeculatorDrafter
    if architecture == "draft_model":
        from lk_vllm.drafters.draft_model import DraftLM

        return DraftLM
    raise UserError(
        f"unknown drafter architecture {architecture!r}; expected one of {', '.join(ARCHITECTURES)}"
    )


def create_drafter(architecture: str, target, **options) -> Drafter:
    """A fresh drafter for ``target`` (a ``lk_vllm.target_model.TargetModel``), initialised from it where that helps."""
    return drafter_class(architecture).from_target(target, **options)


def detect_architecture(config: dict, where: str = "drafter") -> str:
    """Which architecture a drafter config.json describes (ours or a third party's)."""
    architectures = [str(a) for a in (config.get("architectures") or [])]
    model_type = config.get("model_type")
    if "speculators_config" in config or config.get("speculators_model_type"):
        if config.get("speculators_model_type") == "eagle3":
            return "eagle3"
        raise UserError(
            f"{where}: speculators model type {config.get('speculators_model_type')!r} is not supported; "
            f"supported formats: {'; '.join(SUPPORTED_FORMATS)}"
        )
    if any("eagle3" in a.lower() for a in architectures):
        return "eagle3"
    if model_type == "medusa" or "MedusaModel" in architectures:
        return "medusa"
    if model_type == "mlp_speculator" or any("MLPSpeculator" in a for a in architectures):
        return "mlp_speculator"
    if any(a.endswith("ForCausalLM") and "eagle" not in a.lower() for a in architectures):
        return "draft_model"
    raise UserError(
        f"{where}: unknown drafter format (architectures={architectures}, model_type={model_type!r}); "
        f"supported formats: {'; '.join(SUPPORTED_FORMATS)}"
    )


def load_drafter(directory: str | os.PathLike, target=None) -> Drafter:
    """Load any supported drafter directory; with ``target`` (a TargetModel) also check it was made for that
    target (vocabulary size, hidden size, fingerprint in lk_training.json) and attach the target's embeddings.
    Every problem is a one-line UserError raised before any engine starts."""
    path = Path(directory).expanduser()
    if not path.is_dir():
        raise UserError(f"drafter {path} is not a directory")
    architecture = detect_architecture(read_drafter_files(path).config, f"drafter {path}")
    drafter = drafter_class(architecture).from_pretrained(path, target=None)
    if target is not None:
        check_drafter_matches_target(path, drafter, target)
        attach = getattr(drafter, "attach_target", None)
        if attach is not None:
            attach(target)
    return drafter


def speculative_config_for(
    directory: str | os.PathLike, num_speculative_tokens: int, **options
) -> dict[str, Any]:
    """The ``speculative_config`` for ``lk_vllm.engine.EngineSettings`` that serves this drafter directory.
    ``options`` are further vLLM speculative-config keys (e.g. ``draft_sample_method="probabilistic"``)."""
    path = Path(directory).expanduser().resolve()
    config = read_drafter_files(path).config
    architecture = detect_architecture(config, f"drafter {path}")
    cls = drafter_class(architecture)
    if not cls.servable:
        raise UserError(f"drafter {path}: vLLM 0.32 cannot serve the {architecture} architecture")
    require_at_least("num_speculative_tokens", num_speculative_tokens)
    if architecture == "medusa":
        from lk_vllm.drafters.medusa import check_medusa_tokens

        check_medusa_tokens(num_speculative_tokens, int(config.get("num_heads") or 0), str(path))
    if (
        architecture == "mlp_speculator"
    ):  # served through lk-vllm's plugin (lk_vllm.plugin.engine.mlp_proposer)
        from lk_vllm.plugin.engine.mlp_proposer import mlp_speculator_mismatches

        problems = mlp_speculator_mismatches(config, None, None, num_speculative_tokens)
        if problems:
            raise UserError(f"drafter {path}: {'; '.join(problems)}")
    return {
        "method": cls.vllm_method,
        "model": str(path),
        "num_speculative_tokens": int(num_speculative_tokens),
        **options,
    }


# Speculative methods whose drafter is a model with its own distribution q (the others, ngram and suffix,
# propose tokens).
MODEL_METHODS = ("eagle", "eagle3", "draft_model", "medusa", "mtp", "dflash", "mlp_speculator")
# Those lk-vllm drafts by sampling from q (serving/README.md, "Faithful sampling"); the other model methods keep
# vLLM's greedy drafting. MLP: lk_vllm.plugin.engine.mlp_proposer.
PROBABILISTIC_METHODS = ("eagle", "eagle3", "draft_model", "mlp_speculator")


def with_faithful_sampling(config: dict[str, Any]) -> dict[str, Any]:
    """Standard rejection sampling always; probabilistic drafts for drafters that are models (user keys win)."""
    config = dict(config)
    config.setdefault("rejection_sample_method", "standard")
    if config.get("method") in PROBABILISTIC_METHODS:
        config.setdefault("draft_sample_method", "probabilistic")
    if config["rejection_sample_method"] == "synthetic":
        raise UserError(
            "--speculative-config: rejection_sample_method 'synthetic' does not preserve the target's "
            "distribution; lk-vllm serve uses 'standard'"
        )
    return config


def check_drafter_for_target(drafter: Path, target: str) -> None:
    """One-line error if the drafter directory records (or implies) another target."""
    files = read_drafter_files(drafter)
    record, drafter_config = files.record, files.config
    target_config = read_json_object(Path(target) / "config.json", "target") or {}  # an HF id has none here
    if drafter_config.get("model_type") == "mlp_speculator":  # before the fingerprint: names the mismatch
        from lk_vllm.plugin.engine.mlp_proposer import mlp_speculator_mismatches

        problems = mlp_speculator_mismatches(
            drafter_config, target_config.get("hidden_size"), target_config.get("vocab_size")
        )
        if problems:
            raise UserError(
                f"--drafter {drafter}: this MLP speculator does not fit the target {target}: "
                + "; ".join(problems)
            )
    mismatch = target_mismatch(record, target)
    if mismatch:
        recorded, actual = mismatch
        where = record.target_path or "?"
        raise UserError(
            f"--drafter {drafter}: trained for target fingerprint {recorded} ({where}), "
            f"but the target {target} has {actual}"
        )
    vocab = target_config.get("vocab_size")
    drafter_vocab = drafter_config.get("vocab_size") or (
        drafter_config.get("transformer_layer_config") or {}
    ).get("vocab_size")
    if vocab and drafter_vocab and vocab != drafter_vocab:
        raise UserError(
            f"--drafter {drafter}: made for a vocabulary of {drafter_vocab} tokens, "
            f"but the target {target} has {vocab}"
        )


def multi_step_loss(
    steps,
    states,
    *,
    kind: str = "kl",
    eta: float = 3.0,
    draft_to_target=None,
    loss_mask=None,
    gamma: float = 1.0,
    chunk_size: int | None = None,
    **loss_options,
):
    """``lk_vllm.losses.lk_loss_multi`` over a drafter's unrolled steps: ``sum_k gamma**k * L_k``, each step with
    its own lambda from its own mean alpha. ``loss_mask`` [B, T] marks the tokens to predict; ``gamma``
    defaults to 1 (the paper uses 0.8); ``loss_options`` go to ``lk_loss_multi`` (e.g. ``distributed``).

    Returns a dict: ``loss`` (tensor), ``alpha``, ``lam`` (lists, one per step), ``count`` (valid positions
    per step) and ``results`` (the ``LKLossResult`` of each step).
    """
    positions = [step.valid_positions(loss_mask) for step in steps]
    drafts = [
        step.head(step.hidden[batch, anchor]) for step, (batch, anchor) in zip(steps, positions, strict=True)
    ]
    # States holding the batch's target logits once (``table`` and ``rows_at``, e.g. the trainer's
    # SharedTargetLogits) are read by index: the K steps never copy the rows they share. A table with
    # ``table_logsumexp`` holds only the draft ids' columns (the loss then needs no draft_to_target).
    rows, lse = None, None
    if hasattr(states, "rows_at"):
        rows = [
            states.rows_at(batch, anchor + step.target_shift)
            for step, (batch, anchor) in zip(steps, positions, strict=True)
        ]
    if rows is not None and all(r is not None for r in rows):
        targets = [states.table] * len(steps)
        if states.table_logsumexp is not None:
            lse, draft_to_target = [states.table_logsumexp] * len(steps), None
    else:
        rows = None
        targets = [
            states.logits_at(batch, anchor + step.target_shift)
            for step, (batch, anchor) in zip(steps, positions, strict=True)
        ]
    out = lk_loss_multi(
        drafts,
        targets,
        kind=kind,
        eta=eta,
        gamma=gamma,
        draft_to_target=draft_to_target,
        chunk_size=chunk_size,
        target_rows=rows,
        target_logsumexp=lse,
        **loss_options,
    )
    results = list(out.positions)
    return {
        "loss": out.loss,
        "alpha": [float(r.alpha) for r in results],
        "lam": [float(r.lam) for r in results],
        "count": [int(r.num_valid) for r in results],
        "results": results,
    }
