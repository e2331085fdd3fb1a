"""The training loop (training.train) on a tiny random Llama target: evaluation math, resume after SIGKILL,
bad input, DDP, offline capture, the flags that override a recipe; and one real (shortened) smoke recipe on the
default target (slow): `lk-vllm train` prepares the data itself through vLLM, captures hidden states offline,
trains and exports a drafter that loads for the target."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from train_helpers import make_tiny_data, make_tiny_target, train_args, train_config

from lk_vllm.errors import UserError
from training import checkpoint as ckpt
from training.config import load_config
from training.train import (
    BatchOrder,
    config_from_args,
    evaluate,
    lr_factor,
    split_heldout,
    train,
)

pytestmark = pytest.mark.unit


ROOT = Path(__file__).resolve().parents[1]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def _assert_same_weights(a: dict, b: dict, atol: float = 1e-6):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


# ------------------------------------------------------------------------------------------ pure helpers
def test_lr_schedule_warms_up_then_decays_by_cosine():
    assert lr_factor(0, 4, 20, 0.0) == pytest.approx(0.25)
    assert lr_factor(3, 4, 20, 0.0) == pytest.approx(1.0)
    assert lr_factor(4, 4, 20, 0.0) == pytest.approx(1.0)
    assert lr_factor(12, 4, 20, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(20, 4, 20, 0.1) == pytest.approx(0.1)


def test_batch_order_visits_every_sample_once_per_epoch_and_is_reproducible():
    indices = list(range(10, 20))
    order = BatchOrder(indices, batch_size=5, seed=3)
    epoch0 = order.global_batch(0) + order.global_batch(1)
    epoch1 = order.global_batch(2) + order.global_batch(3)
    assert sorted(epoch0) == indices and sorted(epoch1) == indices and epoch0 != epoch1
    assert BatchOrder(indices, 5, 3).global_batch(3) == order.global_batch(3)
    assert BatchOrder(indices, 5, 4).global_batch(0) != order.global_batch(0)


def test_tensorboard_scalars_name_each_eval_set():
    from training.train import _scalars

    record = {
        "step": 3,
        "eval": {
            "expected_acceptance_length": 1.5,
            "per_position_alpha": [0.5, 0.4],
            "eval_data": [{"name": "eval-mt", "dir": "/d", "per_position_alpha": [0.3]}],
        },
    }
    assert dict(_scalars(record)) == {
        "eval/expected_acceptance_length": 1.5,
        "eval/per_position_alpha/0": 0.5,
        "eval/per_position_alpha/1": 0.4,
        "eval/eval_data/eval-mt/per_position_alpha/0": 0.3,
    }


def test_heldout_split_depends_on_prompt_ids_only(tiny):
    from training.data import load_samples

    samples = load_samples(Path(tiny[1]))
    train_ids, held = split_heldout(samples, 4)
    assert len(held) == 4 and sorted(train_ids + held) == list(range(len(samples)))
    reversed_samples = samples[::-1]
    _, held_reversed = split_heldout(reversed_samples, 4)
    assert {samples[i].prompt_id for i in held} == {reversed_samples[i].prompt_id for i in held_reversed}


def test_evaluation_matches_an_independent_computation(tiny):
    """alpha = mean of sum_x min(p, q) over response positions, top-1 = argmax agreement, computed here
    directly from softmaxes of the full logits."""
    from lk_vllm.drafters import create_drafter
    from lk_vllm.target_model import TargetModel
    from training.capture import OnlineCapture, collate
    from training.data import load_samples

    target = TargetModel(tiny[0])
    samples = load_samples(Path(tiny[1]))
    torch.manual_seed(0)
    drafter = create_drafter("eagle3", target)
    capture = OnlineCapture(target, drafter.aux_layer_ids_needed())
    indices = [0, 1, 2, 3, 4]
    metrics = evaluate(drafter, capture, samples, indices, num_steps=2, batch_size=2)

    alpha_sum, agree, count = [0.0, 0.0], [0, 0], [0, 0]
    for i in indices:  # one sequence at a time: no padding involved
        batch = collate(samples, [i])
        states = target(batch.input_ids, batch.attention_mask, aux_layer_ids=drafter.aux_layer_ids_needed())
        p_all = torch.softmax(states.all_logits()[0].double(), -1)
        with torch.no_grad():
            q_steps = [
                torch.softmax(step.logits()[0].double(), -1) for step in drafter.training_steps(states, 2)
            ]
        for k, q_all in enumerate(q_steps):
            n = len(samples[i].input_ids)
            for t in range(n - k - 2):
                if not samples[i].loss_mask[t + k + 2]:
                    continue
                p, q = p_all[t + k + 1], q_all[t]
                alpha_sum[k] += float(torch.minimum(p, q).sum())
                agree[k] += int(p.argmax() == q.argmax())
                count[k] += 1
    assert metrics["positions"] == count[0]
    for k in range(2):
        assert metrics["per_position_alpha"][k] == pytest.approx(alpha_sum[k] / count[k], abs=1e-5)
        assert metrics["top1_agreement"][k] == pytest.approx(agree[k] / count[k], abs=1e-6)
    a1, a2 = metrics["per_position_alpha"]
    assert metrics["expected_acceptance_length"] == pytest.approx(1 + a1 + a1 * a2, abs=1e-5)


# ------------------------------------------------------------------------------------------ the loop
@pytest.mark.vllm
@pytest.mark.slow
def test_training_learns_and_exports_best_and_final(tiny, tmp_path):
    import json

    from lk_vllm.drafters import load_drafter

    config = train_config(tiny, tmp_path / "run", **{"training.max_steps": 12, "training.eval_every": 4})
    summary = train(config, "tiny", progress=False)
    run = tmp_path / "run"
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    evals = [r for r in log if "eval" in r]
    assert len(losses) == 12 and losses[-1] < losses[0]
    assert [r["step"] for r in evals] == [4, 8, 12]
    best = max(evals, key=lambda r: r["eval"]["expected_acceptance_length"])
    assert summary["best"]["step"] == best["step"]
    record = json.loads((run / "best" / "lk_training.json").read_text())["training"]
    assert record["steps"] == best["step"] and record["heldout"] == best["eval"]
    final = json.loads((run / "final" / "lk_training.json").read_text())["training"]
    assert final["loss"] == "lambda" and final["eta"] == 3.0 and final["steps"] == 12
    assert len(final["heldout"]["per_position_alpha"]) == 2
    from lk_vllm.assets import target_fingerprint

    assert final["target_fingerprint"] == target_fingerprint(tiny[0])
    load_drafter(run / "final")  # the export loads back


def _config_file(tiny, tmp_path, **overrides) -> Path:
    """The tiny config as a YAML file for `lk-vllm train --config` (the output comes from --output)."""
    data = train_config(tiny, tmp_path / "unused", **overrides).model_dump(mode="json")
    data.pop("output")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _run_cli(config_path: Path, *extra, env=None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "lk_vllm.cli", "train", "--config", str(config_path), "--no-progress", *extra],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.e2e
@pytest.mark.slow
def test_sigkill_then_resume_ends_with_the_same_weights(tiny, tmp_path):
    path = _config_file(
        tiny, tmp_path, **{"training.max_steps": 12, "training.checkpoint_every": 3, "training.eval_every": 6}
    )
    env = {**os.environ, "LK_VLLM_HOME": str(tmp_path / "home")}

    straight = _run_cli(path, "--output", str(tmp_path / "straight"), env=env)
    killed = _run_cli(path, "--output", str(tmp_path / "killed"), env=env)
    checkpoints = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 300
    while not (checkpoints / "step-3").is_dir():
        assert killed.poll() is None, killed.stdout.read()
        assert time.time() < deadline
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "final").exists()  # really interrupted
    resumed_from = ckpt.latest_checkpoint(checkpoints)
    assert resumed_from.name in {"step-3", "step-6", "step-9"}

    resumed = _run_cli(path, "--output", str(tmp_path / "killed"), "--resume", env=env)
    assert resumed.wait() == 0, resumed.stdout.read()
    assert straight.wait() == 0, straight.stdout.read()
    _assert_same_weights(_weights(tmp_path / "straight"), _weights(tmp_path / "killed"))


@pytest.mark.vllm
@pytest.mark.slow
def test_resume_refuses_another_config_and_reruns_need_resume(tiny, tmp_path):
    train(train_config(tiny, tmp_path / "run"), "tiny", progress=False)
    with pytest.raises(UserError, match="already holds checkpoints"):
        train(train_config(tiny, tmp_path / "run"), "tiny", progress=False)
    other = train_config(tiny, tmp_path / "run", **{"loss.kind": "kl", "model.architecture": "medusa"})
    with pytest.raises(
        UserError,
        match=r"different config: loss.kind: 'lambda' -> 'kl'; "
        r"model.architecture: 'eagle3' -> 'medusa'",
    ):
        train(other, "tiny", resume=True, progress=False)
    # A harmless change (evaluation frequency) resumes; at the end already, it only re-exports.
    summary = train(
        train_config(tiny, tmp_path / "run", **{"training.eval_every": 5}),
        "tiny",
        resume=True,
        progress=False,
    )
    assert summary["steps"] == 6


@pytest.mark.vllm
@pytest.mark.slow
def test_non_finite_loss_stops_with_the_last_good_checkpoint(tiny, tmp_path, monkeypatch):
    import lk_vllm.drafters as drafters

    real = drafters.multi_step_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 5:  # step 5
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(drafters, "multi_step_loss", poisoned)
    with pytest.raises(UserError, match=r"not finite at step 5 .*last good checkpoint is .*step-4"):
        train(train_config(tiny, tmp_path / "run"), "tiny", progress=False)
    state = ckpt.load_checkpoint(tmp_path / "run" / "checkpoints" / "step-4")
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.vllm
@pytest.mark.slow
def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tiny, tmp_path, monkeypatch):
    real = ckpt._save_state
    calls = {"n": 0}

    def save(state, path):
        calls["n"] += 1
        if calls["n"] == 2:  # the step-4 checkpoint: write part of it, then the disk is full
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real(state, path)

    monkeypatch.setattr(ckpt, "_save_state", save)
    with pytest.raises(
        UserError,
        match=r"checkpoint .*step-4: the disk is full; the previous checkpoint "
        r".*step-2 is intact",
    ):
        train(train_config(tiny, tmp_path / "run"), "tiny", progress=False)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["step-2"]  # no half-written step-4, no temp dir
    assert ckpt.load_checkpoint(checkpoints / "step-2")["step"] == 2


@pytest.mark.vllm
def test_empty_and_all_masked_data_are_clear_errors(tiny, tmp_path):
    masked = make_tiny_data(tmp_path / "masked", tiny[0], num_samples=6, masked=True)
    with pytest.raises(UserError, match="no generated tokens"):
        train(train_config(tiny, tmp_path / "run", **{"data.dirs": [masked]}), "tiny", progress=False)
    with pytest.raises(UserError, match="no manifest.json"):
        train(
            train_config(tiny, tmp_path / "run", **{"data.dirs": [str(tmp_path / "nothing")]}),
            "tiny",
            progress=False,
        )
    with pytest.raises(UserError, match="no training data"):
        train(
            train_config(tiny, tmp_path / "run", **{"data.dirs": [], "data.datasets": []}),
            "tiny",
            progress=False,
        )
    with pytest.raises(UserError, match="leaves no training samples"):
        train(train_config(tiny, tmp_path / "run", **{"data.heldout": 24}), "tiny", progress=False)


EVAL_SETTINGS = {"split": "eval", "temperature": 0.0, "datasets": ["mtbench"]}


@pytest.mark.vllm
@pytest.mark.slow
def test_eval_data_is_evaluated_and_recorded_but_never_trained_on(tiny, tmp_path):
    from lk_vllm.drafters import load_drafter
    from lk_vllm.target_model import TargetModel
    from training.capture import OnlineCapture
    from training.data import load_samples

    eval_dir = make_tiny_data(tmp_path / "eval", tiny[0], num_samples=6, seed=5, settings=EVAL_SETTINGS)
    overrides = {"training.max_steps": 4, "training.eval_every": 2}
    train(train_config(tiny, tmp_path / "plain", **overrides), "tiny", progress=False)
    config = train_config(tiny, tmp_path / "with-eval", **overrides, **{"data.eval_dirs": [eval_dir]})
    train(config, "tiny", progress=False)

    # Same weights as without it: nothing of the eval data reaches a training batch or the draft vocabulary.
    _assert_same_weights(_weights(tmp_path / "plain"), _weights(tmp_path / "with-eval"), atol=0)
    record = json.loads((tmp_path / "with-eval" / "final" / "lk_training.json").read_text())["training"]
    plain = json.loads((tmp_path / "plain" / "final" / "lk_training.json").read_text())["training"]
    assert record["data"]["train_samples"] == plain["data"]["train_samples"] == 20
    assert record["heldout"] == plain["heldout"] and "eval_data" not in plain
    (entry,) = record["eval_data"]
    assert {k: entry[k] for k in ("name", "dir", "temperature", "datasets", "samples")} == {
        "name": "eval",
        "dir": eval_dir,
        "temperature": 0.0,
        "datasets": ["mtbench"],
        "samples": 6,
    }
    # The recorded metrics are those of the exported drafter on the eval samples.
    target = TargetModel(tiny[0])
    drafter = load_drafter(tmp_path / "with-eval" / "final", target=target)
    samples = load_samples(Path(eval_dir))
    expected = evaluate(
        drafter, OnlineCapture(target, drafter.aux_layer_ids_needed()), samples, list(range(6)), 2, 4
    )
    for key in ("per_position_alpha", "top1_agreement", "positions"):
        assert entry[key] == pytest.approx(expected[key], abs=2e-5)
    log = [json.loads(line) for line in (tmp_path / "with-eval" / "log.jsonl").read_text().splitlines()]
    assert [r["eval"]["eval_data"][0]["samples"] for r in log if "eval" in r] == [6, 6]


@pytest.mark.vllm
def test_eval_split_data_is_refused_for_training(tiny, tmp_path):
    eval_dir = make_tiny_data(tmp_path / "eval", tiny[0], num_samples=6, settings=EVAL_SETTINGS)
    config = train_config(tiny, tmp_path / "run", **{"data.dirs": [tiny[1], eval_dir]})
    with pytest.raises(UserError, match=r"data.dirs: .*eval.* holds eval-split prompts .* data.eval_dirs"):
        train(config, "tiny", progress=False)


@pytest.mark.vllm
def test_data_of_another_target_is_refused(tiny, tmp_path):
    other = make_tiny_target(tmp_path / "other", seed=1)
    data = make_tiny_data(tmp_path / "data", other, num_samples=6)
    with pytest.raises(UserError, match="was generated by target"):
        train(train_config(tiny, tmp_path / "run", **{"data.dirs": [data]}), "tiny", progress=False)


# ------------------------------------------------------------------------------------------ DDP and FSDP2
def _torchrun(config_path: Path, output: Path, *extra, env) -> subprocess.CompletedProcess:
    from serving.launcher import free_port

    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            "-m",
            "lk_vllm.cli",
            "train",
            "--config",
            str(config_path),
            "--no-progress",
            "--output",
            str(output),
            *extra,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _copy_checkpoint(source_run: Path, step: int, run: Path) -> None:
    import shutil

    shutil.copytree(source_run / "checkpoints" / f"step-{step}", run / "checkpoints" / f"step-{step}")


@pytest.mark.e2e
@pytest.mark.slow
def test_ddp_and_fsdp_on_two_gloo_ranks_match_one_process(tiny, tmp_path):
    path = _config_file(
        tiny, tmp_path, **{"training.max_steps": 4, "training.eval_every": 2, "training.checkpoint_every": 2}
    )
    env = {**os.environ, "LK_VLLM_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    single = _run_cli(path, "--output", str(tmp_path / "single"), env=env)
    assert single.wait() == 0, single.stdout.read()
    expected = json.loads((tmp_path / "single" / "summary.json").read_text())
    # DDP also reads an offline cache the two ranks built together (float32: the online states exactly).
    offline = ["--set", "training.capture=offline", "--set", "training.cache_dtype=float32"]
    for parallel, extra in (("ddp", offline), ("fsdp", [])):
        result = _torchrun(
            path, tmp_path / parallel, "--set", f"training.parallel={parallel}", *extra, env=env
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"2 rank(s), {parallel}" in result.stderr
        assert ("hidden-state cache" in result.stderr) == bool(extra)
        _assert_same_weights(_weights(tmp_path / "single"), _weights(tmp_path / parallel), atol=1e-5)
        # The held-out evaluation, each rank scoring half of the samples, is one process's.
        summary = json.loads((tmp_path / parallel / "summary.json").read_text())
        assert summary["best"]["step"] == expected["best"]["step"]
        assert summary["final"]["positions"] == expected["final"]["positions"]
        assert summary["final"]["per_position_alpha"] == pytest.approx(
            expected["final"]["per_position_alpha"], abs=1e-5
        )
    # Checkpoints hold whole tensors by name: one process's resumes under FSDP2 on two ranks, FSDP2's in one.
    _copy_checkpoint(tmp_path / "single", 2, tmp_path / "to-fsdp")
    result = _torchrun(path, tmp_path / "to-fsdp", "--resume", "--set", "training.parallel=fsdp", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resuming" in result.stderr and "step 2" in result.stderr
    _assert_same_weights(_weights(tmp_path / "single"), _weights(tmp_path / "to-fsdp"), atol=1e-5)
    _copy_checkpoint(tmp_path / "fsdp", 2, tmp_path / "from-fsdp")
    resumed = _run_cli(path, "--output", str(tmp_path / "from-fsdp"), "--resume", env=env)
    assert resumed.wait() == 0, resumed.stdout.read()
    _assert_same_weights(_weights(tmp_path / "single"), _weights(tmp_path / "from-fsdp"), atol=1e-5)


@pytest.mark.e2e
@pytest.mark.slow
def test_a_target_sharded_over_two_ranks_trains_like_one_process(tiny, tmp_path):
    # 5 held-out samples one at a time: rank 1 has one evaluation batch fewer and must idle through it.
    path = _config_file(
        tiny,
        tmp_path,
        **{
            "training.max_steps": 3,
            "training.eval_every": 3,
            "training.checkpoint_every": 3,
            "data.heldout": 5,
            "training.eval_batch_size": 1,
        },
    )
    env = {**os.environ, "LK_VLLM_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    single = _run_cli(path, "--output", str(tmp_path / "single"), env=env)
    assert single.wait() == 0, single.stdout.read()
    expected = json.loads((tmp_path / "single" / "summary.json").read_text())["final"]
    sharded = ["--set", "training.parallel=fsdp", "--set", "training.shard_target=true"]
    # Offline, the whole data set is one cache shard: rank 1 has nothing to capture and idles through rank 0's.
    offline = ["--set", "training.capture=offline", "--set", "training.cache_dtype=float32"]
    for name, extra in (("online", []), ("offline", offline)):
        result = _torchrun(path, tmp_path / name, *sharded, *extra, env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "2 rank(s), fsdp; target layers sharded" in result.stderr
        _assert_same_weights(_weights(tmp_path / "single"), _weights(tmp_path / name), atol=1e-5)
        final = json.loads((tmp_path / name / "summary.json").read_text())["final"]
        assert final["positions"] == expected["positions"]
        assert final["per_position_alpha"] == pytest.approx(expected["per_position_alpha"], abs=1e-5)


def test_fsdp_without_torchrun_fails_before_loading_anything(tiny, tmp_path, monkeypatch):
    import lk_vllm.target_model

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(lk_vllm.target_model, "TargetModel", None)  # loading a model would fail differently
    with pytest.raises(UserError, match=r"training.parallel=fsdp needs torchrun"):
        train(
            train_config(
                tiny, tmp_path / "run", **{"training.parallel": "fsdp", "data.dirs": [str(tmp_path / "x")]}
            ),
            "tiny",
            progress=False,
        )


@pytest.mark.vllm
def test_a_checkpoint_of_an_older_format_is_refused_in_one_line(tiny, tmp_path):
    config = train_config(tiny, tmp_path / "run", **{"training.max_steps": 2, "training.checkpoint_every": 2})
    train(config, "tiny", progress=False)
    step = tmp_path / "run" / "checkpoints" / "step-2"
    state = ckpt.load_checkpoint(step)
    del state["format"]
    torch.save(state, step / ckpt.STATE_FILE)
    with pytest.raises(UserError, match="written by an older lk-vllm"):
        train(config, "tiny", resume=True, progress=False)


# ------------------------------------------------------------------------------------------ offline capture
@pytest.mark.vllm
@pytest.mark.slow
def test_offline_capture_gives_the_online_results(tiny, tmp_path, monkeypatch):
    import json

    monkeypatch.setenv("LK_VLLM_HOME", str(tmp_path / "home"))
    # A draft vocabulary: offline, the loss reads the target's draft columns and the cached normaliser.
    _no_tokenizer(monkeypatch)
    vocab = {"model.draft_vocab_size": 128}
    online = train(train_config(tiny, tmp_path / "online", **vocab), "tiny", progress=False)
    exact = train(
        train_config(
            tiny,
            tmp_path / "offline32",
            **vocab,
            **{"training.capture": "offline", "training.cache_dtype": "float32"},
        ),
        "tiny",
        progress=False,
    )
    _assert_same_weights(_weights(tmp_path / "online"), _weights(tmp_path / "offline32"), atol=1e-5)
    assert exact["final"]["expected_acceptance_length"] == pytest.approx(
        online["final"]["expected_acceptance_length"], abs=1e-5
    )
    half = train(
        train_config(
            tiny,
            tmp_path / "offline16",
            **vocab,
            **{"training.capture": "offline", "training.cache_dtype": "bfloat16"},
        ),
        "tiny",
        progress=False,
    )
    assert half["final"]["expected_acceptance_length"] == pytest.approx(
        online["final"]["expected_acceptance_length"], abs=2e-3
    )
    caches = sorted((tmp_path / "home" / "capture").iterdir())
    assert len(caches) == 2  # keyed by dtype (and target, data, layers, length)
    for cache in caches:
        manifest = json.loads((cache / "manifest.json").read_text())
        assert manifest["bytes"] == sum(p.stat().st_size for p in cache.glob("shard-*.safetensors")) > 0
        assert manifest["num_samples"] == 24
        # aux (3 layers) + final hidden state, hidden size 64, + one fp32 normaliser: no logits stored.
        width = 4 * 64 * (4 if manifest["dtype"] == "float32" else 2) + 4
        assert manifest["bytes"] < manifest["tokens"] * width * 1.1


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["eagle3", "medusa", "mlp_speculator", "draft_model"])
def test_every_architecture_trains_and_exports(tiny, tmp_path, architecture):
    import json

    from lk_vllm.drafters import load_drafter

    overrides = {"model.architecture": architecture, "training.max_steps": 3, "training.eval_every": 3}
    if architecture == "draft_model":
        overrides["model.options"] = {"num_layers": 1}
    summary = train(train_config(tiny, tmp_path / "run", **overrides), "tiny", progress=False)
    alphas = summary["final"]["per_position_alpha"]
    assert len(alphas) == 2 and all(0 < a <= 1 for a in alphas)
    record = json.loads((tmp_path / "run" / "final" / "lk_training.json").read_text())
    assert record["architecture"] == architecture
    assert load_drafter(tmp_path / "run" / "final").architecture == architecture


@pytest.mark.vllm
@pytest.mark.slow
def test_gradient_accumulation_equals_the_whole_batch_when_micro_batches_are_alike(tiny, tmp_path):
    """With equal-length samples every micro-batch has the same number of positions, so the mean of the
    micro-batch means is the batch mean (KL: no batch statistic inside the loss) and the runs agree."""
    data = make_tiny_data(tmp_path / "equal", tiny[0], num_samples=12, lengths=(24, 24), prompt_length=6)
    common = {
        "data.dirs": [data],
        "loss.kind": "kl",
        "training.max_steps": 3,
        "training.eval_every": 3,
        "training.checkpoint_every": 3,
    }
    train(train_config(tiny, tmp_path / "whole", **common), "tiny", progress=False)
    train(
        train_config(tiny, tmp_path / "micro", **common, **{"training.grad_accumulation": 2}),
        "tiny",
        progress=False,
    )
    _assert_same_weights(_weights(tmp_path / "whole"), _weights(tmp_path / "micro"), atol=1e-5)
    with pytest.raises(UserError, match="multiple of the 1 rank"):
        train(
            train_config(tiny, tmp_path / "bad", **common, **{"training.grad_accumulation": 3}),
            "tiny",
            progress=False,
        )


def test_shared_target_logits_equal_the_direct_ones(tiny):
    from lk_vllm.target_model import TargetModel
    from training.capture import OnlineCapture, collate
    from training.data import load_samples
    from training.train import SharedTargetLogits

    target = TargetModel(tiny[0])
    samples = load_samples(Path(tiny[1]))
    batch = collate(samples, [0, 1, 2])
    states = OnlineCapture(target, None).states(batch)
    shared = SharedTargetLogits(states, batch.loss_mask)
    wanted = torch.zeros_like(batch.loss_mask)
    wanted[:, :-1] = batch.loss_mask[:, 1:]
    assert shared.table.shape[0] == int(wanted.sum())  # one row per position predicting a response token
    everywhere = batch.attention_mask.nonzero(as_tuple=True)  # includes prompt positions: the fallback path
    torch.testing.assert_close(shared.logits_at(*everywhere), states.logits_at(*everywhere))
    inside = wanted.nonzero(as_tuple=True)
    torch.testing.assert_close(shared.logits_at(*inside), states.logits_at(*inside))
    assert shared.aux_layer_ids == states.aux_layer_ids and shared.final_hidden is states.final_hidden


def _no_tokenizer(monkeypatch):
    """The tiny target has no tokenizer files: a draft vocabulary then needs no special tokens."""
    from lk_vllm.target_model import TargetModel

    monkeypatch.setattr(TargetModel, "tokenizer", property(lambda self: None))


@pytest.mark.vllm
def test_init_from_starts_at_the_exported_drafter(tiny, tmp_path, monkeypatch):
    """--init-from: the run starts from an exported drafter's weights and draft vocabulary (with a learning
    rate of ~0 its export is the same weights), and refuses a drafter of another architecture."""
    _no_tokenizer(monkeypatch)
    vocab = {"model.draft_vocab_size": 128, "training.max_steps": 2, "training.eval_every": 2}
    first = train(train_config(tiny, tmp_path / "a", **vocab), "tiny", progress=False)
    warm = {
        "model.init_from": str(tmp_path / "a" / "final"),
        "training.max_steps": 1,
        "training.eval_every": 1,
        "optimizer.lr": 1e-12,
        "optimizer.warmup_steps": 1,
        "model.draft_vocab_size": 200,
    }
    summary = train(train_config(tiny, tmp_path / "b", **warm), "tiny", progress=False)
    _assert_same_weights(_weights(tmp_path / "a"), _weights(tmp_path / "b"))
    assert summary["final"]["expected_acceptance_length"] == pytest.approx(
        first["final"]["expected_acceptance_length"], abs=1e-5
    )  # same drafter, same held-out samples
    with pytest.raises(UserError, match=r"is a eagle3 drafter but model.architecture is medusa"):
        train(
            train_config(tiny, tmp_path / "d", **{**warm, "model.architecture": "medusa"}),
            "tiny",
            progress=False,
        )
    with pytest.raises(UserError, match="is not an exported drafter directory"):
        train(
            train_config(tiny, tmp_path / "e", **{**warm, "model.init_from": str(tmp_path / "none")}),
            "tiny",
            progress=False,
        )


def test_cached_logsumexp_gives_the_full_rows_loss(tiny, tmp_path):
    """Offline, a drafter with its own vocabulary reads only the draft ids' columns of the target and the
    cached normaliser: the same table values, normaliser and K-step loss as the full rows."""
    from lk_vllm.drafters import create_drafter, multi_step_loss
    from lk_vllm.target_model import TargetModel
    from training.capture import OfflineCapture, build_cache, collate
    from training.data import load_samples
    from training.train import SharedTargetLogits

    target = TargetModel(tiny[0])
    samples = load_samples(Path(tiny[1]))
    d2t = torch.randperm(target.vocab_size, generator=torch.Generator().manual_seed(0))[:100]
    drafter = create_drafter("eagle3", target, draft_to_target=d2t)
    aux = drafter.aux_layer_ids_needed()
    build_cache(target, samples, aux, tmp_path / "cache", dtype="float32", progress=False)
    batch = collate(samples, [0, 1, 2])
    states = OfflineCapture(target, tmp_path / "cache", aux).states(batch)
    full = states.all_logits()
    real = batch.attention_mask
    torch.testing.assert_close(
        states.final_logsumexp[real], torch.logsumexp(full, -1)[real], rtol=1e-6, atol=1e-5
    )
    shared = SharedTargetLogits(states, batch.loss_mask, drafter.draft_to_target)
    inside = batch.loss_mask[:, 1:].nonzero(as_tuple=True)
    rows = shared.rows_at(*inside)
    torch.testing.assert_close(shared.table[rows], full[inside][:, d2t])
    torch.testing.assert_close(shared.logits_at(*inside), full[inside])  # logits_at still gives full rows
    steps = drafter.training_steps(states, 2)
    kwargs = dict(
        kind="lambda", draft_to_target=drafter.draft_to_target, loss_mask=batch.loss_mask, gamma=0.8
    )
    columns = multi_step_loss(steps, shared, **kwargs)
    rows_loss = multi_step_loss(steps, SharedTargetLogits(states, batch.loss_mask), **kwargs)
    assert float(columns["loss"].detach()) == pytest.approx(float(rows_loss["loss"].detach()), rel=1e-5)
    assert columns["alpha"] == pytest.approx(rows_loss["alpha"], rel=1e-5)


@pytest.mark.vllm
@pytest.mark.slow
def test_resume_refuses_changed_data(tiny, tmp_path):
    data = make_tiny_data(tmp_path / "data", tiny[0], num_samples=12, seed=1)
    train(
        train_config(tiny, tmp_path / "run", **{"data.dirs": [data], "training.max_steps": 2}),
        "tiny",
        progress=False,
    )
    make_tiny_data(tmp_path / "data", tiny[0], num_samples=12, seed=2)  # same directory, other samples
    with pytest.raises(UserError, match="differs from the data .*step-2 was trained on"):
        train(
            train_config(tiny, tmp_path / "run", **{"data.dirs": [data], "training.max_steps": 2}),
            "tiny",
            resume=True,
            progress=False,
        )


def test_cuda_on_a_machine_without_one_fails_before_loading_anything(tiny, tmp_path, monkeypatch):
    import lk_vllm.target_model

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(
        lk_vllm.target_model, "TargetModel", None
    )  # loading the target would raise a TypeError
    with pytest.raises(UserError, match=r"training\.device=cuda"):
        train(train_config(tiny, tmp_path / "run", **{"training.device": "cuda"}), progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.vllm
def test_bf16_autocast_on_cpu_trains_and_logs_its_placement(tiny, tmp_path, capfd):
    # The GPU code path's precision handling (autocast around the drafter and the loss, fp32 master weights),
    # run on the CPU: it trains, the weights stay fp32, and the run log says where and how it ran.
    summary = train(
        train_config(
            tiny,
            tmp_path / "run",
            **{"training.device": "cpu", "training.precision": "bf16", "training.max_steps": 3},
        ),
        progress=False,
    )
    assert summary["final"]["expected_acceptance_length"] > 1.0
    assert all(
        tensor.dtype == torch.float32
        for tensor in _weights(tmp_path / "run").values()
        if tensor.is_floating_point()
    )
    assert "device cpu, bfloat16 autocast; 1 rank(s)" in capfd.readouterr().err


# ------------------------------------------------------------------------------------------ --dry-run
def _llama_config_only(directory: Path, hidden: int, intermediate: int, layers: int, heads: int) -> str:
    """A Llama target directory with config.json only: no weights, nothing downloaded."""
    directory.mkdir()
    (directory / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "hidden_size": hidden,
                "intermediate_size": intermediate,
                "num_hidden_layers": layers,
                "num_attention_heads": heads,
                "num_key_value_heads": 8,
                "vocab_size": 128256,
                "max_position_embeddings": 131072,
                "rms_norm_eps": 1e-5,
                "rope_theta": 500000.0,
                "tie_word_embeddings": False,
            }
        )
    )
    return str(directory)


def _dry_run(capsys, recipe: str, target: str, *extra) -> str:
    from lk_vllm.cli import main

    assert (
        main(
            [
                "train",
                "--recipe",
                recipe,
                "--target",
                target,
                "--dry-run",
                "--set",
                "training.device=cpu",
                "--set",
                "training.precision=bf16",
                *extra,
            ]
        )
        == 0
    )
    return capsys.readouterr().out


def test_dry_run_sizes_an_8b_recipe_from_its_config_alone(tmp_path, capsys, monkeypatch):
    target = _llama_config_only(tmp_path / "llama-3.1-8b", 4096, 14336, 32, 32)
    monkeypatch.setenv("WORLD_SIZE", "8")
    out = _dry_run(capsys, "llama31-8b-eagle3", target)
    trainable = float(out.split(" drafter, ")[1].split("M trainable")[0])
    # fc 3H x H, one layer over 2H inputs (q, k, v, o, MLP) and a 32,000-row head: ~0.45B parameters.
    assert 400 < trainable < 500, out
    assert "8 rank(s), 16384 tokens per micro-batch" in out  # 64 sequences / 8 GPUs / 4 micro-batches
    total = float(out.splitlines()[-1].split()[1])
    assert 40 < total < 80, (
        out
    )  # 16 GB of bf16 target weights, 7 GB of drafter state, the rest per token: an 80 GB GPU
    # FSDP2 on 8 ranks: whole weights and grads in a step (8 bytes a parameter) + 1/8 of 16 bytes, not 16.
    sharded = _dry_run(capsys, "llama31-8b-eagle3", target, "--set", "training.parallel=fsdp")

    def drafter_gb(text):
        return float(
            next(line for line in text.splitlines() if "drafter" in line and "GB" in line).split()[-2]
        )

    assert drafter_gb(sharded) == pytest.approx(drafter_gb(out) * 10 / 16, abs=0.02), sharded


def test_dry_run_fits_the_70b_recipe_on_80_gb_gpus(tmp_path, capsys, monkeypatch):
    target = _llama_config_only(tmp_path / "llama-3.3-70b", 8192, 28672, 80, 64)
    monkeypatch.setenv("WORLD_SIZE", "8")
    out = _dry_run(capsys, "llama33-70b-eagle3", target)
    lines = {line.split("  ")[1].strip(): float(line.split()[-2]) for line in out.splitlines()[1:]}
    # 70.6B bf16 parameters: 80 layers of 0.856B sharded 8 ways plus one whole, embeddings and lm_head whole.
    target_gb = next(size for name, size in lines.items() if name.startswith("target weights"))
    assert 20 < target_gb < 26, out
    assert 60 < lines["total"] < 80, out  # an 80 GB GPU, as the recipe says


def test_eval_datasets_are_prepared_from_the_eval_split_at_t0_and_t1_once(tmp_path, monkeypatch):
    from lk_vllm.assets import resolve_target
    from training import prepare as prepare_module
    from training.train import Dist, ensure_eval_data

    target = resolve_target(None)
    monkeypatch.setenv("LK_VLLM_HOME", str(tmp_path))
    calls = []

    def fake_prepare(settings, output, engine_settings, progress):
        calls.append(
            (settings.datasets, settings.split, settings.limit, settings.temperature, settings.top_p)
        )
        output.mkdir(parents=True)
        (output / "manifest.json").write_text("{}")

    monkeypatch.setattr(prepare_module, "prepare", fake_prepare)
    overrides = {
        "data.eval_datasets": ["mtbench", "gsm8k"],
        "data.eval_limit": 5,
        "data.eval_dirs": ["~/mine"],
    }
    config, _ = load_config(overrides=overrides)
    dirs = ensure_eval_data(config, target, Dist(), progress=False)
    assert calls == [
        (["mtbench"], "eval", 5, 0.0, 1.0),
        (["mtbench"], "eval", 5, 1.0, 1.0),
        (["gsm8k"], "eval", 5, 0.0, 1.0),
        (["gsm8k"], "eval", 5, 1.0, 1.0),
    ]
    assert dirs[0] == str(Path("~/mine").expanduser()) and len(set(dirs)) == 5
    assert ensure_eval_data(config, target, Dist(), progress=False) == dirs and len(calls) == 4  # reused


def test_each_dataset_is_prepared_into_its_own_cached_directory(tmp_path, monkeypatch):
    """Adding a dataset to a recipe regenerates only that dataset: one prepare output per dataset, each named
    by its own settings' hash, and a finished one is reused. Another chat template (given, or edited into the
    target's tokenizer files) is other data."""
    import shutil

    from lk_vllm.assets import resolve_target
    from training import prepare as prepare_module
    from training.train import Dist, ensure_data

    target = resolve_target(None)
    monkeypatch.setenv("LK_VLLM_HOME", str(tmp_path))
    calls = []

    def fake_prepare(settings, output, engine_settings, progress):
        calls.append(settings.datasets)
        output.mkdir(parents=True)
        (output / "manifest.json").write_text("{}")

    monkeypatch.setattr(prepare_module, "prepare", fake_prepare)
    config, _ = load_config(overrides={"data.datasets": ["sharegpt", "gsm8k"], "data.limit": 8})
    first = ensure_data(config, target, Dist(), progress=False)
    assert calls == [["sharegpt"], ["gsm8k"]] and len(set(first)) == 2
    config, _ = load_config(overrides={"data.datasets": ["gsm8k"], "data.limit": 8})
    assert ensure_data(config, target, Dist(), progress=False) == first[1:]
    assert len(calls) == 2  # gsm8k's finished directory was reused

    config, _ = load_config(
        overrides={"data.datasets": ["gsm8k"], "data.limit": 8, "data.chat_template": "chatml"}
    )
    assert ensure_data(config, target, Dist(), progress=False) != first[1:] and len(calls) == 3
    edited = tmp_path / "edited-target"
    shutil.copytree(target, edited)
    tokenizer_config = json.loads((edited / "tokenizer_config.json").read_text())
    tokenizer_config["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (edited / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (edited / "chat_template.jinja").unlink(missing_ok=True)
    config, _ = load_config(overrides={"data.datasets": ["gsm8k"], "data.limit": 8})
    moved = ensure_data(config, str(edited), Dist(), progress=False)
    assert moved != first[1:] and len(calls) == 4
    assert Path(moved[0]).name.split("-")[1] == Path(first[1]).name.split("-")[1]  # same weights' fingerprint


@pytest.mark.vllm
def test_export_dtype_writes_bf16_weights_from_fp32_master_weights(tiny, tmp_path):
    """training.export_dtype=bfloat16 (the committed default drafter's 20 MB budget): both exports hold bf16
    float weights equal to the fp32 ones rounded, index tensors untouched; the export loads back."""
    from lk_vllm.drafters import load_drafter

    fp32 = train_config(tiny, tmp_path / "fp32", **{"training.max_steps": 2, "training.eval_every": 2})
    bf16 = train_config(
        tiny,
        tmp_path / "bf16",
        **{"training.max_steps": 2, "training.eval_every": 2, "training.export_dtype": "bfloat16"},
    )
    train(fp32, "fp32", progress=False)
    train(bf16, "bf16", progress=False)
    full, half = _weights(tmp_path / "fp32"), _weights(tmp_path / "bf16")
    assert set(full) == set(half)
    for name, tensor in full.items():
        if tensor.is_floating_point():
            assert half[name].dtype == torch.bfloat16, name
            assert torch.equal(half[name], tensor.to(torch.bfloat16)), name
        else:
            assert torch.equal(half[name], tensor), name
    best = load_file(str(tmp_path / "bf16" / "best" / "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in best.values() if t.is_floating_point())
    load_drafter(tmp_path / "bf16" / "final")


# ------------------------------------------------------------------------------------------ flags over a recipe
def test_flags_and_set_override_the_recipe(tmp_path):
    args = train_args(
        "--recipe",
        "smoke-eagle3",
        "--loss",
        "kl",
        "--eta",
        "5",
        "--data",
        "/d1",
        "--data",
        "/d2",
        "--output",
        str(tmp_path),
        "--set",
        "optimizer.lr=1e-3",
        "--set",
        "optimizer.betas=[0.8, 0.9]",
        "--set",
        "model.options={aux_layer_ids: [1, 2, 3]}",
    )
    config, name = config_from_args(args)
    assert name == "smoke-eagle3"
    assert config.loss.kind == "kl" and config.loss.eta == 5.0
    assert config.data.dirs == ["/d1", "/d2"] and config.output == str(tmp_path)
    assert config.optimizer.lr == 1e-3 and config.optimizer.betas == (0.8, 0.9)
    assert config.model.options == {"aux_layer_ids": [1, 2, 3]}
    assert config.model.architecture == "eagle3"  # untouched fields keep the recipe's value


def test_print_config(capsys):
    from training.train import run

    assert run(train_args("--recipe", "smoke-mlp", "--print-config")) == 0
    out = capsys.readouterr().out
    assert "architecture: mlp_speculator" in out


def test_train_flags_override_the_recipe_and_absent_ones_keep_it():
    config, _ = config_from_args(
        train_args("--recipe", "smollm2-eagle3", "--eta", "5", "--data", "a", "--data", "b")
    )
    recipe, _ = load_config(recipe="smollm2-eagle3")
    assert (config.loss.eta, config.data.dirs) == (5.0, ["a", "b"])
    assert (config.loss.kind, config.output, config.data.chat_template) == (
        recipe.loss.kind,
        recipe.output,
        recipe.data.chat_template,
    )


# ------------------------------------------------------------------------------------------ the smoke recipe on the default target
@pytest.mark.e2e
@pytest.mark.slow
def test_smoke_recipe_prepares_trains_and_exports(default_target, tmp_path):
    from lk_vllm.assets import lk_home, target_fingerprint
    from lk_vllm.drafters import load_drafter, speculative_config_for
    from lk_vllm.target_model import TargetModel

    home = tmp_path / "home"
    home.mkdir()
    (home / "models").symlink_to(lk_home() / "models")  # the built target; everything else starts empty
    env = {**os.environ, "LK_VLLM_HOME": str(home)}
    command = [
        sys.executable,
        "-m",
        "lk_vllm.cli",
        "train",
        "--recipe",
        "smoke-eagle3",
        "--no-progress",
        "--set",
        "data.limit=12",
        "--set",
        "data.max_tokens=48",
        "--set",
        "data.heldout=2",
        "--set",
        "training.max_steps=4",
        "--set",
        "training.eval_every=2",
        "--output",
        str(tmp_path / "run"),
    ]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "preparing data: the target regenerates sharegpt" in result.stderr

    data_dirs = list((home / "data").iterdir())
    assert len(data_dirs) == 1
    manifest = json.loads((data_dirs[0] / "manifest.json").read_text())
    assert manifest["prompts"] == 12 and manifest["settings"]["target_fingerprint"] == target_fingerprint(
        default_target
    )
    cache = json.loads(next((home / "capture").glob("*/manifest.json")).read_text())
    assert cache["num_samples"] == manifest["samples"] and cache["dtype"] == "bfloat16"

    final = tmp_path / "run" / "final"
    record = json.loads((final / "lk_training.json").read_text())
    training = record["training"]
    assert training["loss"] == "lambda" and training["steps"] == 4 and training["num_steps"] == 3
    assert training["target_fingerprint"] == target_fingerprint(default_target)
    heldout = training["heldout"]
    assert len(heldout["per_position_alpha"]) == 3 and heldout["expected_acceptance_length"] > 1.0
    drafter = load_drafter(final, TargetModel(default_target))
    assert drafter.draft_vocab_size == 8192
    assert speculative_config_for(final, 3)["method"] == "eagle3"
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "eval" in r] == [2, 4]
