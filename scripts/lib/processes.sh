# Sourced by scripts/run.sh and benchmarks/router_policies.sh: start collm binaries in the
# background and stop exactly those, by pid, on exit (also on Ctrl-C).
# Needs: $BUILD_DIR (the build tree), $work (a directory for logs and ports files) and, for
# default_model, $CTL (collmctl).
pids=()
stop_started() {
  # Every process started here, newest first (devices and router before the aggregator).
  local i
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do kill "${pids[i]}" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  pids=()
}
trap stop_started EXIT
trap 'exit 130' INT TERM # Ctrl-C: exit, and the EXIT trap stops everything.

# start NAME BINARY CONFIG: runs it in the background with NAME.log and NAME.ports in $work, and
# sets $port to its gRPC port once it serves (not in a subshell: the pid must reach stop_started).
start() {
  local name=$1 binary=$2 config=$3 pid
  rm -f "$work/$name.ports" # A stale one (an earlier run of NAME) would be read as this one's.
  "$BUILD_DIR/src/$binary" --config "$config" --ports-file "$work/$name.ports" \
    >"$work/$name.log" 2>&1 &
  pid=$!
  pids+=("$pid")
  for _ in $(seq 1 300); do
    [ -s "$work/$name.ports" ] && break
    kill -0 "$pid" 2>/dev/null || {
      echo "$binary exited; see $work/$name.log" >&2
      tail -n 20 "$work/$name.log" >&2
      exit 1
    }
    sleep 0.2
  done
  port=$(sed -n 's/.*grpc=\([0-9]*\).*/\1/p' "$work/$name.ports")
  [ -n "$port" ] || {
    echo "$binary wrote no gRPC port; see $work/$name.log" >&2
    exit 1
  }
}

# Exports COLLM_MODEL as the built-in tiny random model unless it is set; the model is written on
# first use, in the same place `collmctl generate` uses.
default_model() {
  [ -z "${COLLM_MODEL:-}" ] || return 0
  local model="${COLLM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/collm}/tiny-random"
  [ -f "$model/config.json" ] || "$CTL" random-model --out "$model" >/dev/null
  export COLLM_MODEL="$model"
}
