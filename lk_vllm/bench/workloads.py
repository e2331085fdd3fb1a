"""What the bench feeds the engines: prompts of each dataset as token ids.

A dataset is anything ``lk_vllm.datasets.load_prompts`` knows (the registry's evaluation splits, or a user's
JSONL file): adding a dataset there adds it here. Prompts are tokenized once, with the target tokenizer's chat
template (``lk_vllm.datasets.chat_prompt_ids``, the ids ``lk-vllm eval`` uses too), so every engine gets exactly
the same token ids.
"""

from __future__ import annotations

from dataclasses import dataclass

from lk_vllm.datasets import add_chat_template_argument, chat_prompt_ids, load_prompts
from lk_vllm.errors import UserError

DEFAULT_DATASETS = ["mtbench"]


def add_workload_arguments(parser) -> None:
    """The workload flags ``lk-vllm eval`` and ``lk-vllm bench`` share: what is sent (datasets, how many prompts,
    prompt format) and how it is generated (K, tokens per request). ``--temperature`` each command defines
    itself: eval takes one, bench several."""
    parser.add_argument(
        "--dataset",
        action="append",
        default=None,
        help="eval dataset: mtbench, humaneval, gsm8k, ... or a .jsonl file (repeatable; default "
        f"{', '.join(DEFAULT_DATASETS)})",
    )
    parser.add_argument("--limit", type=int, default=20, help="first N prompts of each dataset (default 20)")
    add_chat_template_argument(parser)
    parser.add_argument(
        "--num-speculative-tokens", type=int, default=3, help="draft tokens per step, K (default 3)"
    )
    parser.add_argument(
        "--max-tokens", type=int, default=128, help="output tokens per request at most (default 128)"
    )


@dataclass(frozen=True)
class Workload:
    """One dataset's prompts, as the target's token ids."""

    dataset: str
    prompt_ids: tuple[tuple[int, ...], ...]

    @property
    def longest_prompt(self) -> int:
        return max(len(ids) for ids in self.prompt_ids)


def load_workloads(datasets: list[str], limit: int | None, tokenizer) -> list[Workload]:
    """The first ``limit`` evaluation prompts of each dataset, tokenized (one-line UserError on bad input)."""
    workloads = []
    for name in datasets:
        prompts = load_prompts(name, split="eval", limit=limit)
        if not prompts:
            raise UserError(f"--dataset {name}: no prompts")
        ids = tuple(tuple(chat_prompt_ids(tokenizer, prompt.messages)) for prompt in prompts)
        # A JSONL file's prompts are labelled with the file's stem (lk_vllm.datasets).
        workloads.append(Workload(prompts[0].dataset, ids))
    labels = [w.dataset for w in workloads]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise UserError(
            f"--dataset: {', '.join(repeated)} given twice (JSONL files are named by their file name)"
        )
    return workloads
