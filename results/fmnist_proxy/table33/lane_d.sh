#!/usr/bin/env bash
# Issue 33, lane D (session of 2026-12-05), from /work/wt/sweep33 at commit 35a3fac (src/ as at eea5d35): USKD's
# feature-layer selection on validation data (docs/results/fmnist_proxy.md states the criterion), then BAKE on the
# table's seeds. USKD's table runs follow with the selected layer, then DDGSD and DLB.
set -euo pipefail
cd /work/wt/sweep33
OMP_NUM_THREADS=1 nice -n 10 .venv/bin/aikd sweep -q -c configs/fmnist_proxy/uskd.yaml --seeds 0 1 2 -o /work/results/proxy33_select \
  --grid uskd.feature_layer=features.7,features.3 data.val_size=5000
OMP_NUM_THREADS=1 nice -n 10 .venv/bin/aikd sweep -q -c configs/fmnist_proxy/bake.yaml --seeds 0 1 2 3 4 -o /work/results/proxy33
OUT=/work/results/proxy33 nice -n 10 scripts/table10.sh 5 6 7 8 9 -- bake
