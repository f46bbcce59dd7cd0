#!/usr/bin/env bash
# Reproduces docs/results/fashion_mnist.md: Baseline (phase 1) and the four AI-KD
# variants of the paper's Table 4 on full Fashion-MNIST, 3 seeds, demo recipe.
# Phase-1 models are shared through one cache, so each seed trains its baseline once.
set -euo pipefail
OUT=${OUT:-runs/fashion_mnist_ablation}
AIKD=${AIKD:-.venv/bin/aikd}
for seed in 0 1 2; do
  for variant in aikd aikd_no_adv aikd_only_guide aikd_only_progressive; do
    "$AIKD" pipeline -q -c "configs/fashion_mnist/$variant.yaml" -o "$OUT/$variant/seed$seed" \
      --cache "$OUT/superior" seed=$seed "$@"
  done
done
