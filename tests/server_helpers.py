"""Stand-ins for lk-vllm's server plugin (lk_vllm.plugin.server) without an engine: a live-stats store fed as the
stat logger feeds it, an engine client, a calibration profile. The ``tiny_target`` and ``app_with_routes``
fixtures (the routes on a FastAPI test client) are in tests/conftest.py."""

from __future__ import annotations

from lk_vllm.plugin.server import speedup
from lk_vllm.plugin.server.live_stats import DrafterInfo, LiveStatsStore

# The admin key app_with_routes sets.
ADMIN = {"X-Admin-Key": "admin-secret"}

# A spread from 1.0 to 3.9: the 0.2 quantile of these 30 requests is 1.5.
TRAFFIC = [1.0 + 0.1 * i for i in range(30)]


def make_store(lengths, mode="temperature_0"):
    """A store whose live drafter finished one request per acceptance length (K=3, 10 steps each)."""
    store = LiveStatsStore()
    store.set_drafter(
        DrafterInfo(name="/d/live", method="eagle3", architecture="eagle3", num_speculative_tokens=3)
    )
    for length in lengths:
        accepted = round((length - 1) * 10)
        store.record_step(
            batch_size=1,
            output_tokens=10 + accepted,
            timed=False,
            num_drafts=10,
            num_draft_tokens=30,
            num_accepted_tokens=accepted,
            requests=[(10, accepted, mode)],
        )
    return store


class FakeEngineClient:
    def __init__(self):
        self.calls = []

    async def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        self.calls.append((method, args))
        return [{"tensors": 1, "checksum": 0.0}]


def make_profile(points):
    return speedup.BaselineProfile(
        key={}, points=[{"batch_size": b, "seconds_per_token": s} for b, s in points]
    )
