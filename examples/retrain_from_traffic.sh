#!/usr/bin/env bash
# The production loop on the default target, end to end:
#   1. serve drafter A with low-acceptance capture on;
#   2. send traffic from a domain A was not trained on (HumanEval code prompts);
#   3. the server captures the prompts A drafted worst for; capture goes off;
#   4. A's acceptance on held-out prompts of that domain (prompts the capture never saw);
#   5. the target regenerates responses for the captured prompts (`lk-vllm prepare --dataset FILE`);
#   6. A is fine-tuned on them into B (`lk-vllm train --init-from A`), B is checked (`lk-vllm validate`);
#   7. B is swapped in while `lk-vllm send` streams requests: the swap must fail none of them;
#   8. B's acceptance on the same held-out prompts, next to A's.
# Run from the repository root after `make setup`:
#   bash examples/retrain_from_traffic.sh [DRAFTER_A]     (default: the default drafter `lk-vllm models` installs)
# Sizes come from the environment (defaults in brackets): TRAFFIC [120] capture-phase requests (HumanEval prompts
# 0..TRAFFIC-1), HELDOUT [44] measured prompts (the next ones), MAX_TOKENS [128] per request, STEPS [60]
# fine-tuning steps, K [3] draft tokens, WORK [runs/retrain-from-traffic] (everything the loop writes), PORT [8011].
# B has trained on HumanEval prompts: benchmark it on other sets only.
set -euo pipefail
export PATH="$PWD/.venv/bin:$PATH"

TRAFFIC=${TRAFFIC:-120}
HELDOUT=${HELDOUT:-44}
STEPS=${STEPS:-60}
MAX_TOKENS=${MAX_TOKENS:-128}
K=${K:-3}
WORK=${WORK:-runs/retrain-from-traffic}
PORT=${PORT:-8011}
URL="http://127.0.0.1:$PORT"
ADMIN_KEY=${ADMIN_KEY:-retrain-example-admin}
admin=(-H "X-Admin-Key: $ADMIN_KEY" -H "Content-Type: application/json")
say() { printf '\n[retrain] %s\n' "$*"; }

lk-vllm models >/dev/null                                  # the default target (and the default drafter)
DRAFTER_A=${1:-$(python -c "from lk_vllm.assets import default_drafter_dir; print(default_drafter_dir())")}
if [[ -e "$WORK" ]]; then
    echo "retrain example: $WORK exists; remove it or set WORK to a new directory" >&2
    exit 2
fi
mkdir -p "$WORK/drafters"
cp -r "$DRAFTER_A" "$WORK/drafters/A"                     # swaps only load drafters inside --drafters-dir

# The held-out prompts (after the capture-phase ones) as a file: measured before and after, and B's probe.
python - "$TRAFFIC" "$HELDOUT" "$WORK/heldout.jsonl" <<'EOF'
import json, sys
from lk_vllm.datasets import load_prompts
start, count, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
with open(path, "w") as out:
    for prompt in load_prompts("humaneval", "eval")[start:start + count]:
        out.write(json.dumps({"id": prompt.id, "messages": prompt.messages}) + "\n")
EOF

say "1. serving drafter A ($DRAFTER_A) with low-acceptance capture on"
lk-vllm serve --drafter "$WORK/drafters/A" --num-speculative-tokens "$K" --drafters-dir "$WORK/drafters" \
    --admin-key "$ADMIN_KEY" --capture-low-acceptance "$WORK/capture" --capture-quantile 0.5 \
    --no-calibrate --port "$PORT" >"$WORK/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
until curl -sf "$URL/health" >/dev/null; do
    kill -0 $SERVER 2>/dev/null || { tail -n 30 "$WORK/server.log"; echo "retrain example: the server died" >&2; exit 1; }
    sleep 2
done

say "2. code traffic A was not trained on: $TRAFFIC HumanEval prompts"
lk-vllm send --url "$URL" --dataset humaneval --limit "$TRAFFIC" --concurrency 4 --max-tokens "$MAX_TOKENS" --json >"$WORK/traffic.json"

say "3. capture off; what it kept"
curl -sf "${admin[@]}" -d '{"enabled": false}' "$URL/v1/speculative/capture" | tee "$WORK/capture.json"; echo

say "4. A on $HELDOUT held-out HumanEval prompts"
lk-vllm send --url "$URL" --dataset "$WORK/heldout.jsonl" --concurrency 4 --max-tokens "$MAX_TOKENS" --json \
    | tee "$WORK/before.json"

say "5. the target answers the captured prompts (on-policy data)"
shopt -s nullglob
captured=()
for file in "$WORK"/capture/*.jsonl; do captured+=(--dataset "$file"); done
if (( ${#captured[@]} == 0 )); then
    echo "retrain example: nothing was captured (see $WORK/capture.json); send more traffic (TRAFFIC)" >&2
    exit 1
fi
lk-vllm prepare "${captured[@]}" --max-tokens 256 --max-length 512 --output "$WORK/data"
# A fifth of the captured samples (at least one) is held out to score B during training; the rest trains it.
samples=$(python -c "import json, sys; print(json.load(open(sys.argv[1]))['samples'])" "$WORK/data/manifest.json")
if (( samples < 2 )); then
    echo "retrain example: $samples captured sample(s) prepared; need 2 or more: send more traffic (TRAFFIC)" >&2
    exit 1
fi
TRAIN_HELDOUT=$(( samples / 5 > 0 ? samples / 5 : 1 ))

say "6. fine-tune A into B for $STEPS steps, then validate B (static checks, a served probe on code prompts)"
lk-vllm train --recipe smollm2-eagle3 --init-from "$WORK/drafters/A" --data "$WORK/data" --output "$WORK/run-B" \
    --set training.max_steps="$STEPS" --set training.eval_every="$STEPS" --set training.checkpoint_every="$STEPS" \
    --set data.heldout="$TRAIN_HELDOUT" --set optimizer.lr=3e-4 --set optimizer.warmup_steps=5 --no-progress
cp -r "$WORK/run-B/final" "$WORK/drafters/B"
lk-vllm validate "$WORK/drafters/B" --num-speculative-tokens "$K" --probe-dataset "$WORK/heldout.jsonl"

say "7. swap B in while requests stream"
lk-vllm send --url "$URL" --dataset "$WORK/heldout.jsonl" --concurrency 4 --max-tokens "$MAX_TOKENS" \
    --duration 40 --json >"$WORK/during-swap.json" &
LOAD=$!
sleep 10
curl -sf "${admin[@]}" -d '{"path": "B"}' "$URL/v1/speculative/drafter" | tee "$WORK/swap.json"; echo
wait $LOAD || { echo "retrain example: requests failed during the swap: $(cat "$WORK/during-swap.json")" >&2; exit 1; }
echo "during the swap: $(python -c "import json,sys; r=json.load(open(sys.argv[1])); print(r['requests'], 'requests,', r['failed'], 'failed')" "$WORK/during-swap.json")"

say "8. B on the same $HELDOUT held-out prompts"
lk-vllm send --url "$URL" --dataset "$WORK/heldout.jsonl" --concurrency 4 --max-tokens "$MAX_TOKENS" --json \
    | tee "$WORK/after.json"
curl -sf "$URL/v1/speculative/stats?window=86400" >"$WORK/stats.json"

python - "$WORK" <<'EOF'
import json, sys
from pathlib import Path
work = Path(sys.argv[1])
before, after = (json.loads((work / f"{name}.json").read_text()) for name in ("before", "after"))
print("\n[retrain] acceptance length on the held-out code prompts (T=0):")
for key, label in (("acceptance_length_pooled", "pooled"),
                   ("acceptance_length_mean_of_request_means", "mean of per-request means")):
    a, b = before[key], after[key]
    change = f"{100 * (b / a - 1):+.1f}%" if a and b else "n/a"
    print(f"  {label:>26}: A {a:.3f} -> B {b:.3f} ({change})")
swap = json.loads((work / "swap.json").read_text())
print(f"  swap: {swap['status']} ({swap.get('mode', 'engine restart')}); everything is in {work}")
EOF
