//! The Unix socket `DIR/agent.sock`: requests from local processes (see
//! `stackroute_local_api::message`), one reply per request, length-prefixed JSON frames.
//! Callers are identified by `SO_PEERCRED`. A bad frame gets an error reply and is logged; an
//! oversized or truncated one also closes that connection (its boundaries are lost). Nothing a
//! client sends can stop the agent.

use std::future::Future;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use stackroute_local_api::frame::{self, HEADER_LEN};
use stackroute_local_api::message::{self, LookupAnswer, Request, Response, Transport};
use stackroute_proto::v1alpha1::distribution_client::DistributionClient;
use stackroute_proto::v1alpha1::{
    self as proto, Listener, ListenerKey, RegistrationResponse, Workload, WorkloadKey,
};
use stackroute_proto::validate;
use stackroute_snapshot::{NoTrace, Snapshot};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tonic::transport::Channel;
use tracing::{debug, info, warn};

use crate::peer::{self, Peer, ProcNet};
use crate::registry::{Held, Owner, Removal};
use crate::state::Agent;

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
    /// Starts accepting on `listener`, at most `max_connections` clients at once.
    pub fn start(agent: Arc<Agent>, listener: UnixListener, max_connections: usize) -> Self {
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
                tokio::spawn(async move {
                    connection(&agent, stream, stopping).await;
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

async fn connection(
    agent: &Agent,
    stream: UnixStream,
    mut draining: tokio::sync::watch::Receiver<bool>,
) {
    let peer = match stream.peer_cred() {
        Ok(cred) => Peer {
            pid: cred.pid(),
            uid: cred.uid(),
            gid: cred.gid(),
            cgroup: cred
                .pid()
                .and_then(|pid| peer::cgroup(Path::new("/proc"), pid)),
        },
        Err(error) => {
            warn!(%error, "no peer credentials; closing");
            return;
        }
    };
    debug!(pid = ?peer.pid, uid = peer.uid, gid = peer.gid, cgroup = ?peer.cgroup, "local connection");
    let (mut reader, mut writer) = stream.into_split();
    loop {
        let mut header = [0; HEADER_LEN];
        // While draining for a hand-over, a connection gets one short grace to send its
        // request; the read is never cancelled half-way (the same future is awaited on).
        let read = {
            let read = reader.read_exact(&mut header);
            tokio::pin!(read);
            let done = tokio::select! {
                result = &mut read => Some(result),
                _ = wait_draining(&mut draining) => None,
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
                agent, peer, ip, port, protocol, namespace, workload, stacks, endpoints,
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
        } => match lookup(agent, &namespace, &workload, ip, port, protocol) {
            Ok(answer) => (Response::Decision(answer), "ok"),
            Err(message) => (Response::Error { message }, "error"),
        },
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
        Request::ShimReport {
            decisions,
            fallbacks,
        } => {
            agent.metrics.shim_report(&decisions, &fallbacks);
            (
                Response::Ok {
                    revision: None,
                    queued: false,
                },
                "ok",
            )
        }
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

fn error(message: String) -> (Response, &'static str) {
    (Response::Error { message }, "error")
}

fn denied(message: String) -> (Response, &'static str) {
    (Response::Error { message }, "denied")
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

fn proto_protocol(protocol: message::Protocol) -> i32 {
    match protocol {
        message::Protocol::Tcp => proto::Protocol::Tcp as i32,
        message::Protocol::Udp => proto::Protocol::Udp as i32,
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
}

/// Sends a registration to the controller if one is connected. Transport failures leave it
/// queued (it is re-sent on reconnect); a refusal by the controller is final.
async fn forward<F, Fut>(agent: &Agent, call: F) -> Forwarded
where
    F: FnOnce(DistributionClient<Channel>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<RegistrationResponse>, tonic::Status>>,
{
    let Some(client) = agent.client() else {
        return Forwarded::Queued;
    };
    match tokio::time::timeout(FORWARD_TIMEOUT, call(client)).await {
        Ok(Ok(response)) => Forwarded::Done(response.into_inner().revision),
        Ok(Err(status)) if !crate::controller::transient(status.code()) => {
            Forwarded::Refused(status.message().to_string())
        }
        Ok(Err(status)) => {
            warn!(%status, "forwarding a registration failed; queued for the next connection");
            Forwarded::Queued
        }
        Err(_) => Forwarded::Queued,
    }
}

#[allow(clippy::too_many_arguments)]
async fn register_listener(
    agent: &Agent,
    peer: &Peer,
    ip: IpAddr,
    port: u16,
    protocol: message::Protocol,
    namespace: String,
    workload: String,
    stacks: Vec<message::Stack>,
    endpoints: std::collections::BTreeMap<String, String>,
) -> (Response, &'static str) {
    if port == 0 {
        return error("port must not be 0".into());
    }
    if let Err(message) = check_owned(peer, ip) {
        return denied(message);
    }
    let mut stacks: Vec<i32> = std::iter::once(message::Stack::Kernel)
        .chain(stacks)
        .map(proto_stack)
        .collect();
    stacks.sort_unstable();
    stacks.dedup();
    let key = ListenerKey {
        node: agent.config.node.clone(),
        ip: ip.to_canonical().to_string(),
        port: u32::from(port),
        protocol: proto_protocol(protocol),
    };
    let id = (key.ip.clone(), key.port, key.protocol);
    // The controller's own rules: what is held here must never be refused on re-send.
    let listener = match validate::check_listener(Listener {
        key: Some(key),
        namespace,
        workload,
        stacks,
        endpoints: endpoints.into_iter().collect(),
    }) {
        Ok(listener) => listener,
        Err(message) => return error(message),
    };
    agent.registrations().listeners.insert(
        id.clone(),
        Held {
            value: listener.clone(),
            owner: Owner::of(peer.pid),
        },
    );
    let outcome = forward(agent, |mut client| async move {
        client.register_listener(listener).await
    })
    .await;
    if matches!(outcome, Forwarded::Refused(_)) {
        agent.registrations().listeners.remove(&id);
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
    if let Err(message) = check_owned(peer, ip) {
        return denied(message);
    }
    let key = ListenerKey {
        node: agent.config.node.clone(),
        ip: ip.to_canonical().to_string(),
        port: u32::from(port),
        protocol: proto_protocol(protocol),
    };
    agent
        .registrations()
        .listeners
        .remove(&(key.ip.clone(), key.port, key.protocol));
    remove(agent, Removal::Listener(key)).await.reply()
}

async fn register_workload(
    agent: &Agent,
    peer: &Peer,
    namespace: String,
    name: String,
    labels: std::collections::BTreeMap<String, String>,
    ips: Vec<IpAddr>,
) -> (Response, &'static str) {
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
    agent.registrations().workloads.insert(
        id.clone(),
        Held {
            value: workload.clone(),
            owner: Owner::of(peer.pid),
        },
    );
    let outcome = forward(agent, |mut client| async move {
        client.register_workload(workload).await
    })
    .await;
    if matches!(outcome, Forwarded::Refused(_)) {
        agent.registrations().workloads.remove(&id);
    }
    outcome.reply()
}

/// Decides a connection on the current snapshot.
pub fn lookup(
    agent: &Agent,
    namespace: &str,
    workload: &str,
    ip: IpAddr,
    port: u16,
    protocol: message::Protocol,
) -> Result<LookupAnswer, String> {
    let current = agent.current().ok_or("no snapshot is published yet")?;
    let snapshot = Snapshot::parse(&current.bytes)
        .map_err(|e| format!("the published snapshot does not validate: {e}"))?;
    let id = snapshot
        .workload_by_name(namespace, workload)
        .ok_or_else(|| {
            format!(
                "workload {namespace}/{workload} is not on node {} in revision {}",
                snapshot.node_name(),
                current.revision
            )
        })?;
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
    Ok(LookupAnswer {
        revision: current.revision,
        stale: current.stale,
        transports,
        isolation: decision.isolation.to_string(),
        location: decision.location.to_string(),
        matched,
    })
}

fn stack_from_proto(stack: i32) -> Option<message::Stack> {
    match proto::Stack::try_from(stack).ok()? {
        proto::Stack::Kernel => Some(message::Stack::Kernel),
        proto::Stack::Userspace => Some(message::Stack::Userspace),
        proto::Stack::Rdma => Some(message::Stack::Rdma),
        proto::Stack::Unspecified => None,
    }
}

/// The listener registered for `ip:port`: an exact registration, else a wildcard one on the
/// node that owns `ip` according to the current snapshot's address book.
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
        let snapshot = Snapshot::parse(&current.bytes).ok()?;
        let node = match snapshot.classify(ip).0 {
            stackroute_snapshot::DestinationClass::Pod { node, .. }
            | stackroute_snapshot::DestinationClass::Node { node } => snapshot.node(node).0,
            stackroute_snapshot::DestinationClass::Unknown => return None,
        };
        listeners.iter().filter(at_port).find(|l| {
            l.key.as_ref().is_some_and(|k| {
                k.node == node && k.ip.parse::<IpAddr>().is_ok_and(|a| a.is_unspecified())
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
