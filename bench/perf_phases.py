#!/usr/bin/env python3
"""Where a `sinter train` run spends its time, from `perf script` output of a
`perf record --call-graph dwarf` profile (samples of the cpu-clock event).

Each sample is put in one phase by the frames on its stack (data loading, the
training epoch, test evaluation, other), and the samples of the training epoch
are split by the function the training loop called (the optimizer step, the model's
forward/backward, the batch gather, ...) and by leaf function.
Prints Markdown tables on stdout.

With the sampling frequency (--freq, of a cpu-clock profile) it also states the
CPU seconds of the training epoch, and with the rows it trained on
(--epoch-rows) the examples per CPU second: a rate that time spent waiting for
a core (the machine is shared) does not lower.

Usage: perf script -i perf.data -F comm,tid,ip,sym | python3 perf_phases.py [--top N] [--freq HZ --epoch-rows N]
"""
import argparse
import collections
import re
import sys

# Phase of a sample: the first of these found on its stack.
LOAD = re.compile(r"node::job::load_data|data::read::read_auto")
EVAL = re.compile(r"\bevaluate\b|::predict\b|model::metrics::")
# Frames of the training loop. Inlining hides `run_epoch` at some call sites
# (perf then names only `Trainer::run` and its `run (inlined)` entry).
TRAINER = re.compile(r"node::train::Trainer::run\b|\brun_epoch\b|\bexchange_step\b")
# Frame lines: "<hex ip> <symbol>"; a blank line ends a sample.
FRAME = re.compile(r"^\s+([0-9a-f]+)\s+(.*?)\s*$")


def short(sym):
    """Drops generic arguments and the `(inlined)` tag so that names group."""
    sym = sym.replace(" (inlined)", "")
    sym = re.sub(r"^<(.+?) as [^>]+>::", r"\1::", sym)  # <T as Trait>::f -> T::f
    out, depth = [], 0
    for ch in sym:
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth = max(0, depth - 1)
        elif depth == 0:
            out.append(ch)
    s = "".join(out).strip()
    return s or sym


def samples(lines):
    """Yields each sample's frames leaf first, as (symbol, is_trainer_frame).

    perf prints the frames of one address as the containing function first
    (when it names it), then its inline chain from the innermost call outwards;
    this reorders them to innermost first, containing function last.
    """
    groups = []  # [(ip, [symbols])], leaf first

    def flush():
        out = []
        for _, syms in groups:
            # Sometimes the containing function is left out: the list is then inline frames only.
            if not syms[0].endswith("(inlined)"):
                syms = syms[1:] + syms[:1]
            in_trainer = any(TRAINER.search(s) for s in syms)
            for s in syms:
                out.append((s, bool(TRAINER.search(s)) or (in_trainer and s.startswith("run (inlined)"))))
        return out

    for line in lines:
        if not line.strip():
            if groups:
                yield flush()
            groups = []
            continue
        m = FRAME.match(line)
        if not m:
            continue
        ip, sym = m.group(1), m.group(2)
        if groups and groups[-1][0] == ip:
            groups[-1][1].append(sym)
        else:
            groups.append((ip, [sym]))
    if groups:
        yield flush()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--freq", type=float, help="the -F of perf record (cpu-clock samples per CPU second)")
    ap.add_argument("--epoch-rows", type=int, help="rows the training epoch processed")
    args = ap.parse_args()
    total = 0
    phase = collections.Counter()
    child = collections.Counter()
    leaf = collections.Counter()
    for stack in samples(sys.stdin):
        total += 1
        names = [s for s, _ in stack]
        if any(LOAD.search(s) for s in names):
            name = "load data (parse files)"
        elif any(EVAL.search(s) for s in names):
            name = "evaluate (test split)"
        elif any(t for _, t in stack):
            name = "train epoch"
        else:
            name = "other (startup, exit, kernel)"
        phase[name] += 1
        if name != "train epoch":
            continue
        # What the training loop called: the frame just leaf-ward of its innermost frame.
        i = min(k for k, (_, t) in enumerate(stack) if t)
        child[short(names[i - 1]) if i > 0 else "training loop (self)"] += 1
        leaf[short(names[0])] += 1
    if total == 0:
        sys.exit("perf_phases: no samples on stdin")
    epoch = phase["train epoch"] or 1
    print(f"{total} samples.")
    if args.freq:
        cpu_s = phase["train epoch"] / args.freq
        line = f"The training epoch ran for about {cpu_s:.2f} CPU s ({phase['train epoch']} samples at {args.freq:g} Hz)"
        if args.epoch_rows:
            line += f": {args.epoch_rows / max(cpu_s, 1e-9):,.0f} examples per CPU second"
        print(line + ".")
    print()
    print("| phase | share of process samples |")
    print("|---|---|")
    for name, n in phase.most_common():
        print(f"| {name} | {100 * n / total:.1f}% |")
    print("\nInside the training epoch, by what the training loop called:\n")
    print("| callee of the training loop | share of epoch samples |")
    print("|---|---|")
    for name, n in child.most_common(args.top):
        print(f"| `{name}` | {100 * n / epoch:.1f}% |")
    print("\nInside the training epoch, by leaf function:\n")
    print("| leaf function | share of epoch samples |")
    print("|---|---|")
    for name, n in leaf.most_common(args.top):
        print(f"| `{name}` | {100 * n / epoch:.1f}% |")


if __name__ == "__main__":
    main()
