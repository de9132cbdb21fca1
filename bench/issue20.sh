#!/usr/bin/env bash
# Issue 20 (federated learning), in one run on one machine, Flower as the peer:
#   1. Fashion-MNIST, MLP 784-256-256-10, 10 clients with Dirichlet(0.5) label skew, half sampled per
#      round, 1 local epoch of plain SGD (lr 0.05, batch 64), 20 rounds: Flower 1.42 (Ray simulation,
#      numpy clients, ../shared/peers/flwr_fedavg.py) and `sinter fl sim`, alternated REPS times. Sinter
#      trains on exactly Flower's shards (Flower's --save-partition file, fl.partition = "file:...");
#      the clients sampled each round differ (each system's own seeded sampler). Both run without
#      OPENBLAS_CORETYPE (numpy's GEMM is ~1.4x slower with this machine's Haswell setting).
#      Wall time, final test accuracy, peak memory (Flower: the RSS sum of all its processes; Sinter:
#      VmHWM of its one process), and where the time goes.
#   2. `sinter fl sim` at 1,000 clients (the MLP, 10% sampled per round) and 10,000 and 50,000 clients
#      (softmax regression, 1% sampled): rounds per second and peak memory.
#   3. Strategies at Dirichlet(0.1): FedAvg, FedProx (mu 0.01), FedAdam (server lr 0.01), FedAvgM, the
#      coordinate-wise median, 20 rounds each, same sampling: final test accuracy.
# Writes bench/results/DATE-issue20.jsonl (one JSON object a line, tagged with "bench" and "rep").
#   bench/issue20.sh [REPS]     (REPS default 3; needs the venv of ../shared/peers/setup.sh)
# SINTER=path uses that binary instead of target/release/sinter.
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=${1:-3}
SINTER=${SINTER:-target/release/sinter}
PEERS=${PEERS:-../shared/peers}
PY=${PEERS_ROOT:-$HOME/.cache/sinter-peers}/venv-flwr/bin/python
day=$(date -u +%F)
raw=bench/results/$day-issue20.jsonl
owners=$(mktemp /tmp/issue20-owners.XXXXXX)
# The softmax federation: the MLP example with its model swapped (beside it, for the relative data path).
softmax=examples/.issue20-softmax.toml
sed 's/^kind = "mlp"/kind = "softmax"/; /^hidden = /d' examples/fl-fashion-mlp.toml > "$softmax"
trap 'rm -f "$owners" "$softmax"' EXIT
tag() { # tag BENCH REP: prefix every JSON line on stdin with the bench and rep
  sed -u "s/^{/{\"bench\":\"$1\",\"rep\":$2,/"
}
: > "$raw"
printf '{"bench":"machine","date":"%s","nproc":%s,"cpu":"%s","kernel":"%s","sinter":"%s","commit":"%s","load":"%s"}\n' \
  "$(date -u +%FT%TZ)" "$(nproc)" "$(lscpu | sed -n 's/^Model name: *//p')" "$(uname -r)" \
  "$($SINTER --version)" "$(git rev-parse --short HEAD)" "$(cut -d' ' -f1-3 /proc/loadavg)" >> "$raw"

echo "1. Flower against fl sim, $REPS alternations" >&2
for rep in $(seq "$REPS"); do
  env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE timeout -k 10 900 "$PY" "$PEERS/flwr_fedavg.py" \
    --clients 10 --rounds 20 --partition dirichlet --alpha 0.5 --fraction-fit 0.5 --seed 0 \
    --data data/fashion-mnist --save-partition "$owners" 2>/dev/null | tag flower "$rep" >> "$raw"
  env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE "$SINTER" fl sim examples/fl-fashion-mlp.toml --json \
    --set "fl.partition=\"file:$owners\"" | tag sinter "$rep" >> "$raw"
done

echo "2. fl sim at 1,000, 10,000 and 50,000 clients" >&2
"$SINTER" fl sim examples/fl-fashion-mlp.toml --json --clients 1000 --set fl.rounds=5 --set fl.fraction=0.1 \
  --set 'fl.partition="iid"' | tag scale-1k-mlp 1 >> "$raw"
for n in 10000 50000; do
  "$SINTER" fl sim "$softmax" --json --clients $n --set fl.rounds=5 --set fl.fraction=0.01 \
    --set 'fl.partition="iid"' | tag "scale-${n}-softmax" 1 >> "$raw"
done

echo "3. strategies at Dirichlet(0.1)" >&2
alpha='fl.partition="dirichlet:0.1"'
"$SINTER" fl sim examples/fl-fashion-mlp.toml --json --set "$alpha" | tag fedavg 1 >> "$raw"
"$SINTER" fl sim examples/fl-fashion-mlp.toml --json --set "$alpha" --set fl.proximal_mu=0.01 | tag fedprox 1 >> "$raw"
"$SINTER" fl sim examples/fl-fashion-mlp.toml --json --set "$alpha" --set 'fl.strategy.kind="fedadam"' \
  --set fl.strategy.server_lr=0.01 | tag fedadam 1 >> "$raw"
"$SINTER" fl sim examples/fl-fashion-mlp.toml --json --set "$alpha" --set 'fl.strategy.kind="fedavgm"' \
  --set fl.strategy.momentum=0.5 | tag fedavgm 1 >> "$raw"
"$SINTER" fl sim examples/fl-fashion-mlp.toml --json --set "$alpha" --set 'fl.strategy.kind="median"' | tag median 1 >> "$raw"
echo "wrote $raw" >&2
