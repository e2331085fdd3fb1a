"""Worker-side methods lk-vllm adds to vLLM's workers (installed by the general plugin in every process).

The endpoint plugin reaches them through ``engine_client.collective_rpc("<name>", args=...)``: the engine
core runs a collective RPC between two engine steps, so a weight reload never races a forward pass.

This is the only patch lk-vllm applies to vLLM: new attributes on ``WorkerBase`` (the base class of the CPU
and GPU workers). Nothing existing is replaced, and installing twice is a no-op.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

from lk_vllm.plugin import patching

RELOAD_DRAFTER = "lk_reload_drafter"
DRAFTER_PARAMETERS = "lk_drafter_parameters"


def _proposer(worker):
    """The live drafter's proposer. vLLM 0.32's V1 model runner (CPU, and GPU with
    ``VLLM_USE_V2_MODEL_RUNNER=0``) keeps it as ``model_runner.drafter``; the V2 GPU runner
    (``vllm/v1/worker/gpu/model_runner.py``) as ``model_runner.speculator``."""
    runner = getattr(worker, "model_runner", None)
    for name in ("drafter", "speculator"):
        proposer = getattr(runner, name, None)
        if proposer is not None:
            return proposer
    return None


def _drafter_model(worker):
    model = getattr(_proposer(worker), "model", None)
    if model is None or not hasattr(model, "load_weights"):
        raise RuntimeError("this engine's drafter has no weights to reload (method without a draft model)")
    return model


def _draft_configs(proposer):
    """(vllm_config, draft model config) the live drafter was built with, for each proposer layout of vLLM 0.32.

    * V1 EAGLE / draft-model proposers and lk-vllm's MLP proposer: ``_create_draft_vllm_config()`` and
      ``speculative_config``.
    * V1 ``MedusaProposer``: its own ``vllm_config`` and ``spec_config`` (it has neither name above).
    * V2 speculators (``DraftModelSpeculator``): ``vllm_config`` and ``speculative_config``, with the draft's
      kernel overrides applied as ``load_eagle_model`` does.

    The load config is the one vLLM reads drafters with (``get_draft_load_config``)."""
    from vllm.model_executor.model_loader.utils import get_draft_load_config

    speculative_config = getattr(proposer, "speculative_config", None) or getattr(
        proposer, "spec_config", None
    )
    if speculative_config is None or getattr(speculative_config, "draft_model_config", None) is None:
        raise RuntimeError(
            f"{type(proposer).__name__} has no speculative config with a draft model to reload"
        )
    if hasattr(proposer, "_create_draft_vllm_config"):
        vllm_config = proposer._create_draft_vllm_config()
    else:
        vllm_config = proposer.vllm_config
        overrides = getattr(speculative_config, "apply_draft_overrides", None)
        if overrides is not None:
            vllm_config = overrides(vllm_config)
    load_config = get_draft_load_config(vllm_config)
    if load_config is not vllm_config.load_config:
        vllm_config = replace(vllm_config, load_config=load_config)
    return vllm_config, speculative_config.draft_model_config


def lk_drafter_parameters(self) -> dict[str, list[int]]:
    """Names and shapes of the live drafter's parameters (used to check a swap)."""
    return {name: list(p.shape) for name, p in _drafter_model(self).named_parameters()}


def lk_reload_drafter(self, drafter_dir: str) -> dict[str, Any]:
    """Replace the live drafter's weights with those of the checkpoint in ``drafter_dir``, in place (EAGLE-3,
    Medusa, MLP speculator, draft model; V1 and V2 model runners, see ``_draft_configs``).

    vLLM post-processes weights after loading (on CPU every linear layer is repacked for oneDNN and its original
    weight freed), so new tensors cannot simply be copied into the old parameters. Instead a fresh drafter is
    built from ``drafter_dir`` through vLLM's own loader, with the live drafter's config (the caller has checked
    that architecture, sizes and tensor shapes are identical), and its processed state is moved into the live
    modules: parameters and buffers are copied, and the packed GEMM callables (``cpu_linear``) are taken over.
    Modules shared with the target (embeddings, lm_head when the checkpoint has none) and attention layers
    (which hold the KV cache) are left alone. Returns how many modules were updated and a checksum of the
    drafter's parameters before and after.
    """
    import torch
    from vllm.compilation.backends import set_model_tag
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
    from vllm.model_executor.model_loader import get_model

    live = _drafter_model(self)
    shared = {id(m) for m in self.model_runner.model.modules()}
    before = _checksum(live)

    draft_vllm_config, draft_model_config = _draft_configs(_proposer(self))
    model_config = copy.copy(draft_model_config)
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

    patching.add(
        WorkerBase, RELOAD_DRAFTER, lk_reload_drafter, why="drafter swap: reload its weights in place"
    )
    patching.add(
        WorkerBase, DRAFTER_PARAMETERS, lk_drafter_parameters, why="drafter swap: checksum the weights"
    )
