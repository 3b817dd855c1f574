#!/usr/bin/env bash
# Keeps the record of a finished real-model run in the repository: its
# metrics.json, report.md, CSV tables, plots and fine-tune manifest (not its
# models), copied into docs/runs/<name>/ (name: the run folder's, or $2).
# A session's results/ folder does not outlive the session's machine, and a
# default run is split into parts that fit a session: the kept records are
# what `merge --combine` and the README read in a later session.
#   scripts/keep-run.sh RUN_DIR [NAME]
set -euo pipefail
cd "$(dirname "$0")/.."
run="${1:?usage: scripts/keep-run.sh RUN_DIR [NAME]}"
name="${2:-$(basename "$run")}"
if [ ! -f "$run/metrics.json" ]; then
  echo "$run: no metrics.json (an unfinished run is not kept)" >&2
  exit 1
fi
dest="docs/runs/$name"
tmp="$dest.tmp"
rm -rf "$tmp"
mkdir -p "$tmp"
( cd "$run" && find . -maxdepth 1 -type f \( -name 'metrics.json' -o -name 'report.md' \
    -o -name '*.csv' -o -name '*.png' \) -print0 | xargs -0 -I{} cp {} "$OLDPWD/$tmp/" )
if [ -f "$run/finetunes/manifest.json" ]; then
  mkdir -p "$tmp/finetunes"
  cp "$run/finetunes/manifest.json" "$tmp/finetunes/"
fi
big=$(find "$tmp" -type f -size +4M)
if [ -n "$big" ]; then
  echo "not kept, files over 4 MB: $big" >&2
  rm -rf "$tmp"
  exit 1
fi
rm -rf "$dest"
mv "$tmp" "$dest"
echo "kept $run in $dest ($(du -sh "$dest" | cut -f1))"
