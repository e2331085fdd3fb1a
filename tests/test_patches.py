"""The fixes lk_vllm.plugin.patches applies to vLLM 0.32.0: the CPU expand kernel that lost float values
(word salad at T > 0), Medusa's token map, and the one-worker CPU engine kept in the EngineCore process
(applied once; slow: the same tokens as vLLM's own process layout)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from lk_vllm import engine, plugin

pytestmark = pytest.mark.vllm


# ------------------------------------------------------------------------------------------------ the CPU patch
def _expand_reference(values, cu, replace_from, replace_to):
    counts = [int(cu[0])] + [int(cu[i] - cu[i - 1]) for i in range(1, len(cu))]
    out = []
    for value, count in zip(values.tolist(), counts, strict=True):
        out += [replace_to if value == replace_from else value] * count
    return out


@pytest.mark.vllm
def test_vllms_cpu_expand_kernel_loses_float_values_and_the_patch_keeps_them():
    """The bug behind word salad at T > 0 with speculation on this CPU build, and its fix."""
    import vllm._custom_ops  # noqa: F401 - loads the C++ ops
    from vllm.utils import cpu_triton_utils

    from lk_vllm.plugin import patching
    from lk_vllm.plugin.patches import expand_kernel_any_dtype

    original = cpu_triton_utils._expand_kernel_impl
    if patching.is_patched(original):  # patched by an earlier test: find vLLM's own
        import importlib

        original = importlib.reload(cpu_triton_utils)._expand_kernel_impl
        plugin.register()
    temperatures = torch.tensor([0.8, 0.0, 1.3])  # 0 = greedy, replaced by 1 as vLLM does
    cu = torch.tensor([3, 4, 7])
    expected = _expand_reference(temperatures, cu, 0, 1)

    sentinel = torch.full((7,), 123.0)
    original(sentinel, temperatures, cu, 0, 1)  # the int replace values vLLM passes
    assert sentinel.tolist() == [123.0] * 7  # vLLM 0.32.0's CPU kernel writes into an int64 copy

    out = torch.full((7,), 123.0)
    expand_kernel_any_dtype(out, temperatures, cu, 0, 1)
    assert out.tolist() == pytest.approx(expected)
    ints = torch.empty(4, dtype=torch.int32)
    expand_kernel_any_dtype(ints, torch.tensor([5, 0], dtype=torch.int32), torch.tensor([1, 4]), 0, 9)
    assert ints.tolist() == [5, 9, 9, 9]


@pytest.mark.vllm
def test_the_patch_reaches_vllms_rejection_sampler_through_the_platform_overrides():
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.sample import rejection_sampler

    plugin.register()  # what vLLM's worker does first ...
    CpuPlatform.register_triton_kernel_overrides()  # ... then the platform installs its kernels
    temperatures = torch.tensor([0.7, 0.0])
    expanded = rejection_sampler.expand_batch_to_tokens(
        temperatures, torch.tensor([2, 5]), 5, replace_from=0, replace_to=1
    )
    assert expanded.tolist() == pytest.approx([0.7, 0.7, 1.0, 1.0, 1.0])


# ---------------------------------------------------------------------------------------- the Medusa patch
def _tiny_medusa(truncated: int, vocab: int):
    """vLLM's Medusa module without a vLLM config: one head, a plain linear lm_head (what load_weights touches)."""
    from vllm.model_executor.models.medusa import Medusa

    model = Medusa.__new__(Medusa)
    torch.nn.Module.__init__(model)
    model.config = SimpleNamespace(original_lm_head=False)
    model.orig_vocab_size, model.truncated_vocab_size = vocab, truncated
    model.token_map = None
    model.lm_heads = torch.nn.ModuleList([torch.nn.Linear(2, truncated, bias=False)])
    return model


def _unloaded(model, loaded: set[str]) -> set[str]:
    """What vLLM's DefaultModelLoader.track_weights_loading rejects: parameters not reported as loaded."""
    return {name for name, _ in model.named_parameters()} - loaded


@pytest.mark.vllm
def test_vllms_medusa_rejects_its_own_token_map_and_the_patch_accepts_it():
    from vllm.model_executor.models.medusa import Medusa

    from lk_vllm.plugin.patches import patch_medusa_token_map

    assert patch_medusa_token_map() and patch_medusa_token_map()  # idempotent
    token_map = torch.tensor([0, 2, 5, 7])
    weights = [("token_map", token_map), ("lm_heads.0.weight", torch.arange(8.0).reshape(4, 2))]
    unpatched = Medusa.load_weights.__wrapped__  # vLLM's own method
    vllm_model = _tiny_medusa(4, 8)
    assert _unloaded(vllm_model, unpatched(vllm_model, iter(weights))) == {"token_map"}  # the bug

    model = _tiny_medusa(4, 8)
    loaded = model.load_weights(iter(weights))
    assert _unloaded(model, loaded) == set()
    assert torch.equal(model.token_map, token_map)
    assert torch.equal(model.lm_heads[0].weight, torch.arange(8.0).reshape(4, 2))
    full = _tiny_medusa(8, 8)  # no truncation: nothing to add
    assert "token_map" not in full.load_weights(iter([("lm_heads.0.weight", torch.zeros(8, 2))]))


@pytest.mark.vllm
def test_the_in_process_patch_is_idempotent():
    from vllm.platforms.cpu import CpuPlatform

    from lk_vllm.plugin import patching

    plugin.register()
    first = CpuPlatform.check_and_update_config.__func__
    plugin.register()
    assert CpuPlatform.check_and_update_config.__func__ is first
    assert not patching.is_patched(first.__wrapped__)  # vLLM's own method, wrapped once


def _run(default_target, spec, inprocess: str):
    """T=0 token ids of three MT-Bench prompts and the executor backend vLLM chose. fp32: the two layouts run
    different numbers of OpenMP threads, and bf16 matmuls round differently with another split of the sums."""
    from vllm import SamplingParams

    from lk_vllm.datasets import chat_prompt_ids, load_prompts

    os.environ[engine.INPROCESS_WORKER_ENV] = inprocess
    llm = engine.make_llm(
        engine.EngineSettings(
            model=default_target, max_model_len=1024, speculative_config=spec, dtype="float32"
        )
    )
    try:
        tokenizer = llm.get_tokenizer()
        prompts = [
            {"prompt_token_ids": chat_prompt_ids(tokenizer, p.messages)}
            for p in load_prompts("mtbench", limit=3)
        ]
        outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=48), use_tqdm=False)
        backend = llm.llm_engine.vllm_config.parallel_config.distributed_executor_backend
        return [list(o.outputs[0].token_ids) for o in outputs], backend
    finally:
        engine.shutdown_llm(llm)


@pytest.mark.engine
@pytest.mark.slow
def test_in_process_worker_gives_vllms_own_tokens(default_target, monkeypatch):
    """vLLM's layout (worker process, "mp") and lk-vllm's (model in the EngineCore, "uni") generate the same
    tokens at T=0, with n-gram speculation, whose verify steps are where the two could differ."""
    monkeypatch.setenv(engine.INPROCESS_WORKER_ENV, "0")
    spec = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4}
    theirs, their_backend = _run(default_target, spec, "0")
    ours, our_backend = _run(default_target, spec, "1")
    assert (their_backend, our_backend) == ("mp", "uni")
    assert ours == theirs and all(len(tokens) > 0 for tokens in ours)
