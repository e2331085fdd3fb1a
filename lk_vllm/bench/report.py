"""The results page: ``<name>.json`` (DESIGN.md "Benchmark results"), ``<name>.md`` (tables) and ``<name>.png``
(per-position acceptance curves, speedup bars), written atomically side by side.

Rendering reads only the json document, so a committed result can be re-rendered without running anything
(``render_markdown(json.load(...))``). Reproduction targets are reported here, never asserted: when a run has
drafters of one architecture trained with KL and with an LK loss, the page shows the LK drafters' change in
acceptance length over KL next to what the paper reports.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from lk_vllm.acceptance import mean_acceptance_length
from lk_vllm.atomic import write_atomic

# LK_PAPER.md, Table 2 / App. F: mean acceptance-length change of LK^lambda (eta 3) over KL, EAGLE-3 drafters,
# over MT-Bench / HumanEval / GSM8K, for the five targets the paper reports.
PAPER_LK_GAIN_PERCENT = {0.0: (0.5, 1.8), 1.0: (3.5, 8.2)}

# LK_PAPER.md, Table 1: Llama-3.1-8B target, acceptance length as MT-Bench / HumanEval / GSM8K at T=0 and T=1
# (the paper's draft length; its LK^lambda rows use eta 3, Medusa eta 10).
PAPER_TABLE_1 = {
    ("eagle3", "kl"): ("3.75/4.82/4.50", "3.39/4.31/3.88"),
    ("eagle3", "alpha"): ("3.77/4.82/4.55", "3.50/4.48/3.98"),
    ("eagle3", "lambda"): ("3.84/4.89/4.57", "3.48/4.52/4.02"),
    ("medusa", "kl"): ("2.05/2.41/2.11", "1.72/2.02/1.81"),
    ("medusa", "alpha"): ("2.06/2.42/2.11", "1.78/2.09/1.85"),
    ("medusa", "lambda"): ("2.07/2.44/2.13", "1.85/2.22/1.92"),
    ("mlp_speculator", "kl"): ("2.45/2.42/2.42", "2.13/2.16/2.16"),
    ("mlp_speculator", "alpha"): ("2.48/2.46/2.46", "2.17/2.19/2.19"),
    ("mlp_speculator", "lambda"): ("2.48/2.83/2.46", "2.19/2.62/2.18"),
}
PAPER_DATASETS = ("mtbench", "humaneval", "gsm8k")


def write_results(document: dict[str, Any], out_dir: str | Path, name: str) -> dict[str, Path]:
    """Write ``<name>.json``, ``<name>.md`` and ``<name>.png`` into ``out_dir``; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{name}.json", "md": out / f"{name}.md", "png": out / f"{name}.png"}
    write_atomic(paths["json"], json.dumps(document, indent=1) + "\n")
    write_atomic(paths["md"], render_markdown(document, png_name=paths["png"].name))
    write_atomic(paths["png"], render_png(document))
    return paths


# ------------------------------------------------------------------------------------------------ markdown
def _num(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _signed(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:+.{digits}f}"


def _rates(values) -> str:
    return "-" if not values else " / ".join(f"{v:.2f}" for v in values)


def _temperature(value: float) -> str:
    return f"{value:g}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def render_markdown(document: dict[str, Any], png_name: str | None = None) -> str:
    settings = document.get("settings", {})
    lines = [f"# Benchmark: {document.get('name', '')}", "", f"`{document.get('command', '')}`", ""]
    lines += [
        f"- target: `{document.get('target')}`",
        f"- hardware: {document.get('hardware')}; vLLM {document.get('vllm_version')}; "
        f"lk-vllm {document.get('lk_vllm_version')}; {document.get('created', '')}",
        f"- K = {settings.get('num_speculative_tokens')} draft tokens, up to {settings.get('max_tokens')} output "
        f"tokens per request, {settings.get('limit') or 'all'} prompts per dataset, seed {settings.get('seed')}",
        f"- engine (identical for every row): {_engine_summary(settings.get('engine', {}))}",
        "",
    ]
    if png_name:
        lines += [f"![per-position acceptance and speedup]({png_name})", ""]

    overall = document.get("overall", [])
    lines += ["## All datasets", ""]
    lines += _table(
        [
            "drafter",
            "architecture",
            "loss",
            "T",
            "concurrency",
            "acceptance length (pooled)",
            "acceptance length (per-request mean)",
            "training-time expected",
            "gap %",
            "tokens/s",
            "speedup",
        ],
        [
            [
                r["drafter"],
                r["architecture"],
                r["loss"] or "-",
                _temperature(r["temperature"]),
                str(r["concurrency"]),
                _num(r["acceptance_length"]),
                _num(r.get("acceptance_length_mean_of_request_means")),
                _num(r["training_expected_acceptance_length"]),
                _signed(r["acceptance_length_gap_percent"]),
                _num(r["tokens_per_s"], 1),
                _num(r["speedup"]),
            ]
            for r in overall
        ],
    )
    lines += ["", "## Per dataset", ""]
    lines += _table(
        [
            "drafter",
            "dataset",
            "T",
            "concurrency",
            "acceptance length (pooled)",
            "acceptance length (per-request mean)",
            "per-position acceptance",
            "training-time expected",
            "expected from",
            "gap %",
            "output tokens",
            "seconds",
            "tokens/s",
            "speedup",
        ],
        [
            [
                r["drafter"],
                r["dataset"],
                _temperature(r["temperature"]),
                str(r["concurrency"]),
                _num(r["acceptance_length"]),
                _num(r.get("acceptance_length_mean_of_request_means")),
                _rates(r["per_position_acceptance"]),
                _num(r["training_expected_acceptance_length"]),
                r.get("training_expected_source") or "-",
                _signed(r["acceptance_length_gap_percent"]),
                str(r["output_tokens"]),
                _num(r["seconds"], 1),
                _num(r["tokens_per_s"], 1),
                _num(r["speedup"]),
            ]
            for r in document.get("records", [])
        ],
    )
    comparison = lk_versus_kl(overall)
    if comparison:
        lines += ["", "## LK losses against KL (reported, not asserted)", ""]
        lines += _table(
            [
                "architecture",
                "LK drafter",
                "loss",
                "KL drafter",
                "T",
                "concurrency",
                "acceptance length LK / KL",
                "change %",
                "paper (EAGLE-3, LK^lambda over KL)",
            ],
            [
                [
                    c["architecture"],
                    c["drafter"],
                    c["loss"],
                    c["kl_drafter"],
                    _temperature(c["temperature"]),
                    str(c["concurrency"]),
                    f"{_num(c['acceptance_length'])} / {_num(c['kl_acceptance_length'])}",
                    _signed(c["change_percent"]),
                    _paper_range(c["temperature"]),
                ]
                for c in comparison
            ],
        )
    paper_rows = paper_layout(document.get("records", []))
    if paper_rows:
        lines += [
            "",
            "## Next to the paper's Table 1 (Llama-3.1-8B there; acceptance length as MT-Bench / "
            "HumanEval / GSM8K, pooled over concurrencies)",
            "",
        ]
        lines += _table(
            ["architecture", "loss", "drafter", "T=0", "T=1", "paper T=0", "paper T=1"],
            [
                [
                    r["architecture"],
                    r["loss"],
                    r["drafter"],
                    r["ours"][0.0],
                    r["ours"][1.0],
                    r["paper"][0],
                    r["paper"][1],
                ]
                for r in paper_rows
            ],
        )
    lines += ["", "## How it was measured", ""]
    lines += [f"- {text}" for text in document.get("method", {}).values()]
    return "\n".join(lines) + "\n"


def _engine_summary(engine: dict[str, Any]) -> str:
    keys = ("dtype", "max_model_len", "max_num_seqs", "enforce_eager", "gpu_memory_utilization", "seed")
    return ", ".join(f"{key} {engine[key]}" for key in keys if key in engine)


def _paper_range(temperature: float) -> str:
    low_high = PAPER_LK_GAIN_PERCENT.get(float(temperature))
    return "-" if low_high is None else f"+{low_high[0]:g} to +{low_high[1]:g} %"


def lk_versus_kl(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each LK-trained drafter's acceptance length against a KL-trained drafter of the same architecture, per
    (temperature, concurrency)."""
    out = []
    for lk in records:
        if lk["loss"] in (None, "kl") or lk["acceptance_length"] is None:
            continue
        for kl in records:
            same = (
                kl["loss"] == "kl"
                and kl["architecture"] == lk["architecture"]
                and kl["dataset"] == lk["dataset"]
                and kl["temperature"] == lk["temperature"]
                and kl["concurrency"] == lk["concurrency"]
            )
            if same and kl["acceptance_length"]:
                out.append(
                    {
                        "architecture": lk["architecture"],
                        "drafter": lk["drafter"],
                        "loss": lk["loss"],
                        "kl_drafter": kl["drafter"],
                        "temperature": lk["temperature"],
                        "concurrency": lk["concurrency"],
                        "acceptance_length": lk["acceptance_length"],
                        "kl_acceptance_length": kl["acceptance_length"],
                        "change_percent": 100.0 * (lk["acceptance_length"] / kl["acceptance_length"] - 1.0),
                    }
                )
    return out


def paper_layout(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows shaped like the paper's Table 1: per drafter with a known (architecture, loss), the acceptance length
    on MT-Bench / HumanEval / GSM8K at T=0 and T=1, each pooled over the concurrencies (acceptance does not
    depend on concurrency; pooling the counters keeps every verification step's weight equal)."""
    rows = []
    drafters = dict.fromkeys(
        (r["drafter"], r["architecture"], r["loss"])
        for r in records
        if (r["architecture"], r["loss"]) in PAPER_TABLE_1
    )
    for drafter, architecture, loss in drafters:
        ours = {}
        for temperature in (0.0, 1.0):
            values = []
            for dataset in PAPER_DATASETS:
                cells = [
                    r
                    for r in records
                    if (r["drafter"], r["dataset"], r["temperature"]) == (drafter, dataset, temperature)
                    and r.get("num_drafts")
                ]
                length = (
                    mean_acceptance_length(
                        sum(r["num_accepted_tokens"] for r in cells), sum(r["num_drafts"] for r in cells)
                    )
                    if cells
                    else None
                )
                values.append(_num(length))
            ours[temperature] = "/".join(values)
        rows.append(
            {
                "architecture": architecture,
                "loss": loss,
                "drafter": drafter,
                "ours": ours,
                "paper": PAPER_TABLE_1[(architecture, loss)],
            }
        )
    order = list(PAPER_TABLE_1)
    return sorted(rows, key=lambda r: order.index((r["architecture"], r["loss"])))


# ------------------------------------------------------------------------------------------------ png
def render_png(document: dict[str, Any]) -> bytes:
    """Per-position acceptance over all datasets (one panel per temperature; served solid, training-time
    expectation dashed) and speedup bars per (temperature, concurrency)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    overall = document.get("overall", [])
    temperatures = sorted({r["temperature"] for r in overall})
    concurrencies = sorted({r["concurrency"] for r in overall})
    drafters = list(dict.fromkeys(r["drafter"] for r in overall if r["architecture"] != "none"))
    colors = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(drafters)}
    figure, axes = plt.subplots(
        1, len(temperatures) + 1, figsize=(5 * (len(temperatures) + 1), 4), squeeze=False
    )
    axes = axes[0]
    for axis, temperature in zip(axes, temperatures, strict=False):
        for r in overall:
            # Acceptance does not depend on concurrency: plot the smallest one.
            if (
                r["drafter"] not in colors
                or r["temperature"] != temperature
                or r["concurrency"] != concurrencies[0]
            ):
                continue
            if r["per_position_acceptance"]:
                positions = range(1, len(r["per_position_acceptance"]) + 1)
                axis.plot(
                    positions,
                    r["per_position_acceptance"],
                    marker="o",
                    color=colors[r["drafter"]],
                    label=f"{r['drafter']} (AL {r['acceptance_length']:.2f})",
                )
            if r["training_per_position_acceptance"]:
                positions = range(1, len(r["training_per_position_acceptance"]) + 1)
                axis.plot(
                    positions,
                    r["training_per_position_acceptance"],
                    linestyle="--",
                    color=colors[r["drafter"]],
                    label=f"{r['drafter']} training-time",
                )
        axis.xaxis.get_major_locator().set_params(integer=True)
        axis.set_title(f"per-position acceptance, T={_temperature(temperature)}")
        axis.set_xlabel("draft position")
        axis.set_ylabel("accepted fraction of drafts")
        axis.set_ylim(0, 1.05)
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7)
    bars = axes[-1]
    groups = [(t, c) for t in temperatures for c in concurrencies]
    width = 0.8 / max(1, len(drafters))
    for i, name in enumerate(drafters):
        values = []
        for t, c in groups:
            match = [r for r in overall if (r["drafter"], r["temperature"], r["concurrency"]) == (name, t, c)]
            values.append(match[0]["speedup"] if match and match[0]["speedup"] is not None else 0.0)
        drawn = bars.bar(
            [g + (i - (len(drafters) - 1) / 2) * width for g in range(len(groups))],
            values,
            width,
            color=colors[name],
            label=name,
        )
        bars.bar_label(drawn, fmt="%.2f", fontsize=7)
    bars.axhline(1.0, color="black", linewidth=0.8)
    bars.set_xticks(range(len(groups)), [f"T={_temperature(t)}\nc={c}" for t, c in groups])
    bars.set_title("speedup over no speculation (same run)")
    bars.set_ylabel("tokens/s ÷ baseline tokens/s")
    if drafters:
        bars.legend(fontsize=7)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()
