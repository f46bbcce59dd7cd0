#!/usr/bin/env bash
# Issue 33, lane F (session of 2026-12-05), after lane C, from /work/wt/sweep33 at commit 35a3fac: DLB on the
# table's seeds.
set -euo pipefail
cd /work/wt/sweep33
while pgrep -f lane_c.sh > /dev/null; do sleep 30; done
OMP_NUM_THREADS=1 nice -n 10 .venv/bin/aikd sweep -q -c configs/fmnist_proxy/dlb.yaml --seeds 0 1 2 3 4 -o /work/results/proxy33
OUT=/work/results/proxy33 nice -n 10 scripts/table10.sh 5 6 7 8 9 -- dlb
