"""What every drafter shares: the training-step contract, checkpoint validation, atomic export, target checks.

A drafter is an ``nn.Module`` subclass of ``Drafter``. For training it returns, for K unrolled steps, the
draft logits at every anchor position and where the matching target distribution is (``StepOutput``). For
serving it writes a directory vLLM loads with its built-in code (``save_pretrained``), plus
``lk_training.json`` describing how it was trained and for which target.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from lk_vllm.assets import target_fingerprint
from lk_vllm.atomic import atomic_dir
from lk_vllm.errors import UserError

# Head sizes vLLM's CPU attention backend (CPU_ATTN) supports; a drafter with attention must use one.
CPU_ATTENTION_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
TRAINING_FILE = "lk_training.json"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT_VERSION = 1
# The drafters a training run exports into its output directory: the step with the best held-out expected
# acceptance length, and the last step (validate and bench find a run's drafters by these names).
BEST_EXPORT = "best"
FINAL_EXPORT = "final"


@dataclasses.dataclass
class StepOutput:
    """One unrolled drafting step over a batch, at every anchor position.

    ``hidden`` [B, T, Hd] are the drafter's features; ``head`` maps [N, Hd] to draft logits [N, Vd].
    The draft distribution at anchor ``t`` is to match the target distribution at position
    ``t + target_shift`` (the target logits there predict token ``t + target_shift + 1``).
    ``mask`` [B, T] is True where both exist (inside the sequence, no padding).
    """

    hidden: torch.Tensor
    head: Callable[[torch.Tensor], torch.Tensor]
    target_shift: int
    mask: torch.Tensor

    def logits(self) -> torch.Tensor:
        """Draft logits [B, T, Vd] (for short sequences and tests)."""
        return self.head(self.hidden)

    def valid_positions(self, loss_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch index, anchor index) of the positions to train on.

        ``loss_mask`` [B, T] marks tokens that are training targets (e.g. response tokens); the step at anchor
        ``t`` predicts token ``t + target_shift + 1``, so that token's mask entry is used.
        """
        mask = self.mask
        if loss_mask is not None:
            shift = self.target_shift + 1
            shifted = torch.zeros_like(mask)
            if shift < mask.shape[1]:
                shifted[:, : mask.shape[1] - shift] = loss_mask[:, shift:].bool()
            mask = mask & shifted
        return mask.nonzero(as_tuple=True)

    def pairs(self, states, loss_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(draft logits [N, Vd], target logits [N, V]) at the valid positions, ready for ``lk_loss``."""
        batch, anchor = self.valid_positions(loss_mask)
        draft = self.head(self.hidden[batch, anchor])
        target = states.logits_at(batch, anchor + self.target_shift)
        return draft, target


def shift_left(input_ids: torch.Tensor, shift: int) -> torch.Tensor:
    """input_ids moved ``shift`` places left (token t + shift at t), padded with 0 (those anchors are masked)."""
    out = torch.zeros_like(input_ids)
    if shift < input_ids.shape[1]:
        out[:, : input_ids.shape[1] - shift] = input_ids[:, shift:]
    return out


def shift_mask(attention_mask: torch.Tensor, shift: int) -> torch.Tensor:
    """[B, T] True at anchor t when positions t and t + shift are both real tokens."""
    mask = attention_mask.bool()
    out = torch.zeros_like(mask)
    length = mask.shape[1]
    if shift < length:
        out[:, : length - shift] = mask[:, : length - shift] & mask[:, shift:]
    return out


class Drafter(nn.Module):
    """Base class. Subclasses set ``architecture`` (registry name) and ``vllm_method``."""

    architecture: ClassVar[str] = ""
    vllm_method: ClassVar[str] = ""
    # True when vLLM 0.32 (with lk-vllm's plugin) serves this architecture.
    servable: ClassVar[bool] = True

    def __init__(self):
        super().__init__()
        self.training_info = TrainingRecord()  # what lk_training.json said when loaded

    # ----------------------------------------------------------------------- training contract
    @property
    def draft_to_target(self) -> torch.Tensor | None:
        """LongTensor [Vd]: the target id of each draft id; None when the draft vocabulary is the target's."""
        return None

    @property
    def draft_vocab_size(self) -> int:
        draft_to_target = self.draft_to_target
        return self.target_vocab_size() if draft_to_target is None else int(draft_to_target.numel())

    @classmethod
    def from_target(cls, target, **options) -> Drafter:
        """A fresh drafter for ``target`` (a lk_vllm.target_model.TargetModel)."""
        raise NotImplementedError

    @classmethod
    def from_pretrained(cls, directory, target=None) -> Drafter:
        """Load a checkpoint directory of this architecture (use ``load_drafter`` for any architecture)."""
        raise NotImplementedError

    def aux_layer_ids_needed(self) -> tuple[int, ...] | None:
        """Target layer ids whose aux hidden states ``training_steps`` reads (pass to TargetModel.forward)."""
        return None

    def target_vocab_size(self) -> int:
        """The target vocabulary this drafter was built for (subclasses set ``vocab_size``)."""
        return int(self.vocab_size)

    def target_hidden_size(self) -> int | None:
        """The target hidden size this drafter reads (None: it reads no target hidden states)."""
        return None

    def training_steps(self, states, num_steps: int) -> list[StepOutput]:
        """Draft logits for ``num_steps`` unrolled steps on a batch of target states (see the package doc)."""
        raise NotImplementedError

    def propose_all(self, states, num_tokens: int) -> torch.Tensor:
        """Greedy drafts [B, T, K] (target ids) at every anchor, computed as vLLM drafts them."""
        raise NotImplementedError

    def make_proposer(self, states, num_tokens: int) -> Callable[[int], list[int]]:
        """For the torch evaluator: a function ``anchor -> K greedy draft tokens (target ids)`` on one sequence
        (``states`` has batch size 1). At anchor ``i`` the context is tokens 0..i+1 (the target's logits at ``i``
        produced token ``i + 1``); the drafts are proposals for tokens i+2 .. i+1+K, exactly as vLLM drafts."""
        drafts = self.propose_all(states, num_tokens)[0]
        return lambda anchor: drafts[anchor].tolist()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # ----------------------------------------------------------------------- checkpoint
    def config_dict(self, export_format: str | None = None, target: dict | None = None) -> dict[str, Any]:
        """The config.json vLLM reads."""
        raise NotImplementedError

    def export_state_dict(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Tensors to write to model.safetensors, with vLLM's names, from ``state`` (default: ``state_dict()``)."""
        raise NotImplementedError

    def validate(self, target_info: dict[str, Any], state: dict[str, torch.Tensor], config: dict) -> None:
        """Architecture-specific checks before writing (raise UserError)."""

    def save_pretrained(
        self,
        directory: str | os.PathLike,
        *,
        target: dict[str, Any],
        training: dict[str, Any] | None = None,
        export_format: str | None = None,
        dtype: torch.dtype = torch.float32,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> Path:
        """Validate, then atomically write ``config.json``, ``model.safetensors`` and ``lk_training.json``.

        ``target``: ``target_info(...)`` of the target this drafter was trained for. ``training``: what the
        trainer wants recorded (loss kind, eta, steps, data, expected acceptance length per position, ...).
        ``state_dict``: the weights to write when the module does not hold them whole (FSDP2 shards them; the
        trainer gathers them first); default: the module's own.
        """
        d2t = self.draft_to_target
        if d2t is not None:  # first: building the export tensors indexes with it
            validate_draft_to_target(d2t, self.draft_vocab_size, int(target.get("vocab_size", -1)), "export")
        config = self.config_dict(export_format, target)
        state = self.export_state_dict(state_dict)
        state = {name: tensor.detach().to("cpu").contiguous() for name, tensor in state.items()}
        state = {
            name: (tensor.to(dtype) if tensor.is_floating_point() else tensor)
            for name, tensor in state.items()
        }
        validate_common(config, state, target, self)
        self.validate(target, state, config)
        record = {
            "format_version": FORMAT_VERSION,
            "architecture": self.architecture,
            "vllm_method": self.vllm_method,
            "export_format": export_format or self.default_export_format(),
            "target": target,
            # The target layers it was trained on: `lk-vllm validate` checks config.json still names these.
            "aux_layer_ids": list(self.aux_layer_ids_needed() or []) or None,
            "training": dict(training or {}),
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        try:
            from lk_vllm import __version__

            record["lk_vllm_version"] = __version__
        except ImportError:  # pragma: no cover
            pass
        return write_checkpoint_dir(Path(directory), config, state, record)

    def default_export_format(self) -> str:
        return self.architecture


# --------------------------------------------------------------------------- target description and checks
def target_info(target) -> dict[str, Any]:
    """What a drafter records about its target (``target`` is a ``lk_vllm.target_model.TargetModel``)."""
    return {
        "path": target.path,
        "fingerprint": target_fingerprint(target.path),
        "architectures": list(getattr(target.config, "architectures", None) or []),
        "vocab_size": target.vocab_size,
        "hidden_size": target.hidden_size,
        "num_hidden_layers": target.num_layers,
        "max_position_embeddings": target.max_position_embeddings,
    }


def check_drafter_matches_target(directory: str | os.PathLike, drafter: Drafter, target) -> None:
    """Raise a one-line UserError when a loaded drafter was made for another target."""
    where = Path(directory)
    if drafter.target_vocab_size() != target.vocab_size:
        raise UserError(
            f"drafter {where} is for a target with vocabulary size {drafter.target_vocab_size()}, "
            f"but the target {target.path} has {target.vocab_size}"
        )
    expected_hidden = drafter.target_hidden_size()
    if expected_hidden is not None and expected_hidden != target.hidden_size:
        raise UserError(
            f"drafter {where} reads target hidden states of size {expected_hidden}, "
            f"but the target {target.path} has hidden size {target.hidden_size}"
        )
    mismatch = target_mismatch(drafter.training_info, target.path)
    if mismatch:
        recorded, actual = mismatch
        raise UserError(
            f"drafter {where} was trained for target fingerprint {recorded} "
            f"({drafter.training_info.target_path}), but {target.path} has {actual}; "
            f"pass the target it was trained for"
        )


def target_mismatch(record: TrainingRecord, target_path: str) -> tuple[str, str] | None:
    """``(recorded, actual)`` target fingerprints when a drafter's ``lk_training.json`` record names another target
    than the local model directory ``target_path``; None when they agree or there is nothing to compare (a
    third-party drafter records no target; an HF id is not fingerprinted)."""
    recorded = record.target_fingerprint
    if not recorded or not Path(target_path).is_dir():
        return None

    actual = target_fingerprint(target_path)
    return None if actual == recorded else (recorded, actual)


def validate_common(config: dict, state: dict[str, torch.Tensor], target: dict, drafter: Drafter) -> None:
    """Checks every export passes before anything is written."""
    for key in ("vocab_size", "hidden_size", "max_position_embeddings"):
        if key not in target:
            raise UserError(f"export: target description lacks {key!r} (use lk_vllm.drafters.target_info)")
    if drafter.target_vocab_size() != target["vocab_size"]:
        raise UserError(
            f"export: drafter vocabulary {drafter.target_vocab_size()} differs from the target's {target['vocab_size']}"
        )
    float_dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(float_dtypes) > 1:
        raise UserError(f"export: weights mix dtypes {sorted(map(str, float_dtypes))}; expected one")
    if float_dtypes and not float_dtypes <= {torch.float32, torch.bfloat16, torch.float16}:
        raise UserError(
            f"export: unsupported weight dtype {float_dtypes}; expected float32, bfloat16 or float16"
        )
    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UserError(f"export: weight {name} has NaN or infinite values")


def validate_attention_config(config: dict, target: dict, where: str) -> None:
    """Head size and context length checks for drafters with attention layers."""
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    if head_dim not in CPU_ATTENTION_HEAD_SIZES:
        raise UserError(
            f"{where}: attention head size {head_dim} is not one vLLM's CPU attention supports "
            f"{list(CPU_ATTENTION_HEAD_SIZES)}"
        )
    kv_heads = int(config.get("num_key_value_heads") or heads)
    if heads % kv_heads:
        raise UserError(
            f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
        )
    target_len = int(target.get("max_position_embeddings") or 0)
    if int(config.get("max_position_embeddings") or 0) < target_len:
        raise UserError(
            f"{where}: max_position_embeddings {config.get('max_position_embeddings')} is below the target's {target_len}"
        )


def validate_draft_to_target(
    draft_to_target: torch.Tensor, draft_vocab: int, target_vocab: int, where: str
) -> None:
    if tuple(draft_to_target.shape) != (draft_vocab,):
        raise UserError(
            f"{where}: draft-to-target map has shape {tuple(draft_to_target.shape)}, expected ({draft_vocab},)"
        )
    if draft_to_target.dtype != torch.long:
        raise UserError(f"{where}: draft-to-target map has dtype {draft_to_target.dtype}, expected int64")
    if draft_vocab and (int(draft_to_target.min()) < 0 or int(draft_to_target.max()) >= target_vocab):
        raise UserError(
            f"{where}: draft-to-target map points outside the target vocabulary 0..{target_vocab - 1}"
        )
    if draft_to_target.unique().numel() != draft_vocab:
        raise UserError(f"{where}: draft-to-target map repeats target ids")


# --------------------------------------------------------------------------- files
def write_checkpoint_dir(directory: Path, config: dict, state: dict[str, torch.Tensor], record: dict) -> Path:
    """Write the three files into a temporary sibling directory, then swap it into place."""
    from safetensors.torch import save_file

    directory = directory.expanduser().resolve()
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in state.items()}  # from any device
    with atomic_dir(directory) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        os.chmod(tmp / WEIGHTS_FILE, 0o644)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=False) + "\n")
        (tmp / TRAINING_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return directory


@dataclasses.dataclass(frozen=True)
class TrainingRecord:
    """``lk_training.json``: how a drafter was trained and for which target. Empty for a drafter lk-vllm did not
    make, so every accessor answers None / {} rather than failing."""

    data: dict[str, Any] = dataclasses.field(default_factory=dict)

    def _dict(self, key: str) -> dict[str, Any]:
        value = self.data.get(key)
        return value if isinstance(value, dict) else {}

    @property
    def target_path(self) -> str | None:
        return self._dict("target").get("path")

    @property
    def target_fingerprint(self) -> str | None:
        return self._dict("target").get("fingerprint")

    @property
    def training(self) -> dict[str, Any]:
        """The trainer's own section: loss, held-out statistics, the resolved config."""
        return self._dict("training")

    @property
    def loss(self) -> str | None:
        training = self.training
        loss = training.get("loss") or training.get("loss_kind") or training.get("kind")
        return str(loss) if loss else None

    @property
    def aux_layer_ids(self) -> list[int] | None:
        """The EAGLE-3 target layers the trainer used (exports record them; older ones only in the config)."""
        ids = self.data.get("aux_layer_ids")
        if not ids:
            options = ((self.training.get("config") or {}).get("model") or {}).get("options") or {}
            ids = options.get("aux_layer_ids")
        return [int(i) for i in ids] if ids else None


@dataclasses.dataclass(frozen=True)
class DrafterFiles:
    """A drafter directory's ``config.json`` and training record (weights are read separately: they are large)."""

    path: Path
    config: dict[str, Any]
    record: TrainingRecord


def read_drafter_files(directory: str | os.PathLike) -> DrafterFiles:
    """The one reader of a drafter directory: a missing or malformed ``config.json`` and a malformed
    ``lk_training.json`` are one-line UserErrors; a missing ``lk_training.json`` is an empty record (third-party
    drafters have none)."""
    path = Path(directory).expanduser()
    config = read_json_object(path / CONFIG_FILE)
    if config is None:
        raise UserError(f"drafter {path}: {CONFIG_FILE} is missing (expected a drafter checkpoint directory)")
    return DrafterFiles(path, config, TrainingRecord(read_json_object(path / TRAINING_FILE) or {}))


def read_json_object(path: Path, what: str = "drafter") -> dict | None:
    """A JSON object file (``what`` names it in errors); None when absent."""
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except (ValueError, OSError) as exc:
        raise UserError(f"{what} {path}: not valid JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise UserError(f"{what} {path}: expected a JSON object, found {type(value).__name__}")
    return value


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of the drafter's safetensors file(s), with a one-line error for a corrupt file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise UserError(f"drafter {directory}: no .safetensors weights found")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            state.update(load_file(str(path)))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise UserError(f"drafter {path}: corrupt safetensors file ({str(exc).splitlines()[0]})") from exc
    return state


def read_safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (dtype, shape) from a safetensors file's header, without reading the weights; a one-line
    UserError for a file that is not one, or is shorter than its header says (a truncated copy)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100 * 1024 * 1024:
                raise ValueError(f"header length {length} is implausible")
            header = json.loads(f.read(length))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        end = max(
            (meta["data_offsets"][1] for name, meta in header.items() if name != "__metadata__"), default=0
        )
        if 8 + length + end > size:
            raise ValueError(f"it holds {size} bytes, its header describes {8 + length + end} (truncated?)")
        return {
            name: (meta["dtype"], tuple(meta["shape"]))
            for name, meta in header.items()
            if name != "__metadata__"
        }
    except (OSError, ValueError, struct.error, KeyError, TypeError, IndexError) as exc:
        raise UserError(f"drafter {path}: not a readable safetensors file ({exc})") from None


def require(config: dict, keys: list[str], where: str) -> None:
    missing = [key for key in keys if config.get(key) is None]
    if missing:
        raise UserError(f"drafter {where}: config.json lacks required field(s) {', '.join(missing)}")


def take(state: dict[str, torch.Tensor], name: str, shape: tuple[int, ...], where: str) -> torch.Tensor:
    """A required tensor with the expected shape."""
    if name not in state:
        raise UserError(f"drafter {where}: weight {name} is missing from the safetensors file")
    tensor = state[name]
    if tuple(tensor.shape) != tuple(shape):
        raise UserError(
            f"drafter {where}: weight {name} has shape {tuple(tensor.shape)}, expected {tuple(shape)}"
        )
    return tensor


def init_linear_(module: nn.Linear, std: float = 0.02) -> None:
    nn.init.normal_(module.weight, std=std)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


def rms_scale(hidden_size: int) -> float:
    return 1.0 / math.sqrt(hidden_size)
