"""Acceptance math shared by the trainer, the benchmarks and the server.

Two views of the same quantity meet here:

* **Predicted**, from a drafter's per-position acceptance rates ``alpha_k`` (the conditional probability that
  draft position ``k`` is accepted given that positions ``< k`` were; the trainer measures it as
  ``sum_x min(p(x), q(x))``, see :mod:`lk_vllm.losses`). With chain drafting, position ``k`` is reached only if
  every earlier position was accepted, so the unconditional rate of position ``k`` is ``prod_{j<=k} alpha_j``
  and the expected number of tokens per draft-verify step (bonus token included) is
  ``1 + sum_k prod_{j<=k} alpha_j``.
* **Measured**, from vLLM's speculative-decoding counters: ``num_drafts``, ``num_draft_tokens``,
  ``num_accepted_tokens`` and ``accepted_per_position`` (how many drafts had position ``k`` accepted). The
  per-position rate ``accepted_per_position[k] / num_drafts`` is the *unconditional* rate, comparable to
  :func:`cumulative_acceptance` of the predicted ``alpha_k``; the mean acceptance length is
  ``1 + num_accepted_tokens / num_drafts``.

Two aggregations of measured acceptance length over many requests are in use, and they differ whenever
requests differ in length (:data:`AGGREGATIONS`): **pooled**, ``1 + sum accepted / sum drafts`` over every
draft-verify step (what vLLM reports; a long request weighs more), and the **mean of per-request means**
(what SpecForge's benchmark reports; every request weighs the same). :class:`RequestAcceptance` holds the sums
that give both, and the per-request histogram.

With no drafts there is nothing measured: the functions return ``None`` rather than a number that would look
like a measurement (for example 1.0).

This module must stay importable without torch (the server imports it on every stats request).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = [
    "AGGREGATIONS",
    "REQUEST_ACCEPTANCE_BUCKETS",
    "RequestAcceptance",
    "SAMPLING_MODES",
    "SpecDecodeCounts",
    "conditional_acceptance",
    "cumulative_acceptance",
    "draft_acceptance_rate",
    "expected_acceptance_length",
    "eval_data_rates",
    "heldout_rates",
    "mean_acceptance_length",
    "sampling_mode",
    "per_position_acceptance",
    "predicted_rates",
]


# Rates computed in fp32 (sum of min(p, q) over a vocabulary) overshoot [0, 1] by rounding; beyond this
# tolerance a value is a bug, not rounding.
_RATE_TOLERANCE = 1e-5


def _check_rate(name: str, index: int, value: float) -> float:
    value = float(value)
    if not (-_RATE_TOLERANCE <= value <= 1.0 + _RATE_TOLERANCE):
        raise ValueError(f"{name}[{index}] must be an acceptance rate in [0, 1]; found {value!r}")
    return min(max(value, 0.0), 1.0)


def cumulative_acceptance(per_position_alpha: Iterable[float]) -> list[float]:
    """Unconditional acceptance rate of each draft position: ``[prod_{j<=k} alpha_j for k]``.

    ``per_position_alpha[k]`` is the conditional acceptance rate of position ``k`` (given all earlier
    positions were accepted). The result is what vLLM's ``accepted_per_position[k] / num_drafts`` measures.
    """
    rates = []
    running = 1.0
    for k, alpha in enumerate(per_position_alpha):
        running *= _check_rate("per_position_alpha", k, alpha)
        rates.append(running)
    return rates


def expected_acceptance_length(per_position_alpha: Iterable[float]) -> float:
    """Expected tokens per draft-verify step with chain drafting: ``1 + sum_k prod_{j<=k} alpha_j``.

    The leading 1 is the bonus token the target always produces. An empty sequence gives 1.0 (no
    speculation). Raises ``ValueError`` if a rate is outside [0, 1] (NaN included).
    """
    return 1.0 + math.fsum(cumulative_acceptance(per_position_alpha))


def conditional_acceptance(per_position_rates: Sequence[float]) -> list[float | None]:
    """Inverse of :func:`cumulative_acceptance`: ``alpha_k = rate_k / rate_{k-1}`` (``rate_{-1}`` = 1).

    A position that is never reached (the previous rate is 0) has no conditional rate: ``None``.
    """
    alphas: list[float | None] = []
    previous = 1.0
    for k, rate in enumerate(per_position_rates):
        rate = _check_rate("per_position_rates", k, rate)
        if rate > previous * (1.0 + 1e-12):
            raise ValueError(
                f"per_position_rates must be non-increasing (position k is reached only if k-1 was accepted); "
                f"found rate[{k}]={rate!r} > rate[{k - 1}]={previous!r}"
            )
        alphas.append(min(1.0, rate / previous) if previous > 0.0 else None)
        previous = rate
    return alphas


def per_position_acceptance(accepted_per_position: Sequence[int], num_drafts: int) -> list[float] | None:
    """Measured unconditional acceptance rate of each position: ``accepted_per_position[k] / num_drafts``.

    Returns ``None`` when ``num_drafts`` is 0 (nothing measured).
    """
    num_drafts = _check_count("num_drafts", num_drafts)
    counts = [_check_count(f"accepted_per_position[{k}]", c) for k, c in enumerate(accepted_per_position)]
    for k, count in enumerate(counts):
        if count > num_drafts:
            raise ValueError(
                f"accepted_per_position[{k}]={count} exceeds num_drafts={num_drafts}: a position is accepted at "
                "most once per draft"
            )
    if num_drafts == 0:
        return None
    return [count / num_drafts for count in counts]


def mean_acceptance_length(num_accepted_tokens: int, num_drafts: int) -> float | None:
    """Measured mean tokens per draft-verify step: ``1 + num_accepted_tokens / num_drafts``.

    Returns ``None`` when ``num_drafts`` is 0 (nothing measured).
    """
    num_accepted_tokens = _check_count("num_accepted_tokens", num_accepted_tokens)
    num_drafts = _check_count("num_drafts", num_drafts)
    if num_drafts == 0:
        return None
    return 1.0 + num_accepted_tokens / num_drafts


def draft_acceptance_rate(num_accepted_tokens: int, num_draft_tokens: int) -> float | None:
    """Fraction of drafted tokens that were accepted; ``None`` when no token was drafted."""
    num_accepted_tokens = _check_count("num_accepted_tokens", num_accepted_tokens)
    num_draft_tokens = _check_count("num_draft_tokens", num_draft_tokens)
    if num_draft_tokens == 0:
        return None
    return num_accepted_tokens / num_draft_tokens


def _check_count(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a non-negative integer count; found {value!r}")
    if not isinstance(value, int):
        try:
            as_int = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a non-negative integer count; found {value!r}") from None
        if as_int != value:
            raise ValueError(f"{name} must be a non-negative integer count; found {value!r}")
        value = as_int
    if value < 0:
        raise ValueError(f"{name} must be a non-negative integer count; found {value}")
    return value


@dataclass(frozen=True)
class SpecDecodeCounts:
    """A snapshot of vLLM's cumulative speculative-decoding counters.

    Snapshots add (aggregate engines or windows) and subtract (``later - earlier`` is the window between two
    snapshots of the same counters). ``accepted_per_position`` may be shorter than the number of speculative
    tokens when trailing positions were never reported; addition pads the shorter one with zeros.
    Subtraction requires the same length, since a change in length means the drafter configuration changed and
    the difference would mix two configurations.

    Construction checks only that every counter is a non-negative integer: counters read one by one from a
    live engine can be momentarily inconsistent with each other, and a snapshot must not fail for that. The
    rate properties check their own inputs (a rate above 1 raises ``ValueError``).
    """

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name == "accepted_per_position":
                continue
            object.__setattr__(self, f.name, _check_count(f.name, getattr(self, f.name)))
        per_position = tuple(
            _check_count(f"accepted_per_position[{k}]", c) for k, c in enumerate(self.accepted_per_position)
        )
        object.__setattr__(self, "accepted_per_position", per_position)

    @classmethod
    def from_mapping(cls, counters: Mapping[str, Any] | Any) -> SpecDecodeCounts:
        """Build from a mapping or an object with the counter names as keys or attributes.

        Accepts vLLM's spelling ``num_accepted_tokens_per_pos`` as well as ``accepted_per_position``.
        """

        def get(name: str, default: Any = None) -> Any:
            if isinstance(counters, Mapping):
                return counters.get(name, default)
            return getattr(counters, name, default)

        per_position = get("accepted_per_position")
        if per_position is None:
            per_position = get("num_accepted_tokens_per_pos", ())
        return cls(
            num_drafts=get("num_drafts", 0),
            num_draft_tokens=get("num_draft_tokens", 0),
            num_accepted_tokens=get("num_accepted_tokens", 0),
            accepted_per_position=tuple(per_position),
        )

    def __add__(self, other: SpecDecodeCounts) -> SpecDecodeCounts:
        if not isinstance(other, SpecDecodeCounts):
            return NotImplemented
        length = max(len(self.accepted_per_position), len(other.accepted_per_position))
        mine = self.accepted_per_position + (0,) * (length - len(self.accepted_per_position))
        theirs = other.accepted_per_position + (0,) * (length - len(other.accepted_per_position))
        return SpecDecodeCounts(
            num_drafts=self.num_drafts + other.num_drafts,
            num_draft_tokens=self.num_draft_tokens + other.num_draft_tokens,
            num_accepted_tokens=self.num_accepted_tokens + other.num_accepted_tokens,
            accepted_per_position=tuple(a + b for a, b in zip(mine, theirs, strict=True)),
        )

    def __sub__(self, other: SpecDecodeCounts) -> SpecDecodeCounts:
        """Window delta ``self - other`` where ``other`` is the earlier snapshot of the same counters."""
        if not isinstance(other, SpecDecodeCounts):
            return NotImplemented
        if len(self.accepted_per_position) != len(other.accepted_per_position):
            raise ValueError(
                "cannot subtract counter snapshots with different numbers of positions "
                f"({len(self.accepted_per_position)} vs {len(other.accepted_per_position)}): the drafter "
                "configuration changed between them"
            )
        deltas = {}
        for name in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"):
            delta = getattr(self, name) - getattr(other, name)
            if delta < 0:
                raise ValueError(
                    f"{name} went down from {getattr(other, name)} to {getattr(self, name)}: the counters were "
                    "reset (engine restart or drafter swap) or the snapshots are in the wrong order"
                )
            deltas[name] = delta
        per_position = []
        for k, (later, earlier) in enumerate(
            zip(self.accepted_per_position, other.accepted_per_position, strict=True)
        ):
            if later < earlier:
                raise ValueError(
                    f"accepted_per_position[{k}] went down from {earlier} to {later}: the counters were reset or "
                    "the snapshots are in the wrong order"
                )
            per_position.append(later - earlier)
        return SpecDecodeCounts(**deltas, accepted_per_position=tuple(per_position))

    @property
    def acceptance_length(self) -> float | None:
        """Mean tokens per draft-verify step, bonus token included; ``None`` with no drafts."""
        return mean_acceptance_length(self.num_accepted_tokens, self.num_drafts)

    @property
    def per_position_acceptance(self) -> list[float] | None:
        """Unconditional acceptance rate of each position; ``None`` with no drafts."""
        return per_position_acceptance(self.accepted_per_position, self.num_drafts)

    @property
    def draft_acceptance_rate(self) -> float | None:
        """Accepted / drafted tokens; ``None`` with no drafted tokens."""
        return draft_acceptance_rate(self.num_accepted_tokens, self.num_draft_tokens)

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_drafts": self.num_drafts,
            "num_draft_tokens": self.num_draft_tokens,
            "num_accepted_tokens": self.num_accepted_tokens,
            "accepted_per_position": list(self.accepted_per_position),
            "acceptance_length": self.acceptance_length,
            "per_position_acceptance": self.per_position_acceptance,
        }


# ---------------------------------------------------------------------------------------------- aggregations
AGGREGATIONS = {
    "pooled": "1 + sum of accepted tokens / sum of drafts over every draft-verify step (vLLM's statistic; "
    "a long request weighs more)",
    "mean_of_request_means": "mean over finished requests of each request's 1 + accepted tokens / drafts "
    "(SpecForge's benchmark statistic; every request weighs the same)",
}
# How a request samples: the target's argmax (drafts accepted when they match it) or sampled at T > 0
# (standard rejection sampling). Acceptance differs between the two, so every number says which it covers.
SAMPLING_MODES = ("temperature_0", "sampled")
# Upper bounds of the per-request acceptance-length histogram (tokens per step, bonus included; +Inf last).
# Fixed rather than derived from K so that the Prometheus series stay the same across drafter swaps.
REQUEST_ACCEPTANCE_BUCKETS = (
    1.0,
    1.25,
    1.5,
    1.75,
    2.0,
    2.25,
    2.5,
    2.75,
    3.0,
    3.5,
    4.0,
    5.0,
    6.0,
    8.0,
    12.0,
    16.0,
)


def sampling_mode(temperature: float | None) -> str:
    """``temperature_0`` (greedy; vLLM treats a missing temperature as greedy too) or ``sampled``."""
    return "sampled" if temperature else "temperature_0"


@dataclass(frozen=True)
class RequestAcceptance:
    """Sums over finished requests of their own speculative-decoding counters (vLLM's per-request
    ``RequestSpecDecodeMetrics``): both aggregations and the histogram of per-request acceptance lengths.

    Only requests with at least one draft count (a request without a draft has no acceptance length).
    ``histogram[i]`` counts the requests whose length is <= ``REQUEST_ACCEPTANCE_BUCKETS[i]`` and above the
    previous bound; the last entry counts those above every bound.
    """

    requests: int = 0
    num_drafts: int = 0
    num_accepted_tokens: int = 0
    sum_of_request_lengths: float = 0.0
    histogram: tuple[int, ...] = (0,) * (len(REQUEST_ACCEPTANCE_BUCKETS) + 1)

    @classmethod
    def of_request(cls, num_drafts: int, num_accepted_tokens: int) -> RequestAcceptance:
        """One request's counters (an empty sum when it never drafted)."""
        length = mean_acceptance_length(num_accepted_tokens, num_drafts)
        if length is None:
            return cls()
        bucket = next(
            (i for i, bound in enumerate(REQUEST_ACCEPTANCE_BUCKETS) if length <= bound),
            len(REQUEST_ACCEPTANCE_BUCKETS),
        )
        histogram = tuple(int(i == bucket) for i in range(len(REQUEST_ACCEPTANCE_BUCKETS) + 1))
        return cls(1, int(num_drafts), int(num_accepted_tokens), length, histogram)

    def __add__(self, other: RequestAcceptance) -> RequestAcceptance:
        if not isinstance(other, RequestAcceptance):
            return NotImplemented
        return RequestAcceptance(
            self.requests + other.requests,
            self.num_drafts + other.num_drafts,
            self.num_accepted_tokens + other.num_accepted_tokens,
            self.sum_of_request_lengths + other.sum_of_request_lengths,
            tuple(a + b for a, b in zip(self.histogram, other.histogram, strict=True)),
        )

    @property
    def pooled_acceptance_length(self) -> float | None:
        """``1 + sum accepted / sum drafts`` over these requests; ``None`` with no request."""
        return mean_acceptance_length(self.num_accepted_tokens, self.num_drafts)

    @property
    def mean_of_request_means(self) -> float | None:
        """Mean of the requests' own acceptance lengths; ``None`` with no request."""
        return self.sum_of_request_lengths / self.requests if self.requests else None


def heldout_rates(
    training: Mapping[str, Any], temperature: float, num_speculative_tokens: int
) -> list[float] | None:
    """The conditional per-position acceptance rates a trainer measured on held-out data
    (``lk_training.json`` ``training.heldout``) for this temperature, or None: the top-1 agreement at T=0
    (greedy drafts are accepted when they are the target's argmax) and alpha = sum min(p, q) at T=1 (drafts
    sampled from q, standard rejection sampling; the trainer measures alpha untempered). Other temperatures,
    or K beyond the positions measured, have no prediction."""
    heldout = training.get("heldout") if isinstance(training.get("heldout"), Mapping) else {}
    key = {0.0: "top1_agreement", 1.0: "per_position_alpha"}.get(float(temperature))
    rates = heldout.get(key) if key else None
    if not isinstance(rates, list) or len(rates) < num_speculative_tokens:
        return None
    return [float(rate) for rate in rates[:num_speculative_tokens]]


def eval_data_rates(
    training: Mapping[str, Any], temperature: float, num_speculative_tokens: int, dataset: str
) -> tuple[list[float], str] | None:
    """The conditional per-position acceptance rates the trainer measured on its ``eval_data``
    (``lk_training.json``) for serving ``dataset`` (a dataset name, or ``all`` for every one) at ``temperature``,
    and the names of the sets they come from; None when no set matches. A set matches when the target wrote its
    responses at this temperature and, unless ``dataset`` is ``all``, from this dataset's prompts; matching sets
    are pooled by their number of positions."""
    key = {0.0: "top1_agreement", 1.0: "per_position_alpha"}.get(float(temperature))
    sets = training.get("eval_data") if isinstance(training.get("eval_data"), list) else []
    matching = [
        e
        for e in sets
        if isinstance(e, Mapping)
        and e.get("temperature") == float(temperature)
        and (dataset == "all" or dataset in (e.get("datasets") or []))
        and isinstance(e.get(key), list)
        and len(e[key]) >= num_speculative_tokens
        and e.get("positions")
    ]
    if not (key and matching):
        return None
    total = sum(e["positions"] for e in matching)
    rates = [
        sum(float(e[key][k]) * e["positions"] for e in matching) / total
        for k in range(num_speculative_tokens)
    ]
    return rates, "eval data " + ", ".join(e["name"] for e in matching)


def predicted_rates(
    training: Mapping[str, Any], temperature: float, num_speculative_tokens: int, dataset: str
) -> tuple[list[float], str] | None:
    """The conditional per-position acceptance rates to expect when serving ``dataset`` (a dataset name, or
    ``all`` for every one) at ``temperature``, and where they come from; None when there is no prediction:
    the trainer's eval data (:func:`eval_data_rates`), else the held-out training samples
    (:func:`heldout_rates`)."""
    from_eval = eval_data_rates(training, temperature, num_speculative_tokens, dataset)
    if from_eval is not None:
        return from_eval
    rates = heldout_rates(training, temperature, num_speculative_tokens)
    return (rates, "held-out training samples") if rates is not None else None


@dataclass
class Counts:
    """An evaluation's counters: vLLM's speculative-decoding counters (served, or the torch engine's greedy
    replay), or at T>0 in torch the summed alpha per position; ``summary()`` is what ``lk-vllm eval`` reports."""

    num_speculative_tokens: int
    num_drafts: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    # For T>0 in torch: summed alpha and number of positions, per step.
    alpha_sum: list[float] = field(default_factory=list)
    alpha_count: list[int] = field(default_factory=list)

    def __post_init__(self):
        k = self.num_speculative_tokens
        self.accepted_per_position = list(self.accepted_per_position) or [0] * k
        self.alpha_sum = list(self.alpha_sum) or [0.0] * k
        self.alpha_count = list(self.alpha_count) or [0] * k

    def add(self, other: Counts) -> None:
        self.num_drafts += other.num_drafts
        for k in range(self.num_speculative_tokens):
            self.accepted_per_position[k] += other.accepted_per_position[k]
            self.alpha_sum[k] += other.alpha_sum[k]
            self.alpha_count[k] += other.alpha_count[k]

    def summary(self) -> dict:
        if any(self.alpha_count):
            # Clamped: summing alpha * n and dividing can overshoot 1 by rounding.
            alphas = [
                min(1.0, s / c) if c else 0.0 for s, c in zip(self.alpha_sum, self.alpha_count, strict=True)
            ]
            return {
                "acceptance_length": expected_acceptance_length(alphas),
                "per_position_alpha": alphas,
                "per_position_acceptance": cumulative_acceptance(alphas),
                "positions": int(self.alpha_count[0]),
            }
        accepted = int(sum(self.accepted_per_position))
        return {
            # None when nothing was drafted (e.g. every answer ended after one token).
            "acceptance_length": mean_acceptance_length(accepted, self.num_drafts),
            "per_position_acceptance": per_position_acceptance(self.accepted_per_position, self.num_drafts),
            "num_drafts": self.num_drafts,
            "num_draft_tokens": self.num_drafts * self.num_speculative_tokens,
            "num_accepted_tokens": accepted,
        }
