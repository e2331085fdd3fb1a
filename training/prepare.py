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

from lk_vllm.atomic import atomic_path, write_atomic
from lk_vllm.errors import UserError, require_at_least

SHARD_FORMAT = "lk-vllm-prepared-v1"


@dataclass
class PrepareSettings:
    """Everything that determines the prepared data; its hash names the default output directory."""

    target: str
    target_fingerprint: str
    datasets: list[str]
    split: str = "train"
    limit: int | None = None  # prompts per dataset
    seed: int = 0
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 512  # generated tokens per response
    max_length: int = 1024  # prompt + response tokens per sample
    shard_size: int = 256  # prompts per shard
    extra: dict = field(default_factory=dict)
    chat_template: str | None = None  # a template file or built-in name in place of the target's own
    tokenizer_key: str = ""  # datasets.tokenizer_key: tokenizer files + the template in use

    @classmethod
    def for_target(cls, target: str, datasets: list[str], chat_template: str | None = None, **fields):
        """Settings for ``target``, its fingerprint and tokenizer key filled in."""
        from lk_vllm.assets import target_fingerprint
        from lk_vllm.datasets import load_tokenizer, tokenizer_key

        key = tokenizer_key(target, load_tokenizer(target, chat_template))
        return cls(target=target, target_fingerprint=target_fingerprint(target), datasets=datasets,
                   chat_template=chat_template, tokenizer_key=key, **fields)

    def key(self) -> str:
        blob = json.dumps({k: v for k, v in asdict(self).items() if k != "target"}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def default_output_dir(settings: PrepareSettings) -> Path:
    from lk_vllm.assets import lk_home

    names = "+".join(Path(d).stem for d in settings.datasets)
    return lk_home() / "data" / f"{names}-{settings.target_fingerprint}-{settings.key()}"


def tokenize_prompts(tokenizer, prompts, max_prompt_tokens: int) -> tuple[list[list[int]], int]:
    """Chat-template token ids of each prompt; prompts too long keep the END of their last user turn (the
    question usually sits there) so they fit. Returns the ids and how many prompts were truncated."""
    from lk_vllm.datasets import chat_prompt_ids

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


def prepare(settings: PrepareSettings, output: Path, engine_settings, progress: bool = True, llm=None) -> dict:
    """Regenerate responses for every prompt and write the shards; resumes a previous partial run.

    ``llm``: an already started ``vllm.LLM`` to reuse (else one is started from ``engine_settings`` when there
    is work left, and stopped before returning)."""
    from tqdm import tqdm

    from lk_vllm import engine
    from lk_vllm.datasets import load_prompts, load_tokenizer

    output.mkdir(parents=True, exist_ok=True)
    progress_path = output / "progress.json"
    state = {"settings": asdict(settings), "shards": []}
    if progress_path.is_file():
        previous = json.loads(progress_path.read_text())
        if previous["settings"] != asdict(settings):
            changed = sorted(k for k in asdict(settings) if previous["settings"].get(k) != asdict(settings)[k])
            raise UserError(f"{output} holds data prepared with different settings ({', '.join(changed)}); "
                            "choose another --output or delete it")
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
    shards = [prompts[i:i + settings.shard_size] for i in range(0, len(prompts), settings.shard_size)]
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
                llm = engine.make_llm(engine.without_preemption(engine.whole_prompt_prefills(engine_settings),
                                                                  settings.max_length))
            from vllm import SamplingParams
            from vllm.inputs import TokensPrompt

            prompt_token_ids, truncated = tokenize_prompts(tokenizer, shard_prompts, max_prompt_tokens)
            started = time.time()
            sampling = SamplingParams(temperature=settings.temperature, top_p=settings.top_p, seed=settings.seed + index,
                                      max_tokens=min(settings.max_tokens, settings.max_length - max(map(len, prompt_token_ids))))
            outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_token_ids], sampling,
                                   use_tqdm=False)
            samples = [(ids, list(out.outputs[0].token_ids)) for ids, out in zip(prompt_token_ids, outputs, strict=True)]
            samples = [(p, r) for p, r in samples if r]  # an empty response teaches nothing
            response_tokens = save_shard(output / name, samples, [p.id for p in shard_prompts])
            elapsed = time.time() - started
            state["shards"].append({"file": name, "prompts": len(shard_prompts), "samples": len(samples),
                                    "response_tokens": response_tokens,
                                    "tokens": sum(len(p) + len(r) for p, r in samples),
                                    "truncated_prompts": truncated, "empty_responses": len(shard_prompts) - len(samples),
                                    "seconds": round(elapsed, 2)})
            write_atomic(progress_path, json.dumps(state, indent=1))
            bar.update(len(shard_prompts))
            bar.set_postfix(tok_s=f"{response_tokens / max(elapsed, 1e-9):.0f}")
    finally:
        bar.close()
        if started_here and llm is not None:
            engine.shutdown_llm(llm)

    totals = {key: sum(s[key] for s in state["shards"])
              for key in ("prompts", "samples", "tokens", "response_tokens", "truncated_prompts", "empty_responses")}
    if totals["samples"] == 0:
        raise UserError(f"the target produced no usable responses for --dataset {', '.join(settings.datasets)}")
    seconds = sum(s["seconds"] for s in state["shards"])
    manifest = {"format": SHARD_FORMAT, "settings": asdict(settings), "shards": state["shards"], **totals,
                "generation_tokens_per_s": round(totals["response_tokens"] / max(seconds, 1e-9), 1)}
    write_atomic(output / "manifest.json", json.dumps(manifest, indent=1))
    return manifest


# ---------------------------------------------------------------- command line
def add_arguments(parser) -> None:
    from lk_vllm.datasets import add_chat_template_argument
    from lk_vllm.engine import add_engine_arguments
    from lk_vllm.targets import add_target_argument

    add_target_argument(parser)
    parser.add_argument("--dataset", action="append", required=True,
                        help="dataset name (sharegpt, gsm8k, ...) or a .jsonl file; repeatable")
    parser.add_argument("--split", default="train", choices=["train", "eval"], help="dataset split (default train)")
    parser.add_argument("--limit", type=int, default=None, help="first N prompts of each dataset")
    parser.add_argument("--output", type=Path, default=None,
                        help="output directory (default: $LK_VLLM_HOME/data/<datasets>-<target>-<settings hash>)")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling (default 0.95)")
    parser.add_argument("--max-tokens", type=int, default=512, help="generated tokens per response (default 512)")
    parser.add_argument("--max-length", type=int, default=1024, help="prompt + response tokens (default 1024)")
    parser.add_argument("--shard-size", type=int, default=256, help="prompts per shard / generation batch")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of generated datasets and sampling")
    parser.add_argument("--vllm-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="any other vLLM engine argument, e.g. --vllm-arg max_num_seqs=128 (JSON values allowed)")
    add_chat_template_argument(parser)
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
    from lk_vllm.assets import resolve_target
    from lk_vllm.engine import settings_from_args
    from lk_vllm.targets import check_target

    if args.limit is not None:
        require_at_least("--limit", args.limit)
    if args.max_tokens < 1 or args.max_length <= args.max_tokens // 2:
        raise UserError(f"--max-length ({args.max_length}) must exceed half of --max-tokens ({args.max_tokens})")
    target = resolve_target(args.target)
    check_target(target, needs_chat_template=not args.chat_template)
    extra = parse_vllm_args(args.vllm_arg)
    settings = PrepareSettings.for_target(target, args.dataset, args.chat_template, split=args.split,
                                          limit=args.limit, seed=args.data_seed, temperature=args.temperature,
                                          top_p=args.top_p, max_tokens=args.max_tokens, max_length=args.max_length,
                                          shard_size=args.shard_size, extra=extra)
    output = args.output or default_output_dir(settings)
    engine_settings = settings_from_args(args, target, max_model_len=max(args.max_model_len, args.max_length),
                                         extra=extra)
    manifest = prepare(settings, output, engine_settings)
    print(f"prepared {manifest['samples']} samples, {manifest['tokens']} tokens "
          f"({manifest['response_tokens']} generated) in {output}")
    print(f"  truncated prompts: {manifest['truncated_prompts']}, empty responses: {manifest['empty_responses']}, "
          f"generation {manifest['generation_tokens_per_s']} tokens/s")
    return 0
