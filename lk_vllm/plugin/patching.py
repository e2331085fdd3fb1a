"""The one way lk-vllm changes vLLM's code inside a process.

* ``wrap(owner, name, make, parameters=...)`` replaces a function or method with ``make(original)``;
* ``add(owner, name, function)`` gives a class a method vLLM does not define;
* ``replace(owner, name, value, parameters=...)`` swaps a module attribute for lk-vllm's own function.

Each is idempotent: what it installs carries a mark, and a marked attribute is left alone (vLLM may call a
plugin's entry point more than once per process). Each checks first that what it patches is what it was
written for: the attribute exists and, when ``parameters`` is given, the original takes exactly those
parameters; another vLLM fails with one line naming the attribute. ``applied()`` lists what is in place in
this process, with why.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

MARK = "_lk_vllm_patch"
_APPLIED: dict[str, str] = {}


def _qualified(owner, name: str) -> str:
    if isinstance(owner, type):
        return f"{owner.__module__}.{owner.__qualname__}.{name}"
    return f"{owner.__name__}.{name}"  # a module


def _function(value):
    """The plain function behind a classmethod or staticmethod (what carries the mark)."""
    return value.__func__ if isinstance(value, (classmethod, staticmethod)) else value


def is_patched(value) -> bool:
    return bool(getattr(_function(value), MARK, False))


def _check_parameters(where: str, original, parameters: tuple[str, ...] | None) -> None:
    if parameters is None:
        return
    found = tuple(inspect.signature(_function(original)).parameters)
    if found != tuple(parameters):
        raise RuntimeError(
            f"lk-vllm's patch of {where} was written for parameters {tuple(parameters)}; "
            f"this vLLM's takes {found}"
        )


def _install(owner, name: str, value, why: str) -> None:
    setattr(_function(value), MARK, True)
    setattr(owner, name, value)
    _APPLIED[_qualified(owner, name)] = why


def wrap(owner, name: str, make: Callable, *, parameters: tuple[str, ...] | None = None, why: str) -> None:
    """``owner.name = make(original)`` (a classmethod or staticmethod stays one; ``make`` gets and returns the
    plain function)."""
    where = _qualified(owner, name)
    current = inspect.getattr_static(owner, name, None)
    if current is None or not callable(_function(current)):
        raise RuntimeError(f"lk-vllm patches {where}, which this vLLM does not have")
    if is_patched(current):
        return
    _check_parameters(where, current, parameters)
    wrapper = make(_function(current))
    if isinstance(current, (classmethod, staticmethod)):
        wrapper = type(current)(wrapper)
    _install(owner, name, wrapper, why)


def add(owner, name: str, function: Callable, *, why: str) -> None:
    """Give ``owner`` the method ``name``; refuses when vLLM already defines one of its own."""
    current = inspect.getattr_static(owner, name, None)
    if current is not None and is_patched(current):
        return
    if current is not None:
        raise RuntimeError(f"vLLM's {_qualified(owner, name)} already exists; lk-vllm will not replace it")
    _install(owner, name, function, why)


def replace(
    owner, name: str, value: Callable, *, parameters: tuple[str, ...] | None = None, why: str
) -> None:
    """``owner.name = value`` for a module-level function vLLM looks up at call time."""
    where = _qualified(owner, name)
    current = getattr(owner, name, None)
    if current is None:
        raise RuntimeError(f"lk-vllm patches {where}, which this vLLM does not have")
    if is_patched(current):
        return
    _check_parameters(where, current, parameters)
    _install(owner, name, value, why)


def applied() -> dict[str, str]:
    """What lk-vllm has patched in this process: ``module.Class.name`` -> why."""
    return dict(_APPLIED)
