"""The offline hidden-state cache at scale (training/capture.py): shards built per rank equal one process's, a
bad shard is found and captured again, a cache missing a shard is refused, and a disk too small is refused
before the target runs. Two ranks are two threads, each with its own target, sharing a barrier."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from train_helpers import make_tiny_data, make_tiny_target

from lk_vllm.errors import UserError
from lk_vllm.target_model import TargetModel
from training import capture
from training.capture import (
    CACHE_FORMAT,
    OfflineCapture,
    build_cache,
    cache_bytes_per_token,
    collate,
    shard_path,
    validate_shard,
)
from training.data import load_samples

pytestmark = pytest.mark.unit

SHARD_SIZE = 2  # 7 samples: 4 shards, the last one partial
DTYPE = "bfloat16"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    target_dir = make_tiny_target(root / "target")
    samples = load_samples(Path(make_tiny_data(root / "data", target_dir, num_samples=7)))
    target = TargetModel(target_dir)
    aux = target.default_aux_layer_ids()
    good = root / "good"
    manifest = build_cache(
        target, samples, aux, good, DTYPE, batch_size=2, shard_size=SHARD_SIZE, progress=False
    )
    return {
        "path": target_dir,
        "target": target,
        "samples": samples,
        "aux": aux,
        "good": good,
        "manifest": manifest,
    }


class Watched:
    """The target, counting the tokens it runs on (and failing the test if it must not run)."""

    def __init__(self, target, forbidden: bool = False):
        self.target, self.forbidden, self.tokens = target, forbidden, 0

    def __getattr__(self, name):
        return getattr(self.target, name)

    def __call__(self, input_ids, attention_mask, aux_layer_ids=None):
        if self.forbidden:
            pytest.fail("the target ran")
        self.tokens += int(attention_mask.sum())
        return self.target(input_ids, attention_mask, aux_layer_ids=aux_layer_ids)


def _build(tiny, target, directory, **kwargs):
    return build_cache(
        target,
        tiny["samples"],
        tiny["aux"],
        directory,
        DTYPE,
        batch_size=2,
        shard_size=SHARD_SIZE,
        progress=False,
        **kwargs,
    )


def _shard_tokens(tiny, shard: int) -> int:
    members = tiny["samples"][shard * SHARD_SIZE : (shard + 1) * SHARD_SIZE]
    return sum(len(s.input_ids) for s in members)


def _check(tiny, directory, shard: int, values: bool = True):
    lengths = [len(s.input_ids) for s in tiny["samples"][shard * SHARD_SIZE : (shard + 1) * SHARD_SIZE]]
    return validate_shard(shard_path(directory, shard), lengths, 64, len(tiny["aux"]), DTYPE, values=values)


def _assert_same_shards(a: Path, b: Path):
    names = sorted(p.name for p in a.glob("shard-*.safetensors"))
    assert names == sorted(p.name for p in b.glob("shard-*.safetensors"))
    for name in names:
        left, right = load_file(str(a / name)), load_file(str(b / name))
        assert left.keys() == right.keys() == {"final", "lse", "offsets", "aux"}
        for key in left:
            assert torch.equal(left[key], right[key]), f"{name}: {key}"


def test_two_ranks_write_the_shards_one_process_writes(tiny, tmp_path):
    assert len(list(tiny["good"].glob("shard-*.safetensors"))) == 4
    barrier = threading.Barrier(2, timeout=120)
    # Each rank loads its own target, as under torchrun (forward hooks are per model).
    targets = [Watched(TargetModel(tiny["path"])) for _ in range(2)]
    with ThreadPoolExecutor(2) as pool:
        futures = [
            pool.submit(
                _build, tiny, targets[rank], tmp_path / "sharded", rank=rank, world=2, barrier=barrier.wait
            )
            for rank in range(2)
        ]
        manifests = [future.result() for future in futures]
    _assert_same_shards(tiny["good"], tmp_path / "sharded")
    assert manifests[0] == manifests[1]
    single = tiny["manifest"]
    for key in (
        "format",
        "num_samples",
        "shard_size",
        "num_shards",
        "dtype",
        "aux_layer_ids",
        "tokens",
        "bytes",
    ):
        assert manifests[0][key] == single[key], key
    assert single["num_samples"] == 7 and single["num_shards"] == 4
    # Rank r ran the target on the shards r, r + 2 only.
    assert targets[0].tokens == _shard_tokens(tiny, 0) + _shard_tokens(tiny, 2)
    assert targets[1].tokens == _shard_tokens(tiny, 1) + _shard_tokens(tiny, 3)
    # A second run finds the cache complete on both ranks and runs nothing.
    quiet = [Watched(TargetModel(tiny["path"]), forbidden=True) for _ in range(2)]
    with ThreadPoolExecutor(2) as pool:
        again = [
            pool.submit(
                _build, tiny, quiet[rank], tmp_path / "sharded", rank=rank, world=2, barrier=barrier.wait
            )
            for rank in range(2)
        ]
        assert [future.result() for future in again] == manifests


def _rewrite(path: Path, **tensors):
    save_file(tensors, str(path), metadata={"format": CACHE_FORMAT})


def test_validate_shard_names_what_is_wrong(tiny, tmp_path):
    directory = tmp_path / "cache"
    shutil.copytree(tiny["good"], directory)
    path = shard_path(directory, 0)
    assert _check(tiny, directory, 0) is None
    good = load_file(str(path))
    final = good["final"].clone()
    final[3, 5] = float("inf")
    cases = {
        "non-finite": {"final": final},
        "offsets do not match": {"offsets": good["offsets"] + torch.tensor([0, 1, 0])},
        "final has shape": {"final": good["final"][:-1]},
        "lse is BF16, expected F32": {"lse": good["lse"].bfloat16()},
        "aux has shape": {"aux": good["aux"][:, :64].contiguous()},
    }
    for expected, changes in cases.items():
        _rewrite(path, **{**good, **changes})
        reason = _check(tiny, directory, 0)
        assert reason is not None and expected in reason and "\n" not in reason, (expected, reason)
    _rewrite(path, **good)
    assert _check(tiny, directory, 0) is None
    save_file(good, str(path), metadata={"format": "lk-vllm-hidden-cache-v1"})
    assert "format" in _check(tiny, directory, 0)
    save_file({k: v for k, v in good.items() if k != "aux"}, str(path), metadata={"format": CACHE_FORMAT})
    assert "holds tensors" in _check(tiny, directory, 0)
    path.write_bytes(b"")
    assert "cannot be read" in _check(tiny, directory, 0)
    path.unlink()
    assert _check(tiny, directory, 0) == "missing"
    # A NaN passes the header check (what every start runs) and fails the full one.
    _rewrite(path, **{**good, "final": final})
    assert _check(tiny, directory, 0, values=False) is None and "non-finite" in _check(tiny, directory, 0)


def test_bad_shards_are_captured_again(tiny, tmp_path, capsys):
    directory = tmp_path / "cache"
    shutil.copytree(tiny["good"], directory)
    truncated = shard_path(directory, 0)
    truncated.write_bytes(truncated.read_bytes()[:-100])
    tensors = load_file(str(shard_path(directory, 1)))
    tensors["final"][0, 0] = float("nan")
    _rewrite(shard_path(directory, 1), **tensors)
    tensors = load_file(str(shard_path(directory, 3)))
    _rewrite(shard_path(directory, 3), **{**tensors, "offsets": tensors["offsets"].flip(0)})
    target = Watched(tiny["target"])
    manifest = _build(tiny, target, directory)
    _assert_same_shards(tiny["good"], directory)
    assert target.tokens == sum(_shard_tokens(tiny, shard) for shard in (0, 1, 3))  # not shard 2
    assert manifest["bytes"] == tiny["manifest"]["bytes"]
    log = capsys.readouterr().err
    for shard, reason in ((0, "cannot be read"), (1, "non-finite"), (3, "offsets do not match")):
        [line] = [line for line in log.splitlines() if shard_path(directory, shard).name in line]
        assert line.startswith("[lk-vllm] hidden-state cache ") and reason in line
        assert line.endswith("capturing it again")


def test_a_shard_written_with_non_finite_values_is_refused(tiny, tmp_path):
    class Overflowing(Watched):
        def __call__(self, *args, **kwargs):
            states = super().__call__(*args, **kwargs)
            return dataclasses.replace(states, final_hidden=states.final_hidden * float("inf"))

    with pytest.raises(UserError, match=r"shard-00000\.safetensors: the shard just written .*non-finite"):
        _build(tiny, Overflowing(tiny["target"]), tmp_path / "cache")
    assert not (tmp_path / "cache" / "manifest.json").exists()


def test_offline_capture_refuses_a_cache_missing_a_shard(tiny, tmp_path):
    directory = tmp_path / "cache"
    shutil.copytree(tiny["good"], directory)
    OfflineCapture(tiny["target"], directory, tiny["aux"]).states(collate(tiny["samples"], [0, 6]))
    shard_path(directory, 2).unlink()
    with pytest.raises(UserError) as refused:
        OfflineCapture(tiny["target"], directory, tiny["aux"])
    message = str(refused.value)
    assert (
        str(directory) in message and "shard-00002.safetensors is missing" in message and "\n" not in message
    )
    shutil.copy(shard_path(tiny["good"], 2), shard_path(directory, 2))
    shutil.copy(shard_path(tiny["good"], 0), shard_path(directory, 4))
    with pytest.raises(
        UserError, match=r"lists 4 shards, 5 are present \(shard-00004\.safetensors is not in it\)"
    ):
        OfflineCapture(tiny["target"], directory, tiny["aux"])


def test_build_cache_captures_only_a_missing_shard_and_drops_a_stray_one(tiny, tmp_path, capsys):
    directory = tmp_path / "cache"
    shutil.copytree(tiny["good"], directory)
    shard_path(directory, 2).unlink()
    shutil.copy(shard_path(tiny["good"], 0), shard_path(directory, 7))
    target = Watched(tiny["target"])
    assert _build(tiny, target, directory)["bytes"] == tiny["manifest"]["bytes"]
    assert target.tokens == _shard_tokens(tiny, 2)
    _assert_same_shards(tiny["good"], directory)
    per_token = cache_bytes_per_token(64, len(tiny["aux"]), DTYPE)
    assert f"{_shard_tokens(tiny, 2)} tokens x {per_token} bytes/token" in capsys.readouterr().err
    OfflineCapture(tiny["target"], directory, tiny["aux"])


def _fake_free(monkeypatch, free: int) -> list:
    asked = []

    def disk_usage(path):
        asked.append(Path(path))
        return shutil._ntuple_diskusage(10 * free + 1, 0, free)

    monkeypatch.setattr(capture.shutil, "disk_usage", disk_usage)
    return asked


def test_a_disk_too_small_is_refused_before_the_target_runs(tiny, tmp_path, monkeypatch, capsys):
    per_token = cache_bytes_per_token(64, len(tiny["aux"]), DTYPE)
    assert per_token == 64 * 4 * 2 + 4  # final + 3 aux layers in bf16, fp32 normaliser
    assert cache_bytes_per_token(64, 0, "float32") == 64 * 4 + 4
    tokens = tiny["manifest"]["tokens"]
    directory = tmp_path / "not" / "yet" / "cache"
    asked = _fake_free(monkeypatch, tokens * per_token - 1)
    with pytest.raises(UserError) as refused:
        _build(tiny, Watched(tiny["target"], forbidden=True), directory)
    message = str(refused.value)
    assert (
        "training.cache_dtype" in message
        and "--set training.capture=online" in message
        and "\n" not in message
    )
    assert asked == [tmp_path] and not directory.exists()
    [line] = [line for line in capsys.readouterr().err.splitlines() if "bytes/token" in line]
    found = re.fullmatch(
        r"\[lk-vllm\] hidden-state cache (.+): (\d+) tokens x (\d+) bytes/token = "
        r"([\d.]+) GB to write \(([\d.]+) GB already there\), ([\d.]+) GB free",
        line,
    )
    assert found is not None, line
    assert found.group(1) == str(directory)
    assert int(found.group(2)) == tokens and int(found.group(3)) == per_token
    assert found.group(4) == f"{tokens * per_token / 1e9:.2f}" and found.group(5) == "0.00"
    # Exactly enough room: it runs, and the estimate is what the shards take (less their small headers).
    _fake_free(monkeypatch, tokens * per_token)
    manifest = _build(tiny, Watched(tiny["target"]), directory)
    assert manifest["bytes_per_token"] == per_token
    assert tokens * per_token < manifest["bytes"] < tokens * per_token + 4 * 1024
    assert json.loads((directory / "manifest.json").read_text()) == manifest


def test_a_bf16_targets_draft_columns_and_cached_normaliser_agree_with_float64():
    """With a bf16 target (training.precision=bf16, the GPU default) the cached normaliser and the draft ids'
    logits are both fp32 products of the bf16 values: a bf16-rounded output (0.125 apart at logit 20) once put
    a peaked row's draft logsumexp above the full vocabulary's and the loss refused the batch."""
    from lk_vllm.target_model import TargetStates

    generator = torch.Generator().manual_seed(0)
    vocab, hidden_size, tokens = 512, 64, 48
    weight = torch.randn(vocab, hidden_size, generator=generator).bfloat16()
    hidden = (4 * torch.randn(1, tokens, hidden_size, generator=generator)).bfloat16()  # logits of 20-60
    reference = hidden[0].double() @ weight.double().T
    lse = capture.logsumexp_of_logits(hidden[0], weight)
    assert lse.dtype == torch.float32
    assert torch.allclose(lse.double(), torch.logsumexp(reference, dim=1), rtol=0, atol=1e-4)
    mask = torch.ones(1, tokens, dtype=torch.bool)
    states = TargetStates(
        input_ids=torch.zeros(1, tokens, dtype=torch.long),
        attention_mask=mask,
        position_ids=torch.arange(tokens)[None],
        final_hidden=hidden,
        aux_hidden=None,
        aux_layer_ids=(),
        lm_head_weight=weight,
        embed_weight=weight,
        final_logsumexp=lse[None],
    )
    draft_ids = torch.arange(0, vocab, 2)
    rows = torch.zeros(tokens, dtype=torch.long), torch.arange(tokens)
    table, normaliser = states.draft_logits_at(*rows, draft_ids)
    assert table.dtype == torch.float32
    assert torch.allclose(table.double(), reference[:, draft_ids], rtol=0, atol=1e-4)
    assert bool((torch.logsumexp(table.double(), dim=1) <= normaliser.double() + 1e-5).all())
