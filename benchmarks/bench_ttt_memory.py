"""Peak memory and time of one EAGLE-3 training step against sequence length: benchmarks/results/ttt-memory.*

    python benchmarks/bench_ttt_memory.py [--lengths 512,1024,2048,4096,8192] [--num-steps 6] [--label after]

One sequence of T tokens (batch 1) of the default target through the trainer's own step (``SharedTargetLogits``,
the drafter's K-step training-time-test unroll, ``multi_step_loss`` with LK^lambda, backward), with synthetic
target states (random hidden states: memory and time do not depend on their values). Each length runs in its
own process, capped at --limit-gb of address space so a length that does not fit fails there instead of taking
the machine down. Peak memory is the peak of live PyTorch tensors during the step (the allocator's own
accounting, read through the profiler: the CPU counterpart of CUDA's max_memory_allocated); the resident-set
high-water mark is kept as a cross-check. Runs with the same --label replace each other; other labels are kept,
so a "before" measured on older code stays on the page beside "after".
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUTPUT = ROOT / "benchmarks" / "results" / "ttt-memory"
DRAFT_VOCAB = 16384  # the default target's recipe (training/recipes/smollm2-eagle3.yaml)


def one_length(length: int, num_steps: int, limit_gb: float) -> dict:
    """Measure one length in this (fresh) process."""
    limit = int(limit_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import torch

    from benchmarks.bench_losses import _measure_allocated_peak
    from lk_vllm.assets import resolve_target
    from lk_vllm.drafters import create_drafter, multi_step_loss
    from lk_vllm.target_model import TargetModel, TargetStates
    from training.train import SharedTargetLogits

    target = TargetModel(resolve_target(None))
    drafter = create_drafter("eagle3", target, draft_to_target=torch.arange(DRAFT_VOCAB))
    hidden = target.config.hidden_size
    gen = torch.Generator().manual_seed(0)

    def states_of(t: int) -> tuple[TargetStates, torch.Tensor]:
        states = TargetStates(
            input_ids=torch.randint(0, target.config.vocab_size, (1, t), generator=gen),
            attention_mask=torch.ones(1, t, dtype=torch.bool),
            position_ids=torch.arange(t)[None],
            final_hidden=torch.randn(1, t, hidden, generator=gen),
            aux_hidden=torch.randn(1, t, 3 * hidden, generator=gen),
            aux_layer_ids=tuple(drafter.aux_layer_ids_needed()),
            lm_head_weight=target.lm_head_weight,
            embed_weight=target.embed_weight,
        )
        loss_mask = torch.ones(1, t, dtype=torch.bool)
        loss_mask[:, : t // 8] = False  # a prompt
        return states, loss_mask

    def step(t: int) -> None:
        states, loss_mask = states_of(t)
        shared = SharedTargetLogits(states, loss_mask)
        out = multi_step_loss(
            drafter.training_steps(shared, num_steps),
            shared,
            kind="lambda",
            eta=3.0,
            gamma=0.8,
            draft_to_target=drafter.draft_to_target,
            loss_mask=loss_mask,
        )
        out["loss"].backward()
        drafter.zero_grad(set_to_none=True)

    step(128)  # first-call costs (the loss's torch.compile) outside the measurement
    started = time.perf_counter()
    step(length)
    seconds = time.perf_counter() - started
    peak = _measure_allocated_peak(lambda: step(length))
    with open("/proc/self/status") as status:
        hwm = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM"))
    return {
        "length": length,
        "peak_bytes": peak,
        "rss_hwm_bytes": hwm,
        "step_seconds": seconds,
        "threads": torch.get_num_threads(),
        "estimated_step_bytes": estimated_step_bytes(length, num_steps),
    }


def estimated_step_bytes(length: int, num_steps: int) -> int | None:
    """What ``lk-vllm train --dry-run`` predicts for this step, weights and optimizer state left out (the step
    measured here holds neither); None on code that predates the estimate."""
    if not (ROOT / "training" / "memory.py").is_file():
        return None
    from lk_vllm.assets import resolve_target
    from training.config import load_config
    from training.memory import estimate_memory

    config = load_config(
        overrides={
            "model.architecture": "eagle3",
            "model.draft_vocab_size": DRAFT_VOCAB,
            "data.max_length": length,
            "training.batch_size": 1,
            "loss.num_steps": num_steps,
            "training.device": "cpu",
        }
    )[0]
    parts = estimate_memory(config, resolve_target(None), "cpu").parts
    return sum(
        size for name, size in parts.items() if not name.startswith(("drafter weights", "target weights"))
    )


def write_page(document: dict) -> None:
    from lk_vllm.atomic import write_atomic

    labels = list(document["runs"])
    lengths = sorted({r["length"] for run in document["runs"].values() for r in run["rows"]})
    lines = [
        f"# EAGLE-3 training step: memory and time against sequence length ({document['hardware']})",
        "",
        "One training step of the default target's EAGLE-3 drafter (batch 1, K = "
        f"{document['num_steps']} unrolled steps, draft vocabulary {DRAFT_VOCAB}, LK^lambda), the trainer's own "
        "code on synthetic target states. Peak = live PyTorch tensors at their peak (the allocator's "
        "accounting); RSS = the process's resident-set high-water mark (model and libraries included).",
        "",
    ]
    for label in labels:
        run = document["runs"][label]
        lines.append(
            f"- **{label}**: `{run['command']}` ({run['created']}, commit {run['commit']}, "
            f"{run['threads']} threads)"
        )
    lines += [
        "",
        "| T | "
        + " | ".join(f"{label} peak GB | {label} RSS GB | {label} step s" for label in labels)
        + " | --dry-run estimate GB |",
        "|---|" + "---|---|---|" * len(labels) + "---|",
    ]
    for length in lengths:
        cells = []
        for label in labels:
            row = next((r for r in document["runs"][label]["rows"] if r["length"] == length), None)
            if row is None:
                cells += ["-", "-", "-"]
            elif "error" in row:
                cells += [row["error"], "", ""]
            else:
                cells += [
                    f"{row['peak_bytes'] / 1e9:.2f}",
                    f"{row['rss_hwm_bytes'] / 1e9:.2f}",
                    f"{row['step_seconds']:.1f}",
                ]
        estimates = [
            r.get("estimated_step_bytes")
            for run in document["runs"].values()
            for r in run["rows"]
            if r["length"] == length and r.get("estimated_step_bytes")
        ]
        cells.append(f"{estimates[-1] / 1e9:.2f}" if estimates else "-")
        lines.append(f"| {length} | " + " | ".join(cells) + " |")
    lines.append("")
    for label in labels:
        rows = {r["length"]: r for r in document["runs"][label]["rows"] if "error" not in r}
        if 1024 in rows and 8192 in rows:
            lines.append(
                f"- {label}: peak(8192) / peak(1024) = "
                f"{rows[8192]['peak_bytes'] / rows[1024]['peak_bytes']:.2f} (target <= 10)"
            )
    lines += ["", document.get("commentary", ""), ""]
    write_atomic(OUTPUT.with_suffix(".md"), "\n".join(lines))
    write_atomic(OUTPUT.with_suffix(".json"), json.dumps(document, indent=1) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="512,1024,2048,4096,8192")
    parser.add_argument("--num-steps", type=int, default=6)
    parser.add_argument("--label", default="after", help="the name of this run's columns (default 'after')")
    parser.add_argument(
        "--limit-gb", type=float, default=20.0, help="address-space cap per length (default 20)"
    )
    parser.add_argument("--render", action="store_true", help="rewrite the .md from the .json")
    parser.add_argument("--commentary", default=None, metavar="FILE", help="markdown to put under the table")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_length(args.one, args.num_steps, args.limit_gb)))
        return 0
    path = OUTPUT.with_suffix(".json")
    document = json.loads(path.read_text()) if path.is_file() else {"runs": {}}
    if args.commentary:
        document["commentary"] = Path(args.commentary).read_text().strip()
    if args.render:
        write_page(document)
        return 0
    from lk_vllm.plugin.server.speedup import hardware_id

    rows = []
    for length in [int(x) for x in args.lengths.split(",")]:
        print(f"[ttt-memory] T={length}", file=sys.stderr, flush=True)
        done = subprocess.run(
            [
                sys.executable,
                __file__,
                "--one",
                str(length),
                "--num-steps",
                str(args.num_steps),
                "--limit-gb",
                str(args.limit_gb),
            ],
            capture_output=True,
            text=True,
        )
        if done.returncode == 0:
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        else:
            text = done.stderr.lower()
            oom = (
                any(m in text for m in ("memoryerror", "out of memory", "can't allocate"))
                or done.returncode < 0
            )
            rows.append(
                {
                    "length": length,
                    "error": f"does not fit in {args.limit_gb:g} GB"
                    if oom
                    else f"failed (exit {done.returncode})",
                }
            )
            print(done.stderr[-2000:], file=sys.stderr)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    command = "python benchmarks/bench_ttt_memory.py " + " ".join(sys.argv[1:])
    document.update(hardware=hardware_id(), num_steps=args.num_steps)
    document["runs"][args.label] = {
        "command": command.strip(),
        "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": commit.stdout.strip(),
        "threads": next((r["threads"] for r in rows if "threads" in r), None),
        "rows": rows,
    }
    write_page(document)
    print(f"[ttt-memory] wrote {OUTPUT}.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
