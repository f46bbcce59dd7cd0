#!/usr/bin/env bash
# Reproduces docs/results/fashion_mnist.md: every Fashion-MNIST config over 3 seeds.
# Each (config, seed) runs through `aikd pipeline` with one shared phase-1 cache, so
# every seed trains its CE baseline (= AI-KD's superior model = the KD/TF-KD teacher) once.
# Extra arguments are overrides for every run. JOBS runs that many pipelines at once,
# one CPU thread each (the first config of every seed runs first and trains the cache).
# Finished runs with the same config are reused, so a stopped sweep resumes where it was.
#   OUT=runs/fm JOBS=2 scripts/fashion_mnist_sweep.sh data.train_limit=20000
set -euo pipefail
OUT=${OUT:-runs/fashion_mnist}
AIKD=${AIKD:-.venv/bin/aikd}
JOBS=${JOBS:-1}
SEEDS=${SEEDS:-"0 1 2"}
CONFIGS=${CONFIGS:-"aikd aikd_no_adv aikd_only_guide aikd_only_progressive kd tfkd_self tfkd_reg cskd pskd dkd aekt bss amkd"}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$([ "$JOBS" -gt 1 ] && echo 1 || nproc)}
OVERRIDES="$*"  # overrides hold no spaces (KEY=VALUE)
run() {  # run CONFIG SEED
  # shellcheck disable=SC2086
  "$AIKD" pipeline -q -c "configs/fashion_mnist/$1.yaml" -o "$OUT/$1/seed$2" \
    --cache "$OUT/superior" seed="$2" $OVERRIDES || echo "FAILED: $1 seed $2" >&2
}
export -f run; export OUT AIKD OVERRIDES
first=${CONFIGS%% *}
rest=${CONFIGS#"$first"}
for seed in $SEEDS; do echo "$first $seed"; done | xargs -P "$JOBS" -L1 bash -c 'run "$0" "$1"'
for seed in $SEEDS; do for name in $rest; do echo "$name $seed"; done; done | xargs -P "$JOBS" -L1 bash -c 'run "$0" "$1"'
