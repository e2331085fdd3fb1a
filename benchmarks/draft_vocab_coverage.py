"""How much of the target a draft vocabulary of each size can cover, on the recipe's held-out samples.

    python benchmarks/draft_vocab_coverage.py [--recipe smollm2-eagle3] [--size 4096 --size 8192 ...] \
        [--out benchmarks/results/draft-vocab]

For each size the draft vocabulary is built as the trainer builds it (``lk_vllm.vocab.build_draft_vocab`` over
the training responses), then measured on the held-out responses, at every position that predicts a response
token:

* ``token``: the share of the data's next tokens that are in the draft vocabulary;
* ``greedy``: the share of positions whose target argmax is in it (the ceiling of acceptance at T=0);
* ``mass``: the mean target probability inside it (the ceiling of alpha at T=1: alpha <= sum_d p_g[d]).

Read with ``benchmarks/results/training-step-profile.md`` (step time per size) to choose the size.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_SIZES = (2048, 4096, 8192, 16384, 32768)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="smollm2-eagle3")
    parser.add_argument(
        "--size", type=int, action="append", default=None, help="draft vocabulary size (repeatable)"
    )
    parser.add_argument("--out", default="benchmarks/results/draft-vocab")
    args = parser.parse_args()

    import torch

    from lk_vllm.assets import resolve_target, target_fingerprint
    from lk_vllm.target_model import TargetModel
    from lk_vllm.vocab import build_draft_vocab
    from training.capture import collate
    from training.config import load_config
    from training.train import Dist, ensure_data, load_run_samples, split_heldout

    config, _ = load_config(recipe=args.recipe, overrides={})
    target_path = resolve_target(config.model.target)
    fingerprint = target_fingerprint(target_path)
    dirs = ensure_data(config, target_path, fingerprint, Dist(0, 1), progress=True)
    samples, _, _ = load_run_samples(dirs, fingerprint, config.data.max_length)
    train_indices, heldout_indices = split_heldout(samples, config.data.heldout)
    target = TargetModel(target_path)
    responses = [samples[i].input_ids[samples[i].loss_mask] for i in train_indices]

    # Held-out positions predicting a response token: the next token, the target's argmax and its probabilities.
    next_tokens, argmax, probabilities = [], [], []
    with torch.no_grad():
        for start in range(0, len(heldout_indices), 8):
            batch = collate(samples, heldout_indices[start : start + 8])
            states = target(batch.input_ids, batch.attention_mask)
            wanted = torch.zeros_like(batch.loss_mask)
            wanted[:, :-1] = batch.loss_mask[:, 1:]
            rows, cols = wanted.nonzero(as_tuple=True)
            logits = states.logits_at(rows, cols)
            next_tokens.append(batch.input_ids[rows, cols + 1])
            argmax.append(logits.argmax(-1))
            probabilities.append(torch.softmax(logits.float(), -1))
    next_tokens, argmax, probabilities = torch.cat(next_tokens), torch.cat(argmax), torch.cat(probabilities)

    rows = []
    for size in sorted(args.size or DEFAULT_SIZES):
        if size > target.vocab_size:
            continue
        ids = build_draft_vocab(responses, target.vocab_size, size, target.tokenizer)
        inside = torch.zeros(target.vocab_size, dtype=torch.bool)
        inside[ids] = True
        rows.append(
            {
                "size": size,
                "token": round(float(inside[next_tokens].float().mean()), 4),
                "greedy": round(float(inside[argmax].float().mean()), 4),
                "mass": round(float(probabilities[:, inside].sum(-1).mean()), 4),
            }
        )
        print(f"[coverage] {rows[-1]}", file=sys.stderr, flush=True)
    report = {
        "command": f"python benchmarks/draft_vocab_coverage.py --recipe {args.recipe} "
        + " ".join(f"--size {r['size']}" for r in rows)
        + f" --out {args.out}",
        "recipe": args.recipe,
        "target_vocab": target.vocab_size,
        "data": dirs,
        "train_samples": len(train_indices),
        "heldout_samples": len(heldout_indices),
        "heldout_positions": int(next_tokens.numel()),
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [
        "# Draft vocabulary coverage (held-out responses)",
        "",
        f"Command: `{report['command']}`  ",
        f"Recipe `{args.recipe}`; target vocabulary {target.vocab_size}; vocabularies built from "
        f"{len(train_indices)} training responses, measured at {report['heldout_positions']} held-out positions "
        f"({len(heldout_indices)} samples).",
        "",
        "| draft vocab | next token inside | target argmax inside (T=0 ceiling) | target mass inside (T=1 ceiling) |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['size']} | {r['token']:.4f} | {r['greedy']:.4f} | {r['mass']:.4f} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
