"""Runs one contender's vLLM engine over every cell of the plan and measures it.

One offline engine (``lk_vllm.engine.make_llm``) per contender, started, measured and shut down before the
next one starts: engines never share the machine. Requests go through the engine's own request loop
(``LLMEngine.add_request`` / ``step``) as a closed loop: at concurrency ``c`` exactly ``c`` requests are in
flight while prompts remain (a finished request is replaced at once), so concurrency 1 is batch 1, one request
after another, and concurrency 8 is eight clients that each send their next request when the last one is
answered. ``max_num_seqs`` is the largest concurrency for every contender.

Each cell (dataset, temperature, concurrency) measures, on the same engine:

* wall time from the first request's submission to the last one's completion, and the output tokens of all
  requests (prefills included: they are the same work with and without a drafter);
* the engine's speculative-decoding counters before and after (``read_spec_decode_counters``); the difference
  belongs to the cell (``lk_vllm.acceptance.SpecDecodeCounts``): the pooled acceptance length;
* each finished request's own counters (vLLM's per-request speculative-decoding metrics, which the engine
  reports with ``per_request_spec_decode_metrics="summary"``), summed in ``lk_vllm.acceptance.RequestAcceptance``:
  the mean of per-request means and the per-request histogram.

Before the first cell a short warm-up (not measured) runs at every temperature, and the prefix cache is
emptied before each cell so a cell never reuses the prompts' KV cache from an earlier one. At T>0 request
``i`` of a dataset samples with seed ``seed + i``: the same seeds for every contender and concurrency.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from lk_vllm.acceptance import Counts, RequestAcceptance, SpecDecodeCounts
from lk_vllm.bench.contenders import Contender
from lk_vllm.bench.workloads import Workload
from lk_vllm.drafters import speculative_config_for, with_faithful_sampling
from lk_vllm.engine import (
    EngineSettings,
    make_llm,
    read_spec_decode_counters,
    shutdown_llm,
    whole_prompt_prefills,
)
from lk_vllm.log import log

WARM_UP_TOKENS = 8


@dataclass(frozen=True)
class Cell:
    dataset: str
    temperature: float
    concurrency: int


@dataclass(frozen=True)
class Plan:
    """What every contender runs: each dataset at each temperature and concurrency."""

    workloads: tuple[Workload, ...]
    temperatures: tuple[float, ...]
    concurrencies: tuple[int, ...]
    num_speculative_tokens: int
    max_tokens: int
    seed: int = 0

    def cells(self) -> Iterator[tuple[Cell, Workload]]:
        for workload in self.workloads:
            for temperature in self.temperatures:
                for concurrency in self.concurrencies:
                    yield Cell(workload.dataset, temperature, concurrency), workload

    def num_requests(self) -> int:
        return sum(len(cell_workload.prompt_ids) for _, cell_workload in self.cells())

    def max_model_len(self) -> int:
        """Context an engine needs: the longest prompt, its answer and one verification step beyond it."""
        longest = max(w.longest_prompt for w in self.workloads)
        return longest + self.max_tokens + self.num_speculative_tokens + 1


@dataclass(frozen=True)
class Measurement:
    num_requests: int
    output_tokens: int
    seconds: float
    counts: SpecDecodeCounts
    requests: RequestAcceptance = RequestAcceptance()


def engine_settings(base: EngineSettings, plan: Plan, contender: Contender) -> EngineSettings:
    """``base`` with the contender's speculative config; everything else identical for every contender.
    Whole-prompt prefills because requests sample with their own seed (see ``whole_prompt_prefills``)."""
    extra = dict(base.extra)
    if contender.speculative_config:  # each request's own counters (acceptance per request)
        extra.setdefault("per_request_spec_decode_metrics", "summary")
    settings = dataclasses.replace(
        base,
        speculative_config=contender.speculative_config,
        max_num_seqs=max(plan.concurrencies),
        extra=extra,
    )
    return whole_prompt_prefills(settings)


def sampling_params(temperature: float, max_tokens: int, seeds: Sequence[int]) -> list:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return [
        SamplingParams(
            temperature=temperature,
            max_tokens=max_tokens,
            seed=seed if temperature > 0 else None,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        for seed in seeds
    ]


def request_counts(completion) -> RequestAcceptance:
    """One finished sequence's own speculative counters (nothing when vLLM reported none)."""
    metrics = getattr(completion, "spec_decode_metrics", None)
    if metrics is None:
        return RequestAcceptance()
    # vLLM's histogram counts the sequence's draft-verify steps by accepted draft tokens j.
    return RequestAcceptance.of_request(
        sum(metrics.histogram), sum(j * count for j, count in enumerate(metrics.histogram))
    )


def drive(
    engine,
    prompt_ids: Sequence[Sequence[int]],
    params: Sequence,
    concurrency: int,
    on_finished: Callable[[], None] | None = None,
    requests: list[RequestAcceptance] | None = None,
) -> tuple[int, float]:
    """Run the prompts with ``concurrency`` requests in flight; return (output tokens, wall seconds). Each
    finished sequence's own speculative counters are appended to ``requests`` when given."""
    from vllm.inputs import TokensPrompt

    prefix = uuid.uuid4().hex[:8]
    waiting = list(range(len(prompt_ids)))[::-1]
    in_flight: set[str] = set()
    output_tokens = 0

    def submit() -> None:
        index = waiting.pop()
        request_id = f"bench-{prefix}-{index}"
        engine.add_request(request_id, TokensPrompt(prompt_token_ids=list(prompt_ids[index])), params[index])
        in_flight.add(request_id)

    started = time.perf_counter()
    while waiting and len(in_flight) < concurrency:
        submit()
    while in_flight:
        for output in engine.step():
            if not output.finished:
                continue
            in_flight.discard(output.request_id)
            output_tokens += sum(len(completion.token_ids) for completion in output.outputs)
            if requests is not None:
                requests += [request_counts(completion) for completion in output.outputs]
            if on_finished is not None:
                on_finished()
            if waiting:
                submit()
    return output_tokens, time.perf_counter() - started


def _counters(llm, num_positions: int) -> SpecDecodeCounts:
    return SpecDecodeCounts.from_mapping(read_spec_decode_counters(llm, num_positions))


def measure(
    settings: EngineSettings,
    plan: Plan,
    on_finished: Callable[[Cell], None] | None = None,
    on_ready: Callable[[], None] | None = None,
) -> dict[Cell, Measurement]:
    """Start an engine with ``settings``, measure every cell of ``plan``, shut the engine down."""
    num_positions = (settings.speculative_config or {}).get("num_speculative_tokens", 0)
    llm = make_llm(settings)
    try:
        engine = llm.llm_engine
        if on_ready is not None:
            on_ready()
        first = plan.workloads[0].prompt_ids[: max(plan.concurrencies)]
        for temperature in plan.temperatures:  # warm-up, not measured
            params = sampling_params(temperature, min(WARM_UP_TOKENS, plan.max_tokens), range(len(first)))
            drive(engine, first, params, max(plan.concurrencies))
        results = {}
        for cell, workload in plan.cells():
            engine.reset_prefix_cache()
            seeds = [plan.seed + index for index in range(len(workload.prompt_ids))]
            params = sampling_params(cell.temperature, plan.max_tokens, seeds)
            before = _counters(llm, num_positions)
            requests: list[RequestAcceptance] = []
            tokens, seconds = drive(
                engine,
                workload.prompt_ids,
                params,
                cell.concurrency,
                None if on_finished is None else lambda cell=cell: on_finished(cell),
                requests,
            )
            results[cell] = Measurement(
                len(workload.prompt_ids),
                tokens,
                seconds,
                _counters(llm, num_positions) - before,
                sum(requests, RequestAcceptance()),
            )
        return results
    finally:
        shutdown_llm(llm)


def evaluate_vllm(
    drafter_dir: str,
    target_path: str,
    prompt_ids_by_dataset: dict[str, list[list[int]]],
    num_tokens: int,
    max_tokens: int,
    temperature: float,
    settings_overrides: dict | None = None,
    seed: int = 0,
) -> dict[str, Counts]:
    """Serve the drafter in vLLM and read its counters per dataset (deltas of the cumulative counters)."""
    longest = max(len(ids) for batch in prompt_ids_by_dataset.values() for ids in batch)
    # Whole-prompt prefills: every request samples with the seed (see ``whole_prompt_prefills``).
    settings = whole_prompt_prefills(
        EngineSettings(
            model=target_path,
            max_model_len=max(2048, longest + max_tokens + num_tokens + 8),
            # As lk-vllm serve runs it: at T>0 drafts are sampled from the draft distribution, so vLLM's acceptance
            # rate is the alpha (sum of min(p, q)) the torch engine and the LK losses use (vLLM's default drafts
            # greedily); at T=0 both are the argmax.
            speculative_config=with_faithful_sampling(speculative_config_for(drafter_dir, num_tokens)),
            seed=seed,
        )
    )
    for key, value in (settings_overrides or {}).items():
        setattr(settings, key, value)
    log(f"starting vLLM with {settings.speculative_config}")
    llm = make_llm(settings)
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=seed)
    per_dataset: dict[str, Counts] = {}
    try:
        before = SpecDecodeCounts.from_mapping(read_spec_decode_counters(llm, num_tokens))
        for name, batch in prompt_ids_by_dataset.items():
            llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in batch], params, use_tqdm=False)
            after = SpecDecodeCounts.from_mapping(read_spec_decode_counters(llm, num_tokens))
            delta = after - before
            per_dataset[name] = Counts(
                num_tokens,
                num_drafts=delta.num_drafts,
                accepted_per_position=list(delta.accepted_per_position),
            )
            before = after
    finally:
        shutdown_llm(llm)
    return per_dataset
