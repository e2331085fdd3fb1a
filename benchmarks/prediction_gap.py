"""How well the trainer predicts served acceptance: benchmarks/results/prediction-gap.{json,md}.

    for t in 0 1; do for ds in mtbench humaneval gsm8k; do
        lk-vllm prepare --split eval --dataset $ds --limit 40 --temperature $t --top-p 1 --max-tokens 96 \
            --max-length 512 --output $LK_VLLM_HOME/data/eval-$ds-40-t$t
    done; done
    python benchmarks/prediction_gap.py --drafter lk_vllm/default_drafter \
        --eval-data $LK_VLLM_HOME/data/eval-{mtbench,humaneval,gsm8k}-40-t{0,1}

The drafter is evaluated on each eval directory with the trainer's own evaluation (``training.train.evaluate``:
teacher-forced per-position alpha and top-1 agreement, the fp32 target), exactly what ``lk-vllm train
--eval-data`` records in ``lk_training.json``; then vLLM serves it on the same prompts at T=0 and T=1 (``lk-vllm
eval --engine vllm``: batch 1, K draft tokens, the eval data's --max-tokens). Each row sets the served acceptance
length beside two predictions, as ``lk-vllm bench`` makes them (``lk_vllm.acceptance``): from the eval data of
its dataset and temperature, and from the drafter's held-out training samples.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_losses import hardware  # noqa: E402

TEMPERATURES = (0.0, 1.0)


def trainer_eval_data(
    drafter_dir: str, eval_dirs: list[str], num_steps: int, batch_size: int = 8
) -> list[dict]:
    """The ``eval_data`` entries ``lk-vllm train --eval-data`` would record for this drafter."""
    from lk_vllm.assets import resolve_target, target_fingerprint
    from lk_vllm.drafters import load_drafter
    from lk_vllm.target_model import TargetModel
    from training.capture import OnlineCapture
    from training.evaluate import recorded_target
    from training.train import evaluate_eval_sets, load_eval_sets

    target_path = resolve_target(recorded_target(drafter_dir))  # as lk-vllm eval resolves it
    target = TargetModel(target_path)
    drafter = load_drafter(drafter_dir, target)
    samples: list = []
    sets = load_eval_sets(eval_dirs, samples, target_fingerprint(target_path), max_length=4096)
    capture = OnlineCapture(target, drafter.aux_layer_ids_needed())
    entries = []
    for eval_set in sets:  # one at a time, to say how far it got
        started = time.time()
        [entry] = evaluate_eval_sets(drafter, capture, samples, [eval_set], num_steps, batch_size)
        print(
            f"{entry['name']}: {entry['expected_acceptance_length_greedy']:.3f} (T=0) "
            f"{entry['expected_acceptance_length']:.3f} (T=1) in {time.time() - started:.0f} s",
            flush=True,
        )
        entries.append(entry)
    return entries


def served(drafter_dir: str, datasets: list[str], limit: int, num_steps: int, max_tokens: int) -> dict:
    """{temperature: run_eval's result} with vLLM serving the drafter on the eval prompts."""
    from training.evaluate import run_eval

    return {
        temperature: run_eval(drafter_dir, None, datasets, limit, "vllm", num_steps, max_tokens, temperature)
        for temperature in TEMPERATURES
    }


def rows(training: dict, eval_data: list[dict], served_runs: dict, num_steps: int) -> list[dict]:
    """One row per dataset (and 'all') and temperature: served, predicted from eval data / held-out, gaps."""
    from lk_vllm.acceptance import eval_data_rates, expected_acceptance_length, heldout_rates

    record = {"eval_data": eval_data}
    out = []
    for temperature, result in served_runs.items():
        held = heldout_rates(training, temperature, num_steps)  # one number for every dataset
        per_dataset = {**result["datasets"], "all": result}
        for dataset, summary in per_dataset.items():
            row = {
                "dataset": dataset,
                "temperature": temperature,
                "served": summary["acceptance_length"],
                "num_drafts": summary["num_drafts"],
            }
            from_eval = eval_data_rates(record, temperature, num_steps, dataset)
            for key, rates in (("eval_data", from_eval and from_eval[0]), ("heldout", held)):
                expected = expected_acceptance_length(rates) if rates else None
                row[f"predicted_{key}"] = expected
                row[f"gap_{key}_percent"] = (
                    100 * (row["served"] - expected) / expected if expected and row["served"] else None
                )
            out.append(row)
    return out


def num(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def signed(value) -> str:
    return "-" if value is None else f"{value:+.1f}"


def write(document: dict, out: Path) -> None:
    from lk_vllm.atomic import write_atomic

    lines = [
        "# Trainer-predicted vs served acceptance length",
        "",
        f"`{document['command']}`",
        "",
        f"- drafter: `{document['drafter']}`; K = {document['num_speculative_tokens']}, up to "
        f"{document['max_tokens']} output tokens, {document['limit']} prompts per eval set, batch 1",
        f"- machine: {document['hardware']['cpu']}, {document['hardware']['logical_cores']} cores; "
        f"{document['created']}",
        "- predicted: the trainer's evaluation (teacher-forced; T=0 from top-1 agreement, T=1 from alpha) on the "
        "eval data of the row's dataset and temperature (the target's responses to the same prompts), and on "
        "the drafter's held-out training samples (`lk_training.json`); served: vLLM's counters (pooled)",
        "",
        "| dataset | T | served | drafts | predicted (eval data) | gap % | predicted (held-out) | gap % |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in document["rows"]:
        lines.append(
            f"| {r['dataset']} | {r['temperature']:g} | {num(r['served'])} | {r['num_drafts']} | "
            f"{num(r['predicted_eval_data'])} | {signed(r['gap_eval_data_percent'])} | "
            f"{num(r['predicted_heldout'])} | {signed(r['gap_heldout_percent'])} |"
        )
    lines += ["", "Eval data (the trainer's evaluation of the drafter on each directory):", ""]
    lines += ["| eval data | T | samples | positions | top-1 agreement | alpha | expected (T=0 / T=1) |"]
    lines += ["| --- | --- | --- | --- | --- | --- | --- |"]
    for e in document["eval_data"]:
        lines.append(
            f"| {e['name']} | {e['temperature']:g} | {e['samples']} | {e['positions']} | "
            f"{', '.join(num(a) for a in e['top1_agreement'])} | {', '.join(num(a) for a in e['per_position_alpha'])} | "
            f"{num(e['expected_acceptance_length_greedy'])} / {num(e['expected_acceptance_length'])} |"
        )
    write_atomic(out.with_suffix(".md"), "\n".join(lines) + "\n")
    write_atomic(out.with_suffix(".json"), json.dumps(document, indent=1) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drafter", required=True, help="exported drafter directory")
    parser.add_argument(
        "--eval-data", action="append", required=True, help="`lk-vllm prepare --split eval` output"
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "prediction-gap"))
    args = parser.parse_args()

    from lk_vllm.drafters.base import read_drafter_files
    from training.data import load_manifest

    settings = [load_manifest(Path(d))["settings"] for d in args.eval_data]
    limits = {s.get("limit") for s in settings}
    max_tokens = {s.get("max_tokens") for s in settings}
    if len(limits) != 1 or len(max_tokens) != 1 or None in limits:
        sys.exit(
            f"--eval-data: expected one --limit and one --max-tokens for every directory, found {limits} and {max_tokens}"
        )
    limit, max_tokens = limits.pop(), max_tokens.pop()
    datasets = sorted({Path(name).stem for s in settings for name in s["datasets"]})
    training = read_drafter_files(args.drafter).record.training
    num_steps = int(training["num_steps"])

    eval_data = trainer_eval_data(args.drafter, args.eval_data, num_steps)
    served_runs = served(args.drafter, datasets, limit, num_steps, max_tokens)
    document = {
        "command": "python benchmarks/prediction_gap.py " + " ".join(sys.argv[1:]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "hardware": hardware(),
        "drafter": args.drafter,
        "num_speculative_tokens": num_steps,
        "max_tokens": max_tokens,
        "limit": limit,
        "eval_data": eval_data,
        "served": {str(t): r for t, r in served_runs.items()},
        "rows": rows(training, eval_data, served_runs, num_steps),
    }
    write(document, Path(args.out))
    print(Path(args.out).with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
