"""The ``lk-vllm`` command line: one program, one subcommand per step of the workflow.

Each subcommand lives in the module that does the work (the applications ``training`` and ``serving``, or the
library); that module defines ``add_arguments(parser)`` and ``run(args) -> int``. This table is the one place
the library names the applications, by module path: nothing in ``lk_vllm`` imports them. Modules are imported only when their command runs, so ``lk-vllm --help`` stays fast
(importing vLLM alone takes seconds).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from lk_vllm.errors import UserError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "models": (
        "lk_vllm.assets",
        "build the embedded default target (SmolLM2-135M-Instruct) or list the cache",
    ),
    "prepare": ("training.prepare", "regenerate training responses with the target (on-policy data)"),
    "train": ("training.train", "train a drafter with an LK (or KL) loss"),
    "eval": ("training.evaluate", "measure a drafter's acceptance length (torch simulation or vLLM)"),
    "validate": (
        "lk_vllm.validate",
        "check a drafter before serving it: vLLM's format, target fit, a served probe",
    ),
    "serve": ("serving.launcher", "start vLLM's OpenAI server with a drafter and the lk-vllm plugin"),
    "calibrate": ("serving.calibrate", "measure the no-speculation baseline used for live speedup"),
    "send": (
        "serving.traffic",
        "replay dataset prompts against a running server; report per-request acceptance",
    ),
    "bench": ("lk_vllm.bench", "benchmark drafters against no speculation through vLLM"),
    "demo": ("serving.demo", "the whole workflow on the embedded default target, explained step by step"),
}


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lk-vllm",
        description="Train speculative-decoding drafters with LK losses and serve them in vLLM.",
    )
    from lk_vllm import __version__

    parser.add_argument("--version", action="version", version=f"lk-vllm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _build_parser()
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # prints help / version / an "invalid choice" error
        parser.print_help()
        return 2
    name, rest = argv[0], argv[1:]
    module_name, help_text = COMMANDS[name]
    os.environ.setdefault(
        "HF_HUB_OFFLINE", "1"
    )  # nothing is downloaded at run time (before transformers loads)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            print(f"lk-vllm: the '{name}' command is not available in this version", file=sys.stderr)
            return 2
        raise
    command_parser = argparse.ArgumentParser(prog=f"lk-vllm {name}", description=help_text)
    module.add_arguments(command_parser)
    args = command_parser.parse_args(rest)
    from lk_vllm.log import set_command

    set_command(name)
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("lk-vllm: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # user-facing errors are one line; bugs keep their traceback
        if isinstance(exc, UserError):
            print(f"lk-vllm {name}: error: {exc}", file=sys.stderr)
            return 1
        raise
    finally:
        set_command(None)  # main() called in-process (tests, scripts) leaves no command named


if __name__ == "__main__":
    sys.exit(main())
