//! Learning-rate schedules: a factor in `(0, 1]` that multiplies the base
//! learning rate, as a function of the number of steps already taken.

use serde::{Deserialize, Serialize};

use crate::error::OptimError;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum LrSchedule {
    /// Factor 1 throughout. (A struct variant so that unknown keys are refused.)
    Constant {},
    /// Factor `gamma^(floor(step / every_steps))`.
    Step { every_steps: u64, gamma: f32 },
    /// Linear warm-up from `1/warmup_steps` to 1 over `warmup_steps`, then a
    /// half cosine from 1 down to `min_factor` at `total_steps`, flat after.
    WarmupCosine {
        warmup_steps: u64,
        total_steps: u64,
        #[serde(default)]
        min_factor: f32,
    },
}

impl Default for LrSchedule {
    fn default() -> Self {
        Self::Constant {}
    }
}

impl LrSchedule {
    /// The factor for the update that follows `steps_done` earlier updates.
    /// Computed in f64 and rounded once, so it is the same on every machine.
    pub fn factor(&self, steps_done: u64) -> f32 {
        match *self {
            Self::Constant {} => 1.0,
            Self::Step { every_steps, gamma } => {
                let k = steps_done / every_steps.max(1);
                (gamma as f64).powf(k as f64) as f32
            }
            Self::WarmupCosine {
                warmup_steps,
                total_steps,
                min_factor,
            } => {
                if steps_done < warmup_steps {
                    return ((steps_done + 1) as f64 / warmup_steps as f64) as f32;
                }
                let span = total_steps.saturating_sub(warmup_steps).max(1);
                let progress = ((steps_done - warmup_steps) as f64 / span as f64).min(1.0);
                let min = min_factor as f64;
                (min + (1.0 - min) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())) as f32
            }
        }
    }

    pub(crate) fn validate(&self, kind: &'static str) -> Result<(), OptimError> {
        let bad = |key: &'static str, value: String, why: &'static str| OptimError::Config { kind, key, value, why };
        match *self {
            Self::Constant {} => Ok(()),
            Self::Step { every_steps, gamma } => {
                if every_steps == 0 {
                    return Err(bad("schedule.every_steps", "0".into(), "must be at least 1"));
                }
                if !(gamma > 0.0 && gamma <= 1.0) {
                    return Err(bad("schedule.gamma", gamma.to_string(), "must be in (0, 1]"));
                }
                Ok(())
            }
            Self::WarmupCosine {
                warmup_steps,
                total_steps,
                min_factor,
            } => {
                if total_steps <= warmup_steps {
                    return Err(bad(
                        "schedule.total_steps",
                        total_steps.to_string(),
                        "must be greater than schedule.warmup_steps",
                    ));
                }
                if !(0.0..=1.0).contains(&min_factor) {
                    return Err(bad("schedule.min_factor", min_factor.to_string(), "must be in [0, 1]"));
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_decay_halves_every_period() {
        let s = LrSchedule::Step {
            every_steps: 10,
            gamma: 0.5,
        };
        assert_eq!(
            [s.factor(0), s.factor(9), s.factor(10), s.factor(25)],
            [1.0, 1.0, 0.5, 0.25]
        );
    }

    #[test]
    fn warmup_cosine_rises_then_falls_to_the_floor() {
        let s = LrSchedule::WarmupCosine {
            warmup_steps: 4,
            total_steps: 14,
            min_factor: 0.1,
        };
        assert_eq!([s.factor(0), s.factor(1), s.factor(3)], [0.25, 0.5, 1.0]);
        assert_eq!(s.factor(4), 1.0);
        // Half-way through the cosine: 0.1 + 0.9 * 0.5.
        assert!((s.factor(9) - 0.55).abs() < 1e-6, "{}", s.factor(9));
        assert!((s.factor(14) - 0.1).abs() < 1e-7);
        assert!((s.factor(1000) - 0.1).abs() < 1e-7);
        let f: Vec<f32> = (4..15).map(|t| s.factor(t)).collect();
        assert!(f.windows(2).all(|w| w[1] <= w[0]), "{f:?}");
    }

    #[test]
    fn constant_is_one() {
        assert_eq!(LrSchedule::Constant {}.factor(123_456), 1.0);
    }
}
