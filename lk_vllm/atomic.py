"""Atomic writes: write a temporary file (or directory) beside the destination, then rename it over the
destination, so that a reader (or the next run after a crash) sees the old copy or the new one, never half of
one, and the old copy is deleted only after the new one is in place."""

from __future__ import annotations

import ctypes
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same directory, so the rename cannot cross file systems); when the
    block exits cleanly it replaces ``path``, and if the block raises it is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a new empty directory beside ``path`` (mode 0755, like any cache directory); when the block exits
    cleanly it replaces ``path`` whole (``replace_dir``), and if the block raises it is removed. The one way
    lk-vllm writes a directory: models, drafters, checkpoints."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        yield tmp
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(new: str | os.PathLike, path: str | os.PathLike) -> None:
    """Move the directory ``new`` (a sibling of ``path``) to ``path``, replacing any directory there.

    Where the kernel can swap two names in one step (Linux ``renameat2(RENAME_EXCHANGE)``), ``path`` is never
    missing; elsewhere the old directory is renamed aside first (``.NAME.old-PID``, still on disk). Either way
    the old contents are deleted only once the new ones are in place.
    """
    new, path = Path(new), Path(path)
    if not path.exists():
        os.replace(new, path)
        return
    if _exchange(new, path):
        shutil.rmtree(new, ignore_errors=True)  # ``new`` now names the old contents
        return
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    os.replace(path, old)
    os.replace(new, path)
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths; False where the C library or the file system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
