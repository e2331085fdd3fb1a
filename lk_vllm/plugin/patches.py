"""Fixes lk-vllm applies to vLLM 0.32.0, each idempotent, each tested (tests/test_patches.py; the fourth through the
stat logger that reads what it copies, tests/test_stat_logger.py).

1. **CPU ``expand_kernel`` override ignores non-int64 tensors.** On CPU builds without Triton, vLLM replaces the
   rejection sampler's Triton ``expand_kernel`` with ``vllm.utils.cpu_triton_utils._expand_kernel_impl``, which
   converts ``output`` and ``input_val`` to int64 *copies* before calling the C++ kernel. For the float32
   temperature and top-p tensors of ``rejection_sampler.expand_batch_to_tokens`` the results land in the
   temporary copy and the real output stays uninitialised (``new_empty``): at temperature > 0 the target logits
   are divided by garbage and speculative sampling emits nonsense (seen with ngram and EAGLE-3 on this CPU:
   coherent at T=0, word salad at T=0.8). The replacement below is a plain torch ``repeat_interleave`` that keeps
   the dtype. It is installed by the general plugin, which vLLM runs in each worker *before* the CPU platform
   registers its kernel overrides (``WorkerWrapperBase.init_worker``), so the platform picks it up.
2. **Medusa with a truncated vocabulary does not load.** ``Medusa.load_weights`` turns the checkpoint's
   ``token_map`` into a new ``nn.Parameter`` but leaves it out of the names it reports as loaded, so the
   default loader's ``track_weights_loading`` rejects every checkpoint with ``truncated_vocab_size`` <
   ``vocab_size``: "Following weights were not initialized from checkpoint: {'token_map'}" (found by
   ``examples/reproduce_smollm2.sh``). The wrapper below adds the name when the map was loaded.
3. **On CPU the model runs in a third process.** ``CpuPlatform.check_and_update_config`` turns a one-worker
   engine's ``uni`` executor into ``mp``, so every step crosses a shared-memory queue between the EngineCore
   and a worker process, both busy-waiting with ``sched_yield``, and vLLM reserves one of the machine's cores
   for the EngineCore. On a 2-core machine that costs 13-23% of a decode step (benchmarks/results/
   cpu-spec-step.md). With ``LK_VLLM_CPU_INPROCESS_WORKER=1`` (set by ``lk_vllm.engine`` on CPU) the wrapper
   below puts ``uni`` back for a one-worker engine, so the model runs inside the EngineCore process; tensor or
   pipeline parallel engines keep vLLM's ``mp``.
4. **Stat loggers get no per-request speculative counters.** The scheduler sends each finished request's
   ``RequestSpecDecodeMetrics`` (with ``--per-request-spec-decode-metrics summary|detailed``) to the front end,
   where the output processor puts it on the response only; the ``FinishedRequestStats`` a stat logger receives
   carry none. The wrapper below copies it, and the request's temperature, onto that request's
   ``FinishedRequestStats`` (attributes ``lk_spec_decode_metrics`` and ``lk_temperature``), which the lk stat
   logger reads for per-request acceptance (``lk_vllm.plugin.server.live_stats``). A request stopped by a stop string in the
   front end, before the engine finished it, has no metrics there (vLLM's response has none either).
"""

from __future__ import annotations

import functools
import os

from lk_vllm.env import INPROCESS_WORKER_ENV
from lk_vllm.plugin import patching


def expand_kernel_any_dtype(output, input_val, cu_num_tokens, replace_from, replace_to, MAX_NUM_TOKENS=None):
    """``output[t] = input_val[request of t]`` (``replace_from`` -> ``replace_to``), any dtype, in place."""
    import torch

    counts = torch.diff(cu_num_tokens.to(torch.int64), prepend=cu_num_tokens.new_zeros(1, dtype=torch.int64))
    values = torch.where(input_val == replace_from, torch.full_like(input_val, replace_to), input_val)
    expanded = torch.repeat_interleave(
        values, counts, output_size=int(cu_num_tokens[-1]) if len(counts) else 0
    )
    output[: expanded.numel()].copy_(expanded.to(output.dtype))


def patch_cpu_expand_kernel() -> bool:
    """Install the fixed expand kernel on CPU builds; returns True when it is (or already was) in place."""
    try:
        from vllm.utils import cpu_triton_utils
    except ImportError:  # a GPU build: nothing to fix
        return False
    patching.replace(
        cpu_triton_utils,
        "_expand_kernel_impl",
        expand_kernel_any_dtype,
        parameters=("output", "input_val", "cu_num_tokens", "replace_from", "replace_to", "MAX_NUM_TOKENS"),
        why="CPU expand kernel that keeps the output dtype (temperatures at T > 0)",
    )
    return True


def patch_medusa_token_map() -> bool:
    """Report Medusa's ``token_map`` as loaded when the checkpoint carried it; True when the patch is in place."""
    try:
        from vllm.model_executor.models.medusa import Medusa
    except ImportError:
        return False

    def make(original):
        @functools.wraps(original)  # keeps vLLM's method reachable as __wrapped__
        def load_weights(self, weights):
            loaded = original(self, weights)
            if getattr(self, "token_map", None) is not None:
                loaded.add("token_map")
            return loaded

        return load_weights

    patching.wrap(
        Medusa,
        "load_weights",
        make,
        parameters=("self", "weights"),
        why="a Medusa checkpoint's token_map counts as loaded",
    )
    return True


def patch_cpu_inprocess_worker() -> bool:
    """Keep a one-worker CPU engine's ``uni`` executor when ``LK_VLLM_CPU_INPROCESS_WORKER=1``; True when the
    patch is in place."""
    try:
        from vllm.platforms.cpu import CpuPlatform
    except ImportError:
        return False

    def make(original):
        @functools.wraps(original)
        def check_and_update_config(cls, vllm_config):
            parallel = vllm_config.parallel_config
            requested = parallel.distributed_executor_backend
            original(cls, vllm_config)
            wanted = os.environ.get(INPROCESS_WORKER_ENV, "0") == "1"
            if wanted and requested == "uni" and parallel.world_size == 1:
                parallel.distributed_executor_backend = "uni"

        return check_and_update_config

    patching.wrap(
        CpuPlatform,
        "check_and_update_config",
        make,
        parameters=("cls", "vllm_config"),
        why="a one-worker CPU engine keeps its worker in EngineCore's process",
    )
    return True


FINISHED_SPEC_METRICS = "lk_spec_decode_metrics"
FINISHED_TEMPERATURE = "lk_temperature"


def patch_finished_request_spec_metrics() -> bool:
    """Put a finished request's own speculative counters and temperature on its ``FinishedRequestStats``;
    True when the patch is in place."""
    from vllm.v1.engine.output_processor import OutputProcessor

    def make(original):
        @functools.wraps(original)
        def _update_stats_from_finished(self, req_state, finish_reason, iteration_stats):
            count = len(iteration_stats.finished_requests) if iteration_stats is not None else 0
            original(self, req_state, finish_reason, iteration_stats)
            if iteration_stats is not None and len(iteration_stats.finished_requests) == count + 1:
                finished = iteration_stats.finished_requests[-1]
                setattr(finished, FINISHED_SPEC_METRICS, req_state.spec_decode_metrics)
                setattr(finished, FINISHED_TEMPERATURE, req_state.temperature)

        return _update_stats_from_finished

    patching.wrap(
        OutputProcessor,
        "_update_stats_from_finished",
        make,
        parameters=("self", "req_state", "finish_reason", "iteration_stats"),
        why="a finished request's own speculative counters and temperature reach the stat logger",
    )
    return True


def apply_patches() -> None:
    patch_cpu_expand_kernel()
    patch_medusa_token_map()
    patch_cpu_inprocess_worker()
    patch_finished_request_spec_metrics()
