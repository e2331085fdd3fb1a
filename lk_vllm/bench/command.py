"""``lk-vllm bench``: the command line over workloads, contenders, runner, metrics and report."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from lk_vllm import __version__
from lk_vllm.assets import resolve_target, target_fingerprint
from lk_vllm.bench.contenders import BASELINE, config_contender, drafter_contender, drafter_labels
from lk_vllm.bench.metrics import build_records
from lk_vllm.bench.report import write_results
from lk_vllm.bench.runner import Plan, engine_settings, measure
from lk_vllm.bench.workloads import DEFAULT_DATASETS, add_workload_arguments, load_workloads
from lk_vllm.datasets import load_tokenizer
from lk_vllm.engine import (
    EngineSettings,
    add_engine_arguments,
    apply_engine_env,
    engine_arguments,
    settings_from_args,
)
from lk_vllm.errors import UserError, require_at_least
from lk_vllm.log import log
from lk_vllm.plugin.server.speedup import hardware_id
from lk_vllm.targets import TargetShape, add_target_argument, check_target, serving_problem

DEFAULT_TEMPERATURES = (0.0, 1.0)
DEFAULT_CONCURRENCIES = (1, 8)
DEFAULT_OUT_DIR = "benchmarks/results"

METHOD = {
    "engines": "one vLLM engine per row group (the baseline, then each drafter), started and shut down in turn; "
    "identical engine settings except the speculative config",
    "drafting": "drafter configs as `lk-vllm serve` runs them: standard rejection sampling; at T>0 drafts sampled "
    "from the drafter's distribution (greedy for Medusa heads), at T=0 greedy drafts",
    "concurrency": "closed loop: c requests in flight while prompts remain (c=1 is batch 1, one request after "
    "another); max_num_seqs = the largest concurrency",
    "sampling": "prompts tokenized with the target's chat template; at T>0 request i samples with seed + i, the "
    "same for every engine",
    "acceptance": "acceptance length = 1 + accepted / drafts and per-position acceptance = accepted at position k "
    "/ drafts, from vLLM's speculative-decoding counters of the cell (pooled over its steps); "
    "'per-request mean' = the mean over the cell's requests of each one's own 1 + accepted / drafts "
    "(vLLM's per-request metrics; SpecForge's statistic); T=0 is temperature_0, T>0 sampled",
    "throughput": "tokens/s = output tokens / wall time from the first request's submission to the last one's "
    "completion (after a warm-up; prefix cache emptied before each cell); speedup = tokens/s / the "
    "baseline's tokens/s for the same dataset, temperature and concurrency in the same run",
    "training-time": "training-time expected acceptance length from the drafter's lk_training.json: its "
    "eval data of the row's dataset and temperature when it has some, else its held-out training samples "
    "(training_expected_source says which; T=0: top-1 agreement, T=1: alpha); gap % = (served - expected) / "
    "expected",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--drafter",
        action="append",
        default=[],
        metavar="DIR",
        help="drafter checkpoint directory to benchmark (repeatable)",
    )
    parser.add_argument(
        "--speculative-config",
        action="append",
        default=[],
        metavar="[LABEL=]JSON",
        help="a vLLM speculative config that needs no drafter, e.g. "
        '\'{"method": "ngram", "prompt_lookup_max": 3}\' (repeatable; K defaults to '
        "--num-speculative-tokens, the label to METHOD-kK)",
    )
    add_target_argument(parser)
    add_workload_arguments(parser)
    parser.add_argument(
        "--temperature",
        action="append",
        type=float,
        default=None,
        help="sampling temperature (repeatable; default 0 and 1)",
    )
    parser.add_argument(
        "--concurrency",
        action="append",
        type=int,
        default=None,
        help="requests in flight (repeatable; default 1 and 8; 1 = batch 1)",
    )
    parser.add_argument("--name", default=None, help="results file name (default bench-<date>-<time>)")
    parser.add_argument(
        "--out-dir", default=DEFAULT_OUT_DIR, help=f"results directory (default {DEFAULT_OUT_DIR})"
    )
    parser.add_argument(
        "--no-baseline", action="store_true", help="skip the no-speculation run (then there is no speedup)"
    )
    parser.add_argument(
        "--json", action="store_true", help="print the results document as one JSON object on stdout"
    )
    add_engine_arguments(parser)  # its --seed also seeds the requests at T>0


def _unique(values):
    return tuple(dict.fromkeys(values))


def _check_flags(args: argparse.Namespace) -> None:
    require_at_least("--num-speculative-tokens", args.num_speculative_tokens)
    require_at_least("--max-tokens", args.max_tokens)
    if args.limit is not None:
        require_at_least("--limit", args.limit)
    for t in args.temperature or ():
        if not t >= 0:
            raise UserError(f"--temperature must be >= 0, got {t}")
    for c in args.concurrency or ():
        require_at_least("--concurrency", c)
    if args.no_baseline and not args.drafter and not args.speculative_config:
        raise UserError("nothing to benchmark: --no-baseline and no --drafter or --speculative-config")
    if args.name is not None and (not args.name or "/" in args.name or args.name.startswith(".")):
        raise UserError(
            f"--name must be a plain file name (no '/', not starting with '.'), got {args.name!r}"
        )


def prepare(args: argparse.Namespace):
    """Check every input and build (plan, contenders, engine settings); nothing starts an engine here."""
    _check_flags(args)
    apply_engine_env()  # offline hub access for the tokenizer and config reads below
    target = resolve_target(args.target)
    shape = TargetShape.read(target)
    k = args.num_speculative_tokens
    labels = drafter_labels(args.drafter)
    contenders = [] if args.no_baseline else [BASELINE]
    for value in args.speculative_config:
        contenders.append(config_contender(value, k, [c.label for c in contenders] + labels))
    contenders += [
        drafter_contender(d, label, shape, k) for d, label in zip(args.drafter, labels, strict=True)
    ]
    check_target(target, needs_chat_template=not args.chat_template)
    for contender in contenders:
        problem = serving_problem(shape, contender.architecture)
        if problem:
            raise UserError(f"{contender.label}: {problem}")
    workloads = load_workloads(
        list(_unique(args.dataset or DEFAULT_DATASETS)),
        args.limit,
        load_tokenizer(target, args.chat_template),
    )
    plan = Plan(
        workloads=tuple(workloads),
        temperatures=_unique(float(t) for t in (args.temperature or DEFAULT_TEMPERATURES)),
        concurrencies=_unique(args.concurrency or DEFAULT_CONCURRENCIES),
        num_speculative_tokens=k,
        max_tokens=args.max_tokens,
        seed=args.seed,
    )
    settings = settings_from_args(args, target)
    if plan.max_model_len() > settings.max_model_len:
        log(f"--max-model-len raised to {plan.max_model_len()} (longest prompt + --max-tokens + K + 1)")
        settings.max_model_len = plan.max_model_len()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not os.access(out_dir, os.W_OK):
        raise UserError(f"--out-dir {out_dir}: not writable")
    return plan, contenders, settings


def execute(plan, contenders, settings: EngineSettings) -> dict[str, dict]:
    """Measure every contender in turn (one engine at a time); return label -> cell -> Measurement."""
    from tqdm import tqdm

    results = {}
    per_contender = plan.num_requests()
    with tqdm(
        total=per_contender * len(contenders), unit="req", file=sys.stderr, dynamic_ncols=True
    ) as progress:
        for number, contender in enumerate(contenders, start=1):
            progress.set_description(f"{contender.label} ({number}/{len(contenders)})")
            progress.set_postfix_str("starting vLLM")

            def finished(cell):
                progress.set_postfix_str(
                    f"{cell.dataset} T={cell.temperature:g} c={cell.concurrency}", refresh=False
                )
                progress.update()

            results[contender.label] = measure(
                engine_settings(settings, plan, contender),
                plan,
                finished,
                on_ready=lambda: progress.set_postfix_str("warm-up"),
            )
    return results


def build_document(
    plan, contenders, settings: EngineSettings, results, name: str, command: str
) -> dict[str, Any]:
    from lk_vllm.engine import vllm_version

    records, overall = build_records(plan, contenders, results)
    engine = engine_settings(settings, plan, BASELINE).llm_kwargs()
    target = engine.pop("model")
    return {
        "name": name,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command,
        "target": target,
        "target_fingerprint": target_fingerprint(target) if Path(target).is_dir() else None,
        "hardware": hardware_id(),
        "vllm_version": vllm_version(),
        "lk_vllm_version": __version__,
        "settings": {
            "datasets": [w.dataset for w in plan.workloads],
            "limit": min(len(w.prompt_ids) for w in plan.workloads) if plan.workloads else None,
            "temperatures": list(plan.temperatures),
            "concurrencies": list(plan.concurrencies),
            "num_speculative_tokens": plan.num_speculative_tokens,
            "max_tokens": plan.max_tokens,
            "seed": plan.seed,
            "engine": engine,
        },
        "drafters": [c.describe() for c in contenders],
        "method": METHOD,
        "records": records,
        "overall": overall,
    }


def command_line(args: argparse.Namespace, plan, settings: EngineSettings, name: str) -> str:
    """The command that repeats this run, every default spelled out (engine flags as resolved)."""
    argv = ["lk-vllm", "bench"]
    for value in args.speculative_config:
        argv += ["--speculative-config", value]
    for drafter in args.drafter:
        argv += ["--drafter", drafter]
    argv += ["--target", settings.model]
    for workload in plan.workloads:
        argv += ["--dataset", workload.dataset]
    argv += ["--limit", str(args.limit)]
    if args.chat_template:
        argv += ["--chat-template", args.chat_template]
    for temperature in plan.temperatures:
        argv += ["--temperature", f"{temperature:g}"]
    for concurrency in plan.concurrencies:
        argv += ["--concurrency", str(concurrency)]
    argv += [
        "--num-speculative-tokens",
        str(plan.num_speculative_tokens),
        "--max-tokens",
        str(plan.max_tokens),
    ]
    argv += ["--name", name, "--out-dir", args.out_dir] + (["--no-baseline"] if args.no_baseline else [])
    return shlex.join(argv + engine_arguments(settings))


def run(args: argparse.Namespace) -> int:
    started = time.time()
    plan, contenders, settings = prepare(args)
    name = args.name or f"bench-{time.strftime('%Y%m%d-%H%M%S')}"
    log(f"{len(contenders)} engine(s) x {plan.num_requests()} requests on {settings.model}")
    results = execute(plan, contenders, settings)
    command = command_line(args, plan, settings, name)
    document = build_document(plan, contenders, settings, results, name, command)
    paths = write_results(document, args.out_dir, name)
    log(f"done in {time.time() - started:.0f} s: {', '.join(str(p) for p in paths.values())}")
    if args.json:
        print(json.dumps(document))
    else:
        for r in document["overall"]:
            al = "-" if r["acceptance_length"] is None else f"{r['acceptance_length']:.2f}"
            means = r.get("acceptance_length_mean_of_request_means")
            per_request = "-" if means is None else f"{means:.2f}"
            speedup = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
            print(
                f"{r['drafter']:<24} T={r['temperature']:<4g} c={r['concurrency']:<3d} acceptance length pooled "
                f"{al:>5} per-request mean {per_request:>5} ({r.get('sampling', '-')})  "
                f"{r['tokens_per_s']:7.1f} tokens/s  speedup {speedup}"
            )
        print(f"results: {paths['md']}")
    return 0
