#!/usr/bin/env bash
# Issue 4 (parameter server) side by side, in one run on one machine:
#   1. throughput: `sinter bench ps` 2 servers + 2 workers on loopback vs `--inproc` (the same shard
#      engines, one thread, no network), back to back, ROUNDS rounds
#   2. skew: Zipf 1.2 keys over 4 shards, per-shard load max/mean with and without hot-key placement
#   3. sparse LR on click data (4M rows, 2^22 features, Zipf 1.1), 2 servers + 2 workers: BSP, SSP s=4, async
#   4. Fashion-MNIST MLP through the parameter server, async, 2 workers + 2 servers, 3 epochs
# Writes bench/results/DATE-issue4.md and the raw JSON lines beside it.
#   bench/issue4.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
# SINTER=path runs a binary built earlier (no build).
if [ -z "${SINTER:-}" ]; then cargo build --release -p cli >/dev/null 2>&1; fi
S=${SINTER:-target/release/sinter}
day=$(date +%F)
raw=bench/results/$day-issue4.jsonl
out=bench/results/$day-issue4.md
: > "$raw"
run() { echo "+ $*" >&2; "$@"; }
tag() { python3 -c 'import json,sys
t=sys.argv[1]
for l in sys.stdin:
    l=l.strip()
    if l.startswith("{"):
        d=json.loads(l); d["_run"]=t; print(json.dumps(d))' "$1" >> "$raw"; }
load() { cut -d' ' -f1 /proc/loadavg; }

CLICK=runs/click4m
if [ ! -f $CLICK/train.svm ]; then
  mkdir -p $CLICK
  run $S data gen click --out $CLICK/train.svm --rows 4000000 --test-rows 400000 --hash-bits 22 --zipf 1.1 >&2
fi

for r in $(seq 1 "$ROUNDS"); do
  echo "{\"load\": $(load)}" | tag "load r$r"
  run $S bench ps --servers 2 --workers 2 --keys-per-push 1000 --zipf 1.2 --inproc --json | tag "inproc r$r"
  run $S bench ps --servers 2 --workers 2 --keys-per-push 1000 --zipf 1.2 --json | tag "network r$r"
  for h in 0 1024; do
    run $S bench ps --servers 4 --workers 2 --keys-per-push 100 --zipf 1.2 --hot-keys $h --steps 5000 --json | tag "skew-hot$h r$r"
  done
done
for m in bsp ssp async; do
  run $S train examples/click-logreg-ps.toml --json -q --set "cluster.consistency=\"$m\"" | tag "click-$m"
done
run $S train examples/fashion-mlp-ps.toml --json -q | tag "mlp-async"

python3 - "$raw" "$out" <<'PY'
import json, sys, subprocess, collections
raw, out = sys.argv[1], sys.argv[2]
rows = [json.loads(l) for l in open(raw)]
def sh(c):
    try: return subprocess.run(c, shell=True, capture_output=True, text=True).stdout.strip()
    except Exception: return "?"
by = collections.defaultdict(list)
for d in rows: by[d["_run"]].append(d)
L = []
L.append("# Issue 4: parameter server, measured " + sh("date -u +'%F %H:%M UTC'"))
L.append("")
L.append("Machine: " + sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2").strip() + f", {sh('nproc')} cores, "
         + sh("free -g | awk '/Mem/{print $2}'") + " GiB, kernel " + sh("uname -r") + ", " + sh("rustc --version")
         + ", commit " + sh("git rev-parse --short HEAD") + f" ({sh('git status --porcelain --untracked-files=no | wc -l')} tracked files modified).")
L.append("Command: `bench/issue4.sh` (every command it ran is in the script; raw lines in `" + raw.split('/')[-1] + "`).")
L.append("")
L.append("## 1. Throughput: 2 servers + 2 workers on loopback vs the in-process ceiling")
L.append("")
L.append("Zipf 1.2 over 2^22 keys, 1000 distinct keys per pull and push, async, 2000 steps per worker, hot-key placement on. Back to back in each round.")
L.append("")
L.append("| round | load avg | in-process key updates/s | network key updates/s | ratio | pull p50 / p99 µs | push p50 / p99 µs |")
L.append("|---|---|---|---|---|---|---|")
rounds = sorted({k.split()[-1] for k in by if k.startswith("inproc")})
ratios = []
for r in rounds:
    i = by[f"inproc {r}"][0]; n = by[f"network {r}"][0]; ld = by.get(f"load {r}", [{}])[0].get("load", "?")
    ratio = n["key_updates_per_s"] / i["key_updates_per_s"]; ratios.append(ratio)
    L.append(f"| {r} | {ld} | {i['key_updates_per_s']/1e6:.2f}M | {n['key_updates_per_s']/1e6:.2f}M | {ratio:.2f} | {n['pull_p50_us']:.0f} / {n['pull_p99_us']:.0f} | {n['push_p50_us']:.0f} / {n['push_p99_us']:.0f} |")
L.append("")
L.append(f"Network / in-process: {min(ratios):.2f}–{max(ratios):.2f} (target ≥ 0.50). The in-process ceiling runs the shard engines on one thread; the network run has 2 workers, 2 servers and the coordinator sharing the 2 cores.")
L.append("")
L.append("## 2. Skew: Zipf 1.2 keys over 4 shards")
L.append("")
L.append("100 distinct keys per push (each push carries a key at most once, so a hot key weighs one per request), 2 workers, 5000 steps each, networked runs. Load = keys pulled + pushed per shard (bytes are proportional: one f32 per key); requests are pulls + pushes per shard.")
L.append("")
L.append("| round | plain hashing: keys max/mean | hot keys placed: keys max/mean | requests max/mean (placed) |")
L.append("|---|---|---|---|")
for r in rounds:
    a = by[f"skew-hot0 {r}"][0]; b = by[f"skew-hot1024 {r}"][0]
    L.append(f"| {r} | {a['keys_max_over_mean']:.3f} | {b['keys_max_over_mean']:.3f} | {b['requests_max_over_mean']:.3f} |")
L.append("")
L.append("## 3. Sparse LR, 4M rows, 2^22 features, Zipf 1.1, 2 servers + 2 workers, one epoch")
L.append("")
L.append("| consistency | test AUC | Bayes AUC | gap | wall to the end of the epoch (s) | samples/s | staleness of pulls (steps: count) | max |")
L.append("|---|---|---|---|---|---|---|---|")
for m in ["bsp", "ssp", "async"]:
    d = [x for x in by[f"click-{m}"] if x.get("event") == "done"][0]
    l = d["last"]; st = [sum(x) for x in zip(*[s["stats"]["staleness"] for s in d["servers"]])]
    # Buckets 0..15 are exact; bucket 16+k holds 2^(k+4) .. 2^(k+5)-1 (ps::staleness_bucket).
    lab = lambda b: str(b) if b < 16 else f"{1 << (b - 12)}-{(1 << (b - 11)) - 1}"
    hist = ", ".join(f"{lab(i)}: {c}" for i, c in enumerate(st) if c)
    mx = max(s["stats"].get("staleness_max", 0) for s in d["servers"])
    L.append(f"| {m}{' s=4' if m == 'ssp' else ''} | {l['test_auc']:.4f} | {l['bayes_auc']:.4f} | {l['bayes_auc']-l['test_auc']:.4f} | {l['wall_s']:.1f} | {l['samples_per_s']:.0f} | {hist} | {mx} |")
L.append("")
L.append("Staleness of a pull = the step it reads for minus the steps every worker has pushed. The trainer asks for step k+1's rows before it computes step k, so under SSP and async most reads are 1 step stale by construction; BSP holds such a pull until step k is applied everywhere.")
L.append("")
L.append("## 4. Fashion-MNIST MLP through the parameter server, async, 2 workers + 2 servers, 3 epochs")
L.append("")
L.append("| epoch | test accuracy | samples/s | wall (s) |")
L.append("|---|---|---|---|")
for e in [x for x in by["mlp-async"] if x.get("event") == "epoch"]:
    L.append(f"| {e['epoch']} | {e.get('test_acc', 0):.4f} | {e['samples_per_s']:.0f} | {e['wall_s']:.1f} |")
L.append("")
open(out, "w").write("\n".join(L) + "\n")
print("\n".join(L))
PY
