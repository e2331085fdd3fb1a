"""Every environment variable lk-vllm reads, in one place: its name, who sets it, what it means.

Users set the first four; ``lk-vllm serve`` and its supervisor set the rest for vLLM's processes (the plugin
reads them there, where no command-line flag reaches).
"""

from __future__ import annotations

# The cache: built models, prepared data, hidden-state caches, calibration profiles, runs (default ~/.cache/lk-vllm).
HOME_ENV = "LK_VLLM_HOME"
# A calibration profile (JSON) for the live speed-up; default: the cached one of this target, dtype and machine.
BASELINE_PROFILE_ENV = "LK_VLLM_BASELINE_PROFILE"
# "0": vLLM's own worker-process layout on CPU; lk-vllm runs the CPU worker inside EngineCore ("1") otherwise.
INPROCESS_WORKER_ENV = "LK_VLLM_CPU_INPROCESS_WORKER"
# "0": the losses run eagerly (no torch.compile), e.g. to debug them.
COMPILE_LOSS_ENV = "LK_VLLM_COMPILE_LOSS"

# Set by `lk-vllm serve` for the API-server plugin:
ADMIN_KEY_ENV = "LK_VLLM_ADMIN_KEY"  # the key the drafter-swap route wants (--admin-key)
DRAFTERS_DIR_ENV = (
    "LK_VLLM_DRAFTERS_DIR"  # swaps load drafters only from inside this directory (--drafters-dir)
)
DRIFT_ENV = "LK_VLLM_DRIFT"  # the drift alarm's settings, JSON
CAPTURE_ENV = (
    "LK_VLLM_CAPTURE"  # low-acceptance traffic capture settings, JSON (off unless --capture-low-acceptance)
)
# Set by the supervisor for the vLLM server it runs:
SUPERVISED_ENV = "LK_VLLM_SUPERVISED"  # a supervisor can restart the engine, so a swap may need a restart
STATS_STATE_ENV = "LK_VLLM_STATS_STATE"  # a file the live statistics are carried over in across a restart
