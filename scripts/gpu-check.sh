#!/usr/bin/env bash
# GPU check: build the studies with the `cuda` feature, run a few training
# steps of `lmc` and `s2ft` (and of `s2ft --model` on SmolLM2 when fetched) on
# CUDA and on the CPU, and compare the numbers.
# Run it on a machine with an NVIDIA GPU and driver:
#   scripts/gpu-check.sh [OUT_DIR]
# PARTS (default "toy llm") picks what runs: `toy` = lmc and s2ft quick,
# `llm` = the real-model quick run. When one call's time is short, run
# PARTS=toy, then PARTS=llm REBUILD=0 into the same OUT_DIR: the comparison
# needs the toy pairs and adds the real-model pair when it is there.
# Exit status 0 when both backends agree within tolerance (different kernels
# and summation orders: the runs are not bit-identical, only close).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-results/gpu-check}"
mkdir -p "$out"
bin=target/release/experiments
if [ ! -x "$bin" ] || [ "${REBUILD:-1}" = 1 ]; then
  cargo build -p experiments --release --features cuda
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
parts="${PARTS:-toy llm}"
for dev in cpu cuda; do
  [[ " $parts " == *" toy "* ]] || continue
  /usr/bin/env time -f "lmc $dev: %e s" "$bin" lmc --quick --device "$dev" --quiet --out "$out/lmc-$dev"
  /usr/bin/env time -f "s2ft $dev: %e s" "$bin" s2ft --quick --device "$dev" --quiet --out "$out/s2ft-$dev"
done
# The real model, when fetched: a short quick run of the real-model study on each backend.
gguf=models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf
if [ -f "$gguf" ] && [[ " $parts " == *" llm "* ]]; then
  for dev in cpu cuda; do
    /usr/bin/env time -f "s2ft --model $dev: %e s" "$bin" s2ft --model "$gguf" --quick --steps 16 \
      --eval-examples 16 --device "$dev" --quiet --out "$out/s2ft-llm-$dev"
  done
fi
"$bin" compare-runs "$out"
