"""``vllm.stat_logger_plugins`` entry point: every engine step into the live store.

vLLM's ``AsyncLLM`` (the OpenAI server's engine client) builds one logger per engine and calls ``record`` after
each engine step's outputs were processed, in the API-server process; ``lk_vllm.plugin.server.live_stats.STORE`` lives in the
same process and is read by the HTTP routes. The logger is inert when speculative decoding is off.

Per-request counters come from the ``FinishedRequestStats`` of the requests that finished in the step, where
lk-vllm's patch of the output processor put them (``lk_vllm.plugin.patches``, point 4).
"""

from __future__ import annotations

import logging

from vllm.v1.metrics.loggers import StatLoggerBase

from lk_vllm.acceptance import sampling_mode
from lk_vllm.plugin.patches import FINISHED_SPEC_METRICS, FINISHED_TEMPERATURE

logger = logging.getLogger("lk_vllm.plugin")


def finished_request_counts(iteration_stats) -> list[tuple[int, int, str]]:
    """(drafts, accepted tokens, sampling mode) of every request that finished in this step and drafted."""
    out = []
    for finished in getattr(iteration_stats, "finished_requests", None) or ():
        metrics = getattr(finished, FINISHED_SPEC_METRICS, None)
        if metrics is None:
            continue
        # vLLM's histogram counts the request's draft-verify steps by accepted draft tokens j.
        num_drafts = sum(metrics.histogram)
        if num_drafts:
            num_accepted = sum(j * count for j, count in enumerate(metrics.histogram))
            out.append(
                (num_drafts, num_accepted, sampling_mode(getattr(finished, FINISHED_TEMPERATURE, None)))
            )
    return out


class LkStatLogger(StatLoggerBase):
    def __init__(self, vllm_config, engine_index: int = 0):
        from lk_vllm.plugin.server.live_stats import STORE

        self.engine_index = engine_index
        self.store = STORE
        spec = vllm_config.speculative_config
        self.active = spec is not None
        if spec is not None and engine_index == 0:
            from lk_vllm.plugin.server.drafter_info import describe_speculative_config
            from lk_vllm.plugin.server.speedup import load_baseline_for

            self.store.set_drafter(describe_speculative_config(spec))
            load_baseline_for(self.store, vllm_config)
            level = getattr(
                getattr(vllm_config, "observability_config", None), "per_request_spec_decode_metrics", "none"
            )
            self.store.set_per_request_source(
                None if level == "none" else f"vLLM's per-request speculative-decoding metrics ({level})",
                "vLLM was started without --per-request-spec-decode-metrics (summary or detailed): no per-request "
                "acceptance, so no mean of per-request means and no histogram"
                if level == "none"
                else None,
            )

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
        if not self.active or (scheduler_stats is None and iteration_stats is None):
            return
        spec = getattr(scheduler_stats, "spec_decoding_stats", None)
        finished = len(iteration_stats.finished_requests) if iteration_stats is not None else 0
        running = scheduler_stats.num_running_reqs if scheduler_stats is not None else 0
        output_tokens = iteration_stats.num_generation_tokens if iteration_stats is not None else 0
        # A step that finished a prefill (first token of a request) is not a pure decode step.
        timed = iteration_stats is not None and not iteration_stats.time_to_first_tokens_iter
        self.store.record_step(
            batch_size=running + finished,
            output_tokens=output_tokens,
            timed=timed,
            num_drafts=spec.num_drafts if spec else 0,
            num_draft_tokens=spec.num_draft_tokens if spec else 0,
            num_accepted_tokens=spec.num_accepted_tokens if spec else 0,
            accepted_per_position=list(spec.num_accepted_tokens_per_pos) if spec else [],
            requests=finished_request_counts(iteration_stats),
        )

    def log_engine_initialized(self):
        if self.active:
            logger.info("lk-vllm: live speculative-decoding statistics enabled")
