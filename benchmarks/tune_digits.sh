#!/usr/bin/env bash
# The digits growth-ratio comparison of benchmarks/RESULTS.md ("Comparing growth ratios with Ray
# Tune"): one `ray-sebs tune` sweep per optimizer over rho = 1, 1.5, 2, 4, SEBS and SSGD, SEEDS seeds,
# with the paper's setup (DESIGN.md §1: MLP 64-128-10, B1 = 16, 4 stages x 10 epochs, eta = 0.1).
#
#   benchmarks/tune_digits.sh                  # sgd, momentum, adagrad; 3 seeds each (63 trials)
#   SEEDS=1 benchmarks/tune_digits.sh sgd      # one optimizer, one seed (7 trials)
#
# Each sweep is named digits-<optimizer>[-<suffix>] under $STORAGE; running the script again resumes
# an interrupted sweep (finished trials are kept). Before each sweep it waits until the 1-minute load
# average is below MAX_LOAD (other work on the machine skews the wall-time columns), giving up after
# MAX_WAIT seconds and saying so. Output: $STORAGE/digits-<optimizer>/comparison.{md,csv,png}.
set -euo pipefail
cd "$(dirname "$0")/.."

RAY_SEBS=${RAY_SEBS:-ray-sebs}
STORAGE=${STORAGE:-$PWD/sebs_runs}
SEEDS=${SEEDS:-3}
MAX_LOAD=${MAX_LOAD:-2}
MAX_WAIT=${MAX_WAIT:-1800}
SUFFIX=${SUFFIX:-}
OPTIMIZERS=("$@")
if [ ${#OPTIMIZERS[@]} -eq 0 ]; then
  OPTIMIZERS=(sgd momentum adagrad)
fi

wait_for_quiet() {
  local waited=0 load
  while true; do
    load=$(cut -d' ' -f1 /proc/loadavg)
    if awk -v l="$load" -v m="$MAX_LOAD" 'BEGIN { exit !(l < m) }'; then
      echo "# load average ${load} < ${MAX_LOAD}: starting"
      return
    fi
    if [ "$waited" -ge "$MAX_WAIT" ]; then
      echo "# load average still ${load} after ${waited}s: starting anyway (wall times are inflated)"
      return
    fi
    sleep 30
    waited=$((waited + 30))
  done
}

for optimizer in "${OPTIMIZERS[@]}"; do
  name="digits-${optimizer}${SUFFIX:+-$SUFFIX}"
  wait_for_quiet
  echo "# $(date -Is) sweep ${name}: $(nproc) CPUs, $(uname -sr)"
  set -x
  "$RAY_SEBS" tune --dataset digits --model mlp --optimizer "$optimizer" \
    --ratios 1,1.5,2,4 --schedules sebs,ssgd --seeds "$SEEDS" \
    --batch-size 16 --stages 4 --epochs-per-stage 10 --lr 0.1 \
    --storage-path "$STORAGE" --name "$name"
  { set +x; } 2>/dev/null
  echo "# $(date -Is) sweep ${name} done; load average $(cut -d' ' -f1-3 /proc/loadavg)"
done
