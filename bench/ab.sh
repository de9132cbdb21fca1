#!/usr/bin/env bash
# A/B of two sinter binaries on the runtime paths a change may slow: the
# all-reduce (4 KiB latency, 25 MiB bandwidth, 2 workers), the parameter
# server (`bench ps`, 2 shards + 2 workers, unreplicated and with each shard
# replicated), and training (the default MLP job on 2 workers, 1 epoch). Rounds alternate A and B, so both see the same host load; each
# line of the output is one measurement, tagged with its binary and round.
#
#   bench/ab.sh OLD_BIN NEW_BIN ROUNDS OUT.jsonl
set -euo pipefail
cd "$(dirname "$0")/.."
A=$1 B=$2 ROUNDS=${3:-3} OUT=${4:-/dev/stdout}
: > "$OUT.tmp"
tag() { # bin round what: prefixes each JSON line read from stdin
  python3 -c '
import json, sys
bin_, rnd, what = sys.argv[1:4]
for line in sys.stdin:
    line = line.strip()
    if not line.startswith("{"):
        continue
    v = json.loads(line)
    v.update({"ab_bin": bin_, "ab_round": int(rnd), "ab_what": what})
    print(json.dumps(v))
' "$@" >> "$OUT.tmp"
}
for r in $(seq 1 "$ROUNDS"); do
  for side in A B; do
    bin=$A; [ "$side" = B ] && bin=$B
    "$bin" bench allreduce --workers 2 --sizes 4KiB,25MiB --json | tag "$side" "$r" allreduce
    "$bin" bench ps --servers 2 --workers 2 --keys-per-push 1000 --zipf 1.2 --json | tag "$side" "$r" ps
    "$bin" bench ps --servers 2 --workers 2 --keys-per-push 1000 --zipf 1.2 --replicas 2 --json | tag "$side" "$r" ps-replicated
    "$bin" train examples/fashion-mlp.toml --workers 2 --set train.epochs=1 --json -q | tag "$side" "$r" train
  done
done
mv "$OUT.tmp" "$OUT"
