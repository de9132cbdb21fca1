//! The federation's control messages between a server and its clients. A
//! model or an update follows its message as one `Tensor` frame whose tag is
//! the round, so the values cross the wire without a copy into a message.

use serde::{Deserialize, Serialize};

use crate::local::LocalSpec;

/// Longest client name a server takes.
pub const NAME_BYTES_MAX: usize = 128;

/// How a client trains, as the server tells it (its config rules the federation).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainSpec {
    pub epochs: u32,
    pub batch_size: u64,
    pub proximal_mu: f32,
    /// The clients' `[optim]` as JSON: its config is an internally tagged enum,
    /// which the binary control encoding cannot carry.
    pub optim_json: String,
    /// Seed of the federation: a client's shuffles are drawn from it, the round and the client.
    pub seed: u64,
    /// How updates are compressed (`fl.codec`, `fl.error_feedback`).
    pub codec: String,
    pub error_feedback: bool,
    /// DP-FedAvg's clipping bound (`fl.dp.clip_norm`): the client clips its update to it.
    pub clip_norm: Option<f64>,
}

impl TrainSpec {
    pub fn new(local: &LocalSpec, seed: u64, codec: &str, error_feedback: bool) -> Self {
        Self {
            epochs: local.epochs,
            batch_size: local.batch_size as u64,
            proximal_mu: local.proximal_mu,
            optim_json: serde_json::to_string(&local.optim).unwrap_or_default(),
            seed,
            codec: codec.to_string(),
            error_feedback,
            clip_norm: local.clip_norm,
        }
    }

    /// The client's update encoder; a codec it cannot read is an error naming it.
    pub fn encoder(&self, model_len: usize) -> Result<crate::UpdateEncoder, String> {
        let spec: codec::CodecSpec = self
            .codec
            .parse()
            .map_err(|e| format!("the server's codec {:?}: {e}", self.codec))?;
        if matches!(spec, codec::CodecSpec::PowerSgd { .. }) {
            return Err("the server asks for PowerSGD, which federated updates do not support".into());
        }
        Ok(crate::UpdateEncoder::new(spec, self.error_feedback, model_len))
    }

    /// The spec a client trains by; an optimizer config it cannot read is an error naming it.
    pub fn local(&self) -> Result<LocalSpec, String> {
        let optim = serde_json::from_str(&self.optim_json)
            .map_err(|e| format!("the server's optimizer config {:?}: {e}", self.optim_json))?;
        Ok(LocalSpec {
            epochs: self.epochs,
            batch_size: usize::try_from(self.batch_size).unwrap_or(usize::MAX),
            proximal_mu: self.proximal_mu,
            optim,
            clip_norm: self.clip_norm,
        })
    }
}

/// From a client.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ToServer {
    /// First message on a connection: who the client is (the same name after
    /// a reconnection, so that it keeps its place in an open round) and how
    /// many training rows it holds.
    Hello { name: String, samples: u64 },
    /// The client's update for `round` (local model − global model); it
    /// follows with tag `round` as a `Tensor` frame of the model's length, or,
    /// with a codec, as a `Ps` frame holding the codec's message.
    Update { round: u32, samples: u64, train_loss: f32 },
}

/// From the server.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ToClient {
    /// The client is admitted as `client`; the model has `model_len` values.
    Welcome {
        client: u64,
        model_len: u64,
        spec: TrainSpec,
    },
    /// The client is not admitted (its name is bad, or the federation is over).
    Rejected { why: String },
    /// Train from the global model of `round`, which follows as a `Tensor` frame with tag `round`.
    Train { round: u32 },
    /// The update for `round` was kept out of the aggregate.
    Refused { round: u32, why: String },
    /// The federation ended after `rounds` rounds; the client may exit.
    Done { rounds: u32 },
}

/// Checks a client's name: 1 to [`NAME_BYTES_MAX`] bytes of letters, digits, `-`, `_`, `.`, `:` or `@`.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > NAME_BYTES_MAX {
        return Err(format!(
            "a client name has 1 to {NAME_BYTES_MAX} bytes, this one {}",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "-_.:@".contains(*c)))
    {
        return Err(format!(
            "client name {name:?} holds {c:?}; use letters, digits and - _ . : @"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_train_spec_survives_the_binary_control_encoding() {
        let local = LocalSpec {
            epochs: 2,
            batch_size: 64,
            proximal_mu: 0.01,
            optim: optim::OptimConfig::Sgd(optim::SgdConfig {
                lr: 0.05,
                momentum: 0.9,
                ..Default::default()
            }),
            clip_norm: Some(0.5),
        };
        let msg = ToClient::Welcome {
            client: 3,
            model_len: 10,
            spec: TrainSpec::new(&local, 7, "topk:0.01", true),
        };
        let bytes = postcard::to_allocvec(&msg).unwrap();
        let back: ToClient = postcard::from_bytes(&bytes).unwrap();
        let ToClient::Welcome { spec, .. } = back else {
            panic!("{back:?}")
        };
        assert_eq!(spec.local().unwrap(), local);
        assert!(!spec.encoder(10).unwrap().is_plain());
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("site-3.hospital@eu").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("a b").is_err());
        assert!(check_name(&"x".repeat(NAME_BYTES_MAX + 1)).is_err());
    }
}
