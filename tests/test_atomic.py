"""lk_vllm.atomic: a write replaces the file whole or not at all, and leaves no temporary behind."""

from __future__ import annotations

import pytest

from lk_vllm.atomic import atomic_dir, atomic_path, write_atomic

pytestmark = pytest.mark.unit


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


@pytest.mark.parametrize("exchange", [True, False])
def test_replace_dir_never_deletes_the_old_copy_first(tmp_path, monkeypatch, exchange):
    import shutil

    from lk_vllm import atomic

    final = tmp_path / "step-4"
    final.mkdir()
    (final / "state.pt").write_text("old")
    new = tmp_path / ".step-4.tmp"
    new.mkdir()
    (new / "state.pt").write_text("new")
    if not exchange:  # a C library or file system without renameat2: the rename-aside fallback
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    removed, real_rmtree = [], shutil.rmtree

    def rmtree(path, *args, **kwargs):
        # Whenever anything is deleted, step-4 is there whole (old or new), and it is not what is deleted.
        removed.append(((final / "state.pt").read_text(), path != final))
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(atomic.shutil, "rmtree", rmtree)
    atomic.replace_dir(new, final)
    assert (final / "state.pt").read_text() == "new"
    assert removed == [("new", True)]
    assert [p.name for p in tmp_path.iterdir()] == ["step-4"]
    fresh = tmp_path / ".other.tmp"
    fresh.mkdir()
    atomic.replace_dir(fresh, tmp_path / "other")  # nothing there yet: a plain rename
    assert (tmp_path / "other").is_dir() and not fresh.exists()


def test_atomic_dir_replaces_whole_or_leaves_the_old_copy(tmp_path):
    final = tmp_path / "drafter"
    with atomic_dir(final) as tmp:
        assert tmp.parent == tmp_path and tmp != final and not final.exists()
        (tmp / "config.json").write_text("first")
    assert (final / "config.json").read_text() == "first" and oct(final.stat().st_mode & 0o777) == "0o755"
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_dir(final) as tmp:
            (tmp / "config.json").write_text("half")
            raise RuntimeError("crash")
    assert (final / "config.json").read_text() == "first"
    with atomic_dir(final) as tmp:
        (tmp / "model.safetensors").write_text("second")
    assert sorted(p.name for p in final.iterdir()) == [
        "model.safetensors"
    ]  # the new copy whole, nothing mixed
    assert [p.name for p in tmp_path.iterdir()] == ["drafter"]
