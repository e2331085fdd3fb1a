"""What vLLM loads from lk-vllm through entry points (see pyproject.toml), split by the process that runs it:
``patches`` (every vLLM process), ``engine/`` (the engine core: drafter reload in place, the MLP-speculator
proposer) and ``server/`` (the API server: routes, stat logger, live statistics, speed-up, swap, drift alarm,
traffic capture, dashboard). Nothing here imports lk-vllm's applications (``training``, ``serving``).

Three plugins, each named in ``VLLM_PLUGINS`` when that variable is set (vLLM loads endpoint plugins only
when they are named there):

* ``lk_general`` (``vllm.general_plugins``, every vLLM process): checks the vLLM version, fixes the CPU
  rejection-sampler bug that breaks speculative sampling at T > 0 (``lk_vllm.plugin.patches``), installs
  the worker-side method used to reload a drafter's weights in place (``lk_vllm.plugin.engine.worker``) and
  makes the V1 engine serve ``mlp_speculator`` drafters (``lk_vllm.plugin.engine.mlp_proposer``).
* ``lk_stats`` (``vllm.stat_logger_plugins``, the API-server process): records every engine step's
  speculative-decoding counts and timing into the live store (``lk_vllm.plugin.server.live_stats``).
* ``lk_endpoints`` (``vllm.endpoint_plugins``, the API-server process): ``/v1/speculative/stats``,
  ``/v1/speculative/drafter``, ``/dashboard`` and the ``lk_*`` Prometheus gauges
  (``lk_vllm.plugin.server.routes``).

All three do nothing visible when speculative decoding is off (the stats route then answers 404).
"""

from __future__ import annotations

import sys

GENERAL_PLUGIN = "lk_general"
STAT_LOGGER_PLUGIN = "lk_stats"
ENDPOINT_PLUGIN = "lk_endpoints"
PLUGIN_NAMES = (GENERAL_PLUGIN, STAT_LOGGER_PLUGIN, ENDPOINT_PLUGIN)


def plugins_env_value(current: str | None) -> str:
    """The ``VLLM_PLUGINS`` value that keeps the user's list and adds every lk plugin.

    Unset means "all plugins" to vLLM except endpoint plugins, which must be named, so lk-vllm always sets it.
    """
    names = [name.strip() for name in (current or "").split(",") if name.strip()]
    return ",".join(names + [name for name in PLUGIN_NAMES if name not in names])


def check_version_or_exit() -> str:
    """Refuse to run inside a vLLM other than the one lk-vllm was built for: one line, no traceback."""
    from lk_vllm.engine import check_vllm_version

    try:
        return check_vllm_version()
    except RuntimeError as exc:
        print(f"lk-vllm plugin: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def register() -> None:
    """``vllm.general_plugins`` entry point; vLLM may call it more than once per process."""
    check_version_or_exit()
    from lk_vllm.plugin.engine import mlp_proposer
    from lk_vllm.plugin.engine.worker import install_worker_methods
    from lk_vllm.plugin.patches import apply_patches

    apply_patches()
    install_worker_methods()
    mlp_proposer.install()
