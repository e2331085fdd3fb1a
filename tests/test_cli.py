"""The lk-vllm command line: one program, fast help, one-line user errors."""

import subprocess
import sys

import pytest
from repo_helpers import run_cli

pytestmark = pytest.mark.e2e


def test_help_lists_every_command():
    out = run_cli("--help")
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
    out = run_cli("frobnicate")
    assert out.returncode == 2 and "invalid choice" in out.stderr


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
