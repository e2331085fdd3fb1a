"""Where and in what precision training runs (training.device)."""

from __future__ import annotations

import pytest
import torch

from lk_vllm.errors import UserError

pytestmark = pytest.mark.unit


def test_placement_resolves_auto_and_refuses_a_missing_gpu():
    from training.device import resolve_placement

    cpu = resolve_placement("auto", "auto", cuda_available=False)
    assert (
        cpu.device == torch.device("cpu") and cpu.autocast_dtype is None and cpu.target_dtype == torch.float32
    )
    assert "fp32" in cpu.describe()
    gpu = resolve_placement("auto", "auto", tf32=False, cuda_available=True, local_rank=3)
    assert gpu.device == torch.device("cuda", 3) and gpu.autocast_dtype == torch.bfloat16
    assert gpu.target_dtype == torch.bfloat16 and "bfloat16 autocast" in gpu.describe()
    assert (
        resolve_placement("cuda", "fp32", tf32=False, cuda_available=True, local_rank=0).autocast_dtype
        is None
    )
    cpu_bf16 = resolve_placement("cpu", "bf16", cuda_available=True)
    assert cpu_bf16.device.type == "cpu" and cpu_bf16.autocast_dtype == torch.bfloat16
    with pytest.raises(UserError, match=r"^training\.device=cuda: no CUDA device is visible"):
        resolve_placement("cuda", "auto", cuda_available=False)


def test_bf16_on_a_cpu_without_native_bf16_says_it_is_emulated(monkeypatch, capsys):
    import training.device

    for native in (True, False):
        monkeypatch.setattr(training.device, "cpu_has_native_bf16", lambda native=native: native)
        placement = training.device.resolve_placement("cpu", "bf16", cuda_available=False)
        assert placement.autocast_dtype == torch.bfloat16  # runs as asked
        said = capsys.readouterr().err
        assert ("no native bf16 math" in said and "training.precision=fp32" in said) is not native
    training.device.resolve_placement("cpu", "fp32", cuda_available=False)
    assert capsys.readouterr().err == ""
