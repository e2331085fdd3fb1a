"""What is speculating: a readable description of a vLLM speculative config and of a drafter directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lk_vllm.drafters import MODEL_METHODS
from lk_vllm.drafters.base import CONFIG_FILE, read_drafter_files
from lk_vllm.plugin.server.live_stats import DrafterInfo


def sampling_modes(method: str, draft_sample_method: str, rejection_sample_method: str) -> dict[str, str]:
    """The draft and rejection sampling modes in force, with what they mean at T > 0."""
    if method not in MODEL_METHODS:
        draft = "deterministic (token proposals, treated as one-hot draft probabilities)"
    elif draft_sample_method == "probabilistic":
        draft = "probabilistic (drafts sampled from the drafter's distribution q)"
    else:
        draft = "greedy (drafter argmax, treated as one-hot draft probabilities)"
    rejection = {
        "standard": "standard (accept with min(1, p/q), resample from normalised max(0, p - q)): "
        "output distribution equals the target's at every temperature",
        "synthetic": "synthetic (NOT faithful: fixed acceptance rates for benchmarking only)",
        "block": "block verification",
    }.get(rejection_sample_method, rejection_sample_method)
    return {
        "draft_sample_method": draft_sample_method,
        "rejection_sample_method": rejection_sample_method,
        "draft": draft,
        "rejection": rejection,
        "temperature_zero": "greedy: the target's argmax, drafts accepted when they match it",
    }


def drafter_architecture(config: dict[str, Any], method: str) -> str:
    if "speculators_model_type" in config:
        return str(config["speculators_model_type"])
    architectures = config.get("architectures") or []
    if architectures:
        return str(architectures[0])
    if config.get("model_type"):
        return str(config["model_type"])
    return method


def describe_speculative_config(spec) -> DrafterInfo:
    """A DrafterInfo from vLLM's SpeculativeConfig (an object with the usual attributes)."""
    method = str(getattr(spec, "method", None) or "unknown")
    model = getattr(spec, "model", None)
    name = str(model) if model and method not in ("ngram", "suffix") else method
    files = read_drafter_files(model) if model and (Path(str(model)) / CONFIG_FILE).is_file() else None
    return DrafterInfo(
        name=name,
        method=method,
        architecture=drafter_architecture(files.config if files else {}, method),
        loss=files.record.loss if files else None,
        num_speculative_tokens=int(getattr(spec, "num_speculative_tokens", 0) or 0),
        sampling=sampling_modes(
            method,
            str(getattr(spec, "draft_sample_method", "greedy")),
            str(getattr(spec, "rejection_sample_method", "standard")),
        ),
    )
