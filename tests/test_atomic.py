"""lk_vllm.atomic: a write replaces the file whole or not at all, and leaves no temporary behind."""

from __future__ import annotations

import pytest

from lk_vllm.atomic import atomic_path, write_atomic


def test_write_atomic_text_and_bytes(tmp_path):
    path = tmp_path / "out.json"
    write_atomic(path, "first\n")
    assert path.read_text() == "first\n"
    write_atomic(path, b"\x00second")
    assert path.read_bytes() == b"\x00second"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_path(path) as tmp:
            assert tmp.parent == path.parent and tmp != path
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_writer_that_never_creates_the_temporary_fails_loudly(tmp_path):
    # A writer that silently wrote nothing must not leave the destination looking written.
    with pytest.raises(FileNotFoundError):
        with atomic_path(tmp_path / "shard.safetensors"):
            pass
    assert not (tmp_path / "shard.safetensors").exists()
