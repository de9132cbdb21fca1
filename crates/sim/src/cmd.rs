//! What `sinter sim` does, as functions over typed options that write their
//! report to a `Write`: the binary only parses flags and calls these.

use std::io::Write;

use crate::cluster::{Bug, RunReport, SimConfig, run};
use crate::faults::FaultMix;
use crate::fuzz;
use crate::plot::{Series, svg};
use crate::predict::{CpuModel, PredictConfig, Prediction, Strategy, predict, table_header, table_row};

/// `sinter sim` without `--predict` or `--fuzz`: one job.
#[derive(Clone, Debug)]
pub struct OneRun {
    pub seed: u64,
    pub workers: u32,
    pub servers: u32,
    pub faults: FaultMix,
    pub steps: u64,
    pub consistency: ps::Consistency,
    pub bug: Option<Bug>,
}

impl OneRun {
    pub fn config(&self) -> SimConfig {
        let mut cfg = SimConfig::new(self.seed, self.workers, self.servers, self.steps, self.faults);
        cfg.consistency = self.consistency;
        cfg.bug = self.bug;
        cfg
    }

    fn replay(&self) -> String {
        let consistency = match self.consistency {
            ps::Consistency::Bsp => "--consistency bsp".to_string(),
            ps::Consistency::Async => "--consistency async".to_string(),
            ps::Consistency::Ssp { staleness } => format!("--consistency ssp --staleness {staleness}"),
        };
        let bug = self.bug.map(|b| format!(" --bug {}", b.name())).unwrap_or_default();
        format!(
            "sinter sim --seed {} --workers {} --servers {} --faults {} --steps {} {consistency}{bug}",
            self.seed, self.workers, self.servers, self.faults, self.steps
        )
    }
}

fn describe(out: &mut dyn Write, cfg: &SimConfig, r: &RunReport) -> std::io::Result<()> {
    let job = if cfg.servers == 0 {
        format!("all-reduce, {} workers", cfg.workers)
    } else {
        format!(
            "{} workers, {} shards of {} replica(s), {:?}",
            cfg.workers, cfg.servers, cfg.replicas, cfg.consistency
        )
    };
    writeln!(
        out,
        "seed {}: {job}, {} steps, faults {} (safety phase {:.3} s, {} scheduled faults); {} events, {:.3} s simulated, {} attempt(s), {} messages, trace {:016x}",
        cfg.seed,
        cfg.steps,
        cfg.faults,
        r.plan.safety_end as f64 / 1e9,
        r.plan.faults.len(),
        r.events,
        r.virtual_ns as f64 / 1e9,
        r.attempts,
        r.messages,
        r.trace.hash()
    )
}

/// Runs one job; `trace`: write the whole trace there. Returns whether every invariant held.
pub fn one(opts: &OneRun, trace: Option<&mut dyn Write>, out: &mut dyn Write) -> Result<bool, String> {
    let mut cfg = opts.config();
    cfg.keep_trace = trace.is_some();
    cfg.validate()?;
    let r = run(&cfg);
    let io = |e: std::io::Error| e.to_string();
    if let Some(t) = trace {
        t.write_all(r.trace.text().as_bytes()).map_err(io)?;
    }
    describe(out, &cfg, &r).map_err(io)?;
    match &r.violation {
        None => {
            writeln!(out, "every invariant held; the job finished").map_err(io)?;
            Ok(true)
        }
        Some(v) => {
            writeln!(out, "{v}\nreplay: {}", opts.replay()).map_err(io)?;
            Ok(false)
        }
    }
}

/// `--reproduce SEED`: the fuzz case of that seed, with the end of its trace.
pub fn reproduce(
    seed: u64,
    bug: Option<Bug>,
    trace: Option<&mut dyn Write>,
    out: &mut dyn Write,
) -> Result<bool, String> {
    let mut cfg = fuzz::case(seed, bug);
    cfg.keep_trace = true;
    let r = run(&cfg);
    let io = |e: std::io::Error| e.to_string();
    if let Some(t) = trace {
        t.write_all(r.trace.text().as_bytes()).map_err(io)?;
    }
    describe(out, &cfg, &r).map_err(io)?;
    match &r.violation {
        None => {
            writeln!(out, "every invariant held; the job finished").map_err(io)?;
            Ok(true)
        }
        Some(v) => {
            writeln!(out, "last events:\n{}\n{v}", r.trace.tail(25)).map_err(io)?;
            Ok(false)
        }
    }
}

/// `--fuzz`: seeds `from..to`; prints a progress line every `every` runs.
pub fn fuzz_seeds(
    from: u64,
    to: u64,
    bug: Option<Bug>,
    stop_at_first: bool,
    out: &mut dyn Write,
) -> Result<bool, String> {
    let io = |e: std::io::Error| e.to_string();
    let total = to.saturating_sub(from);
    let every = (total / 10).max(1);
    let mut n = 0u64;
    let mut found = 0u64;
    let s = fuzz::fuzz(from..to, bug, stop_at_first, |cfg, r| {
        n += 1;
        if let Some(v) = &r.violation {
            found += 1;
            let _ = writeln!(
                out,
                "{v}\nreplay: sinter sim --reproduce {}{}",
                cfg.seed,
                bug.map(|b| format!(" --bug {}", b.name())).unwrap_or_default()
            );
        } else if n.is_multiple_of(every) {
            let _ = writeln!(out, "{n}/{total} seeds, {found} violation(s) so far");
        }
    });
    let f = s.with_fault;
    writeln!(
        out,
        "{} seeds ({}..{}): {} violation(s); {} finished; {} events; {} job attempts; runs with delay {} loss {} partition {} crash {} slow {}; with parameter servers {}, of which replicated {} ({} primaries and {} backups killed, {} backups promoted)",
        s.runs,
        from,
        from + s.runs,
        s.violations.len(),
        s.finished,
        s.events,
        s.attempts,
        f[0],
        f[1],
        f[2],
        f[3],
        f[4],
        s.with_servers,
        s.with_replicas,
        s.primary_kills,
        s.backup_kills,
        s.failovers
    )
    .map_err(io)?;
    if let Some(v) = s.violations.first() {
        writeln!(
            out,
            "first violation at seed {} (run {} of this sweep)",
            v.seed,
            v.seed - from + 1
        )
        .map_err(io)?;
    }
    Ok(s.violations.is_empty())
}

/// `--predict`: one prediction per (strategy, codec, workers).
#[derive(Clone, Debug)]
pub struct PredictRun {
    pub base: PredictConfig,
    pub workers: Vec<u32>,
    pub strategies: Vec<Strategy>,
    pub codecs: Vec<codec::CodecSpec>,
    /// Encode and decode GB/s for every codec; default [`cpu_for`] each.
    pub codec_gbps: Option<(f64, f64)>,
    /// How many times slower the cores are than the defaults' (see [`CpuModel::slower`]); 1: as measured.
    pub cpu_scale: f64,
    pub json: bool,
}

/// Prints a table (or JSON lines) and returns the SVG of the efficiencies.
pub fn predict_table(p: &PredictRun, out: &mut dyn Write) -> Result<String, String> {
    let io = |e: std::io::Error| e.to_string();
    let b = &p.base;
    if !p.json {
        writeln!(
            out,
            "Predicted from the real engines: {} parameters, {:.3} ms compute per step, batch {} per worker, links {} Gbit/s, {} µs latency and a {} B token bucket; no overlap of compute and communication; engines on scaled-down buffers with each message's bytes scaled back (see `sim::predict`).",
            b.params,
            b.compute_ns as f64 / 1e6,
            b.batch,
            b.link.bandwidth_bits_per_s / 1e9,
            b.link.latency_ns as f64 / 1e3,
            b.link.burst_bytes,
        )
        .map_err(io)?;
        writeln!(out, "{}", table_header()).map_err(io)?;
    }
    let mut series: Vec<Series> = Vec::new();
    for &strategy in &p.strategies {
        for codec in &p.codecs {
            let mut points = Vec::new();
            for &workers in &p.workers {
                let measured = cpu_for(codec);
                let (encode_gbps, decode_gbps) = p.codec_gbps.unwrap_or((measured.encode_gbps, measured.decode_gbps));
                let cfg = PredictConfig {
                    workers,
                    strategy,
                    codec: codec.clone(),
                    cpu: CpuModel {
                        encode_gbps,
                        decode_gbps,
                        feedback_gbps: measured.feedback_gbps,
                        ..b.cpu.clone()
                    }
                    .slower(p.cpu_scale),
                    ..b.clone()
                };
                let r: Prediction = predict(&cfg)?;
                if p.json {
                    writeln!(
                        out,
                        "{{\"strategy\":\"{strategy}\",\"codec\":\"{codec}\",\"workers\":{workers},\"servers\":{},\"params\":{},\"step_ms\":{:.6},\"compute_ms\":{:.6},\"samples_per_s\":{:.3},\"efficiency\":{:.6},\"sent_bytes\":{},\"coarsening\":{},\"events\":{}}}",
                        cfg.servers,
                        cfg.params,
                        r.step_ns as f64 / 1e6,
                        r.compute_ns as f64 / 1e6,
                        r.samples_per_s,
                        r.efficiency,
                        r.sent_bytes,
                        r.coarsening,
                        r.events
                    )
                    .map_err(io)?;
                } else {
                    writeln!(out, "{}", table_row(&cfg, &r)).map_err(io)?;
                }
                out.flush().map_err(io)?;
                points.push((f64::from(workers), r.efficiency));
            }
            let label = match strategy {
                Strategy::Ps => format!("ps ({} shards), {codec}", b.servers),
                Strategy::AllReduce => format!("all-reduce, {codec}"),
            };
            series.push(Series { label, points });
        }
    }
    Ok(svg(
        &format!(
            "Predicted scaling efficiency, {} params, {} Gbit/s",
            b.params,
            b.link.bandwidth_bits_per_s / 1e9
        ),
        "compute time / step time",
        1.0,
        &series,
    ))
}

/// `bsp`, `ssp` (with `staleness`) or `async`.
pub fn parse_consistency(name: &str, staleness: u32) -> Result<ps::Consistency, String> {
    match name {
        "bsp" => Ok(ps::Consistency::Bsp),
        "ssp" => Ok(ps::Consistency::Ssp { staleness }),
        "async" => Ok(ps::Consistency::Async),
        _ => Err(format!("unknown consistency `{name}` (bsp, ssp or async)")),
    }
}

/// A comma-separated list of codecs (`none,topk:0.01:f16`).
pub fn parse_codecs(s: &str) -> Result<Vec<codec::CodecSpec>, String> {
    s.split(',')
        .map(|c| {
            c.trim()
                .parse::<codec::CodecSpec>()
                .map_err(|e| format!("codec `{c}`: {e}"))
        })
        .collect()
}

/// The default CPU model with the speeds of `codec` and of the runtime's
/// exchange around it: this machine's `sinter bench codec` (encode, decode,
/// exchange GB/s, the exchange's median step), 2026-12-06,
/// `bench/results/2026-12-06-codec.jsonl`.
pub fn cpu_for(codec: &codec::CodecSpec) -> CpuModel {
    use codec::CodecSpec as C;
    let (encode_gbps, decode_gbps, exchange_gbps) = match codec {
        C::None => (16.2, 15.7, f64::INFINITY),
        C::Fp16 => (17.8, 18.1, 1.23),
        C::Bf16 => (22.2, 28.1, 1.46),
        C::Int8 { .. } => (6.4, 34.9, 1.72),
        C::Qsgd { .. } => (5.1, 33.2, 1.56),
        C::Sign { .. } => (18.0, 25.7, 2.90),
        C::TopK { .. } => (4.9, 41.1, 2.14),
        C::Threshold { .. } => (7.1, 35.3, 1.66),
        C::RandK { .. } => (23.7, 31.8, 4.99),
        C::PowerSgd { .. } => (3.3, 7.3, 1.65),
    };
    CpuModel::default().with_exchange(encode_gbps, decode_gbps, exchange_gbps)
}
