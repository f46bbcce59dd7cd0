#!/usr/bin/env bash
# Trains CE, PS-KD, CS-KD, AI-KD (buffer and snapshot) and BSS on scikit-learn's digits in deterministic
# mode on the CPU and writes their summaries, without timings, to OUT/summaries.json. Run it on two
# commits and compare the files: an engine change that keeps the numbers gives identical files.
#   OUT=/tmp/before scripts/bit_identity.sh && git checkout NEW && OUT=/tmp/after scripts/bit_identity.sh
#   cmp /tmp/before/summaries.json /tmp/after/summaries.json
set -euo pipefail
cd "$(dirname "$0")/.."
AIKD=${AIKD:-.venv/bin/aikd}
OUT=${OUT:-runs/bit_identity}
export OMP_NUM_THREADS=1
COMMON="data.name=digits model.name=small_cnn data.batch_size=64 deterministic=true device=cpu train.epochs=3 seed=7"
run() {  # run NAME CONFIG [OVERRIDES...]
  local name=$1 config=$2; shift 2
  # shellcheck disable=SC2086
  "$AIKD" pipeline -q -c "$config" -o "$OUT/$name" --cache "$OUT/superior" --overwrite $COMMON "$@" > /dev/null
}
run ce configs/fashion_mnist/ce.yaml
run pskd configs/fashion_mnist/pskd.yaml
run cskd configs/fashion_mnist/cskd.yaml
run aikd_buffer configs/fashion_mnist/aikd.yaml
run aikd_snapshot configs/fashion_mnist/aikd.yaml aikd.prev=snapshot
run bss configs/fashion_mnist/bss.yaml
"${AIKD%/aikd}/python" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
timing = {"time_per_epoch_s", "train_time_s", "run_dir", "teacher"}
runs = {p.parent.parent.name: {k: v for k, v in json.loads(p.read_text()).items() if k not in timing}
        for p in sorted(out.glob("*/student/summary.json"))}
(out / "summaries.json").write_text(json.dumps(runs, indent=1, sort_keys=True))
print(f"{len(runs)} runs -> {out / 'summaries.json'}")
PY
