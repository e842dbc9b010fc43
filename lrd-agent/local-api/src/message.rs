//! Requests and replies on the agent's Unix socket. Every message is a JSON object whose `kind`
//! field names it; unknown kinds are rejected, unknown fields are ignored (so fields can be
//! added without breaking older peers).

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// Transport protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Protocol {
    /// TCP.
    #[serde(rename = "TCP")]
    Tcp,
    /// UDP.
    #[serde(rename = "UDP")]
    Udp,
}

/// A network stack.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Stack {
    /// Linux kernel TCP/IP.
    Kernel,
    /// stackroute's user-space TCP/IP.
    Userspace,
    /// RDMA (RoCE).
    #[serde(rename = "RDMA")]
    Rdma,
}

/// Why the shim fell back to the kernel (or down its fallback list). Counted per reason in the
/// agent's `/metrics` (`stackroute_lrd_fallback_reports_total{reason=…}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FallbackReason {
    /// The agent was unreachable, or no snapshot was published.
    NoAgent,
    /// The local node lacks the chosen stack (no RDMA device, BBR not allowed, …).
    NoCapability,
    /// RDMA was chosen but the server has no listener registered for it.
    PeerNotRegistered,
    /// Connecting on the chosen stack failed or timed out.
    ConnectFailed,
    /// The rule's isolation forbids the stack that was available.
    IsolationForbids,
    /// The call or option is not supported on the chosen stack.
    Unsupported,
    /// The program bypasses the shim (static binary, raw syscalls, io_uring).
    Unaccelerated,
    /// The chosen stack is not running for this caller (the user-space stack instance could not
    /// be started or has died; RDMA in this build): the next transport of the list was used.
    StackUnavailable,
    /// The chosen stack does not carry this protocol (a `Userspace` rule for UDP).
    UnsupportedProtocol,
    /// The process's own workload (`STACKROUTE_NAMESPACE`/`STACKROUTE_WORKLOAD`) is unset or not
    /// in the node's snapshot: the installation default was used.
    UnknownWorkload,
    /// A user-space or RDMA entry was skipped for a program the shim cannot reach (the kernel
    /// hook applies kernel transports only).
    NotInterposable,
    /// RDMA: the peer's shim declined the upgrade (its own reason is shown beside this).
    PeerDeclined,
    /// RDMA: no device here (no RDMA subsystem, none in the pod, `/dev/infiniband` absent).
    NoDevice,
    /// RDMA: a device, but no active port with a usable GID.
    NoGid,
    /// RDMA: the locked-memory limit is too low to register buffers.
    Memlock,
    /// RDMA: the upgrade missed its deadline (TCP connect, the peer's answer, or the RDMA
    /// connect); the connection carries on as TCP.
    ConnectTimeout,
    /// RDMA: the RDMA connect or a verbs call failed.
    RdmaError,
    /// Anything else.
    Other,
}

impl FallbackReason {
    /// Every reason, in declaration order.
    pub const ALL: [Self; 18] = [
        Self::NoAgent,
        Self::NoCapability,
        Self::PeerNotRegistered,
        Self::ConnectFailed,
        Self::IsolationForbids,
        Self::Unsupported,
        Self::Unaccelerated,
        Self::StackUnavailable,
        Self::UnsupportedProtocol,
        Self::UnknownWorkload,
        Self::NotInterposable,
        Self::PeerDeclined,
        Self::NoDevice,
        Self::NoGid,
        Self::Memlock,
        Self::ConnectTimeout,
        Self::RdmaError,
        Self::Other,
    ];

    /// The name used on the wire and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoAgent => "no-agent",
            Self::NoCapability => "no-capability",
            Self::PeerNotRegistered => "peer-not-registered",
            Self::ConnectFailed => "connect-failed",
            Self::IsolationForbids => "isolation-forbids",
            Self::Unsupported => "unsupported",
            Self::Unaccelerated => "unaccelerated",
            Self::StackUnavailable => "stack-unavailable",
            Self::UnsupportedProtocol => "unsupported-protocol",
            Self::UnknownWorkload => "unknown-workload",
            Self::NotInterposable => "not-interposable",
            Self::PeerDeclined => "peer-declined",
            Self::NoDevice => "no-device",
            Self::NoGid => "no-gid",
            Self::Memlock => "memlock",
            Self::ConnectTimeout => "connect-timeout",
            Self::RdmaError => "rdma-error",
            Self::Other => "other",
        }
    }
}

/// A request from a local process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum Request {
    /// A server socket now listens (sent by the shim at `listen()`). The agent checks that `ip`
    /// belongs to the caller's network namespace (or is the unspecified address), then forwards
    /// it to the controller.
    #[serde(rename_all = "camelCase")]
    RegisterListener {
        /// Listening address; `0.0.0.0` or `::` for a wildcard bind.
        ip: IpAddr,
        /// Port.
        port: u16,
        /// Protocol.
        protocol: Protocol,
        /// The workload's namespace.
        namespace: String,
        /// The workload's name.
        workload: String,
        /// Stacks it accepts on; the kernel is added if missing.
        #[serde(default)]
        stacks: Vec<Stack>,
        /// Where to reach it on stacks that need an address of their own, keyed by stack name.
        #[serde(default)]
        endpoints: BTreeMap<String, String>,
    },
    /// A server socket closed.
    #[serde(rename_all = "camelCase")]
    RemoveListener {
        /// Listening address.
        ip: IpAddr,
        /// Port.
        port: u16,
        /// Protocol.
        protocol: Protocol,
    },
    /// Standalone mode: a workload started by `stackroute run` declares its identity.
    #[serde(rename_all = "camelCase")]
    RegisterWorkload {
        /// Namespace.
        namespace: String,
        /// Name (plays the role of the pod name).
        name: String,
        /// Labels that policies select on.
        #[serde(default)]
        labels: BTreeMap<String, String>,
        /// Addresses of the workload (none: it shares the node's addresses).
        #[serde(default)]
        ips: Vec<IpAddr>,
    },
    /// A connection the shim could not decide from its mapped table (no table yet, or a stale
    /// mapping): the agent decides on its current snapshot.
    #[serde(rename_all = "camelCase")]
    Lookup {
        /// Source workload's namespace.
        namespace: String,
        /// Source workload's name.
        workload: String,
        /// Destination address.
        ip: IpAddr,
        /// Destination port.
        port: u16,
        /// Protocol.
        protocol: Protocol,
    },
    /// Which stacks a server accepts on, from the cluster's listener registry (the client end of
    /// an RDMA connection needs the server's registration and endpoint).
    #[serde(rename_all = "camelCase")]
    FindListener {
        /// Destination address.
        ip: IpAddr,
        /// Destination port.
        port: u16,
        /// Protocol.
        protocol: Protocol,
    },
    /// The shim fell back `count` times for `reason` since its last report.
    #[serde(rename_all = "camelCase")]
    FallbackReport {
        /// Why.
        reason: FallbackReason,
        /// How many times (at least 1).
        #[serde(default = "one")]
        count: u64,
    },
    /// The shim's first `Userspace` decision in a network namespace: the agent starts (or names
    /// the running) user-space stack instance for the caller's network namespace and answers
    /// [`Response::Instance`], or [`Response::Unavailable`] with the reason to fall back.
    UserspaceInstance,
    /// The running user-space stack instances (for `stackroute connections`; root callers only).
    UserspaceInstances,
    /// Sent by `stackroute run` before it `exec`s a program the shim cannot reach (static,
    /// set-user-ID): the agent moves the caller into a cgroup of its own (under the one it is
    /// in) and attaches the kernel hook there, which gives every TCP connection made in it the
    /// congestion control `namespace/workload`'s policy picks. Answers [`Response::Ok`], or
    /// [`Response::Unavailable`] with why not.
    #[serde(rename_all = "camelCase")]
    KernelHook {
        /// The workload's namespace.
        namespace: String,
        /// The workload's name.
        workload: String,
    },
    /// The attached kernel hooks (for `stackroute connections` and `explain --agent`).
    KernelHooks,
    /// The shim's per-process counters since its last report: decisions by the transport that
    /// was used, and fallbacks by reason. Sent at exit and at most once a second from a
    /// decision, never from a thread of its own.
    #[serde(rename_all = "camelCase")]
    ShimReport {
        /// Connections decided, by the transport actually used.
        #[serde(default)]
        decisions: Vec<DecisionCount>,
        /// Fallbacks, by reason.
        #[serde(default)]
        fallbacks: Vec<FallbackCount>,
        /// RDMA upgrade attempts since the last report (at most [`MAX_UPGRADE_REPORT`]).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        upgrades: Vec<UpgradeAttempt>,
    },
    /// The RDMA upgrade attempts the node's shims reported, newest last (for `stackroute
    /// connections`; root callers only: they name other pods' connections).
    UpgradeAttempts,
}

/// Most upgrade attempts one [`Request::ShimReport`] carries.
pub const MAX_UPGRADE_REPORT: usize = 64;

/// Which end of a connection made an upgrade attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum UpgradeRole {
    /// It connected and proposed.
    Client,
    /// It accepted and answered.
    Server,
}

/// One RDMA upgrade attempt, as the shim that made it saw it (SMC-R's `smcss` shows the same:
/// the connection, why it stayed TCP, and the peer's own reason).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpgradeAttempt {
    /// Client or server.
    pub role: UpgradeRole,
    /// The connection's local address.
    pub local: String,
    /// Its remote address.
    pub remote: String,
    /// Why it stays TCP (`no-device`, `peer-declined`, `connect-timeout`, …; the reason names
    /// of `stackroute-rdma-upgrade`).
    pub reason: String,
    /// The peer's own reason, when it sent one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_reason: Option<String>,
    /// How long the attempt held the connection up, in microseconds.
    pub elapsed_us: u64,
}

/// An upgrade attempt as the agent keeps it: who reported it, and when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpgradeRecord {
    /// The attempt.
    #[serde(flatten)]
    pub attempt: UpgradeAttempt,
    /// `namespace/name` of the reporting workload, if the agent knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    /// The reporting process (as the agent sees it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    /// When the agent received it, in milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
}

/// How many connections a shim decided onto one transport.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DecisionCount {
    /// Stack.
    pub stack: Stack,
    /// `Default`, `Cubic`, `BBR` or `Reno`.
    pub congestion_control: String,
    /// How many.
    pub count: u64,
}

/// How many times a shim fell back for one reason.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FallbackCount {
    /// Why.
    pub reason: FallbackReason,
    /// How many times.
    pub count: u64,
}

fn one() -> u64 {
    1
}

impl Request {
    /// A short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::RegisterListener { .. } => "register-listener",
            Self::RemoveListener { .. } => "remove-listener",
            Self::RegisterWorkload { .. } => "register-workload",
            Self::Lookup { .. } => "lookup",
            Self::FindListener { .. } => "find-listener",
            Self::FallbackReport { .. } => "fallback-report",
            Self::UserspaceInstance => "userspace-instance",
            Self::UserspaceInstances => "userspace-instances",
            Self::ShimReport { .. } => "shim-report",
            Self::UpgradeAttempts => "upgrade-attempts",
            Self::KernelHook { .. } => "kernel-hook",
            Self::KernelHooks => "kernel-hooks",
        }
    }
}

/// One transport of a decision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Transport {
    /// Stack.
    pub stack: Stack,
    /// `Default`, `Cubic`, `BBR` or `Reno`.
    pub congestion_control: String,
}

/// The agent's answer to [`Request::Lookup`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LookupAnswer {
    /// Revision of the snapshot that decided.
    pub revision: u64,
    /// Whether that snapshot is a persisted one not yet confirmed by a controller.
    pub stale: bool,
    /// The transport to use first, then the fallbacks in order.
    pub transports: Vec<Transport>,
    /// `None`, `KernelEnforced` or `Dedicated`.
    pub isolation: String,
    /// `SameNode`, `SameZone`, `SameCluster` or `External`.
    pub location: String,
    /// The deciding rule as `Kind/[namespace/]name#rule`, or `None` for the default.
    pub matched: Option<String>,
}

/// A registered listener, as the controller distributes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListenerInfo {
    /// The node it runs on.
    pub node: String,
    /// The address it was registered with (the unspecified address for a wildcard bind).
    pub ip: String,
    /// The workload's namespace.
    pub namespace: String,
    /// The workload's name.
    pub workload: String,
    /// Stacks it accepts on (always including the kernel).
    pub stacks: Vec<Stack>,
    /// Addresses per stack name, where a stack needs one.
    pub endpoints: BTreeMap<String, String>,
}

/// A running user-space stack instance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceInfo {
    /// Its pid (in the agent's pid namespace).
    pub pid: i32,
    /// Its abstract socket name, inside its network namespace.
    pub socket: String,
    /// The inode of the network namespace it serves.
    pub netns: u64,
    /// Who it serves: `namespace/name` of the pod or workload that started it, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
}

/// One attached kernel hook, as [`Response::Hooks`] lists it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HookInfo {
    /// `namespace/name` of the workload whose policy it applies.
    pub workload: String,
    /// The cgroup v2 directory it is attached to (as `/proc/PID/cgroup` names it).
    pub cgroup: String,
    /// The snapshot revision its table was compiled from.
    pub revision: u64,
    /// Entries in its table.
    pub entries: u64,
    /// New connections it saw.
    pub connects: u64,
    /// Connections it gave the policy's congestion control.
    pub applied: u64,
    /// Connections it left on the namespace default (the policy's answer, or no kernel entry).
    pub left_default: u64,
    /// Connections whose process chose its own congestion control (the shim's, say).
    pub chosen_by_process: u64,
    /// Answers that skipped a user-space or RDMA entry.
    pub not_interposable: u64,
}

/// A reply from the agent: exactly one per request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum Response {
    /// A registration, removal or report was accepted.
    #[serde(rename_all = "camelCase")]
    Ok {
        /// The revision that will include a registration, when the controller answered.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        revision: Option<u64>,
        /// True when the controller is unreachable: the agent keeps the registration and sends
        /// it when it reconnects.
        #[serde(default)]
        queued: bool,
    },
    /// The answer to a lookup.
    Decision(LookupAnswer),
    /// The answer to [`Request::FindListener`]: `None` when nothing is registered there.
    #[serde(rename_all = "camelCase")]
    Listener {
        /// The listener.
        listener: Option<ListenerInfo>,
    },
    /// The answer to [`Request::UserspaceInstance`]: the instance for the caller's network
    /// namespace listens on the abstract socket `socket` (see
    /// [`relay`](crate::relay)) and runs as process `pid` (as the agent sees it; the shim
    /// compares it with `SO_PEERCRED` when both share a pid namespace).
    #[serde(rename_all = "camelCase")]
    Instance {
        /// The instance's pid.
        pid: i32,
        /// Its abstract socket name, without the leading NUL.
        socket: String,
    },
    /// The answer to [`Request::UserspaceInstances`].
    #[serde(rename_all = "camelCase")]
    Instances {
        /// The running instances.
        instances: Vec<InstanceInfo>,
    },
    /// The answer to [`Request::KernelHooks`].
    #[serde(rename_all = "camelCase")]
    Hooks {
        /// The attached hooks.
        hooks: Vec<HookInfo>,
    },
    /// The answer to [`Request::UpgradeAttempts`].
    #[serde(rename_all = "camelCase")]
    Upgrades {
        /// The kept attempts, oldest first.
        attempts: Vec<UpgradeRecord>,
    },
    /// The answer to [`Request::UserspaceInstance`] when no instance can serve the caller.
    #[serde(rename_all = "camelCase")]
    Unavailable {
        /// The fallback reason the shim records.
        reason: FallbackReason,
        /// Why, for logs.
        message: String,
    },
    /// The request was rejected; the connection stays usable unless the frame itself was bad.
    #[serde(rename_all = "camelCase")]
    Error {
        /// What was wrong.
        message: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_a_stable_json_form() {
        let request = Request::RegisterListener {
            ip: "10.0.0.1".parse().unwrap(),
            port: 8080,
            protocol: Protocol::Tcp,
            namespace: "shop".into(),
            workload: "web".into(),
            stacks: vec![Stack::Kernel, Stack::Rdma],
            endpoints: BTreeMap::from([("RDMA".into(), "fe80::1/4791".into())]),
        };
        let text = serde_json::to_string(&request).unwrap();
        assert_eq!(
            text,
            r#"{"kind":"registerListener","ip":"10.0.0.1","port":8080,"protocol":"TCP","namespace":"shop","workload":"web","stacks":["Kernel","RDMA"],"endpoints":{"RDMA":"fe80::1/4791"}}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), request);
        let report: Request =
            serde_json::from_str(r#"{"kind":"fallbackReport","reason":"connect-failed"}"#).unwrap();
        assert_eq!(
            report,
            Request::FallbackReport {
                reason: FallbackReason::ConnectFailed,
                count: 1
            }
        );
    }

    #[test]
    fn unknown_kinds_and_reasons_are_rejected() {
        assert!(serde_json::from_str::<Request>(r#"{"kind":"format","disk":"c:"}"#).is_err());
        assert!(
            serde_json::from_str::<Request>(r#"{"kind":"fallbackReport","reason":"x"}"#).is_err()
        );
        assert!(serde_json::from_str::<Request>(r#"{"port":1}"#).is_err());
        let report: Request = serde_json::from_str(
            r#"{"kind":"shimReport","decisions":[{"stack":"Kernel","congestionControl":"BBR","count":3}],"fallbacks":[{"reason":"stack-unavailable","count":1}]}"#,
        )
        .unwrap();
        assert_eq!(
            report,
            Request::ShimReport {
                decisions: vec![DecisionCount {
                    stack: Stack::Kernel,
                    congestion_control: "BBR".into(),
                    count: 3
                }],
                fallbacks: vec![FallbackCount {
                    reason: FallbackReason::StackUnavailable,
                    count: 1
                }],
                upgrades: vec![],
            }
        );
        let reasons: Vec<_> = FallbackReason::ALL.iter().map(|r| r.as_str()).collect();
        for (reason, name) in FallbackReason::ALL.iter().zip(reasons) {
            assert_eq!(
                serde_json::to_string(reason).unwrap(),
                format!("\"{name}\"")
            );
        }
    }
}
