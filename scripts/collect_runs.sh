#!/usr/bin/env bash
# Copy the small, readable files of every run under SRC (summary.json, metrics.jsonl, config.yaml,
# reliability.json, and pipeline.json for the phase-1 wall time) to DST with the same layout,
# leaving checkpoints and TensorBoard logs behind, so that `aikd report DST` rebuilds the tables,
# the training cost and the curves from what is committed.
#   scripts/collect_runs.sh runs/fmnist_proxy results/fmnist_proxy/runs/table
set -euo pipefail
src=${1:?source folder}; dst=$(realpath -m "${2:?destination folder}")
cd "$src"
find . \( -name summary.json -o -name metrics.jsonl -o -name config.yaml -o -name reliability.json \
  -o -name pipeline.json \) \
  -not -path "*/checkpoints/*" -print0 | while IFS= read -r -d '' file; do
  mkdir -p "$dst/$(dirname "$file")"
  cp "$file" "$dst/$file"
done
