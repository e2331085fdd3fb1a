"""The one place that knows how to start vLLM here (lk_vllm.engine): defaults, overrides, the version
check, and CPU settings the CPU cannot use refused in one line (the in-process worker patch:
test_patches.py)."""

from __future__ import annotations

import os

import pytest

from lk_vllm import engine
from lk_vllm.errors import UserError

pytestmark = pytest.mark.unit


def test_cpu_defaults_are_the_measured_working_settings(monkeypatch):
    monkeypatch.setattr(engine, "on_gpu", lambda: False)
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda cpuinfo=None: False)
    kwargs = engine.EngineSettings(model="/m").llm_kwargs()
    assert kwargs["dtype"] == "float32"
    assert kwargs["gpu_memory_utilization"] == 0.3
    assert kwargs["enforce_eager"] is True
    assert kwargs["disable_log_stats"] is False  # lk-vllm always reads the acceptance counters
    assert "speculative_config" not in kwargs


def test_cpu_dtype_is_bf16_only_with_native_bf16_math_and_says_so(monkeypatch, capsys):
    monkeypatch.setattr(engine, "on_gpu", lambda: False)
    for native, dtype in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda cpuinfo=None, native=native: native)
        settings = engine.EngineSettings(model="/m")
        assert settings.llm_kwargs()["dtype"] == dtype
        engine.check_cpu_settings(settings)
        assert f"CPU engine dtype {dtype} (this CPU has {'' if native else 'no '}native bf16 math" in (
            capsys.readouterr().err
        )
    engine.check_cpu_settings(engine.EngineSettings(model="/m", dtype="float32"))  # chosen: nothing to say
    assert capsys.readouterr().err == ""


def test_gpu_keeps_vllm_defaults(monkeypatch):
    monkeypatch.setattr(engine, "on_gpu", lambda: True)
    kwargs = engine.EngineSettings(model="/m").llm_kwargs()
    assert kwargs["dtype"] == "auto"
    assert "gpu_memory_utilization" not in kwargs
    assert kwargs["enforce_eager"] is False


def test_explicit_values_and_extra_win(monkeypatch):
    monkeypatch.setattr(engine, "on_gpu", lambda: False)
    settings = engine.EngineSettings(
        model="/m",
        dtype="bfloat16",
        gpu_memory_utilization=0.5,
        enforce_eager=False,
        speculative_config={"method": "ngram", "num_speculative_tokens": 3},
        extra={"block_size": 128},
    )
    kwargs = settings.llm_kwargs()
    assert (kwargs["dtype"], kwargs["gpu_memory_utilization"], kwargs["enforce_eager"]) == (
        "bfloat16",
        0.5,
        False,
    )
    assert kwargs["speculative_config"] == {"method": "ngram", "num_speculative_tokens": 3}
    assert kwargs["block_size"] == 128


def test_environment_respects_user_values(monkeypatch):
    monkeypatch.setattr(engine, "on_gpu", lambda: False)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "4")
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    engine.apply_engine_env()
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "4"
    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    assert os.environ["HF_HUB_OFFLINE"] == "1"


@pytest.mark.vllm
def test_server_args_parse_back_with_vllms_own_parser(monkeypatch):
    """The flags we hand to vLLM's OpenAI server mean what the offline kwargs mean."""
    monkeypatch.setattr(engine, "on_gpu", lambda: False)
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda cpuinfo=None: False)
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    settings = engine.EngineSettings(
        model="/some/model",
        max_model_len=1024,
        max_num_seqs=4,
        speculative_config={"method": "ngram", "num_speculative_tokens": 3},
    )
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    parsed = parser.parse_args(settings.server_args())
    assert parsed.model == "/some/model"
    assert parsed.max_model_len == 1024
    assert parsed.max_num_seqs == 4
    assert parsed.dtype == "float32"
    assert parsed.enforce_eager is True
    assert parsed.gpu_memory_utilization == 0.3
    assert parsed.speculative_config["num_speculative_tokens"] == 3


def test_version_check(monkeypatch):
    monkeypatch.setattr(engine, "vllm_version", lambda: "0.31.1")
    with pytest.raises(RuntimeError, match="built for vLLM 0.32.0 but vLLM 0.31.1"):
        engine.check_vllm_version()
    monkeypatch.setattr(engine, "vllm_version", lambda: "0.32.0+cpu")
    assert engine.check_vllm_version() == "0.32.0+cpu"


def test_engine_arguments_round_trip_through_our_own_flags(monkeypatch):
    import argparse

    monkeypatch.setattr(engine, "on_gpu", lambda: False)
    settings = engine.EngineSettings(
        model="/m",
        max_model_len=777,
        dtype="bfloat16",
        seed=5,
        tensor_parallel_size=2,
        gpu_memory_utilization=0.4,
        enforce_eager=False,
    )
    parser = argparse.ArgumentParser()
    engine.add_engine_arguments(parser)
    rebuilt = engine.settings_from_args(parser.parse_args(engine.engine_arguments(settings)), "/m")
    assert rebuilt.llm_kwargs() == settings.llm_kwargs()


def test_without_preemption_caps_requests_at_the_kv_cache(monkeypatch, tmp_path):
    import json

    (tmp_path / "config.json").write_text(
        json.dumps(
            {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576}
        )
    )
    monkeypatch.setattr(engine, "on_gpu", lambda: False)
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda cpuinfo=None: False)  # the engine runs fp32
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    # 2 (k, v) * 30 layers * 3 heads * 64 dims * 4 bytes = 46,080 bytes a token: 23,301 tokens in 1 GiB.
    assert engine.cpu_kv_cache_tokens(str(tmp_path)) == 2**30 // 46080
    settings = engine.EngineSettings(model=str(tmp_path))
    assert engine.without_preemption(settings, 512).max_num_seqs == 45
    assert engine.without_preemption(settings, 500).max_num_seqs == 45  # requests hold whole 128-token blocks
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda cpuinfo=None: True)  # bf16: 2 bytes a value
    assert engine.without_preemption(settings, 512).max_num_seqs == 91
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda cpuinfo=None: False)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "4")
    assert engine.without_preemption(settings, 512).max_num_seqs == 182
    # A cache that holds more requests than vLLM's own limit (256) never raises it, nor the tokens per step.
    assert engine.without_preemption(settings, 128).max_num_seqs == 256
    budget = engine.EngineSettings(model=str(tmp_path), extra={"max_num_batched_tokens": 200})
    assert engine.without_preemption(budget, 128).max_num_seqs == 200
    chosen = engine.EngineSettings(model=str(tmp_path), max_num_seqs=7)
    assert engine.without_preemption(chosen, 512) is chosen  # the user's choice stands
    unknown = engine.EngineSettings(model=str(tmp_path / "missing"))
    assert engine.without_preemption(unknown, 512) is unknown
    monkeypatch.setattr(engine, "on_gpu", lambda: True)
    assert engine.without_preemption(settings, 512) is settings


def test_whole_prompt_prefills_only_on_cpu(monkeypatch):
    settings = engine.EngineSettings(model="/m", max_model_len=8192, extra={"block_size": 128})
    monkeypatch.setattr(engine, "on_gpu", lambda: False)
    cpu = engine.whole_prompt_prefills(settings).llm_kwargs()
    assert cpu["enable_chunked_prefill"] is False and cpu["max_num_batched_tokens"] == 8192
    assert cpu["block_size"] == 128
    monkeypatch.setattr(engine, "on_gpu", lambda: True)
    assert engine.whole_prompt_prefills(settings) is settings


# -------------------------------------------------------------------------------- settings the CPU cannot use
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
    # from the first core this process may use, so the test holds under taskset too
    first, missing = min(os.sched_getaffinity(0)), max(os.sched_getaffinity(0)) + 1
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", f"{first}-{missing}")
    with pytest.raises(
        UserError, match=rf"VLLM_CPU_OMP_THREADS_BIND={first}-{missing}: core\(s\) {missing} do not exist"
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
