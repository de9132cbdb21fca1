#!/usr/bin/env python3
"""Renders the results of bench/issue2.sh as Markdown on stdout, from the raw
JSON lines it wrote (one object per epoch, summary and process, tagged with
bench, system and round), the machine facts, the commands run, the click
generator's report and the perf profile's tables."""
import argparse
import json
import statistics

# Issue 2's targets for sparse logistic regression on one thread.
LR_SAMPLES_PER_S_MIN = 1_000_000
LR_AUC_GAP_MAX = 0.01
# The accuracy the Fashion-MNIST MLP is expected to reach after 2 epochs.
MLP_ACC_THRESHOLD = 0.86


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def pick(rows, **kw):
    return [r for r in rows if all(r.get(k) == v for k, v in kw.items())]


def one(rows, **kw):
    found = pick(rows, **kw)
    if len(found) != 1:
        raise SystemExit(f"issue2_report: expected one line with {kw}, found {len(found)}")
    return found[0]


def both_epochs_rate(epochs):
    """Samples/s over all epochs: each epoch has the same number of samples,
    so this is the harmonic mean of the per-epoch rates."""
    return len(epochs) / sum(1.0 / e["samples_per_s"] for e in epochs)


def fmt_k(x):
    return f"{x / 1000:,.1f}k"


def spread(xs):
    if len(xs) < 2:
        return f"{xs[0]:.4f}"
    return f"mean {statistics.mean(xs):.4f}, sd {statistics.stdev(xs):.4f}, min {min(xs):.4f}, max {max(xs):.4f}"


def main():
    ap = argparse.ArgumentParser()
    for a in ("raw", "facts", "commands", "gen", "perf"):
        ap.add_argument(f"--{a}", required=True)
    args = ap.parse_args()
    rows = load(args.raw)
    facts = json.load(open(args.facts))
    rounds = int(facts["rounds"])
    out = []
    p = out.append

    p(f"# Issue 2, single-process training: results of {facts['date']}")
    p("")
    p("Written by `bench/issue2.sh`; the raw JSON lines are in the `.jsonl` file beside this one.")
    p("Sinter and its peer ran back to back in the same script run; the machine is shared, so the ratios matter, not the absolutes.")
    p("")
    p("| machine | |")
    p("|---|---|")
    p(f"| date | {facts['date']} |")
    p(f"| CPU | {facts['cpu']} |")
    p(f"| cores | {facts['cores']} |")
    p(f"| memory | {facts['mem']} |")
    p(f"| kernel | {facts['kernel']} |")
    p(f"| rustc | {facts['rustc']} |")
    dirty = int(facts["dirty"])
    note = f" (working tree: {dirty} tracked files modified)" if dirty else ""
    p(f"| git commit | {facts['commit']}{note} |")
    p(f"| torch | {facts['torch']} |")
    p("")

    # --- a ---
    p("## a. Fashion-MNIST MLP 784-256-256-10, batch 128, SGD lr 0.05 momentum 0.9, 2 epochs, one process, one thread")
    p("")
    p("samples/s is over both epochs' training (total samples / total training time; data loading and evaluation excluded on both sides).")
    p("Test accuracy is after epoch 2. Wall s and CPU s are the whole process's (startup and data loading included): CPU s at or below wall s means one busy thread.")
    p("Load before is the 1-minute load average as each process started (2 cores; other work shares the machine).")
    p("")
    p("| round | first | Sinter samples/s (ep 1 / ep 2 / both) | PyTorch samples/s (ep 1 / ep 2 / both) | Sinter / PyTorch | Sinter acc | PyTorch acc | Sinter wall s (CPU s) | PyTorch wall s (CPU s) | load before (S / P) |")
    p("|---|---|---|---|---|---|---|---|---|---|")
    ratios = []
    for r in range(1, rounds + 1):
        cells = {}
        for system in ("sinter", "pytorch"):
            eps = sorted(pick(rows, bench="fashion-mlp", system=system, round=r, event="epoch"), key=lambda e: e["epoch"])
            proc = one(rows, bench="fashion-mlp", system=system, round=r, event="process")
            rate = both_epochs_rate(eps)
            cells[system] = (eps, proc, rate)
        s_eps, s_proc, s_rate = cells["sinter"]
        t_eps, t_proc, t_rate = cells["pytorch"]
        ratio = s_rate / t_rate
        ratios.append(ratio)
        first = "Sinter" if r % 2 == 1 else "PyTorch"

        def rates(eps, rate):
            return " / ".join(fmt_k(e["samples_per_s"]) for e in eps) + f" / **{fmt_k(rate)}**"

        def wall(proc):
            return f"{proc['proc_wall_s']:.2f} ({proc['user_s'] + proc['sys_s']:.2f})"

        p(f"| {r} | {first} | {rates(s_eps, s_rate)} | {rates(t_eps, t_rate)} | **{ratio:.2f}×** | {s_eps[-1]['test_acc']:.4f} | {t_eps[-1]['test_acc']:.4f} | {wall(s_proc)} | {wall(t_proc)} | {s_proc['loadavg_1m']:.2f} / {t_proc['loadavg_1m']:.2f} |")
    p("")
    p(f"Sinter / PyTorch over {rounds} rounds: median {statistics.median(ratios):.2f}×, min {min(ratios):.2f}×, max {max(ratios):.2f}×.")
    p("")
    p(f"Sinter's test accuracy after 2 epochs over seeds (`--set train.seed=N`); the threshold {MLP_ACC_THRESHOLD} is compared with this spread:")
    p("")
    p("| seed | test acc (ep 1) | test acc (ep 2) | samples/s (both epochs) | load before |")
    p("|---|---|---|---|---|")
    accs = []
    for e in sorted({x["seed"] for x in pick(rows, bench="fashion-mlp-seeds")}):
        eps = sorted(pick(rows, bench="fashion-mlp-seeds", seed=e, event="epoch"), key=lambda x: x["epoch"])
        accs.append(eps[-1]["test_acc"])
        proc = one(rows, bench="fashion-mlp-seeds", seed=e, event="process")
        p(f"| {e} | {eps[0]['test_acc']:.4f} | {eps[-1]['test_acc']:.4f} | {fmt_k(both_epochs_rate(eps))} | {proc['loadavg_1m']:.2f} |")
    p("")
    above = sum(a >= MLP_ACC_THRESHOLD for a in accs)
    p(f"Test accuracy after 2 epochs: {spread(accs)}; {above} of {len(accs)} seeds reach {MLP_ACC_THRESHOLD}.")
    p("")

    # --- b ---
    p("## b. Sparse logistic regression on generated click data, one thread")
    p("")
    gen_proc = one(rows, bench="click-gen", event="process")
    meta = one(rows, bench="click-gen", event="meta")
    gen_rows = meta["params"]["rows"] + meta["params"]["test_rows"]
    p(f"Generator: {gen_rows:,} rows in {gen_proc['proc_wall_s']:.2f} s wall ({gen_rows / max(gen_proc['proc_wall_s'], 1e-9):,.0f} rows/s, {gen_proc['user_s'] + gen_proc['sys_s']:.2f} s CPU), its report:")
    p("")
    p("```")
    p(open(args.gen).read().rstrip())
    p("```")
    p("")
    p("examples/s is the epoch's `samples_per_s` (training only, wall clock); load s is the process's wall time minus the job's (`sinter` reading the LIBSVM files); load before is the 1-minute load average as the process started.")
    p("")
    p("| round | config | examples/s | test AUC | Bayes AUC | gap | test log-loss | process wall s | load s | CPU s | load before |")
    p("|---|---|---|---|---|---|---|---|---|---|---|")
    configs = [
        ("click-logreg", "click-logreg.toml (FTRL α 0.2, batch 32)"),
        ("click-logreg-adagrad", "same, Adagrad lr 0.03"),
        ("click-fm", "click-fm.toml (FM, 8 factors, FTRL)"),
    ]
    results = {b: [] for b, _ in configs}
    for r in range(1, rounds + 1):
        for bench, label in configs:
            e = one(rows, bench=bench, round=r, event="epoch")
            done = one(rows, bench=bench, round=r, event="done")
            proc = one(rows, bench=bench, round=r, event="process")
            gap = e["bayes_auc"] - e["test_auc"]
            results[bench].append((e["samples_per_s"], gap))
            load_s = proc["proc_wall_s"] - done["wall_s"]
            p(f"| {r} | {label} | {e['samples_per_s']:,.0f} | {e['test_auc']:.4f} | {e['bayes_auc']:.4f} | {gap:+.4f} | {e['test_logloss']:.4f} | {proc['proc_wall_s']:.2f} | {load_s:.2f} | {proc['user_s'] + proc['sys_s']:.2f} | {proc['loadavg_1m']:.2f} |")
    p("")
    p("Against issue 2's targets:")
    p("")
    for bench, label in configs[:2]:
        speeds = [s for s, _ in results[bench]]
        gaps = [g for _, g in results[bench]]
        fast = sum(s >= LR_SAMPLES_PER_S_MIN for s in speeds)
        close = sum(g <= LR_AUC_GAP_MAX for g in gaps)
        verdict_speed = "met" if statistics.median(speeds) >= LR_SAMPLES_PER_S_MIN else "**missed**"
        verdict_auc = "met" if close == len(gaps) else "**missed**"
        p(f"- {label}: ≥ {LR_SAMPLES_PER_S_MIN:,} examples/s {verdict_speed} (median {statistics.median(speeds):,.0f}; {fast} of {len(speeds)} rounds at or above); "
          f"AUC within {LR_AUC_GAP_MAX} of Bayes {verdict_auc} ({close} of {len(gaps)} rounds, largest gap {max(gaps):.4f}).")
    p("")
    p("### Where the time goes")
    p("")
    perf_epoch = pick(rows, bench="click-logreg-perf", event="epoch")
    if perf_epoch:
        e = perf_epoch[0]
        p(f"One run of `click-logreg.toml` under `perf record -e cpu-clock --call-graph dwarf` (the profiled run: {e['samples_per_s']:,.0f} examples/s, test AUC {e['test_auc']:.4f}), folded by `bench/perf_phases.py`:")
        p("")
    p(open(args.perf).read().rstrip())
    p("")

    # --- c ---
    p("## Commands")
    p("")
    p("Run from the repository root, in this order:")
    p("")
    p("```")
    p(open(args.commands).read().rstrip())
    p("```")
    print("\n".join(out))


if __name__ == "__main__":
    main()
