"""What lk-vllm needs of a target, checked from its config and tokenizer before any work starts.

``TargetShape.read`` reads the config only (no weights). ``check_target`` adds what would otherwise fail minutes
later: an architecture vLLM 0.32 has no model class for, an EAGLE-3 drafter for a target whose vLLM model does
not expose auxiliary hidden states, and chat-formatted data for a tokenizer without a chat template.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from functools import lru_cache

from lk_vllm.datasets import load_tokenizer
from lk_vllm.errors import UserError


@dataclasses.dataclass(frozen=True)
class TargetShape:
    """What the checks need of a target, from its config alone (its weights are never loaded here)."""

    path: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    dtype: str | None
    architectures: tuple[str, ...] = ()

    @classmethod
    def read(cls, target: str) -> TargetShape:
        from transformers import AutoConfig

        try:
            full = AutoConfig.from_pretrained(target)
        except Exception as exc:  # noqa: BLE001 - transformers raises many kinds for a config it cannot read
            raise UserError(
                f"target {target}: expected a model config transformers reads, found "
                f"{str(exc).splitlines()[0]}"
            ) from None
        config = full.get_text_config()
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        return cls(
            target,
            int(config.vocab_size),
            int(config.hidden_size),
            int(config.num_hidden_layers),
            str(dtype).removeprefix("torch.") if dtype else None,
            tuple(full.architectures or ()),
        )


@lru_cache(maxsize=32)
def vllm_support(architecture: str) -> tuple[bool, bool]:
    """(vLLM has a model class for ``architecture``, that class serves EAGLE-3 drafters)."""
    from vllm.model_executor.models import ModelRegistry
    from vllm.model_executor.models.interfaces import supports_eagle3

    model_class = ModelRegistry._try_load_model_cls(architecture)
    return model_class is not None, model_class is not None and bool(supports_eagle3(model_class))


def serving_problem(shape: TargetShape, drafter_architecture: str | None) -> str | None:
    """Why vLLM cannot serve a drafter of ``drafter_architecture`` for this target (None: it can)."""
    import vllm

    if not shape.architectures:
        return f"target {shape.path}: its config.json names no architectures, so vLLM cannot load it"
    name = shape.architectures[0]
    known, eagle3 = vllm_support(name)
    if not known:
        return f"vLLM {vllm.__version__} has no model class for {name} (target {shape.path})"
    # Medusa, MLP speculators and draft models run on any target vLLM has a model class for; EAGLE-3 also needs
    # the target's model to implement SupportsEagle3 (its auxiliary hidden states).
    if drafter_architecture == "eagle3" and not eagle3:
        return (
            f"vLLM {vllm.__version__} cannot serve EAGLE-3 for {name} (its model does not provide auxiliary "
            f"hidden states): train a medusa, mlp_speculator or draft_model drafter for target {shape.path} "
            "(--set model.architecture=medusa)"
        )
    return None


def has_chat_template(target: str) -> bool:
    return bool(getattr(load_tokenizer(target), "chat_template", None))


def check_target(
    target: str,
    drafter_architecture: str | None = None,
    needs_chat_template: bool = False,
    where: str = "--target",
) -> TargetShape:
    """Refuse, in one line naming the target and the way out, a target this work cannot succeed with."""
    shape = TargetShape.read(target)
    problem = serving_problem(shape, drafter_architecture)
    if problem:
        raise UserError(f"{where}: {problem}")
    if needs_chat_template and not has_chat_template(target):
        raise UserError(
            f"{where}: target {target} has no chat template (a base model?): pass --chat-template "
            "FILE|chatml, or --chat-template plain to use prompts as plain text"
        )
    return shape


__all__ = ["TargetShape", "check_target", "has_chat_template", "serving_problem", "vllm_support"]


# ------------------------------------------------------------------------------------------ the --target flag
class _DeprecatedPositionalTarget(argparse.Action):
    """``lk-vllm serve TARGET`` / ``calibrate TARGET``: the old spelling of ``--target``, still accepted."""

    def __call__(self, parser, namespace, values, option_string=None):
        if values is None:
            return
        if namespace.target is not None and namespace.target != values:
            parser.error(
                f"the target is given twice ({values} and --target {namespace.target}); give --target once"
            )
        print(f"lk-vllm: a positional TARGET is deprecated; use --target {values}", file=sys.stderr)
        namespace.target = values


def add_target_argument(
    parser: argparse.ArgumentParser, default: str = "the embedded default target", positional: bool = False
) -> None:
    """Every command's ``--target`` (``args.target``, None when not given). ``default`` says what the command
    takes then; ``positional`` also accepts the deprecated ``TARGET`` of ``serve`` and ``calibrate``."""
    parser.add_argument(
        "--target", default=None, help=f"target model directory or cached HF id (default: {default})"
    )
    if positional:
        parser.add_argument(
            "target_positional",
            nargs="?",
            default=None,
            metavar="TARGET",
            action=_DeprecatedPositionalTarget,
            help=argparse.SUPPRESS,
        )
