//! The typed `[model]` section of a job config, its limits, and [`build`],
//! which checks it against the data set and constructs the model.

use serde::{Deserialize, Serialize};

use crate::Model;
use crate::dense::{Mlp, SoftmaxRegression};
use crate::sparse::{FactorizationMachine, SparseLogReg};

/// Largest hash space of the sparse models: 2^30 rows, 4 GiB of `w` alone.
pub const HASH_BITS_MAX: u32 = 30;
/// Largest number of FM factors per feature.
pub const FACTORS_MAX: usize = 256;
/// Widest hidden layer of an MLP.
pub const HIDDEN_WIDTH_MAX: usize = 1 << 16;
/// Most hidden layers of an MLP.
pub const HIDDEN_LAYERS_MAX: usize = 64;
/// Most parameters of any model: 2^32 f32 = 16 GiB, before gradients and optimizer state.
pub const PARAMS_MAX: u64 = 1 << 32;

/// Which model to train, tagged by `kind`:
///
/// ```toml
/// [model]
/// kind = "mlp"          # softmax | mlp | logreg | fm
/// hidden = [256, 256]   # mlp: hidden layer widths
/// # hash_bits = 20      # logreg, fm: the table has 2^hash_bits rows
/// # factors = 8         # fm: latent factors per feature
/// ```
///
/// Input and output sizes come from the data set; see [`build`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ModelConfig {
    /// Multinomial logistic regression on dense features. (A struct variant,
    /// not a unit one, so that serde refuses unknown keys for it too.)
    Softmax {},
    /// Fully connected layers with ReLU between them, on dense features.
    Mlp { hidden: Vec<usize> },
    /// Binary logistic regression on hashed sparse features.
    Logreg { hash_bits: u32 },
    /// Binary factorization machine on hashed sparse features.
    Fm { hash_bits: u32, factors: usize },
}

impl Default for ModelConfig {
    /// The default job's model: an MLP with two hidden layers of 256.
    fn default() -> Self {
        Self::Mlp { hidden: vec![256, 256] }
    }
}

impl ModelConfig {
    /// The `kind` as written in a config file.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Softmax {} => "softmax",
            Self::Mlp { .. } => "mlp",
            Self::Logreg { .. } => "logreg",
            Self::Fm { .. } => "fm",
        }
    }

    /// Whether the model reads sparse (hashed) features rather than dense ones;
    /// the caller checks this against the data set before training.
    pub fn sparse_input(&self) -> bool {
        matches!(self, Self::Logreg { .. } | Self::Fm { .. })
    }
}

/// A model config that cannot work with the data set or exceeds a limit.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model `{kind}` needs {needs} classes, but the data set has {num_classes}")]
    Classes {
        kind: &'static str,
        needs: &'static str,
        num_classes: usize,
    },
    #[error("model `{kind}`: {key} = {value} is out of range ({allowed})")]
    OutOfRange {
        kind: &'static str,
        key: &'static str,
        value: u64,
        allowed: String,
    },
    #[error("model `{kind}` would have {params} parameters, more than the limit of {max}")]
    TooLarge { kind: &'static str, params: u64, max: u64 },
}

/// Checks `cfg` against a data set with `input_dim` feature columns (the
/// hashed space for sparse data, which hashing folds into `2^hash_bits`) and
/// `num_classes` classes, and builds the model.
pub fn build(cfg: &ModelConfig, input_dim: usize, num_classes: usize) -> Result<Box<dyn Model>, ModelError> {
    let kind = cfg.kind();
    let out_of_range = |key, value: u64, allowed: String| ModelError::OutOfRange {
        kind,
        key,
        value,
        allowed,
    };
    match cfg {
        ModelConfig::Softmax {} | ModelConfig::Mlp { .. } => {
            if num_classes < 2 {
                return Err(ModelError::Classes {
                    kind,
                    needs: "at least 2",
                    num_classes,
                });
            }
            if input_dim == 0 {
                return Err(out_of_range("input_dim", 0, "at least 1".into()));
            }
            let hidden: &[usize] = match cfg {
                ModelConfig::Mlp { hidden } => hidden,
                _ => &[],
            };
            if hidden.len() > HIDDEN_LAYERS_MAX {
                return Err(out_of_range(
                    "hidden (layers)",
                    hidden.len() as u64,
                    format!("at most {HIDDEN_LAYERS_MAX}"),
                ));
            }
            if let Some(&w) = hidden.iter().find(|&&w| w == 0 || w > HIDDEN_WIDTH_MAX) {
                return Err(out_of_range(
                    "hidden (width)",
                    w as u64,
                    format!("1..={HIDDEN_WIDTH_MAX}"),
                ));
            }
            let sizes: Vec<usize> = std::iter::once(input_dim)
                .chain(hidden.iter().copied())
                .chain([num_classes])
                .collect();
            let params: u64 = sizes
                .windows(2)
                .map(|w| (w[0] as u64 + 1).saturating_mul(w[1] as u64))
                .sum();
            if params > PARAMS_MAX {
                return Err(ModelError::TooLarge {
                    kind,
                    params,
                    max: PARAMS_MAX,
                });
            }
            Ok(match cfg {
                ModelConfig::Softmax {} => Box::new(SoftmaxRegression::new(input_dim, num_classes)),
                _ => Box::new(Mlp::new(sizes)),
            })
        }
        &ModelConfig::Logreg { hash_bits } | &ModelConfig::Fm { hash_bits, .. } => {
            if num_classes != 2 {
                return Err(ModelError::Classes {
                    kind,
                    needs: "exactly 2",
                    num_classes,
                });
            }
            if !(1..=HASH_BITS_MAX).contains(&hash_bits) {
                return Err(out_of_range(
                    "hash_bits",
                    hash_bits.into(),
                    format!("1..={HASH_BITS_MAX}"),
                ));
            }
            match *cfg {
                ModelConfig::Fm { factors, .. } => {
                    if !(1..=FACTORS_MAX).contains(&factors) {
                        return Err(out_of_range("factors", factors as u64, format!("1..={FACTORS_MAX}")));
                    }
                    let params = (1u64 << hash_bits) * (1 + factors as u64) + 1;
                    if params > PARAMS_MAX {
                        return Err(ModelError::TooLarge {
                            kind,
                            params,
                            max: PARAMS_MAX,
                        });
                    }
                    Ok(Box::new(FactorizationMachine::new(hash_bits, factors)))
                }
                _ => Ok(Box::new(SparseLogReg::new(hash_bits))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<ModelConfig, toml::de::Error> {
        toml::from_str(s)
    }

    #[test]
    fn parses_every_kind() {
        assert_eq!(parse("kind = \"softmax\"").unwrap(), ModelConfig::Softmax {});
        assert_eq!(
            parse("kind = \"mlp\"\nhidden = [256, 256]").unwrap(),
            ModelConfig::default()
        );
        assert_eq!(
            parse("kind = \"logreg\"\nhash_bits = 20").unwrap(),
            ModelConfig::Logreg { hash_bits: 20 }
        );
        assert_eq!(
            parse("kind = \"fm\"\nhash_bits = 18\nfactors = 8").unwrap(),
            ModelConfig::Fm {
                hash_bits: 18,
                factors: 8
            }
        );
        for cfg in [
            ModelConfig::Softmax {},
            ModelConfig::default(),
            ModelConfig::Fm {
                hash_bits: 3,
                factors: 2,
            },
        ] {
            assert_eq!(parse(&toml::to_string(&cfg).unwrap()).unwrap(), cfg);
        }
    }

    #[test]
    fn refuses_unknown_keys_and_kinds() {
        for bad in [
            "kind = \"mlp\"\nhidden = [4]\nhiden = [3]",
            "kind = \"softmax\"\nhidden = [4]",
            "kind = \"logreg\"\nhash_bits = 4\nfactors = 2",
            "kind = \"cnn\"",
            "kind = \"fm\"\nhash_bits = 4",
        ] {
            assert!(parse(bad).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn build_checks_the_combination() {
        let shape =
            |cfg: &ModelConfig, dim, classes| build(cfg, dim, classes).map(|m| (m.layout().len(), m.num_classes()));
        assert_eq!(shape(&ModelConfig::Softmax {}, 784, 10).unwrap(), (7850, 10));
        assert_eq!(shape(&ModelConfig::default(), 784, 10).unwrap(), (269_322, 10));
        assert_eq!(
            shape(&ModelConfig::Logreg { hash_bits: 4 }, 1 << 30, 2).unwrap(),
            (17, 2)
        );
        assert_eq!(
            shape(
                &ModelConfig::Fm {
                    hash_bits: 4,
                    factors: 3
                },
                100,
                2
            )
            .unwrap(),
            (65, 2)
        );

        let err = |cfg: &ModelConfig, dim, classes| build(cfg, dim, classes).err().expect("must fail").to_string();
        assert!(err(&ModelConfig::Logreg { hash_bits: 20 }, 100, 10).contains("exactly 2"));
        assert!(
            err(
                &ModelConfig::Fm {
                    hash_bits: 4,
                    factors: 2
                },
                100,
                3
            )
            .contains("exactly 2")
        );
        assert!(err(&ModelConfig::Softmax {}, 10, 1).contains("at least 2"));
        assert!(err(&ModelConfig::Logreg { hash_bits: 0 }, 10, 2).contains("hash_bits"));
        assert!(err(&ModelConfig::Logreg { hash_bits: 31 }, 10, 2).contains("hash_bits"));
        assert!(
            err(
                &ModelConfig::Fm {
                    hash_bits: 4,
                    factors: 0
                },
                10,
                2
            )
            .contains("factors")
        );
        assert!(
            err(
                &ModelConfig::Fm {
                    hash_bits: 30,
                    factors: 8
                },
                10,
                2
            )
            .contains("limit")
        );
        assert!(err(&ModelConfig::Mlp { hidden: vec![8, 0] }, 10, 2).contains("hidden"));
        assert!(
            err(
                &ModelConfig::Mlp {
                    hidden: vec![1 << 16, 1 << 16, 1 << 16]
                },
                10,
                2
            )
            .contains("limit")
        );
        assert!(err(&ModelConfig::Softmax {}, 0, 2).contains("input_dim"));
    }
}
