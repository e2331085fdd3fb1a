"""Random batches and a loss-and-gradient call for the loss tests (lk_vllm.losses)."""

import torch

F64 = torch.float64


def make_batch(n, vocab, vocab_draft, *, seed, scale=2.0, dtype=F64, masked=0.3):
    """Random logits, a random draft vocabulary (None when vocab_draft == vocab) and a random mask."""
    gen = torch.Generator().manual_seed(seed)
    d2t = torch.randperm(vocab, generator=gen)[:vocab_draft] if vocab_draft < vocab else None
    target = (torch.randn(n, vocab, generator=gen, dtype=F64) * scale).to(dtype)
    draft = (torch.randn(n, vocab_draft, generator=gen, dtype=F64) * scale).to(dtype)
    # Make the draft partly agree with the target so alpha is neither ~0 nor ~1.
    aligned = target[:, d2t] if d2t is not None else target
    draft = (0.5 * draft + 0.5 * aligned).detach()
    mask = torch.rand(n, generator=gen) >= masked if masked else None
    return draft, target, d2t, mask


def loss_and_grad(fn, draft, target, **kwargs):
    leaf = draft.detach().clone().requires_grad_(True)
    result = fn(leaf, target, **kwargs)
    (grad,) = torch.autograd.grad(result.loss, leaf)
    return result, grad
