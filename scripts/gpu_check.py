"""The trainer on a GPU in a few minutes, one PASS/FAIL line per stage (also runs on CPU: ``--device cpu``).

    python scripts/gpu_check.py [--device auto|cuda|cpu] [--steps 300] [--seq-len 1024] [--batch 8]
    scripts/gpu_check.sh  (the same, with a timestamped log)

Nothing is downloaded. The target is the default one (SmolLM2-135M-Instruct) when `lk-vllm models` built it,
else a randomly initialised model of the same shape; the training data are random token sequences run through
that target (online capture), which is all throughput, memory and numerics need.

Stages:
  loss   the fused LK losses (compiled) on the device against the float64 eager reference on the host
  train  EAGLE-3 (K=6) trained for --steps steps through the trainer's own step, with the trainer's
         precision (bf16 autocast on GPU): loss falls, stays finite; tokens/s and peak memory
  ddp    one rank of DistributedDataParallel (NCCL on GPU, gloo on CPU): the step's gradients equal a plain step's
  fsdp2  one rank of FSDP2 (torch.distributed.fsdp.fully_shard): the same check
Exit code 0 only if every stage passed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

RESULTS: list[tuple[str, bool, str]] = []
SMOLLM2_SHAPE = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
}


def report(stage: str, ok: bool, detail: str) -> None:
    RESULTS.append((stage, ok, detail))
    print(f"{'PASS' if ok else 'FAIL'} {stage}: {detail}", flush=True)


@contextlib.contextmanager
def stage(name: str):
    try:
        yield
    except (
        Exception
    ) as error:  # a stage that crashes is a FAIL with its reason, and the next stage still runs
        report(name, False, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"peak {torch.cuda.max_memory_allocated(device) / 1e9:.2f} GB allocated"
    with open("/proc/self/status") as status:
        hwm = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM"))
    return f"peak resident set {hwm / 1e9:.2f} GB"


def check_loss(device: torch.device) -> None:
    from lk_vllm.losses import KINDS, lk_loss, lk_loss_eager

    gen = torch.Generator().manual_seed(0)
    rows, vocab, draft_vocab = 256, 49152, 16384
    target = torch.randn(rows, vocab, generator=gen) * 3
    d2t = torch.randperm(vocab, generator=gen)[:draft_vocab]
    draft = 0.5 * torch.randn(rows, draft_vocab, generator=gen) * 3 + 0.5 * target[:, d2t]
    worst_loss = worst_grad = 0.0
    for kind in KINDS:
        leaf = draft.to(device).detach().requires_grad_(True)
        result = lk_loss(
            leaf, target.to(device), kind=kind, draft_to_target=d2t.to(device), distributed=False
        )
        result.loss.backward()
        ref_leaf = draft.detach().double().requires_grad_(True)
        ref = lk_loss_eager(ref_leaf, target.double(), kind=kind, draft_to_target=d2t)
        ref.loss.backward()
        got, want = float(result.loss.detach()), float(ref.loss.detach())
        loss_error = abs(got - want) / max(abs(want), 1e-12)
        grad_error = float((leaf.grad.double().cpu() - ref_leaf.grad).abs().max() / ref_leaf.grad.abs().max())
        worst_loss, worst_grad = max(worst_loss, loss_error), max(worst_grad, grad_error)
    from lk_vllm.losses.kernels import _Compiled

    compiled = "compiled" if not _Compiled.failed else "EAGER (torch.compile failed)"
    # fp32 sums over 49,152 logits against float64: ~1e-6 on the loss; a gradient entry is compared with the
    # largest one, and the gradient's small entries carry the fp32 rounding of the normalisers.
    ok = worst_loss < 1e-5 and worst_grad < 1e-3
    report(
        "loss",
        ok,
        f"{len(KINDS)} kinds, {compiled} on {device}, vs float64: loss {worst_loss:.1e} (limit 1e-5), "
        f"gradient {worst_grad:.1e} of its largest entry (limit 1e-3)",
    )


def build_target(device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lk_vllm.assets import default_target_dir
    from lk_vllm.target_model import TargetModel

    built = default_target_dir()
    if (built / "config.json").is_file():
        return TargetModel(str(built), dtype=dtype, device=device), "the default target"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE)).to(dtype)
    return TargetModel(str(built), model=model), "a random model of the default target's shape"


def training_step(drafter, model, target, placement, batch: int, seq_len: int, num_steps: int, gen):
    """The trainer's micro-batch step (training.train.micro_batch_loss, LK^lambda) on random tokens, backward."""
    from training.config import LossSection
    from training.train import micro_batch_loss

    ids = torch.randint(0, target.vocab_size, (batch, seq_len), generator=gen).to(placement.device)
    mask = torch.ones_like(ids, dtype=torch.bool)
    loss_mask = mask.clone()
    loss_mask[:, : seq_len // 4] = False
    states = target(ids, mask, aux_layer_ids=drafter.aux_layer_ids_needed())
    out = micro_batch_loss(
        model, drafter, states, loss_mask, LossSection(kind="lambda", num_steps=num_steps), placement
    )
    out["loss"].backward()
    return float(out["loss"].detach())


def check_train(args, placement, target, which: str) -> None:
    from lk_vllm.drafters import create_drafter
    from training.train import _Unroll

    drafter = create_drafter("eagle3", target, draft_to_target=torch.arange(16384)).to(placement.device)
    model = _Unroll(drafter)
    optimizer = torch.optim.AdamW(drafter.trainable_parameters(), lr=1e-3, betas=(0.9, 0.95))
    if placement.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(placement.device)
    losses, started, tokens = [], time.perf_counter(), 0
    for step in range(args.steps):
        optimizer.zero_grad(set_to_none=True)
        # The same four batches over and over: a drafter that learns shows a falling loss within a few steps.
        batch = torch.Generator().manual_seed(100 + step % 4)
        losses.append(training_step(drafter, model, target, placement, args.batch, args.seq_len, 6, batch))
        torch.nn.utils.clip_grad_norm_(drafter.trainable_parameters(), 0.5)
        optimizer.step()
        tokens += args.batch * args.seq_len
        if step == 0:  # first-step costs (compilation) out of the rate
            if placement.device.type == "cuda":
                torch.cuda.synchronize(placement.device)
            started, tokens = time.perf_counter(), 0
    if placement.device.type == "cuda":
        torch.cuda.synchronize(placement.device)
    rate = tokens / max(time.perf_counter() - started, 1e-9) if args.steps > 1 else float("nan")
    window = max(1, min(10, len(losses) // 3))
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    finite = all(torch.isfinite(torch.tensor(losses)))
    fell = last < first
    report(
        "train",
        finite and fell,
        f"{which}, {placement.describe()}, {args.steps} steps of {args.batch} x "
        f"{args.seq_len} tokens, loss {first:.4f} -> {last:.4f}, {rate:.0f} tokens/s, "
        f"{peak_memory(placement.device)}",
    )


def check_parallel(kind: str, placement, target) -> None:
    """One rank of DDP or FSDP2 against a plain step on the same batch: the same gradients."""
    import torch.distributed as dist

    from lk_vllm.drafters import create_drafter
    from training.train import _Unroll, parallelize

    reference = create_drafter("eagle3", target, draft_to_target=torch.arange(16384)).to(placement.device)
    wrapped_drafter = create_drafter("eagle3", target, draft_to_target=torch.arange(16384)).to(
        placement.device
    )
    wrapped_drafter.load_state_dict(reference.state_dict())
    backend = "nccl" if placement.device.type == "cuda" else "gloo"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    if not dist.is_initialized():
        dist.init_process_group(
            backend,
            rank=0,
            world_size=1,
            device_id=placement.device if placement.device.type == "cuda" else None,
        )
    model = parallelize(
        wrapped_drafter, "fsdp" if kind == "fsdp2" else "ddp", placement
    )  # the trainer's wrappers
    training_step(
        reference, _Unroll(reference), target, placement, 2, 128, 3, torch.Generator().manual_seed(5)
    )
    training_step(wrapped_drafter, model, target, placement, 2, 128, 3, torch.Generator().manual_seed(5))
    worst = 0.0
    for a, b in zip(reference.parameters(), wrapped_drafter.parameters(), strict=True):
        if a.grad is None:
            continue
        grad = b.grad.full_tensor() if hasattr(b.grad, "full_tensor") else b.grad
        worst = max(worst, float((a.grad - grad).abs().max() / a.grad.abs().max().clamp(min=1e-12)))
    tolerance = 2e-2 if placement.autocast_dtype is not None else 1e-5
    report(
        kind,
        worst <= tolerance,
        f"1 rank over {backend}, largest gradient difference vs a plain step "
        f"{worst:.2e} of the largest gradient (limit {tolerance:g})",
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lk_vllm.errors import UserError
    from training.device import resolve_placement

    try:
        placement = resolve_placement(args.device)
    except UserError as error:
        print(f"gpu_check: FAIL: {error}", file=sys.stderr)
        return 2
    print(
        f"gpu_check: torch {torch.__version__}, {placement.describe()}"
        + (f" ({torch.cuda.get_device_name(placement.device)})" if placement.device.type == "cuda" else ""),
        flush=True,
    )
    with stage("loss"):
        check_loss(placement.device)
    target, which = build_target(placement.device, placement.target_dtype)  # once: every stage trains on it
    with stage("train"):
        check_train(args, placement, target, which)
    for kind in ("ddp", "fsdp2"):
        with stage(kind):
            check_parallel(kind, placement, target)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    failed = [name for name, ok, _ in RESULTS if not ok]
    print(
        f"gpu_check: {'FAIL (' + ', '.join(failed) + ')' if failed else 'PASS'} "
        f"({len(RESULTS) - len(failed)}/{len(RESULTS)} stages)",
        flush=True,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
