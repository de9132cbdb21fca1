//! Elastic membership: with [`Config::elastic`] set, losing a worker (its
//! connection closes, its heartbeats stop, or a peer reports a broken link)
//! opens a new generation of the survivors instead of failing the job, and a
//! worker that joins a running job is taken in at the next generation.
//!
//! The survivors keep their order: new ranks are given by old rank, then
//! joiners by arrival. The workers themselves agree on who holds the newest
//! training state and how the lost worker's rows are shared out (`node::elastic`).
//!
//! Parameter-server jobs (`servers > 0`) keep their ranks instead: a lost
//! worker's rank stays vacant until a joining worker takes it over
//! ([`FromCoordinator::Replace`]) with the dead worker's data partition; the
//! shards' clocks for that rank tell the replacement where to continue. The
//! other workers never stop (under BSP they wait for the vacant rank's pushes
//! like for any slow worker). A rank still vacant after `replace_timeout_ms`
//! fails the job, naming it.
//!
//! **Invariants:** generations only grow; every [`FromCoordinator::Regroup`]
//! of one generation lists the same peers; a job never runs with fewer than
//! `min_workers` or more than `max_workers` workers; a parameter-server rank
//! is held by at most one admitted worker at a time.

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
    /// Parameter-server jobs: how long a lost worker's rank may stay vacant.
    pub replace_timeout_ms: u64,
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
            return self.refuse(conn, reason);
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

    /// A worker joins a running parameter-server job: it takes over a vacant
    /// rank (the one it asks for, or the lowest), or is refused when none is.
    pub(crate) fn on_replacement_join(
        &mut self,
        now_ms: u64,
        conn: ConnId,
        asked: Option<u32>,
        data_addr: String,
        pid: u32,
    ) -> Vec<Command> {
        let rank = match asked {
            Some(r) => self.vacant.contains_key(&r).then_some(r),
            None => self.vacant.keys().next().copied(),
        };
        let Some(rank) = rank.filter(|_| !self.members.contains_key(&conn)) else {
            let reason = match asked {
                Some(r) => format!("rank {r} is not vacant (pid {pid} refused)"),
                None => format!("no rank is vacant: the job has all its workers (pid {pid} refused)"),
            };
            return self.refuse(conn, reason);
        };
        if self.generation >= GENERATIONS_MAX {
            return self.fail(
                None,
                format!("{GENERATIONS_MAX} membership generations: the cluster is unstable"),
            );
        }
        self.vacant.remove(&rank);
        self.generation += 1;
        self.members.insert(
            conn,
            Member {
                role: Role::Worker,
                rank: Some(rank),
                data_addr,
                pid,
                last_heard_ms: now_ms,
                finished: false,
            },
        );
        vec![Command::Send {
            conn,
            msg: FromCoordinator::Replace {
                generation: self.generation,
                rank,
                world: self.cfg.world,
                servers: self.server_addrs(),
            },
        }]
    }

    /// The shards' current data addresses, by shard (primaries, when replicated).
    fn server_addrs(&self) -> Vec<String> {
        (0..self.cfg.servers)
            .map(|shard| {
                let conn = match self.replicated() {
                    true => self.primary_of(shard),
                    false => self
                        .members
                        .iter()
                        .find(|(_, m)| m.role == Role::Server && m.rank == Some(shard))
                        .map(|(c, _)| *c),
                };
                conn.and_then(|c| self.members.get(&c))
                    .map_or_else(String::new, |m| m.data_addr.clone())
            })
            .collect()
    }

    /// Fails the job if a rank has been vacant longer than allowed.
    pub(crate) fn check_vacancies(&mut self, now_ms: u64) -> Vec<Command> {
        let late = self
            .vacant
            .iter()
            .find(|(_, v)| now_ms >= v.0)
            .map(|(r, v)| (*r, v.1.clone()));
        match late {
            Some((rank, why)) => {
                let waited = self.cfg.elastic.map_or(0, |e| e.replace_timeout_ms);
                self.fail(
                    Some(rank),
                    format!("{why}, and no worker took its place within {waited} ms"),
                )
            }
            None => Vec::new(),
        }
    }

    /// A worker is gone (`why` says how): the survivors regroup, or the job
    /// fails when too few are left or none holds the training state. In a
    /// parameter-server job its rank waits for a replacement.
    pub(crate) fn on_worker_lost(&mut self, now_ms: u64, conn: ConnId, why: String) -> Vec<Command> {
        let Some(lost) = self.members.remove(&conn) else {
            return Vec::new();
        };
        if self.cfg.servers > 0 {
            let Some(rank) = lost.rank else {
                return Vec::new();
            };
            let wait = self.cfg.elastic.map_or(0, |e| e.replace_timeout_ms);
            self.vacant.insert(rank, (now_ms + wait, why));
            return Vec::new();
        }
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

    /// An elastic coordinator's config, with the tests' deadlines.
    fn elastic_config(world: u32, servers: u32, min: u32, max: u32) -> Config {
        Config {
            world,
            servers,
            heartbeat_timeout_ms: 1000,
            rendezvous_timeout_ms: 5000,
            elastic: Some(Elastic {
                min_workers: min,
                max_workers: max,
                settle_ms: 100,
                replace_timeout_ms: 2000,
            }),
        }
    }

    fn elastic(world: u32, min: u32, max: u32) -> Coordinator {
        let mut c = Coordinator::new(elastic_config(world, 0, min, max));
        for r in 0..world {
            c.on_event(0, join(10 + r as u64, &format!("w{r}:1")));
        }
        assert_eq!(c.generation(), 1);
        c
    }

    /// A running elastic parameter-server job: `world` workers (conns 10..) and 2 servers (conns 50, 51).
    fn elastic_ps(world: u32) -> Coordinator {
        let mut c = Coordinator::new(elastic_config(world, 2, world, world));
        for r in 0..world {
            c.on_event(0, join(10 + r as u64, &format!("w{r}:1")));
        }
        for s in 0..2u64 {
            c.on_event(
                0,
                Event::Message {
                    conn: 50 + s,
                    msg: ToCoordinator::Join {
                        role: Role::Server,
                        rank: Some(s as u32),
                        data_addr: format!("s{s}:1"),
                        pid: 50 + s as u32,
                    },
                },
            );
        }
        assert_eq!(c.generation(), 1);
        c
    }

    fn finished(conn: ConnId) -> Event {
        Event::Message {
            conn,
            msg: ToCoordinator::Finished { steps: 10 },
        }
    }

    #[test]
    fn a_lost_parameter_server_worker_is_replaced_under_its_rank() {
        let mut c = elastic_ps(3);
        assert!(
            c.on_event(100, Event::Disconnected { conn: 11 }).is_empty(),
            "no regroup, no failure"
        );
        // The others finishing does not end the job while rank 1 is vacant.
        assert!(c.on_event(150, finished(10)).is_empty());
        assert!(c.on_event(150, finished(12)).is_empty());
        assert!(c.on_event(500, Event::Tick).is_empty());
        let cmds = c.on_event(600, join(20, "new:1"));
        assert_eq!(
            cmds,
            vec![Command::Send {
                conn: 20,
                msg: FromCoordinator::Replace {
                    generation: 2,
                    rank: 1,
                    world: 3,
                    servers: vec!["s0:1".into(), "s1:1".into()],
                },
            }]
        );
        // No rank is vacant now: another joiner is refused.
        let cmds = c.on_event(700, join(21, "more:1"));
        assert!(
            matches!(&cmds[0], Command::Send { conn: 21, msg: FromCoordinator::Abort { reason, .. } } if reason.contains("no rank is vacant")),
            "{cmds:?}"
        );
        // The replacement finishing rank 1's work ends the job.
        let cmds = c.on_event(900, finished(20));
        assert!(cmds.contains(&Command::Exit(Outcome::Finished)), "{cmds:?}");
    }

    #[test]
    fn a_joiner_asking_for_a_rank_gets_that_vacant_rank_or_is_refused() {
        let mut c = elastic_ps(3);
        c.on_event(100, Event::Disconnected { conn: 10 });
        c.on_event(100, Event::Disconnected { conn: 12 });
        let ask = |conn: ConnId, rank: u32| Event::Message {
            conn,
            msg: ToCoordinator::Join {
                role: Role::Worker,
                rank: Some(rank),
                data_addr: "x:1".into(),
                pid: 7,
            },
        };
        let cmds = c.on_event(200, ask(20, 1));
        assert!(
            matches!(&cmds[0], Command::Send { msg: FromCoordinator::Abort { reason, .. }, .. } if reason.contains("rank 1 is not vacant")),
            "{cmds:?}"
        );
        let cmds = c.on_event(200, ask(21, 2));
        assert!(
            matches!(
                &cmds[0],
                Command::Send {
                    conn: 21,
                    msg: FromCoordinator::Replace { rank: 2, .. }
                }
            ),
            "{cmds:?}"
        );
        let cmds = c.on_event(200, join(22, "y:1"));
        assert!(
            matches!(
                &cmds[0],
                Command::Send {
                    conn: 22,
                    msg: FromCoordinator::Replace { rank: 0, .. }
                }
            ),
            "{cmds:?}"
        );
    }

    #[test]
    fn a_rank_vacant_past_the_deadline_fails_the_job_naming_it() {
        let mut c = elastic_ps(2);
        c.on_event(100, Event::Disconnected { conn: 11 });
        // Heartbeats keep the others alive; the deadline is 2000 ms after the loss.
        for t in [900, 1800] {
            for conn in [10, 50, 51] {
                c.on_event(
                    t,
                    Event::Message {
                        conn,
                        msg: ToCoordinator::Heartbeat { step: 3 },
                    },
                );
            }
        }
        assert!(c.on_event(2000, Event::Tick).is_empty());
        let cmds = c.on_event(2100, Event::Tick);
        let Some(Command::Exit(Outcome::Failed { rank, reason })) = cmds.last() else {
            panic!("{cmds:?}")
        };
        assert_eq!(*rank, Some(1));
        assert!(reason.contains("rank 1") && reason.contains("2000 ms"), "{reason}");
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

    /// (connection, rank, world, peers) of each regroup sent.
    fn regroups(cmds: &[Command]) -> Vec<(ConnId, u32, u32, Vec<String>)> {
        cmds.iter()
            .filter_map(|c| match c {
                Command::Send {
                    conn,
                    msg: FromCoordinator::Regroup { rank, world, peers, .. },
                } => Some((*conn, *rank, *world, peers.clone())),
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
        assert_eq!(r[0], (10, 0, 3, peers.clone()));
        assert_eq!(r[2], (13, 2, 3, peers));
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
        assert_eq!(r[2].3, vec!["w0:1".to_string(), "w1:1".into(), "new:1".into()]);
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
