"""The repository as the tests read it: its root, the modules of its three packages (read from the tree, nothing
imported), a script of benchmarks/ loaded as a module, and the ``lk-vllm`` command run as a process."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lk_vllm", "training", "serving")


def package_modules() -> dict[str, Path]:
    """Each module and package (its ``__init__.py``) of lk_vllm, training and serving, dotted name -> path."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def load_script(relative: str):
    """A script of the repository (e.g. ``benchmarks/kl_vs_lk_seeds.py``) loaded as a module of its file name."""
    path = ROOT / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "lk_vllm.cli", *args], capture_output=True, text=True, timeout=120, env=env
    )
