"""What the bench compares: the no-speculation baseline and each drafter, as vLLM speculative configs.

Every contender runs on the same target with the same engine settings; only ``speculative_config`` differs.
A drafter's config is exactly the one ``lk-vllm serve --drafter DIR`` serves (``speculative_config_for`` and
``lk_vllm.drafters.with_faithful_sampling``): standard rejection sampling, and drafts sampled from the
drafter's distribution for drafters that have one. At T=0 vLLM still drafts greedily (it does so whenever a
batch is all greedy), so one engine per drafter serves both temperatures. vLLM's Medusa proposer always
drafts its heads' argmax.

All checks run before any engine starts and fail with one line naming the flag or file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lk_vllm.drafters import load_drafter, speculative_config_for, with_faithful_sampling
from lk_vllm.drafters.base import BEST_EXPORT, FINAL_EXPORT, check_drafter_matches_target
from lk_vllm.errors import UserError, require_at_least


@dataclass(frozen=True)
class Contender:
    """One engine configuration: the baseline (no speculative config) or a drafter directory."""

    label: str
    architecture: str  # drafter registry name (eagle3, medusa, draft_model, ...) or "none"
    loss: str | None = None  # as lk_training.json records it (kl, tv, alpha, lambda); None if unknown
    path: str | None = None
    speculative_config: dict[str, Any] | None = None
    training: dict[str, Any] = field(default_factory=dict)  # lk_training.json "training" ({} if absent)

    @property
    def is_baseline(self) -> bool:
        return self.speculative_config is None

    def describe(self) -> dict[str, Any]:
        training = self.training
        return {
            "label": self.label,
            "path": self.path,
            "architecture": self.architecture,
            "loss": self.loss,
            "speculative_config": self.speculative_config,
            "training": {
                key: training.get(key)
                for key in ("loss", "eta", "gamma", "num_steps", "steps", "recipe")
                if key in training
            },
        }


BASELINE = Contender(label="baseline", architecture="none")


def drafter_contender(directory: str, label: str, target, num_speculative_tokens: int) -> Contender:
    """Check a drafter directory (format, weights, made for ``target``, servable with K tokens) and describe it.
    ``target`` is a ``lk_vllm.targets.TargetShape``."""
    path = Path(directory).expanduser().resolve()
    if not path.is_dir():
        raise UserError(f"--drafter {directory}: directory not found")
    drafter = load_drafter(path)  # config and weights readable, in a supported format
    check_drafter_matches_target(path, drafter, target)
    config = with_faithful_sampling(speculative_config_for(path, num_speculative_tokens))
    record = drafter.training_info
    return Contender(
        label=label,
        architecture=drafter.architecture,
        loss=record.loss,
        path=str(path),
        speculative_config=config,
        training=record.training,
    )


def config_contender(value: str, num_speculative_tokens: int, taken: list[str]) -> Contender:
    """A ``--speculative-config [LABEL=]JSON`` contender: any vLLM speculative config that needs no drafter
    directory (n-gram, suffix decoding, ...), so a results page shows what a user could run without training.
    Without ``num_speculative_tokens`` the config gets ``--num-speculative-tokens``; without a label it is named
    after the method and K (``ngram-k4``)."""
    label, text = None, value.strip()
    if not text.startswith("{") and "=" in text:
        label, text = (part.strip() for part in text.split("=", 1))
    where = f"--speculative-config {value!r}"
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where}: expected [LABEL=]JSON object, found invalid JSON ({exc.msg})") from None
    if not isinstance(config, dict) or not isinstance(config.get("method"), str):
        raise UserError(f'{where}: expected a JSON object with a "method" (e.g. {{"method": "ngram"}})')
    if "model" in config:
        raise UserError(f'{where}: a config with a "model" is a drafter; pass its directory with --drafter')
    config.setdefault("num_speculative_tokens", num_speculative_tokens)
    k = config["num_speculative_tokens"]
    require_at_least(f"{where}: num_speculative_tokens", k)
    label = label or f"{config['method']}-k{k}"
    if not label or label == BASELINE.label or label in taken:
        raise UserError(
            f"{where}: label {label!r} is {'taken' if label else 'empty'}; name it with LABEL=JSON"
        )
    return Contender(label=label, architecture=config["method"], speculative_config=config)


def drafter_labels(directories: list[str]) -> list[str]:
    """Short unique names: the shortest tail of each path that no other drafter shares (runs/kl/best and
    runs/lk/best become kl/best and lk/best), never the baseline's label, and never a trainer export's bare
    name (a single runs/lk/best is lk/best, not "best", which would not say which run it was)."""
    paths = [Path(d).expanduser().resolve() for d in directories]
    repeated = sorted({str(p) for p in paths if paths.count(p) > 1})
    if repeated:
        raise UserError(f"--drafter {repeated[0]} is given twice")
    labels = []
    for path in paths:
        parts = path.parts
        shortest = 2 if parts[-1] in (BEST_EXPORT, FINAL_EXPORT) and len(parts) > 1 else 1
        for length in range(shortest, len(parts) + 1):
            tail = parts[-length:]
            unique = sum(1 for other in paths if other.parts[-length:] == tail) == 1
            if unique and "/".join(tail) != BASELINE.label:
                break
        labels.append("/".join(tail))
    return labels
