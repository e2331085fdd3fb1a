"""Learning curves of KL vs LK: benchmarks/results/learning-curve.{json,md,png} from examples/kl_vs_lk_seeds.sh's
runs trained for longer.

    SEEDS=0 STEPS=400 EVAL_EVERY=40 PAGE=learning-curve examples/kl_vs_lk_seeds.sh train
    python benchmarks/learning_curve.py --runs runs/learning-curve --out benchmarks/results/learning-curve

Held-out expected acceptance length (T=1, and T=0 from the greedy estimate) against training tokens per loss
(mean over the seeds present), the gain per 100k tokens of every segment between two evaluations, the LK/KL
ratio at every evaluation, and where each curve bends: the first evaluation after which every later segment
gains less than a quarter of the curve's average rate (its gain from the first evaluation to the last over the
tokens between them). A curve still rising at a quarter of its average rate at the end has no bend in the run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kl_vs_lk_seeds import ARCHITECTURE_NAMES, LK_KINDS, LOSS_COLOURS, mean_curves, read_run  # noqa: E402

BEND_FRACTION = 0.25
KEYS = (("al_t0", "T=0"), ("al_t1", "T=1"))


def rates(points: list[dict], key: str) -> list[float | None]:
    """Gain of ``key`` per 100k training tokens over the segment ending at each point (None for the first)."""
    out: list[float | None] = [None]
    for before, after in zip(points, points[1:], strict=False):
        tokens = after["training_tokens"] - before["training_tokens"]
        out.append((after[key] - before[key]) / tokens * 1e5 if tokens > 0 else None)
    return out


def average_rate(points: list[dict], key: str) -> float | None:
    """Gain of ``key`` per 100k training tokens from the first point to the last (None without a span)."""
    first, last = points[0], points[-1]
    tokens = last["training_tokens"] - first["training_tokens"]
    return (last[key] - first[key]) / tokens * 1e5 if tokens > 0 else None


def bend(points: list[dict], key: str, fraction: float = BEND_FRACTION) -> dict | None:
    """The first point after which every segment gains less than ``fraction`` of the average rate; None when
    the curve has fewer than three points or is still rising that fast in its last segment."""
    average = average_rate(points, key)
    if len(points) < 3 or average is None:
        return None
    segment_rates = rates(points, key)
    for i in range(len(points) - 1):
        if all(r is not None and r < fraction * average for r in segment_rates[i + 1 :]):
            return points[i]
    return None


def ratios(curves: list[dict]) -> list[dict]:
    """LK/KL of both estimates at every step that KL and that LK kind both reached."""
    kl = {p["step"]: p for p in curves if p["loss"] == "kl"}
    out = []
    for p in curves:
        if p["loss"] in LK_KINDS and p["step"] in kl:
            base = kl[p["step"]]
            out.append(
                {
                    "lk": p["loss"],
                    "step": p["step"],
                    "training_tokens": p["training_tokens"],
                    **{key: p[key] / base[key] for key, _ in KEYS},
                }
            )
    return out


def read_epochs_per_step(run_dir: Path) -> float | None:
    """Batch size over training samples, from the run's exported record (None before its first export)."""
    for name in ("final", "best"):
        record = run_dir / name / "lk_training.json"
        if record.is_file():
            training = json.loads(record.read_text())["training"]
            return training["batch_size"] / training["data"]["train_samples"]
    return None


def summarise(runs: list[dict], epochs_per_step: float | None = None) -> dict:
    """Per loss: the mean curve with segment rates (and epochs when known), average rates and bends."""
    curves = mean_curves(runs)
    losses = [loss for loss in ("kl", *LK_KINDS) if any(p["loss"] == loss for p in curves)]
    per_loss = {}
    for loss in losses:
        points = [p for p in curves if p["loss"] == loss]
        rate = {key: rates(points, key) for key, _ in KEYS}
        per_loss[loss] = {
            "points": [
                {
                    **p,
                    "epochs": p["step"] * epochs_per_step if epochs_per_step else None,
                    **{f"rate_{key}": rate[key][i] for key, _ in KEYS},
                }
                for i, p in enumerate(points)
            ],
            "average_rate": {key: average_rate(points, key) for key, _ in KEYS},
            "bend": {key: bend(points, key) for key, _ in KEYS},
        }
    return {"curves": per_loss, "ratios": ratios(curves)}


def fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def write_page(document: dict, out: Path) -> None:
    from lk_vllm.atomic import write_atomic

    architecture = ARCHITECTURE_NAMES.get(document["architecture"], document["architecture"])
    lines = [
        f"# Learning curves, KL vs LK: {architecture} on the default target",
        "",
        f"`{document['command']}`",
        "",
        f"- runs: {len(document['runs'])} ({', '.join(r['run'] for r in document['runs'])})",
        "- held-out expected acceptance length from the trainer's evaluations (T=1 and the greedy T=0 estimate);",
        "  rate = gain per 100k training tokens over the segment ending at that step;",
        f"  bend = first evaluation after which every segment gains < {BEND_FRACTION:g} x the curve's average rate.",
        "",
        f"![learning curves]({out.with_suffix('.png').name})",
        "",
        "## Where the curves bend",
        "",
        "| loss | T | first -> last | average rate | bend at (tokens) | acceptance length there |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for loss, curve in document["curves"].items():
        first, last = curve["points"][0], curve["points"][-1]
        for key, label in KEYS:
            b = curve["bend"][key]
            where = f"step {b['step']} ({b['training_tokens']:,})" if b else "none within the run"
            lines.append(
                f"| {loss} | {label} | {first[key]:.3f} -> {last[key]:.3f} | {fmt(curve['average_rate'][key], '+.4f')} | {where} | "
                f"{fmt(b[key] if b else None)} |"
            )
    lines += [
        "",
        "## Curves",
        "",
        "| loss | step | training tokens | epochs | T=0 | rate T=0 | T=1 | rate T=1 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for loss, curve in document["curves"].items():
        for p in curve["points"]:
            lines.append(
                f"| {loss} | {p['step']} | {p['training_tokens']:,} | {fmt(p['epochs'], '.2f')} | {p['al_t0']:.3f} | "
                f"{fmt(p['rate_al_t0'], '+.4f')} | {p['al_t1']:.3f} | {fmt(p['rate_al_t1'], '+.4f')} |"
            )
    if document["ratios"]:
        lines += ["", "## LK / KL along the curves", "", "| LK | step | training tokens | T=0 | T=1 |"]
        lines.append("| --- | --- | --- | --- | --- |")
        for r in document["ratios"]:
            lines.append(
                f"| {r['lk']} | {r['step']} | {r['training_tokens']:,} | {r['al_t0']:.3f} | {r['al_t1']:.3f} |"
            )
    lines += ["", document.get("commentary", ""), ""]
    write_atomic(out.with_suffix(".md"), "\n".join(lines))
    write_atomic(out.with_suffix(".json"), json.dumps(document, indent=1) + "\n")


def plot(document: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for ax, (key, label) in zip(axes, KEYS, strict=False):
        for loss, curve in document["curves"].items():
            points = curve["points"]
            ax.plot(
                [p["training_tokens"] / 1e3 for p in points],
                [p[key] for p in points],
                color=LOSS_COLOURS.get(loss),
                marker="o",
                markersize=3,
                label=loss,
            )
            b = curve["bend"][key]
            if b:
                ax.axvline(b["training_tokens"] / 1e3, color=LOSS_COLOURS.get(loss), linestyle=":")
        ax.set_xlabel("training tokens (thousands)")
        ax.set_ylabel("held-out expected acceptance length")
        ax.set_title(f"Learning curves, {label} (dotted: bend)")
        ax.legend(fontsize=8)
    ax = axes[2]
    for kind in LK_KINDS:
        points = [r for r in document["ratios"] if r["lk"] == kind]
        for key, label in KEYS:
            ax.plot(
                [r["training_tokens"] / 1e3 for r in points],
                [r[key] for r in points],
                color=LOSS_COLOURS[kind],
                linestyle="-" if key == "al_t1" else "--",
                label=f"{kind} {label}",
            )
    ax.axhline(1.0, color="grey", linestyle=":")
    ax.set_xlabel("training tokens (thousands)")
    ax.set_ylabel("held-out acceptance length LK / KL")
    ax.set_title("LK / KL along the curves")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", required=True, help="the directory of examples/kl_vs_lk_seeds.sh's runs")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "learning-curve"))
    parser.add_argument("--commentary", default=None, metavar="FILE", help="markdown to put under the tables")
    args = parser.parse_args()
    runs_dir = Path(args.runs)
    run_dirs = (
        sorted(p for p in runs_dir.iterdir() if (p / "config.json").is_file()) if runs_dir.is_dir() else []
    )
    runs = [r for r in map(read_run, run_dirs) if r["curve"]]
    epochs = {e for e in map(read_epochs_per_step, run_dirs) if e is not None}
    if not runs:
        parser.error(f"--runs {args.runs}: no run directory with a held-out evaluation in its log.jsonl")
    architectures = sorted({r["architecture"] for r in runs})
    if len(architectures) != 1:
        parser.error(
            f"--runs {args.runs}: expected runs of one architecture, found {', '.join(architectures)}"
        )
    document = {
        "command": "python benchmarks/learning_curve.py " + " ".join(sys.argv[1:]),
        "architecture": architectures[0],
        "runs": runs,
        # Runs of one recipe share their data; runs over different data get no epoch column.
        **summarise(runs, epochs.pop() if len(epochs) == 1 else None),
    }
    if args.commentary:
        document["commentary"] = Path(args.commentary).read_text().strip()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_page(document, out)
    plot(document, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
