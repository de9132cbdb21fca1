//! Elastic membership: with [`Config::elastic`] set, losing a worker (its
//! connection closes, its heartbeats stop, or a peer reports a broken link)
//! opens a new generation of the survivors instead of failing the job, and a
//! worker that joins a running job is taken in at the next generation.
//!
//! The survivors keep their order: new ranks are given by old rank, then
//! joiners by arrival. Each new rank is told its rank in the previous
//! generation, so the workers can agree on who holds the newest training
//! state and how the lost worker's data is shared out.
//!
//! **Invariants:** generations only grow; every [`FromCoordinator::Regroup`]
//! of one generation lists the same peers; a job never runs with fewer than
//! `min_workers` or more than `max_workers` workers.

use wire::msg::{FromCoordinator, Role};

use super::{Command, ConnId, Coordinator, Member, Phase};

/// Generations a job may open before it is declared unstable and stopped.
pub const GENERATIONS_MAX: u64 = 10_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Elastic {
    /// Fewer workers than this left: the job fails.
    pub min_workers: u32,
    /// Joins beyond this many workers are refused.
    pub max_workers: u32,
    /// How long after the first news of a loss or join the new generation
    /// opens: other news of the same event (the dead worker's own disconnect
    /// after a peer's report of it) arrive meanwhile and make one generation.
    pub settle_ms: u64,
}

impl Coordinator {
    /// Whether `conn`'s loss is survivable: an elastic job and a worker.
    pub(crate) fn elastic_for(&self, conn: ConnId) -> bool {
        self.cfg.elastic.is_some() && self.members.get(&conn).is_some_and(|m| m.role == Role::Worker)
    }

    /// A worker asks to join a running job: it waits for the next generation.
    pub(crate) fn on_late_join(&mut self, now_ms: u64, conn: ConnId, data_addr: String, pid: u32) -> Vec<Command> {
        let max = self.cfg.elastic.map_or(0, |e| e.max_workers);
        let workers = self.members.values().filter(|m| m.role == Role::Worker).count() as u32;
        if self.members.contains_key(&conn) || workers >= max {
            let reason = format!("the job already has its maximum of {max} workers (pid {pid} refused)");
            return vec![
                Command::Send {
                    conn,
                    msg: FromCoordinator::Abort {
                        generation: self.generation,
                        reason,
                        failed_rank: None,
                    },
                },
                Command::Close { conn },
            ];
        }
        self.members.insert(
            conn,
            Member {
                role: Role::Worker,
                rank: None,
                data_addr,
                pid,
                last_heard_ms: now_ms,
                finished: false,
            },
        );
        self.schedule_regroup(now_ms);
        Vec::new()
    }

    /// A worker is gone (`why` says how): the survivors regroup, or the job
    /// fails when too few are left or none holds the training state.
    pub(crate) fn on_worker_lost(&mut self, now_ms: u64, conn: ConnId, why: String) -> Vec<Command> {
        let Some(lost) = self.members.remove(&conn) else {
            return Vec::new();
        };
        let min = self.cfg.elastic.map_or(1, |e| e.min_workers);
        let ranked = self
            .members
            .values()
            .filter(|m| m.role == Role::Worker && m.rank.is_some() && !m.finished)
            .count() as u32;
        let joining = self
            .members
            .values()
            .filter(|m| m.role == Role::Worker && m.rank.is_none())
            .count() as u32;
        if ranked == 0 {
            return self.fail(
                lost.worker_rank(),
                format!("{why}; no worker holding the training state is left"),
            );
        }
        if ranked + joining < min {
            return self.fail(
                lost.worker_rank(),
                format!(
                    "{why}; {} workers left, fewer than cluster.min_workers {min}",
                    ranked + joining
                ),
            );
        }
        self.schedule_regroup(now_ms);
        Vec::new()
    }

    /// A worker's collective of `generation` failed on its link to `rank`.
    pub(crate) fn on_peer_lost(
        &mut self,
        now_ms: u64,
        conn: ConnId,
        generation: u64,
        _rank: u32,
        _step: u64,
    ) -> Vec<Command> {
        let known = self.members.get(&conn).is_some_and(|m| m.rank.is_some());
        // A report from an earlier generation is about a membership already replaced.
        if self.cfg.elastic.is_some() && known && generation == self.generation {
            self.schedule_regroup(now_ms);
        }
        Vec::new()
    }

    fn schedule_regroup(&mut self, now_ms: u64) {
        let settle = self.cfg.elastic.map_or(0, |e| e.settle_ms);
        self.regroup_due_ms.get_or_insert(now_ms + settle);
    }

    /// Opens the next generation if one is due by `now_ms`.
    pub(crate) fn regroup_if_due(&mut self, now_ms: u64) -> Vec<Command> {
        match self.regroup_due_ms {
            Some(due) if due <= now_ms && self.phase == Phase::Running => self.open_generation(now_ms),
            _ => Vec::new(),
        }
    }

    fn open_generation(&mut self, now_ms: u64) -> Vec<Command> {
        self.regroup_due_ms = None;
        if self.generation >= GENERATIONS_MAX {
            return self.fail(
                None,
                format!("{GENERATIONS_MAX} membership generations: the cluster is unstable"),
            );
        }
        let mut order: Vec<(ConnId, Option<u32>)> = self
            .members
            .iter()
            .filter(|(_, m)| m.role == Role::Worker && !m.finished)
            .map(|(&c, m)| (c, m.rank))
            .collect();
        // Survivors by old rank, then joiners by arrival (connection ids grow).
        order.sort_by_key(|&(c, rank)| (rank.is_none(), rank, c));
        self.generation += 1;
        self.checksums.clear();
        let world = order.len() as u32;
        let previous: Vec<Option<u32>> = order.iter().map(|&(_, r)| r).collect();
        let mut peers = Vec::with_capacity(order.len());
        for (new_rank, &(conn, _)) in order.iter().enumerate() {
            let m = self.members.get_mut(&conn).expect("listed above");
            m.rank = Some(new_rank as u32);
            m.last_heard_ms = now_ms;
            peers.push(m.data_addr.clone());
        }
        order
            .iter()
            .enumerate()
            .map(|(rank, &(conn, _))| Command::Send {
                conn,
                msg: FromCoordinator::Regroup {
                    generation: self.generation,
                    rank: rank as u32,
                    world,
                    peers: peers.clone(),
                    previous: previous.clone(),
                },
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use wire::msg::ToCoordinator;

    use super::super::{Config, Event, Outcome};
    use super::*;

    fn elastic(world: u32, min: u32, max: u32) -> Coordinator {
        let mut c = Coordinator::new(Config {
            world,
            servers: 0,
            heartbeat_timeout_ms: 1000,
            rendezvous_timeout_ms: 5000,
            elastic: Some(Elastic {
                min_workers: min,
                max_workers: max,
                settle_ms: 100,
            }),
        });
        for r in 0..world {
            c.on_event(0, join(10 + r as u64, &format!("w{r}:1")));
        }
        assert_eq!(c.generation(), 1);
        c
    }

    fn join(conn: ConnId, addr: &str) -> Event {
        Event::Message {
            conn,
            msg: ToCoordinator::Join {
                role: Role::Worker,
                rank: None,
                data_addr: addr.into(),
                pid: conn as u32,
            },
        }
    }

    fn regroups(cmds: &[Command]) -> Vec<(ConnId, u32, u32, Vec<String>, Vec<Option<u32>>)> {
        cmds.iter()
            .filter_map(|c| match c {
                Command::Send {
                    conn,
                    msg:
                        FromCoordinator::Regroup {
                            rank,
                            world,
                            peers,
                            previous,
                            ..
                        },
                } => Some((*conn, *rank, *world, peers.clone(), previous.clone())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_lost_worker_regroups_the_survivors_after_the_settle_time() {
        let mut c = elastic(4, 1, 4);
        assert!(c.on_event(10, Event::Disconnected { conn: 11 }).is_empty());
        // A survivor's report of the same loss joins the same generation.
        let lost = Event::Message {
            conn: 12,
            msg: ToCoordinator::PeerLost {
                generation: 1,
                rank: 1,
                step: 5,
            },
        };
        assert!(c.on_event(20, lost).is_empty());
        assert!(c.on_event(90, Event::Tick).is_empty(), "not before the settle time");
        let cmds = c.on_event(110, Event::Tick);
        let r = regroups(&cmds);
        assert_eq!(r.len(), 3, "{cmds:?}");
        let peers = vec!["w0:1".to_string(), "w2:1".into(), "w3:1".into()];
        assert_eq!(r[0], (10, 0, 3, peers.clone(), vec![Some(0), Some(2), Some(3)]));
        assert_eq!(r[2], (13, 2, 3, peers, vec![Some(0), Some(2), Some(3)]));
        assert_eq!(c.generation(), 2);
        assert!(c.on_event(500, Event::Tick).is_empty(), "one generation per loss");
        // A late report about the replaced generation changes nothing.
        let stale = Event::Message {
            conn: 12,
            msg: ToCoordinator::PeerLost {
                generation: 1,
                rank: 1,
                step: 5,
            },
        };
        c.on_event(600, stale);
        assert!(c.on_event(800, Event::Tick).is_empty());
    }

    #[test]
    fn a_joiner_is_taken_in_at_the_next_generation_up_to_the_maximum() {
        let mut c = elastic(2, 1, 3);
        assert!(c.on_event(5, join(20, "new:1")).is_empty());
        let r = regroups(&c.on_event(200, Event::Tick));
        assert_eq!(r.len(), 3);
        assert_eq!(r[2].0, 20);
        assert_eq!(r[2].1, 2);
        assert_eq!(r[2].4, vec![Some(0), Some(1), None]);
        // A fourth worker is refused: the maximum is 3.
        let cmds = c.on_event(300, join(21, "more:1"));
        assert!(matches!(
            &cmds[0],
            Command::Send { conn: 21, msg: FromCoordinator::Abort { reason, .. } } if reason.contains("maximum of 3")
        ));
    }

    #[test]
    fn a_silent_worker_is_dropped_and_the_rest_regroup() {
        let mut c = elastic(3, 2, 3);
        for t in [400, 800] {
            for conn in [10, 12] {
                c.on_event(
                    t,
                    Event::Message {
                        conn,
                        msg: ToCoordinator::Heartbeat { step: 1 },
                    },
                );
            }
        }
        let cmds = c.on_event(1100, Event::Tick);
        assert_eq!(cmds, vec![Command::Close { conn: 11 }]);
        let r = regroups(&c.on_event(1250, Event::Tick));
        assert_eq!(r.iter().map(|x| x.0).collect::<Vec<_>>(), vec![10, 12]);
    }

    #[test]
    fn fewer_than_the_minimum_fails_naming_the_lost_rank() {
        let mut c = elastic(2, 2, 2);
        let cmds = c.on_event(10, Event::Disconnected { conn: 11 });
        match cmds.last() {
            Some(Command::Exit(Outcome::Failed { rank: Some(1), reason })) => {
                assert!(reason.contains("min_workers 2"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_job_finishes_when_the_current_generation_finishes() {
        let mut c = elastic(2, 1, 2);
        c.on_event(1, Event::Disconnected { conn: 11 });
        c.on_event(200, Event::Tick);
        let fin = Event::Message {
            conn: 10,
            msg: ToCoordinator::Finished { steps: 9 },
        };
        assert_eq!(c.on_event(300, fin).last(), Some(&Command::Exit(Outcome::Finished)));
    }
}
