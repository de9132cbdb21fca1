//! The federation's errors: a bad `[fl]` setting, or a local training that could not run.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum FlError {
    #[error("config key {key}: {why}")]
    Config { key: String, why: String },
    #[error("client training: {0}")]
    Model(String),
    #[error("differential privacy: {name} = {value} {why}")]
    Privacy {
        name: &'static str,
        value: f64,
        why: &'static str,
    },
}
