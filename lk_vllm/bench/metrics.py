"""From measurements to result records: acceptance, throughput, speedup and the training-time expectation.

* ``acceptance_length`` and ``per_position_acceptance`` come from vLLM's counters of the cell, through
  ``lk_vllm.acceptance`` (mean tokens per draft-verify step, bonus token included; unconditional rate of each
  draft position). ``None`` for the baseline: nothing is drafted there. That length is *pooled* over the cell's
  steps (``acceptance_length_aggregation``); ``acceptance_length_mean_of_request_means`` is the other
  aggregation (SpecForge's), from each request's own counters, with ``request_acceptance_histogram``.
  ``acceptance_lengths`` lists both, each with its aggregation and sampling mode (``temperature_0`` or
  ``sampled``, also in ``sampling``).
* ``tokens_per_s`` = output tokens / wall seconds of the cell; ``speedup`` = a contender's ``tokens_per_s``
  divided by the baseline's for the same dataset, temperature and concurrency, measured in the same run.
* ``training_expected_acceptance_length``: what the trainer predicted (``lk_training.json``): on its
  ``eval_data`` of this dataset and temperature when it has some (``data.eval_dirs``, e.g. the eval split's
  prompts answered by the target at the served temperature), else on its held-out training samples
  (``training.heldout``); ``training_expected_source`` says which. From the top-1 agreement of each position at
  T=0 (greedy drafting is accepted when the draft argmax is the target's) and from alpha = sum min(p, q) at T=1
  (drafts sampled from q, standard rejection sampling; the trainer measures alpha untempered). Other
  temperatures, or K beyond the trained steps, have no prediction. ``acceptance_length_gap_percent`` = 100 *
  (served - expected) / expected.
"""

from __future__ import annotations

from typing import Any

from lk_vllm import acceptance
from lk_vllm.acceptance import RequestAcceptance, SpecDecodeCounts
from lk_vllm.bench.contenders import Contender
from lk_vllm.bench.runner import Cell, Measurement, Plan


def _rate(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator > 0 else None


def record(
    contender: Contender,
    cell: Cell | tuple[str, float, int],
    measurement: Measurement,
    plan: Plan,
    baseline: Measurement | None,
) -> dict[str, Any]:
    """One result record (DESIGN.md, "Benchmark results")."""
    dataset, temperature, concurrency = (
        (cell.dataset, cell.temperature, cell.concurrency) if isinstance(cell, Cell) else cell
    )
    counts = measurement.counts
    tokens_per_s = _rate(measurement.output_tokens, measurement.seconds)
    baseline_tokens_per_s = None if baseline is None else _rate(baseline.output_tokens, baseline.seconds)
    speedup = None
    if tokens_per_s is not None and baseline_tokens_per_s:
        speedup = tokens_per_s / baseline_tokens_per_s
    k = 0 if contender.is_baseline else plan.num_speculative_tokens
    out: dict[str, Any] = {
        "drafter": contender.label,
        "drafter_path": contender.path,
        "architecture": contender.architecture,
        "loss": contender.loss,
        "dataset": dataset,
        "temperature": temperature,
        "num_speculative_tokens": k,
        "concurrency": concurrency,
        "num_prompts": measurement.num_requests,
        "max_tokens": plan.max_tokens,
        "output_tokens": measurement.output_tokens,
        "seconds": measurement.seconds,
        "tokens_per_s": tokens_per_s,
        "speedup": speedup,
        "acceptance_length": None,
        "per_position_acceptance": None,
        "training_expected_acceptance_length": None,
        "training_per_position_acceptance": None,
        "training_expected_source": None,
        "acceptance_length_gap_percent": None,
    }
    if contender.is_baseline:
        return out
    per_position = list(counts.accepted_per_position)[:k]
    per_position += [0] * (k - len(per_position))
    requests, mode = measurement.requests, acceptance.sampling_mode(temperature)
    out.update(
        acceptance_length=counts.acceptance_length,
        acceptance_length_aggregation="pooled",
        acceptance_length_mean_of_request_means=requests.mean_of_request_means,
        sampling=mode,
        acceptance_lengths=[
            {
                "aggregation": "pooled",
                "sampling": mode,
                "value": counts.acceptance_length,
                "num_drafts": counts.num_drafts,
            },
            {
                "aggregation": "mean_of_request_means",
                "sampling": mode,
                "value": requests.mean_of_request_means,
                "requests": requests.requests,
            },
        ],
        request_acceptance_histogram={
            "upper_bounds": [*acceptance.REQUEST_ACCEPTANCE_BUCKETS, "+Inf"],
            "counts": list(requests.histogram),
        },
        per_position_acceptance=acceptance.per_position_acceptance(per_position, counts.num_drafts),
        num_drafts=counts.num_drafts,
        num_draft_tokens=counts.num_draft_tokens,
        num_accepted_tokens=counts.num_accepted_tokens,
        accepted_per_position=per_position,
        # vLLM drafts greedily whenever a batch is all greedy, whatever the config says.
        draft_sample_method=(
            contender.speculative_config.get("draft_sample_method", "greedy") if temperature > 0 else "greedy"
        ),
    )
    predicted = acceptance.predicted_rates(contender.training, temperature, k, dataset)
    if predicted is not None:
        rates, out["training_expected_source"] = predicted
        expected = acceptance.expected_acceptance_length(rates)
        out["training_expected_acceptance_length"] = expected
        out["training_per_position_acceptance"] = acceptance.cumulative_acceptance(rates)
        if out["acceptance_length"] is not None:
            out["acceptance_length_gap_percent"] = 100.0 * (out["acceptance_length"] - expected) / expected
    return out


def pooled(measurements: list[Measurement]) -> Measurement:
    """Several cells' measurements as one (counters, tokens and seconds summed)."""
    counts, requests = SpecDecodeCounts(), RequestAcceptance()
    for m in measurements:
        counts, requests = counts + m.counts, requests + m.requests
    return Measurement(
        sum(m.num_requests for m in measurements),
        sum(m.output_tokens for m in measurements),
        sum(m.seconds for m in measurements),
        counts,
        requests,
    )


def build_records(
    plan: Plan, contenders: list[Contender], results: dict[str, dict[Cell, Measurement]]
) -> tuple[list[dict], list[dict]]:
    """(records per dataset, records over all datasets) for every contender, temperature and concurrency.
    ``results`` maps a contender's label to its measurements; speedups use the contender labelled baseline."""
    baseline = next((c for c in contenders if c.is_baseline), None)
    base = results.get(baseline.label) if baseline else None
    per_dataset, overall = [], []
    for contender in contenders:
        measured = results[contender.label]
        for cell, _ in plan.cells():
            per_dataset.append(record(contender, cell, measured[cell], plan, base[cell] if base else None))
        for temperature in plan.temperatures:
            for concurrency in plan.concurrencies:
                cells = [
                    c for c, _ in plan.cells() if (c.temperature, c.concurrency) == (temperature, concurrency)
                ]
                mine = pooled([measured[c] for c in cells])
                theirs = pooled([base[c] for c in cells]) if base else None
                overall.append(record(contender, ("all", temperature, concurrency), mine, plan, theirs))
    return per_dataset, overall
