"""``lk-vllm prepare``: on-policy training data. The TARGET regenerates the responses (as the LK paper does),
so the drafter learns the target's own distribution, not the dataset's original answers.

prompts (dataset registry or user JSONL) -> chat template of the target -> vLLM generation in batches ->
token ids (prompt + generated, exactly the tokens the target produced) + a loss mask on the generated tokens
-> shards ``shard-NNNNN.safetensors`` + ``manifest.json`` in the output directory.

Each shard is written atomically and recorded in ``progress.json``, so a killed ``prepare`` continues with
the first unfinished shard when run again with the same arguments. ``manifest.json`` is written last: a
directory without it is not a finished data set.

Sampling default: temperature 0.7, top-p 0.95. Plain sampling at T=1 from a small target wanders off-topic,
and greedy decoding loops; a moderate temperature visits the contexts the target reaches in service at T=0
and at T=1. The loss itself always trains against the target's full T=1 distribution at every position,
so the data's sampling settings only choose which contexts are visited.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lk_vllm import engine
from lk_vllm.assets import lk_home, resolve_target, target_fingerprint
from lk_vllm.atomic import atomic_path, write_atomic
from lk_vllm.datasets import PROMPT_SELECTION, chat_prompt_ids, load_prompts, load_tokenizer, tokenizer_key
from lk_vllm.engine import add_engine_arguments, settings_from_args
from lk_vllm.errors import UserError, require_at_least
from lk_vllm.targets import add_target_argument, check_target
from training.config import DataSection, add_field_flags, section_from_flags

SHARD_FORMAT = "lk-vllm-prepared-v1"


_DATA = DataSection()  # the data fields' defaults, declared once in training.config


@dataclass
class PrepareSettings:
    """Everything that determines the prepared data; its hash names the default output directory."""

    target: str
    target_fingerprint: str
    datasets: list[str]
    split: str = "train"
    limit: int | None = _DATA.limit  # prompts per dataset
    seed: int = _DATA.seed
    temperature: float = _DATA.temperature
    top_p: float = _DATA.top_p
    max_tokens: int = _DATA.max_tokens  # generated tokens per response
    max_length: int = _DATA.max_length  # prompt + response tokens per sample
    shard_size: int = 256  # prompts per shard
    extra: dict = field(default_factory=dict)
    chat_template: str | None = (
        _DATA.chat_template
    )  # a template file or built-in name in place of the target's own
    tokenizer_key: str = ""  # datasets.tokenizer_key: tokenizer files + the template in use
    prompt_selection: int = PROMPT_SELECTION  # which prompts the registry picks for these settings

    @classmethod
    def for_target(cls, target: str, data: DataSection, datasets: list[str] | None = None, **fields):
        """Settings for ``target`` from a data section (``datasets`` in place of its own), the target's fingerprint
        and tokenizer key filled in."""
        key = tokenizer_key(target, load_tokenizer(target, data.chat_template))
        return cls(
            target=target,
            target_fingerprint=target_fingerprint(target),
            datasets=list(datasets or data.datasets),
            limit=data.limit,
            seed=data.seed,
            temperature=data.temperature,
            top_p=data.top_p,
            max_tokens=data.max_tokens,
            max_length=data.max_length,
            chat_template=data.chat_template,
            tokenizer_key=key,
            **fields,
        )

    def key(self) -> str:
        blob = json.dumps({k: v for k, v in asdict(self).items() if k != "target"}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def default_output_dir(settings: PrepareSettings) -> Path:
    names = "+".join(Path(d).stem for d in settings.datasets)
    return lk_home() / "data" / f"{names}-{settings.target_fingerprint}-{settings.key()}"


def tokenize_prompts(tokenizer, prompts, max_prompt_tokens: int) -> tuple[list[list[int]], int]:
    """Chat-template token ids of each prompt; prompts too long keep the END of their last user turn (the
    question usually sits there) so they fit. Returns the ids and how many prompts were truncated."""
    all_ids, truncated = [], 0
    for prompt in prompts:
        ids = chat_prompt_ids(tokenizer, prompt.messages)
        if len(ids) > max_prompt_tokens:
            truncated += 1
            messages = [dict(m) for m in prompt.messages[-1:]]  # drop earlier context first
            content_ids = tokenizer.encode(messages[0]["content"], add_special_tokens=False)
            overhead = len(chat_prompt_ids(tokenizer, [{"role": "user", "content": ""}]))
            keep = max(1, max_prompt_tokens - overhead - 1)
            messages[0]["content"] = tokenizer.decode(content_ids[-keep:])
            ids = chat_prompt_ids(tokenizer, messages)[-max_prompt_tokens:]
        all_ids.append(ids)
    return all_ids, truncated


def save_shard(path: Path, samples: list[tuple[list[int], list[int]]], prompt_ids: list[str]) -> int:
    """Write one shard: concatenated token ids, a loss mask (1 on generated tokens) and sample offsets."""
    import torch
    from safetensors.torch import save_file

    input_ids, loss_mask, offsets = [], [], [0]
    for prompt_tokens, response_tokens in samples:
        input_ids += prompt_tokens + response_tokens
        loss_mask += [0] * len(prompt_tokens) + [1] * len(response_tokens)
        offsets.append(len(input_ids))
    tensors = {
        "input_ids": torch.tensor(input_ids, dtype=torch.int32),
        "loss_mask": torch.tensor(loss_mask, dtype=torch.uint8),
        "offsets": torch.tensor(offsets, dtype=torch.int64),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": SHARD_FORMAT, "prompt_ids": json.dumps(prompt_ids)})
    return sum(loss_mask)


def prepare(
    settings: PrepareSettings, output: Path, engine_settings, progress: bool = True, llm=None
) -> dict:
    """Regenerate responses for every prompt and write the shards; resumes a previous partial run.

    ``llm``: an already started ``vllm.LLM`` to reuse (else one is started from ``engine_settings`` when there
    is work left, and stopped before returning)."""
    from tqdm import tqdm

    output.mkdir(parents=True, exist_ok=True)
    progress_path = output / "progress.json"
    state = {"settings": asdict(settings), "shards": []}
    if progress_path.is_file():
        previous = json.loads(progress_path.read_text())
        if previous["settings"] != asdict(settings):
            changed = sorted(
                k for k in asdict(settings) if previous["settings"].get(k) != asdict(settings)[k]
            )
            raise UserError(
                f"{output} holds data prepared with different settings ({', '.join(changed)}); "
                "choose another --output or delete it"
            )
        state = previous
    if (output / "manifest.json").is_file():
        return json.loads((output / "manifest.json").read_text())

    prompts = []
    for name in settings.datasets:
        prompts += load_prompts(name, settings.split, limit=settings.limit, seed=settings.seed)
    if not prompts:
        raise UserError(f"no prompts in --dataset {', '.join(settings.datasets)}")
    tokenizer = load_tokenizer(settings.target, settings.chat_template)
    max_prompt_tokens = settings.max_length - min(settings.max_tokens, settings.max_length // 2)
    shards = [prompts[i : i + settings.shard_size] for i in range(0, len(prompts), settings.shard_size)]
    done = {s["file"] for s in state["shards"] if (output / s["file"]).is_file()}
    state["shards"] = [s for s in state["shards"] if s["file"] in done]

    bar = tqdm(total=len(prompts), unit="prompt", desc="regenerating", disable=not progress)
    bar.update(sum(s["prompts"] for s in state["shards"]))
    started_here = llm is None  # an engine this call starts, this call also stops
    try:
        for index, shard_prompts in enumerate(shards):
            name = f"shard-{index:05d}.safetensors"
            if name in done:
                continue
            if llm is None:
                llm = engine.make_llm(
                    engine.without_preemption(
                        engine.whole_prompt_prefills(engine_settings), settings.max_length
                    )
                )
            from vllm import SamplingParams
            from vllm.inputs import TokensPrompt

            prompt_token_ids, truncated = tokenize_prompts(tokenizer, shard_prompts, max_prompt_tokens)
            started = time.time()
            sampling = SamplingParams(
                temperature=settings.temperature,
                top_p=settings.top_p,
                seed=settings.seed + index,
                max_tokens=min(settings.max_tokens, settings.max_length - max(map(len, prompt_token_ids))),
            )
            outputs = llm.generate(
                [TokensPrompt(prompt_token_ids=ids) for ids in prompt_token_ids], sampling, use_tqdm=False
            )
            samples = [
                (ids, list(out.outputs[0].token_ids))
                for ids, out in zip(prompt_token_ids, outputs, strict=True)
            ]
            samples = [(p, r) for p, r in samples if r]  # an empty response teaches nothing
            response_tokens = save_shard(output / name, samples, [p.id for p in shard_prompts])
            elapsed = time.time() - started
            state["shards"].append(
                {
                    "file": name,
                    "prompts": len(shard_prompts),
                    "samples": len(samples),
                    "response_tokens": response_tokens,
                    "tokens": sum(len(p) + len(r) for p, r in samples),
                    "truncated_prompts": truncated,
                    "empty_responses": len(shard_prompts) - len(samples),
                    "seconds": round(elapsed, 2),
                }
            )
            write_atomic(progress_path, json.dumps(state, indent=1))
            bar.update(len(shard_prompts))
            bar.set_postfix(tok_s=f"{response_tokens / max(elapsed, 1e-9):.0f}")
    finally:
        bar.close()
        if started_here and llm is not None:
            engine.shutdown_llm(llm)

    totals = {
        key: sum(s[key] for s in state["shards"])
        for key in ("prompts", "samples", "tokens", "response_tokens", "truncated_prompts", "empty_responses")
    }
    if totals["samples"] == 0:
        raise UserError(
            f"the target produced no usable responses for --dataset {', '.join(settings.datasets)}"
        )
    seconds = sum(s["seconds"] for s in state["shards"])
    manifest = {
        "format": SHARD_FORMAT,
        "settings": asdict(settings),
        "shards": state["shards"],
        **totals,
        "generation_tokens_per_s": round(totals["response_tokens"] / max(seconds, 1e-9), 1),
    }
    write_atomic(output / "manifest.json", json.dumps(manifest, indent=1))
    return manifest


# ---------------------------------------------------------------- command line
# prepare's flags for the data fields it shares with train's data section (field -> flag).
PREPARE_FLAGS = {
    "datasets": "--dataset",
    "limit": "--limit",
    "temperature": "--temperature",
    "top_p": "--top-p",
    "max_tokens": "--max-tokens",
    "max_length": "--max-length",
    "seed": "--data-seed",
    "chat_template": "--chat-template",
}


def add_arguments(parser) -> None:
    add_target_argument(parser)
    add_field_flags(parser, DataSection, PREPARE_FLAGS, required=("datasets",))
    parser.add_argument(
        "--split", default="train", choices=["train", "eval"], help="dataset split (default train)"
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="output directory (default: $LK_VLLM_HOME/data/<datasets>-<target>-<settings hash>)",
    )
    parser.add_argument("--shard-size", type=int, default=256, help="prompts per shard / generation batch")
    parser.add_argument(
        "--vllm-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other vLLM engine argument, e.g. --vllm-arg max_num_seqs=128 (JSON values allowed)",
    )
    add_engine_arguments(parser)


def parse_vllm_args(pairs: list[str]) -> dict:
    extra = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--vllm-arg expects KEY=VALUE, found {pair!r}")
        try:
            extra[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            extra[key.replace("-", "_")] = value
    return extra


def run(args) -> int:
    data = section_from_flags(args, DataSection, PREPARE_FLAGS)
    if data.max_length <= data.max_tokens // 2:
        raise UserError(
            f"--max-length ({data.max_length}) must exceed half of --max-tokens ({data.max_tokens})"
        )
    require_at_least("--shard-size", args.shard_size)
    target = resolve_target(args.target)
    check_target(target, needs_chat_template=not data.chat_template)
    extra = parse_vllm_args(args.vllm_arg)
    settings = PrepareSettings.for_target(
        target, data, split=args.split, shard_size=args.shard_size, extra=extra
    )
    output = args.output or default_output_dir(settings)
    engine_settings = settings_from_args(
        args, target, max_model_len=max(args.max_model_len, data.max_length), extra=extra
    )
    manifest = prepare(settings, output, engine_settings)
    print(
        f"prepared {manifest['samples']} samples, {manifest['tokens']} tokens "
        f"({manifest['response_tokens']} generated) in {output}"
    )
    print(
        f"  truncated prompts: {manifest['truncated_prompts']}, empty responses: {manifest['empty_responses']}, "
        f"generation {manifest['generation_tokens_per_s']} tokens/s"
    )
    return 0
