"""The embedded default target (lk_vllm.assets, the `models` command): cache location, integrity checks,
atomic builds, clear errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from repo_helpers import run_cli

from lk_vllm import assets
from lk_vllm.errors import UserError

pytestmark = pytest.mark.unit


def _fake_build(directory: Path) -> None:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (directory / "model.safetensors").write_bytes(b"x" * 1000)
    assets._write_manifest(directory, {"name": "fake"})


def test_cache_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LK_VLLM_HOME", str(tmp_path / "home"))
    assert assets.default_target_dir() == tmp_path / "home" / "models" / assets.DEFAULT_TARGET


def test_integrity_check_catches_every_kind_of_damage(tmp_path):
    directory = tmp_path / "m"
    assert assets.check_model_dir(directory) == "not built yet"
    _fake_build(directory)
    assert assets.check_model_dir(directory) is None
    weights = directory / "model.safetensors"
    weights.write_bytes(b"y" * 1000)  # same size, different bytes
    assert "sha256" in assets.check_model_dir(directory)
    weights.write_bytes(b"x" * 10)  # truncated
    assert "expected 1000" in assets.check_model_dir(directory)
    weights.unlink()
    assert "missing" in assets.check_model_dir(directory)
    _fake_build(tmp_path / "m2")
    (tmp_path / "m2" / assets.MANIFEST).unlink()  # what an interrupted build looks like
    assert "interrupted" in assets.check_model_dir(tmp_path / "m2")


def test_failed_build_leaves_nothing_that_looks_valid(monkeypatch, tmp_path):
    monkeypatch.setenv("LK_VLLM_HOME", str(tmp_path))

    def half_conversion(out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed mid-way")

    monkeypatch.setattr(assets, "_convert_gguf", half_conversion)
    with pytest.raises(RuntimeError, match="killed mid-way"):
        assets.build_default_target()
    assert not assets.default_target_dir().exists()
    assert [p for p in assets.models_dir().iterdir() if p.is_dir()] == []  # no temporary directory left


def test_missing_asset_package_names_make_setup():
    with pytest.raises(UserError, match="make setup"):
        assets.package_dir("lk_vllm_no_such_package", "no-such-package")


def test_resolve_target_errors_and_passthrough(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        assets.resolve_target(str(tmp_path))
    with pytest.raises(UserError, match="neither a directory nor an HF id"):
        assets.resolve_target("./does/not/exist")
    assert assets.resolve_target("meta-llama/Llama-3.1-8B-Instruct") == "meta-llama/Llama-3.1-8B-Instruct"
    (tmp_path / "config.json").write_text("{}")
    assert assets.resolve_target(str(tmp_path)) == str(tmp_path.resolve())


def test_fingerprint_changes_with_weights(tmp_path):
    _fake_build(tmp_path / "a")
    first = assets.target_fingerprint(str(tmp_path / "a"))
    assert first == assets.target_fingerprint(str(tmp_path / "a"))
    (tmp_path / "a" / "model.safetensors").write_bytes(b"z" * 1000)
    assert assets.target_fingerprint(str(tmp_path / "a")) != first


def test_default_target_is_a_valid_llama(default_target):
    config = json.loads((Path(default_target) / "config.json").read_text())
    assert (
        config["num_hidden_layers"] == 30 and config["hidden_size"] == 576 and config["vocab_size"] == 49152
    )
    assert config["rope_theta"] == 100000.0  # written back for readers that ignore rope_parameters
    tokenizer_config = json.loads((Path(default_target) / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "GPT2Tokenizer"
    assert assets.check_model_dir(Path(default_target)) is None


@pytest.mark.e2e
@pytest.mark.slow
def test_killed_build_is_detected_and_rebuilt_and_corruption_is_repaired(monkeypatch, tmp_path):
    """A conversion killed with SIGKILL leaves nothing valid; the next use rebuilds; a corrupted cache is
    detected by hash and rebuilt instead of served."""
    env = {**os.environ, "LK_VLLM_HOME": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lk_vllm.cli", "models"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not any((tmp_path / "models").glob(".smollm2*/model.safetensors")):
        time.sleep(0.2)  # wait until the conversion is writing weights
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    monkeypatch.setenv("LK_VLLM_HOME", str(tmp_path))
    assert assets.check_model_dir(assets.default_target_dir()) is not None

    path = Path(assets.resolve_target(None))  # rebuilds and verifies (greedy answer mentions Paris)
    assert assets.check_model_dir(path) is None
    assert "Paris" in json.loads((path / assets.MANIFEST).read_text())["greedy_check"]
    assert not [p for p in (tmp_path / "models").iterdir() if p.is_dir() and p.name.startswith(".")]

    weights = path / "model.safetensors"
    with open(weights, "r+b") as f:  # flip bytes in the middle: same size, wrong content
        f.seek(weights.stat().st_size // 2)
        f.write(b"\x00\x01\x02\x03")
    assert "sha256" in assets.check_model_dir(path)
    assert Path(assets.resolve_target(None)) == path
    assert assets.check_model_dir(path) is None


# ------------------------------------------------------------------------------------------ default drafter
@pytest.fixture
def packaged_drafter(tmp_path):
    """A tiny EAGLE-3 drafter for a tiny target, laid out as lk_vllm/default_drafter."""
    import torch
    from train_helpers import make_tiny_target

    from lk_vllm.drafters import create_drafter, target_info
    from lk_vllm.target_model import TargetModel

    target_dir = make_tiny_target(tmp_path / "target")
    target = TargetModel(target_dir)
    drafter = create_drafter("eagle3", target, draft_to_target=torch.arange(0, 256, 2))
    source = drafter.save_pretrained(
        tmp_path / "packaged", target=target_info(target), training={"loss": "lambda"}
    )
    return source, target_dir


@pytest.mark.vllm
def test_default_drafter_installs_verified_and_is_replaced_without_losing_the_old_copy(
    packaged_drafter, tmp_path, monkeypatch
):
    source, target = packaged_drafter
    monkeypatch.setenv("LK_VLLM_HOME", str(tmp_path / "home"))
    installed = assets.install_default_drafter(source, target)
    assert installed == assets.default_drafter_dir()
    assert assets.check_model_dir(installed) is None  # manifest with every file's sha256
    for name in assets.DRAFTER_FILES:
        assert (installed / name).read_bytes() == (source / name).read_bytes()
    stamp = (installed / assets.MANIFEST).stat().st_mtime_ns
    assert assets.install_default_drafter(source, target) == installed  # up to date: left alone
    assert (installed / assets.MANIFEST).stat().st_mtime_ns == stamp

    # A newer packaged drafter replaces the installed one.
    record = json.loads((source / "lk_training.json").read_text())
    (source / "lk_training.json").write_text(json.dumps({**record, "note": "newer"}))
    assets.install_default_drafter(source, target)
    assert "newer" in (installed / "lk_training.json").read_text()

    # One that fails validate's checks is refused, and the installed copy stays as it was.
    config = json.loads((source / "config.json").read_text())
    config.pop("eagle_aux_hidden_state_layer_ids")
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="packaged default drafter does not fit target .*V2 model runner"):
        assets.install_default_drafter(source, target)
    assert (
        assets.check_model_dir(installed) is None and "newer" in (installed / "lk_training.json").read_text()
    )
    assert [p.name for p in installed.parent.iterdir() if p.name.startswith(".") and p.is_dir()] == []


def test_no_packaged_drafter_installs_nothing_and_a_partial_one_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("LK_VLLM_HOME", str(tmp_path / "home"))
    assert assets.install_default_drafter(tmp_path / "none", "unused") is None
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="lacks config.json, lk_training.json; reinstall lk-vllm"):
        assets.install_default_drafter(tmp_path / "partial", "unused")


@pytest.mark.e2e
def test_models_list_shows_the_cache(default_target):
    out = run_cli("models", "--list")
    assert out.returncode == 0
    assert "smollm2-135m-instruct" in out.stdout and " ok " in out.stdout
