#!/usr/bin/env bash
# Trains every method and every AI-KD source (previous predictions: buffer, snapshot; superior model:
# pre-trained, EMA, milestone; critic schedules) on scikit-learn's digits in deterministic
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
run aikd_snapshot configs/fashion_mnist/aikd.yaml aikd.previous=snapshot
run bss configs/fashion_mnist/bss.yaml
run kd configs/fashion_mnist/kd.yaml
run tfkd_self configs/fashion_mnist/tfkd_self.yaml
run tfkd_reg configs/fashion_mnist/tfkd_reg.yaml
run dkd configs/fashion_mnist/dkd.yaml
run aekt configs/fashion_mnist/aekt.yaml
run amkd configs/fashion_mnist/amkd.yaml
run aikd_no_adv configs/fashion_mnist/aikd_no_adv.yaml
run aikd_run_length configs/fashion_mnist/aikd.yaml aikd.critic_schedule=run_length
run aikd_online_ema configs/fashion_mnist/aikd.yaml aikd.superior=ema aikd.superior_start=0.34
run aikd_online_milestone configs/fashion_mnist/aikd.yaml aikd.superior=milestone aikd.superior_start=0.34
# The methods users compare against (issue 33) have proxy configs only; digits has no train_limit to take.
for name in ls zipfls uskd bake ddgsd dlb; do
  run "$name" "configs/fmnist_proxy/$name.yaml" data.train_limit=null data.crop_padding=0
done
"${AIKD%/aikd}/python" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
timing = {"time_per_epoch_s", "train_time_s", "run_dir", "teacher", "teacher_sha256"}  # the teacher file holds its times
renamed = {"loss.prev": "loss.progressive"}  # logged terms renamed since (issue 34): commits before it compare too
def untimed(record):
    return {renamed.get(k, k): v for k, v in record.items() if k not in timing and k != "time_s"}
runs = {}
for p in sorted(out.glob("*/student/summary.json")):  # the final numbers and every epoch's record
    epochs = [untimed(json.loads(line)) for line in (p.parent / "metrics.jsonl").read_text().splitlines()]
    runs[p.parent.parent.name] = {**untimed(json.loads(p.read_text())), "epochs": epochs}
(out / "summaries.json").write_text(json.dumps(runs, indent=1, sort_keys=True))
print(f"{len(runs)} runs -> {out / 'summaries.json'}")
PY
