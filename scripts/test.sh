#!/usr/bin/env bash
# The test command: installs what is missing, builds, and runs every ctest suite.
# Tests that need real weights/data read $COLLM_MODELS_DIR / $COLLM_DATA_DIR and skip (saying so)
# when those are unset. Extra arguments go to ctest (e.g. -L unit, -R Tokenizer).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
BUILD_DIR=${BUILD_DIR:-build}
exec ctest --test-dir "$BUILD_DIR" --output-on-failure --timeout 600 -j "${JOBS:-$(nproc)}" "$@"
