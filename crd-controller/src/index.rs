//! The index: one task owns every input and publishes per-node snapshots.
//!
//! ```text
//! state files ─┐                                     ┌─► watch::Sender (node a) ─► WatchSnapshots
//! registries ──┼─► mpsc ─► Index (one task) ─► compile on a blocking thread ─► (node b) ─► …
//! agents ──────┘        debounce 100 ms / max 1 s       revision from the store    └─► GetStatus
//! ```
//!
//! All mutations arrive as [`Command`]s on one channel, so there is no lock. Recompiles are
//! debounced ([`Debouncer`]); each publishes a new, strictly greater revision. Each node's
//! snapshot goes out through its own `tokio::sync::watch` channel, which keeps only the latest
//! value: a slow agent skips revisions and never holds anyone up. Nothing is compiled before
//! every source has synced, so no agent ever sees partial state.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use stackroute_policy::selector::Labels;
use stackroute_policy::state::{NodeInfo, PodInfo};
use stackroute_policy::{ClusterState, Settings};
use stackroute_proto::v1alpha1::{
    Listener, ListenerKey, NodeCapabilities, NodeStatus, PolicyStatus, StatusResponse, Workload,
    WorkloadKey,
};
use stackroute_snapshot::SnapshotParts;
use tokio::sync::{mpsc, oneshot, watch};

use crate::files::{FileEvent, FileSource};
use crate::metrics::Metrics;
use crate::store::{Store, listener_key, workload_key};

/// What a node's watch channel holds: nothing until the node's first compile.
pub type Published = Option<Arc<NodeUpdate>>;

/// One node's update of one revision: its snapshot, and the delta from the node's previous
/// published snapshot when that is smaller. Each watch stream sends the delta when the previous
/// one is what it sent last, the whole snapshot otherwise.
///
/// The snapshot is kept as its parts: the shared tables (one copy per revision, shared by every
/// node) and the node's own tables. A complete snapshot is assembled only for a stream that
/// sends one, so the controller holds tens of kilobytes per watched node, not a copy of the
/// address book each (5,000 nodes × 9 MB would be 44 GB).
#[derive(Debug)]
pub struct NodeUpdate {
    /// The revision.
    pub revision: u64,
    /// The node.
    pub node: String,
    /// The snapshot.
    pub snapshot: SnapshotParts,
    /// The listener registry sent with it (one list per revision, shared by every node; the
    /// previous revision's own when it did not change).
    pub listeners: Arc<Vec<Listener>>,
    /// How `listeners` differs from the list published before it, if it does.
    pub listener_changes: Option<Arc<ListenerChanges>>,
    /// The delta from the node's previous snapshot.
    pub delta: Option<SnapshotDelta>,
}

/// The listener registry's changes from one published list (`base`) to the next: what a stream
/// that sent `base` sends instead of the whole list.
#[derive(Debug, PartialEq)]
pub struct ListenerChanges {
    /// The list these changes apply to.
    pub base: Arc<Vec<Listener>>,
    /// Listeners added or changed.
    pub put: Vec<Listener>,
    /// Keys of listeners gone.
    pub removed: Vec<ListenerKey>,
}

impl ListenerChanges {
    /// The changes that turn `base` into `target` (listeners are identified by their key).
    pub fn between(base: &Arc<Vec<Listener>>, target: &[Listener]) -> Self {
        let key = |listener: &Listener| listener.key.as_ref().map(listener_key);
        let mut before: BTreeMap<Option<String>, &Listener> =
            base.iter().map(|l| (key(l), l)).collect();
        let put = target
            .iter()
            .filter(|listener| before.remove(&key(listener)) != Some(*listener))
            .cloned()
            .collect();
        let removed = before
            .into_values()
            .map(|gone| gone.key.clone().unwrap_or_default())
            .collect();
        Self {
            base: base.clone(),
            put,
            removed,
        }
    }
}

/// `(base revision, delta)`: what turns the snapshot of the base revision into this one
/// (`stackroute_snapshot::delta`).
pub type SnapshotDelta = (u64, Vec<u8>);

/// A change to the listener or workload registry.
#[derive(Clone, Debug, PartialEq)]
pub enum RegistryChange {
    /// The whole registry, as read from the store (replaces everything but acks, which only
    /// ever move forward).
    Reset {
        /// Every listener.
        listeners: Vec<Listener>,
        /// Every workload.
        workloads: Vec<Workload>,
        /// Every shared ack.
        acks: Vec<AckRecord>,
    },
    /// A listener was registered (or re-registered).
    PutListener(Listener),
    /// A listener was removed (registry key, see [`listener_key`]).
    RemoveListener(String),
    /// A workload was registered.
    PutWorkload(Workload),
    /// A workload was removed (registry key, see [`workload_key`]).
    RemoveWorkload(String),
    /// A node's ack as shared through the store (by any replica, this one included).
    Ack(AckRecord),
    /// A replica had a watch stream of `node` open at `unix_ms` (shared through the store, so
    /// that no replica expires the registrations of an agent connected to another).
    Alive {
        /// Node name.
        node: String,
        /// Wall-clock time, milliseconds since the Unix epoch.
        unix_ms: u64,
    },
}

/// What [`Index::liveness`] found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Liveness {
    /// Nodes with a watch stream open to this replica.
    pub connected: Vec<String>,
    /// Registry keys (listeners, workloads) of nodes whose agent has been gone longer than
    /// the registration lease.
    pub expired_listeners: Vec<String>,
    /// See `expired_listeners`.
    pub expired_workloads: Vec<String>,
}

/// A node's registrations, for quotas.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeRegistrations {
    /// Listeners registered for the node.
    pub listeners: usize,
    /// Workloads registered for the node.
    pub workloads: usize,
    /// Their encoded size.
    pub bytes: usize,
    /// The registry key asked about is already registered (a re-registration replaces it).
    pub replaces: bool,
}

/// A node's ack as the replicas share it through the store (`acks/{node}` in etcd).
///
/// The revision alone would not do: revisions come from one counter shared by every replica,
/// but each replica compiles its own view of the sources, so whether revision `r` of replica B
/// contains a policy's current spec cannot be told from the revisions of replica A (B may have
/// compiled `r` before it saw a new spec that A compiled at a smaller revision, or after A's
/// first revision with it while B saw it first at a smaller one). So the replica that published
/// `r` and received the ack also says which policy versions the node's snapshot contained, and
/// every replica computes Programmed from those versions; `first_contained` is only ever
/// compared with the replica's own revisions.
///
/// What is left: a node's shared ack only moves to a greater revision, so an agent that moves to
/// a replica whose latest revision is lower than the one it acked elsewhere is counted with the
/// higher revision's contents until that replica publishes again — which matters only while the
/// two replicas' views of the sources differ (one lags behind the API server).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AckRecord {
    /// Node name.
    pub node: String,
    /// The revision the node's agent applied.
    pub revision: u64,
    /// Versions ([`PolicyRecord::fingerprint`]) of the policies aimed at the node that the
    /// snapshot of `revision` contained; sorted, no duplicates.
    pub contained: Vec<u64>,
}

/// A message to the index task.
#[derive(Debug)]
pub enum Command {
    /// A state-directory change.
    File(FileEvent),
    /// A registry change; the reply (if any) gets the lowest revision that includes it (the
    /// published one when the change leaves every table as published).
    Registry(RegistryChange, Option<oneshot::Sender<u64>>),
    /// An agent starts watching its node's snapshots.
    Subscribe {
        /// Node name.
        node: String,
        /// The agent's id.
        agent_id: String,
        /// The revision the agent already serves.
        known_revision: u64,
        /// Identifies this stream.
        stream_id: u64,
        /// The node's channel.
        reply: oneshot::Sender<watch::Receiver<Published>>,
    },
    /// A watch stream ended.
    Unsubscribe {
        /// Node name.
        node: String,
        /// The stream.
        stream_id: u64,
    },
    /// An agent applied (or rejected) a revision.
    Ack {
        /// Node name.
        node: String,
        /// The agent's id.
        agent_id: String,
        /// Revision.
        revision: u64,
        /// Non-empty if the agent rejected it.
        error: String,
        /// Gets the ack to share with other replicas, if it advanced the node.
        reply: oneshot::Sender<Option<AckRecord>>,
    },
    /// A node's capability report.
    Capabilities(NodeCapabilities),
    /// A status query.
    Status(oneshot::Sender<StatusResponse>),
    /// Per-policy status with generations, for the Kubernetes status writer.
    Policies(oneshot::Sender<Vec<PolicyReport>>),
    /// A compile finished (sent by the index task to itself).
    Compiled(Result<Box<CompileOutput>, String>),
    /// Which nodes are connected here and whose registrations expired (see [`Liveness`]).
    Liveness {
        /// The registration lease.
        lease: Duration,
        /// Wall-clock now, milliseconds since the Unix epoch.
        unix_ms: u64,
        /// Gets the answer.
        reply: oneshot::Sender<Liveness>,
    },
    /// What a node has registered, and whether a registry key is among it.
    NodeRegistrations(String, String, oneshot::Sender<NodeRegistrations>),
    /// Whether a policy that can pick RDMA selects pods of a namespace with these labels (the
    /// injection webhook's question, see [`Index::rdma_policy_selects`]).
    RdmaPolicySelects(String, Labels, oneshot::Sender<Option<bool>>),
}

// === impl IndexHandle ===

/// The sending side of the index task's channel; cheap to clone.
#[derive(Clone, Debug)]
pub struct IndexHandle {
    tx: mpsc::UnboundedSender<Command>,
    next_stream: Arc<std::sync::atomic::AtomicU64>,
}

/// The index task is gone (the process is shutting down).
#[derive(Debug, thiserror::Error)]
#[error("the index task has stopped")]
pub struct IndexClosed;

/// A node's snapshot channel; the index learns the stream ended when this is dropped.
#[derive(Debug)]
pub struct Subscription {
    /// Latest snapshot of the node.
    pub rx: watch::Receiver<Published>,
    guard: SubscriptionGuard,
}

impl Subscription {
    /// Splits into the receiver and the guard that must live as long as the stream.
    pub fn into_parts(self) -> (watch::Receiver<Published>, SubscriptionGuard) {
        (self.rx, self.guard)
    }
}

/// Tells the index a watch stream ended, when dropped.
#[derive(Debug)]
pub struct SubscriptionGuard {
    tx: mpsc::UnboundedSender<Command>,
    node: String,
    stream_id: u64,
}

impl Drop for SubscriptionGuard {
    fn drop(&mut self) {
        let _ = self.tx.send(Command::Unsubscribe {
            node: std::mem::take(&mut self.node),
            stream_id: self.stream_id,
        });
    }
}

impl IndexHandle {
    /// A handle and the receiving end for [`run`].
    pub fn channel() -> (Self, mpsc::UnboundedReceiver<Command>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Self {
                tx,
                next_stream: Arc::default(),
            },
            rx,
        )
    }

    /// Whether the index task has stopped.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Delivers a state-directory change.
    pub fn file(&self, event: FileEvent) -> Result<(), IndexClosed> {
        self.tx.send(Command::File(event)).map_err(|_| IndexClosed)
    }

    /// Delivers a registry change seen in the store (no reply).
    pub fn registry(&self, change: RegistryChange) {
        let _ = self.tx.send(Command::Registry(change, None));
    }

    /// Applies a registry change and returns the lowest revision that will include it: the
    /// published one when it changes no table and nothing else waits to be published.
    pub async fn register(&self, change: RegistryChange) -> Result<u64, IndexClosed> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Registry(change, Some(reply)))
            .map_err(|_| IndexClosed)?;
        rx.await.map_err(|_| IndexClosed)
    }

    /// Subscribes to a node's snapshots.
    pub async fn subscribe(
        &self,
        node: &str,
        agent_id: &str,
        known_revision: u64,
    ) -> Result<Subscription, IndexClosed> {
        let stream_id = self
            .next_stream
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (reply, rx) = oneshot::channel();
        // The guard exists before the request goes out, so a cancelled call still unsubscribes.
        let guard = SubscriptionGuard {
            tx: self.tx.clone(),
            node: node.to_string(),
            stream_id,
        };
        self.tx
            .send(Command::Subscribe {
                node: node.to_string(),
                agent_id: agent_id.to_string(),
                known_revision,
                stream_id,
                reply,
            })
            .map_err(|_| IndexClosed)?;
        let rx = rx.await.map_err(|_| IndexClosed)?;
        Ok(Subscription { rx, guard })
    }

    /// Records an ack and returns what to share with the other replicas: `Some` when it moved
    /// the node to a later revision this replica published.
    pub async fn ack(
        &self,
        node: String,
        agent_id: String,
        revision: u64,
        error: String,
    ) -> Result<Option<AckRecord>, IndexClosed> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Ack {
                node,
                agent_id,
                revision,
                error,
                reply,
            })
            .map_err(|_| IndexClosed)?;
        rx.await.map_err(|_| IndexClosed)
    }

    /// Records a capability report.
    pub fn capabilities(&self, report: NodeCapabilities) -> Result<(), IndexClosed> {
        self.tx
            .send(Command::Capabilities(report))
            .map_err(|_| IndexClosed)
    }

    /// Per-policy status with the generation it describes.
    pub async fn policies(&self) -> Result<Vec<PolicyReport>, IndexClosed> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Policies(reply))
            .map_err(|_| IndexClosed)?;
        rx.await.map_err(|_| IndexClosed)
    }

    /// The current status.
    /// See [`Liveness`].
    pub async fn liveness(&self, lease: Duration, unix_ms: u64) -> Result<Liveness, IndexClosed> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Liveness {
                lease,
                unix_ms,
                reply,
            })
            .map_err(|_| IndexClosed)?;
        rx.await.map_err(|_| IndexClosed)
    }

    /// What `node` has registered, and whether registry key `key` is among it.
    pub async fn node_registrations(
        &self,
        node: &str,
        key: &str,
    ) -> Result<NodeRegistrations, IndexClosed> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::NodeRegistrations(
                node.to_string(),
                key.to_string(),
                reply,
            ))
            .map_err(|_| IndexClosed)?;
        rx.await.map_err(|_| IndexClosed)
    }

    /// See [`Index::rdma_policy_selects`].
    pub async fn rdma_policy_selects(
        &self,
        namespace: String,
        labels: Labels,
    ) -> Result<Option<bool>, IndexClosed> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::RdmaPolicySelects(namespace, labels, reply))
            .map_err(|_| IndexClosed)?;
        rx.await.map_err(|_| IndexClosed)
    }

    pub async fn status(&self) -> Result<StatusResponse, IndexClosed> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Status(reply))
            .map_err(|_| IndexClosed)?;
        rx.await.map_err(|_| IndexClosed)
    }
}

// === impl Debouncer ===

/// When to recompile: `quiet` after the last change, but no later than `max_delay` after the
/// first unpublished one; within `urgent` when an agent waits for its node's first snapshot.
#[derive(Clone, Debug)]
pub struct Debouncer {
    quiet: Duration,
    max_delay: Duration,
    urgent_delay: Duration,
    first: Option<Instant>,
    last: Option<Instant>,
    urgent: Option<Instant>,
}

impl Debouncer {
    /// A debouncer with the given quiet period and maximum delay (urgent: 10 ms).
    pub fn new(quiet: Duration, max_delay: Duration) -> Self {
        Self {
            quiet,
            max_delay: max_delay.max(quiet),
            urgent_delay: Duration::from_millis(10).min(quiet),
            first: None,
            last: None,
            urgent: None,
        }
    }

    /// Something changed at `now`.
    pub fn changed(&mut self, now: Instant) {
        self.first.get_or_insert(now);
        self.last = Some(now);
    }

    /// Someone waits for a compile (a node's first snapshot).
    pub fn urgent(&mut self, now: Instant) {
        self.urgent.get_or_insert(now);
    }

    /// When the next compile should start, if one is due.
    pub fn deadline(&self) -> Option<Instant> {
        let debounced = match (self.first, self.last) {
            (Some(first), Some(last)) => Some((last + self.quiet).min(first + self.max_delay)),
            _ => None,
        };
        let urgent = self.urgent.map(|u| u + self.urgent_delay);
        match (debounced, urgent) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// A compile starts now: everything so far is included.
    pub fn take(&mut self) {
        self.first = None;
        self.last = None;
        self.urgent = None;
    }
}

// === impl Index ===

/// What agent connections (to this replica, or to others through shared acks) told us.
#[derive(Clone, Debug, Default)]
struct NodeRecord {
    /// Open watch streams to this replica: stream id → agent id.
    streams: BTreeMap<u64, String>,
    /// The highest revision the node acked, here or at another replica.
    acked: u64,
    /// Policy versions the snapshot of `acked` contained, as far as known (sorted): what
    /// Programmed is computed from.
    contained: Vec<u64>,
    last_error: String,
    capabilities: Option<NodeCapabilities>,
}

impl NodeRecord {
    /// Takes an ack: a later revision replaces what the node runs, the same revision adds
    /// what else is known about it, an earlier one changes nothing. Returns whether it moved
    /// the node forward.
    fn merge(&mut self, revision: u64, contained: Vec<u64>) -> bool {
        match revision.cmp(&self.acked) {
            std::cmp::Ordering::Greater => {
                self.acked = revision;
                self.contained = contained;
                self.contained.sort_unstable();
                self.contained.dedup();
                true
            }
            std::cmp::Ordering::Equal => {
                // Both describe the same snapshot (one replica published it): each lists
                // versions it certainly contained.
                self.contained.extend(contained);
                self.contained.sort_unstable();
                self.contained.dedup();
                false
            }
            std::cmp::Ordering::Less => false,
        }
    }
}

/// A policy as last compiled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyRecord {
    /// `StackRoute` or `ClusterStackRoute`.
    pub kind: &'static str,
    /// Namespace (empty for ClusterStackRoutes).
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `metadata.generation`, when the source sets it (Kubernetes).
    pub generation: Option<i64>,
    /// The policy's version: a hash of its object name and spec (see [`policy_version`]); a
    /// new value means a new version. Stable across processes, so replicas compare them in
    /// shared acks.
    pub fingerprint: u64,
    /// Nodes hosting one of its source pods (one allocation for policies with the same).
    pub targets: Arc<BTreeSet<String>>,
    /// Why the engine left it out, if it did.
    pub problem: Option<String>,
    /// Rules an earlier rule of the same object covers (they can never match).
    pub shadowed_rules: u32,
    /// Rules the NetworkPolicy gate took a kernel-bypass stack from (per source identity).
    pub gated_rules: u32,
    /// The first such rule's reason.
    pub gated_message: String,
}

impl PolicyRecord {
    fn object(&self) -> String {
        object_name(self.kind, &self.namespace, &self.name)
    }
}

fn object_name(kind: &str, namespace: &str, name: &str) -> String {
    if namespace.is_empty() {
        format!("{kind}/{name}")
    } else {
        format!("{kind}/{namespace}/{name}")
    }
}

/// A policy's status and the `metadata.generation` it describes (if known).
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyReport {
    /// Accepted/Programmed and counts.
    pub status: PolicyStatus,
    /// The generation in force (`None` for objects that never loaded).
    pub generation: Option<i64>,
}

/// The index proper: every input, the last compile, and the per-node channels.
#[derive(Debug)]
pub struct Index {
    files: BTreeMap<String, FileSource>,
    unreadable: BTreeMap<String, String>,
    listeners: BTreeMap<String, Listener>,
    workloads: BTreeMap<String, Workload>,
    nodes: BTreeMap<String, NodeRecord>,
    channels: BTreeMap<String, watch::Sender<Published>>,
    revision: u64,
    /// The pods come from the API server (Kubernetes mode): registrations never replace them.
    pods_authoritative: bool,
    published_at: Option<Instant>,
    /// The listener list of the last publish (see [`NodeUpdate::listener_changes`]).
    published_listeners: Arc<Vec<Listener>>,
    /// The list of nodes that need none (see [`CompileOutput::listener_nodes`]).
    no_listeners: Arc<Vec<Listener>>,
    state_nodes: BTreeSet<String>,
    policies: Vec<PolicyRecord>,
    /// For each of `policies`: the first revision of this replica that contained its current
    /// version (`None`: left out). Read by every ack, so it is not looked up by name there.
    contained_from: Vec<Option<u64>>,
    /// Node → indices into `policies` of those aimed at it (their `targets` inverted once per
    /// publish: an ack reads its node's, not every policy's target set).
    aimed_at: HashMap<String, Vec<u32>>,
    /// Policy object → (fingerprint, first revision of this replica that contained that
    /// version). Compared only with this replica's own revisions (see [`Index::contained`]).
    first_contained: BTreeMap<String, (u64, u64)>,
    /// Since when each node with registrations has had no watch stream here.
    gone_since: BTreeMap<String, Instant>,
    /// When another replica (or this one) last shared that a node's agent was connected.
    alive_elsewhere: BTreeMap<String, u64>,
    /// The revisions this replica published last (oldest first, at most [`RECENT_REVISIONS`]).
    recent: VecDeque<u64>,
    /// Sources that have not delivered their first complete view yet.
    pending_sources: BTreeSet<String>,
    /// Commands handled that changed the compile's inputs, and how many of them the published
    /// revision reflects: equal, nothing waits to be published.
    changes: u64,
    published_changes: u64,
    registry_synced: bool,
    settings: Settings,
    stale_after: Duration,
    metrics: Arc<Metrics>,
    ready: watch::Sender<bool>,
}

/// How many of its latest revisions a replica remembers publishing: acks of older ones (or of
/// other replicas' revisions) count as acked but show nothing programmed.
pub const RECENT_REVISIONS: usize = 64;

/// What a command means for the next compile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Nothing to recompile.
    None,
    /// Inputs changed: recompile after the debounce.
    Changed,
    /// An agent waits for its first snapshot: recompile soon.
    Urgent,
}

impl Index {
    /// An empty index. `ready` turns true after the first publish.
    pub fn new(
        settings: Settings,
        stale_after: Duration,
        metrics: Arc<Metrics>,
        ready: watch::Sender<bool>,
    ) -> Self {
        Self {
            files: BTreeMap::new(),
            unreadable: BTreeMap::new(),
            listeners: BTreeMap::new(),
            workloads: BTreeMap::new(),
            nodes: BTreeMap::new(),
            channels: BTreeMap::new(),
            revision: 0,
            pods_authoritative: false,
            published_at: None,
            published_listeners: Arc::default(),
            no_listeners: Arc::default(),
            state_nodes: BTreeSet::new(),
            policies: Vec::new(),
            contained_from: Vec::new(),
            aimed_at: HashMap::new(),
            first_contained: BTreeMap::new(),
            gone_since: BTreeMap::new(),
            alive_elsewhere: BTreeMap::new(),
            recent: VecDeque::new(),
            pending_sources: BTreeSet::from([crate::files::DIRECTORY.to_string()]),
            changes: 0,
            published_changes: 0,
            registry_synced: false,
            settings,
            stale_after,
            metrics,
            ready,
        }
    }

    /// Replaces the sources that must sync before the first compile (default: the state
    /// directory).
    pub fn expect_sources(&mut self, sources: impl IntoIterator<Item = String>) {
        self.pending_sources = sources.into_iter().collect();
    }

    /// Kubernetes mode: the API server's Pods are the truth about pod identity; a registered
    /// workload never replaces one (it only adds pods the API server does not know).
    pub fn pods_from_api_server(&mut self) {
        self.pods_authoritative = true;
    }

    /// The last published revision (0 before the first).
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Whether every source has synced, so a compile would not publish partial state.
    pub fn ready_to_compile(&self) -> bool {
        self.pending_sources.is_empty() && self.registry_synced
    }

    /// The smallest revision the next compile may use.
    pub fn revision_floor(&self) -> u64 {
        self.revision.saturating_add(1)
    }

    /// Applies one command (except [`Command::Compiled`], see [`Index::publish`]).
    pub fn handle(&mut self, command: Command, now: Instant) -> Effect {
        let effect = self.handle_command(command, now);
        if effect != Effect::None {
            self.changes += 1;
        }
        effect
    }

    fn handle_command(&mut self, command: Command, now: Instant) -> Effect {
        match command {
            Command::File(event) => self.apply_file(event),
            Command::Registry(change, reply) => {
                let settled = self.revision > 0 && self.published_changes == self.changes;
                let effect = self.apply_registry(change);
                if let Some(reply) = reply {
                    // A change that leaves every table as it is (a re-registration, a workload
                    // the sources already describe) is in the published revision already, unless
                    // something before it is still to be published: no new revision would come,
                    // and `stackroute run` would wait for one in vain.
                    let revision = if settled && effect == Effect::None {
                        self.revision
                    } else {
                        self.revision_floor()
                    };
                    let _ = reply.send(revision);
                }
                effect
            }
            Command::Subscribe {
                node,
                agent_id,
                known_revision,
                stream_id,
                reply,
            } => {
                let (rx, effect) = self.subscribe(&node, &agent_id, known_revision, stream_id);
                let _ = reply.send(rx);
                effect
            }
            Command::Unsubscribe { node, stream_id } => {
                self.unsubscribe(&node, stream_id);
                Effect::None
            }
            Command::Ack {
                node,
                agent_id,
                revision,
                error,
                reply,
            } => {
                let _ = reply.send(self.ack(&node, &agent_id, revision, error));
                Effect::None
            }
            Command::Capabilities(report) => {
                let node = report.node.clone();
                self.nodes.entry(node).or_default().capabilities = Some(report);
                Effect::None
            }
            Command::Status(reply) => {
                let _ = reply.send(self.status(now));
                Effect::None
            }
            Command::Liveness {
                lease,
                unix_ms,
                reply,
            } => {
                let _ = reply.send(self.liveness(now, unix_ms, lease));
                Effect::None
            }
            Command::NodeRegistrations(node, key, reply) => {
                let mut counts = self.node_registrations(&node);
                counts.replaces =
                    self.listeners.contains_key(&key) || self.workloads.contains_key(&key);
                let _ = reply.send(counts);
                Effect::None
            }
            Command::Policies(reply) => {
                let _ = reply.send(self.policy_reports(now));
                Effect::None
            }
            Command::RdmaPolicySelects(namespace, labels, reply) => {
                let _ = reply.send(self.rdma_policy_selects(&namespace, &labels));
                Effect::None
            }
            Command::Compiled(_) => Effect::None,
        }
    }

    /// Applies a state-directory event.
    pub fn apply_file(&mut self, event: FileEvent) -> Effect {
        match event {
            FileEvent::Changed(source, text) => {
                self.unreadable.remove(&source);
                match self.files.get_mut(&source) {
                    Some(file) => file.update(&source, &text),
                    None => {
                        self.files
                            .insert(source.clone(), FileSource::new(&source, &text));
                    }
                }
                let file = &self.files[&source];
                for problem in file.problems() {
                    if file.kept_previous() {
                        tracing::warn!(%problem, "state file has a problem; its last good version stays in force");
                    } else {
                        tracing::warn!(%problem, "state file has a problem; the rest of it applies");
                    }
                }
                if file.problems().is_empty() {
                    tracing::debug!(%source, "source loaded");
                }
                self.update_source_error_metric();
                Effect::Changed
            }
            FileEvent::Removed(source) => {
                self.unreadable.remove(&source);
                let removed = self.files.remove(&source).is_some();
                tracing::debug!(%source, "source removed");
                self.update_source_error_metric();
                if removed {
                    Effect::Changed
                } else {
                    Effect::None
                }
            }
            FileEvent::Unreadable(source, why) => {
                tracing::warn!(%source, %why, "cannot read state file; its last version stays in force");
                self.unreadable.insert(source, why);
                self.update_source_error_metric();
                Effect::None
            }
            FileEvent::Synced(source) => {
                if self.pending_sources.remove(&source) {
                    tracing::info!(%source, "source synced");
                }
                Effect::Changed
            }
        }
    }

    fn update_source_error_metric(&self) {
        let count = self
            .files
            .values()
            .map(|f| f.problems().len())
            .sum::<usize>()
            + self.unreadable.len();
        self.metrics.source_errors.set(count as i64);
    }

    /// Applies a registry change; identical re-registrations, and workload registrations that
    /// say what the sources already say about their pod, change nothing.
    pub fn apply_registry(&mut self, change: RegistryChange) -> Effect {
        let changed = match change {
            RegistryChange::Reset {
                listeners,
                workloads,
                acks,
            } => {
                for ack in acks {
                    self.remote_ack(ack);
                }
                let listeners: BTreeMap<String, Listener> = listeners
                    .into_iter()
                    .map(|l| (listener_key(&l.key.clone().unwrap_or_default()), l))
                    .collect();
                let workloads: BTreeMap<String, Workload> = workloads
                    .into_iter()
                    .map(|w| (workload_key(&w.key.clone().unwrap_or_default()), w))
                    .collect();
                let changed = listeners != self.listeners || workloads != self.workloads;
                self.listeners = listeners;
                self.workloads = workloads;
                let first = !self.registry_synced;
                self.registry_synced = true;
                changed || first
            }
            RegistryChange::PutListener(listener) => {
                let key = listener_key(&listener.key.clone().unwrap_or_default());
                self.listeners.insert(key, listener.clone()) != Some(listener)
            }
            RegistryChange::RemoveListener(key) => self.listeners.remove(&key).is_some(),
            RegistryChange::PutWorkload(workload) => {
                let key = workload_key(&workload.key.clone().unwrap_or_default());
                self.change_workload(key, Some(workload))
            }
            RegistryChange::RemoveWorkload(key) => self.change_workload(key, None),
            RegistryChange::Ack(ack) => {
                // Status only: nothing to recompile.
                self.remote_ack(ack);
                false
            }
            RegistryChange::Alive { node, unix_ms } => {
                let latest = self.alive_elsewhere.entry(node).or_default();
                *latest = (*latest).max(unix_ms);
                false
            }
        };
        self.metrics.listeners.set(self.listeners.len() as i64);
        self.metrics.workloads.set(self.workloads.len() as i64);
        if changed {
            Effect::Changed
        } else {
            Effect::None
        }
    }

    /// Puts (or with `None` removes) registry entry `key`; whether the merged state changed.
    fn change_workload(&mut self, key: String, workload: Option<Workload>) -> bool {
        let named = workload
            .as_ref()
            .or_else(|| self.workloads.get(&key))
            .and_then(|w| w.key.clone())
            .unwrap_or_default();
        let before = self.pods_named(&named);
        let changed = match workload {
            Some(workload) => self.workloads.insert(key, workload.clone()) != Some(workload),
            None => self.workloads.remove(&key).is_some(),
        };
        changed && self.pods_named(&named) != before
    }

    /// The merged state's pods with `key`'s namespace and name, without merging everything.
    fn pods_named(&self, key: &WorkloadKey) -> Vec<PodInfo> {
        let named = |namespace: &str, name: &str| namespace == key.namespace && name == key.name;
        let sources: Vec<&PodInfo> = self
            .files
            .values()
            .flat_map(|file| &file.objects().pods)
            .filter(|p| named(&p.namespace, &p.name))
            .collect();
        let registered: Vec<PodInfo> = self
            .workloads
            .values()
            .filter(|w| w.key.as_ref().is_some_and(|k| named(&k.namespace, &k.name)))
            .filter_map(|w| self.registered_pod(w, sources.first().copied()))
            .collect();
        if registered.is_empty() {
            sources.into_iter().cloned().collect()
        } else {
            registered
        }
    }

    /// The pod a registered workload stands for, given the sources' first pod of the same name;
    /// `None` when it may not replace that pod.
    ///
    /// A registered workload is the live truth about its pod: it replaces a file's copy. What a
    /// registration leaves empty (addresses, labels: `stackroute run` knows neither unless
    /// told) is taken from the file's Pod of the same name, so registering a process does not
    /// erase its pod's address. A node speaks only for itself: a registration never replaces a
    /// pod the sources place on another node, and with the API server as the source
    /// (Kubernetes mode) never replaces a Pod at all.
    fn registered_pod(&self, workload: &Workload, source: Option<&PodInfo>) -> Option<PodInfo> {
        let key = workload.key.as_ref()?;
        if source.is_some_and(|pod| {
            self.pods_authoritative || pod.node.as_deref().is_some_and(|node| node != key.node)
        }) {
            return None;
        }
        let mut labels: Labels = workload
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut ips: Vec<IpAddr> = workload
            .ips
            .iter()
            .filter_map(|ip| ip.parse().ok())
            .collect();
        if let Some(pod) = source {
            if labels.is_empty() {
                labels = pod.labels.clone();
            }
            if ips.is_empty() {
                ips = pod.ips.clone();
            }
        }
        Some(PodInfo {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            labels,
            node: Some(key.node.clone()),
            ips,
            host_network: false,
        })
    }

    fn subscribe(
        &mut self,
        node: &str,
        agent_id: &str,
        known_revision: u64,
        stream_id: u64,
    ) -> (watch::Receiver<Published>, Effect) {
        let record = self.nodes.entry(node.to_string()).or_default();
        record.streams.insert(stream_id, agent_id.to_string());
        self.gone_since.remove(node);
        tracing::info!(node, agent_id, known_revision, "agent connected");
        if known_revision > self.revision {
            // Never adopted: a caller must not be able to push every later revision to
            // u64::MAX. Revisions stay above an earlier life's on their own (etcd's counter;
            // the memory store starts from the wall clock).
            tracing::info!(
                node,
                known_revision,
                revision = self.revision,
                "the agent knows a revision this controller has not published; treated as 0"
            );
        }
        self.update_connected_metric();
        let sender = self
            .channels
            .entry(node.to_string())
            .or_insert_with(|| watch::channel(None).0);
        let rx = sender.subscribe();
        let effect = if sender.borrow().is_none() {
            Effect::Urgent
        } else {
            Effect::None
        };
        (rx, effect)
    }

    fn unsubscribe(&mut self, node: &str, stream_id: u64) {
        let Some(record) = self.nodes.get_mut(node) else {
            return;
        };
        if let Some(agent_id) = record.streams.remove(&stream_id) {
            tracing::info!(node, agent_id, "agent disconnected");
        }
        if record.streams.is_empty() {
            // Nobody watches: stop encoding this node until an agent comes back.
            self.channels.remove(node);
            self.gone_since.insert(node.to_string(), Instant::now());
        }
        self.update_connected_metric();
    }

    /// Nodes connected here, and the registrations of nodes whose agent has been gone (from
    /// this replica, and as far as the store tells, from every other) for `lease` or longer.
    /// A node with registrations but never seen by this replica starts its clock now.
    pub fn liveness(&mut self, now: Instant, unix_ms: u64, lease: Duration) -> Liveness {
        let connected: BTreeSet<&String> = self
            .nodes
            .iter()
            .filter(|(_, record)| !record.streams.is_empty())
            .map(|(node, _)| node)
            .collect();
        let registry_nodes: BTreeSet<String> = self
            .listeners
            .values()
            .filter_map(|l| l.key.as_ref().map(|k| k.node.clone()))
            .chain(
                self.workloads
                    .values()
                    .filter_map(|w| w.key.as_ref().map(|k| k.node.clone())),
            )
            .collect();
        let lease_ms = u64::try_from(lease.as_millis()).unwrap_or(u64::MAX);
        let mut expired = BTreeSet::new();
        for node in registry_nodes {
            if connected.contains(&node) {
                continue;
            }
            let since = *self.gone_since.entry(node.clone()).or_insert(now);
            let seen_elsewhere = self
                .alive_elsewhere
                .get(&node)
                .is_some_and(|at| unix_ms.saturating_sub(*at) < lease_ms);
            if now.saturating_duration_since(since) >= lease && !seen_elsewhere {
                expired.insert(node);
            }
        }
        let of_expired = |node: Option<&str>| node.is_some_and(|n| expired.contains(n));
        Liveness {
            connected: connected.into_iter().cloned().collect(),
            expired_listeners: self
                .listeners
                .iter()
                .filter(|(_, l)| of_expired(l.key.as_ref().map(|k| k.node.as_str())))
                .map(|(key, _)| key.clone())
                .collect(),
            expired_workloads: self
                .workloads
                .iter()
                .filter(|(_, w)| of_expired(w.key.as_ref().map(|k| k.node.as_str())))
                .map(|(key, _)| key.clone())
                .collect(),
        }
    }

    /// What `node` has registered (for quotas).
    pub fn node_registrations(&self, node: &str) -> NodeRegistrations {
        use prost::Message as _;
        let mut counts = NodeRegistrations::default();
        for listener in self.listeners.values() {
            if listener.key.as_ref().is_some_and(|k| k.node == node) {
                counts.listeners += 1;
                counts.bytes += listener.encoded_len();
            }
        }
        for workload in self.workloads.values() {
            if workload.key.as_ref().is_some_and(|k| k.node == node) {
                counts.workloads += 1;
                counts.bytes += workload.encoded_len();
            }
        }
        counts
    }

    fn update_connected_metric(&self) {
        let connected: usize = self.nodes.values().map(|n| n.streams.len()).sum();
        self.metrics.connected_agents.set(connected as i64);
    }

    /// An agent connected to this replica applied (or rejected) a revision. Returns the ack
    /// to share with the other replicas when it moved the node to a later revision of this
    /// replica's.
    fn ack(
        &mut self,
        node: &str,
        agent_id: &str,
        revision: u64,
        error: String,
    ) -> Option<AckRecord> {
        if !error.is_empty() {
            tracing::warn!(node, agent_id, revision, %error, "agent rejected a revision");
            self.nodes.entry(node.to_string()).or_default().last_error = error;
            return None;
        }
        // What the snapshot contained is known only for revisions this replica published. An
        // agent whose connection moved to this replica may still ack another replica's
        // revision: it counts as acked but proves nothing until that replica shares it.
        let ours = self.recent.contains(&revision);
        let contained = if ours {
            self.contained(node, revision)
        } else {
            Vec::new()
        };
        let record = self.nodes.entry(node.to_string()).or_default();
        record.last_error.clear();
        let advanced = record.merge(revision, contained.clone());
        if advanced {
            self.set_acked_metric(node, revision);
        }
        (advanced && ours).then(|| AckRecord {
            node: node.to_string(),
            revision,
            contained,
        })
    }

    /// An ack shared through the store (by another replica, or this one's own coming back):
    /// only ever moves the node forward; it is no agent of this replica's.
    fn remote_ack(&mut self, ack: AckRecord) {
        let AckRecord {
            node,
            revision,
            contained,
        } = ack;
        if self
            .nodes
            .entry(node.clone())
            .or_default()
            .merge(revision, contained)
        {
            self.set_acked_metric(&node, revision);
        }
    }

    fn set_acked_metric(&self, node: &str, revision: u64) {
        self.metrics
            .acked_revision
            .get_or_create(&vec![("node".to_string(), node.to_string())])
            .set(i64::try_from(revision).unwrap_or(i64::MAX));
    }

    /// The versions of the policies aimed at `node` that this replica's `revision` contained:
    /// those whose current version this replica first compiled at or before `revision`.
    /// `first_contained` holds this replica's own revisions, so `revision` must be one too.
    ///
    /// Targets are the last compile's: an ack of an earlier revision that arrives after a
    /// compile that moved a source pod onto the node counts that policy a moment early (the
    /// node acks the later revision right after).
    fn contained(&self, node: &str, revision: u64) -> Vec<u64> {
        let aimed = self.aimed_at.get(node).map_or(&[][..], Vec::as_slice);
        let mut versions: Vec<u64> = aimed
            .iter()
            .map(|&index| index as usize)
            .filter(|&index| self.contained_from[index].is_some_and(|first| first <= revision))
            .map(|index| self.policies[index].fingerprint)
            .collect();
        versions.sort_unstable();
        versions.dedup();
        versions
    }

    /// Whether a policy in force that can pick RDMA selects pods of `namespace` with `labels`
    /// as sources (read from the sources as they are now, not from the last compile: a pod
    /// admitted right after its policy was applied gets the device). One pass over the
    /// sources without merging them. `None` until every source has synced: a replica that
    /// just started does not know yet.
    pub fn rdma_policy_selects(&self, namespace: &str, labels: &Labels) -> Option<bool> {
        self.pending_sources.is_empty().then(|| {
            crate::webhook::rdma::selects(
                self.files.values().map(FileSource::objects),
                namespace,
                labels,
            )
        })
    }

    /// The state every file, registered workload and watching node contributes.
    pub fn merged_state(&self) -> ClusterState {
        let mut state = ClusterState::default();
        for file in self.files.values() {
            state.extend_from(file.objects());
        }
        // Registered workloads replace the sources' pods of the same name (see
        // [`Index::registered_pod`]).
        let registered: Vec<PodInfo> = self
            .workloads
            .values()
            .filter_map(|w| {
                let key = w.key.as_ref()?;
                let source = state
                    .pods
                    .iter()
                    .find(|p| p.namespace == key.namespace && p.name == key.name);
                self.registered_pod(w, source)
            })
            .collect();
        let names: HashSet<(&str, &str)> = registered
            .iter()
            .map(|p| (p.namespace.as_str(), p.name.as_str()))
            .collect();
        state
            .pods
            .retain(|p| !names.contains(&(p.namespace.as_str(), p.name.as_str())));
        state.pods.extend(registered);
        // A node with an agent gets a snapshot even if no file lists it.
        for node in self.channels.keys() {
            if !state.nodes.iter().any(|n| &n.name == node) {
                state.nodes.push(NodeInfo {
                    name: node.clone(),
                    zone: None,
                    addresses: Vec::new(),
                });
            }
        }
        state
    }

    /// Everything a compile needs.
    pub fn compile_input(&self) -> CompileInput {
        CompileInput {
            state: self.merged_state(),
            nodes: self.channels.keys().cloned().collect(),
            listeners: self.listeners.values().cloned().collect(),
            settings: self.settings.clone(),
            changes: self.changes,
            previous: self
                .channels
                .iter()
                .filter_map(|(node, channel)| Some((node.clone(), channel.borrow().clone()?)))
                .collect(),
        }
    }

    /// Publishes a compile's snapshots to the watching agents.
    pub fn publish(&mut self, output: CompileOutput, now: Instant) {
        debug_assert!(output.revision > self.revision, "revisions must increase");
        self.revision = output.revision.max(self.revision);
        self.published_changes = output.changes;
        self.published_at = Some(now);
        self.metrics
            .revision
            .set(i64::try_from(self.revision).unwrap_or(i64::MAX));
        self.metrics
            .compile_seconds
            .observe(output.duration.as_secs_f64());
        // An unchanged list stays the same allocation, so streams compare pointers, not lists.
        let (listeners, listener_changes) = if output.listeners == self.published_listeners {
            (self.published_listeners.clone(), None)
        } else {
            let changes = ListenerChanges::between(&self.published_listeners, &output.listeners);
            (output.listeners.clone(), Some(Arc::new(changes)))
        };
        self.published_listeners = listeners.clone();
        let mut sent = 0;
        // Nodes whose policies cannot pick RDMA get an empty list (one allocation for all).
        let no_listeners = self.no_listeners.clone();
        for (node, snapshot, delta) in output.snapshots {
            if let Some(channel) = self.channels.get(&node) {
                let (listeners, listener_changes) = if output.listener_nodes.contains(&node) {
                    (listeners.clone(), listener_changes.clone())
                } else {
                    (no_listeners.clone(), None)
                };
                channel.send_replace(Some(Arc::new(NodeUpdate {
                    revision: output.revision,
                    node: node.clone(),
                    snapshot,
                    listeners,
                    listener_changes,
                    delta,
                })));
                sent += 1;
            }
        }
        self.recent.push_back(output.revision);
        while self.recent.len() > RECENT_REVISIONS {
            self.recent.pop_front();
        }
        let mut present = BTreeSet::new();
        for policy in &output.policies {
            if policy.problem.is_some() {
                // Left out of this revision's snapshots: contained from the first revision
                // that has it again.
                continue;
            }
            let object = policy.object();
            let entry = self
                .first_contained
                .entry(object.clone())
                .or_insert((policy.fingerprint, output.revision));
            if entry.0 != policy.fingerprint {
                *entry = (policy.fingerprint, output.revision);
            }
            present.insert(object);
        }
        self.first_contained.retain(|k, _| present.contains(k));
        self.contained_from = output
            .policies
            .iter()
            .map(|p| {
                let (version, first) = self.first_contained.get(&p.object())?;
                (p.problem.is_none() && *version == p.fingerprint).then_some(*first)
            })
            .collect();
        // Inverted once per distinct target set (policies share them), in policy order.
        let mut by_targets: HashMap<*const BTreeSet<String>, (&BTreeSet<String>, Vec<u32>)> =
            HashMap::new();
        for (index, policy) in output.policies.iter().enumerate() {
            by_targets
                .entry(Arc::as_ptr(&policy.targets))
                .or_insert_with(|| (&policy.targets, Vec::new()))
                .1
                .push(index as u32);
        }
        let mut aimed_at: HashMap<String, Vec<u32>> = HashMap::new();
        for (targets, indexes) in by_targets.values() {
            for node in *targets {
                match aimed_at.get_mut(node.as_str()) {
                    Some(aimed) => aimed.extend_from_slice(indexes),
                    None => {
                        aimed_at.insert(node.clone(), indexes.clone());
                    }
                }
            }
        }
        for aimed in aimed_at.values_mut() {
            aimed.sort_unstable();
        }
        self.aimed_at = aimed_at;
        self.metrics.network_policy_gated_rules.set(
            output
                .policies
                .iter()
                .map(|p| i64::from(p.gated_rules))
                .sum(),
        );
        self.policies = output.policies;
        self.state_nodes = output.nodes;
        tracing::info!(
            revision = output.revision,
            nodes = sent,
            policies = self.policies.len(),
            compile_ms = output.duration.as_millis() as u64,
            "published"
        );
        self.ready.send_replace(true);
    }

    /// Per-policy status with generations.
    pub fn policy_reports(&self, now: Instant) -> Vec<PolicyReport> {
        let generations: BTreeMap<(String, String, String), Option<i64>> = self
            .policies
            .iter()
            .map(|p| {
                (
                    (p.kind.to_string(), p.namespace.clone(), p.name.clone()),
                    p.generation,
                )
            })
            .collect();
        self.status(now)
            .policies
            .into_iter()
            .map(|status| {
                let key = (
                    status.kind.clone(),
                    status.namespace.clone(),
                    status.name.clone(),
                );
                PolicyReport {
                    generation: generations.get(&key).copied().flatten(),
                    status,
                }
            })
            .collect()
    }

    /// Nodes, acks, and per-policy Accepted/Programmed.
    pub fn status(&self, now: Instant) -> StatusResponse {
        let lagging = self
            .published_at
            .is_some_and(|at| now.saturating_duration_since(at) > self.stale_after);
        let names: BTreeSet<&String> = self.state_nodes.iter().chain(self.nodes.keys()).collect();
        let nodes = names
            .into_iter()
            .map(|name| {
                let record = self.nodes.get(name).cloned().unwrap_or_default();
                let connected = !record.streams.is_empty();
                let behind = record.acked < self.revision;
                NodeStatus {
                    node: name.clone(),
                    agents: record.streams.values().cloned().collect(),
                    acked_revision: record.acked,
                    connected,
                    stale: !connected || (behind && lagging),
                    capabilities: record.capabilities,
                }
            })
            .collect();

        let mut load_problems: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut source_errors = Vec::new();
        for file in self.files.values() {
            for problem in file.problems() {
                let mut text = problem.to_string();
                if file.kept_previous() {
                    text.push_str(" (the last good version of this file stays in force)");
                }
                if problem.invalid_policy
                    && let Some(object) = &problem.object
                {
                    load_problems
                        .entry(object.clone())
                        .or_default()
                        .push(text.clone());
                }
                source_errors.push(text);
            }
        }
        for (source, why) in &self.unreadable {
            source_errors.push(format!("{source}: cannot read: {why}"));
        }

        let mut policies = Vec::new();
        let mut listed = BTreeSet::new();
        for policy in &self.policies {
            let object = policy.object();
            // Programmed on a node: the snapshot it acked last (here or at another replica)
            // contained this version of the policy.
            let programmed_nodes = if policy.problem.is_some() {
                0
            } else {
                policy
                    .targets
                    .iter()
                    .filter(|node| {
                        self.nodes
                            .get(*node)
                            .is_some_and(|r| r.contained.binary_search(&policy.fingerprint).is_ok())
                    })
                    .count()
            };
            let mut messages: Vec<String> = policy.problem.iter().cloned().collect();
            messages.extend(load_problems.get(&object).into_iter().flatten().cloned());
            policies.push(PolicyStatus {
                kind: policy.kind.to_string(),
                namespace: policy.namespace.clone(),
                name: policy.name.clone(),
                accepted: messages.is_empty(),
                message: messages.join("; "),
                programmed: policy.problem.is_none() && programmed_nodes == policy.targets.len(),
                target_nodes: policy.targets.len() as u32,
                programmed_nodes: programmed_nodes as u32,
                shadowed_rules: policy.shadowed_rules,
                network_policy_gated_rules: policy.gated_rules,
                network_policy_message: policy.gated_message.clone(),
            });
            listed.insert(object);
        }
        // Invalid objects that never made it into the state.
        for (object, messages) in &load_problems {
            if listed.contains(object) {
                continue;
            }
            let mut parts = object.splitn(3, '/');
            let kind = parts.next().unwrap_or_default().to_string();
            let (namespace, name) = match (parts.next(), parts.next()) {
                (Some(ns), Some(name)) => (ns.to_string(), name.to_string()),
                (Some(name), None) => (String::new(), name.to_string()),
                _ => (String::new(), String::new()),
            };
            policies.push(PolicyStatus {
                kind,
                namespace,
                name,
                accepted: false,
                message: messages.join("; "),
                programmed: false,
                target_nodes: 0,
                programmed_nodes: 0,
                shadowed_rules: 0,
                ..Default::default()
            });
        }

        StatusResponse {
            revision: self.revision,
            nodes,
            policies,
            source_errors,
            listeners: self.listeners.len() as u32,
            workloads: self.workloads.len() as u32,
        }
    }
}

/// Runs the index task until every handle is dropped.
pub async fn run(
    mut index: Index,
    handle: IndexHandle,
    mut rx: mpsc::UnboundedReceiver<Command>,
    store: Arc<dyn Store>,
    mut debouncer: Debouncer,
) {
    let mut compiling = false;
    loop {
        let deadline = if compiling || !index.ready_to_compile() {
            None
        } else {
            debouncer.deadline()
        };
        let due = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            command = rx.recv() => {
                let Some(command) = command else { return };
                let now = Instant::now();
                match command {
                    Command::Compiled(result) => {
                        compiling = false;
                        match result {
                            Ok(output) => {
                                index.publish(*output, now);
                                // The previous revision's tables were freed just now.
                                tokio::task::spawn_blocking(crate::memory::release_freed);
                            }
                            Err(error) => {
                                tracing::error!(%error, "compile failed; retrying");
                                debouncer.changed(now);
                            }
                        }
                    }
                    command => match index.handle(command, now) {
                        Effect::None => {}
                        Effect::Changed => debouncer.changed(now),
                        Effect::Urgent => debouncer.urgent(now),
                    },
                }
            }
            () = due => {
                debouncer.take();
                compiling = true;
                let input = index.compile_input();
                let floor = index.revision_floor();
                let store = store.clone();
                let tx = handle.tx.clone();
                tokio::spawn(async move {
                    let result = compile_task(store, input, floor).await;
                    let _ = tx.send(Command::Compiled(result));
                });
            }
        }
    }
}

async fn compile_task(
    store: Arc<dyn Store>,
    input: CompileInput,
    floor: u64,
) -> Result<Box<CompileOutput>, String> {
    let revision = store
        .next_revision(floor)
        .await
        .map_err(|e| format!("no revision from the {} store: {e:#}", store.kind()))?;
    tokio::task::spawn_blocking(move || Box::new(compile(input, revision)))
        .await
        .map_err(|e| format!("compile task failed: {e}"))
}

mod compile;
pub use compile::{CompileInput, CompileOutput, compile, policy_version};

#[cfg(test)]
mod tests;
