"""The lk-vllm command line: one program, fast help, one-line user errors."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


def _cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "lk_vllm.cli", *args], capture_output=True, text=True, timeout=120, env=env
    )


def test_help_lists_every_command():
    out = _cli("--help")
    assert out.returncode == 0
    # The command names are the first word of the lines under COMMAND (descriptions say "train", "serve" too).
    listing = out.stdout.split("COMMAND\n", 1)[1]
    names = [
        line.split()[0]
        for line in listing.splitlines()
        if line.startswith("    ") and not line.startswith("     ")
    ]
    assert names == [
        "models",
        "prepare",
        "train",
        "eval",
        "validate",
        "serve",
        "calibrate",
        "send",
        "bench",
        "demo",
    ]


def test_unknown_command_fails():
    out = _cli("frobnicate")
    assert out.returncode == 2 and "invalid choice" in out.stderr


def test_models_list_shows_the_cache(default_target):
    out = _cli("models", "--list")
    assert out.returncode == 0
    assert "smollm2-135m-instruct" in out.stdout and " ok " in out.stdout


def test_user_errors_are_one_line(tmp_path):
    import os

    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    (tmp_path / "lk_fake_command.py").write_text(
        "from lk_vllm.errors import UserError\n"
        "def add_arguments(p): pass\n"
        "def run(a): raise UserError('--flag: expected X, found Y')\n"
    )
    code = (
        "import sys; from lk_vllm import cli; cli.COMMANDS['fake'] = ('lk_fake_command', 'test');"
        "sys.exit(cli.main(['fake']))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 1
    assert out.stderr.strip() == "lk-vllm fake: error: --flag: expected X, found Y"


@pytest.mark.unit
def test_eval_and_bench_take_the_same_workload_flags():
    import argparse

    from lk_vllm.bench import command as bench
    from training import evaluate

    def actions(module):
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        return {
            action.dest: (action.option_strings, action.default, action.help) for action in parser._actions
        }

    shared = {"dataset", "limit", "chat_template", "num_speculative_tokens", "max_tokens", "target"}
    eval_flags, bench_flags = actions(evaluate), actions(bench)
    assert shared <= eval_flags.keys() and shared <= bench_flags.keys()
    for dest in shared - {"target"}:  # --target says what each command defaults to
        assert eval_flags[dest] == bench_flags[dest], dest
