#!/usr/bin/env bash
# Issue 6 (fault tolerance), requirement 1, side by side in one run:
#   Fashion-MNIST MLP, 4 workers, EPOCHS epochs: a fault-free run, then an elastic
#   run (cluster.elastic, cluster.max_restarts=KILLS) in which a random worker is
#   killed with SIGKILL every 0.7-1.5 s, KILLS times; the launcher replaces each.
# Reports final accuracy of both, steps per epoch (rows trained), and per kill the
# time until the survivors train again and until the job is back to 4 workers.
# Writes bench/results/DATE-issue6.jsonl (and .stderr.log).
#   bench/issue6.sh [KILLS] [EPOCHS] [SEED]
set -euo pipefail
cd "$(dirname "$0")/.."
KILLS=${1:-20}
EPOCHS=${2:-15}
SEED=${3:-1}
if [ -z "${SINTER:-}" ]; then cargo build --release -p cli >/dev/null 2>&1; fi
S=${SINTER:-target/release/sinter}
day=$(date +%F)
echo "load before: $(cat /proc/loadavg)" >&2
python3 bench/issue6_kills.py "$S" examples/fashion-mlp.toml "bench/results/$day-issue6" \
  --kills "$KILLS" --epochs "$EPOCHS" --seed "$SEED"
echo "load after: $(cat /proc/loadavg)" >&2
