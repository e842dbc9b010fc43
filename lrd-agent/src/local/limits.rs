//! What the local socket allows and how much: the agent's mode (who is the source of workload
//! identity), idle timeouts, connection caps per caller, and quotas on what a pod or the node
//! may hold registered.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use stackroute_proto::v1alpha1::{Listener, Workload};

/// Where workload identity comes from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Workloads declare themselves (`stackroute run` registers, then execs the program); a
    /// caller is the workload registered by its own process or an ancestor.
    #[default]
    Standalone,
    /// The API server is the source of pod identity: a caller is the pod whose address its
    /// network namespace holds (in the node's snapshot); `registerWorkload` is refused.
    Kubernetes,
}

impl Mode {
    /// `standalone` or `kubernetes`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Standalone => "standalone",
            Self::Kubernetes => "kubernetes",
        }
    }
}

/// Default idle time after which a local connection is closed.
pub const IDLE_TIMEOUT_MS: u64 = 30_000;
/// Default cap on concurrent connections of one caller (pod, or uid+netns+cgroup).
pub const CONNECTIONS_PER_CALLER: usize = 64;

/// Limits of the local socket (flags of `stackroute-lrd`; the defaults suit a node with a few
/// hundred pods).
#[derive(Clone, Debug, PartialEq, Eq, clap::Args)]
pub struct LocalLimits {
    /// Close a local connection that sends no request for this long after its last reply
    /// (milliseconds).
    #[arg(long, env = "STACKROUTE_LOCAL_IDLE_TIMEOUT_MS", default_value_t = IDLE_TIMEOUT_MS)]
    pub local_idle_timeout_ms: u64,
    /// Most concurrent local connections of one caller (its pod; or, for a process in no pod,
    /// its uid, network namespace and cgroup); further ones are answered with an error and
    /// closed.
    #[arg(long, env = "STACKROUTE_MAX_CONNECTIONS_PER_CALLER", default_value_t = CONNECTIONS_PER_CALLER)]
    pub max_connections_per_caller: usize,
    /// Most concurrent local connections in all (also bounded by the open-file limit).
    #[arg(long, env = "STACKROUTE_MAX_LOCAL_CONNECTIONS", default_value_t = 4096)]
    pub max_local_connections: usize,
    /// Most listeners one pod (or workload) may hold registered on this node.
    #[arg(long, env = "STACKROUTE_MAX_LISTENERS_PER_POD", default_value_t = 256)]
    pub max_listeners_per_pod: usize,
    /// Most listeners held registered on this node in all.
    #[arg(
        long,
        env = "STACKROUTE_MAX_LISTENERS_PER_NODE",
        default_value_t = 4096
    )]
    pub max_listeners_per_node: usize,
    /// Most workloads one process scope may register (standalone mode).
    #[arg(long, env = "STACKROUTE_MAX_WORKLOADS_PER_POD", default_value_t = 16)]
    pub max_workloads_per_pod: usize,
    /// Most workloads registered on this node in all (standalone mode).
    #[arg(
        long,
        env = "STACKROUTE_MAX_WORKLOADS_PER_NODE",
        default_value_t = 1024
    )]
    pub max_workloads_per_node: usize,
    /// Most bytes of registrations (names, labels, addresses, endpoints) one pod may hold.
    #[arg(long, env = "STACKROUTE_MAX_REGISTRATION_BYTES_PER_POD", default_value_t = 256 * 1024)]
    pub max_registration_bytes_per_pod: usize,
    /// Most bytes of registrations held on this node in all.
    #[arg(long, env = "STACKROUTE_MAX_REGISTRATION_BYTES_PER_NODE", default_value_t = 4 * 1024 * 1024)]
    pub max_registration_bytes_per_node: usize,
}

impl Default for LocalLimits {
    fn default() -> Self {
        Self {
            local_idle_timeout_ms: IDLE_TIMEOUT_MS,
            max_connections_per_caller: CONNECTIONS_PER_CALLER,
            max_local_connections: 4096,
            max_listeners_per_pod: 256,
            max_listeners_per_node: 4096,
            max_workloads_per_pod: 16,
            max_workloads_per_node: 1024,
            max_registration_bytes_per_pod: 256 * 1024,
            max_registration_bytes_per_node: 4 * 1024 * 1024,
        }
    }
}

impl LocalLimits {
    /// The idle timeout.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.local_idle_timeout_ms.max(1))
    }
}

/// The local socket's policy: the agent's mode and its limits.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalPolicy {
    /// Where identity comes from.
    pub mode: Mode,
    /// Limits and quotas.
    pub limits: LocalLimits,
}

/// Bytes a listener registration costs: its strings, plus a fixed overhead per entry.
pub fn listener_bytes(listener: &Listener) -> usize {
    let key = listener
        .key
        .as_ref()
        .map_or(0, |k| k.node.len() + k.ip.len());
    64 + key
        + listener.namespace.len()
        + listener.workload.len()
        + listener.stacks.len() * 4
        + listener
            .endpoints
            .iter()
            .map(|(k, v)| k.len() + v.len() + 8)
            .sum::<usize>()
}

/// Bytes a workload registration costs.
pub fn workload_bytes(workload: &Workload) -> usize {
    let key = workload
        .key
        .as_ref()
        .map_or(0, |k| k.node.len() + k.namespace.len() + k.name.len());
    64 + key
        + workload
            .labels
            .iter()
            .map(|(k, v)| k.len() + v.len() + 8)
            .sum::<usize>()
        + workload.ips.iter().map(|ip| ip.len() + 8).sum::<usize>()
}

/// What is held now, and what a registration would add (entries it replaces already left
/// out): checks every quota, naming the first one exceeded.
#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    /// Entries of this kind held by the caller's scope.
    pub scope_count: usize,
    /// Entries of this kind held on the node.
    pub node_count: usize,
    /// Bytes held by the caller's scope (listeners and workloads).
    pub scope_bytes: usize,
    /// Bytes held on the node.
    pub node_bytes: usize,
}

/// Which registry a quota applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Listeners.
    Listeners,
    /// Workloads.
    Workloads,
}

impl LocalLimits {
    /// Whether `adding` more entries of `kind` totalling `bytes` fit next to `usage`; the error
    /// names the quota, its value, the scope, and the flag that sets it.
    pub fn check_quota(
        &self,
        kind: Kind,
        usage: Usage,
        adding: usize,
        bytes: usize,
        scope: &str,
    ) -> Result<(), String> {
        let (per_pod, per_node, name) = match kind {
            Kind::Listeners => (
                self.max_listeners_per_pod,
                self.max_listeners_per_node,
                "listeners",
            ),
            Kind::Workloads => (
                self.max_workloads_per_pod,
                self.max_workloads_per_node,
                "workloads",
            ),
        };
        let exceeded = |what: &str, limit: usize, held: usize, flag: &str| {
            Err(format!(
                "quota exceeded: {what} is {limit} ({held} held by {scope} now, this adds {}); remove registrations or raise --{flag}",
                if what.contains("bytes") {
                    bytes
                } else {
                    adding
                }
            ))
        };
        if usage.scope_count + adding > per_pod {
            return exceeded(
                &format!("{name} per pod"),
                per_pod,
                usage.scope_count,
                &format!("max-{name}-per-pod"),
            );
        }
        if usage.node_count + adding > per_node {
            return exceeded(
                &format!("{name} per node"),
                per_node,
                usage.node_count,
                &format!("max-{name}-per-node"),
            );
        }
        if usage.scope_bytes + bytes > self.max_registration_bytes_per_pod {
            return exceeded(
                "registration bytes per pod",
                self.max_registration_bytes_per_pod,
                usage.scope_bytes,
                "max-registration-bytes-per-pod",
            );
        }
        if usage.node_bytes + bytes > self.max_registration_bytes_per_node {
            return exceeded(
                "registration bytes per node",
                self.max_registration_bytes_per_node,
                usage.node_bytes,
                "max-registration-bytes-per-node",
            );
        }
        Ok(())
    }
}

/// Open connections per caller scope, so that one pod cannot hold every slot.
#[derive(Clone, Debug, Default)]
pub struct ConnectionCaps {
    open: Arc<Mutex<HashMap<String, usize>>>,
}

/// One connection counted against its caller; uncounted when dropped.
#[derive(Debug)]
pub struct ConnectionSlot {
    open: Arc<Mutex<HashMap<String, usize>>>,
    scope: String,
}

impl ConnectionCaps {
    /// Counts a connection of `scope` if it has fewer than `cap` open; `None` otherwise.
    pub fn acquire(&self, scope: &str, cap: usize) -> Option<ConnectionSlot> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.entry(scope.to_string()).or_default();
        if *count >= cap {
            return None;
        }
        *count += 1;
        Some(ConnectionSlot {
            open: self.open.clone(),
            scope: scope.to_string(),
        })
    }

    /// Connections open for `scope`.
    pub fn open(&self, scope: &str) -> usize {
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(scope)
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.scope) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.scope);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_count_per_scope_and_release_on_drop() {
        let caps = ConnectionCaps::default();
        let a: Vec<_> = (0..3).map(|_| caps.acquire("pod a", 3).unwrap()).collect();
        assert!(caps.acquire("pod a", 3).is_none());
        let b = caps
            .acquire("pod b", 3)
            .expect("another pod is not affected");
        drop(a);
        assert_eq!(caps.open("pod a"), 0);
        assert!(caps.acquire("pod a", 3).is_some());
        drop(b);
        assert_eq!(caps.open("pod b"), 0);
    }

    #[test]
    fn quotas_name_what_was_exceeded() {
        let limits = LocalLimits {
            max_listeners_per_pod: 2,
            max_listeners_per_node: 3,
            max_registration_bytes_per_pod: 1000,
            max_registration_bytes_per_node: 1500,
            ..LocalLimits::default()
        };
        let usage = |scope_count, node_count, scope_bytes, node_bytes| Usage {
            scope_count,
            node_count,
            scope_bytes,
            node_bytes,
        };
        assert!(
            limits
                .check_quota(Kind::Listeners, usage(1, 1, 0, 0), 1, 100, "pod a")
                .is_ok()
        );
        let error = limits
            .check_quota(Kind::Listeners, usage(2, 2, 0, 0), 1, 100, "pod a")
            .unwrap_err();
        assert!(
            error.contains("listeners per pod is 2")
                && error.contains("pod a")
                && error.contains("--max-listeners-per-pod"),
            "{error}"
        );
        let error = limits
            .check_quota(Kind::Listeners, usage(0, 3, 0, 0), 1, 100, "pod a")
            .unwrap_err();
        assert!(error.contains("listeners per node is 3"), "{error}");
        let error = limits
            .check_quota(Kind::Listeners, usage(0, 0, 950, 950), 1, 100, "pod a")
            .unwrap_err();
        assert!(
            error.contains("registration bytes per pod is 1000"),
            "{error}"
        );
        let error = limits
            .check_quota(Kind::Listeners, usage(0, 0, 0, 1450), 1, 100, "pod a")
            .unwrap_err();
        assert!(
            error.contains("registration bytes per node is 1500"),
            "{error}"
        );
    }
}
