"""`lk-vllm serve`'s launcher (serving.launcher) without starting a server: the vLLM command line it
builds (faithful sampling, secrets through the environment, the capture and drift settings, EAGLE-3 and
MLP-speculator drafters), bad input as one-line errors, and calibration on first start. Served end to end in
test_serve.py and test_swap.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from drafter_helpers import drafter_dir, mlp_speculator_dirs
from server_helpers import make_profile
from train_helpers import FAKE_TARGET_CONFIG, serve_args

from lk_vllm.errors import UserError
from lk_vllm.plugin.server import capture as capture_module
from lk_vllm.plugin.server.drift import DriftSettings

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def servable(tmp_path_factory):
    """A tiny target and an EAGLE-3 drafter for it that pass `lk-vllm validate`'s static checks (serve runs them)."""
    from train_helpers import make_tiny_target

    from lk_vllm.drafters import create_drafter, target_info
    from lk_vllm.target_model import TargetModel

    root = tmp_path_factory.mktemp("servable")
    target = TargetModel(make_tiny_target(root / "target"))
    drafter = create_drafter("eagle3", target).save_pretrained(root / "d", target=target_info(target))
    return Path(target.path), drafter


@pytest.mark.vllm
def test_serve_command_is_vllms_server_with_faithful_sampling(tmp_path, monkeypatch, servable):
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from serving import launcher

    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    target, drafter = servable
    args = serve_args(
        target,
        "--speculative-config",
        json.dumps({"method": "eagle3", "model": str(drafter), "num_speculative_tokens": 2}),
        "--api-key",
        "k",
        "--admin-key",
        "a",
        "--drafters-dir",
        str(tmp_path),
        "--port",
        "9",
        "--",
        "--max-num-batched-tokens",
        "512",
    )
    command = launcher.build_server_command(args)
    assert command.argv[1:3] == ["-m", "vllm.entrypoints.launchers.api_server.entry"]
    parsed = make_arg_parser(FlexibleArgumentParser()).parse_args(command.argv[3:])
    assert parsed.model == str(target) and parsed.port == 9 and parsed.max_num_batched_tokens == 512
    assert parsed.speculative_config["draft_sample_method"] == "probabilistic"
    assert parsed.speculative_config["rejection_sample_method"] == "standard"
    assert parsed.per_request_spec_decode_metrics == "summary"
    assert "k" not in command.argv and "a" not in command.argv  # secrets go through the environment
    assert command.env["VLLM_API_KEY"] == "k" and command.env["LK_VLLM_ADMIN_KEY"] == "a"
    assert command.env["VLLM_PLUGINS"] == "lk_general,lk_stats,lk_endpoints"
    ngram = launcher.build_server_command(
        serve_args(target, "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}')
    )
    spec = json.loads(ngram.argv[ngram.argv.index("--speculative-config") + 1])
    assert spec == {"method": "ngram", "num_speculative_tokens": 3, "rejection_sample_method": "standard"}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--speculative-config", "{bad"], "--speculative-config: expected a JSON object, got invalid JSON"),
        (["--speculative-config", "[1]"], "expected a JSON object, got list"),
        (["--speculative-config", '{"method": "ngram"}'], "expected num_speculative_tokens"),
        (
            [
                "--speculative-config",
                '{"method": "eagle3", "model": "/no/such/dir", "num_speculative_tokens": 1}',
            ],
            "drafter model directory /no/such/dir not found",
        ),
        (
            [
                "--speculative-config",
                '{"method": "ngram", "num_speculative_tokens": 2, "rejection_sample_method": "synthetic"}',
            ],
            "does not preserve the target's distribution",
        ),
        (["--drafter", "/no/such/drafter"], "--drafter /no/such/drafter: directory not found"),
        (["--drafter", "DRAFTER", "--num-speculative-tokens", "0"], "expected an integer >= 1"),
        (["--baseline-profile", "/no/profile.json"], "/no/profile.json: file not found"),
        (["--drafters-dir", "/no/dir"], "--drafters-dir /no/dir: directory not found"),
    ],
)
def test_bad_serve_input_is_one_line_user_error(tmp_path, argv, message):
    from serving import launcher

    target = tmp_path / "target"
    target.mkdir()
    (target / "config.json").write_text(json.dumps(FAKE_TARGET_CONFIG))
    argv = [str(drafter_dir(tmp_path, "dd")) if a == "DRAFTER" else a for a in argv]
    with pytest.raises(UserError) as error:
        launcher.build_server_command(serve_args(target, *argv))
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.e2e
def test_serve_cli_prints_one_line_without_traceback(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lk_vllm.cli",
            "serve",
            "--target",
            str(tmp_path),
            "--speculative-config",
            "{oops",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "lk-vllm serve: error:" in lines[0]


@pytest.mark.vllm
def test_serve_calibrates_once_on_first_start_unless_told_not_to(tmp_path, monkeypatch):
    from lk_vllm.plugin.server import speedup
    from serving import launcher

    monkeypatch.setenv("LK_VLLM_HOME", str(tmp_path / "home"))
    target = tmp_path / "target"
    target.mkdir()
    (target / "config.json").write_text(json.dumps(FAKE_TARGET_CONFIG))
    ngram = ["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2}']
    runs = []
    real_run = subprocess.run

    def fake_run(argv, **kwargs):
        if argv[2:4] != ["lk_vllm.cli", "calibrate"]:
            return real_run(argv, **kwargs)
        runs.append(argv)
        key = speedup.profile_key_for_settings(command.settings)
        make_profile([(1, 0.1)]).save(speedup.profile_path(key))
        return SimpleNamespace(returncode=0)

    monkeypatch.setattr(launcher.subprocess, "run", fake_run)
    args = serve_args(target, *ngram)
    command = launcher.build_server_command(args)
    launcher.ensure_calibrated(command, args)
    assert len(runs) == 1 and runs[0][2:6] == ["lk_vllm.cli", "calibrate", "--target", str(target)]
    assert command.env["LK_VLLM_BASELINE_PROFILE"].startswith(str(tmp_path / "home" / "calibration"))
    again = launcher.build_server_command(args)
    launcher.ensure_calibrated(again, args)  # cached now
    for flags in (["--no-calibrate"], []):
        skipped = serve_args(target, *(ngram if flags else []), *flags)
        launcher.ensure_calibrated(
            launcher.build_server_command(skipped), skipped
        )  # no speculation: no baseline
    assert len(runs) == 1


@pytest.mark.vllm
def test_serve_drafter_dir_becomes_an_eagle3_config_with_probabilistic_drafts(tmp_path, servable):
    from serving import launcher

    target, drafter = servable
    command = launcher.build_server_command(serve_args(target, "--drafter", str(drafter)))
    spec = json.loads(command.argv[command.argv.index("--speculative-config") + 1])
    assert spec == {
        "method": "eagle3",
        "model": str(drafter.resolve()),
        "num_speculative_tokens": 3,
        "rejection_sample_method": "standard",
        "draft_sample_method": "probabilistic",
    }
    with pytest.raises(UserError, match="no config.json"):
        (tmp_path / "bare").mkdir()
        launcher.build_server_command(serve_args(target, "--drafter", str(tmp_path / "bare")))


@pytest.mark.vllm
def test_serve_flags(tmp_path):

    from serving import launcher

    target = tmp_path / "target"
    target.mkdir()
    (target / "config.json").write_text(json.dumps(FAKE_TARGET_CONFIG))
    ngram = ["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2}', "--no-calibrate"]
    command = launcher.build_server_command(
        serve_args(
            target, *ngram, "--capture-low-acceptance", str(tmp_path / "cap"), "--capture-quantile", "0.1"
        )
    )
    settings = json.loads(command.env[capture_module.CAPTURE_ENV])
    assert settings == {"directory": str(tmp_path / "cap"), "quantile": 0.1, "max_megabytes": 1024.0}
    assert (
        json.loads(launcher.build_server_command(serve_args(target, *ngram)).env[capture_module.CAPTURE_ENV])[
            "directory"
        ]
        is None
    )  # off by default
    with pytest.raises(UserError, match="--capture-quantile"):
        launcher.build_server_command(serve_args(target, *ngram, "--capture-quantile", "0"))
    with pytest.raises(UserError, match="^--capture-low-acceptance: needs speculative decoding"):
        launcher.build_server_command(serve_args(target, "--capture-low-acceptance", str(tmp_path / "c")))


@pytest.mark.vllm
def test_serve_hands_the_drift_settings_to_the_server(tmp_path, monkeypatch):
    import argparse

    from lk_vllm.env import DRIFT_ENV
    from serving import launcher

    target = tmp_path / "target"
    target.mkdir()
    (target / "config.json").write_text(json.dumps(FAKE_TARGET_CONFIG))
    parser = argparse.ArgumentParser()
    launcher.add_arguments(parser)
    args = parser.parse_args(
        [str(target), "--drift-threshold", "0.6", "--drift-window", "120", "--drift-reference-minutes", "2"]
    )
    command = launcher.build_server_command(args)
    monkeypatch.setenv(DRIFT_ENV, command.env[DRIFT_ENV])
    assert DriftSettings.from_env() == DriftSettings(threshold=0.6, window_seconds=120, reference_seconds=120)
    with pytest.raises(UserError, match="--drift-window: expected a positive number, got -1"):
        DriftSettings(window_seconds=-1)


@pytest.mark.parametrize(
    "change, named",
    [
        ({"emb_dim": 16}, "target hidden states of size 16 (emb_dim), but the target's hidden size is 8"),
        ({"vocab_size": 64}, "vocabulary has 64 tokens (vocab_size), but the target's has 32"),
    ],
)
@pytest.mark.parametrize("flag", ["--drafter", "--speculative-config"])
def test_mismatched_mlp_speculator_is_refused_before_the_engine_starts(tmp_path, change, named, flag):
    from serving import launcher

    target, drafter = mlp_speculator_dirs(tmp_path, **change)
    value = (
        str(drafter)
        if flag == "--drafter"
        else json.dumps({"method": "mlp_speculator", "model": str(drafter), "num_speculative_tokens": 3})
    )
    with pytest.raises(UserError) as error:
        launcher.build_server_command(serve_args(target, flag, value, "--no-calibrate"))
    message = str(error.value)
    assert named in message and "MLP speculator" in message and "\n" not in message


@pytest.mark.vllm
def test_lk_vllm_serve_builds_the_mlp_speculator_config(tmp_path):
    from serving import launcher

    target, drafter = mlp_speculator_dirs(tmp_path)
    command = launcher.build_server_command(serve_args(target, "--drafter", str(drafter), "--no-calibrate"))
    spec = json.loads(command.argv[command.argv.index("--speculative-config") + 1])
    # Drafts sampled from the stages' distributions at T > 0, standard verification (faithful sampling).
    assert spec == {
        "method": "mlp_speculator",
        "model": str(drafter.resolve()),
        "num_speculative_tokens": 3,
        "rejection_sample_method": "standard",
        "draft_sample_method": "probabilistic",
    }
    with pytest.raises(
        UserError, match="it has 3 stages \\(n_predict\\), fewer than num_speculative_tokens 4"
    ):
        launcher.build_server_command(
            serve_args(target, "--drafter", str(drafter), "--num-speculative-tokens", "4", "--no-calibrate")
        )
