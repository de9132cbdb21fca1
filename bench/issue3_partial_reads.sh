#!/usr/bin/env bash
# Issue 3, "each worker reads only its partition of the data": peak RSS and
# load time of each worker of a 2-worker parameter-server job (1 shard) on
# generated LIBSVM click data, whole-file reads against partition reads.
#
# Modes, each run ROUNDS times (the order alternates):
#   base     a sinter built from BASE_COMMIT (before partition reads): every
#            worker reads the whole file before it joins.
#   elastic  this tree with cluster.elastic = true: every worker reads the
#            whole file before it joins (a regroup may give it any row).
#   part     this tree, not elastic: a survey (row count, labels) before
#            joining, then only the worker's partition.
#
# Every role is started by hand, as on a cluster (MASTER_ADDR, RANK, ...), so
# that each worker runs under its own GNU time. "before join" is the time from
# a worker's start to the coordinator's "authenticated" line for it (config,
# the data read or survey, the connection); "after join" is the data line's
# read_ms (partition reads only). Training is cut at STEPS steps: the job is
# here to load data, not to train.
#
#   BASE_BIN=/tmp/sinter-base/target/release/sinter bash bench/issue3_partial_reads.sh
#
# BASE_BIN: a sinter built from BASE_COMMIT (git archive BASE_COMMIT | tar -x -C DIR;
# cargo build --release -p cli there). Without it the base mode is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${BIN:-target/release/sinter}
BASE_BIN=${BASE_BIN:-}
BASE_COMMIT=${BASE_COMMIT:-3b5b769}
DATA_DIR=${DATA_DIR:-/tmp/issue3-bench}
ROWS=${ROWS:-4000000}
ROUNDS=${ROUNDS:-2}
STEPS=${STEPS:-200}
OUT=${OUT:-bench/results/$(date -u +%F)-issue3-partial-reads}
RAW="$OUT.jsonl"
export SINTER_SECRET=${SINTER_SECRET:-issue3-bench-secret}

mkdir -p "$DATA_DIR" "$(dirname "$OUT")"
: > "$RAW"
COMMANDS="$OUT.commands.txt"
: > "$COMMANDS"
log_cmd() { echo "$*" >> "$COMMANDS"; }

if [ ! -f "$DATA_DIR/train.svm" ]; then
    cmd="$BIN data gen click --out $DATA_DIR/train.svm --rows $ROWS --test-rows 100000 --hash-bits 22"
    log_cmd "$cmd"
    $cmd
fi

cat > "$DATA_DIR/job.toml" <<EOF
[data]
format = "libsvm"
train = "$DATA_DIR/train.svm"
test = "$DATA_DIR/train.test.svm"
hash_bits = 22
[model]
kind = "logreg"
hash_bits = 22
[optim]
kind = "adagrad"
lr = 0.03
[train]
epochs = 1
batch_size = 32
max_steps = $STEPS
[cluster]
workers = 2
servers = 1
collective_timeout_ms = 60000
EOF

# run MODE BIN ELASTIC ROUND
run() {
    local mode=$1 bin=$2 elastic=$3 round=$4
    local tmp
    tmp=$(mktemp -d)
    local coord_args=(coordinator --listen 127.0.0.1:0 --world 2 --servers 1)
    local worker_set=()
    if [ "$elastic" = 1 ]; then
        coord_args+=(--elastic 2:2)
        worker_set=(--set cluster.elastic=true)
    fi
    log_cmd "SINTER_LOG=info $bin ${coord_args[*]}"
    SINTER_LOG=info "$bin" "${coord_args[@]}" > "$tmp/coord.out" 2> "$tmp/coord.err" &
    local coord_pid=$!
    local addr=""
    for _ in $(seq 1 100); do
        addr=$(jq -r 'select(.listening) | .listening' "$tmp/coord.out" 2>/dev/null | head -1)
        [ -n "$addr" ] && break
        sleep 0.1
    done
    [ -n "$addr" ] || { echo "coordinator did not listen" >&2; kill "$coord_pid"; exit 1; }
    local port=${addr##*:}
    log_cmd "MASTER_ADDR=127.0.0.1 MASTER_PORT=$port $bin server"
    MASTER_ADDR=127.0.0.1 MASTER_PORT=$port "$bin" server > "$tmp/server.out" 2> "$tmp/server.err" &
    local server_pid=$!
    local pids=()
    for r in 0 1; do
        date -u +%s.%N > "$tmp/start.$r"
        log_cmd "MASTER_ADDR=127.0.0.1 MASTER_PORT=$port RANK=$r WORLD_SIZE=2 /usr/bin/time -v -o TIME_FILE $bin worker --config $DATA_DIR/job.toml --json ${worker_set[*]}"
        MASTER_ADDR=127.0.0.1 MASTER_PORT=$port RANK=$r WORLD_SIZE=2 \
            /usr/bin/time -v -o "$tmp/time.$r" "$bin" worker --config "$DATA_DIR/job.toml" --json "${worker_set[@]}" \
            > "$tmp/worker.$r.out" 2> "$tmp/worker.$r.err" &
        pids+=($!)
    done
    local failed=0
    for p in "${pids[@]}"; do wait "$p" || failed=1; done
    wait "$server_pid" || true
    wait "$coord_pid" || true
    if [ "$failed" = 1 ]; then
        echo "$mode round $round: a worker failed; see $tmp" >&2
        exit 1
    fi
    python3 - "$tmp" "$mode" "$round" "$(cut -d' ' -f1 /proc/loadavg)" >> "$RAW" <<'PY'
import json, re, sys
from datetime import datetime
tmp, mode, rnd, load1 = sys.argv[1:5]
auth = {}
for line in open(f"{tmp}/coord.err"):
    m = re.match(r"(\S+Z)\s.*authenticated.*peer=worker rank (\d+)", line)
    if m:
        auth[int(m.group(2))] = datetime.fromisoformat(m.group(1).replace("Z", "+00:00")).timestamp()
for r in (0, 1):
    start = float(open(f"{tmp}/start.{r}").read())
    t = open(f"{tmp}/time.{r}").read()
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", t).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", t).group(1)
    parts = [float(x) for x in wall.split(":")]
    wall_s = parts[-1] + 60 * parts[-2] + (3600 * parts[-3] if len(parts) > 2 else 0)
    data = None
    done = None
    for line in open(f"{tmp}/worker.{r}.out"):
        try:
            v = json.loads(line)
        except ValueError:
            continue
        if v.get("event") == "data":
            data = v
        if v.get("event") == "done":
            done = v
    print(json.dumps({
        "mode": mode, "round": int(rnd), "rank": r, "load1": float(load1),
        "max_rss_mb": rss_kb / 1024, "wall_s": wall_s,
        "before_join_s": auth[r] - start if r in auth else None,
        "after_join_s": (data["read_ms"] / 1e3) if data and not data.get("whole_file") else 0.0,
        "survey_s": (data["survey_ms"] / 1e3) if data else None,
        "rows": data["rows"] if data else None,
        "first_row": data["first_row"] if data else None,
        "test_rows": data["test_rows"] if data else None,
        "test_auc": (done or {}).get("last", {}).get("test_auc") if r == 0 else None,
    }))
PY
    [ -n "${KEEP_TMP:-}" ] && echo "kept $tmp" >&2 || rm -rf "$tmp"
}

modes=()
[ -n "$BASE_BIN" ] && modes+=("base $BASE_BIN 0")
modes+=("elastic $BIN 1" "part $BIN 0")
for round in $(seq 1 "$ROUNDS"); do
    if [ $((round % 2)) = 0 ]; then
        ordered=()
        for ((i=${#modes[@]}-1; i>=0; i--)); do ordered+=("${modes[i]}"); done
    else
        ordered=("${modes[@]}")
    fi
    for m in "${ordered[@]}"; do
        # shellcheck disable=SC2086
        run $m "$round"
    done
done
echo "raw lines in $RAW; commands in $COMMANDS"
