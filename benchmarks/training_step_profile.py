"""Where one offline EAGLE-3 training step's time goes on this machine, phase by phase.

    python benchmarks/training_step_profile.py [--recipe smollm2-eagle3] [--batch-size 8] [--seq-len 384] \
        [--response-fraction 0.6] [--draft-vocab 16384 ...] [--repeats 5] [--threads N] \
        [--precision auto|fp32|bf16] [--out benchmarks/results/training-step-profile]

The step is the trainer's own computation (``training.train.SharedTargetLogits`` and
``lk_vllm.drafters.multi_step_loss`` over the recipe's drafter and loss), cut into phases by detaching at the
boundaries so that each backward can be timed on its own: the target-logit table (what the loss reads of the
target, rebuilt from cached hidden states), the drafter's unrolled layer (fc, decoder layer, K steps), the draft
head (K matmuls to the draft vocabulary), the loss, and AdamW. The unsplit step (forward, backward, clip,
AdamW) is timed in the same repetitions, so the phases can be checked against it. Inputs are synthetic states
of the recipe's target shapes (timing does not depend on the values) with what the offline cache holds (hidden
states and, from cache format v2, the full-vocabulary logsumexp per token): ``--seq-len`` tokens per row, the
last ``--response-fraction`` of each row trained on (as a chat sample's response). Each ``--draft-vocab`` size
is a separate drafter; medians over ``--repeats`` after one warm-up. ``--precision`` is the trainer's
``training.precision`` on the CPU (``bf16``: the target in bf16 and the drafter under bf16 autocast over fp32
master weights, as on a GPU; worth it only on a CPU with native bf16 math); it may be repeated to compare. The script runs unchanged on a checkout
of an older commit (``--revision-label`` names it in the report), which is how "before" is measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PHASES = (
    "target_table",
    "layer_forward",
    "head_forward",
    "loss_forward",
    "loss_backward",
    "head_backward",
    "layer_backward",
    "optimizer",
)


def synthetic_states(
    target, batch_size: int, seq_len: int, response_fraction: float, aux_layer_ids, seed: int
):
    import torch

    from lk_vllm.target_model import TargetStates, position_ids_from_mask

    generator = torch.Generator().manual_seed(seed)
    hidden = target.hidden_size
    shape = (batch_size, seq_len)
    mask = torch.ones(shape, dtype=torch.bool)
    loss_mask = torch.zeros(shape, dtype=torch.bool)
    loss_mask[:, int(seq_len * (1 - response_fraction)) :] = True
    aux = torch.randn(*shape, hidden * len(aux_layer_ids), generator=generator)
    final = torch.randn(*shape, hidden, generator=generator)
    extra = {}
    if "final_logsumexp" in {f.name for f in dataclasses.fields(TargetStates)}:  # absent before the v2 cache
        from training.capture import logsumexp_of_logits

        extra["final_logsumexp"] = logsumexp_of_logits(final.flatten(0, 1), target.lm_head_weight).view(shape)
    states = TargetStates(
        input_ids=torch.randint(0, target.vocab_size, shape, generator=generator),
        attention_mask=mask,
        position_ids=position_ids_from_mask(mask),
        final_hidden=final,
        aux_hidden=aux,
        aux_layer_ids=tuple(aux_layer_ids),
        lm_head_weight=target.lm_head_weight,
        embed_weight=target.embed_weight,
        **extra,
    )
    return states, loss_mask


def timed(times: dict, name: str, function):
    start = time.perf_counter()
    out = function()
    times[name] = times.get(name, 0.0) + time.perf_counter() - start
    return out


def phased_step(drafter, optimizer, states, loss_mask, loss) -> dict:
    """The trainer's step, detached at phase boundaries; returns seconds per phase."""
    import torch

    from lk_vllm.drafters import StepOutput, multi_step_loss
    from training.train import SharedTargetLogits

    times: dict[str, float] = {}
    import inspect

    # The drafter's vocabulary selects the draft columns (code before the v2 cache took full rows only).
    columns = "draft_to_target" in inspect.signature(SharedTargetLogits).parameters
    args = (states, loss_mask, drafter.draft_to_target) if columns else (states, loss_mask)
    shared = timed(times, "target_table", lambda: SharedTargetLogits(*args))
    steps = timed(times, "layer_forward", lambda: drafter.training_steps(shared, loss.num_steps))
    positions = [step.valid_positions(loss_mask) for step in steps]
    features = [step.hidden[batch, anchor] for step, (batch, anchor) in zip(steps, positions, strict=True)]
    detached = [f.detach().requires_grad_() for f in features]
    logits = timed(
        times, "head_forward", lambda: [step.head(f) for step, f in zip(steps, detached, strict=True)]
    )
    leaves = [x.detach().requires_grad_() for x in logits]

    # multi_step_loss reads each step's logits through its head: hand it the detached ones.
    fixed = [
        StepOutput(
            hidden=step.hidden,
            head=lambda _features, value=value: value,
            target_shift=step.target_shift,
            mask=step.mask,
        )
        for step, value in zip(steps, leaves, strict=True)
    ]
    out = timed(
        times,
        "loss_forward",
        lambda: multi_step_loss(
            fixed,
            shared,
            kind=loss.kind,
            eta=loss.eta,
            draft_to_target=drafter.draft_to_target,
            loss_mask=loss_mask,
            gamma=loss.gamma,
            chunk_size=loss.chunk_size,
        ),
    )
    timed(times, "loss_backward", lambda: out["loss"].backward())
    timed(times, "head_backward", lambda: torch.autograd.backward(logits, [x.grad for x in leaves]))
    timed(times, "layer_backward", lambda: torch.autograd.backward(features, [x.grad for x in detached]))

    def update():
        torch.nn.utils.clip_grad_norm_(drafter.trainable_parameters(), 0.5)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    timed(times, "optimizer", update)
    return times


def whole_step(drafter, optimizer, states, loss_mask, loss, placement) -> float:
    import torch

    from training.train import _Unroll, micro_batch_loss

    start = time.perf_counter()
    micro_batch_loss(_Unroll(drafter), drafter, states, loss_mask, loss, placement)["loss"].backward()
    torch.nn.utils.clip_grad_norm_(drafter.trainable_parameters(), 0.5)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def profile(args, draft_vocab: int, target, config, placement) -> dict:
    import torch

    from lk_vllm.drafters import create_drafter
    from training.train import drafter_options

    options = drafter_options(config, target)
    # The draft ids are the first draft_vocab target ids: which ids does not change the cost.
    options["draft_to_target"] = torch.arange(draft_vocab) if draft_vocab < target.vocab_size else None
    torch.manual_seed(0)
    drafter = create_drafter(config.model.architecture, target, **options)
    optimizer = torch.optim.AdamW(drafter.trainable_parameters(), lr=1e-4, betas=(0.9, 0.95))
    states, loss_mask = synthetic_states(
        target, args.batch_size, args.seq_len, args.response_fraction, drafter.aux_layer_ids_needed(), seed=0
    )
    phases = {name: [] for name in PHASES}
    wholes = []
    for repeat in range(args.repeats + 1):
        with placement.autocast():
            times = phased_step(drafter, optimizer, states, loss_mask, config.loss)
        whole = whole_step(drafter, optimizer, states, loss_mask, config.loss, placement)
        if repeat == 0:
            continue  # warm-up (the loss kernel compiles on its first call)
        for name in PHASES:
            phases[name].append(times[name])
        wholes.append(whole)
    median = {name: statistics.median(values) for name, values in phases.items()}
    whole_median = statistics.median(wholes)
    tokens = int(states.attention_mask.sum())
    return {
        "precision": placement.describe().split(", ", 1)[1],
        "draft_vocab": draft_vocab,
        "phases_s": {k: round(v, 4) for k, v in median.items()},
        "phase_sum_s": round(sum(median.values()), 4),
        "whole_step_s": round(whole_median, 4),
        "whole_step_spread_s": [round(min(wholes), 4), round(max(wholes), 4)],
        "tokens": tokens,
        "trained_positions_per_step": int(loss_mask.sum()),
        "tokens_per_s": round(tokens / whole_median, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="smollm2-eagle3")
    parser.add_argument("--batch-size", type=int, default=None, help="rows per step (default: the recipe's)")
    parser.add_argument("--seq-len", type=int, default=384)
    parser.add_argument("--response-fraction", type=float, default=0.6)
    parser.add_argument(
        "--draft-vocab",
        type=int,
        action="append",
        default=None,
        help="draft vocabulary size (repeatable; default: the recipe's)",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--precision",
        action="append",
        choices=("auto", "fp32", "bf16"),
        default=None,
        help="training.precision on the CPU (repeatable; default: auto, i.e. fp32)",
    )
    parser.add_argument(
        "--baseline",
        default=None,
        help="a report (json) of an earlier run, e.g. on an older commit, shown first on the page",
    )
    parser.add_argument(
        "--revision-label", default=None, help="what code ran (default: git describe of this tree)"
    )
    parser.add_argument("--out", default="benchmarks/results/training-step-profile")
    args = parser.parse_args()
    if args.revision_label is None:
        import subprocess

        args.revision_label = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                cwd=Path(__file__).resolve().parents[1],
            ).stdout.strip()
            or "unknown"
        )

    import torch

    from lk_vllm.assets import resolve_target
    from lk_vllm.target_model import TargetModel
    from training.config import load_config
    from training.device import resolve_placement

    if args.threads:
        torch.set_num_threads(args.threads)
    config, _ = load_config(recipe=args.recipe, overrides={})
    args.batch_size = args.batch_size or config.training.batch_size
    precisions = args.precision or ["auto"]
    load_before = os.getloadavg()
    rows = []
    for precision in precisions:
        placement = resolve_placement("cpu", precision, True)
        target = TargetModel(resolve_target(config.model.target), dtype=placement.target_dtype)
        sizes = args.draft_vocab or [config.model.draft_vocab_size or target.vocab_size]
        for size in sizes:
            print(f"[profile] {placement.describe()}, draft vocabulary {size}", file=sys.stderr, flush=True)
            rows.append(profile(args, size, target, config, placement))
    command = (
        f"python benchmarks/training_step_profile.py --recipe {args.recipe} --batch-size {args.batch_size} "
        f"--seq-len {args.seq_len} --response-fraction {args.response_fraction} "
        + " ".join(f"--draft-vocab {s}" for s in sizes)
        + f" --repeats {args.repeats}"
        + (f" --threads {args.threads}" if args.threads else "")
        + "".join(f" --precision {p}" for p in args.precision or [])
        + f" --out {args.out}"
    )
    for row in rows:
        row["revision"] = args.revision_label
    if args.baseline:
        baseline = json.loads(Path(args.baseline).read_text())
        rows = [dict(row, revision=baseline["revision"]) for row in baseline["rows"]] + rows
        command += f" --baseline {args.baseline}"
    report = {
        "command": command,
        "revision": args.revision_label,
        "recipe": args.recipe,
        "architecture": config.model.architecture,
        "num_steps": config.loss.num_steps,
        "loss": config.loss.kind,
        "target_vocab": target.vocab_size,
        "hidden_size": target.hidden_size,
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        },
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# One EAGLE-3 training step, phase by phase (this CPU)",
        "",
        f"Command: `{report['command']}` (code: {report['revision']})  ",
        f"Recipe `{report['recipe']}`: {report['architecture']}, K={report['num_steps']} unrolled steps, loss "
        f"{report['loss']}, target vocabulary {report['target_vocab']}, hidden {report['hidden_size']}; "
        f"{m['cpus']} CPUs, {m['torch_threads']} torch threads, torch {m['torch']}; load average before "
        f"{m['load_average_before']}, after {m['load_average_after']}. Medians over the repetitions.",
        "",
        "| code | precision | draft vocab | " + " | ".join(PHASES) + " | sum | whole step | tokens/s |",
        "|---" * (len(PHASES) + 6) + "|",
    ]
    for row in report["rows"]:
        p = row["phases_s"]
        lines.append(
            f"| {row['revision']} | {row.get('precision', 'fp32')} | {row['draft_vocab']} | "
            + " | ".join(f"{p[name]:.3f}" for name in PHASES)
            + f" | {row['phase_sum_s']:.3f} | {row['whole_step_s']:.3f} | {row['tokens_per_s']} |"
        )
    lines += ["", "Seconds per phase; the share of the whole step:", ""]
    for row in report["rows"]:
        p = row["phases_s"]
        shares = ", ".join(f"{name} {100 * p[name] / row['phase_sum_s']:.0f}%" for name in PHASES)
        lines.append(
            f"- {row['revision']}, {row.get('precision', 'fp32')}, draft vocab {row['draft_vocab']} ({row['tokens']} tokens, "
            f"{row['trained_positions_per_step']} trained positions): {shares}"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
