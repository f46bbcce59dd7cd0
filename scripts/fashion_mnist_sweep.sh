#!/usr/bin/env bash
# Reproduces docs/results/fashion_mnist.md: every Fashion-MNIST config over 3 seeds.
# Each (config, seed) runs through `aikd pipeline` with one shared phase-1 cache, so
# every seed trains its CE baseline (= AI-KD's superior model = the KD/TF-KD teacher) once.
# Extra arguments are overrides for every run, e.g. data.train_limit=20000.
#   OUT=runs/fm scripts/fashion_mnist_sweep.sh data.train_limit=20000
set -euo pipefail
OUT=${OUT:-runs/fashion_mnist}
AIKD=${AIKD:-.venv/bin/aikd}
CONFIGS=${CONFIGS:-"aikd aikd_no_adv aikd_only_guide aikd_only_progressive kd tfkd_self tfkd_reg cskd pskd dkd"}
for seed in ${SEEDS:-0 1 2}; do
  for name in $CONFIGS; do
    "$AIKD" pipeline -q -c "configs/fashion_mnist/$name.yaml" -o "$OUT/$name/seed$seed" \
      --cache "$OUT/superior" seed=$seed "$@"
  done
done
