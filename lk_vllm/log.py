"""Progress lines on stderr, one way for every command: ``[lk-vllm COMMAND] message``."""

from __future__ import annotations

import sys

_command: str | None = None


def set_command(name: str | None) -> None:
    """Name the running command in every line (``lk_vllm.cli`` sets it; library callers get ``[lk-vllm]``)."""
    global _command
    _command = name


def log(message: str) -> None:
    """One line on stderr, written through tqdm so that a running progress bar stays intact."""
    from tqdm import tqdm

    prefix = f"[lk-vllm {_command}]" if _command else "[lk-vllm]"
    tqdm.write(f"{prefix} {message}", file=sys.stderr)
    sys.stderr.flush()
