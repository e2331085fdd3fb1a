"""lk_vllm.plugin.patching, the one way lk-vllm patches vLLM: idempotent, checked, listed (on toy classes)."""

from __future__ import annotations

import functools
import types

import pytest

from lk_vllm.plugin import patching

pytestmark = pytest.mark.unit


def _doubling(original):
    @functools.wraps(original)
    def wrapper(*args):
        return 2 * original(*args)

    return wrapper


def test_wrap_applies_once_and_is_listed():
    class Engine:
        def step(self, x):
            return x + 1

        @classmethod
        def configure(cls, config):
            return config

    patching.wrap(Engine, "step", _doubling, parameters=("self", "x"), why="double the step")
    first = Engine.step
    patching.wrap(Engine, "step", _doubling, parameters=("self", "x"), why="double the step")
    assert Engine.step is first and Engine().step(1) == 4  # wrapped once: 2 * (1 + 1), not 4 * (1 + 1)
    assert not patching.is_patched(Engine.step.__wrapped__) and patching.is_patched(Engine.step)
    patching.wrap(Engine, "configure", _doubling, parameters=("cls", "config"), why="double the config")
    patching.wrap(Engine, "configure", _doubling, parameters=("cls", "config"), why="double the config")
    assert isinstance(Engine.__dict__["configure"], classmethod) and Engine.configure(3) == 6
    applied = patching.applied()
    assert applied[f"{__name__}.{Engine.__qualname__}.step"] == "double the step"
    assert f"{__name__}.{Engine.__qualname__}.configure" in applied


def test_another_signature_or_a_missing_attribute_is_refused_in_one_line():
    class Engine:
        def step(self, x, y):
            return x

    with pytest.raises(
        RuntimeError,
        match=r"Engine.step was written for parameters \('self', 'x'\); "
        r"this vLLM's takes \('self', 'x', 'y'\)",
    ):
        patching.wrap(Engine, "step", _doubling, parameters=("self", "x"), why="test")
    assert not patching.is_patched(Engine.step)  # nothing half-done
    with pytest.raises(RuntimeError, match="Engine.missing, which this vLLM does not have"):
        patching.wrap(Engine, "missing", _doubling, why="test")


def test_add_never_replaces_vllms_own_method():
    class Worker:
        def own(self):
            return "vllm"

    def extra(self):
        return "lk"

    patching.add(Worker, "extra", extra, why="a new method")
    patching.add(Worker, "extra", extra, why="a new method")
    assert Worker().extra() == "lk"
    with pytest.raises(RuntimeError, match="Worker.own already exists; lk-vllm will not replace it"):
        patching.add(Worker, "own", extra, why="test")


def test_replace_swaps_a_module_function_once():
    module = types.ModuleType("toy_kernels")
    module.kernel = lambda a, b: a + b

    def fixed(a, b):
        return a * b

    patching.replace(module, "kernel", fixed, parameters=("a", "b"), why="the fixed kernel")
    patching.replace(module, "kernel", lambda a, b: 0, parameters=("a", "b"), why="a second one is ignored")
    assert module.kernel is fixed and patching.applied()["toy_kernels.kernel"] == "the fixed kernel"
