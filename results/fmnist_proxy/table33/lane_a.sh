#!/usr/bin/env bash
# Issue 33, lane A, from /work/wt/sweep33 at commit eea5d35: USKD's feature-layer selection (validation), then
# label smoothing and Zipf's LS on the table's seeds; USKD's table runs follow with the selected layer.
set -euo pipefail
cd /work/wt/sweep33
OMP_NUM_THREADS=1 nice -n 10 .venv/bin/aikd sweep -q -c configs/fmnist_proxy/uskd.yaml --seeds 0 1 2 -o /work/results/proxy33_select \
  --grid uskd.feature_layer=features.7,features.3 data.val_size=5000
OMP_NUM_THREADS=1 nice -n 10 .venv/bin/aikd sweep -q -c configs/fmnist_proxy/ls.yaml configs/fmnist_proxy/zipfls.yaml --seeds 0 1 2 3 4 -o /work/results/proxy33
OUT=/work/results/proxy33 nice -n 10 scripts/table10.sh 5 6 7 8 9 -- ls zipfls
