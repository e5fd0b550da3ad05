#!/usr/bin/env bash
# Builds the libFuzzer targets (fuzz/, CMake -DCOLLM_FUZZ=ON, clang-14, ASan+UBSan) in build-fuzz/
# and runs each for SECONDS (default 30).
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]     e.g. scripts/fuzz.sh 600 fuzz_safetensors
#
# Seeds: small files this script writes, plus real files from $COLLM_MODELS_DIR and
# $COLLM_DATA_DIR when they are set, read in place (never copied); the working corpus
# grows in build-fuzz/corpus/<target> and is never part of the repository. A crash or leak is
# saved as build-fuzz/artifacts/<target>/crash-* (reproduce: build-fuzz/fuzz/<target> FILE) and
# makes the script exit 1; turn each one into a regression test in the normal suite.
# Needs: apt-get install clang-14 libfuzzer-14-dev.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
seconds="${1:-30}"
shift || true
build="${COLLM_FUZZ_BUILD_DIR:-$root/build-fuzz}"
# Unset = no real seeds (find on "" finds nothing).
models="${COLLM_MODELS_DIR:-}"
data="${COLLM_DATA_DIR:-}"
jobs="${COLLM_FUZZ_JOBS:-2}"
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(fuzz_safetensors fuzz_model_config fuzz_sentencepiece fuzz_dataset_jsonl)

export CCACHE_DIR="${CCACHE_DIR:-$HOME/.cache/collm-ccache}" CCACHE_BASEDIR="$root"
export CCACHE_SLOPPINESS="${CCACHE_SLOPPINESS:-pch_defines,time_macros,include_file_mtime,include_file_ctime}"
start=$(date +%s)
if [[ ! -f "$build/build.ninja" ]]; then
  cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DCMAKE_C_COMPILER=clang-14 -DCMAKE_CXX_COMPILER=clang++-14 -DCOLLM_FUZZ=ON \
    -DCOLLM_BUILD_TESTS=OFF -DCOLLM_BUILD_BENCHMARKS=OFF -DCOLLM_USE_PCH=OFF >/dev/null
fi
cmake --build "$build" -j"$jobs" --target "${targets[@]}"
echo "fuzz.sh: built ${#targets[@]} target(s) in $(( $(date +%s) - start )) s"

# Seeds this script writes (small, valid and near-valid inputs).
seeds="$build/seeds"
mkdir -p "$seeds"/{fuzz_safetensors,fuzz_model_config,fuzz_sentencepiece,fuzz_dataset_jsonl}
python3 - "$seeds/fuzz_safetensors" <<'PY'
import json, struct, sys
def st(tensors, meta=None):
    header, data = {}, b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    if meta: header["__metadata__"] = meta
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data
out = sys.argv[1]
open(out + "/f32.safetensors", "wb").write(st({"w": ("F32", [2, 2], struct.pack("<4f", 1, 2, 3, 4))}, {"format": "pt"}))
open(out + "/mixed.safetensors", "wb").write(st({"a": ("F16", [3], b"\x00\x3c" * 3), "b": ("BF16", [1, 2], b"\x80\x3f" * 2)}))
open(out + "/empty.safetensors", "wb").write(st({"z": ("F32", [0, 4], b"")}))
PY
printf '%s' '{"architectures":["LlamaForCausalLM"],"hidden_size":64,"intermediate_size":172,"num_attention_heads":8,"num_key_value_heads":4,"num_hidden_layers":2,"vocab_size":512,"max_position_embeddings":256,"rms_norm_eps":1e-5,"rope_theta":10000.0,"tie_word_embeddings":false}' \
  >"$seeds/fuzz_model_config/tiny.json"
printf '%s\n' '{"prompt": "2 + 3 =", "completion": " 5"}' '{"text": "Once upon a time"}' \
  '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}' \
  '{"prompt": "bad' >"$seeds/fuzz_dataset_jsonl/mixed.jsonl"
printf '%s' '[{"prompt": "a", "completion": "b"}, {"prompt": 3}]' >"$seeds/fuzz_dataset_jsonl/array.json"

# Real files, read in place.
declare -A real
real[fuzz_safetensors]="$(find "$models" -name '*.safetensors' -size -4M 2>/dev/null | head -4 || true)"
real[fuzz_model_config]="$(find "$models" -name 'config.json' -o -path '*/shapes/*.json' 2>/dev/null | head -8 || true)"
real[fuzz_sentencepiece]="$(find "$models" -name '*.model' 2>/dev/null | head -4 || true)"
real[fuzz_dataset_jsonl]="$(find "$data" -name '*.jsonl' -size -64M 2>/dev/null | head -3 || true)"
tokenizer="$(find "$models" -name 'tokenizer.model' 2>/dev/null | head -1 || true)"

failed=0
for t in "${targets[@]}"; do
  corpus="$build/corpus/$t"
  artifacts="$build/artifacts/$t"
  mkdir -p "$corpus" "$artifacts" "$build/real/$t"
  # libFuzzer takes seed directories: link the real files into one (no copies).
  for f in ${real[$t]:-}; do ln -sf "$f" "$build/real/$t/$(echo "$f" | tr / _)"; done
  max_len=65536
  [[ $t == fuzz_safetensors ]] && max_len=$((2 << 20))
  echo "fuzz.sh: $t for ${seconds}s"
  if ! COLLM_FUZZ_TOKENIZER="$tokenizer" "$build/fuzz/$t" -max_total_time="$seconds" -max_len="$max_len" \
      -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 -artifact_prefix="$artifacts/" \
      "$corpus" "$seeds/$t" "$build/real/$t" 2>"$build/$t.log"; then
    echo "fuzz.sh: $t FAILED: $(ls "$artifacts" | head -3) (log: $build/$t.log)"
    tail -40 "$build/$t.log"
    failed=1
  else
    echo "fuzz.sh: $t ok: $(grep -E 'stat::number_of_executed_units' "$build/$t.log" | awk '{print $2}') runs," \
      "$(ls "$corpus" | wc -l) corpus files"
  fi
done
echo "fuzz.sh: total $(( $(date +%s) - start )) s"
exit "$failed"
