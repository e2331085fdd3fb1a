"""``lk-vllm bench``: drafters against no speculation, through vLLM, on the same machine in the same run.

One run compares a no-speculation baseline and any number of drafters (``--drafter DIR``, repeatable) on
evaluation datasets (``mtbench``, ``humaneval``, ``gsm8k``, a user's JSONL file) at each temperature and
concurrency, with K draft tokens. It reports, per drafter, dataset, temperature and concurrency, the mean
acceptance length and per-position acceptance (vLLM's own counters), tokens/s and the speedup over the
baseline measured in the same run, next to the acceptance length the trainer predicted (``lk_training.json``:
on its eval data of the row's dataset and temperature, else on its held-out samples). Results go to ``<out-dir>/<name>.json`` (DESIGN.md "Benchmark results"), ``.md`` and
``.png``.

The parts are kept apart so a new dataset, engine mode or metric is a change in one small module:

* ``workloads``: datasets (the ``lk_vllm.datasets`` registry) -> prompt token ids (chat template);
* ``contenders``: the baseline and each drafter as a vLLM speculative config, checked before any engine starts;
* ``runner``: one vLLM engine per contender, a closed request loop per cell, counters and wall time;
* ``metrics``: measurements -> records (acceptance via ``lk_vllm.acceptance``, speedup, training-time gap);
* ``report``: the json document rendered as markdown tables and a png;
* ``command``: the command line.

Why here and not in ``benchmarks/``: ``bench`` is a command of the installed package (``lk-vllm bench``) that
users run on their own drafters and targets; ``benchmarks/`` holds this repository's scripts and committed
results. It is not in ``serving/`` because it never runs the server: it drives offline engines.
"""

from lk_vllm.bench.command import add_arguments, run

__all__ = ["add_arguments", "run"]
