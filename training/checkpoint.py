"""Training checkpoints: ``RUN/checkpoints/step-N/state.pt`` holds everything needed to continue bit for bit.

A checkpoint is written into a temporary sibling directory and renamed into place, so a crash (or a full
disk) never leaves a half-written ``step-N``: either the whole checkpoint exists or the previous ones are
all there is. The newest complete ``step-N`` is what ``--resume`` continues from.

Contents of ``state.pt``: the drafter's and the optimizer's state as whole tensors keyed by parameter name
(``torch.distributed.checkpoint.state_dict``, so a run saved under DDP, FSDP2 or one process resumes under
any of them, on any number of ranks), the scheduler's, the RNG states
(python, torch CPU, CUDA), the step (which is also the data position: the batch of step ``s`` is a pure
function of ``s`` and the seed), the best evaluation so far, and the config the run was started with.
"""

from __future__ import annotations

import errno
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from lk_vllm.atomic import atomic_dir
from lk_vllm.errors import UserError

STATE_FILE = "state.pt"
FORMAT = 2  # 2: model and optimizer state as whole tensors keyed by parameter name (any parallel layout)
_STEP_DIR = re.compile(r"^step-(\d+)$")


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for path in checkpoints_dir.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    found = list_checkpoints(checkpoints_dir)
    return found[-1][1] if found else None


def _save_state(state: dict[str, Any], path: Path) -> None:
    """The single write of a checkpoint (tests replace it to simulate a full disk)."""
    torch.save(state, path)


def save_checkpoint(checkpoints_dir: Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Atomically write ``step-<step>``; then delete all but the newest ``keep`` checkpoints."""
    final = checkpoints_dir / f"step-{step}"
    try:
        with atomic_dir(final) as tmp:  # re-saving a step (e.g. after a resume) swaps the directory whole
            _save_state(state, tmp / STATE_FILE)
    except OSError as exc:
        previous = latest_checkpoint(checkpoints_dir)
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        reason = "the disk is full" if exc.errno == errno.ENOSPC else str(exc)
        raise UserError(f"cannot write checkpoint {final}: {reason}; {kept}") from None
    for _, old in list_checkpoints(checkpoints_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    except Exception as exc:  # a damaged file: name it instead of a pickle traceback
        raise UserError(
            f"checkpoint {path / STATE_FILE} is unreadable ({exc}); delete it to resume from an earlier one"
        ) from None
