//! `CodecSpec`, the codec and its parameters as a config string
//! (`"topk:0.01"`, `"int8"`, `"powersgd:4"`), and `CompressConfig`, the
//! compression settings of one parameter group.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::CodecError;
use crate::header::CodecId;

/// Bucket of `int8`, `qsgd` and `sign` when the spec names none.
pub const DEFAULT_BUCKET: u32 = 512;
/// Largest bucket a spec or a message may name.
pub const BUCKET_MAX: usize = 1 << 20;
/// Most levels `qsgd` may use (levels are sent as i16 at most).
pub const LEVELS_MAX: u32 = 32767;
/// Largest PowerSGD rank a spec or a message may name.
pub const RANK_MAX: usize = 256;

const EXPECTED: &str = "expected one of none, fp16, bf16, int8[:BUCKET], qsgd:LEVELS[:BUCKET], sign[:BUCKET], \
                        topk:FRACTION[:f16], randk:FRACTION[:f16], threshold:T[:f16], powersgd:RANK";

/// A codec and its parameters. Parsed from and printed as the strings in
/// the table; `parse(display(s)) == s`. Serde reads and writes the string.
///
/// | string | what | bound | unbiased |
/// |---|---|---|---|
/// | `none` | f32 as is | exact | yes |
/// | `fp16` | IEEE half, round to nearest even | relative 2^-11 for 2^-14 ≤ \|x\| ≤ 65504; absolute 2^-25 below; ±inf from 65520 | no (but tiny) |
/// | `bf16` | bfloat16, round to nearest even | relative 2^-8 | no (but tiny) |
/// | `int8[:B]` | per bucket of B (512) `scale = max\|x\|/127` and i8 levels, stochastic rounding | `\|err\| ≤ scale` per element | yes |
/// | `qsgd:S[:B]` | per bucket of B (512) the L2 norm, sign and level in 0..=S, stochastic | `\|err\| ≤ norm/S` per element; `E‖err‖² ≤ min(B/S², √B/S)‖x‖²` | yes |
/// | `sign[:B]` | 1 bit per element and per bucket of B (512, a multiple of 8) the mean `\|x\|` | `‖err‖² = ‖x‖² − ‖x‖₁²/B` per bucket | no |
/// | `topk:F[:f16]` | the `round(F·n)` (≥ 1) largest `\|x\|` | `‖err‖² ≤ (1 − k/n)‖x‖²` | no |
/// | `randk:F[:f16]` | `round(F·n)` (≥ 1) elements at random, not rescaled | `E‖err‖² = (1 − k/n)‖x‖²` | no |
/// | `threshold:T[:f16]` | every `\|x\| > T` | `\|err\| ≤ T` per element | no |
/// | `powersgd:R` | rank-R factors of the matrix | `‖err‖_F ≤ ‖x‖_F` | no |
///
/// Bounds hold up to f32 rounding: the quantised codecs compute `x / step`
/// in f32, which may move a bound by `levels · 2^-24` of a step; "unbiased"
/// means to within 2^-16 of a step. Sparse codecs keeping more than half of
/// the elements make messages larger than the f32 they carry.
///
/// The sparse codecs send kept values as f32 (exact, the bounds above), or
/// with `:f16` ([`SparseValues::F16`]) as IEEE half of `x / s`, `s` the
/// largest finite kept `|x|`, which adds `|err| ≤ 2^-10·|x| + 2^-24·s` per
/// kept element (error feedback carries it to the next step like the rest).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum CodecSpec {
    #[default]
    None,
    Fp16,
    Bf16,
    Int8 {
        bucket: u32,
    },
    Qsgd {
        levels: u32,
        bucket: u32,
    },
    Sign {
        bucket: u32,
    },
    TopK {
        fraction: f64,
        values: SparseValues,
    },
    RandK {
        fraction: f64,
        values: SparseValues,
    },
    Threshold {
        threshold: f32,
        values: SparseValues,
    },
    PowerSgd {
        rank: u32,
    },
}

impl CodecSpec {
    /// The id its messages carry (PowerSGD's fallback messages carry `none`).
    pub fn id(&self) -> CodecId {
        match self {
            Self::None => CodecId::None,
            Self::Fp16 => CodecId::Fp16,
            Self::Bf16 => CodecId::Bf16,
            Self::Int8 { .. } => CodecId::Int8,
            Self::Qsgd { .. } => CodecId::Qsgd,
            Self::Sign { .. } => CodecId::Sign,
            Self::TopK { .. } => CodecId::TopK,
            Self::RandK { .. } => CodecId::RandK,
            Self::Threshold { .. } => CodecId::Threshold,
            Self::PowerSgd { .. } => CodecId::PowerSgd,
        }
    }

    /// Whether `E[decode(encode(x))] = x` over the seed (exact codecs count).
    pub fn is_unbiased(&self) -> bool {
        matches!(self, Self::None | Self::Int8 { .. } | Self::Qsgd { .. })
    }

    /// Whether training should keep an error-feedback residual for this codec
    /// by default: for the codecs that drop information systematically.
    /// (fp16 and bf16 are biased too, but by far less than the residual's own rounding.)
    pub fn wants_error_feedback(&self) -> bool {
        matches!(
            self,
            Self::Sign { .. } | Self::TopK { .. } | Self::RandK { .. } | Self::Threshold { .. } | Self::PowerSgd { .. }
        )
    }

    /// Checks the parameters against the limits; `FromStr` calls it, and so
    /// does [`crate::encode`] for specs built in code.
    pub fn validate(&self) -> Result<(), CodecError> {
        let why = match *self {
            Self::Int8 { bucket } if !(1..=BUCKET_MAX).contains(&(bucket as usize)) => {
                format!("bucket must be in 1..={BUCKET_MAX}, got {bucket}")
            }
            Self::Qsgd { levels, .. } if !(1..=LEVELS_MAX).contains(&levels) => {
                format!("levels must be in 1..={LEVELS_MAX}, got {levels}")
            }
            Self::Qsgd { bucket, .. } if !(1..=BUCKET_MAX).contains(&(bucket as usize)) => {
                format!("bucket must be in 1..={BUCKET_MAX}, got {bucket}")
            }
            Self::Sign { bucket } if !(8..=BUCKET_MAX).contains(&(bucket as usize)) || !bucket.is_multiple_of(8) => {
                format!("bucket must be a multiple of 8 in 8..={BUCKET_MAX}, got {bucket}")
            }
            Self::TopK { fraction, .. } | Self::RandK { fraction, .. } if !(fraction > 0.0 && fraction <= 1.0) => {
                format!("fraction must be in (0, 1], got {fraction}")
            }
            Self::Threshold { threshold, .. } if !(threshold >= 0.0 && threshold.is_finite()) => {
                format!("threshold must be finite and ≥ 0, got {threshold}")
            }
            Self::PowerSgd { rank } if !(1..=RANK_MAX).contains(&(rank as usize)) => {
                format!("rank must be in 1..={RANK_MAX}, got {rank}")
            }
            _ => return Ok(()),
        };
        Err(CodecError::Spec {
            spec: self.to_string(),
            why,
        })
    }
}

impl fmt::Display for CodecSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = self.id().name();
        match *self {
            Self::None | Self::Fp16 | Self::Bf16 => f.write_str(name),
            Self::Int8 { bucket } | Self::Sign { bucket } if bucket == DEFAULT_BUCKET => f.write_str(name),
            Self::Int8 { bucket } | Self::Sign { bucket } => write!(f, "{name}:{bucket}"),
            Self::Qsgd { levels, bucket } if bucket == DEFAULT_BUCKET => write!(f, "{name}:{levels}"),
            Self::Qsgd { levels, bucket } => write!(f, "{name}:{levels}:{bucket}"),
            Self::TopK { fraction, values } | Self::RandK { fraction, values } => {
                write!(f, "{name}:{fraction}{}", values.suffix())
            }
            Self::Threshold { threshold, values } => write!(f, "{name}:{threshold}{}", values.suffix()),
            Self::PowerSgd { rank } => write!(f, "{name}:{rank}"),
        }
    }
}

impl FromStr for CodecSpec {
    type Err = CodecError;

    fn from_str(s: &str) -> Result<Self, CodecError> {
        let fail = |why: String| CodecError::Spec {
            spec: s.to_string(),
            why,
        };
        let mut parts = s.trim().split(':');
        let name = parts.next().unwrap_or_default();
        let args: Vec<&str> = parts.collect();
        let arity = |min: usize, max: usize, form: &str| {
            if args.len() < min || args.len() > max {
                Err(fail(format!("expected {form}")))
            } else {
                Ok(())
            }
        };
        let number = |i: usize, what: &str| -> Result<u32, CodecError> {
            args[i]
                .parse::<u32>()
                .map_err(|_| fail(format!("{what} must be a whole number, got {:?}", args[i])))
        };
        let real = |i: usize, what: &str| -> Result<f64, CodecError> {
            args[i]
                .parse::<f64>()
                .map_err(|_| fail(format!("{what} must be a number, got {:?}", args[i])))
        };
        let sparse_values = |i: usize| -> Result<SparseValues, CodecError> {
            match args.get(i).copied() {
                None | Some("f32") => Ok(SparseValues::F32),
                Some("f16") => Ok(SparseValues::F16),
                Some(other) => Err(fail(format!("values must be f32 or f16, got {other:?}"))),
            }
        };
        let spec = match name {
            "none" | "fp16" | "bf16" => {
                arity(0, 0, &format!("{name} without parameters"))?;
                match name {
                    "none" => Self::None,
                    "fp16" => Self::Fp16,
                    _ => Self::Bf16,
                }
            }
            "int8" => {
                arity(0, 1, "int8 or int8:BUCKET")?;
                let bucket = if args.is_empty() {
                    DEFAULT_BUCKET
                } else {
                    number(0, "bucket")?
                };
                Self::Int8 { bucket }
            }
            "sign" => {
                arity(0, 1, "sign or sign:BUCKET")?;
                let bucket = if args.is_empty() {
                    DEFAULT_BUCKET
                } else {
                    number(0, "bucket")?
                };
                Self::Sign { bucket }
            }
            "qsgd" => {
                arity(1, 2, "qsgd:LEVELS or qsgd:LEVELS:BUCKET, e.g. qsgd:15")?;
                let levels = number(0, "levels")?;
                let bucket = if args.len() == 2 {
                    number(1, "bucket")?
                } else {
                    DEFAULT_BUCKET
                };
                Self::Qsgd { levels, bucket }
            }
            "topk" => {
                arity(1, 2, "topk:FRACTION or topk:FRACTION:f16, e.g. topk:0.01")?;
                Self::TopK {
                    fraction: real(0, "fraction")?,
                    values: sparse_values(1)?,
                }
            }
            "randk" => {
                arity(1, 2, "randk:FRACTION or randk:FRACTION:f16, e.g. randk:0.01")?;
                Self::RandK {
                    fraction: real(0, "fraction")?,
                    values: sparse_values(1)?,
                }
            }
            "threshold" => {
                arity(1, 2, "threshold:T or threshold:T:f16, e.g. threshold:0.001")?;
                let t = args[0]
                    .parse::<f32>()
                    .map_err(|_| fail(format!("threshold must be a number, got {:?}", args[0])))?;
                Self::Threshold {
                    threshold: t,
                    values: sparse_values(1)?,
                }
            }
            "powersgd" => {
                arity(1, 1, "powersgd:RANK, e.g. powersgd:4")?;
                Self::PowerSgd {
                    rank: number(0, "rank")?,
                }
            }
            _ => return Err(fail(format!("unknown codec {name:?}; {EXPECTED}"))),
        };
        spec.validate().map_err(|e| match e {
            CodecError::Spec { why, .. } => fail(why),
            other => other,
        })?;
        Ok(spec)
    }
}

/// How the sparse codecs (`topk`, `randk`, `threshold`) send the values they
/// keep; the indices are always delta varints (see the `sparse` module).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum SparseValues {
    /// As given: 4 bytes each, exact.
    #[default]
    F32,
    /// `x / s` as IEEE half, `s` the largest finite kept `|x|` (sent once):
    /// 2 bytes each, `|err| ≤ 2^-10·|x| + 2^-24·s`.
    F16,
}

impl SparseValues {
    /// What a spec string appends: nothing for the default.
    fn suffix(self) -> &'static str {
        match self {
            Self::F32 => "",
            Self::F16 => ":f16",
        }
    }

    /// Bytes per kept value.
    pub fn bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 => 2,
        }
    }
}

impl TryFrom<String> for CodecSpec {
    type Error = CodecError;

    fn try_from(s: String) -> Result<Self, CodecError> {
        s.parse()
    }
}

impl From<CodecSpec> for String {
    fn from(spec: CodecSpec) -> Self {
        spec.to_string()
    }
}

/// The compression settings of one parameter group:
///
/// ```toml
/// compress = "topk:0.01"
/// error_feedback = true
/// ```
///
/// `error_feedback` left out means [`CodecSpec::wants_error_feedback`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CompressConfig {
    pub compress: CodecSpec,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_feedback: Option<bool>,
}

impl CompressConfig {
    /// Whether to keep an error-feedback residual, after defaults.
    pub fn error_feedback(&self) -> bool {
        self.error_feedback
            .unwrap_or_else(|| self.compress.wants_error_feedback())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form_and_prints_it_back() {
        let cases = [
            ("none", CodecSpec::None),
            ("fp16", CodecSpec::Fp16),
            ("bf16", CodecSpec::Bf16),
            ("int8", CodecSpec::Int8 { bucket: 512 }),
            ("int8:128", CodecSpec::Int8 { bucket: 128 }),
            (
                "qsgd:15",
                CodecSpec::Qsgd {
                    levels: 15,
                    bucket: 512,
                },
            ),
            ("qsgd:4:64", CodecSpec::Qsgd { levels: 4, bucket: 64 }),
            ("sign", CodecSpec::Sign { bucket: 512 }),
            ("sign:1024", CodecSpec::Sign { bucket: 1024 }),
            (
                "topk:0.01",
                CodecSpec::TopK {
                    fraction: 0.01,
                    values: SparseValues::F32,
                },
            ),
            (
                "topk:0.01:f16",
                CodecSpec::TopK {
                    fraction: 0.01,
                    values: SparseValues::F16,
                },
            ),
            (
                "randk:0.5",
                CodecSpec::RandK {
                    fraction: 0.5,
                    values: SparseValues::F32,
                },
            ),
            (
                "threshold:0.001:f16",
                CodecSpec::Threshold {
                    threshold: 0.001,
                    values: SparseValues::F16,
                },
            ),
            ("powersgd:4", CodecSpec::PowerSgd { rank: 4 }),
        ];
        for (s, spec) in cases {
            assert_eq!(s.parse::<CodecSpec>().expect(s), spec);
            assert_eq!(spec.to_string(), s);
        }
        assert_eq!(
            " int8:512 ".parse::<CodecSpec>().expect("trims"),
            CodecSpec::Int8 { bucket: 512 }
        );
        assert_eq!(
            "threshold:1e-3".parse::<CodecSpec>().expect("exponent").to_string(),
            "threshold:0.001"
        );
    }

    #[test]
    fn errors_name_the_string_and_what_is_expected() {
        let cases = [
            ("zip", "unknown codec \"zip\"; expected one of none, fp16"),
            ("", "unknown codec \"\""),
            ("topk", "expected topk:FRACTION"),
            ("topk:2", "fraction must be in (0, 1], got 2"),
            ("topk:0", "fraction must be in (0, 1]"),
            ("topk:NaN", "fraction must be in (0, 1]"),
            ("randk:x", "fraction must be a number, got \"x\""),
            ("int8:0", "bucket must be in 1..=1048576, got 0"),
            ("int8:1:2", "expected int8 or int8:BUCKET"),
            ("sign:12", "bucket must be a multiple of 8"),
            ("qsgd:0", "levels must be in 1..=32767"),
            ("qsgd:-3", "levels must be a whole number, got \"-3\""),
            ("threshold:-1", "threshold must be finite and ≥ 0"),
            ("threshold:inf", "threshold must be finite"),
            ("powersgd:0", "rank must be in 1..=256"),
            ("fp16:3", "expected fp16 without parameters"),
            ("topk:0.1:f8", "values must be f32 or f16, got \"f8\""),
            ("topk:0.1:f16:x", "expected topk:FRACTION or topk:FRACTION:f16"),
        ];
        for (s, want) in cases {
            let err = s.parse::<CodecSpec>().expect_err(s).to_string();
            assert!(err.starts_with(&format!("compression spec {s:?}: ")), "{err}");
            assert!(err.contains(want), "{s}: {err}");
        }
    }

    #[test]
    fn sits_in_toml_as_a_string() {
        let cfg: CompressConfig = toml::from_str("compress = \"topk:0.01\"\nerror_feedback = true\n").expect("toml");
        assert_eq!(
            cfg.compress,
            CodecSpec::TopK {
                fraction: 0.01,
                values: SparseValues::F32
            }
        );
        assert!(cfg.error_feedback());
        let cfg: CompressConfig = toml::from_str("compress = \"int8\"").expect("toml");
        assert!(!cfg.error_feedback());
        assert!(CompressConfig::default() == toml::from_str("").expect("empty"));
        let back: CompressConfig = toml::from_str(&toml::to_string(&cfg).expect("ser")).expect("de");
        assert_eq!(back, cfg);
        let err = toml::from_str::<CompressConfig>("compress = \"topk:7\"")
            .expect_err("bad")
            .to_string();
        assert!(err.contains("fraction must be in (0, 1], got 7"), "{err}");
        assert!(toml::from_str::<CompressConfig>("compres = \"int8\"").is_err());
    }
}
