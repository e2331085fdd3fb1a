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


def fresh_eagle3(target: str) -> str:
    """An untrained EAGLE-3 drafter for ``target`` under LK_VLLM_HOME (built once), with the draft vocabulary of
    the reproduction's recipe (training/recipes/smollm2-eagle3.yaml), which sets the drafter's lm_head cost."""
    import torch

    from lk_vllm.assets import lk_home
    from lk_vllm.drafters import create_drafter
    from lk_vllm.drafters.base import target_info
    from training.target import TargetModel

    directory = lk_home() / "cache" / f"cpu-spec-step-eagle3-v{EAGLE3_DRAFT_VOCAB}"
    if not (directory / "config.json").is_file():
        model = TargetModel(target)
        drafter = create_drafter("eagle3", model, draft_to_target=torch.arange(EAGLE3_DRAFT_VOCAB))
        drafter.save_pretrained(directory, target=target_info(model))
    return str(directory)


def speculative_config(engine: str, eagle3: str | None) -> dict | None:
    from lk_vllm.demo import NGRAM_CONFIG
    from lk_vllm.drafters import speculative_config_for

    if engine == "ngram":
        return dict(NGRAM_CONFIG)
    if engine == "eagle3":
        return speculative_config_for(eagle3, 3)
    return None


def install_phase_timers(totals: dict, counts: collections.Counter) -> None:
    import importlib

    for (module, cls_name, method), label in PHASES.items():
        cls = getattr(importlib.import_module(module), cls_name)
        original = getattr(cls, method)

        @functools.wraps(original)
        def timed(*args, _original=original, _label=label, **kwargs):
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                totals[_label] += time.perf_counter() - start
                counts[_label] += 1

        setattr(cls, method, timed)


def run_one(args: argparse.Namespace) -> dict:
    """One engine in this process: time every step of every request (the --one mode)."""
    from vllm import SamplingParams

    from lk_vllm.datasets import chat_prompt_ids, load_prompts
    from lk_vllm.engine import EngineSettings, make_llm, read_spec_decode_counters, shutdown_llm

    spec = speculative_config(args.one_engine, args.eagle3)
    llm = make_llm(EngineSettings(model=args.target, max_num_seqs=1, speculative_config=spec))
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
            before, drafts = drafts, read_spec_decode_counters(llm)["num_drafts"]  # read between steps, untimed
            verified = drafts > before
            (prefill if first else verify if verified else plain).append(seconds)
            first = False
            for output in finished:
                if output.finished:
                    tokens += len(output.outputs[0].token_ids)
                    outputs.append(list(output.outputs[0].token_ids))
    counters = read_spec_decode_counters(llm)
    shutdown_llm(llm)
    decode_steps = len(plain) + len(verify)
    result = {
        "layout": args.one_layout, "engine": args.one_engine, "speculative_config": spec,
        "output_tokens": tokens, "seconds": wall, "tokens_per_second": tokens / wall,
        "decode_steps": decode_steps, "prefill_steps": len(prefill),
        "tokens_per_decode_step": (tokens - len(prefill)) / decode_steps if decode_steps else None,
        "plain_step_ms": 1e3 * statistics.median(plain) if plain else None,
        "verify_step_ms": 1e3 * statistics.median(verify) if verify else None,
        "verify_steps": len(verify),
        "acceptance_length": (1 + counters["num_accepted_tokens"] / counters["num_drafts"]
                              if counters["num_drafts"] else None),
        "token_ids": outputs,
    }
    if args.phases:
        result["phases_ms_per_step"] = {label: 1e3 * totals[label] / (decode_steps + len(prefill))
                                        for label in totals}
        result["step_ms_mean"] = 1e3 * wall / (decode_steps + len(prefill))
    return result


def spawn(args: argparse.Namespace, layout: str, engine: str, phases: bool = False) -> dict:
    argv = [sys.executable, __file__, "--one", layout, engine, "--limit", str(args.limit),
            "--max-tokens", str(args.max_tokens), "--target", args.target]
    if args.eagle3:
        argv += ["--eagle3", args.eagle3]
    if phases:
        argv.append("--phases")
    env = {**os.environ, **LAYOUTS[layout]}
    print(f"[cpu-spec-step] {layout} / {engine}{' (phases)' if phases else ''}", file=sys.stderr, flush=True)
    done = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    if done.returncode != 0:
        raise SystemExit(f"cpu_spec_step: {layout}/{engine} failed (exit {done.returncode}); rerun it alone: "
                         + " ".join(argv))
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(runs: list[dict], phase_runs: list[dict]) -> dict:
    by = {(r["layout"], r["engine"]): r for r in runs}
    vllm_plain = by[("worker-process", "none")]["tokens_per_second"]
    rows = []
    for run in runs:
        base = by[(run["layout"], "none")]
        row = {k: v for k, v in run.items() if k != "token_ids"}
        row["speedup"] = run["tokens_per_second"] / base["tokens_per_second"]
        row["vs_worker_process_plain"] = run["tokens_per_second"] / vllm_plain
        row["plain_decode_step_ms"] = base["plain_step_ms"]
        cost = run["verify_step_ms"] / base["plain_step_ms"] if run["verify_step_ms"] else None
        row["verify_step_cost"] = cost  # verify step / plain decode step of the same layout
        row["same_tokens_as_no_speculation"] = run["token_ids"] == base["token_ids"]
        rows.append(row)
    phases = [{"engine": r["engine"], "step_ms_mean": r["step_ms_mean"],
               "phases_ms_per_step": r["phases_ms_per_step"]} for r in phase_runs]
    return {"rows": rows, "phases": phases}


def num(value, digits: int = 2) -> str:
    """A table cell: the number rounded, or "-" when it was not measured."""
    return "-" if value is None else f"{value:.{digits}f}"


def write_page(document: dict, out: Path) -> None:
    from lk_vllm.atomic import write_atomic

    rows = document["rows"]
    lines = [f"# CPU speculative step cost ({document['hardware']})", "",
             f"`{document['command']}` ({document['created']}, vLLM {document['vllm_version']}). Batch 1, T=0, "
             f"{document['settings']['limit']} MT-Bench prompts, {document['settings']['max_tokens']} tokens "
             "each, one engine at a time. Step times are medians of `LLMEngine.step` in the caller (IPC "
             "included); verify step = a step that checked a draft; cost = verify step / plain decode step of "
             "the same layout.", "",
             "| layout | engine | tokens/s | speedup | vs vLLM layout, no spec | plain step ms | verify step ms | "
             "verify cost | tokens / step | acceptance length | verify steps | same tokens |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    for r in rows:
        step = r["plain_step_ms"] if r["engine"] == "none" else r["plain_decode_step_ms"]
        lines.append(f"| {r['layout']} | {r['engine']} | {num(r['tokens_per_second'], 1)} | {num(r['speedup'])}x | "
                     f"{num(r['vs_worker_process_plain'])}x | {num(step, 1)} | {num(r['verify_step_ms'], 1)} | "
                     f"{num(r['verify_step_cost'])} | {num(r['tokens_per_decode_step'])} | "
                     f"{num(r['acceptance_length'])} | {r['verify_steps']}/{r['decode_steps']} | "
                     f"{'yes' if r['same_tokens_as_no_speculation'] else 'NO'} |")
    if document["phases"]:
        labels = list(dict.fromkeys(k for p in document["phases"] for k in p["phases_ms_per_step"]))
        lines += ["", "## Per-phase profile (single-process layout, ms per engine step, mean)", "",
                  "| phase | " + " | ".join(p["engine"] for p in document["phases"]) + " |",
                  "|---|" + "---|" * len(document["phases"])]
        for label in labels:
            lines.append(f"| {label} | " + " | ".join(num(p["phases_ms_per_step"].get(label))
                                                     for p in document["phases"]) + " |")
        lines.append("| whole step (caller) | " + " | ".join(num(p["step_ms_mean"]) for p in document["phases"])
                     + " |")
    lines += ["", document.get("commentary", ""), ""]
    write_atomic(out.with_suffix(".md"), "\n".join(lines))
    write_atomic(out.with_suffix(".json"), json.dumps(document, indent=1) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for layout, marker in zip(LAYOUTS, "osD", strict=True):
        points = [r for r in rows if r["layout"] == layout and r["engine"] != "none"]
        ax.scatter([r["tokens_per_decode_step"] for r in points], [r["speedup"] for r in points], marker=marker,
                   label=layout)
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
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "cpu-spec-step"))
    parser.add_argument("--render", action="store_true",
                        help="rewrite the .md and .png from the existing .json (with --commentary: add it)")
    parser.add_argument("--commentary", default=None, metavar="FILE", help="markdown to put under the tables")
    parser.add_argument("--one", nargs=2, metavar=("LAYOUT", "ENGINE"), help=argparse.SUPPRESS)
    parser.add_argument("--phases", action="store_true", help=argparse.SUPPRESS)
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
    from serving.speedup import hardware_id

    args.eagle3 = args.eagle3 or fresh_eagle3(args.target)
    layouts = args.layout or list(LAYOUTS)
    runs = [spawn(args, layout, engine) for layout in layouts for engine in ENGINES]
    phase_runs = [spawn(args, "single-process", engine, phases=True) for engine in ENGINES]
    command = "python benchmarks/cpu_spec_step.py " + " ".join(sys.argv[1:])
    document = {"name": "cpu-spec-step", "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "command": command.strip(), "hardware": hardware_id(), "vllm_version": vllm_version(),
                "settings": {"limit": args.limit, "max_tokens": args.max_tokens, "target": args.target,
                             "eagle3": args.eagle3, "layouts": layouts},
                **summarise(runs, phase_runs)}
    write_page(document, Path(args.output))
    print(f"[cpu-spec-step] wrote {args.output}.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
