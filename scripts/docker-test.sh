#!/usr/bin/env bash
# End-to-end check of the Docker deployment (docs/deployment.md), run as root on a Debian 12 box:
# builds the image, brings docker/compose.yaml up (aggregator, router, three collmd, Prometheus),
# sends requests through the router (gRPC) and to a device's OpenAI HTTP API, runs a federated
# round to completion, checks health, every /metrics and Prometheus's targets, stops the devices
# with SIGTERM (docker stop) and checks they drained and checkpointed, prints a summary and tears
# everything down. Minutes with a warm build cache, much longer cold (the image compiles collm);
# too slow for .ci/run.
#
#   scripts/docker-test.sh
# Environment:
#   COLLM_DOCKER_BINARIES=prebuilt  copy build/src/{collmd,...} (built here by scripts/setup.sh)
#                                   into the image instead of compiling in the builder stage
#   COLLM_MODELS_DIR=DIR            use DIR/stories260K-hf as the model (else a random tiny model)
#   COLLM_DOCKER_WORK=DIR           work directory (default ./docker-test-work, removed at the end
#                                   unless KEEP_WORK=1)
#   COLLM_DOCKER_KEEP=1             leave the cluster running (no teardown)
#
# Needs: apt (it installs docker.io, docker-compose, debootstrap when missing), curl, python3.
# Where no engine runs it starts `dockerd --bridge=none --iptables=false` (containers use the host
# network only) and stops that one at the end. Where debian:12-slim cannot be pulled it builds a
# base image with debootstrap and `docker import`.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

WORK=${COLLM_DOCKER_WORK:-$ROOT/docker-test-work}
DOCKER=/usr/bin/docker # Debian's client; /usr/local/bin/docker may be newer than the daemon's API.
IMAGE=collm:test
PROM_IMAGE=collm-prometheus:test
PROJECT=collmtest
STARTED_DOCKERD=""
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi

log() { printf '[docker-test %s] %s\n' "$(date -u +%T)" "$*" >&2; }
fail() {
  log "FAIL: $*"
  exit 1
}
SUMMARY=()
pass() {
  SUMMARY+=("PASS  $*")
  log "PASS: $*"
}

# --- packages and engine ------------------------------------------------------------------------
missing=()
for p in docker.io docker-compose debootstrap curl python3; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  log "installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi
DOCKER="$SUDO $DOCKER"
# $SUDO is "" or "sudo": split on purpose.
# shellcheck disable=SC2206
COMPOSE=(env COLLM_WORK="$WORK" COLLM_IMAGE="$IMAGE" COLLM_PROMETHEUS_IMAGE="$PROM_IMAGE"
  $SUDO docker-compose -p "$PROJECT" -f docker/compose.yaml)

mkdir -p "$WORK"
cleanup() {
  local rc=$?
  if [ "${COLLM_DOCKER_KEEP:-0}" != 1 ]; then
    "${COMPOSE[@]}" logs --no-color >"$WORK/compose.log" 2>&1 || true
    "${COMPOSE[@]}" down -t 20 >/dev/null 2>&1 || true
    if [ -n "$STARTED_DOCKERD" ]; then
      log "stopping the dockerd this script started (pid $STARTED_DOCKERD)"
      $SUDO kill "$STARTED_DOCKERD" 2>/dev/null || true
      wait "$STARTED_DOCKERD" 2>/dev/null || true
    fi
    # Files written by the containers belong to their user (uid 10001).
    [ "${KEEP_WORK:-0}" = 1 ] || [ $rc != 0 ] || $SUDO rm -rf "$WORK"
  fi
  [ $rc = 0 ] || log "failed (rc $rc); logs in $WORK (compose.log, build.log, dockerd.log)"
}
trap cleanup EXIT

if ! $DOCKER info >/dev/null 2>&1; then
  log "no engine answers: starting dockerd --bridge=none --iptables=false"
  $SUDO dockerd --bridge=none --iptables=false >"$WORK/dockerd.log" 2>&1 &
  STARTED_DOCKERD=$!
  for _ in $(seq 60); do
    if $DOCKER info >/dev/null 2>&1; then break; fi
    sleep 1
  done
  $DOCKER info >/dev/null 2>&1 || fail "dockerd did not start (see $WORK/dockerd.log)"
fi
log "engine $($DOCKER version --format '{{.Server.Version}}')"

# --- base image ---------------------------------------------------------------------------------
BASE=debian:12-slim
if ! $DOCKER image inspect "$BASE" >/dev/null 2>&1 && ! $DOCKER pull -q "$BASE" >/dev/null 2>&1; then
  BASE=collm-base:bookworm
  if ! $DOCKER image inspect "$BASE" >/dev/null 2>&1; then
    log "no debian:12-slim: building $BASE with debootstrap --variant=minbase bookworm"
    $SUDO rm -rf "$WORK/rootfs"
    $SUDO debootstrap --variant=minbase bookworm "$WORK/rootfs" http://deb.debian.org/debian \
      >"$WORK/debootstrap.log" 2>&1 || fail "debootstrap (see $WORK/debootstrap.log)"
    # The image keeps no apt lists; security updates come from the same sources as the host's.
    $SUDO rm -rf "$WORK/rootfs/var/lib/apt/lists/"* "$WORK/rootfs/var/cache/apt/"*.bin
    $SUDO tar -C "$WORK/rootfs" -c . | $DOCKER import - "$BASE" >/dev/null
    $SUDO rm -rf "$WORK/rootfs"
  fi
fi
log "base image $BASE"

# --- images -------------------------------------------------------------------------------------
BINARIES=${COLLM_DOCKER_BINARIES:-build}
log "building $IMAGE (BINARIES=$BINARIES; log: $WORK/build.log)"
t0=$(date +%s)
DOCKER_BUILDKIT=1 $DOCKER build --network host --build-arg BASE="$BASE" \
  --build-arg BINARIES="$BINARIES" -f docker/Dockerfile -t "$IMAGE" . >"$WORK/build.log" 2>&1 ||
  { tail -30 "$WORK/build.log" >&2; fail "docker build (see $WORK/build.log)"; }
BUILD_S=$(($(date +%s) - t0))
DOCKER_BUILDKIT=1 $DOCKER build --network host --build-arg BASE="$BASE" \
  -f docker/prometheus/Dockerfile -t "$PROM_IMAGE" docker/prometheus >>"$WORK/build.log" 2>&1 ||
  fail "prometheus image (see $WORK/build.log)"
SIZE=$($DOCKER image inspect -f '{{.Size}}' "$IMAGE")
pass "image $IMAGE built in ${BUILD_S}s ($BINARIES), $((SIZE / 1000000)) MB"
[ "$($DOCKER image inspect -f '{{.Config.User}}' "$IMAGE")" = collm ] || fail "image user is not collm"
ctl() { $DOCKER run --rm --network host -v "$WORK:/work" --entrypoint collmctl "$IMAGE" "$@"; }

# --- model, shards, state -----------------------------------------------------------------------
$SUDO rm -rf "$WORK/models" "$WORK/data" "$WORK/state"
mkdir -p "$WORK/models" "$WORK/data"
if [ -n "${COLLM_MODELS_DIR:-}" ] && [ -f "$COLLM_MODELS_DIR/stories260K-hf/config.json" ]; then
  cp -r "$COLLM_MODELS_DIR/stories260K-hf" "$WORK/models/model"
  MODEL_DESC="stories260K ($COLLM_MODELS_DIR)"
else
  chmod 777 "$WORK/models"
  ctl random-model --out /work/models/model --seed 1 >/dev/null
  MODEL_DESC="collmctl random-model (tiny)"
fi
# Three shards of small arithmetic problems, a different operation per device.
python3 - "$WORK/data" <<'EOF'
import json, random, sys
ops = {1: ("+", lambda a, b: a + b), 2: ("-", lambda a, b: a - b), 3: ("*", lambda a, b: a * b)}
for shard, (sym, fn) in ops.items():
    rng = random.Random(shard)
    with open(f"{sys.argv[1]}/shard-{shard}.jsonl", "w") as f:
        for _ in range(200):
            a, b = rng.randint(0, 20), rng.randint(0, 20)
            f.write(json.dumps({"question": f"{a} {sym} {b}", "answer": str(fn(a, b))}) + "\n")
EOF
mkdir -p "$WORK/state/aggregator" "$WORK/state/edge-1" "$WORK/state/edge-2" "$WORK/state/edge-3"
$SUDO chown -R 10001:10001 "$WORK/state"
pass "model: $MODEL_DESC; data: 3 shards x 200 examples (+, -, *)"

# --- cluster up ---------------------------------------------------------------------------------
"${COMPOSE[@]}" up -d >"$WORK/compose-up.log" 2>&1 || fail "compose up (see $WORK/compose-up.log)"
cid() { "${COMPOSE[@]}" ps -q "$1"; }
for svc in aggregator edge-1 edge-2 edge-3 router; do
  status=""
  for _ in $(seq 150); do
    status=$($DOCKER inspect -f '{{.State.Health.Status}}' "$(cid $svc)" 2>/dev/null || echo gone)
    [ "$status" = healthy ] && break
    [ "$status" = gone ] && break
    sleep 2
  done
  [ "$status" = healthy ] || { "${COMPOSE[@]}" logs --tail 30 "$svc" >&2; fail "$svc is $status"; }
done
pass "healthcheck: aggregator, edge-1..3, router healthy (collmctl health / fed status)"
for addr in 127.0.0.1:17051 127.0.0.1:17052 127.0.0.1:17053 127.0.0.1:17050; do
  ctl health "$addr" >/dev/null || fail "collmctl health $addr"
done
pass "collmctl health: 3 devices and the router SERVING"

# --- requests through the router (gRPC) and the OpenAI API (HTTP) -------------------------------
for _ in 1 2 3 4 5 6; do
  out=$(ctl generate --daemon 127.0.0.1:17050 --prompt "3 + 4" --max-tokens 8 --temperature 0 2>&1) ||
    fail "generate through the router: $out"
done
routed=$(curl -fsS http://127.0.0.1:19501/metrics | awk '/^collm_router_routed_total/ {s += $NF} END {print s + 0}')
[ "${routed%.*}" -ge 6 ] || fail "router metrics count $routed routed requests, want >= 6"
pass "gRPC: 6 generate streams through collm-router (routed_total $routed)"
for port in 18081 18082 18083; do
  body=$(curl -fsS "http://127.0.0.1:$port/v1/completions" -H 'Content-Type: application/json' \
    -d '{"model": "", "prompt": "3 + 4", "max_tokens": 8, "temperature": 0}') ||
    fail "POST /v1/completions on :$port"
  grep -q '"text_completion"' <<<"$body" || fail "unexpected completion on :$port: $body"
done
models=$(curl -fsS http://127.0.0.1:18081/v1/models)
pass "OpenAI HTTP: /v1/completions on the 3 devices, /v1/models lists $(grep -o '"id"' <<<"$models" | wc -l) models"
if grep -q '^http:' docker/cluster/router.yaml; then
  body=$(curl -fsS "http://127.0.0.1:18080/v1/completions" -H 'Content-Type: application/json' \
    -d '{"prompt": "3 + 4", "max_tokens": 8}') || fail "OpenAI HTTP through the router"
  grep -q text_completion <<<"$body" || fail "OpenAI HTTP through the router: $body"
  pass "OpenAI HTTP through the router"
else
  SUMMARY+=("SKIP  OpenAI HTTP through the router (the router has no HTTP API on this branch)")
fi

# --- a federated round --------------------------------------------------------------------------
fed() { ctl fed --aggregator 127.0.0.1:17070 "$@"; }
for _ in $(seq 60); do
  online=$(fed --json status | python3 -c 'import json,sys; print(json.load(sys.stdin).get("devices_online", 0))')
  [ "$online" -ge 3 ] && break
  sleep 2
done
[ "$online" -ge 3 ] || fail "only $online devices online at the aggregator"
fed start >/dev/null
t0=$(date +%s)
done_rounds=0
while [ $(($(date +%s) - t0)) -lt 400 ]; do
  done_rounds=$(fed --json status | python3 -c 'import json,sys; print(json.load(sys.stdin).get("rounds_completed", 0))')
  [ "$done_rounds" -ge 1 ] && break
  sleep 3
done
[ "$done_rounds" -ge 1 ] || { fed rounds >&2 || true; fail "no federated round completed in 400 s"; }
ROUND_S=$(($(date +%s) - t0))
fed round show 1 >"$WORK/round-1.txt" || true
version=$(fed --json status | python3 -c 'import json,sys; print(json.load(sys.stdin).get("global_version", 0))')
pass "federation: $done_rounds round(s) completed ${ROUND_S}s after fed start, 3 devices, global version $version"

# --- metrics and Prometheus ---------------------------------------------------------------------
for port in 19401 19402 19403 19500 19501; do
  n=$(curl -fsS "http://127.0.0.1:$port/metrics" | grep -c '^collm_') || fail "GET :$port/metrics"
  [ "$n" -gt 0 ] || fail "no collm_ series on :$port/metrics"
  curl -fsS "http://127.0.0.1:$port/metrics" >"$WORK/metrics-$port.txt"
done
pass "/metrics: 3 devices, aggregator, router all serve collm_ series"
up=0
for _ in $(seq 30); do
  up=$(curl -fsS http://127.0.0.1:19090/api/v1/targets | python3 -c '
import json, sys
t = json.load(sys.stdin)["data"]["activeTargets"]
print(sum(1 for x in t if x["health"] == "up"))') || up=0
  [ "$up" -ge 5 ] && break
  sleep 2
done
[ "$up" -ge 5 ] || fail "Prometheus: $up of 5 targets up"
rules=$(curl -fsS http://127.0.0.1:19090/api/v1/rules | python3 -c '
import json, sys
print(sum(len(g["rules"]) for g in json.load(sys.stdin)["data"]["groups"]))')
pass "Prometheus: 5 of 5 targets up, $rules rules loaded"

# --- SIGTERM: drain and checkpoint --------------------------------------------------------------
for svc in edge-1 edge-2 edge-3 router aggregator; do
  c=$(cid $svc)
  $DOCKER stop -t 20 "$c" >/dev/null
  code=$($DOCKER inspect -f '{{.State.ExitCode}}' "$c")
  [ "$code" = 0 ] || fail "$svc exited with $code after docker stop"
  # Whole logs into a variable: grep -q on a pipe would SIGPIPE docker logs (fatal with pipefail).
  logs=$($DOCKER logs "$c" 2>&1)
  grep -q 'signal 15' <<<"$logs" || fail "$svc did not log SIGTERM"
  if [[ $svc == edge-* ]]; then
    grep -q 'checkpointed the shadow adapter' <<<"$logs" || fail "$svc did not checkpoint on SIGTERM"
  fi
done
pass "docker stop: all 5 logged 'signal 15', exited 0; the 3 devices checkpointed"

echo
echo "== scripts/docker-test.sh summary =="
printf '%s\n' "${SUMMARY[@]}"
