#!/usr/bin/env python3
"""The two halves of bench/fl_dp.sh that need Python.

  fl_dp_report.py accountant RAW --q Q --sigma SIGMA --delta DELTA
      For the epsilon the first dp run reported after rounds 1, 25, 50, 75 and its last, prints one
      JSON line (event "accountant") with dp-accounting's epsilon and order for the same q, sigma and
      rounds (RdpAccountant with its default orders, composing
      SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), rounds)) and the ratio;
      also whether every dp run reported the same epsilons (they must: epsilon does not depend on
      the seed). Needs dp-accounting (the peers' venv-flwr has 0.6.0).

  fl_dp_report.py report RAW > MD
      Renders RAW (bench/fl_dp.sh's JSON lines) as the Markdown results file: machine, commands, the
      final test accuracy of every arm and seed with the median and range, accuracy along the rounds,
      CPU per run, the accountant comparison, and the raw lines of the evaluated rounds.
"""

import argparse
import json
import logging
import statistics
import sys


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def accountant(args):
    import dp_accounting
    from importlib.metadata import version

    # dp-accounting logs every fractional order it gives up on; those are expected (see
    # bench/results/2026-12-08-fl-dp-accountant.md) and would only bury the output.
    logging.getLogger("absl").setLevel(logging.ERROR)
    lines = read(args.raw)
    dp_rounds = [d for d in lines if d.get("event") == "round" and d.get("arm") == "dp"]
    if not dp_rounds:
        sys.exit("fl_dp_report.py: no dp round lines in " + args.raw)
    first_seed = dp_rounds[0]["seed"]
    by_seed = {}
    for d in dp_rounds:
        by_seed.setdefault(d["seed"], {})[d["round"]] = d.get("epsilon")
    reference = by_seed[first_seed]
    same = all(eps == reference for eps in by_seed.values())
    last = max(reference)
    for rounds in sorted({1, 25, 50, 75, last} & set(reference)):
        acc = dp_accounting.rdp.RdpAccountant()
        acc.compose(
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(args.q, dp_accounting.GaussianDpEvent(args.sigma)), rounds
            )
        )
        theirs, order = acc.get_epsilon_and_optimal_order(args.delta)
        ours = reference[rounds]
        print(
            json.dumps(
                {
                    "event": "accountant",
                    "q": args.q,
                    "sigma": args.sigma,
                    "delta": args.delta,
                    "rounds": rounds,
                    "sinter_epsilon": ours,
                    "dp_accounting_epsilon": float(theirs),
                    "dp_accounting_order": float(order),
                    "ratio": ours / float(theirs),
                    "dp_accounting_version": version("dp-accounting"),
                    "every_dp_run_reported_the_same": same,
                }
            )
        )


ARMS = {
    "dp": "DP-FedAvg, σ = 1.0, C = 0.05",
    "clip": "the same, σ = 0 (clipping only)",
    "nodp": "FedAvg without DP",
}


def fmt_range(values):
    if not values:
        return "–"
    med = statistics.median(values)
    return f"{med:.4f} ({min(values):.4f}–{max(values):.4f})"


def report(args):
    lines = read(args.raw)
    machine = next(d for d in lines if d.get("event") == "machine")
    commands = {d["arm"]: d["command"] for d in lines if d.get("event") == "command"}
    done = [d for d in lines if d.get("event") == "done"]
    procs = {(d["arm"], d["seed"]): d for d in lines if d.get("event") == "process"}
    rounds = [d for d in lines if d.get("event") == "round"]
    acct = [d for d in lines if d.get("event") == "accountant"]
    seeds = sorted({d["seed"] for d in done})
    out = []
    w = out.append
    w(f"# DP-FedAvg in `sinter fl sim`: accuracy at ε ≈ 8 and the accountant, measured {machine['date_utc']} UTC")
    w("")
    w(
        f"Machine: {machine['cpu']}, `nproc` {machine['nproc']} (shared with other work), kernel {machine['kernel']} "
        f"(`uname -r`); {machine['rustc']}; commit {machine['commit']}; load average at start {machine['load']}."
    )
    w("Data: Fashion-MNIST (60,000 training rows, 10,000 test rows), standardized; split over 100 clients uniformly at random (`iid`, about 600 rows each).")
    w("Model: MLP 784-256-256-10 (269,322 parameters); each sampled client trains one local epoch of SGD (lr 0.05, batch 64) from the global model.")
    w("Every arm runs 100 rounds at sampling rate q = 0.1 and evaluates the global model on the test set after rounds 25, 50, 75 and 100.")
    w("")
    w("Commands, from the repository root (`bench/fl_dp.sh`, which runs them in an order that rotates with the seed; SEED is " + ", ".join(map(str, seeds)) + "):")
    w("")
    w("```")
    for arm in ARMS:
        if arm in commands:
            w(commands[arm])
    w("~/.cache/sinter-peers/venv-flwr/bin/python bench/fl_dp_report.py accountant RAW --q 0.1 --sigma 1.0 --delta 1e-5")
    w("```")
    w("")
    w("## Test accuracy after 100 rounds")
    w("")
    w("| arm | ε at δ = 1e-5 | " + " | ".join(f"seed {s}" for s in seeds) + " | median (range) | CPU s per run, median |")
    w("|---|---|" + "---|" * len(seeds) + "---|---|")
    final = {}
    for arm, name in ARMS.items():
        accs = {d["seed"]: d.get("test_acc") for d in done if d["arm"] == arm}
        if not accs:
            continue
        final[arm] = [a for a in accs.values() if a is not None]
        eps = {json.dumps(d.get("epsilon")) for d in done if d["arm"] == arm}
        eps_text = ", ".join("none" if e == "null" else (e.strip('"') if e.startswith('"') else f"{float(e):.3f}") for e in sorted(eps))
        cpu = [procs[(arm, s)]["user_s"] + procs[(arm, s)]["sys_s"] for s in seeds if (arm, s) in procs]
        w(
            f"| {name} | {eps_text} | "
            + " | ".join(f"{accs[s]:.4f}" if accs.get(s) is not None else "–" for s in seeds)
            + f" | {fmt_range(final[arm])} | {statistics.median(cpu):.1f} |"
        )
    w("")
    if "dp" in final and "nodp" in final and "clip" in final:
        dp, nodp, clip = (statistics.median(final[a]) for a in ("dp", "nodp", "clip"))
        w(
            f"Medians: DP-FedAvg {dp:.4f} against {nodp:.4f} without DP, {100 * (nodp - dp):.1f} points lower; "
            f"of those, {100 * (nodp - clip):.1f} go with the clipping, Poisson sampling and fixed denominator (σ = 0) "
            f"and {100 * (clip - dp):.1f} with the noise."
        )
        w("")
    w("### Along the rounds (median over seeds, range in brackets)")
    w("")
    evals = sorted({d["round"] for d in rounds if d.get("test_acc") is not None})
    w("| arm | " + " | ".join(f"round {r}" for r in evals) + " |")
    w("|---|" + "---|" * len(evals))
    for arm, name in ARMS.items():
        cells = []
        for r in evals:
            accs = [d["test_acc"] for d in rounds if d["arm"] == arm and d["round"] == r and d.get("test_acc") is not None]
            cells.append(fmt_range(accs))
        w(f"| {name} | " + " | ".join(cells) + " |")
    w("")
    dp_rounds = [d for d in rounds if d["arm"] == "dp"]
    if dp_rounds:
        sizes = [d["clients"] for d in dp_rounds]
        empty = sum(1 for s in sizes if s == 0)
        w(
            f"Poisson sampling in the dp runs: {statistics.mean(sizes):.2f} clients a round on average over {len(sizes)} rounds "
            f"(q·N = 10), from {min(sizes)} to {max(sizes)}; {empty} empty rounds; "
            f"{sum(d['refused'] for d in dp_rounds)} updates refused (every client clipped before sending)."
        )
        w("")
    if acct:
        w("## ε: Sinter against dp-accounting")
        w("")
        w(
            f"dp-accounting {acct[0]['dp_accounting_version']}, `RdpAccountant()` with its default orders, "
            f"`SelfComposedDpEvent(PoissonSampledDpEvent({acct[0]['q']}, GaussianDpEvent({acct[0]['sigma']})), rounds)`, "
            f"δ = {acct[0]['delta']}; Sinter's ε as the first dp run's round lines report it "
            f"(every dp run reported the same ε: {'yes' if all(a['every_dp_run_reported_the_same'] for a in acct) else 'NO'})."
        )
        w("")
        w("| rounds | Sinter ε | dp-accounting ε | order | Sinter / dp-accounting − 1 |")
        w("|---|---|---|---|---|")
        for a in acct:
            w(
                f"| {a['rounds']} | {a['sinter_epsilon']:.10f} | {a['dp_accounting_epsilon']:.10f} | "
                f"{a['dp_accounting_order']:g} | {a['ratio'] - 1:.1e} |"
            )
        w("")
    w("## Raw lines")
    w("")
    w(f"Every line of every run is in `{args.raw.split('/')[-1]}` beside this file; here the machine, each run's `done` and timing, the evaluated rounds and the accountant comparison.")
    w("")
    w("```")
    for d in lines:
        if d.get("event") in ("machine", "done", "process", "accountant") or (
            d.get("event") == "round" and d.get("test_acc") is not None
        ):
            w(json.dumps(d))
    w("```")
    print("\n".join(out))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("accountant")
    a.add_argument("raw")
    a.add_argument("--q", type=float, required=True)
    a.add_argument("--sigma", type=float, required=True)
    a.add_argument("--delta", type=float, required=True)
    r = sub.add_parser("report")
    r.add_argument("raw")
    args = p.parse_args()
    accountant(args) if args.cmd == "accountant" else report(args)


if __name__ == "__main__":
    main()
