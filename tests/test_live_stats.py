"""The live statistics store (lk_vllm.plugin.server.live_stats): windows and per-drafter statistics."""

from __future__ import annotations

import pytest

from lk_vllm.plugin.server.live_stats import DrafterInfo, LiveStatsStore

pytestmark = pytest.mark.unit


def test_window_and_per_drafter_statistics():
    import time

    store = LiveStatsStore()
    now = time.monotonic()
    store.set_drafter(DrafterInfo(name="a", method="eagle3", architecture="x", num_speculative_tokens=2))
    store.record_step(
        batch_size=1,
        output_tokens=2,
        timed=False,
        num_drafts=1,
        num_draft_tokens=2,
        num_accepted_tokens=1,
        accepted_per_position=[1, 0],
        now=now - 120,
    )
    store.record_step(
        batch_size=1,
        output_tokens=3,
        timed=True,
        num_drafts=1,
        num_draft_tokens=2,
        num_accepted_tokens=2,
        accepted_per_position=[1, 1],
        now=now - 5,
    )
    store.set_drafter(DrafterInfo(name="b", method="eagle3", architecture="x", num_speculative_tokens=2))
    store.record_step(
        batch_size=1,
        output_tokens=1,
        timed=True,
        num_drafts=1,
        num_draft_tokens=2,
        num_accepted_tokens=0,
        accepted_per_position=[0, 0],
        now=now - 1,
    )
    assert store.summary(store.steps(60))["num_drafts"] == 2
    assert store.summary(store.steps(None))["num_drafts"] == 3
    assert store.summary(store.steps(60, "a"))["acceptance_length"] == pytest.approx(3.0)
    assert store.since_start("a")["acceptance_length"] == pytest.approx(2.5)
    assert store.since_start("b")["acceptance_length"] == pytest.approx(1.0)
    assert store.since_start()["accepted_tokens"] == 3
