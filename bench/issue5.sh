#!/usr/bin/env bash
# Issue 5 (communication compression) side by side, in one run on one machine:
#   1. `sinter bench codec --json`: encode/decode GB/s on one core, ratio and error, on 25 MiB of the
#      Fashion-MNIST MLP's real gradients.
#   2. Four hosts in network namespaces on one bridge, each host's link shaped to 100 Mbit/s with tbf
#      (both directions, offloads off): the MLP 784-256-256-10 on 4 workers (one per namespace, plus the
#      coordinator in host 0), examples/fashion-mlp-topk.toml, 6 epochs, evaluated every 25 steps:
#      uncompressed ring all-reduce, top-1% + error feedback (momentum before compression, and after),
#      int8, PowerSGD rank 4. Per evaluation: accuracy, wall and training time, bytes sent; per run
#      the interfaces' byte counters (what really crossed the links, TCP/IP included).
#   3. The same top-k with an asynchronous parameter server (1 shard, 4 workers, loopback), and its
#      uncompressed twin: accuracy and bytes pushed.
#   4. Local SGD over the same namespaces (parameters averaged every H = 8 steps, evaluated every 24 so
#      that rank 0 evaluates an average): uncompressed, top-1% + error feedback, int8 and PowerSGD rank 4
#      of each worker's change since the last average.
# SECTIONS picks what runs (default: all of "codec allreduce ps localsgd"); the load average is recorded
# before and after.
# Writes bench/results/DATE-issue5.jsonl (raw lines), DATE-issue5.md (tables) and DATE-issue5.png
# (accuracy against training time and against bytes).
#   sudo bench/issue5.sh [EPOCHS]     (needs ip, tc, ethtool, python3 with matplotlib)
set -euo pipefail
cd "$(dirname "$0")/.."
EPOCHS=${1:-6}
SECTIONS=${SECTIONS:-codec allreduce ps localsgd}
AVERAGE_EVERY=${AVERAGE_EVERY:-8}
RATE=${RATE:-100mbit}
SECRET=issue5-bench-secret-0123456789abcdef
S=$PWD/target/release/sinter
JOB=$PWD/examples/fashion-mlp-topk.toml
day=$(date -u +%F)
raw=bench/results/$day-issue5.jsonl
out=bench/results/$day-issue5.md
png=bench/results/$day-issue5.png
tmp=$(mktemp -d)
HUB=s5hub
HOSTS=(s5h0 s5h1 s5h2 s5h3)
PIDS=()

cleanup() {
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  for ns in "${HOSTS[@]}" "$HUB"; do ip netns del "$ns" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT INT TERM

cargo build --release -p cli >/dev/null 2>&1
python3 -c 'import matplotlib' 2>/dev/null || pip install matplotlib >/dev/null
: > "$raw"
tag() { python3 -c 'import json,sys
t=sys.argv[1]
for l in sys.stdin:
    l=l.strip()
    if l.startswith("{"):
        d=json.loads(l); d["_run"]=t; print(json.dumps(d))' "$1" >> "$raw"; }
want() { [[ " $SECTIONS " == *" $1 "* ]]; }
load() { python3 -c 'import json,os,sys; print(json.dumps({"_run": "machine", "event": sys.argv[1], "loadavg": list(os.getloadavg())}))' "$1" >> "$raw"; }
load load_before
: > "$tmp/commands"
if want codec; then
  echo "+ $S bench codec --json --size 25MiB" >&2
  echo "$S bench codec --json --size 25MiB" >> "$tmp/commands"
  "$S" bench codec --json --size 25MiB | tag codec
fi

# --- the network: a bridge in its own namespace, one shaped veth per host ---------------------------
shape() { # ns dev
  ip netns exec "$1" ethtool -K "$2" tso off gso off gro off >/dev/null 2>&1 || true
  ip netns exec "$1" tc qdisc add dev "$2" root tbf rate "$RATE" burst 32kb latency 100ms
}
ip netns add "$HUB"
ip -n "$HUB" link add br5 type bridge
ip -n "$HUB" link set br5 up
ip -n "$HUB" link set lo up
for i in 0 1 2 3; do
  ns=${HOSTS[$i]}
  ip netns add "$ns"
  ip link add "v5h$i" netns "$ns" type veth peer name "p5h$i" netns "$HUB"
  ip -n "$ns" addr add "10.55.0.$((i + 1))/24" dev "v5h$i"
  ip -n "$ns" link set lo up
  ip -n "$ns" link set "v5h$i" up
  ip -n "$HUB" link set "p5h$i" master br5
  ip -n "$HUB" link set "p5h$i" up
  shape "$ns" "v5h$i"    # the host's upload
  shape "$HUB" "p5h$i"   # its download
done

counters() { # prints {"tx":[...],"rx":[...]} of the hosts' links
  python3 - "$@" <<'PY'
import json, subprocess
tx, rx = [], []
for i in range(4):
    out = subprocess.run(["ip", "-n", f"s5h{i}", "-s", "-j", "link", "show", f"v5h{i}"], capture_output=True, text=True, check=True).stdout
    s = json.loads(out)[0]["stats64"]
    tx.append(s["tx"]["bytes"]); rx.append(s["rx"]["bytes"])
print(json.dumps({"tx": tx, "rx": rx}))
PY
}

# One training run across the namespaces: run NAME --set ... (applied to every worker).
run() {
  local name=$1; shift
  local sets=(--set "train.epochs=$EPOCHS" --set cluster.transport=tcp)
  local total=$((EPOCHS * 468))
  sets+=(--set "optim.schedule={kind=\"warmup_cosine\",warmup_steps=200,total_steps=$total}")
  for s in "$@"; do sets+=(--set "$s"); done
  echo "+ [$name] sinter coordinator + 4 × sinter worker --config examples/fashion-mlp-topk.toml ${sets[*]}" >&2
  echo "[$name] SINTER_SECRET=… sinter coordinator --listen 10.55.0.1:0 --world 4 (in s5h0); per host i: MASTER_ADDR=10.55.0.1 MASTER_PORT=… RANK=i WORLD_SIZE=4 sinter worker --config examples/fashion-mlp-topk.toml --json ${sets[*]}" >> "$tmp/commands"
  ip netns exec s5h0 env SINTER_SECRET=$SECRET "$S" coordinator --listen 10.55.0.1:0 --world 4 > "$tmp/coord.out" 2> "$tmp/coord.err" &
  local coord=$!
  PIDS+=("$coord")
  local port=""
  for _ in $(seq 1 200); do
    port=$(python3 -c 'import json,sys
for l in open(sys.argv[1]):
    if "listening" in l: print(json.loads(l)["listening"].rsplit(":",1)[1]); break' "$tmp/coord.out" 2>/dev/null || true)
    [ -n "$port" ] && break
    sleep 0.05
  done
  [ -n "$port" ] || { cat "$tmp/coord.err" >&2; echo "coordinator did not start" >&2; exit 1; }
  local before; before=$(counters)
  local t0; t0=$(date +%s.%N)
  local ws=()
  for i in 0 1 2 3; do
    ip netns exec "${HOSTS[$i]}" env SINTER_SECRET=$SECRET MASTER_ADDR=10.55.0.1 MASTER_PORT="$port" RANK=$i WORLD_SIZE=4 \
      "$S" worker --config "$JOB" --json "${sets[@]}" > "$tmp/w$i.out" 2> "$tmp/w$i.err" &
    ws+=($!); PIDS+=($!)
  done
  local failed=0
  for p in "${ws[@]}"; do wait "$p" || failed=1; done
  wait "$coord" || failed=1
  local t1; t1=$(date +%s.%N)
  local after; after=$(counters)
  if [ $failed -ne 0 ]; then tail -5 "$tmp"/w*.err "$tmp/coord.err" >&2; echo "run $name failed" >&2; exit 1; fi
  tag "$name" < "$tmp/w0.out"
  python3 -c 'import json,sys
b, a = json.loads(sys.argv[2]), json.loads(sys.argv[3])
print(json.dumps({"_run": sys.argv[1], "event": "links", "process_s": float(sys.argv[5]) - float(sys.argv[4]),
  "tx_bytes": [x - y for x, y in zip(a["tx"], b["tx"])], "rx_bytes": [x - y for x, y in zip(a["rx"], b["rx"])]}))' \
    "$name" "$before" "$after" "$t0" "$t1" >> "$raw"
  PIDS=()
}

if want allreduce; then
  run none        compress.codec=none compress.momentum=0 optim.momentum=0.9
  run topk        compress.codec=topk:0.01:f16 compress.error_feedback=true compress.momentum=0.9 optim.momentum=0
  run topk-after  compress.codec=topk:0.01:f16 compress.error_feedback=true compress.momentum=0 optim.momentum=0.9
  run int8        compress.codec=int8 compress.momentum=0 optim.momentum=0.9
  run powersgd4   compress.codec=powersgd:4 compress.momentum=0 optim.momentum=0.9
fi

# --- local SGD: each worker's change since the last average, compressed -------------------------------
# compress.momentum corrects gradients and has no place here: each worker's optimizer keeps its momentum.
if want localsgd; then
  lsgd=(cluster.sync=\"local_sgd\" "cluster.average_every=$AVERAGE_EVERY" train.eval_every_steps=$((3 * AVERAGE_EVERY)) compress.momentum=0 optim.momentum=0.9)
  run lsgd-none      "${lsgd[@]}" compress.codec=none
  run lsgd-topk      "${lsgd[@]}" compress.codec=topk:0.01:f16 compress.error_feedback=true
  run lsgd-int8      "${lsgd[@]}" compress.codec=int8
  run lsgd-powersgd4 "${lsgd[@]}" compress.codec=powersgd:4
fi

# --- asynchronous parameter server, loopback -----------------------------------------------------------
if want ps; then
  for c in none topk:0.01:f16; do
    cmd=("$S" train examples/fashion-mlp-ps.toml --workers 4 --servers 1 --json -q --set cluster.consistency=async --set "compress.codec=$c")
    echo "+ ${cmd[*]}" >&2
    echo "${cmd[*]#$PWD/}" >> "$tmp/commands"
    "${cmd[@]}" | tag "ps-async-$c"
  done
fi
load load_after

python3 bench/issue5_report.py "$raw" "$out" "$png" "$tmp/commands" "$RATE" "$EPOCHS" "$AVERAGE_EVERY"
