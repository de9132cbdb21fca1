//! `sinter sim --fuzz` without the binary: the same sweep (`sim::cmd::fuzz_seeds`)
//! over seeds `FROM..TO`, after the shapes of their cases.
//!
//! `cargo run -p sim --release --example fuzz -- FROM TO [ssp-off-by-one|ack-without-backup]`

use std::collections::BTreeMap;
use std::io::Write;

use sim::{Bug, fuzz};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: fuzz FROM TO [ssp-off-by-one|ack-without-backup]";
    let (Some(from), Some(to)) = (args.first(), args.get(1)) else {
        eprintln!("{usage}");
        std::process::exit(2);
    };
    let (Ok(from), Ok(to)) = (from.parse::<u64>(), to.parse::<u64>()) else {
        eprintln!("{usage}");
        std::process::exit(2);
    };
    let bug = match args.get(2).map(|b| b.parse::<Bug>()) {
        None => None,
        Some(Ok(bug)) => Some(bug),
        Some(Err(e)) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let mut out = std::io::stdout().lock();
    shapes(from, to, &mut out).expect("stdout");
    match sim::cmd::fuzz_seeds(from, to, bug, false, &mut out) {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    }
}

/// How many cases of `from..to` have each number of workers, of shards and
/// of steps (in ranges), and each consistency.
fn shapes(from: u64, to: u64, out: &mut dyn Write) -> std::io::Result<()> {
    let mut workers = BTreeMap::new();
    let mut servers = BTreeMap::new();
    let mut steps = BTreeMap::new();
    let mut consistency = BTreeMap::new();
    let mut long_ps_16 = 0u64;
    let mut replicated = 0u64;
    for seed in from..to {
        let c = fuzz::case(seed, None);
        let w = match c.workers {
            1..=6 => "1-6",
            7..=12 => "7-12",
            _ => "13-16",
        };
        *workers.entry(w).or_insert(0u64) += 1;
        *servers.entry(c.servers).or_insert(0u64) += 1;
        let s = match c.steps {
            5..=30 => "5-30",
            31..=150 => "31-150",
            151..=300 => "151-300",
            _ => "301-500",
        };
        *steps.entry(s).or_insert(0u64) += 1;
        let k = if c.servers == 0 {
            "all-reduce".to_string()
        } else {
            format!("{:?}", c.consistency)
        };
        *consistency.entry(k).or_insert(0u64) += 1;
        long_ps_16 += u64::from(c.steps > 150 && c.workers > 12 && c.servers > 0);
        replicated += u64::from(c.replicas > 1);
    }
    writeln!(out, "cases by workers: {workers:?}")?;
    writeln!(out, "cases by shards (0: all-reduce): {servers:?}")?;
    writeln!(out, "cases by steps: {steps:?}")?;
    writeln!(out, "cases by consistency: {consistency:?}")?;
    writeln!(out, "parameter-server cases with replicated shards: {replicated}")?;
    writeln!(
        out,
        "cases with more than 150 steps, more than 12 workers and parameter servers: {long_ps_16}"
    )
}
