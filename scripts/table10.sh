#!/usr/bin/env bash
# Issue 22: seeds 5-9 of the proxy table, each seed on its own draw of the training images
# (data.subset_seed = seed), into one results folder. Run from a worktree of a fixed commit:
#   OUT=/work/results/table10 scripts/table10.sh SEEDS... -- CONFIG_NAMES...
# A lane is one serial sweep per seed (one thread per run, as the table's runs); run two lanes
# with disjoint seeds to use both cores. Rerunning resumes (finished runs are reused).
set -euo pipefail
OUT=${OUT:-/work/results/table10}
seeds=()
while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do seeds+=("$1"); shift; done
shift
configs=()
for name in "$@"; do configs+=("configs/fmnist_proxy/$name.yaml"); done
for seed in "${seeds[@]}"; do
  OMP_NUM_THREADS=1 .venv/bin/aikd sweep -q -c "${configs[@]}" --seeds "$seed" -o "$OUT" "data.subset_seed=$seed"
done
