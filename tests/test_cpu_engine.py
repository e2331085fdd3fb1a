"""CPU engine settings: the in-process worker patch, and settings the CPU cannot use refused in one line."""

from __future__ import annotations

import os

import pytest

from lk_vllm import engine, plugin
from lk_vllm.errors import UserError

pytestmark = pytest.mark.unit

NO_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n"
BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n"


def test_native_bf16_is_read_from_the_cpu_flags():
    assert not engine.cpu_has_native_bf16(NO_BF16)
    assert engine.cpu_has_native_bf16(BF16)
    assert engine.cpu_has_native_bf16(NO_BF16.replace("avx512f", "amx_bf16"))


def test_bf16_without_native_support_is_refused(monkeypatch):
    monkeypatch.setattr(engine, "on_gpu", lambda: False)
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda cpuinfo=None: False)
    with pytest.raises(
        UserError, match=r"--dtype bfloat16: this CPU has no native bf16 math .* use --dtype float32"
    ):
        engine.check_cpu_settings(engine.EngineSettings(model="m", dtype="bfloat16"))
    engine.check_cpu_settings(engine.EngineSettings(model="m"))  # float32 is fine
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda cpuinfo=None: True)
    engine.check_cpu_settings(engine.EngineSettings(model="m", dtype="bfloat16"))


def test_a_binding_to_a_core_that_does_not_exist_is_refused(monkeypatch):
    monkeypatch.setattr(engine, "on_gpu", lambda: False)
    missing = max(os.sched_getaffinity(0)) + 1
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", f"0-{missing}")
    with pytest.raises(
        UserError, match=rf"VLLM_CPU_OMP_THREADS_BIND=0-{missing}: core\(s\) {missing} do not exist"
    ):
        engine.check_cpu_settings(engine.EngineSettings(model="m"))
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "zero")
    with pytest.raises(UserError, match="expected core ids like 0-3,6"):
        engine.check_cpu_settings(engine.EngineSettings(model="m"))
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", str(min(os.sched_getaffinity(0))))
    engine.check_cpu_settings(engine.EngineSettings(model="m"))


def test_core_id_lists_parse_like_vllms():
    assert engine.parse_core_ids("0-3,6") == {0, 1, 2, 3, 6}
    assert engine.parse_core_ids("0-1|2-3") == {0, 1, 2, 3}


def test_a_users_binding_keeps_vllms_worker_process_and_says_so(monkeypatch, capsys):
    monkeypatch.setattr(engine, "on_gpu", lambda: False)
    monkeypatch.delenv(engine.INPROCESS_WORKER_ENV, raising=False)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0")
    engine.apply_engine_env()
    assert os.environ[engine.INPROCESS_WORKER_ENV] == "0"
    assert engine.cpu_worker_layout() == "worker-process"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "VLLM_CPU_OMP_THREADS_BIND is set" in err[0]
    monkeypatch.delenv(engine.INPROCESS_WORKER_ENV)
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND")
    engine.apply_engine_env()
    assert os.environ[engine.INPROCESS_WORKER_ENV] == "1" and engine.cpu_worker_layout() == "in-process"


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
