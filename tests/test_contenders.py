"""The bench's contenders (lk_vllm.bench.contenders): short, unique drafter labels."""

from __future__ import annotations

import pytest

from lk_vllm.bench.contenders import drafter_labels

pytestmark = pytest.mark.unit


def test_drafter_labels_are_short_and_unique(tmp_path):
    assert drafter_labels(["runs/kl/best", "runs/lk/best", "other/final"]) == [
        "kl/best",
        "lk/best",
        "other/final",
    ]
    assert drafter_labels(["runs/eagle3-alpha/best"]) == ["eagle3-alpha/best"]
    assert drafter_labels(["runs/a/drafter"]) == ["drafter"]
    assert drafter_labels(["runs/baseline"]) == ["runs/baseline"]
    from lk_vllm.errors import UserError

    with pytest.raises(UserError, match="given twice"):
        drafter_labels(["runs/a", "runs/./a"])
