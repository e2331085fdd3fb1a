"""``lk-vllm eval``: a drafter's acceptance length, simulated in torch or measured in vLLM.

Engines:

* ``torch`` simulates chain speculative decoding with the drafter and the HF target (fp32). At T=0 it replays
  what vLLM does: after the prompt's first token, each step drafts K tokens, accepts the longest prefix equal to
  the target's greedy tokens and emits one bonus token; requests stop at an end-of-sequence token or after
  ``--max-tokens`` tokens, and drafts are verified against the target's tokens even past that point (vLLM counts
  those acceptances too). At T>0 it reports the expected acceptance length from the per-position acceptance
  rate alpha (teacher-forced on a continuation sampled from the target at that temperature); both
  distributions are tempered by T.
* ``vllm`` serves the drafter in vLLM (``lk_vllm.engine``) and reads its speculative-decoding counters; at
  T>0 with ``draft_sample_method: probabilistic`` (drafts sampled from the draft distribution, whose
  acceptance rate is alpha), not vLLM's default greedy drafting.

Both engines use the same prompt token ids (the target tokenizer's chat template with the generation prompt),
so at T=0 they should agree up to fp32 differences between HF and vLLM kernels.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from lk_vllm.acceptance import Counts
from lk_vllm.assets import resolve_target
from lk_vllm.bench.workloads import DEFAULT_DATASETS, add_workload_arguments
from lk_vllm.datasets import load_prompts
from lk_vllm.drafters import detect_architecture, load_drafter
from lk_vllm.drafters.base import StepOutput, read_drafter_files
from lk_vllm.errors import UserError, require_at_least
from lk_vllm.log import log
from lk_vllm.losses import lk_loss
from lk_vllm.targets import add_target_argument, check_target


# ------------------------------------------------------------------------------------------ torch engine
def simulate_greedy(
    drafter,
    target,
    prompt_ids: Sequence[int],
    num_tokens: int,
    max_tokens: int,
    continuations: dict | None = None,
) -> Counts:
    """Chain speculative decoding at T=0 on one prompt, as vLLM runs it (see the module docstring).
    ``continuations`` caches the target's greedy continuations across drafters (keyed by prompt and length)."""
    counts = Counts(num_tokens)
    length = max_tokens + num_tokens + 1
    key = (tuple(prompt_ids), length)
    if continuations is not None and key in continuations:
        continuation = continuations[key]
    else:
        continuation = target.generate_greedy(prompt_ids, length)
        if continuations is not None:
            continuations[key] = continuation
    sequence = list(prompt_ids) + continuation
    states = target(torch.tensor([sequence]), aux_layer_ids=drafter.aux_layer_ids_needed())
    propose = drafter.make_proposer(states, num_tokens)
    stops = target.stop_token_ids()
    emitted = 1  # the prefill's token
    position = len(prompt_ids)  # index of the last emitted token
    finished = continuation[0] in stops or max_tokens <= 1
    while not finished:
        drafts = propose(position - 1)
        accepted = 0
        while accepted < num_tokens and drafts[accepted] == sequence[position + 1 + accepted]:
            accepted += 1
        counts.num_drafts += 1
        for k in range(accepted):
            counts.accepted_per_position[k] += 1
        new_tokens = sequence[position + 1 : position + accepted + 2]
        for token in new_tokens:
            emitted += 1
            if token in stops or emitted >= max_tokens:
                finished = True
                break
        position += accepted + 1
    return counts


@torch.no_grad()
def expected_alpha(
    drafter,
    target,
    prompt_ids: Sequence[int],
    num_tokens: int,
    max_tokens: int,
    temperature: float,
    generator: torch.Generator,
) -> Counts:
    """Per-step alpha on a continuation sampled at ``temperature`` (teacher-forced), over response positions."""
    counts = Counts(num_tokens)
    continuation = target.generate(prompt_ids, max_tokens, temperature=temperature, generator=generator)
    stops = target.stop_token_ids()
    for index, token in enumerate(continuation):
        if token in stops:
            continuation = continuation[: index + 1]
            break
    sequence = list(prompt_ids) + continuation
    input_ids = torch.tensor([sequence])
    states = target(input_ids, aux_layer_ids=drafter.aux_layer_ids_needed())
    response = torch.zeros_like(input_ids, dtype=torch.bool)
    response[:, len(prompt_ids) :] = True
    steps = drafter.training_steps(states, num_tokens)
    for k in range(num_tokens):
        step = steps[min(k, len(steps) - 1)]
        if len(steps) == 1 and k > 0:  # a draft LM: step k is the same distribution at a later position
            step = _shifted(step, k)
        draft, target_logits = step.pairs(states, response)
        if draft.shape[0] == 0:
            continue
        out = lk_loss(
            draft / temperature,
            target_logits / temperature,
            kind="tv",
            draft_to_target=drafter.draft_to_target,
        )
        counts.alpha_sum[k] += float(out.alpha) * draft.shape[0]
        counts.alpha_count[k] += draft.shape[0]
    return counts


def _shifted(step, k: int):
    """The draft LM's step k: the same next-token distribution, at anchors k positions later."""
    hidden = torch.zeros_like(step.hidden)
    hidden[:, : hidden.shape[1] - k] = step.hidden[:, k:]
    mask = torch.zeros_like(step.mask)
    mask[:, : mask.shape[1] - k] = step.mask[:, k:]
    return StepOutput(hidden=hidden, head=step.head, target_shift=step.target_shift + k, mask=mask)


def evaluate_torch(
    drafter,
    target,
    prompts,
    num_tokens: int,
    max_tokens: int,
    temperature: float,
    seed: int = 0,
    continuations: dict | None = None,
) -> dict[str, Counts]:
    from tqdm import tqdm

    generator = torch.Generator().manual_seed(seed)
    per_dataset: dict[str, Counts] = {}
    for prompt in tqdm(prompts, desc="torch simulation", unit="prompt", file=sys.stderr):
        prompt_ids = target.chat_prompt_ids(prompt.messages)
        if temperature > 0:
            counts = expected_alpha(
                drafter, target, prompt_ids, num_tokens, max_tokens, temperature, generator
            )
        else:
            counts = simulate_greedy(drafter, target, prompt_ids, num_tokens, max_tokens, continuations)
        per_dataset.setdefault(prompt.dataset, Counts(num_tokens)).add(counts)
    return per_dataset


# ------------------------------------------------------------------------------------------ vLLM engine
# ------------------------------------------------------------------------------------------ driver
def run_eval(
    drafter_dir: str,
    target: str | None,
    datasets: Sequence[str],
    limit: int | None,
    engine: str,
    num_tokens: int,
    max_tokens: int,
    temperature: float,
    seed: int = 0,
    settings_overrides: dict | None = None,
    chat_template: str | None = None,
) -> dict:
    """Evaluate a drafter directory; the returned dict is what ``--json`` prints."""
    from lk_vllm.target_model import TargetModel

    require_at_least("--num-speculative-tokens", num_tokens)
    require_at_least("--max-tokens", max_tokens)
    if temperature < 0:
        raise UserError(f"--temperature must be >= 0, got {temperature}")
    if engine not in ("torch", "vllm"):
        raise UserError(f"--engine must be torch or vllm, got {engine!r}")
    target_path = resolve_target(target or recorded_target(drafter_dir))
    architecture = detect_architecture(read_drafter_files(drafter_dir).config, f"--drafter {drafter_dir}")
    check_target(target_path, architecture, needs_chat_template=not chat_template)
    prompts = [p for name in datasets for p in load_prompts(name, split="eval", limit=limit)]
    if not prompts:
        raise UserError(f"--dataset {', '.join(datasets)}: no prompts")
    started = time.time()
    target_model = TargetModel(target_path, chat_template=chat_template)
    drafter = load_drafter(drafter_dir, target_model)  # every drafter/target mismatch fails here, before vLLM
    log(
        f"{drafter.architecture} drafter {drafter_dir} on {target_path}: {len(prompts)} prompts, engine {engine}"
    )
    if engine == "torch":
        per_dataset = evaluate_torch(
            drafter, target_model, prompts, num_tokens, max_tokens, temperature, seed
        )
    else:
        if not drafter.servable:
            raise UserError(
                f"drafter {drafter_dir}: vLLM 0.32 cannot serve the {drafter.architecture} architecture"
            )
        by_dataset: dict[str, list[list[int]]] = {}
        for prompt in prompts:
            by_dataset.setdefault(prompt.dataset, []).append(target_model.chat_prompt_ids(prompt.messages))
        del target_model, drafter
        from lk_vllm.bench.runner import evaluate_vllm

        per_dataset = evaluate_vllm(
            drafter_dir,
            target_path,
            by_dataset,
            num_tokens,
            max_tokens,
            temperature,
            settings_overrides,
            seed,
        )
    total = Counts(num_tokens)
    for counts in per_dataset.values():
        total.add(counts)
    result = {
        "drafter": str(drafter_dir),
        "target": target_path,
        "engine": engine,
        "temperature": temperature,
        "num_speculative_tokens": num_tokens,
        "max_tokens": max_tokens,
        "num_prompts": len(prompts),
        **total.summary(),
        "datasets": {name: counts.summary() for name, counts in per_dataset.items()},
        "seconds": round(time.time() - started, 1),
    }
    return result


def recorded_target(drafter_dir: str) -> str | None:
    """The target path recorded with the drafter, when that directory exists here."""
    path = read_drafter_files(drafter_dir).record.target_path
    return path if path and Path(path).is_dir() else None


def add_arguments(parser) -> None:
    parser.add_argument("--drafter", required=True, help="drafter checkpoint directory")
    add_target_argument(parser, "the one recorded with the drafter, else the embedded default target")
    parser.add_argument(
        "--engine",
        choices=("torch", "vllm"),
        default="torch",
        help="torch: simulate with the HF target; vllm: serve the drafter in vLLM (default torch)",
    )
    add_workload_arguments(parser)
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def run(args) -> int:
    result = run_eval(
        args.drafter,
        args.target,
        args.dataset or DEFAULT_DATASETS,
        args.limit,
        args.engine,
        args.num_speculative_tokens,
        args.max_tokens,
        args.temperature,
        args.seed,
        chat_template=args.chat_template,
    )
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"acceptance length {_fmt(result['acceptance_length'])} ({args.engine}, T={args.temperature}, "
            f"K={args.num_speculative_tokens}, {result['num_prompts']} prompts)"
        )
        print(
            "per-position acceptance: " + ", ".join(_fmt(r) for r in result["per_position_acceptance"] or [])
        )
        for name, summary in result["datasets"].items():
            print(f"  {name}: acceptance length {_fmt(summary['acceptance_length'])}")
    return 0


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"
