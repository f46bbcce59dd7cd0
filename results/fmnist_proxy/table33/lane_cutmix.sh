#!/usr/bin/env bash
# Issue 33: CE + CutMix on the proxy table's seeds, from /work/wt/check at commit c6727e6
set -euo pipefail
cd /work/wt/check
OMP_NUM_THREADS=1 .venv/bin/aikd sweep -q -c configs/fmnist_proxy/ce_cutmix.yaml --seeds 0 1 2 3 4 -o /work/results/proxy33
OUT=/work/results/proxy33 scripts/table10.sh 5 6 7 8 9 -- ce_cutmix
