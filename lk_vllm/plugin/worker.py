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


def lk_reload_drafter(self, drafter_dir: str) -> dict[str, Any]:
    """Replace the live drafter's weights with those of the checkpoint in ``drafter_dir``, in place.

    vLLM post-processes weights after loading (on CPU every linear layer is repacked for oneDNN and its original
    weight freed), so new tensors cannot simply be copied into the old parameters. Instead a fresh drafter is
    built from ``drafter_dir`` through vLLM's own loader, with the live drafter's config (the caller has checked
    that architecture, sizes and tensor shapes are identical), and its processed state is moved into the live
    modules: parameters and buffers are copied, and the packed GEMM callables (``cpu_linear``) are taken over.
    Modules shared with the target (embeddings, lm_head when the checkpoint has none) and attention layers
    (which hold the KV cache) are left alone. Returns how many modules were updated and a checksum of the
    drafter's parameters before and after.
    """
    import copy

    import torch
    from vllm.compilation.backends import set_model_tag
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
    from vllm.model_executor.model_loader import get_model

    proposer = self.model_runner.drafter
    live = _drafter_model(self)
    shared = {id(m) for m in self.model_runner.model.modules()}
    before = _checksum(live)

    draft_vllm_config = proposer._create_draft_vllm_config()
    model_config = copy.copy(proposer.speculative_config.draft_model_config)
    model_config.model = drafter_dir
    with set_current_vllm_config(draft_vllm_config):
        context = draft_vllm_config.compilation_config.static_forward_context
        known_layers = set(context)
        try:
            with set_model_tag("lk_swap"):
                fresh = get_model(vllm_config=draft_vllm_config, model_config=model_config, prefix="lk_swap")
        finally:
            for name in set(context) - known_layers:  # the fresh drafter's attention layers are never run
                del context[name]

    updated = 0
    with torch.no_grad():
        for name, fresh_module in fresh.named_modules():
            try:
                live_module = live.get_submodule(name)
            except AttributeError:
                continue
            if id(live_module) in shared or isinstance(live_module, AttentionLayerBase):
                continue
            changed = False
            for tensors in ("_parameters", "_buffers"):
                for key, tensor in getattr(fresh_module, tensors).items():
                    old = getattr(live_module, tensors).get(key)
                    if tensor is None or old is None:
                        continue
                    if old.shape == tensor.shape:
                        old.data.copy_(tensor.data)
                    else:  # e.g. a weight vLLM freed after packing: take the fresh (equally processed) one
                        getattr(live_module, tensors)[key] = tensor
                    changed = True
            if hasattr(fresh_module, "cpu_linear"):
                live_module.cpu_linear = fresh_module.cpu_linear  # closes over the fresh packed weights
                changed = True
            updated += changed
    del fresh
    return {"modules": updated, "checksum_before": before, "checksum": _checksum(live)}


def _checksum(model) -> float:
    """Sum of the drafter's parameters and packed weights (to show that a reload changed them)."""
    total = 0.0
    for module in model.modules():
        for tensor in list(module._parameters.values()) + list(module._buffers.values()):
            if tensor is not None and tensor.is_floating_point() and tensor.numel():
                total += float(tensor.detach().double().sum())
        linear = getattr(module, "cpu_linear", None)
        cells = getattr(linear, "__closure__", None) or ()
        for cell in cells:
            value = cell.cell_contents
            if hasattr(value, "is_floating_point") and value.is_floating_point() and value.numel():
                total += float(value.detach().double().sum())
    return total


def install_worker_methods() -> None:
    """Add the lk methods to vLLM's WorkerBase (idempotent)."""
    from vllm.v1.worker.worker_base import WorkerBase

    for name, function in ((RELOAD_DRAFTER, lk_reload_drafter), (DRAFTER_PARAMETERS, lk_drafter_parameters)):
        existing = getattr(WorkerBase, name, None)
        if existing is not None and not getattr(existing, _MARK, False):
            raise RuntimeError(f"vLLM's WorkerBase already defines {name}; lk-vllm will not replace it")
        setattr(function, _MARK, True)
        setattr(WorkerBase, name, function)
