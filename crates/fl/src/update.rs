//! A client's update (its model's change over one round) and the checks
//! every update passes before it may reach an aggregate.

use std::fmt;

/// Names a client for as long as a federation runs (see `Rounds`' contract).
pub type ClientId = u64;

/// What a client returns for a round: `delta = local model − global model`,
/// trained on `samples` rows.
#[derive(Clone, Debug, PartialEq)]
pub struct Update {
    pub client: ClientId,
    pub round: u32,
    pub samples: u64,
    /// The client's mean training loss over its last local epoch (reported, not trusted).
    pub train_loss: f32,
    pub delta: Vec<f32>,
}

/// Why an update was kept out of its round's aggregate.
#[derive(Clone, Debug, PartialEq)]
pub enum UpdateRefusal {
    WrongLength {
        expected: usize,
        got: usize,
    },
    NotFinite {
        index: usize,
        value: f32,
    },
    NormAboveBound {
        norm: f64,
        bound: f64,
    },
    NoSamples,
    /// The client was not sampled for the open round, or the update names another round.
    NotAsked {
        round: u32,
    },
    /// The client already answered this round.
    Duplicate,
}

impl fmt::Display for UpdateRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpdateRefusal::WrongLength { expected, got } => {
                write!(f, "the update has {got} values, the model {expected}")
            }
            UpdateRefusal::NotFinite { index, value } => write!(f, "value {index} of the update is {value}"),
            UpdateRefusal::NormAboveBound { norm, bound } => {
                write!(f, "the update's L2 norm {norm:.4e} is above the bound {bound:.4e}")
            }
            UpdateRefusal::NoSamples => f.write_str("the update claims 0 training samples"),
            UpdateRefusal::NotAsked { round } => write!(f, "the client was not asked for an update in round {round}"),
            UpdateRefusal::Duplicate => f.write_str("the client already sent its update for this round"),
        }
    }
}

/// Checks an update against the model's length, for finite values, a sample
/// count, and (when `norm_bound > 0`) its L2 norm. Returns the norm.
///
/// With a norm bound the check allows 0.1% over it: a client that clips to
/// exactly the bound in `f32` may land a rounding step above it; anything
/// further is not a clipped update.
pub fn check_update(delta: &[f32], samples: u64, model_len: usize, norm_bound: f64) -> Result<f64, UpdateRefusal> {
    if delta.len() != model_len {
        return Err(UpdateRefusal::WrongLength {
            expected: model_len,
            got: delta.len(),
        });
    }
    if samples == 0 {
        return Err(UpdateRefusal::NoSamples);
    }
    let mut sq = 0.0f64;
    for (index, &value) in delta.iter().enumerate() {
        if !value.is_finite() {
            return Err(UpdateRefusal::NotFinite { index, value });
        }
        sq += value as f64 * value as f64;
    }
    let norm = sq.sqrt();
    if norm_bound > 0.0 && norm > norm_bound * 1.001 {
        return Err(UpdateRefusal::NormAboveBound {
            norm,
            bound: norm_bound,
        });
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_bad_update_is_refused_with_its_reason() {
        assert_eq!(check_update(&[3.0, 4.0], 1, 2, 0.0), Ok(5.0));
        assert_eq!(
            check_update(&[1.0], 1, 2, 0.0),
            Err(UpdateRefusal::WrongLength { expected: 2, got: 1 })
        );
        assert!(matches!(
            check_update(&[1.0, f32::NAN], 1, 2, 0.0),
            Err(UpdateRefusal::NotFinite { index: 1, .. })
        ));
        assert!(matches!(
            check_update(&[f32::INFINITY, 0.0], 1, 2, 0.0),
            Err(UpdateRefusal::NotFinite { index: 0, .. })
        ));
        assert_eq!(check_update(&[1.0, 0.0], 0, 2, 0.0), Err(UpdateRefusal::NoSamples));
        assert_eq!(check_update(&[3.0, 4.0], 1, 2, 5.0), Ok(5.0));
        assert!(matches!(
            check_update(&[3.0, 4.0], 1, 2, 4.0),
            Err(UpdateRefusal::NormAboveBound { .. })
        ));
    }
}
