"""The layout of tests/ (the rule is in tests/conftest.py's docstring): every test file's name says what it tests,
a module or package, a command, a script, or one of the checks over the whole repository. Read from the tree and
from lk_vllm/cli.py with ``ast``; nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lk_vllm", "training", "serving")
SCRIPT_DIRS = ("examples", "scripts", "benchmarks")
# Checks over the whole repository rather than one module.
REPOSITORY_CHECKS = {
    "layering": "the imports between lk_vllm, training and serving",
    "packaging": "the install recipes: pyproject.toml, Dockerfile, Makefile, .ci",
    "tiers": "the test tiers (tests/conftest.py)",
    "layout": "this rule",
}


def module_names(root: Path) -> dict[str, str]:
    """Each module and package of the three packages -> the <name> of its test file: the shortest tail of its
    dotted path, dots as underscores, that no other module or package has."""
    modules = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            modules.append(parts[:-1] if parts[-1] == "__init__" else parts)
    tails = {parts: ["_".join(parts[i:]) for i in range(len(parts) - 1, -1, -1)] for parts in modules}
    counts: dict[str, int] = {}
    for names in tails.values():
        for name in names:
            counts[name] = counts.get(name, 0) + 1
    return {".".join(parts): next(n for n in names if counts[n] == 1) for parts, names in tails.items()}


def commands(root: Path) -> dict[str, str]:
    """lk-vllm's commands -> the module each runs (the COMMANDS table of lk_vllm/cli.py)."""
    tree = ast.parse((root / "lk_vllm" / "cli.py").read_text())
    for node in tree.body:
        targets = [node.target] if isinstance(node, ast.AnnAssign) else getattr(node, "targets", [])
        if any(isinstance(target, ast.Name) and target.id == "COMMANDS" for target in targets):
            return {
                key.value: value.elts[0].value
                for key, value in zip(node.value.keys, node.value.values, strict=True)
            }
    raise AssertionError("lk_vllm/cli.py: no COMMANDS table")


def meanings(root: Path) -> dict[str, list[str]]:
    """Every <name> a test_<name>.py may have -> what it names (more than one: the name is ambiguous)."""
    found: dict[str, list[str]] = {}
    modules = module_names(root)
    for module, name in modules.items():
        found.setdefault(name, []).append(f"module {module}")
    for command, module in commands(root).items():
        if modules.get(module) != command:  # train, bench, ...: the command's file is its module's
            found.setdefault(command, []).append(f"command lk-vllm {command}")
    scripts: dict[str, list[str]] = {}
    for directory in SCRIPT_DIRS:
        for path in sorted((root / directory).glob("*")):
            if path.suffix in (".sh", ".py") and path.is_file():
                scripts.setdefault(path.stem, []).append(str(path.relative_to(root)))
    for stem, paths in scripts.items():  # a shell script and the Python it runs may share a stem
        found.setdefault(stem, []).append("script " + " and ".join(paths))
    for name, what in REPOSITORY_CHECKS.items():
        found.setdefault(name, []).append(f"repository check: {what}")
    return found


def misnamed(file_names: list[str], root: Path) -> list[str]:
    """What is wrong with each test file name that does not follow the rule."""
    found, modules = meanings(root), module_names(root)
    problems = []
    for file_name in file_names:
        name = file_name.removeprefix("test_").removesuffix(".py")
        what = found.get(name, [])
        if len(what) == 1:
            continue
        if what:
            problems.append(f"{file_name} is ambiguous: it names {', '.join(what)}")
            continue
        # a longer tail than needed, or a tail several modules share: say which names they have
        hints = sorted(
            f"test_{test_name}.py for {module}"
            for module, test_name in modules.items()
            if ("_" + module.replace(".", "_")).endswith("_" + name)
        )
        hint = f" (did you mean {' or '.join(hints)}?)" if hints else ""
        problems.append(
            f"{file_name} names no module, package, command, script or repository check{hint}; "
            "see the rule in tests/conftest.py"
        )
    return problems


def test_every_test_file_names_what_it_tests():
    files = sorted(path.name for path in (ROOT / "tests").glob("test_*.py"))
    assert len(files) > 40  # the glob found the test files
    problems = misnamed(files, ROOT)
    assert not problems, "rename (tests/conftest.py says how):\n" + "\n".join(problems)


def test_the_check_refuses_names_that_mean_nothing_or_two_things(tmp_path):
    for path in (
        "lk_vllm/__init__.py",
        "lk_vllm/engine.py",
        "lk_vllm/plugin/__init__.py",
        "lk_vllm/plugin/engine/__init__.py",
        "lk_vllm/plugin/engine/worker.py",
        "lk_vllm/plugin/server/capture.py",
        "training/capture.py",
        "training/train.py",
        "serving/launcher.py",
        "serving/demo.py",
        "examples/retrain_from_traffic.sh",
        "scripts/gpu_check.sh",
        "scripts/gpu_check.py",
        "benchmarks/worker.py",
    ):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("")
    (tmp_path / "lk_vllm" / "cli.py").write_text(
        'COMMANDS: dict = {"train": ("training.train", "x"), "serve": ("serving.launcher", "x"), '
        '"demo": ("serving.demo", "x")}\n'
    )
    assert (
        module_names(tmp_path)["lk_vllm.engine"] == "lk_vllm_engine"
    )  # lk_vllm/plugin/engine is "engine" too
    assert module_names(tmp_path)["lk_vllm.plugin.server.capture"] == "server_capture"
    good = [
        "test_lk_vllm_engine.py",
        "test_plugin_engine.py",
        "test_server_capture.py",
        "test_training_capture.py",
        "test_train.py",  # the module, and the train command with it
        "test_serve.py",
        "test_launcher.py",
        "test_demo.py",
        "test_retrain_from_traffic.py",
        "test_gpu_check.py",
        "test_layering.py",
    ]
    assert misnamed(good, tmp_path) == []
    bad = [
        "test_capture.py",
        "test_engine.py",
        "test_plugin_server_capture.py",
        "test_serving_swap.py",
        "test_worker.py",
    ]
    assert misnamed(bad, tmp_path) == [
        "test_capture.py names no module, package, command, script or repository check (did you mean "
        "test_server_capture.py for lk_vllm.plugin.server.capture or test_training_capture.py for "
        "training.capture?); see the rule in tests/conftest.py",
        "test_engine.py names no module, package, command, script or repository check (did you mean "
        "test_lk_vllm_engine.py for lk_vllm.engine or test_plugin_engine.py for lk_vllm.plugin.engine?); "
        "see the rule in tests/conftest.py",
        "test_plugin_server_capture.py names no module, package, command, script or repository check (did you "
        "mean test_server_capture.py for lk_vllm.plugin.server.capture?); see the rule in tests/conftest.py",
        "test_serving_swap.py names no module, package, command, script or repository check; see the rule in "
        "tests/conftest.py",
        "test_worker.py is ambiguous: it names module lk_vllm.plugin.engine.worker, script benchmarks/worker.py",
    ]
