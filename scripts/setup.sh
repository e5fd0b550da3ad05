#!/usr/bin/env bash
# Installs every system dependency from Debian 12 packages (idempotent) and configures + builds a
# Release tree in build/. Both README commands call this first.
#   scripts/setup.sh            install (if missing) and build
#   SKIP_BUILD=1 scripts/setup.sh   install only
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
  build-essential cmake ninja-build pkg-config ccache git ca-certificates clang-format
  libtorch-dev libopenblas0-pthread
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libspdlog-dev libyaml-cpp-dev nlohmann-json3-dev libcli11-dev
  libcpp-httplib-dev libssl-dev openssl libgtest-dev libgmock-dev libbenchmark-dev
  python3 python3-torch python3-numpy python3-sentencepiece python3-grpcio python3-protobuf
  prometheus
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}" >&2
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# Without OpenBLAS, Debian's libtorch falls back to reference BLAS (~40x slower matmuls). libtorch
# links libblas.so.3, a Debian alternative: check where it resolves, not the library list.
# (awk reads to the end: exiting early would SIGPIPE ldconfig, fatal under pipefail.)
blas=$(ldconfig -p | awk '/libblas\.so\.3 / && !found {print $NF; found = 1}')
if [ -z "$blas" ] || ! readlink -f "$blas" | grep -q openblas; then
  echo "setup: warning: libblas.so.3 (${blas:-not found}) is not OpenBLAS; matmuls will be ~40x" \
    "slower (install libopenblas0-pthread or select it with update-alternatives)" >&2
fi

[ "${SKIP_BUILD:-0}" = 1 ] && exit 0

BUILD_DIR=${BUILD_DIR:-build}
# Outside the tree, so fresh clones (CI) on the same machine reuse earlier compilations.
export CCACHE_DIR=${CCACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/collm-ccache}
# Precompiled torch headers are ~200 MB each; the default 5 GB cache evicts them within one build.
export CCACHE_MAXSIZE=${CCACHE_MAXSIZE:-25G}
export CCACHE_BASEDIR=${CCACHE_BASEDIR:-$PWD}
# Precompiled headers are only reused by ccache with these sloppiness settings.
export CCACHE_SLOPPINESS=pch_defines,time_macros,include_file_mtime,include_file_ctime
JOBS=${JOBS:-$(nproc)}
if [ ! -f "$BUILD_DIR/build.ninja" ]; then
  cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release ${CMAKE_ARGS:-}
fi
cmake --build "$BUILD_DIR" -j "$JOBS"
