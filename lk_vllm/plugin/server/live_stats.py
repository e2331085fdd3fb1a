"""Live speculative-decoding statistics of a running server, kept in one process-wide store.

vLLM's front-end process calls the lk stat logger (``lk_vllm.plugin.server.stat_logger``) once per engine step; the
logger turns the step's scheduler and iteration stats into a :class:`Step` and appends it here. The HTTP
routes (``lk_vllm.plugin.server.routes``), the Prometheus gauges and the dashboard read the same store: they all live in the
API-server process, so a module-level singleton is shared without any IPC.

A step records the speculative-decoding counters (drafts, draft tokens, accepted tokens per position), the
output tokens, the batch size (requests in the step) and, for pure decode steps, how long the step took
(the time since the previous step's output arrived: the engine runs steps back to back while it has work).
Steps that complete a prefill are not timed, since their cost is the prompt's, not decoding's.

A step also carries the own counters (drafts, accepted tokens) and sampling mode of every request that finished
in it: vLLM gives a stat logger no per-request speculative counters, so lk-vllm's patch of the output processor
(``lk_vllm.plugin.patches.patch_finished_request_spec_metrics``) hands it the ``RequestSpecDecodeMetrics`` the
scheduler sends with a finished request (only with ``--per-request-spec-decode-metrics summary`` or
``detailed``; ``lk-vllm serve`` sets ``summary``). From them come the second aggregation (the mean of
per-request means, next to vLLM's pooled one) and the per-request histogram; see ``lk_vllm.acceptance``.
A request is counted, whole, for the drafter live when it finished.

All rates come from ``lk_vllm.acceptance``; speed-up from ``lk_vllm.plugin.server.speedup``.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from pathlib import Path
from typing import Any

from lk_vllm import acceptance
from lk_vllm.errors import UserError
from lk_vllm.plugin.server.speedup import BaselineProfile, speedup_of_steps

# Steps older than this are dropped (bounded memory; the longest window and the dashboard history).
MAX_HISTORY_SECONDS = 3600.0
MAX_STEPS = 500_000


@dataclasses.dataclass(frozen=True)
class Step:
    """One engine step as seen by the front end."""

    time: float  # time.monotonic() when the step's outputs were recorded
    drafter: str
    batch_size: int  # requests that produced output in this step
    output_tokens: int
    decode_seconds: float | None  # wall time of a pure decode step; None when not timed
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: tuple[int, ...] = ()
    # (drafts, accepted tokens, sampling mode) of each request that finished in this step
    requests: tuple[tuple[int, int, str], ...] = ()


def _step_from_row(row: list) -> Step:
    """A Step from ``dataclasses.astuple`` output read back from JSON (lists where tuples were)."""
    values = list(row)
    if len(values) > 8:
        values[8] = tuple(values[8])
    if len(values) > 9:
        values[9] = tuple(tuple(request) for request in values[9])
    return Step(*values)


@dataclasses.dataclass
class DrafterInfo:
    """What is speculating right now, as reported by ``/v1/speculative/stats``."""

    name: str  # a path or a method name ("ngram")
    method: str
    architecture: str
    loss: str | None = None
    num_speculative_tokens: int = 0
    sampling: dict[str, str] = dataclasses.field(default_factory=dict)
    since: float = dataclasses.field(default_factory=time.time)  # wall-clock time it went live

    def as_json(self) -> dict[str, Any]:
        return {"path": self.name, "architecture": self.architecture, "loss": self.loss, "since": self.since}


class Counters:
    """Running sums over a set of steps: vLLM's speculative-decoding counters plus output tokens."""

    def __init__(self) -> None:
        self.steps = 0
        self.output_tokens = 0
        self.counts = acceptance.SpecDecodeCounts()
        # finished requests' own counters, per sampling mode
        self.requests = {mode: acceptance.RequestAcceptance() for mode in acceptance.SAMPLING_MODES}

    def add(self, step: Step) -> None:
        self.steps += 1
        self.output_tokens += step.output_tokens
        self.counts = self.counts + acceptance.SpecDecodeCounts(
            num_drafts=step.num_drafts,
            num_draft_tokens=step.num_draft_tokens,
            num_accepted_tokens=step.num_accepted_tokens,
            accepted_per_position=step.accepted_per_position,
        )
        for num_drafts, num_accepted, mode in step.requests:
            self.requests[mode] = self.requests[mode] + acceptance.RequestAcceptance.of_request(
                num_drafts, num_accepted
            )

    def merge(self, other: Counters) -> None:
        self.steps += other.steps
        self.output_tokens += other.output_tokens
        self.counts = self.counts + other.counts
        for mode in acceptance.SAMPLING_MODES:
            self.requests[mode] = self.requests[mode] + other.requests[mode]

    def all_requests(self) -> acceptance.RequestAcceptance:
        return sum(self.requests.values(), acceptance.RequestAcceptance())

    def acceptance_lengths(self) -> list[dict[str, Any]]:
        """Every acceptance length of these steps, each labelled with its aggregation (``AGGREGATIONS``) and the
        sampling mode of the traffic it covers (``all``: temperature 0 and sampled requests together)."""
        out = [
            {
                "aggregation": "pooled",
                "sampling": "all",
                "value": self.counts.acceptance_length,
                "source": "engine steps (every draft, requests still running included)",
                "num_drafts": self.counts.num_drafts,
            }
        ]
        for mode, requests in (("all", self.all_requests()), *self.requests.items()):
            for aggregation, value in (
                ("pooled", requests.pooled_acceptance_length),
                ("mean_of_request_means", requests.mean_of_request_means),
            ):
                if mode == "all" and aggregation == "pooled":
                    continue  # the engine steps' pooled value above covers these and more
                out.append(
                    {
                        "aggregation": aggregation,
                        "sampling": mode,
                        "value": value,
                        "source": "finished requests",
                        "requests": requests.requests,
                        "num_drafts": requests.num_drafts,
                    }
                )
        return out

    def request_histogram(self) -> dict[str, Any]:
        """Per-request acceptance lengths of the finished requests, counted per bucket (not cumulative)."""
        modes = {"all": self.all_requests(), **self.requests}
        return {
            "upper_bounds": [*acceptance.REQUEST_ACCEPTANCE_BUCKETS, "+Inf"],
            "counts": {mode: list(requests.histogram) for mode, requests in modes.items()},
            "sums": {mode: requests.sum_of_request_lengths for mode, requests in modes.items()},
        }

    def as_json(self) -> dict[str, Any]:
        counts = self.counts
        requests = self.all_requests()
        return {
            "acceptance_length": counts.acceptance_length,
            "acceptance_length_aggregation": "pooled",
            "acceptance_length_mean_of_request_means": requests.mean_of_request_means,
            "acceptance_lengths": self.acceptance_lengths(),
            "aggregations": acceptance.AGGREGATIONS,
            "requests_finished": requests.requests,
            "request_acceptance_histogram": self.request_histogram(),
            "per_position_acceptance": counts.per_position_acceptance,
            "draft_acceptance_rate": counts.draft_acceptance_rate,
            "num_drafts": counts.num_drafts,
            "draft_tokens": counts.num_draft_tokens,
            "accepted_tokens": counts.num_accepted_tokens,
            "accepted_per_position": list(counts.accepted_per_position),
            "output_tokens": self.output_tokens,
            "steps": self.steps,
        }


class LiveStatsStore:
    """Thread-safe store of recent steps plus since-start totals, per drafter."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._steps: collections.deque[Step] = collections.deque(maxlen=MAX_STEPS)
            self._since_start: dict[str, Counters] = {}
            self._timed_since_start: list[Step] = []  # only timed steps (small: batch, tokens, seconds)
            self.started = time.monotonic()
            self.started_wall = time.time()
            self.drafter: DrafterInfo | None = None
            self.drafters_seen: dict[str, DrafterInfo] = {}
            self.baseline: BaselineProfile | None = None
            self.baseline_error: str | None = None
            self._baseline_path: Path | None = None
            self._baseline_mtime: float | None = None
            self._baseline_checked = 0.0
            self._last_record: float | None = None
            # where per-request counters come from (None: not available, and why)
            self.per_request_source: str | None = None
            self.per_request_missing: str | None = "no engine has reported yet"

    # -- writing -------------------------------------------------------------------------------------------
    def set_drafter(self, info: DrafterInfo) -> None:
        with self._lock:
            self.drafter = info
            self.drafters_seen[info.name] = info

    def set_per_request_source(self, source: str | None, missing: str | None = None) -> None:
        with self._lock:
            self.per_request_source, self.per_request_missing = source, missing

    def set_baseline(self, profile: BaselineProfile | None, error: str | None = None) -> None:
        with self._lock:
            self.baseline = profile
            self.baseline_error = error

    def watch_baseline(self, path: str | Path, missing_error: str) -> None:
        """Use the profile at ``path`` and re-read it whenever it changes (``lk-vllm calibrate --force`` on a
        running server takes effect without a restart); until it exists, report ``missing_error``."""
        self._baseline_path = Path(path)
        self._baseline_mtime = None
        self._missing_error = missing_error
        self._baseline_checked = 0.0
        self.refresh_baseline()

    def refresh_baseline(self, every_seconds: float = 2.0) -> None:
        if self._baseline_path is None or time.monotonic() - self._baseline_checked < every_seconds:
            return
        self._baseline_checked = time.monotonic()
        try:
            mtime = self._baseline_path.stat().st_mtime
        except OSError:
            self.set_baseline(None, self._missing_error)
            return
        if mtime != self._baseline_mtime:
            self._baseline_mtime = mtime
            try:
                self.set_baseline(BaselineProfile.load(self._baseline_path))
            except UserError as exc:
                self.set_baseline(None, str(exc))

    def record_step(
        self,
        *,
        batch_size: int,
        output_tokens: int,
        timed: bool,
        num_drafts: int = 0,
        num_draft_tokens: int = 0,
        num_accepted_tokens: int = 0,
        accepted_per_position: list[int] | tuple[int, ...] = (),
        requests: list[tuple[int, int, str]] | tuple[tuple[int, int, str], ...] = (),
        now: float | None = None,
    ) -> Step:
        """Record one engine step. ``timed`` says whether it was a pure decode step (no prefill finished);
        ``requests`` holds (drafts, accepted tokens, sampling mode) of each request that finished in it."""
        now = time.monotonic() if now is None else now
        with self._lock:
            previous, self._last_record = self._last_record, now
            decode_seconds = (
                now - previous if (timed and previous is not None and output_tokens > 0) else None
            )
            step = Step(
                time=now,
                drafter=self.drafter.name if self.drafter else "none",
                batch_size=batch_size,
                output_tokens=output_tokens,
                decode_seconds=decode_seconds,
                num_drafts=num_drafts,
                num_draft_tokens=num_draft_tokens,
                num_accepted_tokens=num_accepted_tokens,
                accepted_per_position=tuple(accepted_per_position),
                requests=tuple((int(d), int(a), str(m)) for d, a, m in requests),
            )
            self._steps.append(step)
            self._since_start.setdefault(step.drafter, Counters()).add(step)
            if decode_seconds is not None:
                self._timed_since_start.append(step)
            while self._steps and now - self._steps[0].time > MAX_HISTORY_SECONDS:
                self._steps.popleft()
            return step

    # -- reading -------------------------------------------------------------------------------------------
    def steps(self, window_seconds: float | None = None, drafter: str | None = None) -> list[Step]:
        now = time.monotonic()
        with self._lock:
            steps = list(self._steps)
        if window_seconds is not None:
            steps = [s for s in steps if now - s.time <= window_seconds]
        if drafter is not None:
            steps = [s for s in steps if s.drafter == drafter]
        return steps

    def summary(self, steps: list[Step]) -> dict[str, Any]:
        counters = Counters()
        for step in steps:
            counters.add(step)
        out = counters.as_json()
        out.update(self.speed(steps))
        return out

    def speed(self, steps: list[Step]) -> dict[str, Any]:
        """Measured decode speed of these steps and the speed-up over the baseline, per batch-size bucket."""
        self.refresh_baseline()
        return speedup_of_steps(steps, self.baseline)

    def since_start(self, drafter: str | None = None) -> dict[str, Any]:
        with self._lock:
            names = [drafter] if drafter is not None else list(self._since_start)
            counters = Counters()
            for name in names:
                if name in self._since_start:
                    counters.merge(self._since_start[name])
            timed = [s for s in self._timed_since_start if drafter is None or s.drafter == drafter]
        out = counters.as_json()
        out.update(self.speed(timed))
        out["seconds"] = time.monotonic() - self.started
        return out

    # -- carrying statistics over an engine restart -------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """Everything recorded so far, as JSON-able data (``merge_snapshot`` reads it back in another process:
        step times are ``time.monotonic()`` values, which are system-wide on Linux)."""
        with self._lock:
            return {
                "started": self.started,
                "started_wall": self.started_wall,
                "steps": [dataclasses.astuple(step) for step in self._steps],
                "timed": [dataclasses.astuple(step) for step in self._timed_since_start],
                "since_start": {
                    name: {
                        "steps": c.steps,
                        "output_tokens": c.output_tokens,
                        "requests": {m: dataclasses.asdict(r) for m, r in c.requests.items()},
                        **dataclasses.asdict(c.counts),
                    }
                    for name, c in self._since_start.items()
                },
                "drafters_seen": {
                    name: dataclasses.asdict(info) for name, info in self.drafters_seen.items()
                },
            }

    def merge_snapshot(self, data: dict[str, Any]) -> None:
        """Add an earlier snapshot (of the engine this one replaced) in front of what is recorded here. The live
        drafter stays the one set here; drafters only the snapshot knows become queryable again."""

        def steps(rows):
            return [_step_from_row(row) for row in rows]

        with self._lock:
            self._steps = collections.deque(steps(data["steps"]) + list(self._steps), maxlen=MAX_STEPS)
            self._timed_since_start[:0] = steps(data["timed"])
            for name, saved in data["since_start"].items():
                saved = dict(saved)
                counters = Counters()
                counters.steps, counters.output_tokens = saved.pop("steps"), saved.pop("output_tokens")
                for mode, sums in saved.pop("requests", {}).items():
                    counters.requests[mode] = acceptance.RequestAcceptance(
                        **{**sums, "histogram": tuple(sums["histogram"])}
                    )
                counters.counts = acceptance.SpecDecodeCounts(**saved)
                counters.merge(self._since_start.get(name, Counters()))
                self._since_start[name] = counters
            for name, info in data["drafters_seen"].items():
                self.drafters_seen.setdefault(name, DrafterInfo(**info))
            if data["started"] < self.started:
                self.started, self.started_wall = data["started"], data["started_wall"]

    def history(self, seconds: float, resolution: float, drafter: str | None = None) -> list[dict[str, Any]]:
        """The window split into intervals of ``resolution`` seconds, each summarised (for the dashboard)."""
        now = time.monotonic()
        steps = self.steps(seconds, drafter)
        if not steps:
            return []
        intervals: dict[int, list[Step]] = collections.defaultdict(list)
        for step in steps:
            intervals[int((now - step.time) // resolution)].append(step)
        points = []
        for index in sorted(intervals, reverse=True):
            part = intervals[index]
            summary = self.summary(part)
            points.append(
                {
                    "t": self.started_wall + (part[-1].time - self.started),  # wall-clock seconds
                    "acceptance_length": summary["acceptance_length"],
                    "acceptance_length_mean_of_request_means": summary[
                        "acceptance_length_mean_of_request_means"
                    ],
                    "per_position_acceptance": summary["per_position_acceptance"],
                    "speedup": summary["speedup"],
                    "tokens_per_s": summary["tokens_per_s"],
                    "output_tokens": summary["output_tokens"],
                    "drafter": part[-1].drafter,
                }
            )
        return points


# The one store of this process (the API server's front end).
STORE = LiveStatsStore()
