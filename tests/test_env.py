"""lk_vllm.env is the one place that spells an LK_VLLM_* variable (read from the source with ``ast``)."""

from __future__ import annotations

import ast

import pytest
from repo_helpers import ROOT, package_modules

pytestmark = pytest.mark.unit


def test_every_lk_vllm_variable_is_named_in_lk_vllm_env():
    import re

    named = re.compile(r"^LK_VLLM_[A-Z_]+$")
    elsewhere = []
    for module, path in package_modules().items():
        if module == "lk_vllm.env":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and named.match(node.value):
                elsewhere.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value}")
    assert not elsewhere, "spell these as lk_vllm.env constants:\n" + "\n".join(elsewhere)
