#!/usr/bin/env bash
# Reproduce the LK paper's KL-vs-LK comparison (its Table 1) on the embedded default target, SmolLM2-135M-Instruct.
#
#   examples/reproduce_smollm2.sh [train|bench|all]        (default: all; run from the repository root)
#
# train: 9 drafters on identical data, steps and seeds - EAGLE-3 (LK^lambda eta 3), Medusa (eta 10) and the
#        MLP speculator (eta 3), each with KL, LK^alpha and LK^lambda (recipes training/recipes/smollm2-*.yaml).
#        The target regenerates the prompts' responses once (`lk-vllm prepare`, cached); every run reads it.
# bench: all finished drafters, vLLM's n-gram drafter (K=4, no training) and a no-speculation baseline through vLLM: acceptance at T=0 and T=1 with 8
#        requests in flight (benchmarks/results/smollm2-lk.{json,md,png}), then wall-clock speed at batch 1, T=0,
#        on fewer prompts (smollm2-lk-batch1.{json,md,png}).
#
# Resumable: a finished run (RUN/final/lk_training.json) is skipped, an interrupted one continues from its newest
# checkpoint (every 50 steps), so the script can be re-run after a crash or across sessions.
# Budget on 2 CPU cores (measured times per stage): benchmarks/results/README.md.
# Environment: RUNS (default runs/smollm2-lk), ARCHS (default "eagle3 medusa mlp"), LOSSES (default
# "lambda kl alpha"), BENCH_LIMIT (prompts per dataset, default 12), BENCH_CONCURRENCY (default 8),
# BENCH_BATCH1_LIMIT (prompts per dataset at batch 1, default 4), BENCH_BATCH1_LOSSES (losses whose drafters the
# batch-1 speed run includes, default "lambda": the speedup target is the LK drafters'), BENCH_MAX_TOKENS
# (default 128), PRECISION (training.precision, default auto: fp32 on a CPU; bf16 trains ~1.9x faster on a CPU
# with native bf16, training-step-bf16.md).
set -euo pipefail
export PATH="$PWD/.venv/bin:$PATH"

stage=${1:-all}
runs=${RUNS:-runs/smollm2-lk}
archs=${ARCHS:-eagle3 medusa mlp}
losses=${LOSSES:-lambda kl alpha}
case $stage in train|bench|all) ;; *) echo "usage: $0 [train|bench|all] (got '$stage')" >&2; exit 2 ;; esac

lk-vllm models >/dev/null

if [[ $stage == train || $stage == all ]]; then
    # Loss-major order: with the default LOSSES, every architecture's LK^lambda and KL runs (the comparison the
    # targets are about) finish before the first LK^alpha run starts.
    for loss in $losses; do
        for arch in $archs; do
            out=$runs/$arch-$loss
            if [[ -f $out/final/lk_training.json ]]; then
                echo "[reproduce] $out: finished, skipped" >&2
                continue
            fi
            echo "[reproduce] training $out (recipe smollm2-$arch, loss $loss)" >&2
            mkdir -p "$out"
            # --resume continues from the newest checkpoint, or starts at step 0 when there is none
            lk-vllm train --recipe "smollm2-$arch" --loss "$loss" --output "$out" --resume --no-progress \
                --set training.precision="${PRECISION:-auto}" 2>&1 | tee -a "$out.log"
        done
    done
fi

if [[ $stage == bench || $stage == all ]]; then
    finished_drafters() {  # finished_drafters LOSSES...: --drafter flags for every finished run with those losses
        for arch in $archs; do
            for loss in "$@"; do
                if [[ -f $runs/$arch-$loss/final/lk_training.json ]]; then
                    printf -- '--drafter\n%s\n' "$runs/$arch-$loss/best"
                fi
            done
        done
    }
    # What a user could run instead of training a drafter, on every page.
    ngram=(--speculative-config 'ngram-k4={"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4}')
    mapfile -t drafters < <(finished_drafters $losses)
    mapfile -t batch1_drafters < <(finished_drafters ${BENCH_BATCH1_LOSSES:-lambda})
    if [[ ${#drafters[@]} -eq 0 ]]; then
        echo "[reproduce] no finished drafter in $runs; run '$0 train' first" >&2
        exit 1
    fi
    # Acceptance, the table: every drafter at T=0 and T=1 with 8 requests in flight (acceptance does not depend
    # on concurrency, and 8 in flight measure it several times faster than batch 1 on this CPU).
    lk-vllm bench "${drafters[@]}" "${ngram[@]}" --name smollm2-lk --out-dir benchmarks/results \
        --dataset mtbench --dataset humaneval --dataset gsm8k --limit "${BENCH_LIMIT:-12}" \
        --temperature 0 --temperature 1 --concurrency "${BENCH_CONCURRENCY:-8}" \
        --num-speculative-tokens 3 --max-tokens "${BENCH_MAX_TOKENS:-128}"
    # Wall-clock speed at batch 1 and T=0 (the speedup target), on fewer prompts and drafters: batch 1 is the slow
    # part (one engine start plus ~100 s of decoding per drafter).
    if [[ ${#batch1_drafters[@]} -eq 0 ]]; then
        echo "[reproduce] no finished drafter with loss ${BENCH_BATCH1_LOSSES:-lambda} for the batch-1 run" >&2
        exit 1
    fi
    lk-vllm bench "${batch1_drafters[@]}" "${ngram[@]}" --name smollm2-lk-batch1 --out-dir benchmarks/results \
        --dataset mtbench --dataset humaneval --dataset gsm8k --limit "${BENCH_BATCH1_LIMIT:-4}" \
        --temperature 0 --concurrency 1 \
        --num-speculative-tokens 3 --max-tokens "${BENCH_MAX_TOKENS:-128}"
fi
