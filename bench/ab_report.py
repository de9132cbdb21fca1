#!/usr/bin/env python3
"""Summarises bench/ab.sh's JSON lines: per measurement, each binary's median
and range over the rounds, and the ratio B/A taken within each round (median
and range), as a Markdown table on stdout."""
import json
import statistics
import sys

# (what, selector, metric, unit, higher is better)
ROWS = [
    ("allreduce", lambda v: v.get("bytes") == 4096, "p50_us", "µs p50, 4 KiB", False),
    ("allreduce", lambda v: v.get("bytes") == 25 << 20, "algbw_gbps", "GB/s, 25 MiB", True),
    ("ps", lambda v: "key_updates_per_s" in v, "key_updates_per_s", "key updates/s", True),
    ("ps", lambda v: "push_p50_us" in v, "push_p50_us", "µs push p50", False),
    ("ps-replicated", lambda v: "key_updates_per_s" in v, "key_updates_per_s", "key updates/s, 2 replicas", True),
    ("train", lambda v: v.get("event") == "epoch", "samples_per_s", "samples/s, MLP 2 workers", True),
]


def fmt(x):
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def main(path):
    lines = [json.loads(l) for l in open(path) if l.strip()]
    print("| measurement | A: median (range) | B: median (range) | B/A per round: median (range) | better |")
    print("|---|---|---|---|---|")
    for what, sel, key, label, higher in ROWS:
        by = {}
        for v in lines:
            if v["ab_what"] == what and sel(v) and key in v:
                by.setdefault((v["ab_bin"], v["ab_round"]), v[key])
        rounds = sorted({r for (_, r) in by})
        a = [by[("A", r)] for r in rounds if ("A", r) in by]
        b = [by[("B", r)] for r in rounds if ("B", r) in by]
        ratio = [by[("B", r)] / by[("A", r)] for r in rounds if ("A", r) in by and ("B", r) in by and by[("A", r)]]
        if not a or not b:
            continue
        rng = lambda xs: f"{fmt(statistics.median(xs))} ({fmt(min(xs))}–{fmt(max(xs))})"
        print(f"| {label} | {rng(a)} | {rng(b)} | {statistics.median(ratio):.3f} ({min(ratio):.3f}–{max(ratio):.3f}) | {'higher' if higher else 'lower'} |")


if __name__ == "__main__":
    main(sys.argv[1])
