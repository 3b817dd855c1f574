#!/usr/bin/env bash
# The default-size real-model runs, one after the other, each resumable:
#   1. `s2ft --model` (fine-tunes of SmolLM2-135M per task and method), first
#      part: full, LoRA r4, S²FT-random r4 (a few hours on a 2-core CPU)
#   2. `merge --model --finetunes` on the first part's fine-tunes: the three
#      families (full, LoRA r4, S²FT-random r4), into merge-llm-default
#   3. `s2ft --model`, second part: S²FT-act r4 and the rank-16 methods
#   4. `s2ft --combine`: one report (tables, plots) of both parts
#   5. `merge` on the second part's four groups, into merge-llm-default-rest
# The merge study holds one group at a time, so merging by part costs only
# the base model's scores twice; the families' merge table comes before the
# second part's fine-tunes because it answers the merge study's question,
# which the second part (more ranks of methods the first part has) does not.
# Rerun the same command after an interruption: a run with
# `metrics.partial.json` continues with `--resume`, a finished one (its
# `metrics.json`) is skipped. Progress is each run's `metrics.partial.json`
# and CSV tables; the log is `OUT_DIR/<run>.log`.
#   scripts/default-runs.sh [OUT_DIR]          (default results)
# DEVICE=cuda (with a `--features cuda` build) runs them on the GPU;
# MODEL=PATH picks another base (default: the GGUF fetch-models.sh pins).
# AVX512=auto (default) builds with the `avx512` feature (the gemm crate's
# AVX-512 matmul kernels) on an Intel CPU that has AVX-512F, where training
# steps are 1.3–1.5× faster; AMD Zen 4's AVX-512 is slower than its AVX2
# kernels. AVX512=1 or AVX512=0 forces the choice for a run that starts; a
# run resumes on the kernels it started with (--resume refuses others).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-results}"
model="${MODEL:-models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf}"
device="${DEVICE:-cpu}"
bin=target/release/experiments
avx512="${AVX512:-auto}"
case "$avx512" in
  auto)
    avx512=0
    if grep -q GenuineIntel /proc/cpuinfo 2>/dev/null && grep -qw avx512f /proc/cpuinfo; then
      avx512=1
    fi
    ;;
  0 | 1) ;;
  *)
    echo "AVX512=$avx512: give auto, 0 or 1" >&2
    exit 2
    ;;
esac

# Builds the binary, with the AVX-512 kernels if $1 is 1.
build() {
  local features=()
  [ "$device" = cuda ] && features+=(cuda)
  [ "$1" = 1 ] && features+=(avx512)
  if [ ${#features[@]} -gt 0 ]; then
    cargo build -p experiments --release --features "$(IFS=,; echo "${features[*]}")"
  else
    cargo build -p experiments --release
  fi
}
mkdir -p "$out"

# Runs study $1 into folder $2 with the rest as options, resuming it if an
# earlier call was interrupted, skipping it if it finished.
run() {
  local study="$1" dir="$2"
  shift 2
  if [ -f "$dir/metrics.json" ]; then
    echo "$dir: finished earlier"
    return
  fi
  local resume=()
  if [ -f "$dir/metrics.partial.json" ]; then
    resume=(--resume)
    # A run resumes on the kernels it started with (--resume refuses others).
    if grep -q 'AVX-512 matmul' "$dir/metrics.partial.json"; then build 1; else build 0; fi
  else
    build "$avx512"
  fi
  echo "$(date -u +%FT%TZ) $study -> $dir ${resume[*]+"${resume[*]}"}"
  "$bin" "$study" --model "$model" --device "$device" --out "$dir" --quiet ${resume[@]+"${resume[@]}"} "$@" \
    >> "$dir.log" 2>&1
  echo "$(date -u +%FT%TZ) $dir: done"
}

run s2ft "$out/s2ft-llm-default" --methods full,lora-r4,s2ft-random-r4
run merge "$out/merge-llm-default" --finetunes "$out/s2ft-llm-default"
run s2ft "$out/s2ft-llm-default-rest" --methods s2ft-act-r4,lora-r16,s2ft-random-r16,s2ft-act-r16
if [ ! -f "$out/s2ft-llm-default-all/metrics.json" ]; then
  build "$avx512"
  # A combined report that cannot be made (see its log) does not stop the merge run.
  if "$bin" s2ft --model "$model" --out "$out/s2ft-llm-default-all" --quiet \
    --combine "$out/s2ft-llm-default,$out/s2ft-llm-default-rest" >> "$out/s2ft-llm-default-all.log" 2>&1; then
    echo "$(date -u +%FT%TZ) $out/s2ft-llm-default-all: combined"
  else
    echo "$(date -u +%FT%TZ) $out/s2ft-llm-default-all: not combined (see its log)"
  fi
fi
run merge "$out/merge-llm-default-rest" --finetunes "$out/s2ft-llm-default-rest"
