#!/usr/bin/env bash
# Issue 3 side by side, in one run on one machine:
#   1. all-reduce 2 and 4 ranks on loopback: sinter vs torch.distributed (gloo) vs OpenMPI (TCP and shared memory)
#   2. Fashion-MNIST MLP, global batch 128, 2 epochs: sinter 2 workers vs PyTorch DDP (gloo, 2 ranks × 1 thread)
#      vs sinter single process
# Writes bench/results/DATE-issue3.md and the raw JSON lines beside it.
#   bench/issue3.sh [ROUNDS]      (peers: bash ../shared/peers/setup.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
PEERS=${PEERS_ROOT:-$HOME/.cache/sinter-peers}
PEERDIR=$(cd ../shared/peers && pwd)
TORCH=$PEERS/venv-torch/bin/python
MPIPY=$PEERS/venv-mpi/bin/python
export OMP_NUM_THREADS=1
cargo build --release -p cli >/dev/null 2>&1
S=target/release/sinter
day=$(date +%F)
raw=bench/results/$day-issue3.jsonl
out=bench/results/$day-issue3.md
: > "$raw"
run() { echo "+ $*" >&2; "$@"; }
tag() { python3 -c 'import json,sys
t=sys.argv[1]
for l in sys.stdin:
    l=l.strip()
    if l.startswith("{"):
        d=json.loads(l); d["_run"]=t; print(json.dumps(d))' "$1" >> "$raw"; }

for r in $(seq 1 "$ROUNDS"); do
  for n in 2 4; do
    run $S bench allreduce --workers $n --sizes 4KiB,1MiB,25MiB,100MiB --json | tag "sinter-crc r$r n$n"
    run $S bench allreduce --workers $n --sizes 4KiB,1MiB,25MiB,100MiB --json --no-tensor-crc | tag "sinter-nocrc r$r n$n"
    run $S bench allreduce --workers $n --sizes 4KiB,1MiB,25MiB,100MiB --json --transport tcp | tag "sinter-tcp r$r n$n"
    run $TORCH "$PEERDIR/torch_allreduce_bench.py" --world-size $n --sizes-mb 0.00390625,1,25,100 --port $((29500 + r * 10 + n)) | tag "gloo r$r n$n"
    run mpirun --allow-run-as-root --oversubscribe -np $n --mca btl tcp,self --mca btl_tcp_if_include lo $MPIPY "$PEERDIR/mpi_allreduce_bench.py" | tag "mpi-tcp r$r n$n"
    run mpirun --allow-run-as-root --oversubscribe -np $n --mca btl vader,self $MPIPY "$PEERDIR/mpi_allreduce_bench.py" | tag "mpi-shm r$r n$n"
  done
  run $S train examples/fashion-mlp.toml --workers 2 --json | tag "sinter-train-2w r$r"
  run $S train examples/fashion-mlp.toml --workers 1 --json | tag "sinter-train-1w r$r"
  run $S train examples/fashion-mlp.toml --workers 2 --json --set cluster.tensor_crc=false | tag "sinter-train-2wnocrc r$r"
  run $S train examples/fashion-mlp.toml --workers 2 --json --set 'cluster.transport="tcp"' | tag "sinter-train-2wtcp r$r"
  run $TORCH "$PEERDIR/torch_ddp_mlp.py" --mode ddp --world-size 2 --threads 1 --epochs 2 --data data/fashion-mnist --port $((29600 + r)) | tag "ddp-2r r$r"
done

python3 - "$raw" "$out" "$ROUNDS" "$TORCH" <<'PY'
import json, sys, subprocess, platform, collections
raw, out, rounds, torch_py = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
rows = [json.loads(l) for l in open(raw)]
def sh(c):
    try: return subprocess.run(c, shell=True, capture_output=True, text=True).stdout.strip()
    except Exception: return "?"
ar = collections.defaultdict(dict)  # (round, n, bytes) -> system -> algbw
lat = collections.defaultdict(dict)
for d in rows:
    run = d["_run"]; sysname = run.split()[0]
    if "algbw_gbps" in d or "algbw_GBps" in d:
        n = d.get("workers", d.get("world_size")); b = d["bytes"]
        rnd = run.split()[1]
        bw = d.get("algbw_gbps", d.get("algbw_GBps"))
        # the peers round sizes differently for 4 KiB (4088/4192 bytes): bucket by size class
        cls = min([4096, 262144, 1048576, 4194304, 26214400, 104857600], key=lambda s: abs(s - b))
        ar[(rnd, n, cls)][sysname] = bw
        us = d.get("p50_us", d.get("median_s", 0) * 1e6)
        lat[(rnd, n, cls)][sysname] = us
L = []
L.append(f"# Issue 3 benchmarks — {sh('date -u +%FT%TZ')}\n")
L.append("Machine: " + sh("lscpu | sed -n 's/^Model name: *//p'") + f", {sh('nproc --all')} cores, " + sh("free -g | awk '/Mem/{print $2}'") + " GiB, kernel " + platform.release() + "; " + sh("rustc --version") + f"; sinter commit {sh('git rev-parse --short HEAD')}; torch " + sh(torch_py + " -c 'import torch; print(torch.__version__)'") + ", " + sh("mpirun --version | head -1") + "\n")
L.append("Command: `bench/issue3.sh " + str(rounds) + "` (every figure below comes from that one run; raw lines in `" + raw.split('/')[-1] + "`).\n")
L.append("Method: the peers' own scripts from `../shared/peers/`; Sinter uses the same convention (barrier before each iteration, slowest rank's time, median; algbw = bytes / time).\n")
L.append("## All-reduce, loopback, algorithm bandwidth (GB/s)\n")
L.append("Sinter moves tensors between ranks on one machine through shared memory by default (`cluster.transport = auto`); `sinter tcp` forces loopback TCP. The ratios use the default (shared memory, crc on).\n")
L.append("| round | ranks | size | sinter (crc) | sinter (no crc) | sinter tcp (crc) | gloo | OpenMPI TCP | OpenMPI shm | sinter/gloo | sinter/MPI-TCP | sinter/MPI-shm |")
L.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
def f(x): return "—" if x is None else f"{x:.3f}"
for key in sorted(ar, key=lambda k: (k[1], k[2], k[0])):
    rnd, n, b = key; s = ar[key]
    best = max([v for v in [s.get("sinter-crc"), s.get("sinter-nocrc")] if v is not None], default=None)
    g, m = s.get("gloo"), s.get("mpi-tcp")
    r1 = f"{s.get('sinter-crc')/g:.2f}×" if g and s.get("sinter-crc") else "—"
    r2 = f"{s.get('sinter-crc')/m:.2f}×" if m and s.get("sinter-crc") else "—"
    ms = s.get("mpi-shm")
    r3 = f"{s.get('sinter-crc')/ms:.2f}×" if ms and s.get("sinter-crc") else "—"
    L.append(f"| {rnd} | {n} | {b} | {f(s.get('sinter-crc'))} | {f(s.get('sinter-nocrc'))} | {f(s.get('sinter-tcp'))} | {f(g)} | {f(m)} | {f(ms)} | {r1} | {r2} | {r3} |")
L.append("\n## All-reduce 4 KiB, p50 latency (µs)\n")
L.append("| round | ranks | sinter (crc) | sinter tcp | gloo | OpenMPI TCP | OpenMPI shm |")
L.append("|---|---|---|---|---|---|---|")
for key in sorted(lat, key=lambda k: (k[1], k[0])):
    if key[2] != 4096: continue
    s = lat[key]
    L.append(f"| {key[0]} | {key[1]} | {f(s.get('sinter-crc'))} | {f(s.get('sinter-tcp'))} | {f(s.get('gloo'))} | {f(s.get('mpi-tcp'))} | {f(s.get('mpi-shm'))} |")
L.append("\n## Fashion-MNIST MLP 784-256-256-10, global batch 128, SGD lr 0.05 momentum 0.9, 2 epochs\n")
L.append("| round | sinter 2 workers samples/s | acc | sinter 1 process samples/s | acc | PyTorch DDP gloo 2×1 samples/s | acc | 2w / DDP | 2w / 1 process | 2w no crc / 1 process | 2w tcp / 1 process |")
L.append("|---|---|---|---|---|---|---|---|---|---|---|")
tr = collections.defaultdict(dict)
for d in rows:
    run = d["_run"]
    if d.get("event") == "epoch" and d.get("epoch") == 2:
        tr[run.split()[1]][run.split()[0]] = (d["samples_per_s"], d.get("test_acc"))
    if run.startswith("ddp") and d.get("epoch") == 2:
        tr[run.split()[1]]["ddp"] = (d["samples_per_s"], d.get("test_acc"))
for rnd in sorted(tr):
    s = tr[rnd]; a = s.get("sinter-train-2w"); b = s.get("sinter-train-1w"); c = s.get("ddp")
    g = lambda x, i: "—" if x is None else (f"{x[i]:.0f}" if i == 0 else f"{x[i]:.4f}")
    r1 = f"{a[0]/c[0]:.2f}×" if a and c else "—"; r2 = f"{a[0]/b[0]:.2f}×" if a and b else "—"
    nc, tc = s.get("sinter-train-2wnocrc"), s.get("sinter-train-2wtcp")
    r3 = f"{nc[0]/b[0]:.2f}×" if nc and b else "—"; r4 = f"{tc[0]/b[0]:.2f}×" if tc and b else "—"
    L.append(f"| {rnd} | {g(a,0)} | {g(a,1)} | {g(b,0)} | {g(b,1)} | {g(c,0)} | {g(c,1)} | {r1} | {r2} | {r3} | {r4} |")
open(out, "w").write("\n".join(L) + "\n")
print("\n".join(L))
PY
