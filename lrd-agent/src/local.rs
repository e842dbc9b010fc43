//! The Unix socket `DIR/agent.sock`: requests from local processes (see
//! `stackroute_local_api::message`), one reply per request, length-prefixed JSON frames.
//! A bad frame gets an error reply and is logged; an oversized or truncated one also closes
//! that connection (its boundaries are lost). Nothing a client sends can stop the agent.
//!
//! Every request is bound to its caller, as the kernel reports it (`SO_PEERCRED` → `/proc`),
//! never as the request claims ([`identity`]): a caller looks up, and registers listeners
//! for, only its own workload; wildcard listeners are kept per pod (network namespace); a
//! registration is replaced or removed only by its owner. Each caller has a connection cap,
//! idle connections are closed, and registrations count against per-pod and per-node quotas
//! ([`limits`]).

use std::future::Future;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use stackroute_local_api::frame::{self, HEADER_LEN};
use stackroute_local_api::message::{self, LookupAnswer, Request, Response, Transport};
use stackroute_proto::v1alpha1::{
    self as proto, Listener, ListenerKey, RegistrationResponse, Workload, WorkloadKey,
};
use stackroute_proto::validate;
use stackroute_snapshot::NoTrace;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use crate::peer::{self, Peer, ProcNet};
use crate::registry::{Held, ListenerId, Owner, Removal};
use crate::state::Agent;

pub mod identity;
pub mod limits;

pub use identity::Identity;
pub use limits::{LocalLimits, LocalPolicy, Mode};

/// Most concurrent connections; further clients wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 4096;
/// Descriptors kept for everything but client connections.
const RESERVED_FDS: u64 = 128;

/// How many clients to serve at once with `fd_limit` open files.
pub fn connection_limit(fd_limit: u64) -> usize {
    let available = fd_limit.saturating_sub(RESERVED_FDS).max(16);
    usize::try_from(available)
        .unwrap_or(MAX_CONNECTIONS)
        .min(MAX_CONNECTIONS)
}
/// Time allowed for the body of a frame once its header arrived.
const BODY_TIMEOUT: Duration = Duration::from_secs(5);
/// Time allowed for a forwarded registration before it is reported as queued.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(3);
/// How often registrations of exited processes are withdrawn.
const SWEEP_INTERVAL: Duration = Duration::from_secs(5);
/// Time allowed to tell a caller over its connection cap why it is closed.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_millis(100);

/// How long a connection accepted before a hand-over began may take to send its request once
/// the agent drains: one-shot clients (the shim, the CLI) write it right after connecting.
const DRAIN_IDLE_GRACE: Duration = Duration::from_millis(200);

/// The accept loop on `agent.sock` and its connections, stoppable for a hand-over.
#[derive(Debug)]
pub struct LocalServer {
    stop: tokio::sync::watch::Sender<bool>,
    slots: Arc<Semaphore>,
    max_connections: usize,
    task: tokio::task::JoinHandle<UnixListener>,
}

impl LocalServer {
    /// Starts accepting on `listener`, at most `max_connections` clients at once (and at most
    /// the policy's `max_local_connections`).
    pub fn start(agent: Arc<Agent>, listener: UnixListener, max_connections: usize) -> Self {
        let max_connections = max_connections
            .min(agent.local_policy().limits.max_local_connections)
            .max(1);
        let (stop, stopping) = tokio::sync::watch::channel(false);
        let slots = Arc::new(Semaphore::new(max_connections));
        let task = tokio::spawn(serve(agent, listener, slots.clone(), stopping));
        Self {
            stop,
            slots,
            max_connections,
            task,
        }
    }

    /// Stops accepting (new clients wait in the socket's backlog), lets every open connection
    /// finish the request it is on, and returns the listening socket and the number of
    /// connections still busy after `drain_timeout`.
    pub async fn stop(self, drain_timeout: Duration) -> (UnixListener, usize) {
        let _ = self.stop.send(true);
        let listener = match self.task.await {
            Ok(listener) => listener,
            Err(error) => std::panic::resume_unwind(error.into_panic()),
        };
        let all = u32::try_from(self.max_connections).unwrap_or(u32::MAX);
        let busy = match tokio::time::timeout(drain_timeout, self.slots.acquire_many(all)).await {
            Ok(_) => 0,
            Err(_) => self.max_connections - self.slots.available_permits(),
        };
        (listener, busy)
    }
}

async fn serve(
    agent: Arc<Agent>,
    listener: UnixListener,
    slots: Arc<Semaphore>,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) -> UnixListener {
    let caps = limits::ConnectionCaps::default();
    loop {
        let permit = tokio::select! {
            biased;
            _ = stopping.wait_for(|stop| *stop) => return listener,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return listener,
            },
        };
        // `accept` is cancel-safe: a client is either accepted here or stays in the backlog.
        let accepted = tokio::select! {
            biased;
            _ = stopping.wait_for(|stop| *stop) => return listener,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                let agent = agent.clone();
                let stopping = stopping.clone();
                let caps = caps.clone();
                tokio::spawn(async move {
                    connection(&agent, stream, stopping, &caps).await;
                    drop(permit);
                });
            }
            Err(error) => {
                warn!(%error, "accept on the agent socket failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Connections refused for a caller over its cap, since the agent started (logged sparsely).
static CAPPED: AtomicU64 = AtomicU64::new(0);

async fn connection(
    agent: &Agent,
    stream: UnixStream,
    mut draining: tokio::sync::watch::Receiver<bool>,
    caps: &limits::ConnectionCaps,
) {
    let peer = match stream.peer_cred() {
        Ok(cred) => Peer::from_proc(Path::new("/proc"), cred.pid(), cred.uid(), cred.gid()),
        Err(error) => {
            warn!(%error, "no peer credentials; closing");
            return;
        }
    };
    debug!(pid = ?peer.pid, uid = peer.uid, gid = peer.gid, cgroup = ?peer.cgroup, netns = ?peer.netns, "local connection");
    let limits = &agent.local_policy().limits;
    let scope = peer.scope();
    let (mut reader, mut writer) = stream.into_split();
    // One pod (or one uid+netns+cgroup outside pods) cannot hold every slot.
    let Some(_slot) = caps.acquire(&scope, limits.max_connections_per_caller) else {
        agent.metrics.request("connection", "denied");
        let refused = CAPPED.fetch_add(1, Ordering::Relaxed);
        if refused.is_power_of_two() || refused == 0 {
            warn!(%scope, pid = ?peer.pid, cap = limits.max_connections_per_caller, refused = refused + 1,
                "a caller is over its connection cap; refusing its further connections");
        }
        let reply = Response::Error {
            message: format!(
                "denied: too many connections from this caller ({scope}): at most {} at once",
                limits.max_connections_per_caller
            ),
        };
        if let Ok(bytes) = frame::encode(&reply) {
            let _ = tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, writer.write_all(&bytes)).await;
        }
        return;
    };
    let idle_timeout = limits.idle_timeout();
    loop {
        let mut header = [0; HEADER_LEN];
        // While draining for a hand-over, a connection gets one short grace to send its
        // request; the read is never cancelled half-way (the same future is awaited on). A
        // connection that sends nothing for the idle timeout is closed.
        let read = {
            let read = reader.read_exact(&mut header);
            tokio::pin!(read);
            let done = tokio::select! {
                result = &mut read => Some(result),
                _ = wait_draining(&mut draining) => None,
                _ = tokio::time::sleep(idle_timeout) => {
                    debug!(pid = ?peer.pid, ?idle_timeout, "idle local connection; closing");
                    return;
                }
            };
            match done {
                Some(result) => result,
                None => match tokio::time::timeout(DRAIN_IDLE_GRACE, &mut read).await {
                    Ok(result) => result,
                    Err(_) => return,
                },
            }
        };
        if let Err(error) = read {
            if error.kind() != std::io::ErrorKind::UnexpectedEof {
                debug!(%error, pid = ?peer.pid, "local connection failed");
            }
            return;
        }
        let (response, keep_open) = match frame::body_len(header) {
            Err(error) => {
                warn!(pid = ?peer.pid, uid = peer.uid, %error, "rejected frame; closing the connection");
                agent.metrics.request("invalid", "error");
                (
                    Response::Error {
                        message: error.to_string(),
                    },
                    false,
                )
            }
            Ok(len) => {
                let mut body = vec![0; len];
                match tokio::time::timeout(BODY_TIMEOUT, reader.read_exact(&mut body)).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(error)) => {
                        warn!(pid = ?peer.pid, %error, "truncated frame; closing the connection");
                        agent.metrics.request("invalid", "error");
                        return;
                    }
                    Err(_) => {
                        warn!(pid = ?peer.pid, "frame body timed out; closing the connection");
                        agent.metrics.request("invalid", "error");
                        return;
                    }
                }
                match frame::decode::<Request>(&body) {
                    Ok(request) => (handle(agent, &peer, request).await, true),
                    Err(error) => {
                        warn!(pid = ?peer.pid, uid = peer.uid, %error, "rejected message");
                        agent.metrics.request("invalid", "error");
                        (
                            Response::Error {
                                message: error.to_string(),
                            },
                            true,
                        )
                    }
                }
            }
        };
        let bytes = match frame::encode(&response) {
            Ok(bytes) => bytes,
            Err(error) => {
                warn!(%error, "cannot encode a reply");
                frame::encode(&Response::Error {
                    message: "reply too large".into(),
                })
                .unwrap_or_default()
            }
        };
        // Draining: the answered request was this connection's last.
        let write_failed = writer.write_all(&bytes).await.is_err();
        let draining_now = *draining.borrow();
        if write_failed || !keep_open || draining_now {
            return;
        }
    }
}

/// Resolves once the server drains (or is gone).
async fn wait_draining(draining: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = draining.wait_for(|drain| *drain).await.map(|_| ());
}

/// Answers one request and counts it.
pub async fn handle(agent: &Agent, peer: &Peer, request: Request) -> Response {
    let kind = request.kind();
    let (response, result) = match request {
        Request::RegisterListener {
            ip,
            port,
            protocol,
            namespace,
            workload,
            stacks,
            endpoints,
        } => {
            register_listener(
                agent,
                peer,
                ListenerRequest {
                    ip,
                    port,
                    protocol,
                    namespace,
                    workload,
                    stacks,
                    endpoints,
                },
            )
            .await
        }
        Request::RemoveListener { ip, port, protocol } => {
            remove_listener(agent, peer, ip, port, protocol).await
        }
        Request::RegisterWorkload {
            namespace,
            name,
            labels,
            ips,
        } => register_workload(agent, peer, namespace, name, labels, ips).await,
        Request::Lookup {
            namespace,
            workload,
            ip,
            port,
            protocol,
        } => lookup(agent, peer, &namespace, &workload, ip, port, protocol),
        Request::FindListener { ip, port, protocol } => (
            Response::Listener {
                listener: find_listener(agent, ip, port, protocol),
            },
            "ok",
        ),
        Request::FallbackReport { reason, count } => {
            agent
                .metrics
                .fallbacks
                .get_or_create(&crate::metrics::ReasonLabels {
                    reason: reason.as_str(),
                })
                .inc_by(count.clamp(1, 1 << 20));
            (
                Response::Ok {
                    revision: None,
                    queued: false,
                },
                "ok",
            )
        }
        // Which instances run (pids, socket names) is the node's business: root only.
        Request::UserspaceInstances if peer.uid != 0 => {
            denied("only root may list user-space stack instances".into())
        }
        Request::UserspaceInstances => (
            Response::Instances {
                instances: agent
                    .instances()
                    .map(|instances| instances.list())
                    .unwrap_or_default(),
            },
            "ok",
        ),
        Request::UserspaceInstance => match agent.instances() {
            Some(instances) => instances.request(agent, peer).await,
            None => (
                Response::Unavailable {
                    reason: message::FallbackReason::StackUnavailable,
                    message: "this agent starts no user-space stack instances".into(),
                },
                "unavailable",
            ),
        },
        Request::KernelHook {
            namespace,
            workload,
        } => match agent.hooks() {
            // Loads and attaches BPF programs (milliseconds), once per `stackroute run` of a
            // program the shim cannot reach.
            Some(hooks) => hooks.request(agent, peer, &namespace, &workload),
            None => (
                Response::Unavailable {
                    reason: message::FallbackReason::NoCapability,
                    message: "this agent attaches no kernel hooks".into(),
                },
                "unavailable",
            ),
        },
        Request::KernelHooks => (
            Response::Hooks {
                hooks: agent.hooks().map(|hooks| hooks.list()).unwrap_or_default(),
            },
            "ok",
        ),
        Request::ShimReport {
            decisions,
            fallbacks,
            upgrades,
        } => {
            agent.metrics.shim_report(&decisions, &fallbacks);
            if !upgrades.is_empty() {
                record_upgrades(agent, peer, upgrades);
            }
            ok()
        }
        // The attempts name other pods' connections and addresses: root only.
        Request::UpgradeAttempts if peer.uid != 0 => {
            denied("only root may list RDMA upgrade attempts".into())
        }
        Request::UpgradeAttempts => (
            Response::Upgrades {
                attempts: agent.metrics.upgrade_log.answer(),
            },
            "ok",
        ),
    };
    let served = matches!(result, "ok" | "queued");
    if !served {
        info!(kind, result, pid = ?peer.pid, uid = peer.uid, cgroup = ?peer.cgroup, ?response, "local request not served");
    } else if kind.starts_with("register") || kind.starts_with("remove") {
        info!(kind, result, pid = ?peer.pid, uid = peer.uid, cgroup = ?peer.cgroup, "local registration");
    }
    agent.metrics.request(kind, result);
    response
}

/// Keeps a shim's upgrade attempts, bounded (`upgrades::sanitize`), stamped with who reported
/// them (the caller as the kernel names it, never as the report claims) and when.
fn record_upgrades(agent: &Agent, peer: &Peer, attempts: Vec<message::UpgradeAttempt>) {
    let (attempts, trimmed) = crate::upgrades::sanitize(attempts);
    if trimmed != crate::upgrades::Trimmed::default() {
        // Debug only: any local process can send these at will.
        debug!(pid = ?peer.pid, uid = peer.uid, ?trimmed, "trimmed an oversized upgrade report");
    }
    agent.metrics.rdma_upgrade_report(&attempts, trimmed);
    let workload = match identity::resolve(agent, peer) {
        Identity::Known(known) => Some(identity::names(&known.workloads)),
        Identity::Unknown(_) => None,
    };
    let at_unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
        });
    agent
        .metrics
        .upgrade_log
        .extend(attempts.into_iter().map(|attempt| message::UpgradeRecord {
            attempt,
            workload: workload.clone(),
            pid: peer.pid,
            at_unix_ms,
        }));
}

fn error(message: String) -> (Response, &'static str) {
    (Response::Error { message }, "error")
}

/// A refusal because of who the caller is, what it holds, or a quota: the message starts
/// with `denied:` and says which.
fn denied(message: String) -> (Response, &'static str) {
    let message = if message.starts_with("denied:") {
        message
    } else {
        format!("denied: {message}")
    };
    (Response::Error { message }, "denied")
}

fn ok() -> (Response, &'static str) {
    (
        Response::Ok {
            revision: None,
            queued: false,
        },
        "ok",
    )
}

fn check_owned(peer: &Peer, ip: IpAddr) -> Result<(), String> {
    match ProcNet::default().owns(peer, ip) {
        Ok(true) => Ok(()),
        Ok(false) => Err(format!(
            "address {ip} is not assigned to an interface in the caller's network namespace"
        )),
        Err(error) => Err(format!("cannot check address {ip}: {error}")),
    }
}

/// The inode of the host's network namespace: that of pid 1 (the host's init, as the agent
/// runs in the host's pid namespace; the agent itself may run in a pod network of its own),
/// else the agent's own. A caller in it is on the host's network.
fn host_netns() -> Option<u64> {
    static HOST: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *HOST.get_or_init(|| {
        ["/proc/1/ns/net", "/proc/self/ns/net"]
            .iter()
            .find_map(|path| {
                std::fs::read_link(path)
                    .ok()
                    .and_then(|link| link.to_str().and_then(peer::parse_netns_link))
            })
    })
}

fn proto_protocol(protocol: message::Protocol) -> i32 {
    match protocol {
        message::Protocol::Tcp => proto::Protocol::Tcp as i32,
        message::Protocol::Udp => proto::Protocol::Udp as i32,
    }
}

fn protocol_name(protocol: i32) -> &'static str {
    if protocol == proto::Protocol::Udp as i32 {
        "UDP"
    } else {
        "TCP"
    }
}

fn proto_stack(stack: message::Stack) -> i32 {
    match stack {
        message::Stack::Kernel => proto::Stack::Kernel as i32,
        message::Stack::Userspace => proto::Stack::Userspace as i32,
        message::Stack::Rdma => proto::Stack::Rdma as i32,
    }
}

enum Forwarded {
    Done(u64),
    Queued,
    Refused(String),
}

impl Forwarded {
    fn reply(self) -> (Response, &'static str) {
        match self {
            Self::Done(revision) => (
                Response::Ok {
                    revision: Some(revision),
                    queued: false,
                },
                "ok",
            ),
            Self::Queued => (
                Response::Ok {
                    revision: None,
                    queued: true,
                },
                "queued",
            ),
            Self::Refused(message) => error(format!("the controller refused: {message}")),
        }
    }

    /// The outcome of several forwards: refused if any was, else queued if any was, else the
    /// latest revision.
    fn combine(outcomes: Vec<Self>) -> Self {
        let mut combined = Self::Done(0);
        for outcome in outcomes {
            combined = match (combined, outcome) {
                (refused @ Self::Refused(_), _) | (_, refused @ Self::Refused(_)) => refused,
                (Self::Queued, _) | (_, Self::Queued) => Self::Queued,
                (Self::Done(a), Self::Done(b)) => Self::Done(a.max(b)),
            };
        }
        combined
    }
}

/// Sends a registration to the controller if one is connected. Transport failures leave it
/// queued (it is re-sent on reconnect); a refusal by the controller is final. The node being
/// at its quota at the controller (`RESOURCE_EXHAUSTED`) is a refusal too: held, the
/// registration would only be refused again on every re-send.
async fn forward<F, Fut>(agent: &Agent, call: F) -> Forwarded
where
    F: FnOnce(stackroute_proto::client::Client) -> Fut,
    Fut: Future<Output = Result<tonic::Response<RegistrationResponse>, tonic::Status>>,
{
    let Some(client) = agent.client() else {
        return Forwarded::Queued;
    };
    match tokio::time::timeout(FORWARD_TIMEOUT, call(client)).await {
        Ok(Ok(response)) => Forwarded::Done(response.into_inner().revision),
        Ok(Err(status))
            if status.code() == tonic::Code::ResourceExhausted
                || !crate::controller::transient(status.code()) =>
        {
            Forwarded::Refused(status.message().to_string())
        }
        Ok(Err(status)) => {
            warn!(%status, "forwarding a registration failed; queued for the next connection");
            Forwarded::Queued
        }
        Err(_) => Forwarded::Queued,
    }
}

/// A `registerListener` request's fields.
struct ListenerRequest {
    ip: IpAddr,
    port: u16,
    protocol: message::Protocol,
    namespace: String,
    workload: String,
    stacks: Vec<message::Stack>,
    endpoints: std::collections::BTreeMap<String, String>,
}

/// The addresses a wildcard listener (`0.0.0.0`/`::`) of the caller stands for, so that it is
/// kept per pod and sent to the controller under addresses unique on the node:
/// - the caller's workload's addresses that its network namespace holds (Kubernetes: the pod
///   IPs; standalone: the registered `ips`);
/// - else, for a caller on the host's network, the wildcard itself (the node's addresses);
/// - else every routable address of the caller's own network namespace.
///
/// `0.0.0.0` stands for IPv4 addresses only; `::` for both families (Linux binds `::`
/// dual-stack unless `IPV6_V6ONLY` is set).
fn wildcard_addresses(
    peer: &Peer,
    identity: &Identity,
    wildcard: IpAddr,
) -> Result<Vec<IpAddr>, String> {
    let pid = peer
        .pid
        .ok_or("the caller's pid is not visible to the agent")?;
    let (netns, addresses) = ProcNet::default()
        .namespace_addresses(pid)
        .map_err(|e| format!("cannot read the caller's network namespace: {e}"))?;
    let family = |ip: &IpAddr| wildcard.is_ipv6() || ip.to_canonical().is_ipv4();
    if let Identity::Known(known) = identity {
        let mine: Vec<IpAddr> = known
            .ips
            .iter()
            .map(|ip| ip.to_canonical())
            .filter(|ip| addresses.contains(ip) && family(ip))
            .collect();
        if !mine.is_empty() {
            return Ok(mine);
        }
    }
    if Some(netns) == host_netns() {
        return Ok(vec![wildcard]);
    }
    let routable: Vec<IpAddr> = addresses
        .into_iter()
        .filter(|ip| peer::is_routable(*ip) && family(ip))
        .collect();
    if routable.is_empty() {
        return Err(format!(
            "the caller's network namespace has no {} address but loopback and link-local ones: nothing outside it can reach a listener on {wildcard}",
            if wildcard.is_ipv6() { "IP" } else { "IPv4" }
        ));
    }
    Ok(routable)
}

/// Usage of `kind` by `scope` and by the node, leaving out the entries `replacing`.
fn usage<K: Ord, T>(
    entries: &std::collections::BTreeMap<K, Held<T>>,
    replacing: &[K],
    scope: &str,
    bytes: impl Fn(&T) -> usize,
) -> limits::Usage {
    let mut usage = limits::Usage::default();
    for (key, held) in entries {
        if replacing.contains(key) {
            continue;
        }
        let size = bytes(&held.value);
        usage.node_count += 1;
        usage.node_bytes += size;
        if held.owner.scope == scope {
            usage.scope_count += 1;
            usage.scope_bytes += size;
        }
    }
    usage
}

/// Bytes held by `scope` and by the node in the other registry (quotas on bytes cover both).
fn other_bytes<K, T>(
    entries: &std::collections::BTreeMap<K, Held<T>>,
    scope: &str,
    bytes: impl Fn(&T) -> usize,
) -> (usize, usize) {
    entries.values().fold((0, 0), |(mine, all), held| {
        let size = bytes(&held.value);
        (
            mine + if held.owner.scope == scope { size } else { 0 },
            all + size,
        )
    })
}

async fn register_listener(
    agent: &Agent,
    peer: &Peer,
    request: ListenerRequest,
) -> (Response, &'static str) {
    let ListenerRequest {
        ip,
        port,
        protocol,
        namespace,
        workload,
        stacks,
        endpoints,
    } = request;
    if port == 0 {
        return error("port must not be 0".into());
    }
    let policy = agent.local_policy();
    let identity = identity::resolve(agent, peer);
    match &identity {
        Identity::Known(_) if !identity.is(&namespace, &workload) => {
            return denied(format!(
                "the caller is {}; it may register listeners only for its own workload, not {namespace}/{workload}",
                identity.describe()
            ));
        }
        Identity::Unknown(why) if policy.mode == Mode::Kubernetes => {
            return denied(format!(
                "cannot tell which pod the caller is ({why}); in Kubernetes mode only a pod of this node may register listeners"
            ));
        }
        _ => {}
    }
    let ip = ip.to_canonical();
    let targets = if ip.is_unspecified() {
        match wildcard_addresses(peer, &identity, ip) {
            Ok(targets) => targets,
            Err(message) => return denied(message),
        }
    } else {
        if let Err(message) = check_owned(peer, ip) {
            return denied(message);
        }
        vec![ip]
    };
    let mut stacks: Vec<i32> = std::iter::once(message::Stack::Kernel)
        .chain(stacks)
        .map(proto_stack)
        .collect();
    stacks.sort_unstable();
    stacks.dedup();
    let owner = Owner {
        wildcard: ip.is_unspecified().then_some(ip),
        ..identity::owner(peer, &identity)
    };
    let mut listeners: Vec<(ListenerId, Listener)> = Vec::with_capacity(targets.len());
    for target in targets {
        let key = ListenerKey {
            node: agent.config.node.clone(),
            ip: target.to_string(),
            port: u32::from(port),
            protocol: proto_protocol(protocol),
        };
        let id = (key.ip.clone(), key.port, key.protocol);
        // The controller's own rules: what is held here must never be refused on re-send.
        match validate::check_listener(Listener {
            key: Some(key),
            namespace: namespace.clone(),
            workload: workload.clone(),
            stacks: stacks.clone(),
            endpoints: endpoints
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }) {
            Ok(listener) => listeners.push((id, listener)),
            Err(message) => return error(message),
        }
    }
    // Owners, quotas and the insertion under one lock, so that two callers cannot both pass.
    let previous: Vec<(ListenerId, Option<Held<Listener>>)> = {
        let mut held = agent.registrations();
        for (id, _) in &listeners {
            if let Some(existing) = held.listeners.get(id)
                && !existing.owner.yields_to(&owner)
            {
                return denied(format!(
                    "listener {}:{port}/{} is registered by another pod or process (pid {}, {}); only its owner may replace it",
                    id.0,
                    protocol_name(id.2),
                    existing.owner.pid,
                    existing.owner.scope
                ));
            }
        }
        let replacing: Vec<ListenerId> = listeners.iter().map(|(id, _)| id.clone()).collect();
        let adding_bytes: usize = listeners
            .iter()
            .map(|(_, l)| limits::listener_bytes(l))
            .sum();
        let mut used = usage(
            &held.listeners,
            &replacing,
            &owner.scope,
            limits::listener_bytes,
        );
        let (mine, all) = other_bytes(&held.workloads, &owner.scope, limits::workload_bytes);
        used.scope_bytes += mine;
        used.node_bytes += all;
        if let Err(message) = policy.limits.check_quota(
            limits::Kind::Listeners,
            used,
            listeners.len(),
            adding_bytes,
            &owner.scope,
        ) {
            return denied(message);
        }
        listeners
            .iter()
            .map(|(id, listener)| {
                let old = held.listeners.insert(
                    id.clone(),
                    Held {
                        value: listener.clone(),
                        owner: owner.clone(),
                    },
                );
                (id.clone(), old)
            })
            .collect()
    };
    let mut outcomes = Vec::with_capacity(listeners.len());
    for (_, listener) in listeners {
        outcomes.push(
            forward(agent, |mut client| async move {
                client.register_listener(listener).await
            })
            .await,
        );
    }
    let outcome = Forwarded::combine(outcomes);
    if matches!(outcome, Forwarded::Refused(_)) {
        let mut held = agent.registrations();
        for (id, old) in previous {
            match old {
                Some(old) => held.listeners.insert(id, old),
                None => held.listeners.remove(&id),
            };
        }
    }
    outcome.reply()
}

async fn remove_listener(
    agent: &Agent,
    peer: &Peer,
    ip: IpAddr,
    port: u16,
    protocol: message::Protocol,
) -> (Response, &'static str) {
    let ip = ip.to_canonical();
    if !ip.is_unspecified()
        && let Err(message) = check_owned(peer, ip)
    {
        return denied(message);
    }
    let identity = identity::resolve(agent, peer);
    let caller = identity::owner(peer, &identity);
    let protocol = proto_protocol(protocol);
    let removed: Vec<ListenerKey> = {
        let mut held = agent.registrations();
        let ids: Vec<ListenerId> = if ip.is_unspecified() {
            // Only the entries this caller's namespace derived from the same wildcard.
            held.listeners
                .iter()
                .filter(|((_, p, proto), h)| {
                    *p == u32::from(port)
                        && *proto == protocol
                        && h.owner.wildcard == Some(ip)
                        && h.owner.netns == caller.netns
                        && h.owner.yields_to(&caller)
                })
                .map(|(id, _)| id.clone())
                .collect()
        } else {
            let id = (ip.to_string(), u32::from(port), protocol);
            match held.listeners.get(&id) {
                None => Vec::new(),
                Some(existing) if !existing.owner.yields_to(&caller) => {
                    return denied(format!(
                        "listener {ip}:{port}/{} is registered by another pod or process (pid {}, {}); only its owner may remove it",
                        protocol_name(protocol),
                        existing.owner.pid,
                        existing.owner.scope
                    ));
                }
                Some(_) => vec![id],
            }
        };
        if ids.is_empty() {
            // Nothing of this caller's is registered there.
            debug!(%ip, port, pid = ?peer.pid, "removal of a listener that is not registered");
            return ok();
        }
        ids.into_iter()
            .filter_map(|id| held.listeners.remove(&id))
            .filter_map(|h| h.value.key)
            .collect()
    };
    let mut outcomes = Vec::with_capacity(removed.len());
    for key in removed {
        outcomes.push(remove(agent, Removal::Listener(key)).await);
    }
    Forwarded::combine(outcomes).reply()
}

async fn register_workload(
    agent: &Agent,
    peer: &Peer,
    namespace: String,
    name: String,
    labels: std::collections::BTreeMap<String, String>,
    ips: Vec<IpAddr>,
) -> (Response, &'static str) {
    let policy = agent.local_policy();
    if policy.mode == Mode::Kubernetes {
        return denied(format!(
            "registerWorkload {namespace}/{name} is refused in Kubernetes mode: the API server is the source of pod identity (the agent knows a pod by its network namespace's address)"
        ));
    }
    for ip in &ips {
        if ip.is_unspecified() {
            return error("a workload address must not be the unspecified address".into());
        }
        if let Err(message) = check_owned(peer, *ip) {
            return denied(message);
        }
    }
    let id = (namespace.clone(), name.clone());
    let workload = match validate::check_workload(Workload {
        key: Some(WorkloadKey {
            node: agent.config.node.clone(),
            namespace,
            name,
        }),
        labels: labels.into_iter().collect(),
        ips: ips.iter().map(|ip| ip.to_canonical().to_string()).collect(),
    }) {
        Ok(workload) => workload,
        Err(message) => return error(message),
    };
    // Workloads count against the process's own scope (its pod, or its uid, network namespace
    // and cgroup): a registration is what gives it a workload identity in the first place.
    let owner = Owner {
        netns: peer.netns.unwrap_or(0),
        scope: peer.scope(),
        ..Owner::of(peer.pid)
    };
    let previous = {
        let mut held = agent.registrations();
        if let Some(existing) = held.workloads.get(&id)
            && !existing.owner.same_process(&owner)
            && existing.owner.alive()
        {
            return denied(format!(
                "workload {}/{} is registered by another live process (pid {}); it cannot be replaced until that process exits",
                id.0, id.1, existing.owner.pid
            ));
        }
        let mut used = usage(
            &held.workloads,
            std::slice::from_ref(&id),
            &owner.scope,
            limits::workload_bytes,
        );
        let (mine, all) = other_bytes(&held.listeners, &owner.scope, limits::listener_bytes);
        used.scope_bytes += mine;
        used.node_bytes += all;
        if let Err(message) = policy.limits.check_quota(
            limits::Kind::Workloads,
            used,
            1,
            limits::workload_bytes(&workload),
            &owner.scope,
        ) {
            return denied(message);
        }
        held.workloads.insert(
            id.clone(),
            Held {
                value: workload.clone(),
                owner,
            },
        )
    };
    let outcome = forward(agent, |mut client| async move {
        client.register_workload(workload).await
    })
    .await;
    if matches!(outcome, Forwarded::Refused(_)) {
        let mut held = agent.registrations();
        match previous {
            Some(old) => held.workloads.insert(id, old),
            None => held.workloads.remove(&id),
        };
    }
    outcome.reply()
}

/// Decides a connection on the current snapshot, for the caller's own workload only (a
/// standalone caller that no registration identifies may look up any: standalone identity is
/// declared, not attested, and the published snapshot holds the same answers).
#[allow(clippy::too_many_arguments)]
fn lookup(
    agent: &Agent,
    peer: &Peer,
    namespace: &str,
    workload: &str,
    ip: IpAddr,
    port: u16,
    protocol: message::Protocol,
) -> (Response, &'static str) {
    let Some(current) = agent.current() else {
        return error("no snapshot is published yet".into());
    };
    let identity = identity::resolve(agent, peer);
    match &identity {
        Identity::Known(_) if !identity.is(namespace, workload) => {
            return denied(format!(
                "the caller is {}; it may look up only its own workload, not {namespace}/{workload}",
                identity.describe()
            ));
        }
        Identity::Unknown(why) if agent.local_policy().mode == Mode::Kubernetes => {
            return denied(format!(
                "cannot tell which pod the caller is ({why}); a pod may look up only its own workload, not {namespace}/{workload}"
            ));
        }
        _ => {}
    }
    let snapshot = current.parsed.snapshot();
    let Some(id) = snapshot.workload_by_name(namespace, workload) else {
        return error(format!(
            "workload {namespace}/{workload} is not on node {} in revision {}",
            snapshot.node_name(),
            current.revision
        ));
    };
    let protocol = match protocol {
        message::Protocol::Tcp => stackroute_snapshot::Protocol::Tcp,
        message::Protocol::Udp => stackroute_snapshot::Protocol::Udp,
    };
    let decision = snapshot.decide(id, ip, port, protocol, &mut NoTrace);
    let transports = decision
        .transports()
        .map(|choice| Transport {
            stack: match choice.stack {
                stackroute_snapshot::Stack::Kernel => message::Stack::Kernel,
                stackroute_snapshot::Stack::Userspace => message::Stack::Userspace,
                stackroute_snapshot::Stack::Rdma => message::Stack::Rdma,
            },
            congestion_control: choice.congestion_control.to_string(),
        })
        .collect();
    let matched = decision.matched.map(|rule| {
        let policy = snapshot.policy(rule.policy);
        let name = snapshot.rule(rule).name;
        if policy.namespace.is_empty() {
            format!("{}/{}#{name}", policy.kind, policy.name)
        } else {
            format!(
                "{}/{}/{}#{name}",
                policy.kind, policy.namespace, policy.name
            )
        }
    });
    (
        Response::Decision(LookupAnswer {
            revision: current.revision,
            stale: current.stale,
            transports,
            isolation: decision.isolation.to_string(),
            location: decision.location.to_string(),
            matched,
        }),
        "ok",
    )
}

fn stack_from_proto(stack: i32) -> Option<message::Stack> {
    match proto::Stack::try_from(stack).ok()? {
        proto::Stack::Kernel => Some(message::Stack::Kernel),
        proto::Stack::Userspace => Some(message::Stack::Userspace),
        proto::Stack::Rdma => Some(message::Stack::Rdma),
        proto::Stack::Unspecified => None,
    }
}

/// The listener registered for `ip:port`: an exact registration (a pod's wildcard listener is
/// registered under its own addresses, so this is the pod that holds `ip`), else a wildcard
/// one on the host network of the node whose own address `ip` is. A pod's address never
/// answers with another pod's (or the host's) wildcard registration.
pub fn find_listener(
    agent: &Agent,
    ip: IpAddr,
    port: u16,
    protocol: message::Protocol,
) -> Option<message::ListenerInfo> {
    let ip = ip.to_canonical();
    let protocol = proto_protocol(protocol);
    let listeners = agent.listeners();
    let at_port = |l: &&Listener| {
        l.key
            .as_ref()
            .is_some_and(|k| k.port == u32::from(port) && k.protocol == protocol)
    };
    let exact = listeners.iter().filter(at_port).find(|l| {
        l.key
            .as_ref()
            .and_then(|k| k.ip.parse::<IpAddr>().ok())
            .map(|a| a.to_canonical())
            == Some(ip)
    });
    let found = exact.or_else(|| {
        let current = agent.current()?;
        let snapshot = current.parsed.snapshot();
        let node = match snapshot.classify(ip).0 {
            stackroute_snapshot::DestinationClass::Node { node } => snapshot.node(node).0,
            stackroute_snapshot::DestinationClass::Pod { .. }
            | stackroute_snapshot::DestinationClass::Unknown => return None,
        };
        let family = |wildcard: IpAddr| wildcard.is_ipv6() || ip.is_ipv4();
        listeners.iter().filter(at_port).find(|l| {
            l.key.as_ref().is_some_and(|k| {
                k.node == node
                    && k.ip
                        .parse::<IpAddr>()
                        .is_ok_and(|a| a.is_unspecified() && family(a))
            })
        })
    })?;
    let key = found.key.as_ref()?;
    Some(message::ListenerInfo {
        node: key.node.clone(),
        ip: key.ip.clone(),
        namespace: found.namespace.clone(),
        workload: found.workload.clone(),
        stacks: found
            .stacks
            .iter()
            .filter_map(|s| stack_from_proto(*s))
            .collect(),
        endpoints: found
            .endpoints
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    })
}

/// Sends a removal; one that cannot be delivered now is kept and sent on the next connection.
async fn remove(agent: &Agent, removal: Removal) -> Forwarded {
    let outcome = match removal.clone() {
        Removal::Listener(key) => {
            forward(agent, |mut c| async move { c.remove_listener(key).await }).await
        }
        Removal::Workload(key) => {
            forward(agent, |mut c| async move { c.remove_workload(key).await }).await
        }
    };
    if matches!(outcome, Forwarded::Queued) {
        agent.registrations().removals.push(removal);
    }
    outcome
}

/// Withdraws, every few seconds, the registrations of processes that have exited.
pub async fn sweep(agent: Arc<Agent>) {
    let mut ticker = tokio::time::interval(SWEEP_INTERVAL);
    loop {
        ticker.tick().await;
        let (listeners, workloads) = {
            let mut held = agent.registrations();
            let any_dead = held.listeners.values().any(|h| !h.owner.alive())
                || held.workloads.values().any(|h| !h.owner.alive());
            if !any_dead {
                continue;
            }
            let listeners: Vec<Held<Listener>> = extract_dead(&mut held.listeners);
            let workloads: Vec<Held<Workload>> = extract_dead(&mut held.workloads);
            (listeners, workloads)
        };
        for listener in listeners {
            info!(pid = listener.owner.pid, key = ?listener.value.key, "listener owner exited; removing");
            if let Some(key) = listener.value.key {
                remove(&agent, Removal::Listener(key)).await;
            }
        }
        for workload in workloads {
            info!(pid = workload.owner.pid, key = ?workload.value.key, "workload exited; removing");
            if let Some(key) = workload.value.key {
                remove(&agent, Removal::Workload(key)).await;
            }
        }
    }
}

fn extract_dead<K: Ord + Clone, T>(
    map: &mut std::collections::BTreeMap<K, Held<T>>,
) -> Vec<Held<T>> {
    let dead: Vec<K> = map
        .iter()
        .filter(|(_, h)| !h.owner.alive())
        .map(|(k, _)| k.clone())
        .collect();
    dead.into_iter().filter_map(|k| map.remove(&k)).collect()
}

#[cfg(test)]
mod tests {
    use message::{UpgradeAttempt, UpgradeRole};

    use super::*;
    use crate::state::Config;

    fn agent(root: &Path) -> Arc<Agent> {
        Agent::start(Config {
            node: "n1".into(),
            controllers: vec!["127.0.0.1:1".into()],
            security: stackroute_proto::client::Security::Plaintext,
            socket_dir: root.join("run"),
            state_dir: root.join("state"),
        })
        .unwrap()
    }

    fn caller(uid: u32) -> Peer {
        Peer {
            pid: None,
            uid,
            gid: uid,
            cgroup: None,
            netns: None,
            pod_uid: None,
        }
    }

    fn attempt(n: u64) -> UpgradeAttempt {
        UpgradeAttempt {
            role: UpgradeRole::Server,
            local: "10.0.0.2:7000".into(),
            remote: format!("10.0.0.1:{n}"),
            reason: "stack-unavailable".into(),
            peer_reason: None,
            elapsed_us: n,
        }
    }

    #[tokio::test]
    async fn upgrade_attempts_are_kept_and_listed_to_root_only() {
        let root = tempfile::tempdir().unwrap();
        let agent = agent(root.path());
        let report = Request::ShimReport {
            decisions: Vec::new(),
            fallbacks: Vec::new(),
            upgrades: (0..message::MAX_UPGRADE_REPORT as u64 + 3)
                .map(attempt)
                .collect(),
        };
        // Anyone may report (shims run as any user); the report is cut to its newest attempts.
        assert!(matches!(
            handle(&agent, &caller(1000), report).await,
            Response::Ok { .. }
        ));
        match handle(&agent, &caller(1000), Request::UpgradeAttempts).await {
            Response::Error { message } => {
                assert!(message.starts_with("denied: only root"), "{message}")
            }
            other => panic!("a non-root caller was answered {other:?}"),
        }
        let Response::Upgrades { attempts } =
            handle(&agent, &caller(0), Request::UpgradeAttempts).await
        else {
            panic!("root gets the attempts");
        };
        assert_eq!(attempts.len(), message::MAX_UPGRADE_REPORT);
        assert_eq!(attempts[0].attempt, attempt(3));
        assert_eq!(attempts[0].pid, None);
        assert!(attempts[0].at_unix_ms > 1_600_000_000_000);
        assert_eq!(agent.metrics.rdma_upgrades_dropped.get(), 3);
    }
}
