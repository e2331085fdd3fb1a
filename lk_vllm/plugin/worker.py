"""Worker-side methods lk-vllm adds to vLLM's workers (installed by the general plugin in every process).

The endpoint plugin reaches them through ``engine_client.collective_rpc("<name>", args=...)``: the engine
core runs a collective RPC between two engine steps, so a weight reload never races a forward pass.

This is the only patch lk-vllm applies to vLLM: new attributes on ``WorkerBase`` (the base class of the CPU
and GPU workers). Nothing existing is replaced, and installing twice is a no-op.
"""

from __future__ import annotations

from typing import Any

RELOAD_DRAFTER = "lk_reload_drafter"
DRAFTER_PARAMETERS = "lk_drafter_parameters"
_MARK = "_lk_vllm_method"


def _drafter_model(worker):
    drafter = getattr(getattr(worker, "model_runner", None), "drafter", None)
    model = getattr(drafter, "model", None)
    if model is None or not hasattr(model, "load_weights"):
        raise RuntimeError("this engine's drafter has no weights to reload (method without a draft model)")
    return model


def lk_drafter_parameters(self) -> dict[str, list[int]]:
    """Names and shapes of the live drafter's parameters (used to check a swap)."""
    return {name: list(p.shape) for name, p in _drafter_model(self).named_parameters()}


def lk_reload_drafter(self, weights_path: str) -> dict[str, Any]:
    """Load the drafter weights in ``weights_path`` (a .safetensors file) into the live drafter, in place.

    The caller has checked that the file holds exactly the tensors (names, shapes, dtypes) of the running
    drafter's checkpoint, so every copy lands in an existing parameter and shared target tensors stay
    untouched. Returns how many tensors were read and a checksum of the drafter's parameters after loading.
    """
    import torch
    from safetensors.torch import load_file

    model = _drafter_model(self)
    tensors = load_file(weights_path, device="cpu")
    with torch.no_grad():
        model.load_weights(iter(tensors.items()))
    checksum = float(sum(p.detach().double().sum().item() for p in model.parameters()))
    return {"tensors": len(tensors), "checksum": checksum}


def install_worker_methods() -> None:
    """Add the lk methods to vLLM's WorkerBase (idempotent)."""
    from vllm.v1.worker.worker_base import WorkerBase

    for name, function in ((RELOAD_DRAFTER, lk_reload_drafter), (DRAFTER_PARAMETERS, lk_drafter_parameters)):
        existing = getattr(WorkerBase, name, None)
        if existing is not None and not getattr(existing, _MARK, False):
            raise RuntimeError(f"vLLM's WorkerBase already defines {name}; lk-vllm will not replace it")
        setattr(function, _MARK, True)
        setattr(WorkerBase, name, function)
