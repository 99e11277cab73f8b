#!/usr/bin/env bash
# Paired whole-process timing of our DER++ (split_mnist, `experiments.main`) against the field's
# PyTorch reference, mammoth (DER++ on seq-mnist, buffer 500, --load_best_args), on one machine.
# Runs are fresh processes, interleaved (ours, mammoth[, ours with a warm compilation cache]).
# Appends one CSV line per run to $OUT_CSV:
#   impl,seed,wall_s,cpu_s,class_il,task_il,rc,started_at
# wall_s/cpu_s from /usr/bin/time (%e, %U+%S; children such as DataLoader workers included);
# class_il/task_il are final average accuracies in percent (ours: results.json; mammoth: the
# last "Accuracy for 5 task(s)" line on stderr).
#
# Mammoth is not part of this project: point MAMMOTH_DIR at a checkout (with its MNIST files
# under data/, so it downloads nothing) and MAMMOTH_PY at a Python with torch and torchvision.
#
# Usage: MAMMOTH_DIR=... MAMMOTH_PY=... experiments/time_vs_mammoth.sh [N]
#        N pairs (default 3); pair i uses seed SEED0+i.
# Env:   SEED0=0  WITH_CACHE=1 (also time `ours_cache`: persistent compilation cache on,
#        pre-warmed by one untimed run)  OUT_CSV=timings.csv  KEEP_LOGS=0 (1: keep run logs)
#        OURS_EXTRA="--config.tensorboard=False --config.progress=False" (as experiments/bench.py)
#        OURS_DIR (this repository), OURS_PY (its .venv python), DATA_DIR ($ESACL_DATA_DIR, else
#        ../shared/data)
set -euo pipefail

N="${1:-3}"
SEED0="${SEED0:-0}"
WITH_CACHE="${WITH_CACHE:-1}"
OUT_CSV="${OUT_CSV:-timings.csv}"
KEEP_LOGS="${KEEP_LOGS:-0}"
OURS_DIR="${OURS_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
OURS_PY="${OURS_PY:-$OURS_DIR/.venv/bin/python}"
DATA_DIR="${DATA_DIR:-${ESACL_DATA_DIR:-$OURS_DIR/../shared/data}}"
OURS_EXTRA="${OURS_EXTRA:---config.tensorboard=False --config.progress=False}"
: "${MAMMOTH_DIR:?set MAMMOTH_DIR to a mammoth checkout}"
: "${MAMMOTH_PY:?set MAMMOTH_PY to a python with torch and torchvision}"

for f in "$OURS_PY" "$MAMMOTH_PY" "$MAMMOTH_DIR/utils/main.py"; do
  [[ -e "$f" ]] || { echo "missing: $f" >&2; exit 1; }
done
[[ "$N" =~ ^[1-9][0-9]*$ ]] || { echo "N must be a positive integer, got '$N'" >&2; exit 2; }

TMP="$(mktemp -d /tmp/time_pairs.XXXXXX)"
cleanup() {
  if [[ "$KEEP_LOGS" == 1 ]]; then echo "logs kept in $TMP" >&2; else rm -rf "$TMP"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

mkdir -p "$(dirname "$OUT_CSV")"
[[ -s "$OUT_CSV" ]] || echo "impl,seed,wall_s,cpu_s,class_il,task_il,rc,started_at" > "$OUT_CSV"

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
  echo "$impl,$seed,$wall,$cpu,$cil,$til,$rc,$started" >> "$OUT_CSV"
  echo "$impl seed=$seed wall=${wall}s cpu=${cpu}s class_il=$cil task_il=$til rc=$rc" >&2
  [[ "$rc" == 0 ]] || FAILED=1
}

run_ours() {  # run_ours IMPL SEED [record|norecord]; IMPL ours (cache off) or ours_cache
  local impl="$1" seed="$2" mode="${3:-record}"
  local d="$TMP/$impl.s$seed.$RANDOM" rc=0 cil=NA til=NA started
  mkdir -p "$d"
  started="$(date -Is)"
  # shellcheck disable=SC2086
  if [[ "$impl" == ours ]]; then
    (cd "$OURS_DIR" && ESACL_COMPILATION_CACHE=0 timed "$d/time" "$OURS_PY" -m experiments.main \
        --config=experiments/configs/split_mnist.py:derpp --config.seed="$seed" \
        --config.data_dir="$DATA_DIR" $OURS_EXTRA --workdir="$d/run" \
        >"$d/stdout" 2>"$d/stderr") || rc=$?
  else
    (cd "$OURS_DIR" && unset ESACL_COMPILATION_CACHE && timed "$d/time" "$OURS_PY" -m experiments.main \
        --config=experiments/configs/split_mnist.py:derpp --config.seed="$seed" \
        --config.data_dir="$DATA_DIR" $OURS_EXTRA --workdir="$d/run" \
        >"$d/stdout" 2>"$d/stderr") || rc=$?
  fi
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
  (cd "$MAMMOTH_DIR" && PYTHONPATH=. timed "$d/time" "$MAMMOTH_PY" utils/main.py --model derpp \
      --load_best_args --dataset seq-mnist --buffer_size 500 --seed "$seed" \
      >"$d/stdout" 2>"$d/stderr") || rc=$?
  # stderr holds \r progress bars; the accuracy lines are printed after a newline.
  line="$(tr '\r' '\n' <"$d/stderr" | grep -a 'Accuracy for 5 task(s)' | tail -n 1 || true)"
  if [[ -n "$line" ]]; then
    cil="$(sed -E 's/.*\[Class-IL\]: ([0-9.]+) %.*/\1/' <<<"$line")"
    til="$(sed -E 's/.*\[Task-IL\]: ([0-9.]+) %.*/\1/' <<<"$line")"
  fi
  [[ "$rc" == 0 ]] || tail -c 600 "$d/stderr" >&2 || true
  record mammoth "$seed" "$rc" "$d/time" "$cil" "$til" "$started"
}

if [[ "$WITH_CACHE" == 1 ]]; then
  echo "pre-warming the compilation cache (untimed ours_cache run, seed $SEED0)" >&2
  run_ours ours_cache "$SEED0" norecord
fi

for ((i = 0; i < N; i++)); do
  seed=$((SEED0 + i))
  echo "== pair $((i + 1))/$N (seed $seed)" >&2
  run_ours ours "$seed"
  run_mammoth "$seed"
  if [[ "$WITH_CACHE" == 1 ]]; then run_ours ours_cache "$seed"; fi
done

echo "appended to $OUT_CSV" >&2
exit "$FAILED"
