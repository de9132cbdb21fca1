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
                    eprintln!(
                        "{world} workers; partition skew (max/mean): rows {rows_max_over_mean:.3}, non-zeros {nnz_max_over_mean:.3}"
                    );
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
                bar.set_message(format!("loss {:.4}  {:.0} samples/s", s.loss, s.samples_per_s));
                let done = u64::from(s.epoch - 1) * s.steps_per_epoch + s.step_in_epoch;
                bar.set_position(done.min(bar.length().unwrap_or(done)));
            }
            Report::Epoch(e) => {
                let mut line = format!(
                    "epoch {}  train_loss {:.4}  {:.0} samples/s  {:.1} s",
                    e.epoch, e.train_loss, e.samples_per_s, e.wall_s
                );
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
