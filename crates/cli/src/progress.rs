//! Renders a job's reports: a progress bar on stderr (epoch, step, loss,
//! samples/s, ETA) and, with `--json`, one JSON object per line on stdout.

use std::io::Write;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use node::report::{Observer, Report};

pub struct Console {
    json: bool,
    bar: Option<ProgressBar>,
    quiet: bool,
}

impl Console {
    pub fn new(json: bool, quiet: bool) -> Self {
        Self { json, bar: None, quiet }
    }

    /// Prints one JSON line to stdout, flushed so a reader sees it at once.
    pub fn json_line(&self, value: &serde_json::Value) {
        if self.json {
            let mut out = std::io::stdout().lock();
            // A closed stdout (a reader that went away) must not stop training.
            let _ = writeln!(out, "{value}");
            let _ = out.flush();
        }
    }

    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }

    fn bar(&mut self, total: u64) -> &ProgressBar {
        let quiet = self.quiet;
        self.bar.get_or_insert_with(|| {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            if quiet {
                bar.set_draw_target(ProgressDrawTarget::hidden());
            }
            bar.set_style(
                ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} steps  {msg}  ETA {eta}")
                    .expect("static template")
                    .progress_chars("=> "),
            );
            bar
        })
    }
}

impl Observer for Console {
    fn report(&mut self, r: &Report) {
        match r {
            Report::Start {
                epochs,
                steps_per_epoch,
                start_epoch,
                world,
                rows_max_over_mean,
                nnz_max_over_mean,
                ..
            } => {
                if *world > 1 && !self.quiet {
                    let nnz = nnz_max_over_mean.map_or_else(String::new, |n| format!(", non-zeros {n:.3}"));
                    eprintln!("{world} workers; partition skew (max/mean): rows {rows_max_over_mean:.3}{nnz}");
                }
                let bar = self.bar(u64::from(*epochs) * steps_per_epoch);
                bar.set_position(u64::from(*start_epoch) * steps_per_epoch);
            }
            Report::Step(s) => {
                if s.rank != 0 {
                    return;
                }
                let bar = self.bar(s.steps_per_epoch);
                bar.set_prefix(format!("epoch {}", s.epoch));
                let mut msg = format!("loss {:.4}  {:.0} samples/s", s.loss, s.samples_per_s);
                if let Some(c) = &s.comm {
                    msg.push_str(&comm_summary(c));
                }
                bar.set_message(msg);
                let done = u64::from(s.epoch - 1) * s.steps_per_epoch + s.step_in_epoch;
                bar.set_position(done.min(bar.length().unwrap_or(done)));
            }
            Report::Regroup(g) => {
                if g.rank == 0 && !self.quiet {
                    let line = format!(
                        "generation {}: {} workers, continuing at step {} from rank {}'s state ({} rows of lost workers shared out, {} moved to joiners; {:.0} ms)",
                        g.generation, g.world, g.step, g.source, g.lost_rows, g.moved_rows, g.regroup_ms
                    );
                    match &self.bar {
                        Some(bar) if !bar.is_hidden() => bar.println(line),
                        _ => eprintln!("{line}"),
                    }
                }
            }
            Report::Shard {
                shard,
                failovers,
                backup_ready,
                ..
            } if *failovers > 0 && !self.quiet => {
                let line = format!(
                    "shard {shard}: its backup took over (failover {failovers}); {}",
                    if *backup_ready {
                        "a new backup is ready"
                    } else {
                        "building a new backup"
                    }
                );
                match &self.bar {
                    Some(bar) if !bar.is_hidden() => bar.println(line),
                    _ => eprintln!("{line}"),
                }
            }
            Report::Shard { .. } => {}
            Report::Data(d) => {
                if !self.quiet {
                    let what = match &d.whole_file {
                        None => format!(
                            "rows {}..{} of {} (its partition)",
                            d.first_row,
                            d.first_row + d.rows,
                            d.rows_total
                        ),
                        Some(why) => format!("all {} rows ({why})", d.rows_total),
                    };
                    let line = format!(
                        "rank {} read {what} in {:.2} s",
                        d.rank,
                        (d.survey_ms + d.read_ms) / 1e3
                    );
                    match &self.bar {
                        Some(bar) if !bar.is_hidden() => bar.println(line),
                        _ => eprintln!("{line}"),
                    }
                }
            }
            Report::Replaced { rank, step, .. } => {
                if !self.quiet {
                    let line = format!("a new worker took lost rank {rank}'s place, continuing at its step {step}");
                    match &self.bar {
                        Some(bar) if !bar.is_hidden() => bar.println(line),
                        _ => eprintln!("{line}"),
                    }
                }
            }
            Report::Epoch(e) | Report::Eval(e) => {
                let mut line = match r {
                    Report::Eval(_) => format!(
                        "epoch {} step {}  train_loss {:.4}  {:.1} s",
                        e.epoch, e.step, e.train_loss, e.wall_s
                    ),
                    _ => format!(
                        "epoch {}  train_loss {:.4}  {:.0} samples/s  {:.1} s",
                        e.epoch, e.train_loss, e.samples_per_s, e.wall_s
                    ),
                };
                for (k, v) in [
                    ("test_acc", e.test_acc),
                    ("test_auc", e.test_auc),
                    ("test_logloss", e.test_logloss),
                    ("bayes_auc", e.bayes_auc),
                ] {
                    if let Some(v) = v {
                        line.push_str(&format!("  {k} {v:.4}"));
                    }
                }
                if let Some(c) = &e.comm {
                    line.push_str(&comm_summary(c));
                }
                match &self.bar {
                    Some(bar) if !bar.is_hidden() => bar.println(line),
                    _ if !self.quiet => eprintln!("{line}"),
                    _ => {}
                }
            }
        }
        if self.json
            && !matches!(r, Report::Step(_))
            && let Ok(v) = serde_json::to_value(r)
        {
            self.json_line(&v);
        }
    }
}

/// Traffic per step as the bar and the epoch lines show it.
fn comm_summary(c: &node::report::CommReport) -> String {
    let mut s = format!(
        "  sent {}/step (recv {}/step)",
        bytes(c.sent_per_step),
        bytes(c.received_per_step)
    );
    if c.ratio != 1.0 || c.rel_error != 0.0 {
        s.push_str(&format!("  {:.1}× less than f32  rel_err {:.3}", c.ratio, c.rel_error));
    }
    s
}

fn bytes(b: f64) -> String {
    match b {
        b if b >= 1e9 => format!("{:.2} GB", b / 1e9),
        b if b >= 1e6 => format!("{:.2} MB", b / 1e6),
        b if b >= 1e3 => format!("{:.1} kB", b / 1e3),
        b => format!("{b:.0} B"),
    }
}
