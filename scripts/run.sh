#!/usr/bin/env bash
# The main job: installs what is missing, builds, then shows co-execution — a real collmd serves
# client load over gRPC while fine-tuning a LoRA adapter on a built-in task, and the served
# adapter's held-out exact match is measured through the same gRPC Generate the clients use.
#   scripts/run.sh                       # offline: tiny random model + the built-in parity task
#   COLLM_MODEL=DIR COLLM_DATA=FILE scripts/run.sh
#       # real weights (HF Llama dir) and a {"prompt","completion"} JSONL file (fields renamed by
#       # COLLM_PROMPT_FIELD / COLLM_COMPLETION_FIELD, e.g. question/answer for GSM8K); its first
#       # COLLM_HELDOUT (default 50) records are held out and never trained on.
# Environment: COLLM_DEMO_SECONDS (default 60), COLLM_DEMO_TASK (parity or copy).
# Extra arguments go to `collmctl demo`. Text generation alone: `collmctl generate` (README).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >&2
BUILD_DIR=${BUILD_DIR:-build}
CTL="$BUILD_DIR/src/collmctl"
work=$(mktemp -d "${TMPDIR:-/tmp}/collm-demo.XXXXXX")
daemon_pid=""
cleanup() {
  if [ -n "$daemon_pid" ]; then kill "$daemon_pid" 2>/dev/null || true; wait "$daemon_pid" 2>/dev/null || true; fi
}
trap cleanup EXIT

if [ -z "${COLLM_MODEL:-}" ]; then
  # The built-in tiny random model, written on first use (same place `collmctl generate` uses).
  model="${COLLM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/collm}/tiny-random"
  [ -f "$model/config.json" ] || "$CTL" random-model --out "$model" >/dev/null
  export COLLM_MODEL="$model"
fi
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
export COLLM_DEMO_DATA="$work/train.jsonl"

echo "collm demo: model $COLLM_MODEL, data $COLLM_DEMO_DATA, daemon log $work/collmd.log" >&2
"$BUILD_DIR/src/collmd" --config configs/demo.yaml --ports-file "$work/ports" \
  >"$work/collmd.log" 2>&1 &
daemon_pid=$!
for _ in $(seq 1 300); do
  [ -s "$work/ports" ] && break
  kill -0 "$daemon_pid" 2>/dev/null || { echo "collmd exited; see $work/collmd.log" >&2; tail -n 20 "$work/collmd.log" >&2; exit 1; }
  sleep 0.2
done
port=$(sed -n 's/.*grpc=\([0-9]*\).*/\1/p' "$work/ports")
[ -n "$port" ] || { echo "collmd wrote no gRPC port; see $work/collmd.log" >&2; exit 1; }
"$CTL" demo --daemon "127.0.0.1:$port" --heldout "$work/heldout.jsonl" \
  --duration "${COLLM_DEMO_SECONDS:-60}" "$@"
