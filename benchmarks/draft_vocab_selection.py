"""What choosing a draft vocabulary costs at large target vocabularies: benchmarks/results/draft-vocab-selection.{json,md}.

    python benchmarks/draft_vocab_selection.py [--tokens 2000000] [--vocab 49152 --vocab 262144 ...]

The trainer's steps (``lk_vllm.vocab``) on synthetic response tokens drawn from a Zipf(1.3) distribution over
the vocabulary, in sequences of 500 tokens: counting them (``count_tokens``), the ``auto`` size
(``auto_draft_vocab_size``) and the selection (``select_draft_vocab``); wall time of each and the growth of
the process's peak resident set over the whole run of one vocabulary size (a fresh process each).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_VOCABS = (49152, 128256, 262144)
ZIPF = 1.3
SEQUENCE = 500


def measure(vocab_size: int, tokens: int) -> dict:
    import torch

    from lk_vllm.vocab import auto_draft_vocab_size, count_tokens, select_draft_vocab

    probabilities = 1.0 / torch.arange(1, vocab_size + 1, dtype=torch.float64) ** ZIPF
    ids = torch.multinomial(
        probabilities / probabilities.sum(),
        tokens,
        replacement=True,
        generator=torch.Generator().manual_seed(0),
    )
    sequences = list(ids.split(SEQUENCE))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    counts = count_tokens(sequences, vocab_size)
    counted = time.perf_counter()
    size, covered = auto_draft_vocab_size(counts)
    sized = time.perf_counter()
    chosen = select_draft_vocab(counts, size or vocab_size)
    selected = time.perf_counter()
    return {
        "vocab_size": vocab_size,
        "tokens": tokens,
        "sequences": len(sequences),
        "auto_size": size,
        "auto_coverage": covered,
        "selected": int(chosen.numel()),
        "count_s": counted - started,
        "auto_s": sized - counted,
        "select_s": selected - sized,
        "peak_rss_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2_000_000)
    parser.add_argument("--vocab", type=int, action="append", default=None)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "draft-vocab-selection"))
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.tokens)))
        return 0
    from lk_vllm.plugin.server.speedup import hardware_id

    rows = []
    for vocab_size in args.vocab or DEFAULT_VOCABS:
        done = subprocess.run(
            [sys.executable, __file__, "--one", str(vocab_size), "--tokens", str(args.tokens)],
            check=True,
            stdout=subprocess.PIPE,
            text=True,
        )
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    command = ("python benchmarks/draft_vocab_selection.py " + " ".join(sys.argv[1:])).strip()
    document = {
        "name": "draft-vocab-selection",
        "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": command,
        "hardware": hardware_id(),
        "zipf": ZIPF,
        "rows": rows,
    }
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(document, indent=1) + "\n")
    lines = [
        f"# Draft-vocabulary selection cost ({document['hardware']})",
        "",
        f"`{command}` ({document['created']}): {args.tokens:,} synthetic response tokens, Zipf({ZIPF}) over "
        f"the vocabulary, in sequences of {SEQUENCE}; method in the script's docstring.",
        "",
        "| V | auto size | its coverage | count (s) | auto (ms) | select (ms) | peak RSS growth (MB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['vocab_size']:,} | {r['auto_size'] or 'whole'} | {r['auto_coverage']:.1%} | "
            f"{r['count_s']:.2f} | {1e3 * r['auto_s']:.1f} | {1e3 * r['select_s']:.1f} | "
            f"{r['peak_rss_growth_mb']:.0f} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
