"""The loss's chunk kernels (lk_vllm.losses.kernels): compiled and eager give the same gradient, and only a
compile error turns compilation off."""

import pytest
import torch
from loss_helpers import loss_and_grad, make_batch

from lk_vllm.losses import KINDS, lk_loss

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("vocab_draft", [20, 9])
def test_compiled_and_eager_backward_agree(kind, vocab_draft, monkeypatch):
    # The chunk kernels run torch.compile'd by default and fall back to the same functions run eagerly; both give the
    # same gradient.
    from lk_vllm.losses import kernels

    draft, target, d2t, mask = make_batch(13, 20, vocab_draft, seed=7, dtype=torch.float32)
    kwargs = dict(kind=kind, draft_to_target=d2t, mask=mask, chunk_size=5)
    grads = {}
    for setting in ("1", "0"):
        monkeypatch.setenv("LK_VLLM_COMPILE_LOSS", setting)
        _, grads[setting] = loss_and_grad(lk_loss, draft, target, **kwargs)
    if kernels._Compiled.failed or kernels._gradient_kernel.compiled is None:
        pytest.skip("torch.compile is not available here; only the eager backward ran")
    torch.testing.assert_close(grads["1"], grads["0"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("runtime", [True, False], ids=["runtime-error", "compile-error"])
def test_only_compile_errors_switch_compilation_off(monkeypatch, runtime):
    """An out-of-memory while the compiled kernel runs reaches the caller and leaves compilation on; a
    compile error falls back to eager PyTorch for the process, with a warning."""
    from torch._dynamo import exc as dynamo_exc

    from lk_vllm.losses import kernels

    def broken(*args):
        if runtime:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        raise dynamo_exc.Unsupported("no lowering for this op")

    kernel = kernels._Compiled(lambda x: x + 1)
    kernel.compiled = broken
    monkeypatch.setattr(kernels._Compiled, "failed", False)
    monkeypatch.setenv("LK_VLLM_COMPILE_LOSS", "1")
    if runtime:
        with pytest.raises(torch.OutOfMemoryError):
            kernel(torch.zeros(2))
        assert not kernels._Compiled.failed
    else:
        with pytest.warns(UserWarning, match="torch.compile failed.*Unsupported"):
            assert kernel(torch.zeros(2)).tolist() == [1.0, 1.0]
        assert kernels._Compiled.failed
