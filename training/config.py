"""The typed training configuration. A YAML recipe in ``training/recipes/`` is exactly this structure.

Each field's ``description`` is its documentation: ``--set``'s help lists the fields, and the flags of ``train``
and ``prepare`` are generated from them (``add_field_flags``), so a default or a range is written once.

Sources, later ones win: the recipe (``--recipe NAME``) or a YAML file (``--config FILE``), then the common
flags (``--loss``, ``--eta``, ``--target``, ``--data``, ``--output``), then ``--set section.field=value``
(values parsed as YAML, so ``--set optimizer.betas=[0.9,0.99]`` works). Unknown fields are errors, so a typo
in a recipe cannot be silently ignored.

Paper defaults (arXiv 2602.23881 §5.3): K = 6 draft positions weighted gamma^k with gamma = 0.8, AdamW with
betas (0.9, 0.95), lr 4e-4 with a cosine schedule after 100 warm-up steps, gradient clipping at 0.5, eta = 3
(10 for Medusa).
"""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lk_vllm.datasets import CHAT_TEMPLATE_HELP
from lk_vllm.errors import UserError
from lk_vllm.losses import KINDS as LOSS_KINDS

RECIPES_DIR = Path(__file__).parent / "recipes"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# The architectures whose draft head can cover a subset of the target's vocabulary (model.draft_vocab_size).
DRAFT_VOCAB_ARCHITECTURES = ("eagle3", "medusa")


# Each architecture's construction options (``model.options``), typed: the keyword arguments of its
# ``from_target`` (lk_vllm/drafters), with the same defaults (a test compares them). None for Medusa's heads and
# the MLP speculator's stages means one per draft position (loss.num_steps).
class Eagle3Options(_Section):
    aux_layer_ids: list[int] | None = None  # target layers the drafter reads; None: vLLM's (2, L/2, L-3)
    intermediate_size: int | None = Field(default=None, ge=1)  # the layer's MLP width; None: the target's
    norm_before_residual: bool = False


class MedusaOptions(_Section):
    num_heads: int | None = Field(default=None, ge=1)
    num_layers: int = Field(default=1, ge=1)  # residual blocks per head
    shared_lm_head: bool = True  # every head reads the target's lm_head (frozen unless train_lm_head)
    train_lm_head: bool = False
    fc_bias: bool = False


class MLPSpeculatorOptions(_Section):
    n_predict: int | None = Field(default=None, ge=1)
    inner_dim: int = Field(default=0, ge=0)  # 0: the target's hidden size
    tie_weights: bool = False  # one embedding, projection and head shared by every stage
    scale_input: bool = True
    init_heads_from_target: bool = True


class DraftModelOptions(_Section):
    num_layers: int = Field(default=2, ge=1)  # decoder layers of the draft LM
    copy_layers: bool = True  # start from the target's first layers
    train_embeddings: bool = False


ARCHITECTURE_OPTIONS = {
    "eagle3": Eagle3Options,
    "medusa": MedusaOptions,
    "mlp_speculator": MLPSpeculatorOptions,
    "draft_model": DraftModelOptions,
}


class ModelSection(_Section):
    architecture: Literal["eagle3", "medusa", "mlp_speculator", "draft_model"] = Field(
        default="eagle3", description="the drafter's architecture"
    )
    target: str | None = Field(
        default=None,
        description="target model directory or cached HF id; None: the embedded SmolLM2-135M-Instruct",
    )
    draft_vocab_size: Annotated[int, Field(ge=1)] | Literal["auto"] | None = Field(
        default="auto",
        description="truncated draft vocabulary (the training data's most frequent tokens); None: the target's "
        "vocabulary; auto: all of it up to 65,536 ids, else the smallest of 8k/16k/32k/64k ids covering "
        "98% of the training responses' tokens",
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="the architecture's options (ARCHITECTURE_OPTIONS, e.g. aux_layer_ids for EAGLE-3)",
    )
    init_from: str | None = Field(
        default=None,
        description="an exported drafter to start from, e.g. to fine-tune it on new data (keeps its architecture, "
        "shape and draft vocabulary; draft_vocab_size and options do not apply)",
    )


class DataSection(_Section):
    """What the target regenerates (``lk-vllm prepare`` takes its flags from here too) and what training reads."""

    dirs: list[str] = Field(
        default_factory=list,
        description="finished `lk-vllm prepare` directories; empty: prepare `datasets` first (cached by settings)",
    )
    datasets: list[str] = Field(
        default_factory=lambda: ["sharegpt"],
        description="dataset names (sharegpt, gsm8k, ...) or .jsonl files",
    )
    limit: int | None = Field(default=None, ge=1, description="first N prompts of each dataset; None: all")
    temperature: float = Field(
        default=0.7, ge=0, description="sampling temperature of the regenerated responses"
    )
    top_p: float = Field(
        default=0.95, gt=0, le=1, description="nucleus sampling of the regenerated responses"
    )
    max_tokens: int = Field(default=512, ge=1, description="generated tokens per response")
    max_length: int = Field(
        default=1024, ge=8, description="prompt + response tokens per sample (longer samples are truncated)"
    )
    seed: int = Field(default=0, description="seed of generated datasets and of sampling")
    chat_template: str | None = Field(
        default=None, description=CHAT_TEMPLATE_HELP, json_schema_extra={"metavar": "FILE|NAME"}
    )
    heldout: int = Field(
        default=64, ge=0, description="samples held out for evaluation (chosen by prompt-id hash)"
    )
    eval_datasets: list[str] = Field(
        default_factory=list,
        description="eval-split datasets (mtbench, humaneval, gsm8k, ...) the target answers at T=0 and at T=1 "
        "(top-p 1; max_tokens, max_length and seed as above), first eval_limit prompts each: prepared once "
        "(cached by settings) and evaluated like eval_dirs",
    )
    eval_limit: int = Field(default=40, ge=1, description="prompts per dataset of eval_datasets")
    eval_dirs: list[str] = Field(
        default_factory=list,
        description="finished `lk-vllm prepare` outputs evaluated at every evaluation and never trained on, "
        "e.g. `prepare --split eval` of prompts like the served ones at the served temperature: "
        "`lk-vllm bench` predicts served acceptance from those whose temperature matches",
    )


class LossSection(_Section):
    kind: Literal[LOSS_KINDS] = Field(default="lambda", description="loss kind")
    eta: float = Field(default=3.0, gt=0, description="LK^lambda's decay eta")
    gamma: float = Field(default=0.8, gt=0, le=1)
    num_steps: int = Field(default=6, ge=1)  # K draft positions / TTT unroll steps
    # Rows per chunk of the fused loss; None: ~2M vocabulary elements on CPU, sized from free memory on GPU.
    chunk_size: int | None = Field(default=None, ge=1)


class OptimizerSection(_Section):
    lr: float = Field(default=4e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(default=1e-8, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=100, ge=0)
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1)  # cosine decays to lr * min_lr_ratio
    grad_clip: float = Field(default=0.5, gt=0)


class TrainingSection(_Section):
    batch_size: int = Field(default=64, ge=1)  # sequences per optimizer step, over all ranks
    # Split each step into this many micro-batches (memory): gradients are averaged over them, so a
    # micro-batch's mean counts equally whatever its token count, and LK^lambda's lambda is per micro-batch.
    grad_accumulation: int = Field(default=1, ge=1)
    max_steps: int = Field(default=1000, ge=1)
    eval_every: int = Field(default=100, ge=1)
    checkpoint_every: int = Field(default=100, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)
    log_every: int = Field(default=1, ge=1)
    seed: int = 0
    capture: Literal["online", "offline"] = "online"
    cache_dtype: Literal["float16", "bfloat16", "float32"] = "bfloat16"  # offline hidden-state cache
    # dtype of the exported drafter's weights (training keeps fp32 master weights; vLLM casts to its dtype)
    export_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when a GPU is visible (training/device.py)
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    tf32: bool = True  # TF32 matmuls for what stays fp32 on GPU
    # How long a rank waits in a collective while rank 0 works alone (data preparation, evaluation, checkpoints)
    # before the process group gives up; NCCL's own default (10 minutes) is shorter than a data preparation.
    collective_timeout_minutes: float = Field(default=180.0, gt=0)
    # Under torchrun: ddp replicates the drafter and its optimizer state on every rank; fsdp (FSDP2) shards both
    # over the ranks between steps (for drafters whose AdamW state does not fit one device next to the target).
    parallel: Literal["ddp", "fsdp"] = "ddp"
    # fsdp only: shard the target's decoder layers over the ranks too (a target that does not fit one device);
    # every rank still runs the whole target on its own batch, gathering one layer at a time.
    shard_target: bool = False
    eval_batch_size: int = Field(default=8, ge=1)


class Config(_Section):
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    loss: LossSection = Field(default_factory=LossSection)
    optimizer: OptimizerSection = Field(default_factory=OptimizerSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    output: str | None = Field(
        default=None, description="run directory; None: $LK_VLLM_HOME/runs/<recipe or config name>"
    )

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if self.model.architecture == "draft_model" and isinstance(self.model.draft_vocab_size, int):
            raise ValueError(
                "model.draft_vocab_size: a draft_model shares the target's vocabulary; leave it unset"
            )
        try:
            ARCHITECTURE_OPTIONS[self.model.architecture].model_validate(self.model.options)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ValueError(
                f"model.options for {self.model.architecture}: {problems} (it takes "
                f"{', '.join(ARCHITECTURE_OPTIONS[self.model.architecture].model_fields)})"
            ) from None
        if self.training.shard_target and self.training.parallel != "fsdp":
            raise ValueError(
                "training.shard_target shards the target with FSDP2: it needs training.parallel=fsdp"
            )
        if self.model.draft_vocab_size == "auto" and self.model.architecture not in DRAFT_VOCAB_ARCHITECTURES:
            self.model.draft_vocab_size = None  # the others have no draft vocabulary to choose
        return self


# Fields that may change between a run and its --resume: they do not change the weights.
RESUMABLE_CHANGES = {
    "output",
    "training.log_every",
    "training.eval_every",
    "training.checkpoint_every",
    "training.keep_checkpoints",
    "training.eval_batch_size",
    "training.capture",
    "training.cache_dtype",
    "training.export_dtype",
    "training.device",
    "training.tf32",
    "training.collective_timeout_minutes",
    "training.parallel",
    "training.shard_target",
}


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def _read_yaml(path: Path, what: str) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"{what} {path}: cannot read YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} {path}: expected a mapping of sections, found {type(data).__name__}")
    return data


def _validate(data: dict, source: str) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise UserError(f"{source}: {where}: {first['msg']} (found {first.get('input')!r})") from None


def set_path(data: dict, dotted: str, value: Any) -> None:
    """``data[a][b] = value`` for ``dotted = "a.b"``, creating sections as needed."""
    *parents, leaf = dotted.split(".")
    node = data
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise UserError(f"--set {dotted}: {key} is not a section")
    node[leaf] = value


def parse_override(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set expects SECTION.FIELD=VALUE, found {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(
    recipe: str | None = None, config_file: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> tuple[Config, str]:
    """The validated config and a name for it (recipe name or file stem)."""
    if recipe and config_file:
        raise UserError("give either --recipe or --config, not both")
    if recipe:
        path = RECIPES_DIR / f"{recipe}.yaml"
        if not path.is_file():
            raise UserError(f"--recipe {recipe}: no such recipe; available: {', '.join(recipe_names())}")
        data, name, source = _read_yaml(path, "recipe"), recipe, f"recipe {recipe}"
    elif config_file:
        path = Path(config_file).expanduser()
        if not path.is_file():
            raise UserError(f"--config {path}: file not found")
        data, name, source = _read_yaml(path, "--config"), path.stem, f"--config {path}"
    else:
        data, name, source = {}, "default", "defaults"
    for key, value in (overrides or {}).items():
        set_path(data, key, value)
    if overrides:
        source += " with overrides " + ", ".join(f"{k}={v!r}" for k, v in overrides.items())
    return _validate(data, source), name


def flatten(config: Config | dict, prefix: str = "") -> dict[str, Any]:
    """{"section.field": value} of every leaf."""
    data = config.model_dump(mode="json") if isinstance(config, Config) else config
    out = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key != "options":
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def differing_fields(saved: dict, current: Config) -> list[str]:
    """Fields (except RESUMABLE_CHANGES) whose values differ: 'field: saved -> current'."""
    before, after = flatten(saved), flatten(current)
    return [
        f"{key}: {before.get(key)!r} -> {after.get(key)!r}"
        for key in sorted(set(before) | set(after))
        if key not in RESUMABLE_CHANGES and before.get(key) != after.get(key)
    ]


# ------------------------------------------------------------------------------------------ command-line flags
def _field_info(root: type[BaseModel], dotted: str):
    model = root
    *sections, leaf = dotted.split(".")
    for name in sections:
        model = model.model_fields[name].annotation
    return model.model_fields[leaf]


def _flag_kind(annotation) -> dict[str, Any]:
    """argparse's type / choices / action for a field's annotation (``X | None`` as ``X``)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(members) == 1:
            annotation = members[0]
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return {"choices": list(typing.get_args(annotation))}
    if origin is list:
        return {"action": "append", "type": typing.get_args(annotation)[0]}
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if annotation in (int, float, str):
        return {"type": annotation}
    raise TypeError(f"no command-line flag for a field of type {annotation!r}")


def flag_dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def add_field_flags(
    parser,
    root: type[BaseModel],
    flags: dict[str, str],
    *,
    required: tuple[str, ...] = (),
    over_recipe: bool = False,
) -> None:
    """One flag per field (``flags``: dotted field -> flag) with the field's type, range, choices and description.
    A flag not given is None, so the field's default (or the recipe's value, ``over_recipe``) applies; a list
    field's flag is repeatable."""
    for dotted, flag in flags.items():
        info = _field_info(root, dotted)
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        where = dotted if over_recipe else f"default {info.get_default(call_default_factory=True)!r}"
        repeat = "; repeatable" if typing.get_origin(info.annotation) is list else ""
        parser.add_argument(
            flag,
            default=None,
            required=dotted in required,
            metavar=extra.get("metavar"),
            help=f"{info.description} ({where}{repeat})",
            **_flag_kind(info.annotation),
        )


def field_values(args, flags: dict[str, str]) -> dict[str, Any]:
    """{dotted field: value} of the flags given on the command line."""
    given = {dotted: getattr(args, flag_dest(flag), None) for dotted, flag in flags.items()}
    return {dotted: value for dotted, value in given.items() if value is not None}


def section_from_flags(args, section: type[_Section], flags: dict[str, str]):
    """``section`` built from its flags (field defaults for the rest); a bad value is a one-line error naming the
    flag."""
    try:
        return section.model_validate(field_values(args, flags))
    except ValidationError as exc:
        first = exc.errors()[0]
        flag = flags.get(str(first["loc"][0]), str(first["loc"][0])) if first["loc"] else "(flags)"
        raise UserError(f"{flag}: {first['msg']} (found {first.get('input')!r})") from None
