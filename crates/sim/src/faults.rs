//! Fault mixes and the schedule of faults a seed draws.
//!
//! A run has a safety phase, `[0, safety_end)`, in which faults happen, and
//! a liveness phase after it with none: partitions have healed, crashed
//! nodes have restarted, slow nodes are back to speed, and messages are
//! neither delayed nor lost. The job must then finish.
//!
//! Loss is modelled as TCP sees it: a lost segment is retransmitted after a
//! retransmission timeout, so the message arrives late and holds back its
//! stream. A partition holds every stream across it until it heals (TCP
//! keeps retransmitting); a runtime deadline usually fires first and the
//! job restarts. A crash kills the process: its peers see their connections
//! reset one latency later.

use std::fmt;
use std::str::FromStr;

use tensor::Rng;

use crate::queue::Nanos;

/// Which kinds of fault a run may suffer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultMix {
    /// Random per-message delay (reorders messages across streams).
    pub delay: bool,
    /// Lost segments, retransmitted after a timeout.
    pub loss: bool,
    /// A set of nodes cut off from the rest for a while.
    pub partition: bool,
    /// A process dies, and its node restarts later.
    pub crash: bool,
    /// A node computes several times slower for a while.
    pub slow: bool,
}

const NAMES: [&str; 5] = ["delay", "loss", "partition", "crash", "slow"];

impl FaultMix {
    pub const NONE: FaultMix = FaultMix {
        delay: false,
        loss: false,
        partition: false,
        crash: false,
        slow: false,
    };
    pub const ALL: FaultMix = FaultMix {
        delay: true,
        loss: true,
        partition: true,
        crash: true,
        slow: true,
    };

    fn flags(&self) -> [bool; 5] {
        [self.delay, self.loss, self.partition, self.crash, self.slow]
    }

    fn from_flags(f: [bool; 5]) -> Self {
        FaultMix {
            delay: f[0],
            loss: f[1],
            partition: f[2],
            crash: f[3],
            slow: f[4],
        }
    }

    /// Each kind with probability 1/2.
    pub fn random(rng: &mut Rng) -> Self {
        let mut f = [false; 5];
        for x in &mut f {
            *x = rng.below(2) == 1;
        }
        Self::from_flags(f)
    }

    pub fn is_none(&self) -> bool {
        *self == Self::NONE
    }
}

impl fmt::Display for FaultMix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let on: Vec<&str> = NAMES
            .iter()
            .zip(self.flags())
            .filter(|(_, on)| *on)
            .map(|(n, _)| *n)
            .collect();
        if on.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&on.join(","))
        }
    }
}

impl FromStr for FaultMix {
    type Err = String;

    /// `none`, `all`, or a comma-separated list of `delay`, `loss`,
    /// `partition`, `crash`, `slow`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "none" | "" => return Ok(Self::NONE),
            "all" => return Ok(Self::ALL),
            _ => {}
        }
        let mut f = [false; 5];
        for part in s.split(',').map(str::trim) {
            match NAMES.iter().position(|n| *n == part) {
                Some(i) => f[i] = true,
                None => {
                    return Err(format!(
                        "unknown fault `{part}`: expected none, all, or a comma-separated list of {}",
                        NAMES.join(", ")
                    ));
                }
            }
        }
        Ok(Self::from_flags(f))
    }
}

/// One scheduled fault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Nodes with `side[n]` true cannot reach the others until `until`.
    Partition {
        side: Vec<bool>,
        until: Nanos,
    },
    Crash {
        node: u32,
        restart_at: Nanos,
    },
    Slow {
        node: u32,
        factor: u32,
        until: Nanos,
    },
}

/// The faults of one run, drawn from its seed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FaultPlan {
    pub safety_end: Nanos,
    /// Per-message delay is uniform in `0..jitter_max_ns` for half the messages.
    pub jitter_max_ns: Nanos,
    /// Per-message loss probability, in parts per million.
    pub loss_ppm: u64,
    /// Retransmission timeout of a lost segment (Linux's minimum RTO).
    pub rto_ns: Nanos,
    /// Sorted by time.
    pub faults: Vec<(Nanos, Fault)>,
}

/// Linux's minimum retransmission timeout.
pub const RTO_NS: Nanos = 200_000_000;

impl FaultPlan {
    /// Faults of `mix` over `nodes` nodes (the last, the coordinator, never
    /// crashes: its failure is not modelled) during `safety_end` ns.
    pub fn draw(mix: FaultMix, nodes: u32, safety_end: Nanos, rng: &mut Rng) -> Self {
        let mut faults = Vec::new();
        let at = |rng: &mut Rng| rng.below(safety_end.max(1));
        let crashable = nodes.saturating_sub(1).max(1);
        if mix.partition {
            for _ in 0..1 + rng.below(3) {
                let start = at(rng);
                let until = (start + 20_000_000 + rng.below(1_500_000_000)).min(safety_end);
                let mut side = vec![false; nodes as usize];
                // A random non-empty proper subset (the coordinator may be on either side).
                let cut = 1 + rng.below(nodes as u64 - 1) as usize;
                let mut order: Vec<usize> = (0..nodes as usize).collect();
                rng.shuffle(&mut order);
                for &n in &order[..cut] {
                    side[n] = true;
                }
                faults.push((start, Fault::Partition { side, until }));
            }
        }
        if mix.crash {
            for _ in 0..1 + rng.below(2) {
                let start = at(rng);
                let node = rng.below(crashable as u64) as u32;
                let restart_at = (start + 10_000_000 + rng.below(1_000_000_000)).min(safety_end);
                faults.push((start, Fault::Crash { node, restart_at }));
            }
        }
        if mix.slow {
            for _ in 0..1 + rng.below(3) {
                let start = at(rng);
                let node = rng.below(crashable as u64) as u32;
                let factor = 2 + rng.below(19) as u32;
                let until = (start + rng.below(safety_end.max(1))).min(safety_end);
                faults.push((start, Fault::Slow { node, factor, until }));
            }
        }
        faults.sort_by_key(|(t, _)| *t);
        FaultPlan {
            safety_end,
            jitter_max_ns: if mix.delay {
                1_000_000 + rng.below(30_000_000)
            } else {
                0
            },
            loss_ppm: if mix.loss { 1_000 + rng.below(30_000) } else { 0 },
            rto_ns: RTO_NS,
            faults,
        }
    }

    /// The fault delay of one message handed to the network at `now`.
    pub fn message_delay(&self, now: Nanos, rng: &mut Rng) -> Nanos {
        if now >= self.safety_end {
            return 0;
        }
        let mut extra = 0;
        if self.jitter_max_ns > 0 && rng.below(2) == 0 {
            extra += rng.below(self.jitter_max_ns);
        }
        if self.loss_ppm > 0 && rng.below(1_000_000) < self.loss_ppm {
            // One or two retransmissions, the second after a doubled timeout.
            extra += self.rto_ns * (1 + 2 * rng.below(2));
        }
        extra
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixes_parse_and_print() {
        assert_eq!("none".parse::<FaultMix>(), Ok(FaultMix::NONE));
        assert_eq!("all".parse::<FaultMix>(), Ok(FaultMix::ALL));
        let m: FaultMix = "crash,slow".parse().unwrap();
        assert!(m.crash && m.slow && !m.delay);
        assert_eq!(m.to_string(), "crash,slow");
        let e = "crash,fire".parse::<FaultMix>().unwrap_err();
        assert!(e.contains("unknown fault `fire`"), "{e}");
    }

    #[test]
    fn a_plan_is_a_function_of_its_seed_and_ends_with_the_safety_phase() {
        let draw = |seed| FaultPlan::draw(FaultMix::ALL, 5, 2_000_000_000, &mut Rng::new(seed));
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        for (at, f) in draw(9).faults {
            assert!(at < 2_000_000_000);
            match f {
                Fault::Partition { until, side } => {
                    assert!(until <= 2_000_000_000);
                    assert!(side.iter().any(|s| *s) && side.iter().any(|s| !*s));
                }
                Fault::Crash { node, restart_at } => assert!(node < 4 && restart_at <= 2_000_000_000),
                Fault::Slow { until, .. } => assert!(until <= 2_000_000_000),
            }
        }
    }
}
