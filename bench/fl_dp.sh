#!/usr/bin/env bash
# DP-FedAvg in `sinter fl sim`, measured: the Fashion-MNIST MLP 784-256-256-10 over 100 clients
# (iid split), sampling rate q = 0.1, 100 rounds, one local epoch of SGD (lr 0.05, batch 64).
# Three arms per seed, run back to back in an order that rotates with the seed:
#   dp      examples/fl-fashion-mlp-dp.toml: Poisson sampling with q = 0.1, clip to C = 0.05,
#           central Gaussian noise with sigma = 1.0, the sum over q N = 10 (epsilon = 7.90 at
#           delta = 1e-5 after 100 rounds);
#   clip    the same with sigma = 0 (fl.dp.noise_multiplier=0): sampling, clipping and the fixed
#           denominator without noise, which splits the dp arm's loss of accuracy into what the
#           clipping costs and what the noise costs;
#   nodp    examples/fl-fashion-mlp.toml set to the same clients, split, rounds and sampling rate
#           (10 clients a round, a fixed-size sample), without [fl.dp]: plain FedAvg.
# Then the epsilon Sinter reported after rounds 1, 25, 50, 75 and 100 of the first dp run against
# dp-accounting's RdpAccountant for PoissonSampledDpEvent(q, GaussianDpEvent(sigma)) composed that
# many times (fl_dp_report.py accountant), and the results file (fl_dp_report.py report).
# Writes bench/results/DATE-fl-dp.jsonl (every round line of every run, tagged) and DATE-fl-dp.md.
#   bench/fl_dp.sh [SEEDS]        (default "0 1 2 3 4"; about 32 CPU-seconds per seed: 2 min 36 s
#                                  of CPU and 2 min 52 s of wall time for the five, 2026-12-08)
# SINTER=path uses that binary instead of target/release/sinter (built if missing);
# PYTHON=path a Python with dp-accounting (default the peers' venv-flwr).
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${1:-"0 1 2 3 4"}
PYTHON=${PYTHON:-$HOME/.cache/sinter-peers/venv-flwr/bin/python}
CLIENTS=100 Q=0.1 ROUNDS=100 SIGMA=1.0
day=$(date -u +%F)
raw=bench/results/$day-fl-dp.jsonl
md=bench/results/$day-fl-dp.md
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT INT TERM
if [ -z "${SINTER:-}" ]; then
  [ -x target/release/sinter ] || CARGO_BUILD_JOBS=1 nice -n 19 cargo build --release -p cli
  SINTER=target/release/sinter
fi
# A copy, so that a rebuild of the target dir cannot swap the binary mid-run.
cp "$SINTER" "$tmp/sinter"
S=$tmp/sinter
commit="$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- crates examples bench || echo +tree)"
cpu=$(lscpu | sed -n 's/^Model name: *//p' | head -1)
: > "$raw"
python3 -c 'import json,sys; print(json.dumps({"event":"machine","date_utc":sys.argv[1],"commit":sys.argv[2],"cpu":sys.argv[3],"nproc":int(sys.argv[4]),"kernel":sys.argv[5],"rustc":sys.argv[6],"load":sys.argv[7],"seeds":sys.argv[8]}))' \
  "$(date -u '+%F %H:%M')" "$commit" "$cpu" "$(nproc)" "$(uname -r)" "$(rustc --version)" "$(cut -d' ' -f1-3 /proc/loadavg)" "$SEEDS" >> "$raw"

# The exact command of each arm, without the seed.
arm_args() {
  case $1 in
    dp) echo "fl sim examples/fl-fashion-mlp-dp.toml --json" ;;
    clip) echo "fl sim examples/fl-fashion-mlp-dp.toml --json --set fl.dp.noise_multiplier=0" ;;
    nodp) echo "fl sim examples/fl-fashion-mlp.toml --json --clients $CLIENTS --set fl.partition=iid --set fl.fraction=$Q --set fl.rounds=$ROUNDS --set fl.eval_every_rounds=25 --set fl.min_clients=2 --set fl.min_updates=1" ;;
  esac
}
for arm in dp clip nodp; do
  python3 -c 'import json,sys; print(json.dumps({"event":"command","arm":sys.argv[1],"command":"sinter "+sys.argv[2]+" --set train.seed=SEED"}))' "$arm" "$(arm_args $arm)" >> "$raw"
done

arms=(dp clip nodp)
for seed in $SEEDS; do
  for i in 0 1 2; do
    arm=${arms[$(( (i + seed) % 3 ))]}
    # shellcheck disable=SC2046
    /usr/bin/time -f '{"user_s": %U, "sys_s": %S, "wall_s": %e}' -o "$tmp/time.json" \
      "$S" $(arm_args "$arm") --set train.seed="$seed" > "$tmp/out.jsonl"
    python3 - "$arm" "$seed" "$tmp/out.jsonl" "$tmp/time.json" "$(cut -d' ' -f1 /proc/loadavg)" >> "$raw" <<'PY'
import json, sys
arm, seed, out, timing, load = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], float(sys.argv[5])
for line in open(out):
    d = json.loads(line)
    print(json.dumps(dict(d, arm=arm, seed=seed)))
t = json.load(open(timing))
print(json.dumps(dict(event="process", arm=arm, seed=seed, load_after=load, **t)))
PY
    echo "seed $seed $arm: $(grep -c '"event": "round"' "$raw") round lines so far" >&2
  done
done

"$PYTHON" bench/fl_dp_report.py accountant "$raw" --q "$Q" --sigma "$SIGMA" --delta 1e-5 >> "$raw"
python3 bench/fl_dp_report.py report "$raw" > "$md"
echo "wrote $raw and $md" >&2
