//! Which workload a local caller is, from what the kernel says about it (`SO_PEERCRED` →
//! `/proc/PID/…`), never from what it writes in a request.
//!
//! - **Kubernetes mode**: the pod whose address the caller's network namespace holds, looked up
//!   in the node's snapshot (the controller builds it from the API server's Pods; every pod but a
//!   host-network one has a namespace of its own). A namespace holding no pod address of this
//!   node, or addresses of several pods, identifies nobody. The pod UID in the caller's cgroup
//!   path (kubelet's `pod<uid>`) keys its connection cap and quotas.
//! - **Standalone mode**: the workload registered by the caller's own process or its nearest
//!   ancestor that registered one (`stackroute run` registers, then execs the program, so the
//!   program and everything it starts are that workload). Cgroups are not used here: outside
//!   Kubernetes they are typically a whole login session or service, shared by unrelated
//!   programs.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::Path;

use crate::local::limits::Mode;
use crate::peer::{self, Peer, ProcNet};
use crate::registry::Owner;
use crate::state::Agent;

/// How far up the process tree a standalone caller's workload is looked for.
const MAX_ANCESTORS: usize = 64;

/// A workload: (namespace, name).
pub type WorkloadName = (String, String);

/// The workload(s) a caller was found to be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Known {
    /// Its workloads: one, except for a standalone process that registered several itself.
    pub workloads: BTreeSet<WorkloadName>,
    /// How it was established, for messages.
    pub how: String,
    /// The workload's addresses: those its network namespace holds (Kubernetes), or those
    /// registered (standalone; none when it shares the node's addresses).
    pub ips: Vec<IpAddr>,
}

/// Who a caller is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Identity {
    /// Bound to its workload(s).
    Known(Known),
    /// Not established, and why.
    Unknown(String),
}

impl Identity {
    /// Whether the caller is `namespace/name`.
    pub fn is(&self, namespace: &str, name: &str) -> bool {
        match self {
            Self::Known(known) => known
                .workloads
                .iter()
                .any(|(ns, n)| ns == namespace && n == name),
            Self::Unknown(_) => false,
        }
    }

    /// `ns/name[, ns/name…] (how)`, or `unidentified (why)`.
    pub fn describe(&self) -> String {
        match self {
            Self::Known(known) => format!("{} ({})", names(&known.workloads), known.how),
            Self::Unknown(why) => format!("unidentified ({why})"),
        }
    }

    /// Whom the caller's registrations count against and who else may replace them: its pod
    /// (by UID) when its cgroup names one, else its workload, else its uid, network namespace
    /// and cgroup.
    pub fn scope(&self, peer: &Peer) -> String {
        match (&peer.pod_uid, self) {
            (Some(_), _) | (None, Self::Unknown(_)) => peer.scope(),
            (None, Self::Known(known)) => match known.workloads.iter().next() {
                Some((namespace, name)) => format!("workload {namespace}/{name}"),
                None => peer.scope(),
            },
        }
    }
}

/// `a/b, c/d`.
pub fn names(workloads: &BTreeSet<WorkloadName>) -> String {
    workloads
        .iter()
        .map(|(namespace, name)| format!("{namespace}/{name}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The caller's identity in the agent's mode.
pub fn resolve(agent: &Agent, peer: &Peer) -> Identity {
    match agent.local_policy().mode {
        Mode::Kubernetes => kubernetes(agent, peer),
        Mode::Standalone => standalone(agent, peer, Path::new("/proc")),
    }
}

/// The owner record of a registration `peer` makes now, as `identity`.
pub fn owner(peer: &Peer, identity: &Identity) -> Owner {
    Owner {
        netns: peer.netns.unwrap_or(0),
        scope: identity.scope(peer),
        ..Owner::of(peer.pid)
    }
}

fn kubernetes(agent: &Agent, peer: &Peer) -> Identity {
    let Some(pid) = peer.pid else {
        return Identity::Unknown(
            "the caller's pid is not visible to the agent (it needs the host's pid namespace)"
                .into(),
        );
    };
    let Some(current) = agent.current() else {
        return Identity::Unknown("no snapshot is published yet, so no pod is known".into());
    };
    let addresses = match ProcNet::default().namespace_addresses(pid) {
        Ok((_, addresses)) => addresses,
        Err(error) => return Identity::Unknown(error.to_string()),
    };
    let snapshot = current.parsed.snapshot();
    let mut found: BTreeMap<WorkloadName, Vec<IpAddr>> = BTreeMap::new();
    for ip in addresses
        .iter()
        .copied()
        .filter(|ip| peer::is_routable(*ip))
    {
        if let Some(id) = snapshot.workload_by_ip(ip) {
            let (namespace, name) = snapshot.workload(id);
            found
                .entry((namespace.to_string(), name.to_string()))
                .or_default()
                .push(ip);
        }
    }
    match found.len() {
        0 => Identity::Unknown(format!(
            "no address of the caller's network namespace ({}) belongs to a pod of node {} in revision {}",
            list(addresses.iter().filter(|ip| peer::is_routable(**ip))),
            agent.config.node,
            current.revision
        )),
        1 => {
            let (workload, ips) = found.into_iter().next().unwrap_or_default();
            Identity::Known(Known {
                how: format!("its network namespace holds {}", list(ips.iter())),
                workloads: BTreeSet::from([workload]),
                ips,
            })
        }
        _ => Identity::Unknown(format!(
            "the caller's network namespace holds addresses of several pods ({})",
            names(&found.into_keys().collect())
        )),
    }
}

fn list<'a>(ips: impl Iterator<Item = &'a IpAddr>) -> String {
    let ips: Vec<String> = ips.map(ToString::to_string).collect();
    match ips.len() {
        0 => "none but loopback and link-local".into(),
        1..=4 => ips.join(", "),
        n => format!("{}, … {} in all", ips[..4].join(", "), n),
    }
}

/// Standalone: the workloads registered by the caller's process or its nearest registering
/// ancestor (whose start time must match the registration's, so a reused pid is nobody).
pub fn standalone(agent: &Agent, peer: &Peer, proc_root: &Path) -> Identity {
    let Some(pid) = peer.pid else {
        return Identity::Unknown("the caller's pid is not visible to the agent".into());
    };
    let mut by_pid: HashMap<i32, Vec<(Owner, WorkloadName, Vec<IpAddr>)>> = HashMap::new();
    for held in agent.registrations().workloads.values() {
        let Some(key) = &held.value.key else { continue };
        by_pid.entry(held.owner.pid).or_default().push((
            held.owner.clone(),
            (key.namespace.clone(), key.name.clone()),
            held.value
                .ips
                .iter()
                .filter_map(|ip| ip.parse().ok())
                .collect(),
        ));
    }
    let mut current = pid;
    for depth in 0..MAX_ANCESTORS {
        let Some((parent, start)) = peer::parent_and_start(proc_root, current) else {
            break;
        };
        let mine: Vec<_> = by_pid
            .get(&current)
            .into_iter()
            .flatten()
            .filter(|(owner, _, _)| owner.start == 0 || owner.start == start)
            .collect();
        if !mine.is_empty() {
            return Identity::Known(Known {
                workloads: mine.iter().map(|(_, name, _)| name.clone()).collect(),
                how: if depth == 0 {
                    format!("registered by the caller's own process, pid {current}")
                } else {
                    format!("registered by its ancestor process, pid {current}")
                },
                ips: mine.iter().flat_map(|(_, _, ips)| ips.clone()).collect(),
            });
        }
        if parent <= 1 {
            break;
        }
        current = parent;
    }
    Identity::Unknown(
        "no workload is registered by the caller's process or its ancestors (`stackroute run` registers one)"
            .into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_prefer_the_pod_then_the_workload() {
        let peer = Peer {
            pid: Some(1),
            uid: 7,
            netns: Some(9),
            cgroup: Some("/x".into()),
            ..Default::default()
        };
        let known = Identity::Known(Known {
            workloads: BTreeSet::from([("shop".to_string(), "a".to_string())]),
            how: "test".into(),
            ips: vec![],
        });
        assert_eq!(known.scope(&peer), "workload shop/a");
        assert!(known.is("shop", "a") && !known.is("shop", "b"));
        assert_eq!(known.describe(), "shop/a (test)");
        let unknown = Identity::Unknown("why".into());
        assert_eq!(unknown.scope(&peer), "uid 7 netns 9 cgroup /x");
        assert!(!unknown.is("shop", "a"));
        let in_pod = Peer {
            pod_uid: Some("u".into()),
            ..peer
        };
        assert_eq!(known.scope(&in_pod), "pod u");
    }
}
