#!/usr/bin/env bash
# The main job: installs what is missing, builds, then shows co-execution — a real collmd serves
# client load over gRPC while fine-tuning a LoRA adapter on a built-in task, and the served
# adapter's held-out exact match and loss are measured through the same gRPC API the clients use,
# starting from the untrained base model.
#   scripts/run.sh                       # offline: tiny random model + the built-in parity task
#   scripts/run.sh --federated           # the same task split over two devices: a
#       # collm-aggregator, two collmd (each its own non-IID shard) and collm-router, with the
#       # client load going through the router and the rounds shown as they complete
#   COLLM_MODEL=DIR COLLM_DATA=FILE scripts/run.sh [--federated]
#       # real weights (HF Llama dir) and a {"prompt","completion"} JSONL file (fields renamed by
#       # COLLM_PROMPT_FIELD / COLLM_COMPLETION_FIELD, e.g. question/answer for GSM8K); its first
#       # COLLM_HELDOUT (default 50) records are held out and never trained on.
# Environment: COLLM_DEMO_SECONDS (default 60), COLLM_DEMO_TASK (parity or copy), SKIP_BUILD=1
# (scripts/setup.sh: use the binaries already in $BUILD_DIR, default build).
# Other arguments go to `collmctl demo`. Text generation alone: `collmctl generate` (README).
set -euo pipefail
cd "$(dirname "$0")/.."
federated=false
demo_args=()
for a in "$@"; do
  if [ "$a" = "--federated" ]; then federated=true; else demo_args+=("$a"); fi
done
scripts/setup.sh >&2
BUILD_DIR=${BUILD_DIR:-build}
CTL="$BUILD_DIR/src/collmctl"
work=$(mktemp -d "${TMPDIR:-/tmp}/collm-demo.XXXXXX")
# shellcheck source=lib/processes.sh
source scripts/lib/processes.sh

default_model
if [ -n "${COLLM_DATA:-}" ]; then
  n=${COLLM_HELDOUT:-50}
  pf=${COLLM_PROMPT_FIELD:-prompt}
  cf=${COLLM_COMPLETION_FIELD:-completion}
  head -n "$n" "$COLLM_DATA" | python3 -c "
import json, sys
for line in sys.stdin:
    r = json.loads(line)
    print(json.dumps({'prompt': r['$pf'], 'completion': r['$cf']}))" > "$work/heldout.jsonl"
  tail -n "+$((n + 1))" "$COLLM_DATA" > "$work/train.jsonl"
  export COLLM_DEMO_PROMPT_FIELD="$pf" COLLM_DEMO_COMPLETION_FIELD="$cf"
else
  "$CTL" task make --kind "${COLLM_DEMO_TASK:-parity}" --out "$work" >/dev/null
fi

if [ "$federated" = false ]; then
  export COLLM_DEMO_DATA="$work/train.jsonl"
  echo "collm demo: model $COLLM_MODEL, data $COLLM_DEMO_DATA, daemon log $work/collmd.log" >&2
  start collmd collmd configs/demo.yaml
  "$CTL" demo --daemon "127.0.0.1:$port" --heldout "$work/heldout.jsonl" \
    --duration "${COLLM_DEMO_SECONDS:-60}" "${demo_args[@]}"
  exit
fi

# Federated: two shards of train.jsonl. A task with few distinct completions (parity: even/odd) is
# split non-IID, 3:1 by label (each device sees mostly one answer); any other alternates records.
python3 - "$work/train.jsonl" "$work/shard-1.jsonl" "$work/shard-2.jsonl" <<'PY'
import json, sys
src, *dst = sys.argv[1:]
lines = [l for l in open(src) if l.strip()]
labels = sorted({json.loads(l).get("completion", "") for l in lines})
skewed = 2 <= len(labels) <= 10
seen = {}
outs = [open(d, "w") for d in dst]
for i, l in enumerate(lines):
    if skewed:
        label = json.loads(l).get("completion", "")
        k = seen[label] = seen.get(label, 0) + 1
        shard = labels.index(label) % 2 if k % 4 else 1 - labels.index(label) % 2
    else:
        shard = i % 2
    outs[shard].write(l)
PY
export COLLM_DEMO_STATE="$work/aggregator-state"
echo "collm demo (federated): model $COLLM_MODEL, shards $work/shard-{1,2}.jsonl, logs in $work" >&2
start aggregator collm-aggregator configs/demo-aggregator.yaml
agg=$port
devices=()
for i in 1 2; do
  COLLM_DEMO_FEDERATED=true COLLM_AGGREGATOR="127.0.0.1:$agg" COLLM_DEVICE_ID="edge-$i" \
    COLLM_DEMO_TRAINING_SHARE=0 COLLM_DEMO_PUBLISH_EVERY=0 \
    COLLM_DEMO_DATA="$work/shard-$i.jsonl" start "edge-$i" collmd configs/demo.yaml
  devices+=("127.0.0.1:$port")
done
COLLM_ROUTER_ADDRESS=127.0.0.1:0 COLLM_ROUTER_METRICS=127.0.0.1:0 \
  COLLM_REPLICA_1="${devices[0]}" COLLM_REPLICA_2="${devices[1]}" \
  start router collm-router configs/router.yaml
router=$port
"$CTL" demo --daemon "127.0.0.1:$router" --device "${devices[0]}" --device "${devices[1]}" \
  --aggregator "127.0.0.1:$agg" --heldout "$work/heldout.jsonl" \
  --duration "${COLLM_DEMO_SECONDS:-60}" "${demo_args[@]}"
