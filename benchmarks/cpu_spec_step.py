"""What a speculative step costs on CPU, per vLLM process layout: benchmarks/results/cpu-spec-step.{json,md,png}.

    python benchmarks/cpu_spec_step.py [--limit 6] [--max-tokens 128] [--eagle3 DIR] [--target DIR]

Batch 1, T=0, the first --limit MT-Bench prompts one after another, for each layout x engine:

* layouts: ``worker-process`` (vLLM's own CPU layout: the model in a separate worker process, one core reserved
  for the EngineCore), ``in-process`` (lk-vllm's default, ``LK_VLLM_CPU_INPROCESS_WORKER=1``: the model in the
  EngineCore process), ``single-process`` (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: everything in the caller,
  possible for offline engines only, never for vLLM's server);
* engines: no speculation, vLLM's n-gram drafter (K=4) and EAGLE-3 (K=3; without --eagle3 a freshly
  initialised drafter with the reproduction recipe's 16,384-token draft vocabulary: its steps cost what a
  trained one's do, its acceptance is meaningless).

Every engine runs in its own subprocess, one at a time. Each ``LLMEngine.step`` is timed in the caller (IPC
included) and, untimed between steps, vLLM's counters say whether the step verified a draft; so the page gives
the plain decode step, the verify step and their ratio. A second pass runs the single-process layout with
timers around vLLM's step phases (scheduler, input preparation, forward, logits, sampling / rejection sampling,
proposer, bookkeeping): the per-phase profile. speedup = tokens/s / the no-speculation tokens/s of the same
layout; "vs worker-process" compares with vLLM's layout without speculation.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LAYOUTS = {
    "worker-process": {"LK_VLLM_CPU_INPROCESS_WORKER": "0"},
    "in-process": {"LK_VLLM_CPU_INPROCESS_WORKER": "1"},
    "single-process": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
}
ENGINES = ("none", "ngram", "eagle3")
EAGLE3_DRAFT_VOCAB = 16384
PYSPY_RATE = 200  # samples per second per process
PHASES = {  # (module, class, method) -> label; wrapped after the engine starts (single-process layout only)
    ("vllm.v1.core.sched.scheduler", "Scheduler", "schedule"): "scheduler: schedule",
    ("vllm.v1.core.sched.scheduler", "Scheduler", "update_from_output"): "scheduler: update from output",
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "_prepare_inputs"): "runner: prepare inputs",
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "_model_forward"): "target forward",
    ("vllm.model_executor.layers.logits_processor", "LogitsProcessor", "forward"): "logits",
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "_sample"): "sampling / rejection sampling",
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "propose_draft_token_ids"): "proposer",
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "_bookkeeping_sync"): "runner: bookkeeping",
}
# Layer types inside those phases (mostly "target forward" and EAGLE-3's "proposer"), recorded per phase. The
# blocks nest: an attention block holds its linear layers and the attention kernel.
LAYERS = {
    ("vllm.model_executor.layers.vocab_parallel_embedding", "VocabParallelEmbedding", "forward"): "embedding",
    ("vllm.model_executor.models.llama", "LlamaAttention", "forward"): "attention block",
    ("vllm.model_executor.layers.attention.attention", "Attention", "forward"): "attention kernel",
    ("vllm.model_executor.models.llama", "LlamaMLP", "forward"): "MLP block",
    ("vllm.model_executor.layers.linear", "ColumnParallelLinear", "forward"): "linear layers",
    ("vllm.model_executor.layers.linear", "RowParallelLinear", "forward"): "linear layers",
    ("vllm.model_executor.layers.layernorm", "RMSNorm", "forward"): "RMSNorm",
}


# Engine settings tried against lk-vllm's defaults (the in-process rows of the same run), for no speculation and
# n-gram. Allocators are preloaded from the system's library directory where installed.
SWEEP_ENGINES = ("none", "ngram")
ALLOCATORS = {"tcmalloc": "libtcmalloc*.so*", "jemalloc": "libjemalloc.so*"}


def _system_library(pattern: str) -> str | None:
    import glob

    found = sorted(glob.glob(f"/usr/lib/x86_64-linux-gnu/{pattern}") + glob.glob(f"/usr/lib/{pattern}"))
    return found[0] if found else None


def sweep_variants() -> dict[str, tuple[dict[str, str], str | None]]:
    """The settings this machine can run, name -> (extra environment, dtype); sweep_skipped says the others."""
    from lk_vllm.engine import cpu_has_native_bf16

    variants: dict[str, tuple[dict[str, str], str | None]] = {}
    iomp = Path(sys.prefix) / "lib" / "libiomp5.so"  # what vLLM's CPU worker asks for in its start-up warning
    if iomp.is_file():
        variants["libiomp5 (Intel OpenMP)"] = ({"LD_PRELOAD": str(iomp)}, None)
    for name, pattern in ALLOCATORS.items():
        library = _system_library(pattern)
        if library:
            variants[name] = ({"LD_PRELOAD": library}, None)
    if cpu_has_native_bf16():  # the defaults run bf16 here (lk_vllm.engine.cpu_default_dtype): try fp32
        variants["float32"] = ({}, "float32")
    variants["1 OpenMP thread"] = ({"OMP_NUM_THREADS": "1"}, None)
    return variants


def sweep_skipped() -> list[str]:
    """The settings not tried here, and why."""
    from lk_vllm.engine import cpu_has_native_bf16

    skipped = [
        f"{name}: not installed on this machine"
        for name, pattern in ALLOCATORS.items()
        if not _system_library(pattern)
    ]
    if not cpu_has_native_bf16():
        skipped.append(
            "bfloat16: this CPU has no native bf16 math (no avx512_bf16 / amx_bf16), so lk-vllm "
            "refuses it (vLLM would emulate it); the defaults run float32"
        )
    return skipped


def fresh_eagle3(target: str) -> str:
    """An untrained EAGLE-3 drafter for ``target`` under LK_VLLM_HOME (built once), with the draft vocabulary of
    the reproduction's recipe (training/recipes/smollm2-eagle3.yaml), which sets the drafter's lm_head cost."""
    import torch

    from lk_vllm.assets import lk_home
    from lk_vllm.drafters import create_drafter
    from lk_vllm.drafters.base import target_info
    from lk_vllm.target_model import TargetModel

    directory = lk_home() / "cache" / f"cpu-spec-step-eagle3-v{EAGLE3_DRAFT_VOCAB}"
    if not (directory / "config.json").is_file():
        model = TargetModel(target)
        drafter = create_drafter("eagle3", model, draft_to_target=torch.arange(EAGLE3_DRAFT_VOCAB))
        drafter.save_pretrained(directory, target=target_info(model))
    return str(directory)


def speculative_config(engine: str, eagle3: str | None) -> dict | None:
    from lk_vllm.drafters import speculative_config_for
    from serving.demo import NGRAM_CONFIG

    if engine == "ngram":
        return dict(NGRAM_CONFIG)
    if engine == "eagle3":
        return speculative_config_for(eagle3, 3)
    return None


def install_phase_timers(totals: dict, counts: collections.Counter) -> None:
    """Wrap PHASES and LAYERS; a layer's time goes to "<enclosing phase> / <layer>"."""
    import importlib

    active: list[str] = []  # the phases being run, innermost last

    def wrap(key: tuple, label: str, is_phase: bool) -> None:
        module, cls_name, method = key
        cls = getattr(importlib.import_module(module), cls_name)
        original = getattr(cls, method)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            name = label if is_phase else f"{active[-1] if active else 'outside phases'} / {label}"
            if is_phase:
                active.append(label)
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                totals[name] += time.perf_counter() - start
                counts[name] += 1
                if is_phase:
                    active.pop()

        setattr(cls, method, timed)

    for key, label in PHASES.items():
        wrap(key, label, is_phase=True)
    for key, label in LAYERS.items():
        wrap(key, label, is_phase=False)


def start_sampler(raw_path: str) -> subprocess.Popen:
    """py-spy sampling this process and its children (the EngineCore) without pausing them, into ``raw_path``
    (collapsed stacks); waits until it has attached."""
    import shutil

    binary = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    sampler = subprocess.Popen(
        [
            binary,
            "record",
            "--pid",
            str(os.getpid()),
            "--subprocesses",
            "--nonblocking",
            "--format",
            "raw",
            "--rate",
            str(PYSPY_RATE),
            "--output",
            raw_path,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(3)  # py-spy attaches to every process of the tree
    if sampler.poll() is not None:
        raise SystemExit(f"py-spy did not start: {sampler.stderr.read().strip()}")
    return sampler


def stop_sampler(sampler: subprocess.Popen) -> None:
    import signal

    sampler.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
    sampler.wait(timeout=120)


def run_one(args: argparse.Namespace) -> dict:
    """One engine in this process: time every step of every request (the --one mode)."""
    from vllm import SamplingParams

    from lk_vllm.datasets import chat_prompt_ids, load_prompts
    from lk_vllm.engine import EngineSettings, make_llm, read_spec_decode_counters, shutdown_llm

    spec = speculative_config(args.one_engine, args.eagle3)
    llm = make_llm(
        EngineSettings(model=args.target, max_num_seqs=1, speculative_config=spec, dtype=args.dtype)
    )
    totals: dict = collections.defaultdict(float)
    counts: collections.Counter = collections.Counter()
    if args.phases:
        install_phase_timers(totals, counts)
    engine = llm.llm_engine
    tokenizer = llm.get_tokenizer()
    prompts = [chat_prompt_ids(tokenizer, p.messages) for p in load_prompts("mtbench", limit=args.limit)]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    llm.generate([{"prompt_token_ids": prompts[0]}], params, use_tqdm=False)  # warm-up, not measured
    totals.clear()
    counts.clear()
    sampler = start_sampler(args.pyspy) if args.pyspy else None
    plain, verify, prefill, tokens, outputs = [], [], [], 0, []
    wall = 0.0
    for number, ids in enumerate(prompts):
        engine.add_request(f"r{number}", {"prompt_token_ids": ids}, params)
        first = True
        drafts = read_spec_decode_counters(llm)["num_drafts"]
        while engine.has_unfinished_requests():
            start = time.perf_counter()
            finished = engine.step()
            seconds = time.perf_counter() - start
            wall += seconds
            before, drafts = (
                drafts,
                read_spec_decode_counters(llm)["num_drafts"],
            )  # read between steps, untimed
            verified = drafts > before
            (prefill if first else verify if verified else plain).append(seconds)
            first = False
            for output in finished:
                if output.finished:
                    tokens += len(output.outputs[0].token_ids)
                    outputs.append(list(output.outputs[0].token_ids))
    if sampler is not None:
        stop_sampler(sampler)
    counters = read_spec_decode_counters(llm)
    shutdown_llm(llm)
    decode_steps = len(plain) + len(verify)
    result = {
        "layout": args.one_layout,
        "engine": args.one_engine,
        "speculative_config": spec,
        "output_tokens": tokens,
        "seconds": wall,
        "tokens_per_second": tokens / wall,
        "decode_steps": decode_steps,
        "prefill_steps": len(prefill),
        "tokens_per_decode_step": (tokens - len(prefill)) / decode_steps if decode_steps else None,
        "plain_step_ms": 1e3 * statistics.median(plain) if plain else None,
        "verify_step_ms": 1e3 * statistics.median(verify) if verify else None,
        "verify_steps": len(verify),
        "acceptance_length": (
            1 + counters["num_accepted_tokens"] / counters["num_drafts"] if counters["num_drafts"] else None
        ),
        "token_ids": outputs,
    }
    if args.phases:
        result["phases_ms_per_step"] = {
            label: 1e3 * totals[label] / (decode_steps + len(prefill)) for label in totals
        }
        result["step_ms_mean"] = 1e3 * wall / (decode_steps + len(prefill))
    return result


def spawn(
    args: argparse.Namespace,
    layout: str,
    engine: str,
    phases: bool = False,
    variant: str | None = None,
) -> dict:
    argv = [
        sys.executable,
        __file__,
        "--one",
        layout,
        engine,
        "--limit",
        str(args.limit),
        "--max-tokens",
        str(args.max_tokens),
        "--target",
        args.target,
    ]
    if args.eagle3:
        argv += ["--eagle3", args.eagle3]
    if phases:
        argv.append("--phases")
    extra_env, dtype = args.variants[variant] if variant else ({}, None)
    if dtype:
        argv += ["--dtype", dtype]
    env = {**os.environ, **LAYOUTS[layout], **extra_env}
    key = json.dumps([layout, engine, phases, variant])
    done_runs = _partial(args)
    if key in done_runs:
        return done_runs[key]
    print(
        f"[cpu-spec-step] {layout} / {engine}{' (phases)' if phases else ''}{f' ({variant})' if variant else ''}",
        file=sys.stderr,
        flush=True,
    )
    done = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    if done.returncode != 0:
        raise SystemExit(
            f"cpu_spec_step: {layout}/{engine} failed (exit {done.returncode}); rerun it alone: "
            + " ".join(argv)
        )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["variant"] = variant
    with open(_partial_path(args), "a") as partial:  # a killed run resumes from here
        partial.write(json.dumps({"key": key, "result": result}) + "\n")
    return result


def _partial_path(args: argparse.Namespace) -> Path:
    return Path(args.output).with_suffix(".partial.jsonl")


def _partial(args: argparse.Namespace) -> dict:
    path = _partial_path(args)
    if not path.is_file():
        return {}
    return {entry["key"]: entry["result"] for entry in map(json.loads, path.read_text().splitlines())}


def summarise(runs: list[dict], phase_runs: list[dict], sweep_runs: list[dict]) -> dict:
    by = {(r["layout"], r["engine"]): r for r in runs}
    vllm_layout = by.get(("worker-process", "none"))  # absent when --layout left it out
    rows = []
    for run in runs:
        base = by[(run["layout"], "none")]
        row = {k: v for k, v in run.items() if k != "token_ids"}
        row["speedup"] = run["tokens_per_second"] / base["tokens_per_second"]
        row["vs_worker_process_plain"] = (
            run["tokens_per_second"] / vllm_layout["tokens_per_second"] if vllm_layout else None
        )
        row["plain_decode_step_ms"] = base["plain_step_ms"]
        cost = run["verify_step_ms"] / base["plain_step_ms"] if run["verify_step_ms"] else None
        row["verify_step_cost"] = cost  # verify step / plain decode step of the same layout
        row["same_tokens_as_no_speculation"] = run["token_ids"] == base["token_ids"]
        rows.append(row)
    phases = [
        {
            "engine": r["engine"],
            "step_ms_mean": r["step_ms_mean"],
            "phases_ms_per_step": r["phases_ms_per_step"],
        }
        for r in phase_runs
    ]
    sweep = []
    engines = list(dict.fromkeys(r["engine"] for r in sweep_runs))
    sweep_rows = [by[("in-process", e)] | {"variant": "lk-vllm defaults"} for e in engines] + sweep_runs
    plain = {r["variant"]: r for r in sweep_rows if r["engine"] == "none"}  # no speculation, same setting
    for run in sweep_rows:
        default = by[("in-process", run["engine"])]
        base = plain.get(run["variant"], run)
        sweep.append(
            {
                "variant": run["variant"],
                "engine": run["engine"],
                "tokens_per_second": run["tokens_per_second"],
                "vs_defaults": run["tokens_per_second"] / default["tokens_per_second"],
                "plain_step_ms": base["plain_step_ms"],  # the no-speculation engine's decode step
                "verify_step_ms": run["verify_step_ms"],
                "verify_step_cost": (
                    run["verify_step_ms"] / base["plain_step_ms"]
                    if run["verify_step_ms"] and base["plain_step_ms"]
                    else None
                ),
                "speedup": run["tokens_per_second"] / base["tokens_per_second"],
                "acceptance_length": run["acceptance_length"],
                "same_tokens_as_defaults": run["token_ids"] == default["token_ids"],
                "same_tokens_as_no_speculation": run["token_ids"] == base["token_ids"],
            }
        )
    return {"rows": rows, "phases": phases, "sweep": sweep}


def num(value, digits: int = 2) -> str:
    """A table cell: the number rounded, or "-" when it was not measured."""
    return "-" if value is None else f"{value:.{digits}f}"


def write_page(document: dict, out: Path) -> None:
    from lk_vllm.atomic import write_atomic

    rows = document["rows"]
    lines = [
        f"# CPU speculative step cost ({document['hardware']})",
        "",
        f"`{document['command']}` ({document['created']}, vLLM {document['vllm_version']}). Batch 1, T=0, "
        f"{document['settings']['limit']} MT-Bench prompts, {document['settings']['max_tokens']} tokens "
        "each, one engine at a time. Step times are medians of `LLMEngine.step` in the caller (IPC "
        "included); verify step = a step that checked a draft; cost = verify step / plain decode step of "
        "the same layout.",
        "",
        "| layout | engine | tokens/s | speedup | vs vLLM layout, no spec | plain step ms | verify step ms | "
        "verify cost | tokens / step | acceptance length | verify steps | same tokens |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    for r in rows:
        step = r["plain_step_ms"] if r["engine"] == "none" else r["plain_decode_step_ms"]
        lines.append(
            f"| {r['layout']} | {r['engine']} | {num(r['tokens_per_second'], 1)} | {num(r['speedup'])}x | "
            f"{num(r['vs_worker_process_plain'])}{'x' if r['vs_worker_process_plain'] else ''} | {num(step, 1)} | {num(r['verify_step_ms'], 1)} | "
            f"{num(r['verify_step_cost'])} | {num(r['tokens_per_decode_step'])} | "
            f"{num(r['acceptance_length'])} | {r['verify_steps']}/{r['decode_steps']} | "
            f"{'yes' if r['same_tokens_as_no_speculation'] else 'NO'} |"
        )
    if document["phases"]:
        labels = list(dict.fromkeys(k for p in document["phases"] for k in p["phases_ms_per_step"]))
        lines += [
            "",
            "## Per-phase profile (single-process layout, ms per engine step, mean)",
            "",
            "| phase | " + " | ".join(p["engine"] for p in document["phases"]) + " |",
            "|---|" + "---|" * len(document["phases"]),
        ]
        phases = [label for label in labels if " / " not in label]
        for phase in phases + ["outside phases"]:
            layers = [label for label in labels if label.startswith(phase + " / ")]
            for label in ([phase] if phase in phases else []) + layers:
                name = label if label == phase else "&nbsp;&nbsp;" + label.split(" / ", 1)[1]
                lines.append(
                    f"| {name} | "
                    + " | ".join(num(p["phases_ms_per_step"].get(label)) for p in document["phases"])
                    + " |"
                )
        lines.append(
            "| whole step (caller) | " + " | ".join(num(p["step_ms_mean"]) for p in document["phases"]) + " |"
        )
    if document.get("sweep"):
        lines += [
            "",
            "## Engine settings against lk-vllm's defaults (in-process layout, same run)",
            "",
            "| setting | engine | tokens/s | vs defaults | speedup | plain step ms | verify step ms | verify cost | "
            "acceptance length | same tokens as defaults | same tokens as no spec |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in document["sweep"]:
            lines.append(
                f"| {r['variant']} | {r['engine']} | {num(r['tokens_per_second'], 1)} | "
                f"{num(r['vs_defaults'])}x | {num(r.get('speedup'))}x | {num(r['plain_step_ms'], 1)} | "
                f"{num(r['verify_step_ms'], 1)} | {num(r.get('verify_step_cost'))} | "
                f"{num(r.get('acceptance_length'))} | {'yes' if r['same_tokens_as_defaults'] else 'NO'} | "
                f"{'yes' if r.get('same_tokens_as_no_speculation', True) else 'NO'} |"
            )
        lines += [""] + [f"- not tried: {reason}" for reason in document.get("sweep_skipped", [])]
    lines += ["", document.get("commentary", ""), ""]
    write_atomic(out.with_suffix(".md"), "\n".join(lines))
    write_atomic(out.with_suffix(".json"), json.dumps(document, indent=1) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for layout, marker in zip(LAYOUTS, "osD", strict=True):
        points = [r for r in rows if r["layout"] == layout and r["engine"] != "none"]
        ax.scatter(
            [r["tokens_per_decode_step"] for r in points],
            [r["speedup"] for r in points],
            marker=marker,
            label=layout,
        )
        for r in points:
            ax.annotate(r["engine"], (r["tokens_per_decode_step"], r["speedup"]), fontsize=8)
    top = max([r["tokens_per_decode_step"] for r in rows] + [2.0]) * 1.1
    for cost in (1.0, 1.5, 3.0):
        ax.plot([1, top], [1 / cost, top / cost], linestyle=":", linewidth=1, color="grey")
        ax.annotate(f"step cost {cost:g}x", (top, top / cost), fontsize=7, color="grey", ha="right")
    ax.set_xlabel("tokens per decode step (acceptance length over all steps)")
    ax.set_ylabel("speedup over no speculation, same layout")
    ax.set_title("Batch 1, T=0, default target on CPU")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--target", default=None)
    parser.add_argument("--eagle3", default=None, help="an EAGLE-3 drafter directory (default: a fresh one)")
    parser.add_argument("--layout", action="append", choices=list(LAYOUTS), default=None)
    parser.add_argument(
        "--variant",
        action="append",
        default=None,
        help="a setting of the sweep to run (repeatable; default: every one this machine can run)",
    )
    parser.add_argument(
        "--sweep-engine",
        action="append",
        choices=ENGINES,
        default=None,
        help=f"engines the sweep runs each setting with (repeatable; default: {', '.join(SWEEP_ENGINES)})",
    )
    parser.add_argument("--no-phases", action="store_true", help="skip the single-process per-phase pass")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "cpu-spec-step"))
    parser.add_argument(
        "--render",
        action="store_true",
        help="rewrite the .md and .png from the existing .json (with --commentary: add it)",
    )
    parser.add_argument("--commentary", default=None, metavar="FILE", help="markdown to put under the tables")
    parser.add_argument("--one", nargs=2, metavar=("LAYOUT", "ENGINE"), help=argparse.SUPPRESS)
    parser.add_argument("--phases", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--pyspy", default=None, metavar="RAW", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.render:
        document = json.loads(Path(args.output).with_suffix(".json").read_text())
        if args.commentary:
            document["commentary"] = Path(args.commentary).read_text().strip()
        write_page(document, Path(args.output))
        return 0
    from lk_vllm.assets import resolve_target

    args.target = resolve_target(args.target)
    if args.one:
        args.one_layout, args.one_engine = args.one
        print(json.dumps(run_one(args)))
        return 0
    from lk_vllm.engine import vllm_version
    from lk_vllm.plugin.server.speedup import hardware_id

    args.eagle3 = args.eagle3 or fresh_eagle3(args.target)
    layouts = args.layout or list(LAYOUTS)
    args.variants = sweep_variants()  # what this machine can run, looked up once
    variants = args.variant or list(args.variants)
    unknown = sorted(set(variants) - set(args.variants))
    if unknown:
        raise SystemExit(
            f"--variant: expected one of {', '.join(args.variants)} (what this machine can run), "
            f"found {', '.join(unknown)}"
        )
    sweep_engines = args.sweep_engine or list(SWEEP_ENGINES)
    runs = [spawn(args, layout, engine) for layout in layouts for engine in ENGINES]
    phase_runs = (
        [] if args.no_phases else [spawn(args, "single-process", engine, phases=True) for engine in ENGINES]
    )
    sweep_runs = (
        [
            spawn(args, "in-process", engine, variant=variant)
            for variant in variants
            for engine in sweep_engines
        ]
        if "in-process" in layouts
        else []
    )
    command = "python benchmarks/cpu_spec_step.py " + " ".join(sys.argv[1:])
    document = {
        "name": "cpu-spec-step",
        "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": command.strip(),
        "hardware": hardware_id(),
        "vllm_version": vllm_version(),
        "settings": {
            "limit": args.limit,
            "max_tokens": args.max_tokens,
            "target": args.target,
            "eagle3": args.eagle3,
            "layouts": layouts,
        },
        "sweep_skipped": sweep_skipped(),
        **summarise(runs, phase_runs, sweep_runs),
    }
    write_page(document, Path(args.output))
    _partial_path(args).unlink(missing_ok=True)
    print(f"[cpu-spec-step] wrote {args.output}.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
