"""Where a batch-1 step's CPU time goes in both of vLLM's processes, sampled by py-spy:
benchmarks/results/cpu-spec-step-pyspy.{json,md}.

    python benchmarks/cpu_spec_step_pyspy.py [--limit 4] [--max-tokens 96] [--eagle3 DIR]

lk-vllm's default CPU layout (in-process: the model runs inside the EngineCore), batch 1, T=0, MT-Bench
prompts, for no speculation, vLLM's n-gram drafter (K=4) and EAGLE-3 (K=3; --eagle3, default: the installed
default drafter). Each engine runs in its own process (``cpu_spec_step.py --one``); after its warm-up, py-spy
(``record --subprocesses --nonblocking``, 200 Hz per process, idle threads not sampled) samples the caller and
the EngineCore until the last request ends. A sample goes to the first phase whose pattern occurs in its stack
(RULES, innermost phase first), and a phase's time per engine step = its samples / 200 Hz / engine steps.
Busy-waiting counts as time: a process spinning on a queue is on a core.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from cpu_spec_step import ENGINES, LAYOUTS, PYSPY_RATE  # noqa: E402

# (phase, substrings of a py-spy frame "function (file:line)"); the first rule matching any frame wins, so the
# drafter's own forward and logits count as "proposer".
RULES = (
    ("proposer", ("propose",)),
    ("rejection sampling", ("rejection_sampler",)),
    ("sampling", ("sample/sampler.py", "_sample (")),
    ("logits", ("compute_logits",)),
    ("target forward", ("_model_forward", "models/llama.py")),
    ("runner: prepare inputs", ("_prepare_inputs", "_update_states", "_prepare_input_ids")),
    ("runner: other", ("model_runner.py",)),
    ("scheduler", ("core/sched/",)),
    ("output processing / detokenise", ("output_processor", "detokenizer", "logprobs")),
    (
        "IPC / serialisation / queues",
        (
            "serial_utils",
            "msgspec",
            "msgpack",
            "zmq",
            "shm_",
            "process_input_sockets",
            "process_output_sockets",
            "get_output",
            "queue.py",
            "_process_input_queue",
        ),
    ),
    ("engine step loop", ("engine/core.py", "llm_engine.py", "core_client.py")),
)
OTHER = "other"


def classify(frames: list[str]) -> str:
    for phase, patterns in RULES:
        if any(pattern in frame for frame in frames for pattern in patterns):
            return phase
    return OTHER


def parse_raw(path: Path) -> dict[str, dict]:
    """process role -> {"phases": Counter of samples, "other_leaves": Counter}, from py-spy's raw format."""
    roles: dict[str, dict] = {}
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        # --subprocesses: the caller's "process PID:cmdline" frame, then the child's for the EngineCore's samples
        role = "EngineCore" if len(frames) > 1 and frames[1].startswith("process ") else "caller"
        frames = [f for f in frames if not f.startswith("process ")]
        entry = roles.setdefault(
            role, {"phases": collections.Counter(), "other_leaves": collections.Counter()}
        )
        phase = classify(frames)
        entry["phases"][phase] += int(count)
        if phase == OTHER:
            entry["other_leaves"][frames[-1] if frames else "(no Python frame)"] += int(count)
    return roles


def run_engine(args: argparse.Namespace, engine: str, workdir: Path) -> dict:
    raw = workdir / f"{engine}.txt"
    argv = [
        sys.executable,
        str(ROOT / "benchmarks" / "cpu_spec_step.py"),
        "--one",
        "in-process",
        engine,
        "--limit",
        str(args.limit),
        "--max-tokens",
        str(args.max_tokens),
        "--pyspy",
        str(raw),
    ]
    if args.target:
        argv += ["--target", args.target]
    if engine == "eagle3":
        argv += ["--eagle3", args.eagle3]
    print(f"[pyspy] {engine}", file=sys.stderr, flush=True)
    env = {**os.environ, **LAYOUTS["in-process"]}
    done = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    if done.returncode != 0:
        raise SystemExit(f"cpu_spec_step_pyspy: {engine} failed (exit {done.returncode}): {' '.join(argv)}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result.pop("token_ids", None)
    steps = result["decode_steps"] + result["prefill_steps"]
    processes = {}
    for role, entry in parse_raw(raw).items():
        phases = {
            phase: 1e3 * samples / PYSPY_RATE / steps for phase, samples in entry["phases"].most_common()
        }
        processes[role] = {
            "ms_per_step": phases,
            "total_ms_per_step": sum(phases.values()),
            "other_leaves": [[leaf, samples] for leaf, samples in entry["other_leaves"].most_common(8)],
        }
    return {
        "engine": engine,
        "run": result,
        "processes": processes,
        "step_ms_mean": 1e3 * result["seconds"] / steps,
    }


def write_page(document: dict, out: Path) -> None:
    out.with_suffix(".json").write_text(json.dumps(document, indent=1) + "\n")
    engines = [r["engine"] for r in document["runs"]]
    lines = [
        f"# Batch-1 step on CPU, both processes, sampled by py-spy ({document['hardware']})",
        "",
        f"`{document['command']}` ({document['created']}, vLLM {document['vllm_version']}). "
        f"{document['settings']['limit']} MT-Bench prompts, {document['settings']['max_tokens']} tokens each, "
        "T=0, in-process layout; EAGLE-3 drafter: " + f"`{document['settings']['eagle3']}`.",
        "",
        "Method: the module docstring of `benchmarks/cpu_spec_step_pyspy.py`. CPU milliseconds per engine "
        "step by phase and process (a process busy-waiting is on a core, so it counts).",
        "",
        "| engine | tokens/s | step ms (wall, caller) | acceptance length |",
        "|---|---|---|---|",
    ]
    for run in document["runs"]:
        r = run["run"]
        al = f"{r['acceptance_length']:.2f}" if r.get("acceptance_length") else "-"
        lines.append(f"| {run['engine']} | {r['tokens_per_second']:.1f} | {run['step_ms_mean']:.1f} | {al} |")
    for role in ("EngineCore", "caller"):
        phases = []
        for run in document["runs"]:
            for phase in run["processes"].get(role, {}).get("ms_per_step", {}):
                if phase not in phases:
                    phases.append(phase)
        lines += [
            "",
            f"## {role} process: CPU ms per engine step",
            "",
            "| phase | " + " | ".join(engines) + " |",
            "|---|" + "---|" * len(engines),
        ]
        for phase in phases:
            cells = [
                run["processes"].get(role, {}).get("ms_per_step", {}).get(phase) for run in document["runs"]
            ]
            lines.append(f"| {phase} | " + " | ".join("-" if c is None else f"{c:.1f}" for c in cells) + " |")
        totals = [run["processes"].get(role, {}).get("total_ms_per_step") for run in document["runs"]]
        lines.append(
            "| **total sampled** | " + " | ".join("-" if t is None else f"**{t:.1f}**" for t in totals) + " |"
        )
    lines += ["", "## Unclassified samples (top leaf frames)", ""]
    for run in document["runs"]:
        for role, process in run["processes"].items():
            leaves = ", ".join(f"`{leaf}` {n}" for leaf, n in process["other_leaves"][:5])
            if leaves:
                lines.append(f"- {run['engine']} / {role}: {leaves}")
    if document.get("commentary"):
        lines += ["", "## What this shows", "", document["commentary"]]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--target", default=None)
    parser.add_argument(
        "--eagle3", default=None, help="an EAGLE-3 drafter directory (default: the default drafter)"
    )
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "cpu-spec-step-pyspy"))
    parser.add_argument(
        "--render", action="store_true", help="rewrite the .md from the .json (with --commentary)"
    )
    parser.add_argument("--commentary", default=None, metavar="FILE")
    args = parser.parse_args()
    out = Path(args.output)
    if args.render:
        document = json.loads(out.with_suffix(".json").read_text())
        if args.commentary:
            document["commentary"] = Path(args.commentary).read_text().strip()
        write_page(document, out)
        return 0
    from lk_vllm.assets import default_drafter_dir
    from lk_vllm.engine import vllm_version
    from lk_vllm.plugin.server.speedup import hardware_id

    args.eagle3 = args.eagle3 or str(default_drafter_dir())
    with tempfile.TemporaryDirectory(prefix="pyspy-") as workdir:
        runs = [run_engine(args, engine, Path(workdir)) for engine in ENGINES]
    document = {
        "name": "cpu-spec-step-pyspy",
        "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": ("python benchmarks/cpu_spec_step_pyspy.py " + " ".join(sys.argv[1:])).strip(),
        "hardware": hardware_id(),
        "vllm_version": vllm_version(),
        "settings": {
            "limit": args.limit,
            "max_tokens": args.max_tokens,
            "eagle3": args.eagle3,
            "rate_hz": PYSPY_RATE,
        },
        "runs": runs,
    }
    write_page(document, out)
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
