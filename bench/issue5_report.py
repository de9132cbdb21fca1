"""Renders bench/issue5.sh's raw JSON lines as the Markdown results file and the plot.

usage: issue5_report.py RAW.jsonl OUT.md OUT.png COMMANDS RATE EPOCHS [AVERAGE_EVERY [SECTIONS]]

A section whose runs are not in RAW (bench/issue5.sh's SECTIONS left them out) is left out.
"""
import collections
import json
import os
import platform
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

raw, out, png, commands, rate, epochs = sys.argv[1:7]
average_every = sys.argv[7] if len(sys.argv) > 7 else "8"
sections = sys.argv[8] if len(sys.argv) > 8 else "codec allreduce ps localsgd"
TARGET = 0.85
RUNS = [
    ("none", "uncompressed (f32 ring all-reduce)"),
    ("topk", "top-1% + EF, momentum before compression"),
    ("topk-after", "top-1% + EF, momentum after the exchange"),
    ("int8", "int8 (stochastic rounding)"),
    ("powersgd4", "PowerSGD rank 4 + EF"),
]
LOCAL_SGD_RUNS = [
    ("lsgd-none", "local SGD, uncompressed (f32 ring all-reduce of the parameters)"),
    ("lsgd-topk", "local SGD, top-1% + EF of the change since the last average"),
    ("lsgd-int8", "local SGD, int8 of the change"),
    ("lsgd-powersgd4", "local SGD, PowerSGD rank 4 + EF of the change"),
]
rows = [json.loads(l) for l in open(raw)]
by_run = collections.defaultdict(list)
for d in rows:
    by_run[d["_run"]].append(d)


def sh(c):
    try:
        return subprocess.run(c, shell=True, capture_output=True, text=True).stdout.strip()
    except Exception:
        return "?"


def commit():
    # Read the checked-out commit from .git without running git.
    try:
        head = open(".git/HEAD").read().strip()
        if head.startswith("ref: "):
            ref = head[5:]
            path = os.path.join(".git", ref)
            if os.path.exists(path):
                return open(path).read().strip()[:10]
            for line in open(".git/packed-refs"):
                if line.rstrip().endswith(ref):
                    return line.split()[0][:10]
        return head[:10]
    except OSError:
        return "?"


def curve(run):
    """(training s, wall s, bytes sent by rank 0, accuracy) per evaluation, in order."""
    pts = []
    for d in by_run[run]:
        if d.get("event") in ("eval", "epoch") and d.get("test_acc") is not None:
            comm = d.get("comm") or {}
            pts.append((d["wall_s"] - d.get("eval_s", 0.0), d["wall_s"], comm.get("sent_total", 0), d["test_acc"]))
    return pts


def first_at(pts, target):
    for p in pts:
        if p[3] >= target:
            return p
    return None


def event(run, name):
    return next((d for d in by_run[run] if d.get("event") == name), None)


def last_epoch(run):
    es = [d for d in by_run[run] if d.get("event") == "epoch"]
    return es[-1] if es else None


L = []
# When the runs ended (the raw file's last write), so that re-rendering keeps the date.
ended = sh(f"date -u -r {raw} +%FT%TZ")
L.append(f"# Issue 5 benchmarks: communication compression — {ended}\n")


def cpus():
    """The CPU model names in /proc/cpuinfo, with their counts."""
    try:
        names = [l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")]
    except OSError:
        return "?"
    return ", ".join(f"{n} × {names.count(n)}" for n in dict.fromkeys(names))


L.append(
    "Machine: " + cpus() + f" (/proc/cpuinfo model name), {sh('nproc --all')} cores (shared), "
    + sh("free -g | awk '/Mem/{print $2}'") + " GiB, kernel " + platform.release() + "; " + sh("rustc --version")
    + f"; sinter commit {commit()} plus the working tree.\n"
)
loads = {d["event"]: d["loadavg"] for d in by_run["machine"]}
if loads:
    L.append(
        "Load average (1, 5, 15 min; other sessions share these 2 cores): "
        + "; ".join(f"{k.replace('load_', '')} the runs {', '.join(f'{v:.2f}' for v in loads[k])}" for k in ("load_before", "load_after") if k in loads)
        + ".\n"
    )
invocation = f"sudo bench/issue5.sh {epochs}"
if sections != "codec allreduce ps localsgd":
    invocation = f'sudo SECTIONS="{sections}" bench/issue5.sh {epochs}'
L.append(f"Command: `{invocation}`; every figure below comes from that one run (raw lines in `{os.path.basename(raw)}`). It ran:\n")
L.append("```")
L.extend(l.rstrip() for l in open(commands))
L.append("```\n")

# --- codecs -------------------------------------------------------------------------------------------
codec_rows = [d for d in by_run["codec"]]
if codec_rows:
    L.append("## 1. Codecs on one core, 25 MiB of real gradients\n")
    L.append(f"Gradients: {codec_rows[0].get('gradients', '?')} (6,553,600 f32). GB/s count f32 input bytes, fastest of the runs; `none` is the memcpy reference of the same run.\n")
    L.append("| codec | encode GB/s | decode GB/s | ratio | rel. error ‖x−x̂‖/‖x‖ | target |")
    L.append("|---|---|---|---|---|---|")
    for d in codec_rows:
        c = d["codec"]
        target = ""
        if c in ("fp16", "bf16", "int8", "sign"):
            ok = d["encode_gbps"] >= 2 and d["decode_gbps"] >= 2
            target = f"≥ 2 GB/s each way: {'met' if ok else '**missed**'}"
        if c.startswith("topk:0.01"):
            ok = d["encode_gbps"] >= 0.5 and d["decode_gbps"] >= 0.5
            target = f"≥ 0.5 GB/s: {'met' if ok else '**missed**'}"
        L.append(f"| {c} | {d['encode_gbps']:.2f} | {d['decode_gbps']:.2f} | {d['ratio']:.1f} | {d['rel_error']:.3e} | {target} |")
    L.append("")

# --- training between namespaces ----------------------------------------------------------------------
TOPOLOGY = (
    "Topology: one bridge namespace, four host namespaces, each joined to the bridge by a veth pair shaped with "
    f"`tbf rate {rate} burst 32kb latency 100ms` in both directions (segmentation offloads off). One worker per host, "
    "the coordinator beside worker 0."
)
allreduce = any(by_run[r] for r, _ in RUNS)
if allreduce:
    L.append(f"## 2. Four hosts in network namespaces, {rate} tbf links, Fashion-MNIST MLP, 4 workers, {epochs} epochs\n")
    L.append(
        "Topology: one bridge namespace, four host namespaces, each joined to the bridge by a veth pair shaped with "
        f"`tbf rate {rate} burst 32kb latency 100ms` in both directions (segmentation offloads off). One worker per host, "
        "the coordinator beside worker 0. Global batch 128, SGD lr 0.05 with warm-up (200 steps) and cosine decay, momentum 0.9 "
        "(in the optimizer, or moved before compression where said), evaluation of the 10,000 test images every 25 steps by rank 0.\n"
    )
    L.append(
        "Time is training time: rank 0's wall time minus the time it spent evaluating (the other workers wait for it at the "
        "next collective, so evaluating costs every run the same steps but not the same share of its time). "
        "Bytes are what rank 0's exchange sent (frames of the collectives, headers included, counted from the engines' plans); "
        "the link columns are the interfaces' own counters (all four hosts, TCP/IP, coordinator heartbeats and evaluation pauses included).\n"
    )
    base = curve("none")
    base_hit = first_at(base, TARGET)
    base_final = last_epoch("none")
    base_bytes = base[-1][2] if base else None
    links_none = event("none", "links")
    L.append(f"| run | time to {TARGET} (s) | vs uncompressed | bytes sent by rank 0 to {TARGET} | whole run | vs uncompressed | per step | link tx, 4 hosts | final accuracy | vs uncompressed (points) | mean rel. error |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|")
    summary = {}
    for run, label in RUNS:
        pts = curve(run)
        if not pts:
            continue
        hit = first_at(pts, TARGET)
        fin = last_epoch(run)
        links = event(run, "links")
        done = event(run, "done")
        total = done["bytes_sent"] if done else pts[-1][2]
        steps = done["steps"] if done else 1
        errs = [d["comm"]["rel_error"] for d in by_run[run] if d.get("event") == "epoch" and d.get("comm")]
        t_ratio = hit[0] / base_hit[0] if hit and base_hit else None
        b_ratio = (base_bytes / total) if base_bytes and total else None
        acc_gap = (fin["test_acc"] - base_final["test_acc"]) * 100 if fin and base_final else None
        summary[run] = (hit, t_ratio, b_ratio, acc_gap)
        tx = sum(links["tx_bytes"]) if links else 0
        cells = [label]
        cells.append(f"{hit[0]:.1f}" if hit else "not reached")
        cells.append("—" if run == "none" or t_ratio is None else f"{t_ratio:.3f} (1/{1 / t_ratio:.1f})")
        cells.append(f"{hit[2] / 1e6:.2f} MB" if hit else "—")
        cells.append(f"{total / 1e6:.1f} MB")
        cells.append("—" if run == "none" or not b_ratio else f"{b_ratio:.1f}× fewer")
        cells.append(f"{total / steps / 1e3:.1f} kB")
        cells.append(f"{tx / 1e6:.1f} MB")
        cells.append(f"{fin['test_acc']:.4f}" if fin else "—")
        cells.append("—" if run == "none" or acc_gap is None else f"{acc_gap:+.2f}")
        cells.append(f"{sum(errs) / len(errs):.3f}" if errs else "0")
        L.append("| " + " | ".join(cells) + " |")
    L.append("")
    if "topk" in summary:
        hit, t_ratio, b_ratio, gap = summary["topk"]
        L.append("Issue 5 targets, this run (top-1% + EF, momentum before compression, against uncompressed):\n")
        L.append(f"- time to {TARGET} ≤ 1/5 of uncompressed: {'met' if t_ratio is not None and t_ratio <= 0.2 else '**missed**'} ({'—' if t_ratio is None else f'{t_ratio:.3f}'}).")
        L.append(f"- ≥ 50× fewer bytes: {'met' if b_ratio and b_ratio >= 50 else '**missed**'} ({b_ratio:.1f}× by rank 0's frames).")
        tx_none = sum(links_none["tx_bytes"]) if links_none else None
        links_topk = event("topk", "links")
        if tx_none and links_topk:
            L.append(f"  On the links (TCP/IP headers, ACKs and heartbeats included): {tx_none / sum(links_topk['tx_bytes']):.1f}× fewer bytes.")
        for run in ("topk", "int8", "powersgd4"):
            if run in summary and summary[run][3] is not None:
                g = summary[run][3]
                L.append(f"- final accuracy of {run} within 0.5 points of uncompressed: {'met' if abs(g) <= 0.5 or g > 0 else '**missed**'} ({g:+.2f} points).")
        L.append("")

    # per-peer traffic of one step
    L.append("Bytes per step and per peer (rank 0, mean over the last epoch; the all-gather and the ring send only to rank 1 and receive only from rank 3, recursive doubling exchanges with ranks 1 and 2):\n")
    L.append("| run | sent to ranks 0..3 | received from ranks 0..3 | ratio (f32 ring / sent) |")
    L.append("|---|---|---|---|")
    for run, label in RUNS:
        fin = last_epoch(run)
        if fin and fin.get("comm"):
            c = fin["comm"]
            L.append(f"| {run} | {', '.join(f'{v:.0f}' for v in c['sent_per_peer'])} | {', '.join(f'{v:.0f}' for v in c['received_per_peer'])} | {c['ratio']:.1f} |")
    L.append("")

# --- parameter server -----------------------------------------------------------------------------------
ps_runs = any(by_run[f"ps-async-{c}"] for c in ("none", "topk:0.01:f16"))
if ps_runs:
    L.append("## 3. Asynchronous parameter server, top-1% pushes\n")
    L.append("examples/fashion-mlp-ps.toml (SGD lr 0.05, momentum 0.5 on the server, 3 epochs), 4 workers and 1 shard on loopback, `cluster.consistency = \"async\"`; the push's dense part is one top-1% message per shard with a per-shard error-feedback residual; pulls stay f32.\n")
    L.append("| run | accuracy per epoch | bytes pushed+pulled by rank 0 | push ratio (f32 push / sent) |")
    L.append("|---|---|---|---|")
for c in ("none", "topk:0.01:f16") if ps_runs else ():
    run = f"ps-async-{c}"
    es = [d for d in by_run[run] if d.get("event") == "epoch"]
    done = event(run, "done")
    if es and done:
        ratio = es[-1].get("comm", {}).get("ratio", 1.0)
        L.append(f"| {c} | {', '.join(format(e['test_acc'], '.4f') for e in es)} | {done['bytes_sent'] / 1e6:.1f} MB sent, {done['bytes_received'] / 1e6:.1f} MB received | {ratio:.1f} |")
L.append("")

# --- local SGD ---------------------------------------------------------------------------------------------
lbase_done = event("lsgd-none", "done")
lbase_final = last_epoch("lsgd-none")
if any(by_run[r] for r, _ in LOCAL_SGD_RUNS):
    L.append(f"## 4. Local SGD over the same links: averages every {average_every} steps, compressed\n")
    L.append(
        TOPOLOGY + f" examples/fashion-mlp-topk.toml with `cluster.sync = \"local_sgd\"`, `cluster.average_every = {average_every}`: "
        "each worker takes optimizer steps on its own 32-row batches (SGD lr 0.05, warm-up and cosine decay as above, momentum 0.9 in each worker's optimizer) "
        f"and every {average_every} steps, and at each epoch's end, the workers average their parameters. "
        "Compressed, each worker sends its change since the last average (plus its error-feedback residual, for top-k and PowerSGD), "
        "every worker decodes every message in rank order and continues from the same average; the first average of a run is exact (f32). "
        f"Rank 0 evaluates every {3 * int(average_every)} steps, right after an average.\n"
    )
    lbase_bytes = lbase_done["bytes_sent"] if lbase_done else None
    L.append(f"| run | final accuracy | vs uncompressed local SGD (points) | best accuracy | time to {TARGET} (s) | wall time (s) | bytes sent by rank 0 | vs uncompressed local SGD | per step | link tx, 4 hosts | mean rel. error |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|")
    rows_ls = list(LOCAL_SGD_RUNS)
    if curve("none"):
        rows_ls.insert(0, ("none", "reference: gradient all-reduce every step, uncompressed (section 2)"))
    for run, label in rows_ls:
        pts = curve(run)
        done = event(run, "done")
        if not pts or not done:
            continue
        fin = last_epoch(run)
        hit = first_at(pts, TARGET)
        links = event(run, "links")
        errs = [d["comm"]["rel_error"] for d in by_run[run] if d.get("event") == "epoch" and d.get("comm")]
        total = done["bytes_sent"]
        gap = (fin["test_acc"] - lbase_final["test_acc"]) * 100 if fin and lbase_final else None
        cells = [label]
        cells.append(f"{fin['test_acc']:.4f}" if fin else "—")
        cells.append("—" if run in ("none", "lsgd-none") or gap is None else f"{gap:+.2f}")
        cells.append(f"{max(p[3] for p in pts):.4f}")
        cells.append(f"{hit[0]:.1f}" if hit else "not reached")
        cells.append(f"{done['wall_s']:.1f}")
        cells.append(f"{total / 1e6:.1f} MB")
        if run == "none" and lbase_bytes:
            cells.append(f"{total / lbase_bytes:.1f}× more")
        else:
            cells.append("—" if run == "lsgd-none" or not lbase_bytes else f"{lbase_bytes / total:.1f}× fewer")
        cells.append(f"{total / done['steps'] / 1e3:.1f} kB")
        cells.append(f"{sum(links['tx_bytes']) / 1e6:.1f} MB" if links else "—")
        cells.append(f"{sum(errs) / len(errs):.3f}" if errs else "0")
        L.append("| " + " | ".join(cells) + " |")
    L.append("")
    L.append(
        f"Time to {TARGET} is training time, as in section 2 (rank 0's wall time minus its evaluations); "
        "wall time is rank 0's whole run, evaluations included. `mean rel. error` is ‖d − d̂‖/‖d‖ per average over what the codec was given "
        "(the change since the last average, plus the residual), as in section 2.\n"
    )

L.append(f"![accuracy against training time and bytes]({os.path.basename(png)})\n")
L.append("## Reading these numbers\n")
L.append("- One run of each configuration, on a shared 2-core VM with four workers: the time figures move by tens of percent between runs; the byte figures do not (they follow from the codecs and the collectives), and the accuracy of an all-reduce run is deterministic (same seed, same sums in the same order: an earlier run of this script gave the same accuracies). The asynchronous parameter-server runs are not deterministic.")
L.append("- Why ≥ 50× fewer bytes: the f32 ring all-reduce sends 2·(W−1)/W·4N = 6N bytes per worker and step (N = 269,322 parameters, W = 4); the compressed exchange all-gathers every worker's message, so each worker sends W − 1 = 3 messages of about 1% · N · 3.3 bytes (varint index gaps and half-precision values scaled by the largest), plus a tiny all-gather of the message lengths. int8 goes through the same all-gather, so it sends 3 · N bytes, half of the f32 ring, not a quarter: each worker's message is quantised once by its sender, never re-quantised on a ring hop, which keeps the error independent of the number of workers (the price is the all-gather's W − 1 messages). PowerSGD all-reduces its factors by recursive doubling (small buffers), which sends the whole buffer to each of log2(W) partners.")
L.append("- `mean rel. error` is ‖g − ĝ‖/‖g‖ per step, where g is what the codec was given: with error feedback that is the gradient (or velocity) plus the residual, and the residual carries most of the mass, so the figure sits near 1 for top-k and PowerSGD; the codec table's error on raw gradients (top-1%: about 0.49) is the one to compare codecs by.")
L.append("- Momentum: top-k with SGD momentum applied after the exchange trails the uncompressed run by about a point; moving the momentum before compression (each worker's velocity is compressed, with error feedback, and cleared where sent: momentum correction and factor masking from Deep Gradient Compression) closes most of that gap. int8 and PowerSGD keep the optimizer's momentum.")
L.append("- The parameter-server runs are on loopback (no shaping): they show that asynchronous training with compressed pushes converges; pulls are not compressed, so with servers the bytes received do not shrink.")
if lbase_done:
    ref_done = event("none", "done")
    fewer = f" ({ref_done['bytes_sent'] / lbase_done['bytes_sent']:.1f}× fewer than the gradient all-reduce in this run)" if ref_done else ""
    gaps = [
        abs(last_epoch(r)["test_acc"] - lbase_final["test_acc"]) * 100
        for r, _ in LOCAL_SGD_RUNS[1:]
        if last_epoch(r) and lbase_final
    ]
    L.append(
        f"- Local SGD averages every {average_every} steps (and at each epoch's end), so uncompressed it sends about 1/{average_every} "
        f"of the gradient all-reduce's bytes{fewer}. Compressed, each worker's change since the last average goes through the same "
        "all-gather (PowerSGD: the same factor all-reduces) as a gradient does, so the codecs' byte ratios are close to section 2's; "
        "the run's first average is exact (f32) and is in the totals. What top-k or PowerSGD leaves out of a change stays in the "
        "worker's residual and goes out with a later average"
        + (f"; the final accuracies stay within {max(gaps):.2f} points of uncompressed local SGD here." if gaps else ".")
    )
if loads:
    L.append(
        "- Load: the load averages at the top say how busy the 2 cores were (other sessions ran beside this one); "
        "time columns are comparable within one run only, byte and accuracy columns across runs."
    )

open(out, "w").write("\n".join(L) + "\n")
print("\n".join(L))

# --- plot -------------------------------------------------------------------------------------------------
fig, (a, b) = plt.subplots(1, 2, figsize=(13, 5))
for runs, style in ((RUNS, "-"), (LOCAL_SGD_RUNS, "--")):
    for run, label in runs:
        pts = curve(run)
        if not pts:
            continue
        a.plot([p[0] for p in pts], [p[3] for p in pts], style, label=label, lw=1.2)
        b.plot([max(p[2], 1) / 1e6 for p in pts], [p[3] for p in pts], style, label=label, lw=1.2)
for ax in (a, b):
    ax.axhline(TARGET, color="grey", ls=":", lw=1)
    ax.set_ylim(0.75, 0.9)
    ax.set_xscale("log")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3, which="both")
a.set_xlabel("training time (s, log)")
b.set_xlabel("MB sent by rank 0 (log)")
a.set_title(f"4 workers, {rate} links: accuracy against time")
b.set_title("accuracy against bytes on the wire")
b.legend(loc="lower right", fontsize=8)
fig.tight_layout()
fig.savefig(png, dpi=110)
