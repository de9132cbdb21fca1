#!/usr/bin/env python3
"""Issue 6, requirement 1: kill a random worker at a random time, N times over
one elastic training run, and compare with a fault-free run in the same go.

Usage: issue6_kills.py SINTER CONFIG OUT_PREFIX [--kills 20] [--epochs 15] [--workers 4] [--seed 1]
                       [--ps] [--set KEY=VALUE ...]

Writes OUT_PREFIX.jsonl (one line per run and per kill) and prints a summary.
Times come from the workers' `regroup` lines (`unix_ms`, when training resumed)
and the kill times recorded here. With --ps (a parameter-server job), from the
replacements' `replaced` lines (`unix_ms`, when the new process was ready to
train in the lost worker's place), and each shard's steps applied and pushes
taken from the `done` line. --set adds settings to both runs.
"""
import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time

EPOCH_ROWS = 60000


def children(pid):
    """Direct children of `pid` (from /proc)."""
    out = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/stat") as f:
                stat = f.read()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                with open(f"/proc/{p}/cmdline", "rb") as f:
                    args = f.read().split(b"\0")
                out.append((int(p), [a.decode() for a in args if a]))
        except (OSError, ValueError, IndexError):
            continue
    return out


def run(sinter, config, workers, epochs, extra, kills=0, seed=1, log=None):
    cmd = [sinter, "train", config, "--workers", str(workers), "--json", "-q",
           "--set", f"train.epochs={epochs}"] + extra
    started = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log or subprocess.DEVNULL, text=True)
    lines = []
    killed = []
    rng = random.Random(seed)
    # Read lines on this thread; kill between them on a schedule.
    import threading

    def reader():
        for line in proc.stdout:
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                pass

    t = threading.Thread(target=reader)
    t.start()
    deadline = time.time() + 600
    while not any(v.get("event") == "start" for v in lines):
        if proc.poll() is not None or time.time() > deadline:
            break
        time.sleep(0.05)
    for _ in range(kills):
        time.sleep(rng.uniform(0.7, 1.5))
        if proc.poll() is not None:
            break
        ws = [p for p, args in children(proc.pid) if "worker" in args]
        if not ws:
            continue
        victim = rng.choice(ws)
        killed.append({"pid": victim, "unix_ms": int(time.time() * 1000)})
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            killed.pop()
    proc.wait(timeout=600)
    t.join()
    return {"cmd": cmd, "code": proc.returncode, "wall_s": time.time() - started, "lines": lines, "kills": killed}


def epochs_of(lines):
    return [v for v in lines if v.get("event") == "epoch"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("sinter")
    ap.add_argument("config")
    ap.add_argument("out")
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--ps", action="store_true")
    ap.add_argument("--set", action="append", default=[])
    a = ap.parse_args()
    extra = [x for kv in a.set for x in ("--set", kv)]

    results = []
    with open(a.out + ".stderr.log", "w") as log:
        clean = run(a.sinter, a.config, a.workers, a.epochs, extra, log=log)
        faulty = run(a.sinter, a.config, a.workers, a.epochs,
                     extra + ["--set", "cluster.elastic=true", "--set", f"cluster.max_restarts={a.kills}"],
                     kills=a.kills, seed=a.seed, log=log)
    for name, r in (("fault_free", clean), ("killed", faulty)):
        ep = epochs_of(r["lines"])
        acc = ep[-1]["test_acc"] if ep else None
        steps = [e["step"] for e in ep]
        per_epoch = [s - p for s, p in zip(steps, [0] + steps[:-1])]
        row = {"run": name, "code": r["code"], "wall_s": round(r["wall_s"], 2),
               "final_acc": acc, "epochs": len(ep), "steps_per_epoch": per_epoch,
               "kills": len(r["kills"])}
        done = next((v for v in r["lines"] if v.get("event") == "done"), None)
        if a.ps and done:
            row["steps"] = done.get("steps")
            row["shards"] = [{"shard": s["shard"], "steps_applied": s["stats"]["steps_applied"],
                              "pushes": s["stats"]["pushes"]} for s in done.get("servers", [])]
        results.append(row)
    if a.ps:
        return report_ps(a, results, faulty)
    # Per kill: the first regroup after it that leaves out the victim (rank 0's
    # line with fewer workers) and the first that is back to full size.
    regroups = sorted((v for v in faulty["lines"] if v.get("event") == "regroup" and v.get("rank") == 0),
                      key=lambda v: v["unix_ms"])
    per_kill = []
    for k in faulty["kills"]:
        after = [g for g in regroups if g["unix_ms"] >= k["unix_ms"]]
        resumed = next((g for g in after if g["world"] < a.workers), None)
        full = next((g for g in after if g["world"] == a.workers), None)
        per_kill.append({
            "kill_unix_ms": k["unix_ms"],
            "training_again_ms": resumed and resumed["unix_ms"] - k["unix_ms"],
            "full_size_again_ms": full and full["unix_ms"] - k["unix_ms"],
            "lost_rows_shared_out": resumed and resumed["lost_rows"],
        })
    with open(a.out + ".jsonl", "w") as f:
        for r in results:
            f.write(json.dumps(r) + "\n")
        for k in per_kill:
            f.write(json.dumps(k) + "\n")
    for r in results:
        print(json.dumps(r))
    again = sorted(k["training_again_ms"] for k in per_kill if k["training_again_ms"] is not None)
    full = sorted(k["full_size_again_ms"] for k in per_kill if k["full_size_again_ms"] is not None)

    def pct(v, q):
        return v[min(len(v) - 1, int(q * len(v)))] if v else None

    print(json.dumps({"kills": len(per_kill), "training_again_ms_p50": pct(again, 0.5), "training_again_ms_max": again[-1] if again else None,
                      "full_size_again_ms_p50": pct(full, 0.5), "full_size_again_ms_max": full[-1] if full else None}))
    sys.exit(0 if all(r["code"] == 0 for r in results) else 1)


def report_ps(a, results, faulty):
    """Per kill: the first replacement of the victim's rank after it."""
    replaced = sorted((v for v in faulty["lines"] if v.get("event") == "replaced"), key=lambda v: v["unix_ms"])
    per_kill = []
    used = set()
    for k in faulty["kills"]:
        nxt = next((i for i, g in enumerate(replaced) if g["unix_ms"] >= k["unix_ms"] and i not in used), None)
        if nxt is not None:
            used.add(nxt)
        g = replaced[nxt] if nxt is not None else None
        per_kill.append({"kill_unix_ms": k["unix_ms"], "replaced_ms": g and g["unix_ms"] - k["unix_ms"],
                         "rank": g and g["rank"], "continued_at_step": g and g["step"]})
    with open(a.out + ".jsonl", "w") as f:
        for r in results + per_kill:
            f.write(json.dumps(r) + "\n")
    for r in results:
        print(json.dumps(r))
    ms = sorted(k["replaced_ms"] for k in per_kill if k["replaced_ms"] is not None)
    print(json.dumps({"kills": len(per_kill), "replaced": len(ms),
                      "replaced_ms_p50": ms[len(ms) // 2] if ms else None, "replaced_ms_max": ms[-1] if ms else None}))
    sys.exit(0 if all(r["code"] == 0 for r in results) else 1)


if __name__ == "__main__":
    main()
