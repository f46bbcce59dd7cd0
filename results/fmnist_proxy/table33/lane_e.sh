#!/usr/bin/env bash
# Issue 33, lane E (session of 2026-12-05), after lane D, from /work/wt/sweep33 at commit 35a3fac (src/ as at
# eea5d35): USKD with the layer its validation runs chose (features.7, the config's default: 10.13 against
# 10.45 mean validation error over seeds 0-2, results/fmnist_proxy/uskd_select), then DDGSD, on the table's seeds.
set -euo pipefail
cd /work/wt/sweep33
while pgrep -f lane_d.sh > /dev/null; do sleep 30; done
OMP_NUM_THREADS=1 nice -n 10 .venv/bin/aikd sweep -q -c configs/fmnist_proxy/uskd.yaml --seeds 0 1 2 3 4 -o /work/results/proxy33
OUT=/work/results/proxy33 nice -n 10 scripts/table10.sh 5 6 7 8 9 -- uskd
OMP_NUM_THREADS=1 nice -n 10 .venv/bin/aikd sweep -q -c configs/fmnist_proxy/ddgsd.yaml --seeds 0 1 2 3 4 -o /work/results/proxy33
OUT=/work/results/proxy33 nice -n 10 scripts/table10.sh 5 6 7 8 9 -- ddgsd
