//! How processes started by a cluster's scheduler find each other: torchrun's
//! `MASTER_ADDR`, `MASTER_PORT`, `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, or
//! ps-lite/BytePS's `DMLC_ROLE`, `DMLC_PS_ROOT_URI`, `DMLC_PS_ROOT_PORT`,
//! `DMLC_NUM_WORKER`, `DMLC_NUM_SERVER`, `DMLC_WORKER_ID`.

use crate::error::JobError;

/// What the environment says about this process's place in the cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterEnv {
    /// `host:port` of the coordinator.
    pub coordinator: Option<String>,
    pub rank: Option<u32>,
    pub world: Option<u32>,
    pub local_rank: Option<u32>,
    /// `DMLC_ROLE`: `scheduler` (our coordinator), `worker` or `server`.
    pub role: Option<String>,
    pub servers: Option<u32>,
}

impl ClusterEnv {
    /// Reads the process environment.
    pub fn from_process() -> Result<Self, JobError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Reads through `get`, so tests need not touch the process environment.
    /// torchrun's names win over DMLC's when both are set.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, JobError> {
        let num = |k: &str| -> Result<Option<u32>, JobError> {
            get(k)
                .map(|v| {
                    v.trim().parse::<u32>().map_err(|_| JobError::Config {
                        path: format!("${k}").into(),
                        why: format!("`{v}` is not a non-negative integer"),
                    })
                })
                .transpose()
        };
        let host = get("MASTER_ADDR").or_else(|| get("DMLC_PS_ROOT_URI"));
        let port = num("MASTER_PORT")?.or(num("DMLC_PS_ROOT_PORT")?);
        let coordinator = match (host, port) {
            (Some(h), Some(p)) => Some(format!("{h}:{p}")),
            (None, Some(p)) => Some(format!("127.0.0.1:{p}")),
            _ => None,
        };
        Ok(Self {
            coordinator,
            rank: num("RANK")?.or(num("DMLC_WORKER_ID")?),
            world: num("WORLD_SIZE")?.or(num("DMLC_NUM_WORKER")?),
            local_rank: num("LOCAL_RANK")?,
            role: get("DMLC_ROLE"),
            servers: num("DMLC_NUM_SERVER")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<ClusterEnv, JobError> {
        let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        ClusterEnv::from_lookup(|k| m.get(k).cloned())
    }

    #[test]
    fn torchrun_variables() {
        let e = env(&[
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "29500"),
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
        ])
        .expect("valid");
        assert_eq!(e.coordinator.as_deref(), Some("10.0.0.1:29500"));
        assert_eq!((e.rank, e.world, e.local_rank), (Some(3), Some(8), Some(1)));
    }

    #[test]
    fn dmlc_variables() {
        let e = env(&[
            ("DMLC_PS_ROOT_URI", "sched"),
            ("DMLC_PS_ROOT_PORT", "9000"),
            ("DMLC_NUM_WORKER", "4"),
            ("DMLC_ROLE", "worker"),
            ("DMLC_NUM_SERVER", "2"),
        ])
        .expect("valid");
        assert_eq!(e.coordinator.as_deref(), Some("sched:9000"));
        assert_eq!(
            (e.world, e.role.as_deref(), e.servers),
            (Some(4), Some("worker"), Some(2))
        );
    }

    #[test]
    fn bad_numbers_name_the_variable() {
        let e = env(&[("RANK", "two")]).unwrap_err();
        assert!(e.to_string().contains("$RANK"), "{e}");
    }
}
