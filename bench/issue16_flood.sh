#!/usr/bin/env bash
# Issue 16: "60 s of connection floods (1,000 connections/s from 127.0.0.1) against the
# coordinator and each server, during rendezvous and during training: the job finishes with
# the accuracy of a quiet run."
#
# Two jobs, each run quiet and then flooded, back to back:
#   mlp: examples/fashion-mlp.toml, 2 workers, ring all-reduce;
#   ps:  examples/click-logreg-ps.toml on generated click data (400k rows, 2^18 features,
#        Zipf 1.1), 2 workers + 2 servers, cluster.consistency = "bsp".
# Each job's epochs are chosen from a short quiet calibration run so that a run lasts about
# TARGET_S seconds (≥ 60 s, the length of the flood); MLP_EPOCHS / PS_EPOCHS override.
# The flooded run is `bench/flood.py --pid <sinter train's PID> --rate RATE --seconds
# FLOOD_SECONDS`: sinter is started stopped (SIGSTOP), the flooder starts watching its PID,
# and sinter is continued once the flooder says it is watching, so the flood covers the
# coordinator's, the servers' and the workers' listeners from the moment each exists.
# Both runtimes are deterministic here (all-reduce, BSP), so the flooded run's test accuracy
# (AUC) should equal the quiet run's exactly; the difference is reported as is.
#
# Writes $RESULTS.jsonl (one line per run, and the flooder's line of each flooded run) and
# $RESULTS.md (machine, commit, commands, table). Logs and data in $OUT.
#   SINTER=/tmp/sinter-flood COMMIT=<sha> nice -n 5 bash bench/issue16_flood.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SINTER=${SINTER:-/work/main/target/release/sinter}
COMMIT=${COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
OUT=${OUT:-/tmp/issue16-flood}
RESULTS=${RESULTS:-bench/results/$(date -u +%F)-issue16-flood}
TARGET_S=${TARGET_S:-80}
RATE=${RATE:-1000}
FLOOD_SECONDS=${FLOOD_SECONDS:-60}
JOBS=${JOBS:-"mlp ps"}

mkdir -p "$OUT"
: >"$OUT/runs.jsonl"
: >"$OUT/commands.txt"
started_utc=$(date -u +%FT%TZ)
echo "sinter: $SINTER ($COMMIT); out: $OUT; load: $(cat /proc/loadavg)" >&2

log_cmd() { printf '%s\n' "$*" >>"$OUT/commands.txt"; }

# run JOB RUN EPOCHS FLOOD(0|1) CONFIG-AND-FLAGS...: one `sinter train`, one summary line.
run() {
  local job=$1 run=$2 epochs=$3 flood=$4
  shift 4
  local base=$OUT/$job-$run
  local cmd=("$SINTER" train "$@" --set "train.epochs=$epochs" --json -q)
  log_cmd "${cmd[*]} >$base.jsonl 2>$base.err"
  local load1 lines_before
  load1=$(cut -d' ' -f1 /proc/loadavg)
  lines_before=$(wc -l <"$OUT/runs.jsonl")
  # Started stopped, so that the flooder can watch the PID before anything listens.
  sh -c 'kill -STOP $$; exec "$@"' sinter-stopped "${cmd[@]}" >"$base.jsonl" 2>"$base.err" &
  local pid=$!
  until [ "$(cut -d' ' -f3 "/proc/$pid/stat" 2>/dev/null)" = T ]; do sleep 0.01; done
  local fpid=""
  rm -f "$base.flood.json" "$base.flood.err"
  if [ "$flood" = 1 ]; then
    log_cmd "python3 bench/flood.py --pid $pid --rate $RATE --seconds $FLOOD_SECONDS >$base.flood.json 2>$base.flood.err  # $pid: the line above"
    python3 bench/flood.py --pid "$pid" --rate "$RATE" --seconds "$FLOOD_SECONDS" \
      >"$base.flood.json" 2>"$base.flood.err" &
    fpid=$!
    local waited=0
    until grep -q '^flood: watching' "$base.flood.err" 2>/dev/null; do
      sleep 0.01
      waited=$((waited + 1))
      if [ "$waited" -gt 1000 ]; then
        echo "flood.py did not start; see $base.flood.err" >&2
        kill -CONT "$pid"
        break
      fi
    done
  fi
  local t0 t1 code frc=""
  t0=$(date +%s.%N)
  kill -CONT "$pid"
  set +e
  wait "$pid"
  code=$?
  t1=$(date +%s.%N)
  if [ -n "$fpid" ]; then
    wait "$fpid"
    frc=$?
  fi
  set -e
  python3 - "$job" "$run" "$epochs" "$code" "$t0" "$t1" "$load1" "$base" "$frc" >>"$OUT/runs.jsonl" <<'EOF'
import json, sys
job, run, epochs, code, t0, t1, load1, base, frc = sys.argv[1:]
lines = []
with open(base + ".jsonl") as f:
    for line in f:
        try:
            lines.append(json.loads(line))
        except ValueError:
            pass
epochs_out = [l for l in lines if l.get("event") == "epoch"]
done = next((l for l in lines if l.get("event") == "done"), None)
metric = "test_auc" if any("test_auc" in l for l in epochs_out) else "test_acc"
with open(base + ".err", errors="replace") as f:
    err = f.read().splitlines()
summary = {
    "job": job,
    "run": run,
    "epochs": int(epochs),
    "code": int(code),
    "wall_s": round(float(t1) - float(t0), 2),
    "train_wall_s": done["wall_s"] if done else None,
    "metric": metric,
    "final": epochs_out[-1].get(metric) if epochs_out else None,
    "per_epoch": [l.get(metric) for l in epochs_out],
    "train_loss": [l.get("train_loss") for l in epochs_out],
    "epoch_wall_s": [l.get("wall_s") for l in epochs_out],
    "load1_before": float(load1),
    "stderr_lines": len(err),
    "stderr_refused_warnings": sum("refused an unauthenticated connection" in l for l in err),
    "stderr_other": [l for l in err if "refused an unauthenticated connection" not in l][-20:],
}
print(json.dumps(summary))
if frc != "":
    try:
        with open(base + ".flood.json") as f:
            flood = json.loads(f.readline())
    except (OSError, ValueError) as e:
        flood = {"event": "flood", "missing": str(e)}
    flood.update({"job": job, "run": run, "flood_exit_code": int(frc)})
    print(json.dumps(flood))
EOF
  tail -n "+$((lines_before + 1))" "$OUT/runs.jsonl" | cut -c1-300 >&2
}

# epochs_for JOB RUN: epochs that make a run last about TARGET_S, from the calibration run.
epochs_for() {
  python3 - "$OUT/runs.jsonl" "$1" "$2" "$TARGET_S" <<'EOF'
import json, math, sys
path, job, run, target = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
for line in open(path):
    r = json.loads(line)
    if r.get("job") == job and r.get("run") == run and r.get("event") is None:
        per_epoch = (r["train_wall_s"] or r["wall_s"]) / r["epochs"]
        print(max(1, math.ceil(target / per_epoch)))
        break
EOF
}

for job in $JOBS; do
  case $job in
    mlp)
      args=(examples/fashion-mlp.toml --workers 2)
      cal=3
      fixed=${MLP_EPOCHS:-}
      ;;
    ps)
      data=$OUT/click
      mkdir -p "$data"
      if [ ! -s "$data/train.test.svm" ]; then
        log_cmd "$SINTER data gen click --out $data/train.svm --rows 400000 --hash-bits 18 --zipf 1.1"
        "$SINTER" data gen click --out "$data/train.svm" --rows 400000 --hash-bits 18 --zipf 1.1 >&2
      fi
      args=(examples/click-logreg-ps.toml --workers 2 --servers 2
        --set "data.train=$data/train.svm" --set "data.test=$data/train.test.svm"
        --set data.hash_bits=18 --set model.hash_bits=18 --set cluster.consistency=bsp)
      cal=2
      fixed=${PS_EPOCHS:-}
      ;;
    *) echo "unknown job $job" >&2; exit 2 ;;
  esac
  if [ -n "$fixed" ]; then
    n=$fixed
  else
    run "$job" calibrate "$cal" 0 "${args[@]}"
    n=$(epochs_for "$job" calibrate)
  fi
  echo "$job: $n epochs" >&2
  run "$job" quiet "$n" 0 "${args[@]}"
  run "$job" flooded "$n" 1 "${args[@]}"
done
finished_utc=$(date -u +%FT%TZ)

cp "$OUT/runs.jsonl" "$RESULTS.jsonl"
python3 - "$RESULTS" "$OUT" "$SINTER" "$COMMIT" "$started_utc" "$finished_utc" "$RATE" "$FLOOD_SECONDS" <<'EOF'
import json, subprocess, sys
results, out, sinter, commit, started, finished, rate, seconds = sys.argv[1:]
rows = [json.loads(l) for l in open(results + ".jsonl")]
runs = {(r["job"], r["run"]): r for r in rows if r.get("event") is None}
floods = {(r["job"], r["run"]): r for r in rows if r.get("event") == "flood"}
sh = lambda c: subprocess.run(c, shell=True, capture_output=True, text=True).stdout.strip()
md = []
md.append(f"# Issue 16: connection floods during rendezvous and training ({started[:10]})")
md.append("")
md.append(f"Runs from {started} to {finished} (UTC), `bench/issue16_flood.sh`.")
md.append(f"Binary: `{sinter}`, built from commit `{commit}`.")
md.append(f"Flood: `bench/flood.py`, {rate} connections/s for {seconds} s against every listening port of the `sinter train` process tree, started with the job (the job is held stopped until the flooder watches its PID).")
md.append("")
md.append("## Machine")
md.append("")
md.append("```")
md.append(f"$ nproc\n{sh('nproc')}")
md.append(f"$ lscpu | head -15\n{sh('lscpu | head -15')}")
md.append(f"$ uname -r\n{sh('uname -r')}")
md.append("```")
md.append("")
md.append("## Results")
md.append("")
md.append("| job | metric | epochs | quiet | flooded | flooded − quiet | every epoch equal | quiet wall s | flooded wall s | exit codes | connections attempted / connected | achieved rate /s |")
md.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
for job in ("mlp", "ps"):
    q, f, fl = runs.get((job, "quiet")), runs.get((job, "flooded")), floods.get((job, "flooded"))
    if not q or not f:
        continue
    diff = (f["final"] - q["final"]) if q["final"] is not None and f["final"] is not None else None
    same = q["per_epoch"] == f["per_epoch"] and q["train_loss"] == f["train_loss"]
    fl = fl or {}
    md.append(
        f"| {job} | {q['metric']} | {q['epochs']} | {q['final']!r} | {f['final']!r} | {diff!r} | "
        f"{'yes' if same else 'no'} | {q['wall_s']} | {f['wall_s']} | {q['code']} / {f['code']} | "
        f"{fl.get('attempted')} / {fl.get('connected')} | {fl.get('achieved_rate')} |"
    )
md.append("")
md.append("Per flooded run, per port (role from the owner's command line):")
md.append("")
md.append("| job | port | role | first seen s | last seen s | attempted | connected | refused (first at s) | connect timeouts | errors |")
md.append("|---|---|---|---|---|---|---|---|---|---|")
for (job, run), fl in floods.items():
    for port, p in fl.get("ports", {}).items():
        first_refused = "" if p.get("refused_first_s") is None else f" ({p['refused_first_s']})"
        md.append(
            f"| {job} | {port} | {p['role']} | {p['first_seen_s']} | {p['last_seen_s']} | {p['attempted']} | "
            f"{p['connected']} | {p['refused']}{first_refused} | "
            f"{p['connect_timeout']} | {p['errors']} |"
        )
md.append("")
md.append("Per flooded run, the flooder as a whole:")
md.append("")
md.append("| job | duration s | stopped by | attempted | connected | refused | connect timeouts | errors | slots with no port yet | rate /s (with ports) | per second min–max (after the first) | most held | flooder CPU s |")
md.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for (job, run), fl in floods.items():
    md.append(
        f"| {job} | {fl.get('duration_s')} | {fl.get('stopped_by')} | {fl.get('attempted')} | {fl.get('connected')} | "
        f"{fl.get('refused')} | {fl.get('connect_timeout')} | {fl.get('errors')}{' ' + json.dumps(fl['error_kinds']) if fl.get('error_kinds') else ''} | "
        f"{fl.get('slots_without_port')} | {fl.get('achieved_rate')} ({fl.get('achieved_rate_with_ports')}) | "
        f"{fl.get('per_second_min')}–{fl.get('per_second_max')} | {fl.get('held_max')} | {fl.get('cpu_s')} |"
    )
md.append("")
md.append("What each kind of connection met (`peer closed`: the process closed it first, after the mean ms shown; `ours`: still open at our 2 s (hold, stall) or 1 s (read) deadline; `evicted`: closed by us past 500 held):")
md.append("")
md.append("| job | kind | attempted | connected | peer closed (mean ms) | peer reset | ours | evicted | bytes received |")
md.append("|---|---|---|---|---|---|---|---|---|")
for (job, run), fl in floods.items():
    for kind, m in fl.get("modes", {}).items():
        md.append(
            f"| {job} | {kind} | {m.get('attempted', 0)} | {m.get('connected', 0)} | {m.get('peer_closed', 0)} "
            f"({m.get('peer_closed_after_ms_mean', '–')}) | {m.get('peer_reset', 0)} | {m.get('closed_by_us', 0)} | "
            f"{m.get('evicted', 0)} | {m.get('bytes_received', 0)} |"
        )
md.append("")
md.append("## Commands")
md.append("")
md.append("```")
md.extend(open(out + "/commands.txt").read().splitlines())
md.append("```")
md.append("")
md.append(f"Raw lines: `{results.split('/')[-1]}.jsonl` (one line per run; each flooded run's flooder line after it).")
open(results + ".md", "w").write("\n".join(md) + "\n")
EOF
echo "wrote $RESULTS.md and $RESULTS.jsonl" >&2
