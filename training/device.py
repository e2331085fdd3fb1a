"""Where and in what precision the trainer computes: ``training.device`` / ``training.precision`` / ``training.tf32``.

``auto`` means CUDA when a GPU is visible, else the CPU. On a GPU the drafter keeps fp32 master weights and its
forward runs under bf16 autocast (``precision: auto`` or ``bf16``), TF32 matmuls are allowed for what stays
fp32, and the frozen target is loaded in bf16 (the dtype vLLM serves it in). On the CPU ``auto`` is fp32, as
the parity tests against vLLM assume; ``bf16`` runs the GPU path there (1.85x faster per step on a CPU with
native bf16 math, benchmarks/results/training-step-bf16.md; without it bf16 is emulated, and the run says so).
Under torchrun each rank takes the GPU of its ``LOCAL_RANK``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import torch

from lk_vllm.engine import cpu_has_native_bf16
from lk_vllm.errors import UserError
from lk_vllm.log import log

PRECISIONS = {"bf16": torch.bfloat16, "fp32": None}


@dataclasses.dataclass(frozen=True)
class Placement:
    device: torch.device
    autocast_dtype: torch.dtype | None  # None: no autocast, fp32 throughout

    @property
    def target_dtype(self) -> torch.dtype:
        return torch.float32 if self.autocast_dtype is None else self.autocast_dtype

    def autocast(self):
        """The context the drafter's forward (and the loss on its logits) runs in."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def describe(self) -> str:
        precision = (
            "fp32"
            if self.autocast_dtype is None
            else f"{str(self.autocast_dtype).removeprefix('torch.')} autocast"
        )
        return f"device {self.device}, {precision}"


def resolve_placement(
    device: str = "auto",
    precision: str = "auto",
    tf32: bool = True,
    cuda_available: bool | None = None,
    local_rank: int | None = None,
) -> Placement:
    """The placement for these config values (raises UserError naming the field when the machine cannot)."""
    cuda_available = torch.cuda.is_available() if cuda_available is None else cuda_available
    if device == "auto":
        device = "cuda" if cuda_available else "cpu"
    if device == "cuda" and not cuda_available:
        raise UserError(
            "training.device=cuda: no CUDA device is visible here (torch.cuda.is_available() is "
            "False); use training.device=cpu, or auto to pick whatever is there"
        )
    if device not in ("cpu", "cuda"):
        raise UserError(f"training.device: expected auto, cpu or cuda, got {device!r}")
    if precision == "auto":
        precision = "bf16" if device == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise UserError(f"training.precision: expected auto, bf16 or fp32, got {precision!r}")
    if device == "cuda":
        rank = int(os.environ.get("LOCAL_RANK", "0")) if local_rank is None else local_rank
        torch_device = torch.device("cuda", rank)
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    else:
        torch_device = torch.device("cpu")
        if precision == "bf16" and not cpu_has_native_bf16():
            log(
                "training.precision=bf16: this CPU has no native bf16 math (no avx512_bf16 or amx_bf16), so "
                "bf16 is emulated and slower than fp32 here; training.precision=fp32 is the faster choice"
            )
    return Placement(device=torch_device, autocast_dtype=PRECISIONS[precision])
