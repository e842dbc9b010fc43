//! Registrations held for local processes, persisted in `STATE/registrations.json` so that a
//! restarted agent still withdraws them when their processes exit, and still delivers removals
//! it could not send before.
//!
//! A process is identified by its pid and its start time (`/proc/PID/stat` field 22), so a
//! reused pid is not mistaken for the process that registered. Each registration also records
//! the owner's network namespace and scope (its pod, or its workload, or its uid and cgroup):
//! only the same owner may replace or remove it, and quotas count per scope.
//!
//! The file is written by one thread of its own ([`Persister`]), never on the async workers: a
//! change only marks the registrations dirty, and the thread rewrites the file (temporary file,
//! fsync, rename, fsync of the directory) at most once per [`PERSIST_INTERVAL`], so a burst of
//! registrations costs a few writes, not one per change. A crash loses at most the changes of
//! the last interval; the file on disk is always a complete earlier version.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use stackroute_proto::v1alpha1::{Listener, ListenerKey, Workload, WorkloadKey};
use tracing::warn;

use crate::files;

/// File name in the state directory.
pub const REGISTRATIONS_FILE: &str = "registrations.json";
const REGISTRATIONS_TMP_FILE: &str = ".registrations.tmp";

/// Shortest time between two writes of the registrations file.
pub const PERSIST_INTERVAL: Duration = Duration::from_millis(200);

/// The registering process: pid and start time; `pid` 0 when it is not visible to the agent
/// (such registrations are kept until removed explicitly).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// Pid in the agent's pid namespace.
    pub pid: i32,
    /// Start time in clock ticks after boot.
    pub start: u64,
    /// Inode of the owner's network namespace (0: unknown, as in files of older agents).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub netns: u64,
    /// Whom the registration counts against (quotas) and who may replace it besides the
    /// owner process: `pod UID`, `workload NAMESPACE/NAME`, or `uid … netns … cgroup …`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub scope: String,
    /// For a listener registered with the unspecified address, that address (`0.0.0.0` or
    /// `::`): the entry was derived from it and its removal removes the entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wildcard: Option<IpAddr>,
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

impl Owner {
    /// The owner record of a live process `pid` (start time 0 if it cannot be read).
    pub fn of(pid: Option<i32>) -> Self {
        match pid.filter(|pid| *pid > 0) {
            Some(pid) => Self {
                pid,
                start: start_time(pid).unwrap_or(0),
                ..Self::default()
            },
            None => Self::default(),
        }
    }

    /// Whether the process still runs (always true for an unknown pid).
    pub fn alive(&self) -> bool {
        self.pid <= 0
            || start_time(self.pid).is_some_and(|start| self.start == 0 || start == self.start)
    }

    /// Whether `other` is the same process.
    pub fn same_process(&self, other: &Self) -> bool {
        self.pid > 0 && self.pid == other.pid && self.start == other.start
    }

    /// Whether `caller` may replace or remove what this owner registered: the same process,
    /// or the same scope in the same network namespace, or anyone once this owner has exited.
    pub fn yields_to(&self, caller: &Self) -> bool {
        self.same_process(caller)
            || (self.netns == caller.netns && self.scope == caller.scope)
            || !self.alive()
    }
}

/// Field 22 of `/proc/PID/stat`.
pub fn start_time(pid: i32) -> Option<u64> {
    parse_start_time(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Field 22 (`starttime`) of a `/proc/PID/stat` line; the command name (field 2) may contain
/// spaces and parentheses, so fields are counted after its last `)`.
pub fn parse_start_time(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// A registration and the process that made it.
#[derive(Clone, Debug)]
pub struct Held<T> {
    /// What was registered.
    pub value: T,
    /// Who registered it.
    pub owner: Owner,
}

/// A withdrawal the controller has not received yet.
#[derive(Clone, Debug, PartialEq)]
pub enum Removal {
    /// `RemoveListener`.
    Listener(ListenerKey),
    /// `RemoveWorkload`.
    Workload(WorkloadKey),
}

/// Listener key: (ip, port, protocol number).
pub type ListenerId = (String, u32, i32);
/// Workload key: (namespace, name).
pub type WorkloadId = (String, String);

/// Registrations held for local processes.
#[derive(Debug, Default)]
pub struct Registrations {
    /// Listeners by address.
    pub listeners: BTreeMap<ListenerId, Held<Listener>>,
    /// Workloads by name.
    pub workloads: BTreeMap<WorkloadId, Held<Workload>>,
    /// Withdrawals not yet delivered, sent on the next connection.
    pub removals: Vec<Removal>,
}

// === the file ===

/// A listener as stored in the registrations file and sent in a hand-over.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ListenerRecord {
    owner: Owner,
    node: String,
    ip: String,
    port: u32,
    protocol: i32,
    namespace: String,
    workload: String,
    stacks: Vec<i32>,
    endpoints: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct WorkloadRecord {
    owner: Owner,
    node: String,
    namespace: String,
    name: String,
    labels: BTreeMap<String, String>,
    ips: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
enum RemovalRecord {
    Listener {
        node: String,
        ip: String,
        port: u32,
        protocol: i32,
    },
    Workload {
        node: String,
        namespace: String,
        name: String,
    },
}

/// The registrations in their serialised form: the registrations file, and the hand-over.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RegistrationRecords {
    listeners: Vec<ListenerRecord>,
    workloads: Vec<WorkloadRecord>,
    removals: Vec<RemovalRecord>,
}

impl ListenerRecord {
    /// The record of `listener` registered by `owner`; `None` without a key.
    pub fn of(listener: &Listener, owner: Owner) -> Option<Self> {
        let key = listener.key.as_ref()?;
        Some(Self {
            owner,
            node: key.node.clone(),
            ip: key.ip.clone(),
            port: key.port,
            protocol: key.protocol,
            namespace: listener.namespace.clone(),
            workload: listener.workload.clone(),
            stacks: listener.stacks.clone(),
            endpoints: listener
                .endpoints
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        })
    }

    /// The listener and its owner.
    pub fn into_listener(self) -> (Listener, Owner) {
        let listener = Listener {
            key: Some(ListenerKey {
                node: self.node,
                ip: self.ip,
                port: self.port,
                protocol: self.protocol,
            }),
            namespace: self.namespace,
            workload: self.workload,
            stacks: self.stacks,
            endpoints: self.endpoints.into_iter().collect(),
        };
        (listener, self.owner)
    }
}

impl RegistrationRecords {
    /// Writes the records to the state directory (atomically: a temporary file, fsync,
    /// rename, fsync of the directory). Blocking: called from the [`Persister`] thread.
    pub fn save(&self, state_dir: &Path) {
        let result = serde_json::to_vec(self)
            .map_err(std::io::Error::other)
            .and_then(|bytes| {
                files::replace_atomically(
                    state_dir,
                    REGISTRATIONS_TMP_FILE,
                    REGISTRATIONS_FILE,
                    0o600,
                    &[&bytes],
                )
            });
        if let Err(error) = result {
            warn!(%error, dir = %state_dir.display(), "cannot persist the registrations");
        }
    }
}

impl Registrations {
    /// Writes the registrations to the state directory (atomically), on the calling thread.
    pub fn save(&self, state_dir: &Path) {
        self.records().save(state_dir);
    }

    /// The registrations in their serialised form.
    pub fn records(&self) -> RegistrationRecords {
        RegistrationRecords {
            listeners: self
                .listeners
                .values()
                .filter_map(|held| ListenerRecord::of(&held.value, held.owner.clone()))
                .collect(),
            workloads: self
                .workloads
                .values()
                .filter_map(|held| {
                    let w = &held.value;
                    let key = w.key.as_ref()?;
                    Some(WorkloadRecord {
                        owner: held.owner.clone(),
                        node: key.node.clone(),
                        namespace: key.namespace.clone(),
                        name: key.name.clone(),
                        labels: w
                            .labels
                            .iter()
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect(),
                        ips: w.ips.clone(),
                    })
                })
                .collect(),
            removals: self
                .removals
                .iter()
                .map(|removal| match removal.clone() {
                    Removal::Listener(k) => RemovalRecord::Listener {
                        node: k.node,
                        ip: k.ip,
                        port: k.port,
                        protocol: k.protocol,
                    },
                    Removal::Workload(k) => RemovalRecord::Workload {
                        node: k.node,
                        namespace: k.namespace,
                        name: k.name,
                    },
                })
                .collect(),
        }
    }

    /// Loads the registrations persisted by an earlier agent. Those whose process has exited
    /// become removals; an unreadable file is logged and ignored.
    pub fn load(state_dir: &Path) -> Self {
        let path = state_dir.join(REGISTRATIONS_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(file) => Self::from_records(file),
                Err(error) => {
                    warn!(path = %path.display(), %error, "ignoring unreadable registrations");
                    Self::default()
                }
            },
            Err(_) => Self::default(),
        }
    }

    /// Registrations from their serialised form. Those whose process has exited become
    /// removals.
    pub fn from_records(file: RegistrationRecords) -> Self {
        let mut registrations = Self::default();
        for record in file.listeners {
            let (value, owner) = record.into_listener();
            let Some(key) = value.key.clone() else {
                continue;
            };
            if !owner.alive() {
                registrations.removals.push(Removal::Listener(key));
                continue;
            }
            let id = (key.ip, key.port, key.protocol);
            registrations.listeners.insert(id, Held { value, owner });
        }
        for r in file.workloads {
            let key = WorkloadKey {
                node: r.node,
                namespace: r.namespace,
                name: r.name,
            };
            if !r.owner.alive() {
                registrations.removals.push(Removal::Workload(key));
                continue;
            }
            let id = (key.namespace.clone(), key.name.clone());
            let value = Workload {
                key: Some(key),
                labels: r.labels.into_iter().collect(),
                ips: r.ips,
            };
            registrations.workloads.insert(
                id,
                Held {
                    value,
                    owner: r.owner,
                },
            );
        }
        registrations
            .removals
            .extend(file.removals.into_iter().map(|r| match r {
                RemovalRecord::Listener {
                    node,
                    ip,
                    port,
                    protocol,
                } => Removal::Listener(ListenerKey {
                    node,
                    ip,
                    port,
                    protocol,
                }),
                RemovalRecord::Workload {
                    node,
                    namespace,
                    name,
                } => Removal::Workload(WorkloadKey {
                    node,
                    namespace,
                    name,
                }),
            }));
        registrations
    }
}

// === the writer ===

/// What the [`Persister`] thread should do with a pending change.
#[derive(Debug)]
pub enum Persist {
    /// Write these records.
    Write(RegistrationRecords),
    /// Not now (a hand-over is in progress): ask again after an interval.
    Later,
    /// Never (another agent serves the state directory now): drop the change.
    Never,
}

enum Message {
    Changed,
    Flush(mpsc::Sender<()>),
}

/// The thread that writes the registrations file: [`Persister::changed`] never blocks; the
/// thread asks its source for the records and writes them at most once per
/// [`PERSIST_INTERVAL`] (the first change after a quiet interval at once).
#[derive(Debug)]
pub struct Persister {
    sender: Mutex<mpsc::Sender<Message>>,
    receiver: Mutex<Option<mpsc::Receiver<Message>>>,
}

impl Default for Persister {
    fn default() -> Self {
        let (sender, receiver) = mpsc::channel();
        Self {
            sender: Mutex::new(sender),
            receiver: Mutex::new(Some(receiver)),
        }
    }
}

impl Persister {
    /// Starts the writer thread (once; later calls do nothing): `source` says what to write
    /// into `state_dir` when there are changes. Changes announced before are written first.
    pub fn start<F>(&self, state_dir: PathBuf, source: F)
    where
        F: FnMut() -> Persist + Send + 'static,
    {
        let Some(receiver) = self
            .receiver
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        else {
            return;
        };
        let spawned = std::thread::Builder::new()
            .name("registrations-writer".into())
            .spawn(move || write_loop(&receiver, &state_dir, source));
        if let Err(error) = spawned {
            warn!(%error, "cannot start the registrations writer; registrations are not persisted");
        }
    }

    /// Announces a change (never blocks).
    pub fn changed(&self) {
        let _ = self
            .sender
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .send(Message::Changed);
    }

    /// Writes pending changes now and waits (up to `timeout`) until they are on disk; false if
    /// the writer did not confirm in time (or was never started).
    pub fn flush(&self, timeout: Duration) -> bool {
        let (ack, done) = mpsc::channel();
        let sent = self
            .sender
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .send(Message::Flush(ack));
        sent.is_ok() && done.recv_timeout(timeout).is_ok()
    }
}

fn write_loop(
    receiver: &mpsc::Receiver<Message>,
    state_dir: &Path,
    mut source: impl FnMut() -> Persist,
) {
    let mut dirty = false;
    let mut last_write: Option<Instant> = None;
    let mut acks = Vec::new();
    loop {
        let message = if dirty {
            let wait = last_write.map_or(Duration::ZERO, |last| {
                (last + PERSIST_INTERVAL).saturating_duration_since(Instant::now())
            });
            match receiver.recv_timeout(wait) {
                Ok(message) => Some(message),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    if let Persist::Write(records) = source() {
                        records.save(state_dir);
                    }
                    return;
                }
            }
        } else {
            match receiver.recv() {
                Ok(message) => Some(message),
                Err(_) => return,
            }
        };
        match message {
            Some(Message::Changed) => {
                dirty = true;
                continue;
            }
            Some(Message::Flush(ack)) => acks.push(ack),
            None => {}
        }
        if dirty {
            match source() {
                Persist::Write(records) => {
                    records.save(state_dir);
                    dirty = false;
                }
                Persist::Later => {}
                Persist::Never => dirty = false,
            }
            last_write = Some(Instant::now());
        }
        for ack in acks.drain(..) {
            let _ = ack.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_is_field_22_even_with_odd_command_names() {
        let stat = "1234 (we ird) (name) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_start_time(stat), Some(987654));
        assert_eq!(parse_start_time("garbage"), None);
        let me = std::process::id() as i32;
        let owner = Owner::of(Some(me));
        assert!(owner.start > 0 && owner.alive());
        assert!(
            !Owner {
                pid: me,
                start: owner.start + 1,
                ..Owner::default()
            }
            .alive(),
            "a reused pid"
        );
        assert!(
            !Owner {
                pid: i32::MAX,
                start: 1,
                ..Owner::default()
            }
            .alive()
        );
        assert!(Owner::of(None).alive());
    }

    #[test]
    fn registrations_survive_a_restart_and_dead_owners_become_removals() {
        let dir = tempfile::tempdir().unwrap();
        let me = Owner::of(Some(std::process::id() as i32));
        let gone = Owner {
            pid: i32::MAX,
            start: 5,
            ..Owner::default()
        };
        let listener = |port| Listener {
            key: Some(ListenerKey {
                node: "n1".into(),
                ip: "127.0.0.1".into(),
                port,
                protocol: 6,
            }),
            namespace: "shop".into(),
            workload: "web".into(),
            stacks: vec![1, 3],
            endpoints: [("RDMA".to_string(), "gid".to_string())].into(),
        };
        let workload = |name: &str| Workload {
            key: Some(WorkloadKey {
                node: "n1".into(),
                namespace: "shop".into(),
                name: name.into(),
            }),
            labels: [("app".to_string(), "web".to_string())].into(),
            ips: vec![],
        };
        let mut held = Registrations::default();
        held.listeners.insert(
            ("127.0.0.1".into(), 80, 6),
            Held {
                value: listener(80),
                owner: me.clone(),
            },
        );
        held.listeners.insert(
            ("127.0.0.1".into(), 81, 6),
            Held {
                value: listener(81),
                owner: gone.clone(),
            },
        );
        held.workloads.insert(
            ("shop".into(), "a".into()),
            Held {
                value: workload("a"),
                owner: Owner {
                    netns: 4026531840,
                    scope: "workload shop/a".into(),
                    ..me.clone()
                },
            },
        );
        held.workloads.insert(
            ("shop".into(), "b".into()),
            Held {
                value: workload("b"),
                owner: gone,
            },
        );
        held.removals.push(Removal::Workload(WorkloadKey {
            node: "n1".into(),
            namespace: "shop".into(),
            name: "old".into(),
        }));
        held.save(dir.path());

        let loaded = Registrations::load(dir.path());
        assert_eq!(loaded.listeners.len(), 1);
        let kept = &loaded.listeners[&("127.0.0.1".to_string(), 80, 6)];
        assert_eq!(kept.value, listener(80));
        assert_eq!(kept.owner, me);
        assert_eq!(loaded.workloads.len(), 1);
        let a = &loaded.workloads[&("shop".to_string(), "a".to_string())];
        assert_eq!(a.value, workload("a"));
        assert_eq!(
            (a.owner.netns, a.owner.scope.as_str()),
            (4026531840, "workload shop/a")
        );
        assert_eq!(loaded.removals.len(), 3);
        assert!(
            loaded
                .removals
                .contains(&Removal::Listener(listener(81).key.unwrap()))
        );
        assert!(
            loaded
                .removals
                .contains(&Removal::Workload(workload("b").key.unwrap()))
        );

        std::fs::write(dir.path().join(REGISTRATIONS_FILE), b"{not json").unwrap();
        let empty = Registrations::load(dir.path());
        assert!(empty.listeners.is_empty() && empty.removals.is_empty());
    }

    #[test]
    fn the_writer_coalesces_bursts_and_flushes_on_demand() {
        let dir = tempfile::tempdir().unwrap();
        let writes = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let persister = Persister::default();
        // A change announced before the thread starts is written once it does.
        persister.changed();
        let counter = writes.clone();
        let port = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(1));
        let source_port = port.clone();
        persister.start(dir.path().to_path_buf(), move || {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut held = Registrations::default();
            let port = source_port.load(std::sync::atomic::Ordering::SeqCst);
            held.removals.push(Removal::Listener(ListenerKey {
                node: "n1".into(),
                ip: "127.0.0.1".into(),
                port,
                protocol: 6,
            }));
            Persist::Write(held.records())
        });
        assert!(persister.flush(Duration::from_secs(5)));
        assert_eq!(writes.load(std::sync::atomic::Ordering::SeqCst), 1);
        // A burst of 1000 changes: a handful of writes, not 1000, and the last one wins.
        let started = Instant::now();
        for i in 0..1000 {
            port.store(i + 2, std::sync::atomic::Ordering::SeqCst);
            persister.changed();
        }
        assert!(
            started.elapsed() < Duration::from_millis(100),
            "changed() never blocks"
        );
        assert!(persister.flush(Duration::from_secs(5)));
        let after_burst = writes.load(std::sync::atomic::Ordering::SeqCst);
        assert!((2..=4).contains(&after_burst), "{after_burst} writes");
        let loaded = Registrations::load(dir.path());
        assert_eq!(
            loaded.removals,
            [Removal::Listener(ListenerKey {
                node: "n1".into(),
                ip: "127.0.0.1".into(),
                port: 1001,
                protocol: 6,
            })]
        );
        // Nothing pending: a flush writes nothing.
        assert!(persister.flush(Duration::from_secs(5)));
        assert_eq!(
            writes.load(std::sync::atomic::Ordering::SeqCst),
            after_burst
        );
    }

    #[test]
    fn owners_yield_to_themselves_their_scope_and_after_exiting() {
        let me = Owner {
            netns: 7,
            scope: "pod a".into(),
            ..Owner::of(Some(std::process::id() as i32))
        };
        let same_pod = Owner {
            pid: 1,
            start: 1,
            ..me.clone()
        };
        let other_pod = Owner {
            scope: "pod b".into(),
            netns: 8,
            ..same_pod.clone()
        };
        assert!(me.yields_to(&me) && me.yields_to(&same_pod));
        assert!(!me.yields_to(&other_pod));
        let gone = Owner {
            pid: i32::MAX,
            start: 3,
            ..me.clone()
        };
        assert!(gone.yields_to(&other_pod));
    }
}
