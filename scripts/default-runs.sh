#!/usr/bin/env bash
# The default-size real-model runs, as units that each fit a session on a
# 2-core CPU (1–2 h on the AMD EPYC of 2026-12-06; the Intel Xeon of the
# same day is about 2.5x slower), each run kept in the repository when it
# ends:
#   full, lora-r4, s2ft-random-r4   one fine-tuning family: `s2ft --model
#       --methods M` (its learning-rate sweep on acronym, then every task)
#       into OUT/s2ft-llm-M, then the default `merge --model` run on those
#       fine-tunes into OUT/merge-llm-M
#   merge   `merge --combine` of the three families' kept merge runs: the
#       merge study's families table and plots, into OUT/merge-llm-default
#   s2ft-act-r4, lora-r16, s2ft-random-r16, s2ft-act-r16   `s2ft --model
#       --methods M` into OUT/s2ft-llm-M
#   s2ft    `s2ft --combine` of the seven methods' kept runs: the fine-tuning
#       study's table and plots, into OUT/s2ft-llm-default
# A session's OUT folder does not outlive its machine, so each finished run
# is copied without its models into docs/runs/<run>/ (scripts/keep-run.sh):
# a run kept there is not run again, and the combining units read the kept
# records. An interrupted run (its `metrics.partial.json`) continues with
# `--resume` when the same command is run again on the same machine; the log
# is OUT/<run>.log.
#   scripts/default-runs.sh [OUT_DIR [UNIT...]]   (default: results, every unit in order)
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
shift || true
units=("$@")
families=(full lora-r4 s2ft-random-r4)
rest=(s2ft-act-r4 lora-r16 s2ft-random-r16 s2ft-act-r16)
[ ${#units[@]} -gt 0 ] || units=("${families[@]}" merge "${rest[@]}" s2ft)
model="${MODEL:-models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf}"
device="${DEVICE:-cpu}"
bin=target/release/experiments
kept=docs/runs
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
# earlier call was interrupted, skipping it if it finished; keeps it.
run() {
  local study="$1" dir="$2"
  shift 2
  if [ -f "$kept/$(basename "$dir")/metrics.json" ]; then
    echo "$dir: kept in $kept earlier"
    return
  fi
  if [ ! -f "$dir/metrics.json" ]; then
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
  fi
  scripts/keep-run.sh "$dir"
}

# The kept records of runs "$1"-<each of the rest>, comma-separated; exits
# naming the first one not kept yet.
kept_list() {
  local prefix="$1" list=() r
  shift
  for r in "$@"; do
    if [ ! -f "$kept/$prefix-$r/metrics.json" ]; then
      echo "$kept/$prefix-$r is not kept yet: run unit $r first" >&2
      exit 1
    fi
    list+=("$kept/$prefix-$r")
  done
  (IFS=,; echo "${list[*]}")
}

for unit in "${units[@]}"; do
  case "$unit" in
    full | lora-r4 | s2ft-random-r4)
      run s2ft "$out/s2ft-llm-$unit" --methods "$unit"
      if [ -f "$kept/merge-llm-$unit/metrics.json" ]; then
        echo "$out/merge-llm-$unit: kept in $kept earlier"
        continue
      fi
      # The merge run reads the fine-tunes, which only the session that trained them has.
      if [ ! -d "$out/s2ft-llm-$unit/finetunes" ]; then
        echo "$unit: its fine-tunes are not in $out/s2ft-llm-$unit (kept from another session): remove $kept/s2ft-llm-$unit to train them again" >&2
        exit 1
      fi
      run merge "$out/merge-llm-$unit" --finetunes "$out/s2ft-llm-$unit"
      ;;
    merge)
      parts=$(kept_list merge-llm "${families[@]}")
      run merge "$out/merge-llm-default" --combine "$parts"
      ;;
    s2ft-act-r4 | lora-r16 | s2ft-random-r16 | s2ft-act-r16)
      run s2ft "$out/s2ft-llm-$unit" --methods "$unit"
      ;;
    s2ft)
      parts=$(kept_list s2ft-llm "${families[@]}" "${rest[@]}")
      run s2ft "$out/s2ft-llm-default" --combine "$parts"
      ;;
    *)
      echo "unknown unit '$unit' (units: ${families[*]} merge ${rest[*]} s2ft)" >&2
      exit 2
      ;;
  esac
done
