"""The test tiers (tests/conftest.py): every module names one, an untiered test is refused at collection, and a
unit test that imports vLLM fails. The hooks are run on tiny test files in a separate pytest process."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
TIERS = ("unit", "vllm", "engine", "e2e")


def module_tiers(path: Path) -> set[str]:
    """The tiers a module's top-level ``pytestmark = ...`` names (empty: it has none)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets
        ):
            return {n.attr for n in ast.walk(node.value) if isinstance(n, ast.Attribute) and n.attr in TIERS}
    return set()


def test_every_test_module_names_one_tier_in_its_pytestmark():
    modules = sorted(TESTS.glob("test_*.py"))
    assert len(modules) > 30  # the glob found the test modules
    wrong = {path.name: sorted(module_tiers(path)) for path in modules if len(module_tiers(path)) != 1}
    assert not wrong, f"give each module `pytestmark = pytest.mark.<one of {', '.join(TIERS)}>`: {wrong}"


def test_the_module_check_sees_a_missing_or_tierless_pytestmark(tmp_path):
    cases = {
        "none.py": "import pytest\n",
        "slow.py": "import pytest\npytestmark = pytest.mark.slow\n",
        "both.py": "import pytest\npytestmark = [pytest.mark.slow, pytest.mark.e2e]\n",
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
    assert {name: module_tiers(tmp_path / name) for name in cases} == {
        "none.py": set(),
        "slow.py": set(),
        "both.py": {"e2e"},
    }


def test_the_tiers_are_registered_markers():
    markers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]
    assert {m.split(":")[0] for m in markers} >= {*TIERS, "slow"}


@pytest.fixture
def tiered(pytester: pytest.Pytester) -> pytest.Pytester:
    """A pytester directory with this project's conftest.py and markers (--strict-markers as here)."""
    pytester.makeconftest((TESTS / "conftest.py").read_text())
    options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    pytester.makeini(
        "[pytest]\naddopts = --strict-markers\nmarkers =\n"
        + "".join(f"    {marker}\n" for marker in options["markers"])
    )
    return pytester


def test_a_unit_test_that_imports_vllm_fails(tiered):
    # A stand-in module named vllm: importing the real one costs ~10 s, and the check only looks at sys.modules.
    # monkeypatch takes it out again, so each test starts without vLLM; a subprocess keeps this one clean.
    tiered.makepyfile(
        test_inner="""
        import sys
        import types

        import pytest

        pytestmark = pytest.mark.unit

        def fake_vllm(monkeypatch):
            monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))

        @pytest.fixture
        def vllm_fixture(monkeypatch):
            fake_vllm(monkeypatch)

        def test_clean():
            pass

        def test_imports(monkeypatch):
            fake_vllm(monkeypatch)

        def test_fixture_imports(vllm_fixture):
            pass

        @pytest.mark.vllm
        def test_marked_vllm(monkeypatch):
            fake_vllm(monkeypatch)
    """
    )
    result = tiered.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=2)
    result.stdout.fnmatch_lines(
        [
            "*test_inner.py::test_imports is marked unit but imported vLLM; mark it vllm, engine or e2e*",
            "*test_inner.py::test_fixture_imports is marked unit but imported vLLM; mark it vllm, engine or e2e*",
        ]
    )


def test_an_untiered_test_is_refused_at_collection_whatever_the_selection(tiered):
    tiered.makepyfile(test_untiered="def test_nothing():\n    pass\n")
    for argv in ((), ("-m", "unit")):
        result = tiered.runpytest_subprocess("--collect-only", "-p", "no:cacheprovider", *argv)
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines(["*test_untiered.py::test_nothing has no tier*unit, vllm, engine, e2e*"])


def test_the_closest_tier_wins_and_two_on_one_test_are_an_error(tiered):
    tiered.makepyfile(
        test_override="""
        import pytest

        pytestmark = [pytest.mark.slow, pytest.mark.unit]

        def test_unit():
            pass

        @pytest.mark.engine
        def test_engine():
            pass

        class TestE2e:
            pytestmark = pytest.mark.e2e

            def test_in_class(self):
                pass

            @pytest.mark.parametrize("n", [1, pytest.param(2, marks=pytest.mark.vllm)])
            def test_param(self, n):
                pass
    """
    )
    selected = {}
    for tier in TIERS:
        result = tiered.runpytest_subprocess("--collect-only", "-q", "-p", "no:cacheprovider", "-m", tier)
        selected[tier] = sorted(line.split("::", 1)[1] for line in result.outlines if "::" in line)
    assert selected == {
        "unit": ["test_unit"],
        "engine": ["test_engine"],
        "e2e": ["TestE2e::test_in_class", "TestE2e::test_param[1]"],
        "vllm": ["TestE2e::test_param[2]"],
    }
    tiered.makepyfile(
        test_override="""
        import pytest

        pytestmark = pytest.mark.unit

        @pytest.mark.vllm
        @pytest.mark.engine
        def test_both():
            pass
    """
    )
    result = tiered.runpytest_subprocess("--collect-only", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*test_override.py::test_both: test_both carries tiers engine, vllm; give it one*"]
    )
