#!/usr/bin/env bash
# Online AI-KD in the proxy regime (docs/methods/aikd.md, "Online AI-KD"): choose its settings on
# validation data, then measure it on the test set at equal cost. Two `aikd sweep` processes run at
# once, one CPU thread each, on disjoint seeds; finished runs are reused, so running a stage again
# resumes it.
#   STAGE=select OUT=runs/online scripts/online_aikd.sh   # validation: 3 seeds x 6 settings + CE (~1 h on 2 cores)
#   STAGE=test   OUT=runs/fmnist_proxy scripts/online_aikd.sh   # 5 test seeds of both variants (~40 min)
#   aikd report runs/fmnist_proxy     # the paired table and the training-cost table, with the two-phase rows
# STAGE=test writes into the folder of scripts/fmnist_proxy.sh, so that one report holds Baseline,
# CE at equal compute, two-phase AI-KD, PS-KD and the online variants on the same seeds. Set the
# variants' chosen settings in configs/fmnist_proxy/aikd_online_{ema,milestone}.yaml before it.
set -euo pipefail
cd "$(dirname "$0")/.."
AIKD=${AIKD:-.venv/bin/aikd}
OUT=${OUT:-runs/online}
export OMP_NUM_THREADS=1
C=configs/fmnist_proxy

if [ "${STAGE:-select}" = select ]; then
  half() {  # half SEEDS...: CE (the paired Baseline), then the EMA grid and the milestone grid, on validation
    "$AIKD" sweep -q -c $C/ce.yaml $C/aikd.yaml --seeds "$@" -o "$OUT" data.val_size=5000
    "$AIKD" sweep -q -c $C/aikd_online_ema.yaml --seeds "$@" -o "$OUT" data.val_size=5000 \
      --grid aikd.ema_decay=0.99,0.998 --grid aikd.superior_start=0.25,0.5
    "$AIKD" sweep -q -c $C/aikd_online_milestone.yaml --seeds "$@" -o "$OUT" data.val_size=5000 \
      --grid aikd.superior_start=0.25,0.5
  }
  half 0 2 & half 1 &
  wait
  "$AIKD" report "$OUT"
else
  "$AIKD" sweep -q -c $C/aikd_online_ema.yaml $C/aikd_online_milestone.yaml --seeds 0 2 4 -o "$OUT" &
  "$AIKD" sweep -q -c $C/aikd_online_ema.yaml $C/aikd_online_milestone.yaml --seeds 1 3 -o "$OUT" &
  wait
  "$AIKD" report "$OUT" --plots "$OUT/figures"
fi
