#!/usr/bin/env bash
# Issue 33, lane C (session of 2026-12-05; the lanes A and B above were cut off with the machine, none of their
# runs finished), from /work/wt/sweep33 at commit 35a3fac (src/ as at eea5d35): label smoothing, then Zipf's LS,
# on the table's seeds.
set -euo pipefail
cd /work/wt/sweep33
OMP_NUM_THREADS=1 nice -n 10 .venv/bin/aikd sweep -q -c configs/fmnist_proxy/ls.yaml --seeds 0 1 2 3 4 -o /work/results/proxy33
OUT=/work/results/proxy33 nice -n 10 scripts/table10.sh 5 6 7 8 9 -- ls
OMP_NUM_THREADS=1 nice -n 10 .venv/bin/aikd sweep -q -c configs/fmnist_proxy/zipfls.yaml --seeds 0 1 2 3 4 -o /work/results/proxy33
OUT=/work/results/proxy33 nice -n 10 scripts/table10.sh 5 6 7 8 9 -- zipfls
