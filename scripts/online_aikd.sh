#!/usr/bin/env bash
# Online AI-KD in the proxy regime (docs/results/online_aikd.md): choose its settings on validation
# data, then measure it on the test set at equal cost. `--jobs 2` runs two pipelines at once, one
# CPU thread each; finished runs are reused, so running a stage again resumes it.
#   STAGE=select OUT=runs/online scripts/online_aikd.sh        # validation: 3 seeds x 6 settings, plus CE and two-phase AI-KD (~55 min on 2 cores)
#   STAGE=test   OUT=runs/fmnist_proxy scripts/online_aikd.sh  # 5 test seeds of both variants (~25 min)
# STAGE=test writes into the folder of scripts/fmnist_proxy.sh, so that one report holds Baseline,
# CE at equal compute, two-phase AI-KD, PS-KD and the online variants on the same seeds. Set the
# variants' chosen settings in configs/fmnist_proxy/aikd_online_{ema,milestone}.yaml before it.
set -euo pipefail
cd "$(dirname "$0")/.."
AIKD=${AIKD:-.venv/bin/aikd}
OUT=${OUT:-runs/online}
C=configs/fmnist_proxy

if [ "${STAGE:-select}" = select ]; then
  # two-phase AI-KD; its phase 1 (OUT/superior) is the paired Baseline
  "$AIKD" sweep -q --jobs 2 -c $C/aikd.yaml --seeds 0 1 2 -o "$OUT" data.val_size=5000
  "$AIKD" sweep -q --jobs 2 -c $C/aikd_online_ema.yaml --seeds 0 1 2 -o "$OUT" data.val_size=5000 \
    --grid aikd.ema_decay=0.99,0.998 --grid aikd.superior_start=0.25,0.5
  "$AIKD" sweep -q --jobs 2 -c $C/aikd_online_milestone.yaml --seeds 0 1 2 -o "$OUT" data.val_size=5000 \
    --grid aikd.superior_start=0.25,0.5
  "$AIKD" report "$OUT"
else
  "$AIKD" sweep -q --jobs 2 -c $C/aikd_online_ema.yaml $C/aikd_online_milestone.yaml --seeds 0 1 2 3 4 -o "$OUT"
  "$AIKD" report "$OUT" --plots "$OUT/figures"
fi
