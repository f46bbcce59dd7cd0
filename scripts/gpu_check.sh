#!/usr/bin/env bash
# GPU acceptance test, for a lent CUDA machine that reaches nothing outside it (no pip, no apt, no internet).
# It exits non-zero when a method crashes, a number goes non-finite, a compiled run falls back to eager, a run
# stopped and resumed differs from an uninterrupted one, or fp16 (GradScaler) or bf16 diverges. Steps, in order
# (the verdicts first, the measurements after; the report is rewritten after every step):
#   methods    one short epoch of every config in configs/fmnist_proxy (every registered method and AI-KD's
#              variants; the teacher is this step's CE run), host syncs per training step counted
#              (torch.cuda.set_sync_debug_mode; on the CPU a dispatch mode counts the ops that sync on a GPU)
#   resume     AI-KD, deterministic: uninterrupted, repeated, and stopped by SIGTERM mid-epoch 2 then --resume;
#              every epoch record and the summary must be equal
#   precision  CE and AI-KD with train.amp off, fp16 and bf16: finite, error near fp32's and far from chance
#   ddp        the resume check with --nproc 2 (stopped after epoch 1), where two GPUs exist (dry run: gloo)
#   ce/aikd/online-compiled, then -eager   PreAct ResNet-18 on full Fashion-MNIST, 2 epochs, bf16, channels_last:
#              images/s, compiled vs eager, peak GPU memory; a compile fallback fails the check
#   bench      `aikd bench --device cuda`
# Writes OUT/gpu_check.md and .json (the verdicts, each method's run and host syncs, the precision runs,
# throughput, the bench's step ratios), OUT/bench.json and .md, OUT/runs.tar.gz (the runs' small files, records
# and logs) and OUT/gpu_check.log.
#
#   scripts/gpu_check.sh --pack         # here: copy Fashion-MNIST's 4 .gz files (30 MB) into data/fashion-mnist
#   scripts/gpu_check.sh [OUT]          # there: the check (OUT: argument, else $OUT, else results/gpu/DATE)
#   scripts/gpu_check.sh --dry-run      # CPU wiring check: small_cnn, a few hundred images, the same steps
#                                       # (17 min on 2 CPU cores shared with other work, 4 of them the bench)
#
# On the device tool: command `bash scripts/gpu_check.sh`, carry ["data/fashion-mnist"], timeout_s 600; commit
# OUT (results/gpu/DATE) with the report.
# Exit: 0 every check passed, 1 a check failed or a required step failed or was skipped for time, 2 no CUDA
# device (at once), 3 no usable Python with torch, or no Fashion-MNIST.
# Measured on an H200 (results/gpu/2026-12-04): methods 88-91 s, resume 105 s, precision 59 s, a compiled run
# 86-102 s: the required steps fit the default budget, the optional ones as far as it goes.
# Environment: DEVICE (cuda | cpu = --dry-run), BUDGET_S (seconds for all steps: 500, dry run 1500),
# BENCH (auto: full if the budget left allows, else quick | full | quick | skip), STEPS (a subset of
# "methods resume precision ddp ce-compiled aikd-compiled online-compiled ce-eager aikd-eager online-eager bench";
# the eager runs and the bench are optional: skipped for time, they are only noted), PYTHON, FMNIST_ROOT,
# MODEL, EPOCHS, AMP (bf16 | fp16 | auto), KEEP_WORK=1 (keep the runs' scratch folder, a new
# $TMPDIR/gpu_check.*, removed at the end otherwise).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 3
ROOT=$PWD
FILES=(train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz)
DEBIAN_FMNIST=/usr/share/datasets/fashion-mnist
PACKED=data/fashion-mnist

die() { local code=$1; shift; echo "gpu_check: $*" >&2; exit "$code"; }
has_fmnist() { local f; for f in "${FILES[@]}"; do [[ -f $1/$f ]] || return 1; done; }

pack() {
  local src=${FMNIST_ROOT:-$DEBIAN_FMNIST} f
  has_fmnist "$src" || die 3 "Fashion-MNIST's 4 .gz files are not in $src (Debian: apt-get install dataset-fashion-mnist)"
  mkdir -p "$PACKED"
  for f in "${FILES[@]}"; do
    if ! cp -p "$src/$f" "$PACKED/$f" || ! gzip -t "$PACKED/$f"; then die 3 "copying $src/$f failed"; fi
  done
  git check-ignore -q "$PACKED/${FILES[0]}" 2>/dev/null || echo "gpu_check: warning: $PACKED is not git-ignored" >&2
  echo "gpu_check: packed $(du -sh "$PACKED" | cut -f1) into $PACKED; on the device tool: carry [\"$PACKED\"]"
  exit 0
}

DRY=0
ARG_OUT=
for arg in "$@"; do
  case $arg in
    --pack) pack ;;
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) die 3 "unknown option $arg (try --help)" ;;
    *) ARG_OUT=$arg ;;
  esac
done
DEVICE=${DEVICE:-cuda}
[[ $DEVICE == cpu ]] && DRY=1
(( DRY )) && DEVICE=cpu

# --- Python: the repository's .venv if it has torch, else python3 on PATH; the source tree, not an install.
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY='' ENV_JSON='' rc=3
for cand in ${PYTHON:-} .venv/bin/python python3; do
  command -v "$cand" >/dev/null 2>&1 || continue
  ENV_JSON=$("$cand" scripts/gpu_check.py probe --quiet-missing --device "$DEVICE"); rc=$?
  (( rc == 3 )) && continue  # no torch in this one: the next candidate
  PY=$cand; break
done
(( rc == 2 )) && exit 2  # no CUDA device: the probe said why, in one line
[[ -n $PY ]] || die 3 "no Python with torch found (tried ${PYTHON:-} .venv/bin/python python3); set PYTHON"
(( rc == 0 )) || die 3 "probing the machine with $PY failed (rc $rc)"

# --- Fashion-MNIST: FMNIST_ROOT, else the packed copy (carried to the device), else Debian's.
if [[ -n ${FMNIST_ROOT:-} ]]; then DATA_ROOT=$(realpath "$FMNIST_ROOT")
elif has_fmnist "$PACKED"; then DATA_ROOT=$ROOT/$PACKED
elif has_fmnist "$DEBIAN_FMNIST"; then DATA_ROOT=
else die 3 "Fashion-MNIST not found in $PACKED or $DEBIAN_FMNIST: run 'scripts/gpu_check.sh --pack' where it is installed and carry $PACKED"
fi
[[ -z $DATA_ROOT ]] || has_fmnist "$DATA_ROOT" || die 3 "FMNIST_ROOT=$FMNIST_ROOT lacks ${FILES[*]}"

# --- Settings: the GPU check, or tiny ones for the CPU dry run.
# SHORT: the acceptance runs (methods, precision, resume, ddp): few images, so that every method fits.
if (( DRY )); then
  MODEL=${MODEL:-small_cnn} EPOCHS=${EPOCHS:-2} BUDGET_S=${BUDGET_S:-1500} BENCH=${BENCH:-quick}
  LIMITS=(data.train_limit=512 data.test_limit=512)
  SHORT=(data.train_limit=320 data.test_limit=256 data.batch_size=32) STOP_AT=2:4
else
  MODEL=${MODEL:-preact_resnet18} EPOCHS=${EPOCHS:-2} BUDGET_S=${BUDGET_S:-500} BENCH=${BENCH:-auto}
  LIMITS=(data.train_limit=null)
  SHORT=(data.train_limit=6400 data.test_limit=2000 data.batch_size=128) STOP_AT=2:20
fi
AMP=${AMP:-bf16}
STEPS=${STEPS:-methods resume precision ddp ce-compiled aikd-compiled online-compiled ce-eager aikd-eager online-eager bench}
# Measurements, skipped for time and then only noted: the eager runs, the bench, and the third compiled run (the
# verdict "no fallback to eager" is then judged on the compiled runs that did run).
OPTIONAL=" online-compiled ce-eager aikd-eager online-eager bench "
COMMON=(device="$DEVICE" model.name="$MODEL" train.epochs="$EPOCHS" "${LIMITS[@]}" train.amp="$AMP"
        train.channels_last=on train.eval_every=1)
[[ -z $DATA_ROOT ]] || COMMON+=("data.root=$DATA_ROOT")
config() { local c; for c in "configs/$1.yaml" "src/aikd/configs/$1.yaml"; do [[ -f $c ]] && { echo "$c"; return; }; done
           die 3 "config $1.yaml not found under configs/ or src/aikd/configs/"; }
CE_CFG=$(config fashion_mnist/ce) AIKD_CFG=$(config fashion_mnist/aikd) ONLINE_CFG=$(config fmnist_proxy/aikd_online_ema)

OUT=${ARG_OUT:-${OUT:-results/gpu/$(date -u +%Y-%m-%d)}}
mkdir -p "$OUT" || die 3 "cannot create $OUT"
OUT=$(realpath "$OUT")
rm -f "$OUT"/{gpu_check.md,gpu_check.json,gpu_check.log,runs.tar.gz,bench.json,bench.md}  # a previous check's
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || die 3 "cannot create a scratch folder"
mkdir -p "$WORK/records" "$WORK/logs" "$WORK/runs"
printf '%s\n' "$ENV_JSON" >"$WORK/env.json"
exec > >(tee "$OUT/gpu_check.log") 2>&1
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
[[ -n $(git --no-optional-locks status --porcelain 2>/dev/null | head -1) ]] && COMMIT="$COMMIT+dirty"
SETTINGS=(--setting "model=$MODEL" --setting "epochs=$EPOCHS" --setting "limits=${LIMITS[*]}"
          --setting "amp=$AMP" --setting "channels_last=on" --setting "device=$DEVICE"
          --setting "data=${DATA_ROOT:-$DEBIAN_FMNIST}" --setting "python=$PY" --setting "aikd=$COMMIT"
          --setting "budget_s=$BUDGET_S")
report() { "$PY" scripts/gpu_check.py report --work "$WORK" --out "$OUT" "${SETTINGS[@]}" "$@" \
             || echo "gpu_check: writing the report failed" >&2; }
FAILED=0
# shellcheck disable=SC2317  # called by the trap
cleanup() {
  report >/dev/null
  if [[ ${KEEP_WORK:-0} == 1 ]]; then echo "gpu_check: runs kept in $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'echo "gpu_check: interrupted" >&2; exit 143' TERM INT
echo "gpu_check: python $PY, $ENV_JSON"
echo "gpu_check: out $OUT, work $WORK, budget ${BUDGET_S}s, steps: $STEPS"

RESERVE_S=15  # kept for the last report
note() { "$PY" scripts/gpu_check.py step --work "$WORK" "$@"; }
step() {  # step NAME SECONDS_NEEDED COMMAND...: run it within the budget left, log it, record it, rewrite the report
  local name=$1 need=$2 left start rc status; shift 2
  [[ " $STEPS " == *" $name "* ]] || return 0
  left=$(( BUDGET_S - SECONDS - RESERVE_S ))
  if (( left < need )); then
    echo "gpu_check: [$name] skipped: ${left}s of the budget left, it needs ~${need}s"
    if [[ $OPTIONAL == *" $name "* ]]; then
      note "$name" skipped-optional 0 0 "budget: ${left}s left, needs ~${need}s"
    else
      note "$name" skipped 0 0 "budget: ${left}s left, needs ~${need}s"; FAILED=1
    fi
    report >/dev/null; return 0
  fi
  echo "gpu_check: [$name] $(date +%T), ${left}s of the budget left: $*"
  start=$SECONDS
  timeout --kill-after=20 "$left" "$@" 2>&1 | tee "$WORK/logs/$name.log"
  rc=${PIPESTATUS[0]}
  case $rc in 0) status=ok ;; 124|137) status=timed-out ;; *) status=failed ;; esac
  (( rc == 0 )) || FAILED=1
  echo "gpu_check: [$name] $status (rc $rc) after $(( SECONDS - start ))s"
  note "$name" "$status" "$rc" "$(( SECONDS - start ))"
  report >/dev/null
}
run_step() {  # run_step NAME SECONDS_NEEDED AIKD_ARGS...: an aikd command, its training runs recorded (peak memory)
  local name=$1 need=$2; shift 2
  step "$name" "$need" "$PY" scripts/gpu_check.py aikd --record "$WORK/records/$name.json" --device "$DEVICE" -- "$@"
}

# --- The acceptance runs: every method, exact resume, precision, DDP (their verdicts: gpu_check.py check_*).
ACCEPT=(device="$DEVICE" model.name="$MODEL" "${SHORT[@]}" train.amp="$AMP" train.channels_last=on
        train.eval_every=1)
[[ -z $DATA_ROOT ]] || ACCEPT+=("data.root=$DATA_ROOT")
sets() { local a; for a in "$@"; do printf -- '--set\n%s\n' "$a"; done; }
mapfile -t SETS1 < <(sets "${ACCEPT[@]}" train.epochs=1)
mapfile -t SETS2 < <(sets "${ACCEPT[@]}" train.epochs=2)
TEACHER=$WORK/runs/methods/ce/checkpoints/last.safetensors  # the methods step's CE run
PROXY=configs/fmnist_proxy
[[ -d $PROXY ]] || PROXY=src/aikd/configs/fmnist_proxy
step methods 120 "$PY" scripts/gpu_check.py methods --work "$WORK" --device "$DEVICE" --configs "$PROXY" "${SETS1[@]}"
step resume 60 "$PY" scripts/gpu_check.py resume --work "$WORK" --name resume --device "$DEVICE" --config "$AIKD_CFG" \
  --teacher "$TEACHER" --stop-at "$STOP_AT" "${SETS2[@]}"
step precision 60 "$PY" scripts/gpu_check.py precision --work "$WORK" --device "$DEVICE" --config "$CE_CFG" \
  --config "$AIKD_CFG" --teacher "$TEACHER" "${SETS2[@]}"
GPUS=$(printf '%s' "$ENV_JSON" | "$PY" -c 'import json, sys; print(json.load(sys.stdin).get("gpu_count", 0))')
if (( DRY || GPUS >= 2 )); then
  step ddp 90 "$PY" scripts/gpu_check.py resume --work "$WORK" --name ddp --device "$DEVICE" --config "$AIKD_CFG" \
    --teacher "$TEACHER" --nproc 2 "${SETS2[@]}"
elif [[ " $STEPS " == *" ddp "* ]]; then
  echo "gpu_check: [ddp] not run: this machine has $GPUS GPU"
  note ddp "not run" 0 0 "$GPUS GPU: data-parallel needs two"; report >/dev/null
fi

# Throughput: compiled first (a fallback to eager fails the check), then eager (measurements only). An eager run of
# PreAct ResNet-18 on an H200 is start-up plus a few seconds per epoch; a compiled one adds torch.compile (twice:
# the last, smaller batch recompiles), cold in the first compiled run, from the inductor cache in the later ones. An eager run of PreAct ResNet-18 on
for variant in compiled eager; do
  flag=false need=45; [[ $variant == compiled ]] && flag=true need=110  # H200: 86-102 s with a cold compile
  run_step "ce-$variant" "$need" pipeline -c "$CE_CFG" -o "$WORK/runs/ce-$variant" --cache "$WORK/cache-$variant" \
    "${COMMON[@]}" train.compile=$flag
  # Phase 1 is the CE run just above, found in the shared cache: this process trains phase 2 only.
  run_step "aikd-$variant" "$need" pipeline -c "$AIKD_CFG" -o "$WORK/runs/aikd-$variant" --cache "$WORK/cache-$variant" \
    "${COMMON[@]}" train.compile=$flag
  run_step "online-$variant" "$need" train -c "$ONLINE_CFG" -o "$WORK/runs/online-$variant" \
    "${COMMON[@]}" train.compile=$flag
done

# The bench last: its ratios are also in the runs above (vs CE), and much of it runs on the CPU whatever the device
# (loaders, end-to-end small_cnn, peak RSS). Full: every method on small_cnn and PreAct ResNet-18 (~5 min there,
# guessed); quick: small_cnn only, 8 methods (~1.5 min).
mode=$BENCH left=$(( BUDGET_S - SECONDS - RESERVE_S ))
if [[ $mode == auto ]]; then if (( left >= 330 )); then mode=full; else mode=quick; fi; fi
case $mode in
  full) step bench 300 "$PY" -m aikd bench --device "$DEVICE" -o "$OUT/bench.json" ;;
  quick) step bench 60 "$PY" -m aikd bench --quick --device "$DEVICE" -o "$OUT/bench.json" ;;
  skip) ;;
  *) echo "gpu_check: BENCH=$mode is not auto, full, quick or skip" >&2; FAILED=1 ;;
esac

report --print
"$PY" scripts/gpu_check.py verdict --work "$WORK" || FAILED=1
echo "gpu_check: wrote $OUT/gpu_check.md, gpu_check.json, runs.tar.gz, gpu_check.log$([[ -f $OUT/bench.json ]] && echo ', bench.json, bench.md') in ${SECONDS}s; $( (( FAILED )) && echo FAILED || echo passed)"
exit "$FAILED"
