//! Replicated parameter servers (`cluster.replicas = 2`): which server
//! process is the primary and which the backup of each shard, promotion of
//! the backup when a primary dies, and a replacement server (started by the
//! launcher, or by hand) taken in as the new backup.
//!
//! At rendezvous the first `servers` servers to join become the primaries
//! of shards 0, 1, …, the next `servers` their backups; each is welcomed
//! with its shard as rank and told its role ([`FromCoordinator::ServerRole`]);
//! each primary is told where its backup waits ([`FromCoordinator::BuildBackup`]).
//! A backup says [`wire::msg::ToCoordinator::BackupReady`] once it holds its
//! primary's state. When a primary is lost (disconnect or heartbeat), a ready
//! backup is promoted: every worker and the backup get
//! [`FromCoordinator::Promote`]. A server joining a running job becomes the
//! backup of the first shard that has none.
//!
//! **Invariant:** only a backup that said it is ready is promoted; a shard
//! whose primary dies without one fails the job, naming the shard.

use wire::msg::{FromCoordinator, Role};

use super::{Command, ConnId, Coordinator, Member};

/// Who serves one shard.
#[derive(Clone, Debug, Default)]
pub(crate) struct Slot {
    primary: Option<ConnId>,
    backup: Option<ConnId>,
    /// The backup holds the primary's state and applies every update after it.
    backup_ready: bool,
    failovers: u32,
}

/// What the runtime reports when a shard's replicas change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardView {
    pub shard: u32,
    pub primary_pid: Option<u32>,
    pub backup_pid: Option<u32>,
    pub backup_ready: bool,
    /// Promotions so far.
    pub failovers: u32,
}

/// The replicas of every shard.
#[derive(Clone, Debug)]
pub(crate) struct Replicas {
    /// Server processes per shard: 1 (no replication) or 2 (primary and backup).
    pub(crate) per_shard: u32,
    slots: Vec<Slot>,
}

impl Replicas {
    pub(crate) fn new(per_shard: u32) -> Self {
        Self {
            per_shard,
            slots: Vec::new(),
        }
    }
}

impl Coordinator {
    /// Runs `replicas` server processes per shard (1 or 2).
    pub fn with_replicas(mut self, replicas: u32) -> Self {
        assert!((1..=2).contains(&replicas), "replicas must be 1 or 2");
        self.replicas = Replicas::new(replicas);
        self
    }

    pub(crate) fn replicated(&self) -> bool {
        self.replicas.per_shard > 1
    }

    /// The connection of the server that is primary of `shard` now.
    pub(crate) fn primary_of(&self, shard: u32) -> Option<ConnId> {
        self.replicas.slots.get(shard as usize).and_then(|s| s.primary)
    }

    /// Server processes the job starts with.
    pub(crate) fn server_processes(&self) -> u32 {
        self.cfg.servers * self.replicas.per_shard
    }

    /// Whether `conn`'s loss is survivable: a replicated job and a server.
    pub(crate) fn replicated_server(&self, conn: ConnId) -> bool {
        self.replicated() && self.members.get(&conn).is_some_and(|m| m.role == Role::Server)
    }

    /// Everyone has joined: the first `servers` servers (by arrival) are the
    /// primaries, the next their backups. Returns the primaries' addresses.
    pub(crate) fn assign_shards(&mut self) -> Vec<String> {
        let n = self.cfg.servers as usize;
        self.replicas.slots = vec![Slot::default(); n];
        let mut addrs = vec![String::new(); n];
        let servers: Vec<ConnId> = self
            .members
            .iter()
            .filter(|(_, m)| m.role == Role::Server)
            .map(|(c, _)| *c)
            .collect();
        for (i, conn) in servers.into_iter().enumerate() {
            let shard = i % n;
            let m = self.members.get_mut(&conn).expect("listed above");
            m.rank = Some(shard as u32);
            let slot = &mut self.replicas.slots[shard];
            if i < n {
                slot.primary = Some(conn);
                addrs[shard] = m.data_addr.clone();
            } else {
                slot.backup = Some(conn);
            }
        }
        addrs
    }

    /// After the welcomes: every server's role, and each primary's backup to build.
    pub(crate) fn shard_roles(&self) -> Vec<Command> {
        let mut cmds = Vec::new();
        for (shard, slot) in self.replicas.slots.iter().enumerate() {
            let shard = shard as u32;
            for (conn, primary) in [(slot.primary, true), (slot.backup, false)] {
                if let Some(conn) = conn {
                    cmds.push(Command::Send {
                        conn,
                        msg: FromCoordinator::ServerRole { shard, primary },
                    });
                }
            }
            cmds.extend(self.build_backup(shard));
            cmds.push(self.view(shard));
        }
        cmds
    }

    /// Tells the primary of `shard` where its new backup waits.
    fn build_backup(&self, shard: u32) -> Option<Command> {
        let slot = &self.replicas.slots[shard as usize];
        let (primary, backup) = (slot.primary?, slot.backup?);
        Some(Command::Send {
            conn: primary,
            msg: FromCoordinator::BuildBackup {
                shard,
                addr: self.members.get(&backup)?.data_addr.clone(),
            },
        })
    }

    fn view(&self, shard: u32) -> Command {
        let slot = &self.replicas.slots[shard as usize];
        let pid = |c: Option<ConnId>| c.and_then(|c| self.members.get(&c)).map(|m| m.pid);
        Command::Shard(ShardView {
            shard,
            primary_pid: pid(slot.primary),
            backup_pid: pid(slot.backup),
            backup_ready: slot.backup_ready,
            failovers: slot.failovers,
        })
    }

    /// A server joins a running job: it becomes the backup of the first shard without one.
    pub(crate) fn on_server_join(&mut self, now_ms: u64, conn: ConnId, data_addr: String, pid: u32) -> Vec<Command> {
        let vacant = self
            .replicas
            .slots
            .iter()
            .position(|s| s.primary.is_some() && s.backup.is_none());
        let Some(shard) = vacant.filter(|_| !self.members.contains_key(&conn)) else {
            return vec![
                Command::Send {
                    conn,
                    msg: FromCoordinator::Abort {
                        generation: self.generation,
                        reason: format!("no shard needs a backup (server pid {pid} refused)"),
                        failed_rank: None,
                    },
                },
                Command::Close { conn },
            ];
        };
        self.members.insert(
            conn,
            Member {
                role: Role::Server,
                rank: Some(shard as u32),
                data_addr,
                pid,
                last_heard_ms: now_ms,
                finished: false,
            },
        );
        let slot = &mut self.replicas.slots[shard];
        slot.backup = Some(conn);
        slot.backup_ready = false;
        let shard = shard as u32;
        let mut peers: Vec<(u32, String)> = self
            .members
            .values()
            .filter(|m| m.role == Role::Worker)
            .filter_map(|m| Some((m.rank?, m.data_addr.clone())))
            .collect();
        peers.sort();
        let servers = self
            .replicas
            .slots
            .iter()
            .map(|s| {
                s.primary
                    .and_then(|c| self.members.get(&c))
                    .map_or_else(String::new, |m| m.data_addr.clone())
            })
            .collect();
        let mut cmds = vec![
            Command::Send {
                conn,
                msg: FromCoordinator::Welcome {
                    generation: self.generation,
                    rank: shard,
                    world: peers.len() as u32,
                    peers: peers.into_iter().map(|(_, a)| a).collect(),
                    servers,
                },
            },
            Command::Send {
                conn,
                msg: FromCoordinator::ServerRole { shard, primary: false },
            },
        ];
        cmds.extend(self.build_backup(shard));
        cmds.push(self.view(shard));
        cmds
    }

    /// A backup holds its primary's state.
    pub(crate) fn on_backup_ready(&mut self, conn: ConnId, shard: u32) -> Vec<Command> {
        match self.replicas.slots.get_mut(shard as usize) {
            Some(slot) if slot.backup == Some(conn) => {
                slot.backup_ready = true;
                vec![self.view(shard)]
            }
            // A backup that was replaced meanwhile: nothing to do.
            _ => Vec::new(),
        }
    }

    /// A server is gone (`why` says how): a lost backup leaves its primary
    /// alone; a lost primary's ready backup is promoted; a shard with neither fails the job.
    pub(crate) fn on_server_lost(&mut self, conn: ConnId, why: String) -> Vec<Command> {
        let Some(lost) = self.members.remove(&conn) else {
            return Vec::new();
        };
        let Some(shard) = self
            .replicas
            .slots
            .iter()
            .position(|s| s.primary == Some(conn) || s.backup == Some(conn))
        else {
            return Vec::new();
        };
        let slot = &mut self.replicas.slots[shard];
        let shard = shard as u32;
        if slot.backup == Some(conn) {
            slot.backup = None;
            slot.backup_ready = false;
            return vec![self.view(shard)];
        }
        slot.primary = None;
        let backup = slot.backup.take().filter(|_| slot.backup_ready);
        slot.backup_ready = false;
        let Some(new) = backup.and_then(|c| Some((c, self.members.get(&c)?.data_addr.clone()))) else {
            let reason = format!(
                "shard {shard} is lost: its primary, server pid {}, {why}, and it had no backup in sync",
                lost.pid
            );
            return self.fail(None, reason);
        };
        let (conn, addr) = new;
        let slot = &mut self.replicas.slots[shard as usize];
        slot.primary = Some(conn);
        slot.failovers += 1;
        let promote = FromCoordinator::Promote { shard, addr };
        let mut cmds: Vec<Command> = self
            .members
            .iter()
            .filter(|(c, m)| m.role == Role::Worker || **c == conn)
            .map(|(&c, _)| Command::Send {
                conn: c,
                msg: promote.clone(),
            })
            .collect();
        cmds.push(self.view(shard));
        cmds
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Config, Event, Outcome};
    use wire::msg::ToCoordinator;

    fn join(conn: ConnId, role: Role, pid: u32) -> Event {
        Event::Message {
            conn,
            msg: ToCoordinator::Join {
                role,
                rank: None,
                data_addr: format!("h:{conn}"),
                pid,
            },
        }
    }

    fn sends(cmds: &[Command], conn: ConnId) -> Vec<FromCoordinator> {
        cmds.iter()
            .filter_map(|c| match c {
                Command::Send { conn: to, msg } if *to == conn => Some(msg.clone()),
                _ => None,
            })
            .collect()
    }

    /// One worker (conn 1), two shards: primaries conns 10 and 11, backups 12 and 13.
    fn running() -> (Coordinator, Vec<Command>) {
        let mut c = Coordinator::new(Config {
            world: 1,
            servers: 2,
            heartbeat_timeout_ms: 1000,
            rendezvous_timeout_ms: 5000,
            elastic: None,
        })
        .with_replicas(2);
        assert!(c.on_event(0, join(1, Role::Worker, 100)).is_empty());
        for conn in 10..13 {
            assert!(c.on_event(0, join(conn, Role::Server, conn as u32)).is_empty());
        }
        let cmds = c.on_event(0, join(13, Role::Server, 13));
        (c, cmds)
    }

    fn ready(c: &mut Coordinator, conn: ConnId, shard: u32) -> Vec<Command> {
        c.on_event(
            1,
            Event::Message {
                conn,
                msg: ToCoordinator::BackupReady { shard },
            },
        )
    }

    #[test]
    fn rendezvous_makes_primaries_and_backups() {
        let (_, cmds) = running();
        let servers = vec!["h:10".to_string(), "h:11".to_string()];
        match &sends(&cmds, 1)[..] {
            [FromCoordinator::Welcome { servers: s, .. }] => assert_eq!(s, &servers, "workers see the primaries"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            sends(&cmds, 10)[1..],
            [
                FromCoordinator::ServerRole {
                    shard: 0,
                    primary: true
                },
                FromCoordinator::BuildBackup {
                    shard: 0,
                    addr: "h:12".into()
                }
            ]
        );
        assert!(matches!(sends(&cmds, 13)[0], FromCoordinator::Welcome { rank: 1, .. }));
        assert_eq!(
            sends(&cmds, 13)[1],
            FromCoordinator::ServerRole {
                shard: 1,
                primary: false
            }
        );
    }

    #[test]
    fn a_dead_primary_is_replaced_by_its_ready_backup_and_a_joiner_becomes_the_backup() {
        let (mut c, _) = running();
        assert_eq!(
            ready(&mut c, 12, 0),
            vec![Command::Shard(ShardView {
                shard: 0,
                primary_pid: Some(10),
                backup_pid: Some(12),
                backup_ready: true,
                failovers: 0
            })]
        );
        let cmds = c.on_event(2, Event::Disconnected { conn: 10 });
        let promote = FromCoordinator::Promote {
            shard: 0,
            addr: "h:12".into(),
        };
        assert_eq!(sends(&cmds, 1), vec![promote.clone()], "the worker is told");
        assert_eq!(sends(&cmds, 12), vec![promote], "the backup is told");
        assert!(!c.is_over());
        // A replacement joins the running job: the backup of shard 0.
        let cmds = c.on_event(3, join(20, Role::Server, 20));
        assert!(matches!(sends(&cmds, 20)[0], FromCoordinator::Welcome { rank: 0, .. }));
        assert_eq!(
            sends(&cmds, 20)[1],
            FromCoordinator::ServerRole {
                shard: 0,
                primary: false
            }
        );
        assert_eq!(
            sends(&cmds, 12),
            vec![FromCoordinator::BuildBackup {
                shard: 0,
                addr: "h:20".into()
            }]
        );
        // No vacancy left: another joiner is refused.
        let cmds = c.on_event(4, join(21, Role::Server, 21));
        assert!(matches!(cmds.last(), Some(Command::Close { conn: 21 })), "{cmds:?}");
    }

    #[test]
    fn a_dead_backup_leaves_the_primary_alone() {
        let (mut c, _) = running();
        ready(&mut c, 13, 1);
        let cmds = c.on_event(2, Event::Disconnected { conn: 13 });
        assert!(sends(&cmds, 1).is_empty() && !c.is_over(), "{cmds:?}");
    }

    #[test]
    fn a_primary_without_a_ready_backup_fails_the_job_naming_the_shard() {
        let (mut c, _) = running();
        let cmds = c.on_event(2, Event::Disconnected { conn: 11 });
        match cmds.last() {
            Some(Command::Exit(Outcome::Failed { reason, .. })) => {
                assert!(reason.contains("shard 1 is lost"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn both_replicas_dead_fails_the_job_naming_the_shard() {
        let (mut c, _) = running();
        ready(&mut c, 12, 0);
        c.on_event(2, Event::Disconnected { conn: 12 });
        let cmds = c.on_event(3, Event::Disconnected { conn: 10 });
        match cmds.last() {
            Some(Command::Exit(Outcome::Failed { reason, .. })) => {
                assert!(reason.contains("shard 0 is lost"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_silent_primary_is_promoted_away() {
        let (mut c, _) = running();
        ready(&mut c, 12, 0);
        for conn in [1, 11, 12, 13] {
            c.on_event(
                900,
                Event::Message {
                    conn,
                    msg: ToCoordinator::Heartbeat { step: 1 },
                },
            );
        }
        let cmds = c.on_event(1500, Event::Tick);
        assert!(cmds.contains(&Command::Close { conn: 10 }), "{cmds:?}");
        assert_eq!(
            sends(&cmds, 1),
            vec![FromCoordinator::Promote {
                shard: 0,
                addr: "h:12".into()
            }]
        );
    }
}
