#!/usr/bin/env bash
# Reproduces the tables of docs/results/fmnist_proxy.md: every configs/fmnist_proxy method on the
# test set, 5 seeds for the self-KD rows and the equal-compute Baseline, 3 seeds for the
# teacher-student rows. Two `aikd sweep` processes run at once, one CPU thread each, on disjoint
# seeds, so no two processes ever train the same phase-1 model (each seed's CE model is the
# Baseline row, AI-KD's superior model and the teacher of KD, DKD, AEKT, BSS and AMKD).
# Finished runs are reused, so running the script again resumes a stopped table.
#   OUT=runs/fmnist_proxy scripts/fmnist_proxy.sh            # about 2.5 hours on 2 cores
#   STAGE=sensitivity OUT=runs/fmnist_proxy scripts/fmnist_proxy.sh   # Tables 5-6 / Fig. 7 grid, after the table
set -euo pipefail
cd "$(dirname "$0")/.."
AIKD=${AIKD:-.venv/bin/aikd}
OUT=${OUT:-runs/fmnist_proxy}
FIVE=${FIVE:-"aikd aikd_no_adv aikd_only_guide aikd_only_progressive pskd cskd tfkd_self tfkd_reg ce_equal_compute"}
THREE=${THREE:-"kd dkd aekt bss amkd"}
export OMP_NUM_THREADS=1

configs() { for name in "$@"; do echo "configs/fmnist_proxy/$name.yaml"; done; }
sweep() {  # sweep SEEDS... -- CONFIG NAMES...
  local seeds=() names=()
  while [ "$1" != "--" ]; do seeds+=("$1"); shift; done
  shift
  # shellcheck disable=SC2046
  "$AIKD" sweep -q -c $(configs "$@") --seeds "${seeds[@]}" -o "$OUT"
}

if [ "${STAGE:-table}" = table ]; then
  # shellcheck disable=SC2086
  { sweep 0 2 4 -- $FIVE && sweep 2 -- $THREE; } &
  # shellcheck disable=SC2086
  { sweep 1 3 -- $FIVE && sweep 1 0 -- $THREE; } &
  wait
else
  # AI-KD's sensitivity (paper Tables 5-6, Fig. 7): one key at a time around the defaults
  # (a_G 0.1, a_P 0.3, T_G 3, w 0.1, which are the table's AI-KD row), 3 seeds.
  # Each seed's superior model comes from the table's cache; the grid runs go to OUT/sensitivity.
  export AIKD OUT
  grid() {
    "$AIKD" sweep -q -c configs/fmnist_proxy/aikd.yaml --seeds 0 1 2 -o "$OUT/sensitivity" --cache "$OUT/superior" \
      --grid "$1"
  }
  export -f grid
  printf '%s\n' aikd.alpha_g=0.05,0.2 aikd.alpha_p=0.1,0.5 aikd.temp_g=1.0,5.0 aikd.adv_weight=0.01,0.5 |
    xargs -P 2 -I{} bash -c 'grid {}'
fi
