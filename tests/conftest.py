"""Shared fixtures. Engine-starting fixtures are module-scoped in their own test files."""

import pytest


@pytest.fixture(scope="session")
def default_target() -> str:
    """The embedded default target directory (built once; `make test` builds it before pytest starts)."""
    from lk_vllm.assets import resolve_target

    return resolve_target(None)
