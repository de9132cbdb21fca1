#!/usr/bin/env bash
# Issue 7 (deterministic simulation and scale prediction), in one run on one machine:
#   1. `sinter sim --fuzz`: 10,000 seeds with random job shapes and fault mixes (none may break an
#      invariant), and 1,000 seeds with the SSP off-by-one switched back on (it must be found).
#   2. Prediction against reality: the Fashion-MNIST MLP (784-256-256-10, 269,322 parameters) on 2 and 4
#      workers, one per network namespace, links shaped with tbf (both directions, offloads off) to
#      100 Mbit/s and 1 Gbit/s; ring all-reduce and a parameter server (1 shard in its own namespace,
#      BSP), each uncompressed and with top-1% compression. Measured: rank 0's step time (median of its
#      step reports after the first). Predicted: `sinter sim --predict` with the same parameter count,
#      the compute time of one step measured here on one process with the same local batch, the link
#      rate and 50 µs latency.
#   3. The predicted scaling table for 8 to 4,096 workers of a 100M-parameter model on 25 Gbit/s links
#      with 10 µs latency (ring all-reduce and 64 parameter-server shards, with and without top-1%).
# Writes bench/results/DATE-issue7.{jsonl,md,svg}.
#   sudo bench/issue7.sh [STEPS]     (needs ip, tc, ethtool, python3)
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-120}
SECRET=issue7-bench-secret-0123456789abcdef
S=$PWD/target/release/sinter
day=$(date -u +%F)
raw=bench/results/$day-issue7.jsonl
out=bench/results/$day-issue7.md
svg=bench/results/$day-issue7.svg
tmp=$(mktemp -d)
HUB=s7hub
HOSTS=(s7h0 s7h1 s7h2 s7h3 s7h4)
PIDS=()
cleanup() {
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  for ns in "${HOSTS[@]}" "$HUB"; do ip netns del "$ns" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT INT TERM
cargo build --release -p cli >/dev/null 2>&1
: > "$raw"
log() { python3 -c 'import json,sys; print(json.dumps(dict(json.loads(sys.argv[1]), **json.loads(sys.argv[2]))))' "$1" "$2" >> "$raw"; }

# --- 1. fuzzing -----------------------------------------------------------------------------------
t0=$(date +%s.%N)
"$S" sim --fuzz --seed 0 --seeds 10000 > "$tmp/fuzz.txt" || true
t1=$(date +%s.%N)
"$S" sim --fuzz --seed 0 --seeds 1000 --bug ssp-off-by-one > "$tmp/bug.txt" || true
t2=$(date +%s.%N)
python3 - "$tmp/fuzz.txt" "$tmp/bug.txt" "$t0" "$t1" "$t2" >> "$raw" <<'PY'
import json, sys
fz, bug = open(sys.argv[1]).read(), open(sys.argv[2]).read()
t0, t1, t2 = map(float, sys.argv[3:6])
print(json.dumps({"event": "fuzz", "summary": fz.strip().splitlines()[-1], "wall_s": t1 - t0}))
print(json.dumps({"event": "bug", "summary": [l for l in bug.splitlines() if l.startswith(("1000 seeds", "first violation"))],
                  "first": next((l for l in bug.splitlines() if "invariant" in l), ""), "wall_s": t2 - t1}))
PY

# --- 2. prediction against reality --------------------------------------------------------------
median_step_ms() { # file batch -> median ms per step from step reports after the first
  python3 - "$1" "$2" <<'PY'
import json, statistics, sys
rates = [json.loads(l)["samples_per_s"] for l in open(sys.argv[1]) if l.startswith("{") and '"event":"step"' in l.replace(" ", "")]
rates = rates[1:] or rates
print(statistics.median(int(sys.argv[2]) / r * 1e3 for r in rates) if rates else "nan")
PY
}
# Compute per step: one process, the local batch of one of W workers.
for W in 2 4; do
  lb=$((128 / W))
  "$S" train examples/fashion-mlp.toml --workers 1 --json -q --set "train.batch_size=$lb" --set train.epochs=1 \
    --set "train.max_steps=$((STEPS * 2))" --set train.eval_every_epochs=0 > "$tmp/single$W.out"
  c=$(median_step_ms "$tmp/single$W.out" "$lb")
  log '{"event":"compute"}' "{\"workers\":$W,\"local_batch\":$lb,\"step_ms\":$c}"
  echo "$c" > "$tmp/compute$W"
done

shape() { # ns dev rate burst
  ip netns exec "$1" ethtool -K "$2" tso off gso off gro off >/dev/null 2>&1 || true
  ip netns exec "$1" tc qdisc replace dev "$2" root tbf rate "$3" burst "$4" latency 100ms
}
ip netns add "$HUB"
ip -n "$HUB" link add br7 type bridge
ip -n "$HUB" link set br7 up
for i in 0 1 2 3 4; do
  ns=${HOSTS[$i]}
  ip netns add "$ns"
  ip link add "v7h$i" netns "$ns" type veth peer name "p7h$i" netns "$HUB"
  ip -n "$ns" addr add "10.57.0.$((i + 1))/24" dev "v7h$i"
  ip -n "$ns" link set lo up
  ip -n "$ns" link set "v7h$i" up
  ip -n "$HUB" link set "p7h$i" master br7
  ip -n "$HUB" link set "p7h$i" up
done
set_rate() { for i in 0 1 2 3 4; do shape "${HOSTS[$i]}" "v7h$i" "$1" "$2"; shape "$HUB" "p7h$i" "$1" "$2"; done; }

wait_port() { # file -> port of the coordinator
  for _ in $(seq 1 400); do
    p=$(python3 -c 'import json,sys
for l in open(sys.argv[1]):
    if "listening" in l: print(json.loads(l)["listening"].rsplit(":",1)[1]); break' "$1" 2>/dev/null || true)
    [ -n "$p" ] && { echo "$p"; return; }
    sleep 0.05
  done
  echo "coordinator did not start" >&2; exit 1
}

run() { # W strategy codec rate -> measured median step ms of rank 0
  local W=$1 strat=$2 codec=$3 rate=$4 cfg sets servers=0
  sets=(--set train.epochs=1 --set "train.max_steps=$STEPS" --set cluster.transport=tcp --set train.eval_every_steps=0
        --set train.eval_every_epochs=0 --set "compress.codec=$codec" --set cluster.collective_timeout_ms=60000)
  if [ "$strat" = ps ]; then
    cfg=examples/fashion-mlp-ps.toml; servers=1
    sets+=(--set cluster.consistency=bsp --set cluster.servers=1 --set "cluster.workers=$W")
  else
    cfg=examples/fashion-mlp-topk.toml
    sets+=(--set "cluster.workers=$W" --set compress.momentum=0)
  fi
  ip netns exec s7h0 env SINTER_SECRET=$SECRET "$S" coordinator --listen 10.57.0.1:0 --world "$W" --servers "$servers" \
    > "$tmp/coord.out" 2> "$tmp/coord.err" &
  local coord=$!; PIDS+=("$coord")
  local port; port=$(wait_port "$tmp/coord.out")
  local ws=()
  if [ "$servers" = 1 ]; then
    ip netns exec s7h4 env SINTER_SECRET=$SECRET DMLC_PS_ROOT_URI=10.57.0.1 DMLC_PS_ROOT_PORT="$port" DMLC_NUM_SERVER=1 \
      DMLC_NUM_WORKER="$W" "$S" server > "$tmp/server.out" 2> "$tmp/server.err" &
    ws+=($!); PIDS+=($!)
  fi
  for i in $(seq 0 $((W - 1))); do
    ip netns exec "${HOSTS[$i]}" env SINTER_SECRET=$SECRET MASTER_ADDR=10.57.0.1 MASTER_PORT="$port" RANK=$i WORLD_SIZE=$W \
      "$S" worker --config "$cfg" --json "${sets[@]}" > "$tmp/w$i.out" 2> "$tmp/w$i.err" &
    ws+=($!); PIDS+=($!)
  done
  local failed=0
  for p in "${ws[@]}"; do wait "$p" || failed=1; done
  wait "$coord" || failed=1
  PIDS=()
  if [ $failed -ne 0 ]; then tail -3 "$tmp"/w*.err "$tmp/coord.err" >&2; echo "nan"; return; fi
  median_step_ms "$tmp/w0.out" 128
}

for rate in 100mbit 1gbit; do
  burst=32kb; [ "$rate" = 1gbit ] && burst=256kb
  set_rate "$rate" "$burst"
  for W in 2 4; do
    c=$(cat "$tmp/compute$W")
    for strat in allreduce ps; do
      for codec in none topk:0.01:f16; do
        echo "+ $rate W=$W $strat $codec" >&2
        m=$(run "$W" "$strat" "$codec" "$rate")
        p=$("$S" sim --predict --json --params 269322 --compute-ms "$c" --batch $((128 / W)) --workers "$W" --bandwidth "$rate" \
              --latency-us 50 --strategy "$strat" --servers 1 --consistency bsp --codec "$codec" | python3 -c 'import json,sys; print(json.loads(sys.stdin.readline())["step_ms"])')
        log '{"event":"check"}' "{\"rate\":\"$rate\",\"workers\":$W,\"strategy\":\"$strat\",\"codec\":\"$codec\",\"compute_ms\":$c,\"measured_ms\":$m,\"predicted_ms\":$p}"
      done
    done
  done
done

# --- 3. the scaling table -----------------------------------------------------------------------
P=(--predict --params 100M --compute-ms 100 --batch 32 --bandwidth 25gbit --latency-us 10 --workers 8,16,32,64,128,256,512,1024,2048,4096)
t0=$(date +%s.%N)
"$S" sim "${P[@]}" --strategy allreduce,ps --servers 64 --consistency bsp --codec none,topk:0.01:f16 --json --plot "$svg" > "$tmp/scale.jsonl"
t1=$(date +%s.%N)
sed 's/^{/{"event":"predict",/' "$tmp/scale.jsonl" >> "$raw"
log '{"event":"predict_wall"}' "{\"wall_s\":$(python3 -c "print($t1 - $t0)")}"
echo "raw results in $raw; write $out from them" >&2
