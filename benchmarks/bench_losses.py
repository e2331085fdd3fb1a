"""Cost of the LK losses: forward + backward time and peak memory, chunked (lk_vllm.losses.lk_loss) vs naive
eager (lk_vllm.losses.lk_loss_eager, autograd through plain torch ops), with the floor of one pass over both
logit tensors.

    python benchmarks/bench_losses.py [--quick] [--out benchmarks/results/losses]

Each (V, N, dtype, draft vocabulary) group runs in two fresh subprocesses, one for memory and one for time.
Peak memory is the peak of live tensor bytes during one forward + backward above those live before it, from
every allocation and free PyTorch's CPU allocator reports to torch.profiler (the CPU counterpart of CUDA's
max_memory_allocated: torch.compile's buffers and the gradient of the draft logits included; exact and
repeatable). The peak resident set (Linux VmHWM) is kept in the JSON as a cross-check. Time is wall-clock of
forward + backward; the chunked and the naive implementation are timed one after the other, each with its kinds
interleaved (in a new random order every repetition), and the minimum is reported (the median is kept in the JSON). The LK/KL ratios that decide the time target are paired: the median
over repetitions of (LK time / KL time of the same repetition), which a slow drift of the machine's load moves
far less than a ratio of minima. The ratio of minima is reported next to it: stalls (page faults of a GB-sized
gradient on a VM) only add time, so it is the one they cannot move. Timing runs under jemalloc when it is
installed (see timing_allocator). `--render JSON` rewrites a saved run's summary and page without measuring.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

KINDS = ("kl", "tv", "alpha", "lambda")
VOCABS = (32000, 49152, 128256, 201088)
ROWS = (1024, 8192)
DTYPES = ("float32", "bfloat16")
TRUNCATED_VOCAB = 16384  # the truncated draft vocabulary, at every V
TARGET_CONFIG = {"V": 49152, "N": 1024, "Vd": 16384}  # where the memory target is stated


# ---------------------------------------------------------------------------------------------------------------
# Worker: one group in a fresh process
# ---------------------------------------------------------------------------------------------------------------


def _rss_status() -> dict[str, int]:
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(("VmHWM:", "VmRSS:")):
                key, value = line.split(":")
                values[key] = int(value.split()[0]) * 1024
    return values


def _release_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _measure_rss_peak(run) -> int:
    _release_memory()
    base = _rss_status()["VmRSS"]
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset VmHWM to the current RSS
    run()
    return _rss_status()["VmHWM"] - base


def _measure_allocated_peak(run) -> int:
    """Peak bytes of live tensors during ``run()`` above those live before it (the CPU counterpart of CUDA's
    max_memory_allocated): the running sum of every allocation and free PyTorch's allocator reports to the
    profiler, torch.compile's buffers included. Exact and repeatable, unlike the resident set."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def run_worker(spec: dict) -> dict:
    """Measure one group in this (fresh) process: peak memory (mode "memory") or times (mode "time")."""
    import torch

    from lk_vllm.losses import lk_loss, lk_loss_eager

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    vocab, rows, vocab_draft = spec["V"], spec["N"], spec["Vd"]
    dtype = getattr(torch, spec["dtype"])
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(rows, vocab, generator=gen, dtype=dtype).mul_(3.0)
    d2t = torch.randperm(vocab, generator=gen)[:vocab_draft] if vocab_draft < vocab else None
    # A draft that half agrees with the target (alpha around 0.5, as mid-training).
    aligned = target if d2t is None else target.index_select(1, d2t)
    draft = torch.randn(rows, vocab_draft, generator=gen, dtype=dtype).mul_(1.5).add_(aligned, alpha=0.5)
    del aligned
    draft.requires_grad_(True)

    def fwd_bwd(impl: str, kind: str):
        draft.grad = None
        if impl == "chunked":
            result = lk_loss(draft, target, kind=kind, draft_to_target=d2t)
        else:
            result = lk_loss_eager(draft, target, kind=kind, draft_to_target=d2t)
        result.loss.backward()

    def floor():
        # One pass reading both logit tensors: a max reduction over each.
        target.amax(dim=1)
        draft.detach().amax(dim=1)

    cases = [(impl, kind) for impl in spec["impls"] for kind in KINDS]
    if spec["mode"] == "memory":
        # Warm-up of every case: one-time allocations (the allocator's, torch.compile's graph for each loss
        # kind) are not the loss's.
        for impl, kind in cases:
            fwd_bwd(impl, kind)
        draft.grad = None
        allocated = {}
        for impl, kind in cases:
            allocated[f"{impl}/{kind}"] = _measure_allocated_peak(
                lambda impl=impl, kind=kind: fwd_bwd(impl, kind)
            )
            draft.grad = None
        # The resident set as a cross-check (it also sees memory outside PyTorch's allocator): the minimum over
        # interleaved repetitions, since heap fragmentation adds a few hundred KiB to one call or another.
        rss = {f"{impl}/{kind}": [] for impl, kind in cases}
        for _ in range(spec.get("memory_reps", 1)):
            for impl, kind in cases:
                rss[f"{impl}/{kind}"].append(
                    _measure_rss_peak(lambda impl=impl, kind=kind: fwd_bwd(impl, kind))
                )
                draft.grad = None
        return {
            "peak_bytes": allocated,
            "rss_peak_bytes": {case: min(values) for case, values in rss.items()},
            "threads": torch.get_num_threads(),
        }

    times = {f"{impl}/{kind}": [] for impl, kind in cases}
    cpu_times = {f"{impl}/{kind}": [] for impl, kind in cases}
    floor_times, floor_cpu_times = [], []
    for impl, kind in cases:  # warm-up: first-call costs (allocator, torch.compile of the kernels)
        fwd_bwd(impl, kind)
    order = random.Random(0)
    # One implementation at a time: the naive one's GB-sized allocations must not land just before some
    # chunked kind and not others. Within an implementation the kinds run in a new random order every
    # repetition, so no kind always follows the same other one.
    for impl in spec["impls"]:
        started = time.perf_counter()
        min_reps = spec["min_reps"] if impl == "chunked" else min(spec["min_reps"], 2)
        for rep in range(spec["max_reps"]):
            if impl == "chunked":
                t0, c0 = time.perf_counter(), time.process_time()
                floor()
                floor_times.append(time.perf_counter() - t0)
                floor_cpu_times.append(time.process_time() - c0)
            kinds = list(KINDS)
            order.shuffle(kinds)
            for kind in kinds:
                t0, c0 = time.perf_counter(), time.process_time()
                fwd_bwd(impl, kind)
                times[f"{impl}/{kind}"].append(time.perf_counter() - t0)
                cpu_times[f"{impl}/{kind}"].append(time.process_time() - c0)
            if rep + 1 >= min_reps and time.perf_counter() - started > spec["seconds"]:
                break
    return {
        "times": times,
        "cpu_times": cpu_times,
        "floor_times": floor_times,
        "floor_cpu_times": floor_cpu_times,
        "threads": torch.get_num_threads(),
    }


def _paired_ratio(samples: list[float], reference: list[float]) -> float:
    """Median over repetitions of samples[r] / reference[r] (both measured in repetition r)."""
    return statistics.median(s / r for s, r in zip(samples, reference, strict=True))


def group_records(spec: dict, memory: dict, timing: dict) -> list[dict]:
    base = {key: spec[key] for key in ("V", "N", "Vd", "vocab", "dtype")}
    base["threads"] = timing["threads"]
    floor_times = timing["floor_times"]
    floor_s = min(floor_times)
    records = [
        {
            **base,
            "impl": "floor",
            "kind": None,
            "time_s": floor_s,
            "time_s_median": statistics.median(floor_times),
            "cpu_time_s": min(timing["floor_cpu_times"]),
            "reps": len(floor_times),
            "peak_bytes": 0,
            "rss_peak_bytes": 0,
        }
    ]
    for case, samples in timing["times"].items():
        impl, kind = case.split("/")
        records.append(
            {
                **base,
                "impl": impl,
                "kind": kind,
                "time_s": min(samples),
                "time_s_median": statistics.median(samples),
                # CPU time of this process: with --threads 1 it is the loss's own compute, barely moved by
                # other jobs on a shared machine (wall time is not).
                "cpu_time_s": min(timing["cpu_times"][case]),
                "reps": len(samples),
                "peak_bytes": memory["peak_bytes"][case],
                "rss_peak_bytes": memory["rss_peak_bytes"][case],
                "ratio_to_floor": min(samples) / floor_s,
            }
        )
    for record in records:
        if record["impl"] == "floor":
            continue
        kl = next(r for r in records if r["impl"] == record["impl"] and r["kind"] == "kl")
        case, kl_case = f"{record['impl']}/{record['kind']}", f"{record['impl']}/kl"
        record["time_ratio_to_kl_of_minima"] = record["time_s"] / kl["time_s"]
        record["time_ratio_to_kl"] = _paired_ratio(timing["times"][case], timing["times"][kl_case])
        record["cpu_time_ratio_to_kl"] = _paired_ratio(
            timing["cpu_times"][case], timing["cpu_times"][kl_case]
        )
        record["memory_ratio_to_kl"] = record["peak_bytes"] / kl["peak_bytes"]
        record["rss_memory_ratio_to_kl"] = record["rss_peak_bytes"] / kl["rss_peak_bytes"]
        if record["impl"] == "chunked" and "naive" in spec["impls"]:
            naive = next(r for r in records if r["impl"] == "naive" and r["kind"] == record["kind"])
            record["memory_ratio_to_naive"] = record["peak_bytes"] / naive["peak_bytes"]
            record["time_ratio_to_naive"] = record["time_s"] / naive["time_s"]
    return records


# ---------------------------------------------------------------------------------------------------------------
# Parent: the grid, memory budget, output
# ---------------------------------------------------------------------------------------------------------------


def _bytes_per(dtype: str) -> int:
    return {"float32": 4, "bfloat16": 2}[dtype]


def estimate_bytes(vocab: int, rows: int, vocab_draft: int, dtype: str, impl: str) -> int:
    """Rough resident bytes of a group: inputs + gradient (+ the naive version's [N, V] and [N, Vd] fp32 tensors)."""
    size = _bytes_per(dtype)
    inputs = rows * vocab * size + 2 * rows * vocab_draft * size
    if impl == "chunked":
        return inputs + (64 << 20)
    return inputs + 4 * (3 * rows * vocab + 10 * rows * vocab_draft)


def available_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def hardware() -> dict:
    import torch

    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": model,
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


JEMALLOC_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
    "/usr/lib64/libjemalloc.so.2",
    "/usr/local/lib/libjemalloc.so.2",
)


def timing_allocator(choice: str) -> tuple[str, dict[str, str]]:
    """The timing worker's allocator and the environment that selects it.

    A fresh [N, Vd] gradient is GBs at N=8192. glibc maps it fresh for every call and returns it at free, so
    every call page-faults it in again; on these VMs a 4 KiB fault costs ~11 us and the faults came in stalls of
    up to seconds that hit random calls of every kind. jemalloc with decay disabled keeps freed pages mapped
    and hands the same ones back (no faults after the warm-up); THP (a PyTorch setting) faults 2 MiB at a time,
    which halves the cost but keeps the stalls.
    """
    jemalloc = next((path for path in JEMALLOC_PATHS if os.path.exists(path)), None)
    if choice == "auto":
        choice = "jemalloc" if jemalloc else "thp"
    if choice == "jemalloc":
        if jemalloc is None:
            raise SystemExit(
                "--allocator jemalloc: libjemalloc.so.2 not found in "
                + ", ".join(JEMALLOC_PATHS)
                + " (Debian/Ubuntu: apt install libjemalloc2)"
            )
        return f"jemalloc ({jemalloc}, MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1)", {
            "LD_PRELOAD": jemalloc,
            "MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1",
        }
    if choice == "thp":
        return "thp (THP_MEM_ALLOC_ENABLE=1)", {"THP_MEM_ALLOC_ENABLE": "1"}
    return "glibc", {}


def build_groups(args) -> list[dict]:
    groups = []
    for rows in args.rows:
        for vocab in args.vocab:
            for dtype in args.dtypes:
                for vocab_mode in args.draft_vocab:
                    vocab_draft = vocab if vocab_mode == "full" else min(TRUNCATED_VOCAB, vocab)
                    groups.append(
                        {"V": vocab, "N": rows, "Vd": vocab_draft, "vocab": vocab_mode, "dtype": dtype}
                    )
    return groups


def fmt_ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1e3:,.1f}"


def fmt_mb(nbytes: float | None) -> str:
    return "—" if nbytes is None else f"{nbytes / 2**20:,.0f}"


def render_markdown(report: dict) -> str:
    records = report["records"]
    lines = [
        "# LK loss cost: chunked closed-form vs naive eager",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Hardware: {report['hardware']['cpu']}, {report['hardware']['logical_cores']} logical cores "
        f"(torch threads {report['hardware']['torch_threads']}), {report['hardware']['memory_gb']} GB RAM, "
        f"torch {report['hardware']['torch']}. Wall time of the run: {report['wall_seconds'] / 60:.1f} min.",
        "",
        f"Machine load (1-min load average before and after each group; the benchmark itself keeps "
        f"{report['hardware']['torch_threads']} threads busy): {report['load']}.",
        "",
        "Method: " + report["method"],
        "",
    ]
    if report.get("groups_not_yet_run"):
        lines += [
            f"**Partial: written while running, {report['groups_not_yet_run']} groups not yet run.**",
            "",
        ]
    lines += report.get("summary_lines", [])
    groups = {}
    for record in records:
        key = (record["N"], record["dtype"], record["vocab"])
        groups.setdefault(key, []).append(record)
    for (rows, dtype, vocab_mode), group in sorted(groups.items()):
        vd = "Vd = V" if vocab_mode == "full" else f"Vd = {TRUNCATED_VOCAB}"
        lines += [
            "",
            f"## N = {rows}, {dtype} inputs, {vocab_mode} draft vocabulary ({vd})",
            "",
            "Times in ms (fwd+bwd wall time, min over reps); ratios: LK time / same implementation's KL time, "
            "median over repetitions of the per-repetition ratio, wall / CPU time (CPU time of the process: the "
            "robust one on a shared machine with --threads 1); "
            "memory in MiB of peak allocated tensor bytes over the baseline (gradient included).",
            "",
            "| V | floor | KL | TV (×KL) | LK^α (×KL) | LK^λ (×KL) | KL / floor | naive KL | naive LK^λ | "
            "mem KL | mem LK^λ | mem naive LK^λ | LK^λ mem / naive |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for vocab in sorted({r["V"] for r in group}):
            at = [r for r in group if r["V"] == vocab]
            skipped = [r for r in at if r.get("skipped")]
            get = {(r["impl"], r["kind"]): r for r in at if not r.get("skipped")}
            if ("chunked", "kl") not in get:
                reason = skipped[0]["skipped"] if skipped else "not run"
                lines.append(f"| {vocab:,} | skipped: {reason} |" + " |" * 11)
                continue
            kl = get["chunked", "kl"]
            cells = [f"{vocab:,}", fmt_ms(get["floor", None]["time_s"]), fmt_ms(kl["time_s"])]
            for kind in ("tv", "alpha", "lambda"):
                r = get["chunked", kind]
                cells.append(
                    f"{fmt_ms(r['time_s'])} ({r['time_ratio_to_kl']:.3f} / {r['cpu_time_ratio_to_kl']:.3f})"
                )
            cells.append(f"{kl['ratio_to_floor']:.1f}×")
            naive_kl, naive_lam = get.get(("naive", "kl")), get.get(("naive", "lambda"))
            naive_note = next((r["skipped"] for r in skipped if r["impl"] == "naive"), "not run")
            cells.append(fmt_ms(naive_kl["time_s"]) if naive_kl else f"skipped ({naive_note})")
            cells.append(fmt_ms(naive_lam["time_s"]) if naive_lam else "—")
            lam = get["chunked", "lambda"]
            cells += [fmt_mb(kl["peak_bytes"]), fmt_mb(lam["peak_bytes"])]
            cells.append(fmt_mb(naive_lam["peak_bytes"]) if naive_lam else "—")
            cells.append(f"{lam['memory_ratio_to_naive']:.3f}" if "memory_ratio_to_naive" in lam else "—")
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Commentary", ""] + report.get("commentary", ["(none)"])
    return "\n".join(lines) + "\n"


def summarize(records: list[dict]) -> tuple[list[str], dict]:
    chunked = [r for r in records if r["impl"] == "chunked" and not r.get("skipped")]

    def ratios_by_kind(key: str) -> dict[str, list[float]]:
        return {
            kind: [r[key] for r in chunked if r["kind"] == kind and key in r] for kind in ("alpha", "lambda")
        }

    mem_ratio = [r["memory_ratio_to_kl"] for r in chunked if r["kind"] in ("alpha", "lambda")]
    lines = ["## Headline", ""]
    headline = {}
    # The paired median is the one a slow drift of the machine cannot move; the ratio of minima the one stalls
    # cannot move (they only add time), but it rests on one repetition of each kind. Both are reported.
    for clock, label, by_kind in (
        ("time", "time", ratios_by_kind("time_ratio_to_kl")),
        ("cpu_time", "CPU time", ratios_by_kind("cpu_time_ratio_to_kl")),
        ("min_time", "min time", ratios_by_kind("time_ratio_to_kl_of_minima")),
    ):
        for kind, values in by_kind.items():
            if not values:
                continue
            headline[f"{kind}_{clock}_ratio_to_kl"] = {
                "min": min(values),
                "median": statistics.median(values),
                "max": max(values),
            }
            lines.append(
                f"- LK^{'α' if kind == 'alpha' else 'λ'} {label} / KL {label} (chunked, all configs): median "
                f"{statistics.median(values):.3f}, range {min(values):.3f}–{max(values):.3f} (target ≤ 1.05)."
            )
    if mem_ratio:
        headline["lk_memory_ratio_to_kl_max"] = max(mem_ratio)
        lines.append(f"- LK^α/LK^λ peak memory / KL peak memory: at most {max(mem_ratio):.4f} (target ≤ 1).")
    target = [
        r
        for r in chunked
        if r["V"] == TARGET_CONFIG["V"]
        and r["N"] == TARGET_CONFIG["N"]
        and r["Vd"] == TARGET_CONFIG["Vd"]
        and r["kind"] in ("alpha", "lambda")
        and "memory_ratio_to_naive" in r
    ]
    for r in target:
        lines.append(
            f"- At N={r['N']}, V={r['V']}, Vd={r['Vd']}, {r['dtype']}: LK^{r['kind']} peak memory "
            f"{fmt_mb(r['peak_bytes'])} MiB = {r['memory_ratio_to_naive']:.3f}× naive eager (target ≤ 0.25)."
        )
        headline[f"target_config_{r['dtype']}_{r['kind']}_memory_ratio_to_naive"] = r["memory_ratio_to_naive"]
    floors = [r["ratio_to_floor"] for r in chunked if r["kind"] == "lambda"]
    if floors:
        headline["lambda_ratio_to_floor"] = {
            "min": min(floors),
            "median": statistics.median(floors),
            "max": max(floors),
        }
        lines.append(
            f"- LK^λ fwd+bwd / floor (one max-reduction pass over both logit tensors): median "
            f"{statistics.median(floors):.1f}×, range {min(floors):.1f}–{max(floors):.1f}×."
        )
    return lines, headline


NOTES = [
    "- Why LK costs what KL costs: the forward is the same fused kernel for every kind (normalisers, alpha, KL "
    "and the TV term's M = sum q*a in the same row loops), and the backward is one elementwise pass for every "
    "kind; the TV term adds a compare and a select per element to KL's q - p~.",
    "- Peak memory of the chunked path is the gradient itself plus chunk-sized temporaries (the gathered target "
    "columns with a draft vocabulary), the same for every kind; the naive path holds several [N, V] and [N, Vd] "
    "fp32 tensors.",
    "- The floor is a single max-reduction over each logit tensor: it reads the data once and does no exp. The "
    "losses need the target's and the draft's normalisers (max and sum of exp) and their probabilities again in "
    "the statistics and the backward, so a multiple of the floor is unavoidable on a CPU where exp dominates.",
    "- Times are over interleaved repetitions on a VM, so ratios within one group are comparable, absolute "
    "times less so (they also differ between machines: bf16 elementwise work is much slower on some CPUs).",
]


def commentary(report: dict) -> list[str]:
    records = report["records"]
    chunked = [r for r in records if r["impl"] == "chunked" and not r.get("skipped")]
    lines = []
    for kind, name in (("alpha", "LK^α"), ("lambda", "LK^λ")):
        rows = [r for r in chunked if r["kind"] == kind]
        if not rows:
            continue
        met = [r for r in rows if r["time_ratio_to_kl"] <= 1.05]
        missed = sorted(rows, key=lambda r: -r["time_ratio_to_kl"])
        line = f"- Time target ({name} ≤ 1.05× KL): met in {len(met)} of {len(rows)} configurations."
        if len(met) < len(rows):
            worst = missed[0]
            by_mode = {}
            for r in rows:
                by_mode.setdefault(r["vocab"], []).append(r["time_ratio_to_kl"])
            parts = [
                f"{mode} vocabulary median {statistics.median(v):.3f}" for mode, v in sorted(by_mode.items())
            ]
            line += (
                f" Worst: {worst['time_ratio_to_kl']:.3f} at V={worst['V']}, N={worst['N']}, {worst['dtype']}, "
                f"{worst['vocab']} vocabulary; " + ", ".join(parts) + "."
            )
        lines.append(line)
        minima = [r["time_ratio_to_kl_of_minima"] for r in rows]
        lines.append(
            f"- Same target by the ratio of minimum times ({name} min / KL min): met in "
            f"{sum(v <= 1.05 for v in minima)} of {len(rows)}, range {min(minima):.3f}–{max(minima):.3f}. A minimum "
            "is one repetition: where it and the paired median disagree, one kind had an outlier repetition (a "
            "stall, such as page faults of a fresh GB-sized gradient, or a lucky fast one)."
        )
    mem = [r for r in chunked if r["kind"] in ("alpha", "lambda")]
    if mem:
        worst = max(mem, key=lambda r: r["memory_ratio_to_kl"])
        verdict = "met" if worst["memory_ratio_to_kl"] <= 1.0 else "not met"
        kl_peak = worst["peak_bytes"] / worst["memory_ratio_to_kl"]
        lines.append(
            f"- Memory target (LK peak ≤ KL peak): {verdict}; largest LK/KL ratio {worst['memory_ratio_to_kl']:.4f} "
            f"(V={worst['V']}, N={worst['N']}, {worst['dtype']}, {worst['vocab']}: "
            f"{(worst['peak_bytes'] - kl_peak) / 1024:+.0f} KiB of {kl_peak / 2**20:.0f} MiB)."
        )
        rss = [r["rss_memory_ratio_to_kl"] for r in mem if "rss_memory_ratio_to_kl" in r]
        if rss:
            lines.append(
                f"- Cross-check, peak resident set LK/KL: {min(rss):.4f}–{max(rss):.4f} (heap fragmentation moves it "
                "by a few hundred KiB of either sign; it also counts memory outside PyTorch's allocator)."
            )
    for key, value in report["headline"].items():
        if key.startswith("target_config_"):
            verdict = "met" if value <= 0.25 else "not met"
            lines.append(
                f"- Memory target vs naive at N=1024, V=49152, Vd=16384 ({key[14:]}): {value:.3f}, {verdict}."
            )
    skipped = [r for r in records if r.get("skipped")]
    for r in skipped:
        lines.append(
            f"- Skipped {r['impl']} at V={r['V']}, N={r['N']}, {r['dtype']}, {r['vocab']}: {r['skipped']}."
        )
    return lines + [""] + NOTES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="small grid (N=1024, V in 32000/49152) for a smoke run"
    )
    parser.add_argument("--out", default="benchmarks/results/losses", help="output path without extension")
    parser.add_argument("--vocab", type=int, nargs="+", default=list(VOCABS))
    parser.add_argument("--rows", type=int, nargs="+", default=list(ROWS))
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument(
        "--draft-vocab",
        nargs="+",
        default=["full", "truncated"],
        choices=("full", "truncated"),
        help=f"draft vocabulary: full (Vd = V) and/or truncated (Vd = {TRUNCATED_VOCAB})",
    )
    parser.add_argument(
        "--memory-budget-gb",
        type=float,
        default=9.0,
        help="skip an implementation whose estimated resident size exceeds this (or --memory-fraction of "
        "available memory)",
    )
    parser.add_argument(
        "--memory-fraction",
        type=float,
        default=0.7,
        help="at most this fraction of MemAvailable for one group (default 0.7)",
    )
    parser.add_argument(
        "--seconds-per-group",
        type=float,
        default=20.0,
        help="stop repeating a group after this many seconds (at least --min-reps reps)",
    )
    parser.add_argument("--min-reps", type=int, default=5)
    parser.add_argument(
        "--memory-reps", type=int, default=3, help="peak memory: minimum over this many calls"
    )
    parser.add_argument("--max-reps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=24.0,
        help="skip the remaining groups once the run has taken this long",
    )
    parser.add_argument(
        "--allocator",
        choices=("auto", "jemalloc", "thp", "glibc"),
        default="auto",
        help="memory allocator of the timing worker: jemalloc (LD_PRELOAD, freed pages kept mapped), thp "
        "(PyTorch's allocator on transparent huge pages), glibc; auto = jemalloc if installed, else thp",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument(
        "--render", metavar="JSON", help="rewrite the summary and .md of a saved run (no measuring)"
    )
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return 0
    if args.render:  # a saved run's records, summarised and written again (no measuring)
        path = Path(args.render)
        write_report(json.loads(path.read_text()), path.with_suffix(""))
        return 0

    if args.quick:
        args.vocab = [v for v in args.vocab if v <= 49152] or [32000]
        args.rows = [1024]
        args.seconds_per_group = min(args.seconds_per_group, 6.0)
    if not 0.0 < args.memory_fraction <= 0.95:
        parser.error(f"--memory-fraction: expected a fraction in (0, 0.95], got {args.memory_fraction}")
    budget = min(args.memory_budget_gb * 2**30, args.memory_fraction * available_bytes())
    allocator, timing_env = timing_allocator(args.allocator)
    print(f"timing allocator: {allocator}", file=sys.stderr, flush=True)
    repo = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    records: list[dict] = []
    loads = []
    started = time.time()
    machine = hardware()
    command = "python benchmarks/bench_losses.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )

    def run_report(groups_left: int = 0) -> dict:
        return {
            "hardware": machine,
            "command": command.strip(),
            "method": (
                "fwd+bwd wall time of `lk_loss` (chunked, default chunk size) and `lk_loss_eager` (naive) on "
                "random logits (target ~ N(0, 3²); draft = 0.5·target + N(0, 1.5²), so alpha ≈ 0.5), reps "
                "interleaved across kinds (random order every rep; chunked and naive timed separately) after a "
                "warm-up, minimum reported; LK/KL ratios are the median over reps of the same rep's LK time / KL "
                f"time; floor = `target.amax(1)` + `draft.amax(1)`; timing allocator: {allocator}. Peak memory = "
                "peak bytes of live tensors during one fwd+bwd above those live before it (every allocation and "
                "free of PyTorch's CPU allocator, as reported to torch.profiler; torch.compile's buffers and the "
                "gradient included), after a warm-up, in a fresh process per group; the peak resident set "
                "(VmHWM − VmRSS, minimum over --memory-reps calls, MALLOC_MMAP_THRESHOLD_=65536) is the "
                f"cross-check in the JSON. Truncated draft vocabulary: Vd = {TRUNCATED_VOCAB} random target ids at "
                "every V."
            ),
            "timing_allocator": allocator,
            "load": f"min {min(loads):.1f}, max {max(loads):.1f}" if loads else "n/a",
            "wall_seconds": time.time() - started,
            "groups_not_yet_run": groups_left,
            "records": records,
        }

    groups = build_groups(args)
    for index, spec in enumerate(groups):
        if index:  # the groups so far, so that a run cut short keeps what it measured
            write_report(run_report(groups_left=len(groups) - index), Path(args.out), quiet=True)
        if time.time() - started > args.max_minutes * 60:
            records.append(
                {
                    **spec,
                    "impl": "chunked",
                    "kind": None,
                    "skipped": f"run time budget ({args.max_minutes} min) spent",
                }
            )
            continue
        impls = []
        for impl in ("chunked", "naive"):
            need = estimate_bytes(spec["V"], spec["N"], spec["Vd"], spec["dtype"], impl)
            if need <= budget:
                impls.append(impl)
            else:
                records.append(
                    {
                        **spec,
                        "impl": impl,
                        "kind": None,
                        "skipped": f"needs ~{need / 2**30:.1f} GB > budget {budget / 2**30:.1f} GB",
                    }
                )
        if "chunked" not in impls:
            print(f"skip {spec}: over the memory budget", file=sys.stderr, flush=True)
            continue
        worker_spec = {
            **spec,
            "impls": impls,
            "seconds": args.seconds_per_group,
            "min_reps": args.min_reps,
            "max_reps": args.max_reps,
            "memory_reps": args.memory_reps,
            "threads": args.threads,
        }
        load_before = os.getloadavg()[0]
        t0 = time.time()
        results = {}
        for mode in ("memory", "time"):
            # Memory: every allocation above 64 KiB is its own mmap, so the resident set (the cross-check) follows
            # the live tensors instead of what glibc's heap happens to keep. Time: see timing_env.
            mode_env = (
                dict(env, MALLOC_MMAP_THRESHOLD_="65536") if mode == "memory" else dict(env, **timing_env)
            )
            proc = subprocess.run(
                [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "--worker",
                    json.dumps({**worker_spec, "mode": mode}),
                ],
                capture_output=True,
                text=True,
                env=mode_env,
            )
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                break
            results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        if len(results) < 2:
            records.append(
                {**spec, "impl": "chunked", "kind": None, "skipped": f"worker failed: {proc.stderr[-300:]}"}
            )
            continue
        group_records_ = group_records(worker_spec, results["memory"], results["time"])
        load_after = os.getloadavg()[0]
        loads += [load_before, load_after]
        for record in group_records_:
            record["load_avg_1min"] = [round(load_before, 2), round(load_after, 2)]
        records += group_records_
        lam = next(r for r in group_records_ if r["impl"] == "chunked" and r["kind"] == "lambda")
        print(
            f"V={spec['V']:>6} N={spec['N']:>5} {spec['dtype']:>8} {spec['vocab']:>9}: "
            f"LK^λ {lam['time_s'] * 1e3:8.1f} ms (×{lam['time_ratio_to_kl']:.3f} KL, CPU ×{lam['cpu_time_ratio_to_kl']:.3f}, "
            f"×{lam['ratio_to_floor']:.1f} floor) "
            f"impls={impls} {time.time() - t0:.0f}s load {load_before:.1f}->{load_after:.1f}",
            file=sys.stderr,
            flush=True,
        )

    write_report(run_report(), Path(args.out))
    return 0


def write_report(report: dict, out: Path, quiet: bool = False) -> None:
    """Summarise the records and write ``out.json`` and ``out.md``, each atomically (a re-render overwrites the
    only copy of a run's measurements)."""
    from lk_vllm.atomic import write_atomic

    report["summary_lines"], report["headline"] = summarize(report["records"])
    report["commentary"] = commentary(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out.with_suffix(".json"), json.dumps(report, indent=1) + "\n")
    write_atomic(out.with_suffix(".md"), render_markdown(report))
    if quiet:
        return
    print("\n".join(report["summary_lines"]), file=sys.stderr)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
