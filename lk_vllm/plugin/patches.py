"""Fixes lk-vllm applies to vLLM 0.32.0, each idempotent, each tested (tests/test_plugin.py).

1. **CPU ``expand_kernel`` override ignores non-int64 tensors.** On CPU builds without Triton, vLLM replaces the
   rejection sampler's Triton ``expand_kernel`` with ``vllm.utils.cpu_triton_utils._expand_kernel_impl``, which
   converts ``output`` and ``input_val`` to int64 *copies* before calling the C++ kernel. For the float32
   temperature and top-p tensors of ``rejection_sampler.expand_batch_to_tokens`` the results land in the
   temporary copy and the real output stays uninitialised (``new_empty``): at temperature > 0 the target logits
   are divided by garbage and speculative sampling emits nonsense (seen with ngram and EAGLE-3 on this CPU:
   coherent at T=0, word salad at T=0.8). The replacement below is a plain torch ``repeat_interleave`` that keeps
   the dtype. It is installed by the general plugin, which vLLM runs in each worker *before* the CPU platform
   registers its kernel overrides (``WorkerWrapperBase.init_worker``), so the platform picks it up.
"""

from __future__ import annotations

_MARK = "_lk_vllm_patched"


def expand_kernel_any_dtype(output, input_val, cu_num_tokens, replace_from, replace_to, MAX_NUM_TOKENS=None):
    """``output[t] = input_val[request of t]`` (``replace_from`` -> ``replace_to``), any dtype, in place."""
    import torch

    counts = torch.diff(cu_num_tokens.to(torch.int64), prepend=cu_num_tokens.new_zeros(1, dtype=torch.int64))
    values = torch.where(input_val == replace_from, torch.full_like(input_val, replace_to), input_val)
    expanded = torch.repeat_interleave(values, counts, output_size=int(cu_num_tokens[-1]) if len(counts) else 0)
    output[: expanded.numel()].copy_(expanded.to(output.dtype))


setattr(expand_kernel_any_dtype, _MARK, True)


def patch_cpu_expand_kernel() -> bool:
    """Install the fixed expand kernel on CPU builds; returns True when it is (or already was) in place."""
    try:
        from vllm.utils import cpu_triton_utils
    except ImportError:  # a GPU build: nothing to fix
        return False
    if getattr(cpu_triton_utils._expand_kernel_impl, _MARK, False):
        return True
    cpu_triton_utils._expand_kernel_impl = expand_kernel_any_dtype
    return True


def apply_patches() -> None:
    patch_cpu_expand_kernel()
