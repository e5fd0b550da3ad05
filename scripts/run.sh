#!/usr/bin/env bash
# The main job: installs what is missing, builds, and generates text locally with collmctl.
#   scripts/run.sh                                   # offline: the built-in tiny random model
#   COLLM_MODEL=/path/to/hf-llama-dir scripts/run.sh # real weights (config.json, model.safetensors,
#                                                    # tokenizer.model), e.g. stories260K-hf
# Extra arguments go to `collmctl generate` (e.g. --prompt "..." --max-tokens 100 --temperature 0).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >&2
BUILD_DIR=${BUILD_DIR:-build}
args=(generate)
if [ -n "${COLLM_MODEL:-}" ]; then args+=(--model "$COLLM_MODEL"); fi
if [ $# -eq 0 ]; then set -- --prompt "Once upon a time" --max-tokens 100; fi
exec "$BUILD_DIR/src/collmctl" "${args[@]}" "$@"
