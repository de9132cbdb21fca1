//! The coordinator engine: rendezvous, rank assignment, the membership
//! generation, heartbeats, failure detection and the job's end. It does no
//! IO: the runtime (`node`) feeds it [`Event`]s with the current time and
//! carries out the [`Command`]s it returns.
//!
//! **Invariant:** once running, the job ends in exactly one [`Outcome`]: all
//! workers finished, or the first failure seen (which names the rank).

use std::collections::BTreeMap;

use wire::msg::{FromCoordinator, Role, ToCoordinator};

mod elastic;
mod servers;

pub use elastic::Elastic;
pub use servers::ShardView;

/// The runtime's handle for one connection.
pub type ConnId = u64;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Worker processes.
    pub world: u32,
    /// Parameter-server shards (0: all-reduce jobs have none).
    pub servers: u32,
    /// A worker not heard from for this long is declared dead.
    pub heartbeat_timeout_ms: u64,
    /// All workers must have joined within this long of the first event.
    pub rendezvous_timeout_ms: u64,
    /// `Some`: a lost worker opens a new generation of the survivors instead
    /// of failing the job, and workers may join a running job.
    pub elastic: Option<Elastic>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A message arrived on an authenticated connection.
    Message { conn: ConnId, msg: ToCoordinator },
    /// The connection closed or broke.
    Disconnected { conn: ConnId },
    /// Time passed (the runtime ticks a few times per heartbeat timeout).
    Tick,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    Send {
        conn: ConnId,
        msg: FromCoordinator,
    },
    Close {
        conn: ConnId,
    },
    /// The job is over; the runtime exits with this outcome.
    Exit(Outcome),
    /// Replicated servers: who serves a shard now (for the runtime to report).
    Shard(ShardView),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Finished,
    Failed { rank: Option<u32>, reason: String },
}

#[derive(Clone, Debug)]
struct Member {
    role: Role,
    rank: Option<u32>,
    data_addr: String,
    pid: u32,
    last_heard_ms: u64,
    finished: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Rendezvous,
    Running,
    Over,
}

pub struct Coordinator {
    cfg: Config,
    phase: Phase,
    generation: u64,
    members: BTreeMap<ConnId, Member>,
    started_ms: Option<u64>,
    /// Parameter checksums reported at each epoch end, by rank.
    checksums: BTreeMap<u32, BTreeMap<u32, u64>>,
    /// Elastic jobs: when the next generation opens (a worker was lost or
    /// joined; the wait lets the other news of the same event arrive).
    regroup_due_ms: Option<u64>,
    /// Parameter-server replicas: who is primary and backup of each shard.
    replicas: servers::Replicas,
    /// Elastic parameter-server jobs: ranks whose worker was lost, with the
    /// time by which a replacement must have joined and how the worker was lost.
    vacant: BTreeMap<u32, (u64, String)>,
}

impl Coordinator {
    pub fn new(cfg: Config) -> Self {
        assert!(cfg.world > 0, "a job needs at least one worker");
        assert!(cfg.servers <= wire::msg::PEERS_MAX as u32, "too many servers");
        Self {
            cfg,
            phase: Phase::Rendezvous,
            generation: 0,
            members: BTreeMap::new(),
            started_ms: None,
            checksums: BTreeMap::new(),
            regroup_due_ms: None,
            replicas: servers::Replicas::new(1),
            vacant: BTreeMap::new(),
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// A restarted coordinator: numbers its generations after `generation`, the
    /// last one its predecessor opened (kept in the job's checkpoint), so that
    /// a process of the old membership is never taken for a new one.
    pub fn continue_after(&mut self, generation: u64) {
        if self.phase == Phase::Rendezvous {
            self.generation = self.generation.max(generation);
        }
    }

    pub fn is_over(&self) -> bool {
        self.phase == Phase::Over
    }

    /// Handles one event at time `now_ms` (any monotonic clock in milliseconds).
    pub fn on_event(&mut self, now_ms: u64, event: Event) -> Vec<Command> {
        if self.phase == Phase::Over {
            return Vec::new();
        }
        let started = *self.started_ms.get_or_insert(now_ms);
        match event {
            Event::Message { conn, msg } => self.on_message(now_ms, conn, msg),
            Event::Disconnected { conn } => self.on_disconnect(now_ms, conn),
            Event::Tick => self.on_tick(now_ms, started),
        }
    }

    fn on_message(&mut self, now_ms: u64, conn: ConnId, msg: ToCoordinator) -> Vec<Command> {
        if let Err(why) = msg.check() {
            return vec![Command::Close { conn }]
                .into_iter()
                .chain(self.reject_note(conn, &why))
                .collect();
        }
        if let Some(m) = self.members.get_mut(&conn) {
            m.last_heard_ms = now_ms;
        }
        match msg {
            ToCoordinator::Join {
                role,
                rank,
                data_addr,
                pid,
            } => self.on_join(now_ms, conn, role, rank, data_addr, pid),
            ToCoordinator::Heartbeat { .. } => Vec::new(),
            ToCoordinator::EpochDone { epoch, checksum } => self.on_epoch_done(conn, epoch, checksum),
            ToCoordinator::Finished { .. } => {
                if let Some(m) = self.members.get_mut(&conn) {
                    m.finished = true;
                }
                // Joiners still waiting for a generation have no work to finish;
                // a vacant parameter-server rank has (its replacement will do it).
                let workers_done = self.vacant.is_empty()
                    && self
                        .members
                        .values()
                        .filter(|m| m.role == Role::Worker && m.rank.is_some())
                        .all(|m| m.finished);
                if self.phase == Phase::Running && workers_done {
                    self.phase = Phase::Over;
                    let mut cmds: Vec<Command> = self
                        .members
                        .keys()
                        .map(|&c| Command::Send {
                            conn: c,
                            msg: FromCoordinator::Shutdown,
                        })
                        .collect();
                    cmds.push(Command::Exit(Outcome::Finished));
                    return cmds;
                }
                Vec::new()
            }
            ToCoordinator::PeerLost { generation, rank, step } => {
                self.on_peer_lost(now_ms, conn, generation, rank, step)
            }
            ToCoordinator::BackupReady { shard } => self.on_backup_ready(conn, shard),
            ToCoordinator::Failed { reason } => match self.members.get(&conn) {
                Some(m) => {
                    let (rank, who) = (m.worker_rank(), m.who());
                    self.fail(rank, format!("{who} failed: {reason}"))
                }
                None => Vec::new(),
            },
        }
    }

    /// A message that breaks the protocol from a connection that is not a member yet
    /// is dropped; from a member it fails the job.
    fn reject_note(&mut self, conn: ConnId, why: &str) -> Vec<Command> {
        match self.members.get(&conn) {
            Some(m) => {
                let (rank, who) = (m.worker_rank(), m.who());
                self.fail(rank, format!("{who} sent a malformed message: {why}"))
            }
            None => Vec::new(),
        }
    }

    fn on_join(
        &mut self,
        now_ms: u64,
        conn: ConnId,
        role: Role,
        rank: Option<u32>,
        data_addr: String,
        pid: u32,
    ) -> Vec<Command> {
        if role == Role::Worker && self.phase == Phase::Running && self.cfg.elastic.is_some() {
            if self.cfg.servers > 0 {
                return self.on_replacement_join(now_ms, conn, rank, data_addr, pid);
            }
            return self.on_late_join(now_ms, conn, data_addr, pid);
        }
        if role == Role::Server && self.phase == Phase::Running && self.replicated() {
            return self.on_server_join(now_ms, conn, data_addr, pid);
        }
        let wanted = match role {
            Role::Worker => self.cfg.world,
            Role::Server => self.server_processes(),
            _ => 0,
        };
        if wanted == 0 || self.phase != Phase::Rendezvous || self.members.contains_key(&conn) {
            let reason = format!("unexpected join from a {role:?} (pid {pid}) while {:?}", self.phase);
            return self.refuse(conn, reason);
        }
        if let Some(r) = rank {
            let taken = self.members.values().any(|m| m.role == role && m.rank == Some(r));
            if r >= wanted || taken {
                let why = if taken {
                    "is taken by another worker"
                } else {
                    "is outside the world"
                };
                let (blamed, what) = match role {
                    Role::Worker => (Some(r), "WORLD_SIZE"),
                    _ => (None, "DMLC_NUM_SERVER"),
                };
                return self.fail(
                    blamed,
                    format!("{role:?} pid {pid} asked for rank {r}, which {why} ({what} {wanted})"),
                );
            }
        }
        self.members.insert(
            conn,
            Member {
                role,
                rank,
                data_addr,
                pid,
                last_heard_ms: now_ms,
                finished: false,
            },
        );
        if self.members.len() < (self.cfg.world + self.server_processes()) as usize {
            return Vec::new();
        }
        // Everyone is here: give the unranked the free ranks of their role in order of arrival.
        let mut addrs = |role: Role, n: u32| {
            let taken: Vec<u32> = self
                .members
                .values()
                .filter(|m| m.role == role)
                .filter_map(|m| m.rank)
                .collect();
            let mut free = (0..n).filter(|r| !taken.contains(r));
            let mut addrs = vec![String::new(); n as usize];
            for m in self.members.values_mut().filter(|m| m.role == role) {
                if m.rank.is_none() {
                    m.rank = free.next();
                }
                addrs[m.rank.expect("assigned above") as usize] = m.data_addr.clone();
            }
            addrs
        };
        let peers = addrs(Role::Worker, self.cfg.world);
        let servers = if self.replicas.per_shard > 1 {
            self.assign_shards()
        } else {
            addrs(Role::Server, self.cfg.servers)
        };
        self.generation += 1;
        self.phase = Phase::Running;
        // Members start heartbeats on the welcome; an early joiner's silence while
        // the others were still loading their data is not a failure.
        for m in self.members.values_mut() {
            m.last_heard_ms = now_ms;
        }
        let mut cmds: Vec<Command> = self
            .members
            .iter()
            .map(|(&conn, m)| Command::Send {
                conn,
                msg: FromCoordinator::Welcome {
                    generation: self.generation,
                    rank: m.rank.expect("assigned above"),
                    world: self.cfg.world,
                    peers: peers.clone(),
                    servers: servers.clone(),
                },
            })
            .collect();
        if self.replicated() {
            cmds.extend(self.shard_roles());
        }
        cmds
    }

    fn on_epoch_done(&mut self, conn: ConnId, epoch: u32, checksum: u64) -> Vec<Command> {
        let Some(rank) = self.members.get(&conn).and_then(|m| m.worker_rank()) else {
            return Vec::new();
        };
        let seen = self.checksums.entry(epoch).or_default();
        seen.insert(rank, checksum);
        if seen.len() < self.cfg.world as usize {
            return Vec::new();
        }
        let seen = self.checksums.remove(&epoch).expect("present");
        let first = seen.values().next().copied();
        if let Some((&bad, &sum)) = seen.iter().find(|(_, s)| Some(**s) != first) {
            let detail = format!("rank 0 has {:016x}, rank {bad} has {sum:016x}", first.unwrap_or(0));
            return self.fail(
                Some(bad),
                format!("parameters differ between ranks after epoch {epoch}: {detail}"),
            );
        }
        Vec::new()
    }

    fn on_disconnect(&mut self, now_ms: u64, conn: ConnId) -> Vec<Command> {
        let Some(m) = self.members.get(&conn) else {
            return Vec::new();
        };
        if m.finished {
            return Vec::new();
        }
        let (rank, who, pid) = (m.worker_rank(), m.who(), m.pid);
        if self.phase == Phase::Rendezvous {
            self.members.remove(&conn);
            return Vec::new();
        }
        let why = format!("{who} (pid {pid}) disconnected before finishing");
        if self.elastic_for(conn) {
            return self.on_worker_lost(now_ms, conn, why);
        }
        if self.replicated_server(conn) {
            return self.on_server_lost(conn, why);
        }
        self.members.remove(&conn);
        self.fail(rank, why)
    }

    fn on_tick(&mut self, now_ms: u64, started_ms: u64) -> Vec<Command> {
        match self.phase {
            Phase::Rendezvous if now_ms.saturating_sub(started_ms) > self.cfg.rendezvous_timeout_ms => {
                let count = |role| self.members.values().filter(|m| m.role == role).count();
                let reason = format!(
                    "only {} of {} workers and {} of {} servers joined within {} ms",
                    count(Role::Worker),
                    self.cfg.world,
                    count(Role::Server),
                    self.cfg.servers,
                    self.cfg.rendezvous_timeout_ms
                );
                self.fail(None, reason)
            }
            Phase::Running => {
                let late = self
                    .members
                    .iter()
                    .filter(|(_, m)| !m.finished)
                    .map(|(&conn, m)| (now_ms.saturating_sub(m.last_heard_ms), conn, m))
                    .filter(|(silent, _, _)| *silent > self.cfg.heartbeat_timeout_ms)
                    .max_by_key(|(silent, _, _)| *silent)
                    .map(|(silent, conn, m)| (silent, conn, m.worker_rank(), m.who()));
                match late {
                    Some((silent, conn, _, who)) if self.elastic_for(conn) => {
                        let mut cmds = vec![Command::Close { conn }];
                        cmds.extend(self.on_worker_lost(
                            now_ms,
                            conn,
                            format!("{who} sent no heartbeat for {silent} ms"),
                        ));
                        cmds
                    }
                    Some((silent, conn, _, who)) if self.replicated_server(conn) => {
                        let mut cmds = vec![Command::Close { conn }];
                        cmds.extend(self.on_server_lost(conn, format!("{who} sent no heartbeat for {silent} ms")));
                        cmds
                    }
                    Some((silent, _, rank, who)) => self.fail(rank, format!("{who} sent no heartbeat for {silent} ms")),
                    None if !self.vacant.is_empty() => self.check_vacancies(now_ms),
                    None => self.regroup_if_due(now_ms),
                }
            }
            _ => Vec::new(),
        }
    }

    /// Turns away a connection that may not join: it is told why, then closed.
    fn refuse(&self, conn: ConnId, reason: String) -> Vec<Command> {
        vec![
            Command::Send {
                conn,
                msg: FromCoordinator::Abort {
                    generation: self.generation,
                    reason,
                    failed_rank: None,
                },
            },
            Command::Close { conn },
        ]
    }

    /// Ends the job: tells every member to stop, then exits.
    fn fail(&mut self, rank: Option<u32>, reason: String) -> Vec<Command> {
        self.phase = Phase::Over;
        let mut cmds: Vec<Command> = self
            .members
            .keys()
            .map(|&conn| Command::Send {
                conn,
                msg: FromCoordinator::Abort {
                    generation: self.generation,
                    reason: reason.clone(),
                    failed_rank: rank,
                },
            })
            .collect();
        cmds.push(Command::Exit(Outcome::Failed { rank, reason }));
        cmds
    }
}

fn show(rank: Option<u32>) -> String {
    rank.map_or_else(|| "?".into(), |r| r.to_string())
}

impl Member {
    /// The rank to blame in an [`Outcome`]: workers only (a server is named in the reason).
    fn worker_rank(&self) -> Option<u32> {
        if self.role == Role::Worker { self.rank } else { None }
    }

    /// How errors name this member: `rank 3` for a worker, `server 1` for a shard.
    fn who(&self) -> String {
        match self.role {
            Role::Server => format!("server {}", show(self.rank)),
            _ => format!("rank {}", show(self.rank)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(world: u32) -> Config {
        Config {
            world,
            servers: 0,
            heartbeat_timeout_ms: 1000,
            rendezvous_timeout_ms: 5000,
            elastic: None,
        }
    }

    fn join(rank: Option<u32>, addr: &str) -> Event {
        Event::Message {
            conn: 0,
            msg: ToCoordinator::Join {
                role: Role::Worker,
                rank,
                data_addr: addr.into(),
                pid: 1,
            },
        }
    }

    fn join_on(conn: ConnId, rank: Option<u32>, addr: &str) -> Event {
        match join(rank, addr) {
            Event::Message { msg, .. } => Event::Message { conn, msg },
            e => e,
        }
    }

    fn running_pair() -> Coordinator {
        let mut c = Coordinator::new(cfg(2));
        assert!(c.on_event(0, join_on(10, None, "a:1")).is_empty());
        let cmds = c.on_event(1, join_on(11, Some(0), "b:2"));
        assert_eq!(cmds.len(), 2);
        c
    }

    #[test]
    fn rendezvous_honours_requested_ranks_and_fills_the_rest() {
        let mut c = Coordinator::new(cfg(2));
        assert!(c.on_event(0, join_on(10, None, "a:1")).is_empty());
        let cmds = c.on_event(1, join_on(11, Some(0), "b:2"));
        let peers = vec!["b:2".to_string(), "a:1".to_string()];
        assert_eq!(
            cmds,
            vec![
                Command::Send {
                    conn: 10,
                    msg: FromCoordinator::Welcome {
                        generation: 1,
                        rank: 1,
                        world: 2,
                        peers: peers.clone(),
                        servers: vec![],
                    }
                },
                Command::Send {
                    conn: 11,
                    msg: FromCoordinator::Welcome {
                        generation: 1,
                        rank: 0,
                        world: 2,
                        peers,
                        servers: vec![],
                    }
                },
            ]
        );
    }

    #[test]
    fn a_taken_rank_fails_the_job_naming_it() {
        let mut c = Coordinator::new(cfg(2));
        c.on_event(0, join_on(10, Some(1), "a:1"));
        let cmds = c.on_event(0, join_on(11, Some(1), "b:1"));
        match cmds.last() {
            Some(Command::Exit(Outcome::Failed { rank: Some(1), reason })) => {
                assert!(reason.contains("taken"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn silence_past_the_deadline_names_the_rank() {
        let mut c = running_pair();
        let hb = |conn| Event::Message {
            conn,
            msg: ToCoordinator::Heartbeat { step: 3 },
        };
        assert!(c.on_event(900, hb(11)).is_empty());
        assert!(c.on_event(1000, Event::Tick).is_empty());
        let cmds = c.on_event(1500, Event::Tick);
        assert_eq!(cmds.len(), 3, "{cmds:?}");
        match &cmds[2] {
            Command::Exit(Outcome::Failed { rank: Some(1), reason }) => assert!(reason.contains("rank 1"), "{reason}"),
            other => panic!("{other:?}"),
        }
        assert!(c.is_over());
        assert!(c.on_event(1600, Event::Tick).is_empty(), "nothing after the end");
    }

    #[test]
    fn heartbeat_deadline_starts_when_the_job_starts_not_at_join() {
        let mut c = Coordinator::new(cfg(2));
        c.on_event(0, join_on(10, None, "a:1"));
        // The second worker takes longer than a heartbeat timeout to join.
        c.on_event(3000, join_on(11, None, "b:1"));
        assert!(c.on_event(3500, Event::Tick).is_empty(), "the first joiner is not late");
        assert!(!c.is_over());
    }

    #[test]
    fn disconnect_while_running_fails_and_aborts_the_others() {
        let mut c = running_pair();
        let cmds = c.on_event(5, Event::Disconnected { conn: 11 });
        assert_eq!(
            cmds[0],
            Command::Send {
                conn: 10,
                msg: FromCoordinator::Abort {
                    generation: 1,
                    reason: "rank 0 (pid 1) disconnected before finishing".into(),
                    failed_rank: Some(0)
                }
            }
        );
        assert!(matches!(cmds[1], Command::Exit(Outcome::Failed { rank: Some(0), .. })));
    }

    #[test]
    fn differing_checksums_fail_and_equal_ones_pass() {
        let mut c = running_pair();
        let done = |conn, checksum| Event::Message {
            conn,
            msg: ToCoordinator::EpochDone { epoch: 1, checksum },
        };
        assert!(c.on_event(2, done(10, 7)).is_empty());
        assert!(c.on_event(2, done(11, 7)).is_empty());
        let done2 = |conn, checksum| Event::Message {
            conn,
            msg: ToCoordinator::EpochDone { epoch: 2, checksum },
        };
        c.on_event(3, done2(10, 7));
        let cmds = c.on_event(3, done2(11, 8));
        assert!(
            matches!(cmds.last(), Some(Command::Exit(Outcome::Failed { .. }))),
            "{cmds:?}"
        );
    }

    #[test]
    fn all_finished_shuts_down() {
        let mut c = running_pair();
        let fin = |conn| Event::Message {
            conn,
            msg: ToCoordinator::Finished { steps: 9 },
        };
        assert!(c.on_event(2, fin(10)).is_empty());
        let cmds = c.on_event(2, fin(11));
        assert_eq!(
            cmds,
            vec![
                Command::Send {
                    conn: 10,
                    msg: FromCoordinator::Shutdown
                },
                Command::Send {
                    conn: 11,
                    msg: FromCoordinator::Shutdown
                },
                Command::Exit(Outcome::Finished)
            ]
        );
        assert!(c.on_event(3, Event::Disconnected { conn: 10 }).is_empty());
    }

    #[test]
    fn rendezvous_deadline_says_how_many_joined() {
        let mut c = Coordinator::new(cfg(3));
        c.on_event(0, join_on(1, None, "a:1"));
        assert!(c.on_event(4000, Event::Tick).is_empty());
        match c.on_event(6000, Event::Tick).last() {
            Some(Command::Exit(Outcome::Failed { reason, .. })) => {
                assert!(reason.contains("only 1 of 3 workers"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }
}
