"""KL vs LK with seeds: benchmarks/results/kl-vs-lk-seeds*.{json,md,png} from examples/kl_vs_lk_seeds.sh's runs.

    python benchmarks/kl_vs_lk_seeds.py --runs runs/kl-vs-lk-seeds \
        --bench benchmarks/results/kl-vs-lk-seeds-bench.json --out benchmarks/results/kl-vs-lk-seeds

Each run directory holds one drafter (its config.json names the architecture, the loss and the seed; one
architecture per --runs directory). Runs with the same seed share
the drafter's initialisation and the batch order, so LK and KL are compared seed by seed: the ratio
AL(LK, seed) / AL(KL, seed) of acceptance lengths, its mean over seeds and a 95% Student-t interval of that mean
(n - 1 degrees of freedom). Served acceptance comes from the `lk-vllm bench` json (vLLM's counters); the trainer's
held-out expected acceptance length (T=1, and T=0 from the greedy estimate) gives the learning curves.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# 0.975 quantiles of Student's t by degrees of freedom (the standard table; no scipy in the environment).
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
DATASETS = ("mtbench", "humaneval", "gsm8k", "all")
LK_KINDS = ("alpha", "lambda")
ARCHITECTURE_NAMES = {"eagle3": "EAGLE-3", "medusa": "Medusa", "mlp": "MLP speculator"}
LOSS_COLOURS = {"kl": "tab:grey", "alpha": "tab:blue", "lambda": "tab:orange"}  # the plots' colour per loss


def mean_interval(values: list[float]) -> dict:
    """Mean and 95% Student-t interval of the mean (None bounds for a single value)."""
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return {"n": n, "mean": mean, "low": None, "high": None}
    if n - 1 not in T_975:
        raise ValueError(f"{n} values: the t table covers 2 to {max(T_975) + 1}")
    half = T_975[n - 1] * statistics.stdev(values) / math.sqrt(n)
    return {"n": n, "mean": mean, "low": mean - half, "high": mean + half}


def paired_ratio(lk: dict[int, float], kl: dict[int, float]) -> dict | None:
    """LK/KL per seed both have, with the mean and its interval; None when no seed has both."""
    seeds = sorted(set(lk) & set(kl))
    if not seeds:
        return None
    ratios = [lk[s] / kl[s] for s in seeds]
    return {"seeds": seeds, "ratios": ratios, **mean_interval(ratios)}


def read_run(run: Path) -> dict:
    """Architecture, loss, seed and held-out learning curve of one run directory."""
    config = json.loads((run / "config.json").read_text())
    curve, tokens = [], 0
    for line in (run / "log.jsonl").read_text().splitlines():
        entry = json.loads(line)
        tokens += entry.get("tokens", 0)
        if "eval" in entry:
            curve.append(
                {
                    "step": entry["step"],
                    "training_tokens": tokens,
                    "al_t1": entry["eval"]["expected_acceptance_length"],
                    "al_t0": entry["eval"]["expected_acceptance_length_greedy"],
                }
            )
    return {
        "run": run.name,
        "architecture": config["model"]["architecture"],
        "loss": config["loss"]["kind"],
        "seed": config["training"]["seed"],
        "steps": config["training"]["max_steps"],
        "curve": curve,
    }


def served(bench: dict, runs: dict[str, dict]) -> list[dict]:
    """The bench's acceptance lengths of the runs' drafters: loss, seed, dataset ('all' overall), T."""
    rows = []
    for record in bench["records"] + bench["overall"]:
        path = record.get("drafter_path")
        run = runs.get(Path(path).parent.name) if path else None
        if run is None or record.get("acceptance_length") is None:
            continue
        rows.append(
            {
                "loss": run["loss"],
                "seed": run["seed"],
                "dataset": record["dataset"],
                "temperature": record["temperature"],
                "acceptance_length": record["acceptance_length"],
                "training_expected": record.get("training_expected_acceptance_length"),
            }
        )
    return rows


def comparisons(rows: list[dict], key: str) -> list[dict]:
    """LK/KL ratio of ``key`` per LK kind, dataset and temperature."""
    by_cell: dict[tuple, dict[int, float]] = {}  # (loss, dataset, T) -> {seed: value}
    for r in rows:
        by_cell.setdefault((r["loss"], r["dataset"], r["temperature"]), {})[r["seed"]] = r[key]
    cells = sorted({(d, t) for _, d, t in by_cell}, key=lambda c: (DATASETS.index(c[0]), c[1]))
    out = []
    for kind in LK_KINDS:
        for dataset, temperature in cells:
            ratio = paired_ratio(
                by_cell.get((kind, dataset, temperature), {}), by_cell.get(("kl", dataset, temperature), {})
            )
            if ratio is not None:
                out.append({"lk": kind, "dataset": dataset, "temperature": temperature, **ratio})
    return out


def heldout_rows(runs: list[dict]) -> list[dict]:
    """The final held-out estimates as rows shaped like served ones (dataset 'held-out')."""
    rows = []
    for run in runs:
        if run["curve"] and run["curve"][-1]["step"] == run["steps"]:
            last = run["curve"][-1]
            for temperature, value in ((0.0, last["al_t0"]), (1.0, last["al_t1"])):
                rows.append(
                    {
                        "loss": run["loss"],
                        "seed": run["seed"],
                        "dataset": "all",
                        "temperature": temperature,
                        "acceptance_length": value,
                    }
                )
    return rows


def fmt_ratio(c: dict) -> str:
    if c["low"] is None:
        return f"{c['mean']:.3f} (one seed)"
    return f"{c['mean']:.3f} [{c['low']:.3f}, {c['high']:.3f}]"


def verdict(c: dict) -> str:
    if c["low"] is None:
        return "one seed"
    if c["low"] > 1:
        return "LK better (95%)"
    if c["high"] < 1:
        return "KL better (95%)"
    return "no difference at 95%"


def write_page(document: dict, out: Path) -> None:
    from lk_vllm.atomic import write_atomic

    architecture = ARCHITECTURE_NAMES.get(document["architecture"], document["architecture"])
    lines = [
        f"# KL vs LK with seeds: {architecture} on the default target",
        "",
        f"`{document['command']}`",
        "",
        f"- bench: `{document['bench_command']}`",
        f"- hardware: {document['hardware']}; vLLM {document['vllm_version']}",
        f"- runs: {len(document['runs'])} ({', '.join(r['run'] for r in document['runs'])})",
        "- ratio = acceptance length with LK / with KL for the same seed (same initialisation and batch order);",
        "  mean over seeds and 95% Student-t interval of the mean.",
        "",
        f"![learning curves and ratios]({out.with_suffix('.png').name})",
        "",
        "## Served by vLLM (acceptance length ratio LK/KL)",
        "",
        "| LK | dataset | T | seeds | per-seed ratios | mean [95% interval] | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in document["served_ratios"]:
        lines.append(
            f"| {c['lk']} | {c['dataset']} | {c['temperature']:g} | {c['n']} | "
            f"{' / '.join(f'{r:.3f}' for r in c['ratios'])} | {fmt_ratio(c)} | {verdict(c)} |"
        )
    lines += [
        "",
        "## Held out by the trainer (expected acceptance length at the last step)",
        "",
        "| LK | T | seeds | per-seed ratios | mean [95% interval] | verdict |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for c in document["heldout_ratios"]:
        lines.append(
            f"| {c['lk']} | {c['temperature']:g} | {c['n']} | {' / '.join(f'{r:.3f}' for r in c['ratios'])} | "
            f"{fmt_ratio(c)} | {verdict(c)} |"
        )
    lines += [
        "",
        "## Acceptance lengths",
        "",
        "| run | loss | seed | held-out T=0 | held-out T=1 | served T=0 (all) | served T=1 (all) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    served_all = {
        (r["loss"], r["seed"], r["temperature"]): f"{r['acceptance_length']:.3f}"
        for r in document["served"]
        if r["dataset"] == "all"
    }
    for run in document["runs"]:
        last = run["curve"][-1] if run["curve"] else {}
        t0, t1 = (served_all.get((run["loss"], run["seed"], t), "-") for t in (0.0, 1.0))
        lines.append(
            f"| {run['run']} | {run['loss']} | {run['seed']} | {last.get('al_t0', float('nan')):.3f} | "
            f"{last.get('al_t1', float('nan')):.3f} | {t0} | {t1} |"
        )
    lines += [
        "",
        "## Learning curves (held-out expected acceptance length, mean over seeds)",
        "",
        "| loss | step | training tokens | T=0 | T=1 |",
        "| --- | --- | --- | --- | --- |",
    ]
    for point in document["mean_curves"]:
        lines.append(
            f"| {point['loss']} | {point['step']} | {point['training_tokens']:,} | {point['al_t0']:.3f} | "
            f"{point['al_t1']:.3f} |"
        )
    lines += ["", document.get("commentary", ""), ""]
    write_atomic(out.with_suffix(".md"), "\n".join(lines))
    write_atomic(out.with_suffix(".json"), json.dumps(document, indent=1) + "\n")
    plot(document, out.with_suffix(".png"))


def mean_curves(runs: list[dict]) -> list[dict]:
    """Per loss and step, the mean over seeds (steps every seed of that loss has reached)."""
    out = []
    for loss in ("kl", *LK_KINDS):
        curves = [r["curve"] for r in runs if r["loss"] == loss and r["curve"]]
        if not curves:
            continue
        for points in zip(*curves, strict=False):
            if len({p["step"] for p in points}) != 1 or len(points) != len(curves):
                continue
            out.append(
                {
                    "loss": loss,
                    "step": points[0]["step"],
                    "training_tokens": round(statistics.fmean(p["training_tokens"] for p in points)),
                    "al_t0": statistics.fmean(p["al_t0"] for p in points),
                    "al_t1": statistics.fmean(p["al_t1"] for p in points),
                }
            )
    return out


def plot(document: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for ax, key, title in ((axes[0], "al_t0", "T=0"), (axes[1], "al_t1", "T=1")):
        for run in document["runs"]:
            xs = [p["training_tokens"] / 1e3 for p in run["curve"]]
            ax.plot(
                xs, [p[key] for p in run["curve"]], color=LOSS_COLOURS[run["loss"]], alpha=0.35, linewidth=1
            )
        for loss, colour in LOSS_COLOURS.items():
            points = [p for p in document["mean_curves"] if p["loss"] == loss]
            if points:
                ax.plot(
                    [p["training_tokens"] / 1e3 for p in points],
                    [p[key] for p in points],
                    color=colour,
                    marker="o",
                    label=f"{loss} (mean of seeds)",
                )
        ax.set_xlabel("training tokens (thousands)")
        ax.set_ylabel("held-out expected acceptance length")
        ax.set_title(f"Learning curves, {title}")
        ax.legend(fontsize=8)
    ax = axes[2]
    ratios = document["served_ratios"]
    for i, c in enumerate(ratios):
        y = c["mean"]
        err = [[y - c["low"]], [c["high"] - y]] if c["low"] is not None else None
        ax.errorbar([i], [y], yerr=err, fmt="o", color=LOSS_COLOURS[c["lk"]], capsize=3)
    ax.axhline(1.0, color="grey", linestyle=":")
    ax.set_xticks(range(len(ratios)))
    ax.set_xticklabels(
        [f"{c['lk']} {c['dataset']} T={c['temperature']:g}" for c in ratios], rotation=90, fontsize=7
    )
    ax.set_ylabel("served acceptance length LK / KL (95% interval)")
    ax.set_title("Served by vLLM, paired by seed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", required=True, help="the directory of examples/kl_vs_lk_seeds.sh's runs")
    parser.add_argument("--bench", required=True, help="the `lk-vllm bench` json of those runs' drafters")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "kl-vs-lk-seeds"))
    parser.add_argument("--commentary", default=None, metavar="FILE", help="markdown to put under the tables")
    args = parser.parse_args()
    run_dirs = sorted(p for p in Path(args.runs).iterdir() if (p / "config.json").is_file())
    if not run_dirs:
        parser.error(f"--runs {args.runs}: no run directory (with a config.json) in it")
    runs = [read_run(p) for p in run_dirs]
    architectures = sorted({r["architecture"] for r in runs})
    if len(architectures) != 1:
        parser.error(
            f"--runs {args.runs}: expected runs of one architecture, found {', '.join(architectures)}"
        )
    bench_path = Path(args.bench)
    if not bench_path.is_file():
        parser.error(f"--bench {args.bench}: no such file (run `examples/kl_vs_lk_seeds.sh bench` first)")
    bench = json.loads(bench_path.read_text())
    served_rows = served(bench, {r["run"]: r for r in runs})
    document = {
        "command": "python benchmarks/kl_vs_lk_seeds.py " + " ".join(sys.argv[1:]),
        "bench_command": bench["command"],
        "hardware": bench["hardware"],
        "vllm_version": bench["vllm_version"],
        "architecture": architectures[0],
        "runs": runs,
        "served": served_rows,
        "served_ratios": comparisons(served_rows, "acceptance_length"),
        "heldout_ratios": comparisons(heldout_rows(runs), "acceptance_length"),
        "mean_curves": mean_curves(runs),
    }
    if args.commentary:
        document["commentary"] = Path(args.commentary).read_text().strip()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_page(document, Path(args.out))
    print(f"wrote {Path(args.out).with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
