//! The typed `[optim]` section of a job config: which optimizer, its
//! hyper-parameters with PyTorch's defaults, and the learning-rate schedule.

use serde::{Deserialize, Serialize};

use crate::error::OptimError;
use crate::schedule::LrSchedule;

/// Which optimizer to run, tagged by `kind`:
///
/// ```toml
/// [optim]
/// kind = "sgd"
/// lr = 0.05
/// momentum = 0.9
/// schedule = { kind = "warmup_cosine", warmup_steps = 100, total_steps = 5000 }
/// ```
///
/// Keys left out take the defaults of the variant's struct.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum OptimConfig {
    Sgd(SgdConfig),
    /// Adam; `weight_decay` is added to the gradient (L2), as in PyTorch's `Adam`.
    Adam(AdamConfig),
    /// Adam with decoupled weight decay (Loshchilov & Hutter), as in PyTorch's `AdamW`.
    #[serde(rename = "adamw")]
    AdamW(AdamConfig),
    Adagrad(AdagradConfig),
    Ftrl(FtrlConfig),
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self::Sgd(SgdConfig::default())
    }
}

/// SGD with optional momentum, Nesterov momentum and L2 weight decay.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SgdConfig {
    pub lr: f32,
    /// 0 keeps no momentum buffer.
    pub momentum: f32,
    pub nesterov: bool,
    pub weight_decay: f32,
    pub schedule: LrSchedule,
}

impl Default for SgdConfig {
    fn default() -> Self {
        Self {
            lr: 0.01,
            momentum: 0.0,
            nesterov: false,
            weight_decay: 0.0,
            schedule: LrSchedule::Constant {},
        }
    }
}

/// Adam and AdamW.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdamConfig {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    pub schedule: LrSchedule,
}

impl Default for AdamConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            schedule: LrSchedule::Constant {},
        }
    }
}

/// Adagrad (Duchi et al. 2011).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdagradConfig {
    pub lr: f32,
    pub eps: f32,
    /// Starting value of every squared-gradient sum.
    pub initial_accumulator: f32,
    pub schedule: LrSchedule,
}

impl Default for AdagradConfig {
    fn default() -> Self {
        Self {
            lr: 0.01,
            eps: 1e-10,
            initial_accumulator: 0.0,
            schedule: LrSchedule::Constant {},
        }
    }
}

/// FTRL-Proximal (McMahan et al. 2013, "Ad Click Prediction", Algorithm 1).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FtrlConfig {
    pub alpha: f32,
    pub beta: f32,
    pub l1: f32,
    pub l2: f32,
    /// Scales `alpha`.
    pub schedule: LrSchedule,
}

impl Default for FtrlConfig {
    fn default() -> Self {
        Self {
            alpha: 0.1,
            beta: 1.0,
            l1: 0.0,
            l2: 0.0,
            schedule: LrSchedule::Constant {},
        }
    }
}

impl OptimConfig {
    /// The name used in state tensor names and messages (`sgd`, `adamw`, ...).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Sgd(_) => "sgd",
            Self::Adam(_) => "adam",
            Self::AdamW(_) => "adamw",
            Self::Adagrad(_) => "adagrad",
            Self::Ftrl(_) => "ftrl",
        }
    }

    /// The base learning rate (`alpha` for FTRL), before the schedule.
    pub fn lr(&self) -> f32 {
        match self {
            Self::Sgd(c) => c.lr,
            Self::Adam(c) | Self::AdamW(c) => c.lr,
            Self::Adagrad(c) => c.lr,
            Self::Ftrl(c) => c.alpha,
        }
    }

    pub fn schedule(&self) -> &LrSchedule {
        match self {
            Self::Sgd(c) => &c.schedule,
            Self::Adam(c) | Self::AdamW(c) => &c.schedule,
            Self::Adagrad(c) => &c.schedule,
            Self::Ftrl(c) => &c.schedule,
        }
    }

    /// Refuses values that would make the updates meaningless (NaN, negative
    /// rates, betas outside `[0, 1)`), naming the key.
    pub fn validate(&self) -> Result<(), OptimError> {
        let kind = self.kind();
        match self {
            Self::Sgd(c) => {
                check(kind, "lr", c.lr, c.lr >= 0.0, "must be finite and >= 0")?;
                check(
                    kind,
                    "momentum",
                    c.momentum,
                    (0.0..1.0).contains(&c.momentum),
                    "must be in [0, 1)",
                )?;
                check(
                    kind,
                    "weight_decay",
                    c.weight_decay,
                    c.weight_decay >= 0.0,
                    "must be finite and >= 0",
                )?;
                if c.nesterov && c.momentum == 0.0 {
                    return Err(OptimError::Config {
                        kind,
                        key: "nesterov",
                        value: "true".into(),
                        why: "Nesterov momentum needs momentum > 0",
                    });
                }
            }
            Self::Adam(c) | Self::AdamW(c) => {
                check(kind, "lr", c.lr, c.lr >= 0.0, "must be finite and >= 0")?;
                check(
                    kind,
                    "beta1",
                    c.beta1,
                    (0.0..1.0).contains(&c.beta1),
                    "must be in [0, 1)",
                )?;
                check(
                    kind,
                    "beta2",
                    c.beta2,
                    (0.0..1.0).contains(&c.beta2),
                    "must be in [0, 1)",
                )?;
                check(kind, "eps", c.eps, c.eps > 0.0, "must be finite and > 0")?;
                check(
                    kind,
                    "weight_decay",
                    c.weight_decay,
                    c.weight_decay >= 0.0,
                    "must be finite and >= 0",
                )?;
            }
            Self::Adagrad(c) => {
                check(kind, "lr", c.lr, c.lr >= 0.0, "must be finite and >= 0")?;
                check(kind, "eps", c.eps, c.eps > 0.0, "must be finite and > 0")?;
                check(
                    kind,
                    "initial_accumulator",
                    c.initial_accumulator,
                    c.initial_accumulator >= 0.0,
                    "must be finite and >= 0",
                )?;
            }
            Self::Ftrl(c) => {
                check(kind, "alpha", c.alpha, c.alpha > 0.0, "must be finite and > 0")?;
                check(kind, "beta", c.beta, c.beta >= 0.0, "must be finite and >= 0")?;
                check(kind, "l1", c.l1, c.l1 >= 0.0, "must be finite and >= 0")?;
                check(kind, "l2", c.l2, c.l2 >= 0.0, "must be finite and >= 0")?;
            }
        }
        self.schedule().validate(kind)
    }
}

fn check(kind: &'static str, key: &'static str, value: f32, ok: bool, why: &'static str) -> Result<(), OptimError> {
    if value.is_finite() && ok {
        Ok(())
    } else {
        Err(OptimError::Config {
            kind,
            key,
            value: value.to_string(),
            why,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<OptimConfig, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn kinds_parse_with_defaults_for_missing_keys() {
        let c = parse(r#"{"kind": "sgd", "lr": 0.1, "momentum": 0.9}"#).expect("valid");
        assert_eq!(
            c,
            OptimConfig::Sgd(SgdConfig {
                lr: 0.1,
                momentum: 0.9,
                ..SgdConfig::default()
            })
        );
        let c = parse(r#"{"kind": "adamw", "weight_decay": 0.01}"#).expect("valid");
        assert_eq!(
            c,
            OptimConfig::AdamW(AdamConfig {
                weight_decay: 0.01,
                ..AdamConfig::default()
            })
        );
        assert_eq!(
            parse(r#"{"kind": "adam"}"#).expect("valid"),
            OptimConfig::Adam(AdamConfig::default())
        );
        assert_eq!(
            parse(r#"{"kind": "adagrad"}"#).expect("valid"),
            OptimConfig::Adagrad(AdagradConfig::default())
        );
        let c = parse(r#"{"kind": "ftrl", "l1": 2.0}"#).expect("valid");
        assert_eq!(
            c,
            OptimConfig::Ftrl(FtrlConfig {
                l1: 2.0,
                ..FtrlConfig::default()
            })
        );
        let c =
            parse(r#"{"kind": "sgd", "schedule": {"kind": "step", "every_steps": 10, "gamma": 0.5}}"#).expect("valid");
        assert_eq!(
            c.schedule(),
            &LrSchedule::Step {
                every_steps: 10,
                gamma: 0.5
            }
        );
    }

    #[test]
    fn serialised_config_parses_back() {
        for c in [
            OptimConfig::default(),
            OptimConfig::AdamW(AdamConfig::default()),
            OptimConfig::Ftrl(FtrlConfig {
                schedule: LrSchedule::WarmupCosine {
                    warmup_steps: 3,
                    total_steps: 9,
                    min_factor: 0.1,
                },
                ..FtrlConfig::default()
            }),
        ] {
            let json = serde_json::to_string(&c).expect("serialises");
            assert_eq!(parse(&json).expect(&json), c);
        }
    }

    #[test]
    fn unknown_keys_and_kinds_are_refused() {
        let e = parse(r#"{"kind": "sgd", "learning_rate": 0.1}"#).expect_err("unknown key");
        assert!(e.to_string().contains("learning_rate"), "{e}");
        let e = parse(r#"{"kind": "rmsprop"}"#).expect_err("unknown kind");
        assert!(e.to_string().contains("rmsprop"), "{e}");
        for schedule in [
            r#"{"kind": "constant", "x": 1}"#,
            r#"{"kind": "step", "every_steps": 1, "gamma": 1, "x": 1}"#,
        ] {
            let e = parse(&format!(r#"{{"kind": "sgd", "schedule": {schedule}}}"#)).expect_err(schedule);
            assert!(e.to_string().contains("unknown field `x`"), "{e}");
        }
    }

    #[test]
    fn validate_names_the_bad_key() {
        let bad = [
            (
                OptimConfig::Sgd(SgdConfig {
                    lr: -1.0,
                    ..SgdConfig::default()
                }),
                "lr",
            ),
            (
                OptimConfig::Sgd(SgdConfig {
                    nesterov: true,
                    ..SgdConfig::default()
                }),
                "nesterov",
            ),
            (
                OptimConfig::Adam(AdamConfig {
                    beta2: 1.0,
                    ..AdamConfig::default()
                }),
                "beta2",
            ),
            (
                OptimConfig::AdamW(AdamConfig {
                    eps: f32::NAN,
                    ..AdamConfig::default()
                }),
                "eps",
            ),
            (
                OptimConfig::Ftrl(FtrlConfig {
                    alpha: 0.0,
                    ..FtrlConfig::default()
                }),
                "alpha",
            ),
            (
                OptimConfig::Sgd(SgdConfig {
                    schedule: LrSchedule::Step {
                        every_steps: 0,
                        gamma: 0.5,
                    },
                    ..SgdConfig::default()
                }),
                "every_steps",
            ),
        ];
        for (cfg, key) in bad {
            let e = cfg.validate().expect_err(key);
            assert!(e.to_string().contains(key), "{e}");
        }
        assert!(OptimConfig::default().validate().is_ok());
    }
}
