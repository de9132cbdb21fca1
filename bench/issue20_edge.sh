#!/usr/bin/env bash
# Issue 20, item 7: the edge client against a Flower client, in one run on one machine.
#   - `sinter-edge` (crates/edge) built statically for x86_64-unknown-linux-musl: its size, and
#     `file`'s word on its linking.
#   - Idle: the edge client started against a closed port (it retries with backoff, having read its
#     6,000-row Fashion-MNIST file, one tenth of the training set written by `sinter data partition`):
#     its VmRSS after 3 s. Flower's client, `flower-supernode` (Flower 1.42) against a closed port in
#     a loopback-only network namespace: the VmRSS of it and its `flower-superexec` after 12 s (it
#     retries forever; ../shared/peers' venv).
#   - A round: `sinter fl server` (the MLP 784-256-256-10, 3 rounds) and the edge client alone: its
#     peak RSS (VmHWM, in its `done` line) over the federation.
# Writes bench/results/DATE-issue20-edge.jsonl.
#   bench/issue20_edge.sh      (run `cargo build --release -p cli` and
#                               `cargo build --release -p edge --target x86_64-unknown-linux-musl` first)
set -euo pipefail
cd "$(dirname "$0")/.."
EDGE=$(realpath "${EDGE:-target/x86_64-unknown-linux-musl/release/sinter-edge}")
SINTER=${SINTER:-target/release/sinter}
VENV=${PEERS_ROOT:-$HOME/.cache/sinter-peers}/venv-flwr
day=$(date -u +%F)
raw=bench/results/$day-issue20-edge.jsonl
tmp=$(mktemp -d /tmp/issue20-edge.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done; rm -rf "$tmp"; }
trap cleanup EXIT
export SINTER_SECRET=issue20-edge-bench-secret-0123456789
rss_kb() { awk '/^VmRSS/{print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

: > "$raw"
"$SINTER" data partition data/fashion-mnist --clients 10 --scheme iid --seed 0 --out "$tmp/parts" > /dev/null
cat > "$tmp/client.toml" <<TOML
[data]
format = "csv"
train = "parts/client-00000.csv"
csv_header = true
label_column = "label"
[model]
kind = "mlp"
hidden = [256, 256]
[optim]
kind = "sgd"
lr = 0.05
[train]
batch_size = 64
TOML
cp "$EDGE" "$tmp/sinter-edge.stripped" && strip "$tmp/sinter-edge.stripped"
printf '{"bench":"binary","bytes":%s,"stripped_bytes":%s,"file":"%s","sinter_bytes":%s,"commit":"%s","nproc":%s,"kernel":"%s"}\n' \
  "$(stat -c %s "$EDGE")" "$(stat -c %s "$tmp/sinter-edge.stripped")" "$(file -b "$EDGE" | cut -c1-120)" \
  "$(stat -c %s "$SINTER")" "$(git rev-parse --short HEAD)" "$(nproc)" "$(uname -r)" >> "$raw"

# Idle, no server.
port=$(free_port)
(cd "$tmp" && exec "$EDGE" --server "127.0.0.1:$port" --config client.toml --connect-timeout-ms 20000 > /dev/null 2>&1) &
pid=$!; pids+=("$pid")
sleep 3
printf '{"bench":"edge-idle","rss_kb":%s}\n' "$(rss_kb "$pid")" >> "$raw"
kill -9 "$pid" 2>/dev/null || true

# Flower's client, idle, no server (loopback-only namespace).
unshare -n bash -c '
  ip link set lo up
  export FLWR_TELEMETRY_ENABLED=0 PATH='"$VENV"'/bin:$PATH
  flower-supernode --insecure --superlink 127.0.0.1:9 > /dev/null 2>&1 &
  root=$!
  sleep 12
  tree() { echo "$1"; for c in $(cat /proc/$1/task/*/children 2>/dev/null); do tree "$c"; done; }
  total=0; n=0
  for p in $(tree $root); do r=$(awk "/^VmRSS/{print \$2}" /proc/$p/status 2>/dev/null); [ -n "$r" ] && { total=$((total+r)); n=$((n+1)); }; done
  printf "{\"bench\":\"flower-supernode-idle\",\"procs\":%s,\"rss_kb\":%s}\n" $n $total
  kill -9 $(tree $root) 2>/dev/null || true
' >> "$raw"

# One federation of 3 rounds with the edge client alone.
port=$(free_port)
"$SINTER" fl server examples/fl-fashion-mlp.toml --listen "127.0.0.1:$port" --json --set fl.rounds=3 \
  --set fl.start_clients=1 --set fl.min_clients=1 --set fl.min_updates=1 --set 'data.normalize="scale01"' \
  | sed -u 's/^{/{"bench":"server",/' >> "$raw" &
pids+=("$!")
(cd "$tmp" && exec "$EDGE" --server "127.0.0.1:$port" --config client.toml --name edge-0 --json) \
  | sed -u 's/^{/{"bench":"edge-round",/' >> "$raw"
wait
echo "wrote $raw" >&2
