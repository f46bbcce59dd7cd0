#!/usr/bin/env bash
# Issue 33, lane B, from /work/wt/sweep33 at commit eea5d35: DDGSD, BAKE and DLB on the table's seeds.
set -euo pipefail
cd /work/wt/sweep33
OMP_NUM_THREADS=1 nice -n 10 .venv/bin/aikd sweep -q -c configs/fmnist_proxy/ddgsd.yaml configs/fmnist_proxy/bake.yaml --seeds 0 1 2 3 4 -o /work/results/proxy33
OUT=/work/results/proxy33 nice -n 10 scripts/table10.sh 5 6 7 8 9 -- ddgsd bake
OMP_NUM_THREADS=1 nice -n 10 .venv/bin/aikd sweep -q -c configs/fmnist_proxy/dlb.yaml --seeds 0 1 2 3 4 -o /work/results/proxy33
OUT=/work/results/proxy33 nice -n 10 scripts/table10.sh 5 6 7 8 9 -- dlb
