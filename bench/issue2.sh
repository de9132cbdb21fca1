#!/usr/bin/env bash
# bench/issue2.sh: the single-process capability (issue 2) measured against its peer and its targets.
#
#   a. Fashion-MNIST MLP 784-256-256-10, batch 128, SGD lr 0.05 momentum 0.9, 2 epochs, one process,
#      one thread: Sinter vs PyTorch (../shared/peers/torch_ddp_mlp.py --mode single), back to back,
#      ROUNDS rounds with the order swapped every round; then Sinter's test accuracy over seeds 0..4.
#   b. Sparse logistic regression on generated click data (1M train rows, 2^20 hashed features):
#      the generator timed, then examples/click-logreg.toml for one epoch, ROUNDS rounds, against the
#      issue's targets (>= 1M examples/s on one thread, test AUC within 0.01 of the Bayes AUC);
#      Adagrad and the factorization machine on the same data beside it; a perf profile of one run.
#   c. Machine facts and every command run.
#
# Writes bench/results/<UTC date>-issue2.md and the raw JSON lines beside it (<UTC date>-issue2.jsonl).
# Environment: ROUNDS (default 3), SKIP_BUILD=1 (use the existing target/release/sinter),
# PEERS_DIR (default ../shared/peers), PEERS_VENV_DIR (default ~/.cache/sinter-peers).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
ROUNDS=${ROUNDS:-3}
PEERS_DIR=$(realpath "${PEERS_DIR:-$ROOT/../shared/peers}")
PEERS_VENV_DIR=${PEERS_VENV_DIR:-$HOME/.cache/sinter-peers}
PY=$PEERS_VENV_DIR/venv-torch/bin/python
SINTER=target/release/sinter
DATE=$(date -u +%Y-%m-%d)
OUT=bench/results/$DATE-issue2.md
RAW=bench/results/$DATE-issue2.jsonl
CLICK_DIR=runs/click
# The generator's arguments, as issue 2 states them.
CLICK_GEN_ARGS=(--rows 1000000 --test-rows 200000 --hash-bits 20 --nnz 40 --zipf 1.1)

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
COMMANDS=$TMP/commands.txt
: > "$COMMANDS"

# Prints a command as it will run, and records it for the results file; words with characters
# special to the shell are single-quoted. `|` as a word is printed bare (a pipe in the record).
say() {
    local word line=""
    for word in "$@"; do
        if [[ $word =~ ^[A-Za-z0-9_./=:,+@%-]+$ || $word == '|' ]]; then
            line+="$word "
        else
            line+="'${word//\'/\'\\\'\'}' "
        fi
    done
    printf '+ %s\n' "${line% }" >&2
    printf '%s\n' "${line% }" >> "$COMMANDS"
}

# run_json BENCH SYSTEM ROUND EXTRA_JSON CMD...: runs CMD under /usr/bin/time and appends its JSON
# lines (progress lines dropped) to $RAW, each tagged with bench, system, round and EXTRA_JSON,
# then one `"event":"process"` line with wall and CPU seconds, peak RSS and the load before the run.
run_json() {
    local bench=$1 system=$2 round=$3 extra=$4
    shift 4
    local tag load
    tag=$(jq -cn --arg b "$bench" --arg s "$system" --argjson r "$round" --argjson x "$extra" \
        '{bench: $b, system: $s, round: $r} + $x')
    load=$(cut -d' ' -f1 /proc/loadavg)
    say "$@"
    /usr/bin/time -f '{"proc_wall_s":%e,"user_s":%U,"sys_s":%S,"max_rss_kb":%M}' -o "$TMP/time.json" \
        "$@" > "$TMP/out.jsonl"
    { grep -v '"event":"step"' "$TMP/out.jsonl" || true; } |
        jq -c --argjson t "$tag" '$t + (if has("event") then . else . + {event: "epoch"} end)' >> "$RAW"
    jq -c --argjson t "$tag" --argjson l "$load" '$t + {event: "process", loadavg_1m: $l} + .' \
        "$TMP/time.json" >> "$RAW"
}

for tool in jq /usr/bin/time python3; do
    command -v "$tool" > /dev/null || { echo "issue2.sh: needs $tool" >&2; exit 1; }
done
if [[ ! -x $PY ]]; then
    say bash "$PEERS_DIR/setup.sh"
    bash "$PEERS_DIR/setup.sh"
fi
if [[ ${SKIP_BUILD:-0} != 1 ]]; then
    say cargo build --release -p cli
    cargo build --release -p cli
fi
mkdir -p bench/results "$CLICK_DIR"
: > "$RAW"

# --- a. Fashion-MNIST MLP, one process, one thread: Sinter vs PyTorch ---------------------------------
sinter_mlp=("$SINTER" train examples/fashion-mlp.toml --workers 1 --json)
torch_mlp=(env OMP_NUM_THREADS=1 "$PY" "$PEERS_DIR/torch_ddp_mlp.py" --mode single --threads 1 --epochs 2
    --data data/fashion-mnist)
for round in $(seq 1 "$ROUNDS"); do
    # Swap who goes first every round, so that a drift in the machine's load does not favour one side.
    if ((round % 2 == 1)); then
        run_json fashion-mlp sinter "$round" '{}' "${sinter_mlp[@]}"
        run_json fashion-mlp pytorch "$round" '{}' "${torch_mlp[@]}"
    else
        run_json fashion-mlp pytorch "$round" '{}' "${torch_mlp[@]}"
        run_json fashion-mlp sinter "$round" '{}' "${sinter_mlp[@]}"
    fi
done
for seed in 0 1 2 3 4; do
    run_json fashion-mlp-seeds sinter 1 "{\"seed\": $seed}" "${sinter_mlp[@]}" --set "train.seed=$seed"
done

# --- b. Sparse logistic regression on generated click data --------------------------------------------
say "$SINTER" data gen click --out "$CLICK_DIR/train.svm" "${CLICK_GEN_ARGS[@]}"
load=$(cut -d' ' -f1 /proc/loadavg)
/usr/bin/time -f '{"proc_wall_s":%e,"user_s":%U,"sys_s":%S,"max_rss_kb":%M}' -o "$TMP/time.json" \
    "$SINTER" data gen click --out "$CLICK_DIR/train.svm" "${CLICK_GEN_ARGS[@]}" > "$TMP/gen.txt"
jq -c --argjson l "$load" '{bench: "click-gen", system: "sinter", round: 1, event: "process", loadavg_1m: $l} + .' \
    "$TMP/time.json" >> "$RAW"
jq -c '{bench: "click-gen", system: "sinter", round: 1, event: "meta"} + .' "$CLICK_DIR/train.svm.meta.json" >> "$RAW"

sinter_lr=("$SINTER" train examples/click-logreg.toml --workers 1 --json)
for round in $(seq 1 "$ROUNDS"); do
    run_json click-logreg sinter "$round" '{}' "${sinter_lr[@]}"
    run_json click-logreg-adagrad sinter "$round" '{}' "${sinter_lr[@]}" \
        --set 'optim={kind="adagrad",lr=0.03}'
    run_json click-fm sinter "$round" '{}' "$SINTER" train examples/click-fm.toml --workers 1 --json
done

# Where the time goes: one run of the logistic regression under perf (cpu-clock: no hardware counters here).
PERF_MD=$TMP/perf.md
if command -v perf > /dev/null; then
    say perf record -e cpu-clock -F 1999 --call-graph dwarf,8192 -o "$TMP/perf.data" -- "${sinter_lr[@]}"
    perf record -q -e cpu-clock -F 1999 --call-graph dwarf,8192 -o "$TMP/perf.data" -- "${sinter_lr[@]}" \
        > "$TMP/perf-run.jsonl" 2> "$TMP/perf-record.err"
    epoch_rows=$(jq .rows "$CLICK_DIR/train.svm.meta.json")
    say perf script -i "$TMP/perf.data" -F comm,tid,ip,sym '|' python3 bench/perf_phases.py --freq 1999 --epoch-rows "$epoch_rows"
    perf script -i "$TMP/perf.data" -F comm,tid,ip,sym 2> /dev/null |
        python3 bench/perf_phases.py --freq 1999 --epoch-rows "$epoch_rows" > "$PERF_MD"
    { grep '"event":"epoch"' "$TMP/perf-run.jsonl" || true; } |
        jq -c '{bench: "click-logreg-perf", system: "sinter", round: 1} + .' >> "$RAW"
else
    echo "perf is not installed: no profile." > "$PERF_MD"
fi

# --- c. Machine facts ---------------------------------------------------------------------------------
FACTS=$TMP/facts.json
jq -n \
    --arg date "$(date -u '+%Y-%m-%d %H:%M:%S UTC')" \
    --arg cpu "$(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -1)" \
    --arg cores "$(nproc)" \
    --arg mem "$(awk '/^MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)" \
    --arg kernel "$(uname -r)" \
    --arg rustc "$(rustc --version)" \
    --arg commit "$(git rev-parse --short HEAD 2> /dev/null || echo unknown)" \
    --arg dirty "$(git status --porcelain --untracked-files=no 2> /dev/null | wc -l)" \
    --arg torch "$(env OMP_NUM_THREADS=1 "$PY" -c 'import torch; print(torch.__version__)')" \
    --arg rounds "$ROUNDS" \
    '$ARGS.named' > "$FACTS"

python3 bench/issue2_report.py --raw "$RAW" --facts "$FACTS" --commands "$COMMANDS" \
    --gen "$TMP/gen.txt" --perf "$PERF_MD" > "$OUT"
echo "wrote $OUT and $RAW" >&2
