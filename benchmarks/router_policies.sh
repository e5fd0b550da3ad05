#!/usr/bin/env bash
# SLO attainment through collm-router per routing policy, on the same replayed trace: two collmd
# replicas (edge-1 trains at COLLM_BENCH_TRAINING_SHARE, edge-2 only serves) behind a router whose
# policy changes between runs; collm_load_bench --target replays the trace through the router.
# The first run calibrates the SLOs (5x unloaded latency through the router); every later run uses
# the same SLOs, so attainment and goodput compare directly. Policies run in turn, ROUNDS times.
#
#   benchmarks/router_policies.sh TRACE.csv [POLICY...]     (default: round_robin slack)
# Environment:
#   COLLM_MODEL          model directory (default: the built-in tiny random model)
#   COLLM_BENCH_DURATION seconds of trace per run (default 60)
#   COLLM_BENCH_SPEEDUP  trace time compression (default 1)
#   COLLM_BENCH_TRAINING_SHARE  edge-1's engine.training_share (default 0.5)
#   COLLM_BENCH_ROUNDS   times each policy runs (default 2; the spread is printed)
#   BUILD_DIR            build tree (default build)
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { sed -n 2,15p "$0" >&2; exit 2; }
trace=$1
shift
policies=("$@")
((${#policies[@]})) || policies=(round_robin slack)
BUILD_DIR=${BUILD_DIR:-build}
CTL="$BUILD_DIR/src/collmctl"
BENCH="$BUILD_DIR/benchmarks/collm_load_bench"
[ -x "$BENCH" ] || { echo "no $BENCH: build first (scripts/setup.sh)" >&2; exit 1; }
[ -f "$trace" ] || { echo "no trace file $trace" >&2; exit 1; }
work=$(mktemp -d "${TMPDIR:-/tmp}/collm-router-bench.XXXXXX")
# shellcheck source=../scripts/lib/processes.sh
source scripts/lib/processes.sh

default_model
"$CTL" task make --kind parity --out "$work" >/dev/null
export COLLM_DEMO_DATA="$work/train.jsonl"

slo_args=()
for ((round = 1; round <= ${COLLM_BENCH_ROUNDS:-2}; round++)); do
  for policy in "${policies[@]}"; do
    COLLM_DEMO_TRAINING_SHARE=${COLLM_BENCH_TRAINING_SHARE:-0.5} start edge-1 collmd configs/demo.yaml
    r1=$port
    COLLM_DEMO_TRAINING_SHARE=0 start edge-2 collmd configs/demo.yaml
    r2=$port
    COLLM_ROUTER_POLICY=$policy COLLM_ROUTER_ADDRESS=127.0.0.1:0 COLLM_ROUTER_METRICS=127.0.0.1:0 \
      COLLM_REPLICA_1="127.0.0.1:$r1" COLLM_REPLICA_2="127.0.0.1:$r2" \
      start router collm-router configs/router.yaml
    out="$work/$policy-$round.json"
    echo "router_policies: round $round, policy $policy (logs in $work)" >&2
    "$BENCH" --target "127.0.0.1:$port" --model "$COLLM_MODEL" --trace "$trace" \
      --duration "${COLLM_BENCH_DURATION:-60}" --speedup "${COLLM_BENCH_SPEEDUP:-1}" \
      "${slo_args[@]}" --json "$out" >"$work/$policy-$round.txt" 2>&1 ||
      { cat "$work/$policy-$round.txt" >&2; exit 1; }
    if ((${#slo_args[@]} == 0)); then
      read -r ttft tpot < <(python3 -c "import json,sys; s=json.load(open(sys.argv[1]))['slo']; print(s['ttft_ms'], s['tpot_ms'])" "$out")
      slo_args=(--slo-ttft-ms "$ttft" --slo-tpot-ms "$tpot")
    fi
    stop_started
  done
done

python3 - "$work" "${policies[@]}" <<'PY'
import glob, json, os, sys
work, policies = sys.argv[1], sys.argv[2:]
print(f"\nrouter_policies: {work}")
first = None
print(f"   {'policy':<18}{'runs':>5}{'sent':>7}{'SLO att (min..max)':>24}{'goodput/s':>18}{'TTFT p99 ms':>14}")
for p in policies:
    runs = [json.load(open(f)) for f in sorted(glob.glob(os.path.join(work, f"{p}-*.json")))]
    if not runs: continue
    first = first or runs[0]
    sc = [r["loads"][0]["scenarios"][0] for r in runs]
    att = [s["slo_attainment"] * 100 for s in sc]
    gp = [s["goodput_rps"] for s in sc]
    p99 = [s["ttft_ms"]["p99"] for s in sc]
    print(f"   {p:<18}{len(sc):>5}{sc[0]['sent']:>7}"
          f"{f'{min(att):.1f}..{max(att):.1f}%':>24}{f'{min(gp):.2f}..{max(gp):.2f}':>18}"
          f"{f'{max(p99):.1f}':>14}")
s = first["slo"]
print(f"   SLO: TTFT <= {s['ttft_ms']:.2f} ms, TPOT <= {s['tpot_ms']:.3f} ms (calibrated by the first run)")
PY
