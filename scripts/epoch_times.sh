#!/usr/bin/env bash
# Per-epoch wall time of every Fashion-MNIST method relative to CE, measured one after another
# on the same 5 000 images with the same teacher and nothing else running (the sweep's own times
# come from two runs sharing the CPU, so they are not comparable). Each method trains 2 epochs and
# the second is timed, so start-up and first-touch costs are left out:
#   TEACHER=runs/fashion_mnist/superior/<run>/checkpoints/last.safetensors scripts/epoch_times.sh
set -euo pipefail
OUT=${OUT:-runs/epoch_times}
AIKD=${AIKD:-.venv/bin/aikd}
: "${TEACHER:?set TEACHER to a trained small_cnn Fashion-MNIST checkpoint}"
for name in ce aikd aikd_no_adv aikd_only_guide aikd_only_progressive kd tfkd_self tfkd_reg cskd pskd dkd aekt bss amkd; do
  "$AIKD" train -q -c "configs/fashion_mnist/$name.yaml" -o "$OUT/$name" --overwrite \
    train.epochs=2 data.train_limit=5000 data.test_limit=1000 teacher.checkpoint="$TEACHER" > /dev/null
done
.venv/bin/python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
root = Path(sys.argv[1])
rows = {p.name: json.loads((p / "metrics.jsonl").read_text().splitlines()[-1])["time_s"]
        for p in sorted(root.iterdir())}
base = rows["ce"]
print("| method | s / epoch (5 000 images) | vs CE |\n|---|---:|---:|")
for name, seconds in rows.items():
    print(f"| {name} | {seconds:.2f} | {seconds / base:.2f}x |")
PY
