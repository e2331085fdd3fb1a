#!/usr/bin/env bash
# KL vs LK with seeds: drafters for the default target trained with KL, LK^alpha and LK^lambda at one fixed
# budget, 3 seeds each (the seed sets the drafter's initialisation and the batch order; the data is the same for
# every run), then served by vLLM on MT-Bench, HumanEval and GSM8K at T=0 and T=1. ARCH picks the drafter:
# eagle3 (default; recipe smollm2-default, LK^lambda eta 3) or medusa (recipe smollm2-medusa, eta 10).
#
#   examples/kl_vs_lk_seeds.sh [train|bench|report|all]     (default: all; run from the repository root)
#
# train:  RUNS/ARCH-LOSS-sSEED for every seed and loss, seed-major (an interrupted session leaves whole seed sets).
# bench:  every finished drafter plus vLLM's n-gram drafter and no speculation, 8 requests in flight (acceptance
#         does not depend on concurrency): benchmarks/results/PAGE-bench.{json,md,png}.
# report: benchmarks/kl_vs_lk_seeds.py: the LK/KL acceptance-length ratio per seed pair with a 95% interval, and
#         the held-out learning curves of every run: benchmarks/results/PAGE.{json,md,png}.
# PAGE is kl-vs-lk-seeds for eagle3 and kl-vs-lk-seeds-medusa for medusa unless the environment sets it.
# The learning curve's longer runs are this script's training too: SEEDS=0 STEPS=400 EVAL_EVERY=40
# PAGE=learning-curve examples/kl_vs_lk_seeds.sh train, then benchmarks/learning_curve.py.
#
# Resumable: a finished run (RUN/final/lk_training.json) is skipped, an interrupted one continues from its newest
# checkpoint. Environment: ARCH (eagle3 or medusa), PAGE, RUNS (default runs/PAGE), SEEDS (default "0 1 2"), LOSSES (default
# "kl alpha lambda"), STEPS (default 120), EVAL_EVERY (default 30), PRECISION (training.precision, default auto:
# fp32 on CPU; bf16 where the CPU has native bf16 is ~1.9x faster), BENCH_LIMIT (prompts per dataset, default 12).
set -euo pipefail
export PATH="$PWD/.venv/bin:$PATH"

stage=${1:-all}
arch=${ARCH:-eagle3}
case $arch in
    eagle3) recipe=smollm2-default page=kl-vs-lk-seeds ;;
    medusa) recipe=smollm2-medusa page=kl-vs-lk-seeds-medusa ;;
    *) echo "ARCH: expected eagle3 or medusa, got '$arch'" >&2; exit 2 ;;
esac
page=${PAGE:-$page}
runs=${RUNS:-runs/$page}
seeds=${SEEDS:-0 1 2}
losses=${LOSSES:-kl alpha lambda}
steps=${STEPS:-120}
eval_every=${EVAL_EVERY:-30}
case $stage in train|bench|report|all) ;; *) echo "usage: $0 [train|bench|report|all] (got '$stage')" >&2; exit 2 ;; esac

lk-vllm models >/dev/null

if [[ $stage == train || $stage == all ]]; then
    for seed in $seeds; do
        for loss in $losses; do
            out=$runs/$arch-$loss-s$seed
            if [[ -f $out/final/lk_training.json ]]; then
                echo "[seeds] $out: finished, skipped" >&2
                continue
            fi
            echo "[seeds] training $out (loss $loss, seed $seed, $steps steps)" >&2
            mkdir -p "$out"
            lk-vllm train --recipe "$recipe" --loss "$loss" --output "$out" --resume --no-progress \
                --set training.seed="$seed" --set training.max_steps="$steps" \
                --set training.eval_every="$eval_every" --set training.checkpoint_every="$eval_every" \
                --set training.precision="${PRECISION:-auto}" 2>&1 | tee -a "$out.log"
        done
    done
fi

if [[ $stage == bench || $stage == all ]]; then
    drafters=()
    for seed in $seeds; do
        for loss in $losses; do
            if [[ -f $runs/$arch-$loss-s$seed/final/lk_training.json ]]; then
                drafters+=(--drafter "$runs/$arch-$loss-s$seed/final")
            fi
        done
    done
    if [[ ${#drafters[@]} -eq 0 ]]; then
        echo "[seeds] no finished drafter in $runs; run '$0 train' first" >&2
        exit 1
    fi
    lk-vllm bench "${drafters[@]}" \
        --speculative-config 'ngram-k4={"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4}' \
        --name "$page-bench" --out-dir benchmarks/results \
        --dataset mtbench --dataset humaneval --dataset gsm8k --limit "${BENCH_LIMIT:-12}" \
        --temperature 0 --temperature 1 --concurrency 8 --num-speculative-tokens 3 --max-tokens 128
fi

if [[ $stage == report || $stage == all ]]; then
    python benchmarks/kl_vs_lk_seeds.py --runs "$runs" --bench "benchmarks/results/$page-bench.json" \
        --out "benchmarks/results/$page"
fi
