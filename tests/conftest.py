"""Shared fixtures, and the test tiers. Engine-starting fixtures are module-scoped in their own test files.

Every test carries exactly one tier marker (pyproject.toml lists them): ``unit`` (neither vLLM nor an engine),
``vllm`` (imports vLLM, starts no engine), ``engine`` (starts a vLLM engine), ``e2e`` (runs lk-vllm's own
commands or servers). A module sets its tier with ``pytestmark``; a marker on a test (its class, its
parametrize) overrides the module's. ``slow`` is about speed and is independent of the tier.
"""

from __future__ import annotations

import sys

import pytest

pytest_plugins = ["pytester"]  # tests/test_tiers.py runs these hooks on tiny test files

TIERS = ("unit", "vllm", "engine", "e2e")
_VLLM_BEFORE = pytest.StashKey[bool]()


@pytest.fixture(scope="session")
def default_target() -> str:
    """The embedded default target directory (built once; `make test` builds it before pytest starts)."""
    from lk_vllm.assets import resolve_target

    return resolve_target(None)


def tier_of(item: pytest.Item) -> str | None:
    """The closest tier marker (test, then class, then module); two different tiers on one node are an error."""
    node = item
    while node is not None:
        own = {mark.name for mark in node.own_markers if mark.name in TIERS}
        if len(own) > 1:
            raise pytest.UsageError(
                f"{item.nodeid}: {node.name} carries tiers {', '.join(sorted(own))}; give it one"
            )
        if own:
            return own.pop()
        node = node.parent
    return None


# tryfirst: before `-m` deselects anything, so an untiered test is refused whatever the selection.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Refuse a test without a tier: `-m unit` (make test-fast) would silently never run it."""
    tiers = [tier_of(item) for item in items]
    untiered = [item.nodeid for item, tier in zip(items, tiers, strict=True) if tier is None]
    if untiered:
        more = f" (and {len(untiered) - 1} more)" if len(untiered) > 1 else ""
        raise pytest.UsageError(
            f"{untiered[0]}{more} has no tier: mark it or its module (pytestmark) with one of "
            f"{', '.join(TIERS)}"
        )
    # `-m unit` matches a marker anywhere above a test, so the module's tier would still select a test that
    # overrides it: leave every test its one tier, on the test itself.
    for item, tier in zip(items, tiers, strict=True):
        for node in item.listchain():
            node.own_markers[:] = [mark for mark in node.own_markers if mark.name not in TIERS]
        item.add_marker(tier)


# A unit test must not import vLLM (~10 s on 2 cores, and the point of the tier). Imports in fixtures count, so
# the "before" snapshot is taken ahead of setup. Once an earlier non-unit test has imported vLLM this cannot see
# later ones; `make test-fast` runs the unit tier alone, where it matters.
@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item):
    item.stash[_VLLM_BEFORE] = "vllm" in sys.modules
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    result = yield
    if tier_of(item) == "unit" and not item.stash.get(_VLLM_BEFORE, True) and "vllm" in sys.modules:
        pytest.fail(
            f"{item.nodeid} is marked unit but imported vLLM; mark it vllm, engine or e2e", pytrace=False
        )
    return result
