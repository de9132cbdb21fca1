//! How processes started by a cluster's scheduler find each other: Sinter's
//! own `SINTER_COORDINATOR` (host:port, first: under torchrun the master port
//! is torchrun's store), torchrun's
//! `MASTER_ADDR`, `MASTER_PORT`, `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, or
//! ps-lite/BytePS's `DMLC_ROLE`, `DMLC_PS_ROOT_URI`, `DMLC_PS_ROOT_PORT`,
//! `DMLC_NUM_WORKER`, `DMLC_NUM_SERVER`, `DMLC_WORKER_ID`.

use crate::error::JobError;

/// What the environment says about this process's place in the cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterEnv {
    /// `host:port` of the coordinator (an IPv6 host in brackets, `[::1]:29500`).
    pub coordinator: Option<String>,
    /// The coordinator's port alone, for a coordinator that listens on it.
    pub coordinator_port: Option<u16>,
    /// The variable the coordinator's address came from, for errors.
    pub coordinator_from: &'static str,
    pub rank: Option<u32>,
    pub world: Option<u32>,
    pub local_rank: Option<u32>,
    /// `DMLC_ROLE`: which role one command line for every process takes.
    pub role: Option<Role>,
    pub servers: Option<u32>,
}

/// ps-lite's `DMLC_ROLE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The coordinator (ps-lite's scheduler).
    Scheduler,
    Worker,
    /// A parameter-server shard.
    Server,
}

/// `host:port`, with an IPv6 literal host in brackets (`[fe80::1]:29500`),
/// the form `SocketAddr` and `ToSocketAddrs` read.
pub fn host_port(host: &str, port: u16) -> String {
    let host = host.trim();
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
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
        let port = |k: &str| -> Result<Option<u16>, JobError> {
            num(k)?
                .map(|p| {
                    u16::try_from(p).map_err(|_| JobError::Config {
                        path: format!("${k}").into(),
                        why: format!("{p} is not a port (0..=65535)"),
                    })
                })
                .transpose()
        };
        let host = get("MASTER_ADDR").or_else(|| get("DMLC_PS_ROOT_URI"));
        let mut coordinator_port = port("MASTER_PORT")?.or(port("DMLC_PS_ROOT_PORT")?);
        let mut coordinator = match (host, coordinator_port) {
            (Some(h), Some(p)) => Some(host_port(&h, p)),
            (None, Some(p)) => Some(host_port("127.0.0.1", p)),
            _ => None,
        };
        let mut coordinator_from = if get("MASTER_PORT").is_some() {
            "$MASTER_PORT"
        } else {
            "$DMLC_PS_ROOT_PORT"
        };
        // Sinter's own variable wins: under torchrun, MASTER_ADDR:MASTER_PORT is torchrun's store.
        if let Some(v) = get("SINTER_COORDINATOR") {
            let bad = |why: &str| JobError::Config {
                path: "$SINTER_COORDINATOR".into(),
                why: format!("`{v}` {why}"),
            };
            let (h, p) = v.trim().rsplit_once(':').ok_or_else(|| bad("is not host:port"))?;
            let p: u16 = p.parse().map_err(|_| bad("does not end in a port (0..=65535)"))?;
            let h = h.trim_start_matches('[').trim_end_matches(']');
            if h.is_empty() {
                return Err(bad("has no host"));
            }
            coordinator = Some(host_port(h, p));
            coordinator_port = Some(p);
            coordinator_from = "$SINTER_COORDINATOR";
        }
        let role = match get("DMLC_ROLE").as_deref().map(str::trim) {
            None => None,
            Some("scheduler") => Some(Role::Scheduler),
            Some("worker") => Some(Role::Worker),
            Some("server") => Some(Role::Server),
            Some(other) => {
                return Err(JobError::Config {
                    path: "$DMLC_ROLE".into(),
                    why: format!("`{other}` is not a role (scheduler, worker or server)"),
                });
            }
        };
        Ok(Self {
            coordinator,
            coordinator_port,
            coordinator_from,
            rank: num("RANK")?.or(num("DMLC_WORKER_ID")?),
            world: num("WORLD_SIZE")?.or(num("DMLC_NUM_WORKER")?),
            local_rank: num("LOCAL_RANK")?,
            role,
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
        assert_eq!((e.world, e.role, e.servers), (Some(4), Some(Role::Worker), Some(2)));
    }

    /// Issue 16: an IPv6 `MASTER_ADDR` gave `fd00::1:29500`, which no resolver reads.
    #[test]
    fn an_ipv6_master_addr_is_bracketed() {
        let e = env(&[("MASTER_ADDR", "fd00::1"), ("MASTER_PORT", "29500")]).expect("valid");
        assert_eq!(e.coordinator.as_deref(), Some("[fd00::1]:29500"));
        let addr: std::net::SocketAddr = e
            .coordinator
            .as_deref()
            .expect("set")
            .parse()
            .expect("a socket address");
        assert_eq!(addr.port(), 29500);
        let e = env(&[("MASTER_ADDR", "[::1]"), ("MASTER_PORT", "7")]).expect("valid");
        assert_eq!(e.coordinator.as_deref(), Some("[::1]:7"));
        assert_eq!(e.coordinator_port, Some(7));
    }

    /// Under torchrun, MASTER_ADDR:MASTER_PORT is torchrun's own store:
    /// SINTER_COORDINATOR names Sinter's coordinator instead.
    #[test]
    fn sinter_coordinator_overrides_master_addr() {
        let e = env(&[
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "29500"),
            ("SINTER_COORDINATOR", "10.0.0.1:29600"),
        ])
        .expect("valid");
        assert_eq!(e.coordinator.as_deref(), Some("10.0.0.1:29600"));
        assert_eq!(
            (e.coordinator_port, e.coordinator_from),
            (Some(29600), "$SINTER_COORDINATOR")
        );
        let e = env(&[("SINTER_COORDINATOR", "[fd00::2]:7")]).expect("valid");
        assert_eq!(e.coordinator.as_deref(), Some("[fd00::2]:7"));
        for bad in ["nohost", "h:notaport", ":29500"] {
            let e = env(&[("SINTER_COORDINATOR", bad)]).unwrap_err();
            assert!(e.to_string().contains("$SINTER_COORDINATOR"), "{bad}: {e}");
        }
    }

    /// Issue 16: `DMLC_ROLE=scheduler` started a worker; every role is now
    /// read, and an unknown one is refused naming the variable.
    #[test]
    fn every_dmlc_role_is_read_and_an_unknown_one_refused() {
        for (v, role) in [
            ("scheduler", Role::Scheduler),
            ("worker", Role::Worker),
            ("server", Role::Server),
        ] {
            assert_eq!(env(&[("DMLC_ROLE", v)]).expect("valid").role, Some(role));
        }
        let e = env(&[("DMLC_ROLE", "sheduler")]).unwrap_err();
        assert!(
            e.to_string().contains("$DMLC_ROLE") && e.to_string().contains("sheduler"),
            "{e}"
        );
        let e = env(&[("MASTER_PORT", "70000")]).unwrap_err();
        assert!(e.to_string().contains("$MASTER_PORT"), "{e}");
    }

    #[test]
    fn bad_numbers_name_the_variable() {
        let e = env(&[("RANK", "two")]).unwrap_err();
        assert!(e.to_string().contains("$RANK"), "{e}");
    }
}
