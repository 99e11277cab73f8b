#!/usr/bin/env bash
# Paired whole-process timing of our split_mnist runs (`experiments.main`, DER++ and EsaCL)
# against the field's PyTorch reference, mammoth (DER++ on seq-mnist, buffer 500, the DER paper's
# settings), on one machine. Runs are fresh processes, interleaved per seed:
#   ours derpp (cold), mammoth, ours derpp (warm cache)[, ours esacl cold, ours esacl warm]
# Appends one CSV line per run to $OUT_CSV:
#   impl,seed,wall_s,cpu_s,class_il,task_il,rc,started_at,setting
# wall_s/cpu_s from /usr/bin/time (%e, %U+%S; children such as DataLoader workers included);
# class_il/task_il are final average accuracies in percent (ours: results.json; mammoth: the
# last "Accuracy for 5 task(s)" line); setting names the thread/core setting of the row.
#
# Mammoth is not part of this project: point MAMMOTH_DIR at a checkout and MAMMOTH_PY at a Python
# with torch and torchvision (and mammoth's requirements.txt). Its MNIST files must be where
# torchvision looks (MAMMOTH_DIR/data/MNIST/{MNIST,MyMNIST}/raw/*-ubyte, decompressed), so it
# downloads nothing. Both layouts work:
#   - the current release (MAMMOTH_DIR/main.py, e.g. commit e75a491): DER++ with --lr 0.03
#     --alpha 1.0 --beta 0.5 --batch_size 10 --minibatch_size 10 --n_epochs 1 (its
#     --load_best_args no longer holds seq-mnist's values);
#   - the 2020 release (MAMMOTH_DIR/utils/main.py): --load_best_args, which gives the same values.
# Offline, the current release cannot start: its seq-8vision dataset builds a CLIP model and
# downloads its weights at import time. With MAMMOTH_STUB_OPEN_CLIP=1 (default) an `open_clip`
# stand-in whose create_model_and_transforms returns nothing is put first on PYTHONPATH; seq-mnist
# never uses it, and it only makes mammoth's start-up shorter than a user's (who also builds a
# ViT-B/16 at import).
#
# Usage: MAMMOTH_DIR=... MAMMOTH_PY=... experiments/bench/time_vs_mammoth.sh [N]
#        N pairs (default 3); pair i uses seed SEED0+i.
# Env:   SEED0=0  WITH_CACHE=1 (also time ours with a persistent compilation cache, pre-warmed by
#        one untimed run)  WITH_ESACL=1 (also time our EsaCL, cold and warm)
#        MAMMOTH_THREADS=1 (torch intra-op threads; the current release hard-codes
#        torch.set_num_threads(2): a sitecustomize on PYTHONPATH caps it; empty: as shipped)
#        MAMMOTH_WORKERS=0 (its DataLoader --num_workers: 0 loads batches in the training
#        process, mammoth's fastest on a 2-core machine, where worker processes compete with
#        training for the cores; set empty for mammoth's own default, min(8, CPUs), which every
#        row of docs/speed/time_vs_mammoth*.csv up to e75a491 was measured with)
#        PIN_CPU= (e.g. 0: run every process, ours and mammoth, under `taskset -c 0`)
#        OUT_CSV=timings.csv  KEEP_LOGS=0 (1: keep run logs)
#        OURS_EXTRA="--config.tensorboard=False --config.progress=False" (as experiments/bench/runs.py)
#        OURS_DIR (this repository), OURS_PY (its .venv python), DATA_DIR ($ESACL_DATA_DIR, else
#        ../shared/data)
set -euo pipefail

N="${1:-3}"
SEED0="${SEED0:-0}"
WITH_CACHE="${WITH_CACHE:-1}"
WITH_ESACL="${WITH_ESACL:-1}"
MAMMOTH_THREADS="${MAMMOTH_THREADS-1}"
MAMMOTH_WORKERS="${MAMMOTH_WORKERS-0}"
MAMMOTH_STUB_OPEN_CLIP="${MAMMOTH_STUB_OPEN_CLIP:-1}"
PIN_CPU="${PIN_CPU:-}"
OUT_CSV="${OUT_CSV:-timings.csv}"
KEEP_LOGS="${KEEP_LOGS:-0}"
OURS_DIR="${OURS_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
OURS_PY="${OURS_PY:-$OURS_DIR/.venv/bin/python}"
DATA_DIR="${DATA_DIR:-${ESACL_DATA_DIR:-$OURS_DIR/../shared/data}}"
OURS_EXTRA="${OURS_EXTRA:---config.tensorboard=False --config.progress=False}"
: "${MAMMOTH_DIR:?set MAMMOTH_DIR to a mammoth checkout}"
: "${MAMMOTH_PY:?set MAMMOTH_PY to a python with torch and torchvision}"

for f in "$OURS_PY" "$MAMMOTH_PY"; do
  [[ -e "$f" ]] || { echo "missing: $f" >&2; exit 1; }
done
if [[ -e "$MAMMOTH_DIR/main.py" ]]; then
  MAMMOTH_MAIN=main.py
  MAMMOTH_ARGS=(--model derpp --dataset seq-mnist --buffer_size 500 --lr 0.03 --alpha 1.0
                --beta 0.5 --batch_size 10 --minibatch_size 10 --n_epochs 1)
elif [[ -e "$MAMMOTH_DIR/utils/main.py" ]]; then
  MAMMOTH_MAIN=utils/main.py
  MAMMOTH_ARGS=(--model derpp --load_best_args --dataset seq-mnist --buffer_size 500)
else
  echo "missing: $MAMMOTH_DIR/main.py (current mammoth) or utils/main.py (2020 release)" >&2
  exit 1
fi
[[ -z "$MAMMOTH_WORKERS" ]] || MAMMOTH_ARGS+=(--num_workers "$MAMMOTH_WORKERS")
[[ "$N" =~ ^[1-9][0-9]*$ ]] || { echo "N must be a positive integer, got '$N'" >&2; exit 2; }
[[ -z "$MAMMOTH_THREADS" || "$MAMMOTH_THREADS" =~ ^[1-9][0-9]*$ ]] || {
  echo "MAMMOTH_THREADS must be a positive integer or empty, got '$MAMMOTH_THREADS'" >&2; exit 2; }
[[ -z "$MAMMOTH_WORKERS" || "$MAMMOTH_WORKERS" =~ ^[0-9]+$ ]] || {
  echo "MAMMOTH_WORKERS must be a number of workers (0: none) or empty, got '$MAMMOTH_WORKERS'" >&2
  exit 2; }
[[ -z "$PIN_CPU" || "$PIN_CPU" =~ ^[0-9]+$ ]] || {
  echo "PIN_CPU must be a CPU number or empty, got '$PIN_CPU'" >&2; exit 2; }

TMP="$(mktemp -d /tmp/time_pairs.XXXXXX)"
cleanup() {
  if [[ "$KEEP_LOGS" == 1 ]]; then echo "logs kept in $TMP" >&2; else rm -rf "$TMP"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Mammoth's start-up shims (see the header): only what the environment asks for.
SHIM="$TMP/shim"
mkdir -p "$SHIM"
if [[ "$MAMMOTH_STUB_OPEN_CLIP" == 1 ]]; then
  mkdir -p "$SHIM/open_clip"
  cat >"$SHIM/open_clip/__init__.py" <<'PY'
"""Offline stand-in: mammoth's seq-8vision builds a CLIP model at import; seq-mnist never uses it."""


def create_model_and_transforms(*args, **kwargs):
    return None, None, None
PY
fi
if [[ -n "$MAMMOTH_THREADS" ]]; then
  cat >"$SHIM/sitecustomize.py" <<PY
"""Caps torch's intra-op threads at $MAMMOTH_THREADS (mammoth calls torch.set_num_threads(2))."""
try:
    import torch
except ImportError:  # not a torch process
    torch = None
if torch is not None:
    _set = torch.set_num_threads
    torch.set_num_threads = lambda n: _set(min(int(n), $MAMMOTH_THREADS))
    torch.set_num_threads($MAMMOTH_THREADS)
PY
fi
SETTING="mammoth_threads=${MAMMOTH_THREADS:-shipped};workers=${MAMMOTH_WORKERS:-default};pin=${PIN_CPU:-none}"
PIN=()
[[ -z "$PIN_CPU" ]] || PIN=(taskset -c "$PIN_CPU")

mkdir -p "$(dirname "$OUT_CSV")"
[[ -s "$OUT_CSV" ]] || echo "impl,seed,wall_s,cpu_s,class_il,task_il,rc,started_at,setting" > "$OUT_CSV"

if [[ -x /usr/bin/time ]]; then
  timed() {  # timed TIMEFILE CMD...: runs CMD, writes "wall user sys" to TIMEFILE
    local tf="$1"; shift
    /usr/bin/time -f '%e %U %S' -o "$tf" "$@"
  }
else
  timed() {
    local tf="$1"; shift
    local TIMEFORMAT='%R %U %S'
    { time "$@" 2>&3 ; } 3>&2 2>"$tf"
  }
fi

FAILED=0
record() {  # record IMPL SEED RC TIMEFILE CLASS_IL TASK_IL STARTED
  local impl="$1" seed="$2" rc="$3" tf="$4" cil="$5" til="$6" started="$7"
  local wall=NA cpu=NA
  if [[ -s "$tf" ]]; then
    read -r wall usr sys < <(tail -n 1 "$tf") || true
    cpu="$(awk -v u="${usr:-0}" -v s="${sys:-0}" 'BEGIN{printf "%.2f", u+s}')"
  fi
  echo "$impl,$seed,$wall,$cpu,$cil,$til,$rc,$started,$SETTING" >> "$OUT_CSV"
  echo "$impl seed=$seed wall=${wall}s cpu=${cpu}s class_il=$cil task_il=$til rc=$rc" >&2
  [[ "$rc" == 0 ]] || FAILED=1
}

run_ours() {  # run_ours METHOD CACHE(cold|warm) SEED [record|norecord]
  local method="$1" cache="$2" seed="$3" mode="${4:-record}"
  local impl="ours_${method}_${cache}"
  local d="$TMP/$impl.s$seed.$RANDOM" rc=0 cil=NA til=NA started cache_env
  mkdir -p "$d"
  started="$(date -Is)"
  if [[ "$cache" == cold ]]; then cache_env="$TMP/no-cache-unused"; else cache_env="$TMP/xla_cache"; fi
  # shellcheck disable=SC2086
  (cd "$OURS_DIR" && export ESACL_COMPILATION_CACHE="$([[ $cache == cold ]] && echo 0 || echo "$cache_env")" \
    && timed "$d/time" "${PIN[@]}" "$OURS_PY" -m experiments.main \
        --config=experiments/configs/split_mnist.py:"$method" --config.seed="$seed" \
        --config.data_dir="$DATA_DIR" $OURS_EXTRA --workdir="$d/run" \
        >"$d/stdout" 2>"$d/stderr") || rc=$?
  if [[ -s "$d/run/results.json" ]]; then
    read -r cil til < <("$OURS_PY" -c 'import json,sys
m = json.load(open(sys.argv[1]))["metrics"]
print("%.2f %.2f" % (100 * m["class_il"]["average_accuracy"], 100 * m["task_il"]["average_accuracy"]))' \
      "$d/run/results.json") || true
    cil="${cil:-NA}" til="${til:-NA}"
  fi
  [[ "$rc" == 0 ]] || tail -n 3 "$d/stderr" >&2 || true
  if [[ "$mode" == record ]]; then record "$impl" "$seed" "$rc" "$d/time" "$cil" "$til" "$started"; fi
  [[ "$KEEP_LOGS" == 1 ]] || rm -rf "$d/run"
}

run_mammoth() {  # run_mammoth SEED
  local seed="$1"
  local d="$TMP/mammoth.s$seed.$RANDOM" rc=0 cil=NA til=NA started line
  mkdir -p "$d"
  started="$(date -Is)"
  (cd "$MAMMOTH_DIR" && PYTHONPATH="$SHIM:." timed "$d/time" "${PIN[@]}" "$MAMMOTH_PY" \
      "$MAMMOTH_MAIN" "${MAMMOTH_ARGS[@]}" --seed "$seed" \
      >"$d/stdout" 2>"$d/stderr") || rc=$?
  # stderr holds \r progress bars; the accuracy lines are printed after a newline.
  line="$(cat "$d/stdout" "$d/stderr" | tr '\r' '\n' | grep -a 'Accuracy for 5 task(s)' | tail -n 1 || true)"
  if [[ -n "$line" ]]; then
    cil="$(sed -E 's/.*\[Class-IL\]: ([0-9.]+) %.*/\1/' <<<"$line")"
    til="$(sed -E 's/.*\[Task-IL\]: ([0-9.]+) %.*/\1/' <<<"$line")"
  fi
  [[ "$rc" == 0 ]] || tail -c 600 "$d/stderr" >&2 || true
  record mammoth "$seed" "$rc" "$d/time" "$cil" "$til" "$started"
}

METHODS=(derpp)
[[ "$WITH_ESACL" != 1 ]] || METHODS+=(esacl)
if [[ "$WITH_CACHE" == 1 ]]; then
  echo "pre-warming the compilation cache (untimed runs, seed $SEED0)" >&2
  for m in "${METHODS[@]}"; do run_ours "$m" warm "$SEED0" norecord; done
fi

for ((i = 0; i < N; i++)); do
  seed=$((SEED0 + i))
  echo "== pair $((i + 1))/$N (seed $seed, $SETTING)" >&2
  run_ours derpp cold "$seed"
  run_mammoth "$seed"
  if [[ "$WITH_CACHE" == 1 ]]; then run_ours derpp warm "$seed"; fi
  if [[ "$WITH_ESACL" == 1 ]]; then
    run_ours esacl cold "$seed"
    if [[ "$WITH_CACHE" == 1 ]]; then run_ours esacl warm "$seed"; fi
  fi
done

echo "appended to $OUT_CSV" >&2
exit "$FAILED"
