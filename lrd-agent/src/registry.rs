//! Registrations held for local processes, persisted in `STATE/registrations.json` so that a
//! restarted agent still withdraws them when their processes exit, and still delivers removals
//! it could not send before.
//!
//! A process is identified by its pid and its start time (`/proc/PID/stat` field 22), so a
//! reused pid is not mistaken for the process that registered.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use stackroute_proto::v1alpha1::{Listener, ListenerKey, Workload, WorkloadKey};
use tracing::warn;

use crate::files;

/// File name in the state directory.
pub const REGISTRATIONS_FILE: &str = "registrations.json";
const REGISTRATIONS_TMP_FILE: &str = ".registrations.tmp";

/// The registering process: pid and start time; `pid` 0 when it is not visible to the agent
/// (such registrations are kept until removed explicitly).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// Pid in the agent's pid namespace.
    pub pid: i32,
    /// Start time in clock ticks after boot.
    pub start: u64,
}

impl Owner {
    /// The owner record of a live process `pid` (start time 0 if it cannot be read).
    pub fn of(pid: Option<i32>) -> Self {
        match pid.filter(|pid| *pid > 0) {
            Some(pid) => Self {
                pid,
                start: start_time(pid).unwrap_or(0),
            },
            None => Self::default(),
        }
    }

    /// Whether the process still runs (always true for an unknown pid).
    pub fn alive(&self) -> bool {
        self.pid <= 0
            || start_time(self.pid).is_some_and(|start| self.start == 0 || start == self.start)
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

impl Registrations {
    /// Writes the registrations to the state directory (atomically).
    pub fn save(&self, state_dir: &Path) {
        let result = serde_json::to_vec_pretty(&self.records())
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

    /// The registrations in their serialised form.
    pub fn records(&self) -> RegistrationRecords {
        RegistrationRecords {
            listeners: self
                .listeners
                .values()
                .filter_map(|held| ListenerRecord::of(&held.value, held.owner))
                .collect(),
            workloads: self
                .workloads
                .values()
                .filter_map(|held| {
                    let w = &held.value;
                    let key = w.key.as_ref()?;
                    Some(WorkloadRecord {
                        owner: held.owner,
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
                start: owner.start + 1
            }
            .alive(),
            "a reused pid"
        );
        assert!(
            !Owner {
                pid: i32::MAX,
                start: 1
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
                owner: me,
            },
        );
        held.listeners.insert(
            ("127.0.0.1".into(), 81, 6),
            Held {
                value: listener(81),
                owner: gone,
            },
        );
        held.workloads.insert(
            ("shop".into(), "a".into()),
            Held {
                value: workload("a"),
                owner: me,
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
        assert_eq!(
            loaded.workloads[&("shop".to_string(), "a".to_string())].value,
            workload("a")
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
}
