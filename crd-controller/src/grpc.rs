//! The `Distribution` gRPC service: authenticates the caller and checks that it acts only for
//! its own node ([`crate::auth`]), validates every request at the edge
//! ([`stackroute_proto::validate`]), then talks to the index through its channel. A malformed
//! request gets `InvalidArgument` with the reason and never reaches the index.

use std::pin::Pin;
use std::sync::Arc;

use stackroute_proto::v1alpha1::distribution_server::Distribution;
use stackroute_proto::v1alpha1::{
    AckRequest, AckResponse, ApiVersion, CapabilitiesResponse, DpdkCapability, Listener,
    ListenerKey, NodeCapabilities, RegistrationResponse, SnapshotUpdate, StatusRequest,
    StatusResponse, WatchRequest, Workload, WorkloadKey,
};
use stackroute_proto::validate::{
    MAX_DPDK_LIST, MAX_DPDK_REASON, MAX_ITEMS, MAX_NAME, MAX_RDMA_ENTRIES, MAX_RDMA_REASON,
    check_listener, check_listener_key, check_name, check_workload, check_workload_key,
    rdma_entries,
};
use tokio_stream::{Stream, StreamExt as _};
use tonic::{Request, Response, Status};

use std::collections::HashMap;
use std::sync::Mutex;

use stackroute_proto::identity::Caller;

use crate::auth::Authenticator;
use crate::index::{IndexClosed, IndexHandle, NodeUpdate, RegistryChange};
use crate::metrics::Metrics;
use crate::store::{Store, listener_key, workload_key};

/// What one watch stream sent its agent last, so the next message can be a delta and leave out
/// an unchanged listener list (or send only its changes), and what it still has to send of a
/// whole snapshot in parts.
struct SentToAgent {
    accepts_delta: bool,
    accepts_listener_deltas: bool,
    /// Parts of at most this many bytes for an agent that reassembles them; `None`: whole.
    chunk_bytes: Option<usize>,
    /// The revision the agent holds: the one sent last, or the one it said it had.
    revision: u64,
    /// The revision's list, shared with every other stream (not a copy per agent).
    listeners: Option<Arc<Vec<Listener>>>,
    /// A whole snapshot being sent in parts, and where its next part starts.
    sending: Option<(Arc<NodeUpdate>, usize)>,
}

impl SentToAgent {
    fn new(request: &WatchRequest, chunk_bytes: usize) -> Self {
        Self {
            accepts_delta: request.accepts_delta,
            accepts_listener_deltas: request.accepts_delta && request.accepts_listener_deltas,
            chunk_bytes: request.accepts_chunks.then_some(chunk_bytes.max(1)),
            revision: request.known_revision,
            listeners: None,
            sending: None,
        }
    }

    /// The message for `update`: its delta when it starts from what the agent holds, else the
    /// whole snapshot — or its first part, when it is larger than a part
    /// ([`SentToAgent::next_part`] gives the others).
    fn next(&mut self, update: &Arc<NodeUpdate>) -> SnapshotUpdate {
        let held = self.listeners.as_ref();
        let listeners_unchanged = self.accepts_delta
            && held.is_some_and(|held| {
                Arc::ptr_eq(held, &update.listeners) || *held == update.listeners
            });
        let listener_changes = update.listener_changes.as_ref().filter(|changes| {
            !listeners_unchanged
                && self.accepts_listener_deltas
                && held.is_some_and(|held| Arc::ptr_eq(held, &changes.base))
        });
        let listeners = if listeners_unchanged || listener_changes.is_some() {
            Vec::new()
        } else {
            update.listeners.to_vec()
        };
        let whole_len = update.snapshot.len();
        let message = match &update.delta {
            Some((base, delta)) if self.accepts_delta && *base == self.revision => SnapshotUpdate {
                revision: update.revision,
                node: update.node.clone(),
                snapshot: Vec::new(),
                listeners,
                delta: delta.clone(),
                base_revision: *base,
                listeners_unchanged,
                ..Default::default()
            },
            _ => match self.chunk_bytes.filter(|chunk| whole_len > *chunk) {
                Some(chunk) => {
                    self.sending = Some((update.clone(), chunk));
                    SnapshotUpdate {
                        revision: update.revision,
                        node: update.node.clone(),
                        snapshot: update.snapshot.read(0..chunk),
                        listeners,
                        listeners_unchanged,
                        snapshot_offset: 0,
                        snapshot_len: whole_len as u64,
                        ..Default::default()
                    }
                }
                None => SnapshotUpdate {
                    revision: update.revision,
                    node: update.node.clone(),
                    snapshot: update.snapshot.assemble(),
                    listeners,
                    listeners_unchanged,
                    ..Default::default()
                },
            },
        };
        self.revision = update.revision;
        self.listeners = Some(update.listeners.clone());
        match listener_changes {
            Some(changes) => SnapshotUpdate {
                listeners_delta: true,
                listeners_put: changes.put.clone(),
                listeners_removed: changes.removed.clone(),
                ..message
            },
            None => message,
        }
    }

    /// The next part of a whole snapshot being sent in parts, read from its parts now.
    fn next_part(&mut self) -> Option<SnapshotUpdate> {
        let (update, offset) = self.sending.take()?;
        let chunk = self.chunk_bytes.unwrap_or(usize::MAX);
        let whole_len = update.snapshot.len();
        let end = offset.saturating_add(chunk).min(whole_len);
        let part = SnapshotUpdate {
            revision: update.revision,
            node: update.node.clone(),
            snapshot: update.snapshot.read(offset..end),
            listeners_unchanged: true,
            snapshot_offset: offset as u64,
            snapshot_len: whole_len as u64,
            ..Default::default()
        };
        if end < whole_len {
            self.sending = Some((update, end));
        }
        Some(part)
    }
}

/// One agent's watch: the node's updates as messages, the parts of a whole snapshot one at a
/// time (each read when tonic asks for it, so a stream holds one part, not the snapshot), and a
/// newer revision only after the parts of the one being sent.
struct Watch<S, G> {
    updates: S,
    sent: SentToAgent,
    metrics: Arc<Metrics>,
    /// Alive as long as the stream: the index hears when tonic drops it (client gone).
    _guard: G,
}

impl<S, G> Stream for Watch<S, G>
where
    S: Stream<Item = Arc<NodeUpdate>> + Unpin,
    G: Unpin,
{
    type Item = Result<SnapshotUpdate, Status>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        let message = match self.sent.next_part() {
            Some(part) => part,
            None => match std::task::ready!(Pin::new(&mut self.updates).poll_next(cx)) {
                Some(update) => self.sent.next(&update),
                None => return std::task::Poll::Ready(None),
            },
        };
        let encoding = if message.delta.is_empty() {
            "full"
        } else {
            "delta"
        };
        self.metrics
            .snapshot_sent(encoding, message.snapshot.len() + message.delta.len());
        std::task::Poll::Ready(Some(Ok(message)))
    }
}

/// Parts of a whole snapshot, unless `--snapshot-chunk-bytes` says otherwise. Measured with
/// 5,000 agents connecting at once (the fan-out bench's envelope): 32 KiB parts left the
/// controller at 3.3–3.4 GiB, 256 KiB parts at 6.8 GiB, 8 KiB parts at 4.5 GiB.
pub const DEFAULT_CHUNK_BYTES: usize = 32 * 1024;

/// Most snapshot streams one node may hold open at once (an agent holds one; a hand-over
/// briefly two).
pub const MAX_WATCHES_PER_NODE: usize = 4;

/// What one node may register (`--max-*-per-node`).
#[derive(Clone, Copy, Debug)]
pub struct Quotas {
    /// Listeners.
    pub listeners: usize,
    /// Workloads.
    pub workloads: usize,
    /// Encoded bytes of both.
    pub bytes: usize,
}

impl Default for Quotas {
    fn default() -> Self {
        Self {
            listeners: 4096,
            workloads: 1024,
            bytes: 4 * 1024 * 1024,
        }
    }
}

/// The service.
#[derive(Clone)]
pub struct DistributionService {
    quotas: Quotas,
    index: IndexHandle,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    auth: Arc<Authenticator>,
    watches: Arc<Mutex<HashMap<String, usize>>>,
    chunk_bytes: usize,
}

/// Holds one of a node's watch slots while its stream lives.
struct WatchSlot {
    node: String,
    watches: Arc<Mutex<HashMap<String, usize>>>,
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        let mut watches = self.watches.lock().expect("watch slots");
        if let Some(count) = watches.get_mut(&self.node) {
            *count -= 1;
            if *count == 0 {
                watches.remove(&self.node);
            }
        }
    }
}

impl DistributionService {
    /// A service over the index and store, authenticating callers with `auth`.
    pub fn new(
        index: IndexHandle,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        auth: Authenticator,
        quotas: Quotas,
    ) -> Self {
        Self {
            quotas,
            index,
            store,
            metrics,
            auth: Arc::new(auth),
            watches: Arc::default(),
            chunk_bytes: DEFAULT_CHUNK_BYTES,
        }
    }

    /// Sends whole snapshots larger than `bytes` in parts to agents that reassemble them.
    pub fn with_chunk_bytes(self, bytes: usize) -> Self {
        Self {
            chunk_bytes: bytes.max(1),
            ..self
        }
    }

    /// Authenticates the caller of `request` and checks it may act for `node`.
    async fn for_node<T>(
        &self,
        method: &str,
        request: &Request<T>,
        node: impl FnOnce(&T) -> &str,
    ) -> Result<(), Status> {
        let caller = self.auth.caller(method, request).await?;
        self.auth
            .for_node(method, caller.as_ref(), node(request.get_ref()))
    }

    /// Refuses a registration that would take `node` over its quota. Re-registering an entry
    /// the node already holds (an agent re-sends everything on reconnect) is always allowed.
    async fn within_quota(
        &self,
        method: &str,
        node: &str,
        key: &str,
        listener: bool,
        bytes: usize,
    ) -> Result<(), Status> {
        let held = self.index.node_registrations(node, key).await?;
        if held.replaces {
            return Ok(());
        }
        let over = if listener && held.listeners >= self.quotas.listeners {
            Some(format!("{} listeners", self.quotas.listeners))
        } else if !listener && held.workloads >= self.quotas.workloads {
            Some(format!("{} workloads", self.quotas.workloads))
        } else if held.bytes + bytes > self.quotas.bytes {
            Some(format!("{} bytes of registrations", self.quotas.bytes))
        } else {
            None
        };
        match over {
            None => Ok(()),
            Some(quota) => {
                self.metrics.denied(method, "quota");
                Err(Status::resource_exhausted(format!(
                    "node {node} is at its quota of {quota}"
                )))
            }
        }
    }

    fn watch_slot(&self, node: &str) -> Result<WatchSlot, Status> {
        let mut watches = self.watches.lock().expect("watch slots");
        let count = watches.entry(node.to_string()).or_default();
        if *count >= MAX_WATCHES_PER_NODE {
            self.metrics.denied("WatchSnapshots", "stream-limit");
            return Err(Status::resource_exhausted(format!(
                "node {node} already holds {MAX_WATCHES_PER_NODE} snapshot streams"
            )));
        }
        *count += 1;
        Ok(WatchSlot {
            node: node.to_string(),
            watches: self.watches.clone(),
        })
    }

    fn invalid(&self, method: &str, message: String) -> Status {
        self.metrics.invalid(method);
        tracing::warn!(method, %message, "rejected an invalid request");
        Status::invalid_argument(message)
    }
}

impl From<IndexClosed> for Status {
    fn from(_: IndexClosed) -> Self {
        Self::unavailable("the controller is shutting down")
    }
}

fn store_error(error: anyhow::Error) -> Status {
    tracing::warn!(error = format!("{error:#}"), "store write failed");
    Status::unavailable(format!("the registry store is unavailable: {error:#}"))
}

fn check_watch(request: &WatchRequest) -> Result<(), String> {
    check_name("node", &request.node)?;
    if request.agent_id.len() > MAX_NAME {
        return Err(format!("agent_id is longer than {MAX_NAME} bytes"));
    }
    if request.api_version != ApiVersion::V1alpha1 as i32 {
        return Err(format!(
            "api_version {} is not supported; this controller serves API_VERSION_V1ALPHA1",
            request.api_version
        ));
    }
    Ok(())
}

fn check_capabilities(report: &NodeCapabilities) -> Result<(), String> {
    check_name("node", &report.node)?;
    let lists = report.available_congestion_control.len()
        + report.allowed_congestion_control.len()
        + report.rdma_devices.len();
    if lists > 4 * MAX_ITEMS {
        return Err("too many entries in the capability report".into());
    }
    let rdma =
        report.uverbs_devices.len() + report.rdma_devices.iter().map(rdma_entries).sum::<usize>();
    if rdma > MAX_RDMA_ENTRIES {
        return Err(format!(
            "too many RDMA entries in the capability report ({rdma} devices, ports, GIDs and \
             uverbs devices; at most {MAX_RDMA_ENTRIES})"
        ));
    }
    if report.rdma_unavailable_reason.len() > MAX_RDMA_REASON {
        return Err(format!(
            "rdma_unavailable_reason is longer than {MAX_RDMA_REASON} bytes"
        ));
    }
    if let Some(dpdk) = &report.dpdk_detail {
        check_dpdk(dpdk)?;
    }
    Ok(())
}

fn check_dpdk(dpdk: &DpdkCapability) -> Result<(), String> {
    if dpdk.pmds.len() > MAX_DPDK_LIST || dpdk.bound_devices.len() > MAX_DPDK_LIST {
        return Err(format!(
            "too many DPDK entries in the capability report ({} PMDs, {} bound devices; at most \
             {MAX_DPDK_LIST} each)",
            dpdk.pmds.len(),
            dpdk.bound_devices.len()
        ));
    }
    let names = std::iter::once(("dpdk version", &dpdk.version))
        .chain(dpdk.pmds.iter().map(|pmd| ("dpdk pmd", pmd)))
        .chain(dpdk.bound_devices.iter().flat_map(|device| {
            [
                ("dpdk pci_address", &device.pci_address),
                ("dpdk driver", &device.driver),
            ]
        }));
    for (field, value) in names {
        if value.len() > MAX_NAME {
            return Err(format!("{field} is longer than {MAX_NAME} bytes"));
        }
    }
    if dpdk.unavailable_reason.len() > MAX_DPDK_REASON {
        return Err(format!(
            "dpdk unavailable_reason is longer than {MAX_DPDK_REASON} bytes"
        ));
    }
    Ok(())
}

// === impl Distribution ===

type SnapshotStream = Pin<Box<dyn Stream<Item = Result<SnapshotUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl Distribution for DistributionService {
    type WatchSnapshotsStream = SnapshotStream;

    async fn watch_snapshots(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchSnapshotsStream>, Status> {
        self.for_node("WatchSnapshots", &request, |r| &r.node)
            .await?;
        let request = request.into_inner();
        check_watch(&request).map_err(|m| self.invalid("WatchSnapshots", m))?;
        let slot = self.watch_slot(&request.node)?;
        let subscription = self
            .index
            .subscribe(&request.node, &request.agent_id, request.known_revision)
            .await?;
        let (rx, guard) = subscription.into_parts();
        let updates = tokio_stream::wrappers::WatchStream::new(rx).filter_map(|update| update);
        Ok(Response::new(Box::pin(Watch {
            updates: Box::pin(updates),
            sent: SentToAgent::new(&request, self.chunk_bytes),
            metrics: self.metrics.clone(),
            _guard: (guard, slot),
        })))
    }

    async fn ack(&self, request: Request<AckRequest>) -> Result<Response<AckResponse>, Status> {
        self.for_node("Ack", &request, |r| &r.node).await?;
        let request = request.into_inner();
        check_name("node", &request.node).map_err(|m| self.invalid("Ack", m))?;
        if request.error.len() > 4096 {
            return Err(self.invalid("Ack", "error is longer than 4096 bytes".into()));
        }
        // Other replicas (the status writer among them) learn of it through the store.
        let shared = self
            .index
            .ack(
                request.node,
                request.agent_id,
                request.revision,
                request.error,
            )
            .await?;
        if let Some(ack) = shared.filter(|_| self.store.shares_acks())
            && let Err(error) = self.store.put_ack(&ack).await
        {
            // This replica has it; the agent would not retry an ack, so do not fail it.
            tracing::warn!(node = %ack.node, revision = ack.revision,
                error = format!("{error:#}"),
                "could not share an ack with the other replicas; they see the node's next one");
        }
        Ok(Response::new(AckResponse {}))
    }

    async fn register_listener(
        &self,
        request: Request<Listener>,
    ) -> Result<Response<RegistrationResponse>, Status> {
        self.for_node("RegisterListener", &request, |r| {
            r.key.as_ref().map_or("", |k| k.node.as_str())
        })
        .await?;
        let listener = check_listener(request.into_inner())
            .map_err(|m| self.invalid("RegisterListener", m))?;
        let node = listener.key.as_ref().map_or("", |k| k.node.as_str());
        self.within_quota(
            "RegisterListener",
            node,
            &listener_key(listener.key.as_ref().expect("validated")),
            true,
            prost::Message::encoded_len(&listener),
        )
        .await?;
        self.store
            .put_listener(&listener)
            .await
            .map_err(store_error)?;
        self.metrics.registration("listener", "put");
        let revision = self
            .index
            .register(RegistryChange::PutListener(listener))
            .await?;
        Ok(Response::new(RegistrationResponse { revision }))
    }

    async fn remove_listener(
        &self,
        request: Request<ListenerKey>,
    ) -> Result<Response<RegistrationResponse>, Status> {
        self.for_node("RemoveListener", &request, |r| &r.node)
            .await?;
        let key = request.into_inner();
        check_listener_key(Some(&key)).map_err(|m| self.invalid("RemoveListener", m))?;
        let key = listener_key(&key);
        self.store
            .remove_listener(&key)
            .await
            .map_err(store_error)?;
        self.metrics.registration("listener", "remove");
        let revision = self
            .index
            .register(RegistryChange::RemoveListener(key))
            .await?;
        Ok(Response::new(RegistrationResponse { revision }))
    }

    async fn register_workload(
        &self,
        request: Request<Workload>,
    ) -> Result<Response<RegistrationResponse>, Status> {
        self.for_node("RegisterWorkload", &request, |r| {
            r.key.as_ref().map_or("", |k| k.node.as_str())
        })
        .await?;
        let workload = check_workload(request.into_inner())
            .map_err(|m| self.invalid("RegisterWorkload", m))?;
        let node = workload.key.as_ref().map_or("", |k| k.node.as_str());
        self.within_quota(
            "RegisterWorkload",
            node,
            &workload_key(workload.key.as_ref().expect("validated")),
            false,
            prost::Message::encoded_len(&workload),
        )
        .await?;
        self.store
            .put_workload(&workload)
            .await
            .map_err(store_error)?;
        self.metrics.registration("workload", "put");
        let revision = self
            .index
            .register(RegistryChange::PutWorkload(workload))
            .await?;
        Ok(Response::new(RegistrationResponse { revision }))
    }

    async fn remove_workload(
        &self,
        request: Request<WorkloadKey>,
    ) -> Result<Response<RegistrationResponse>, Status> {
        self.for_node("RemoveWorkload", &request, |r| &r.node)
            .await?;
        let key = request.into_inner();
        check_workload_key(Some(&key)).map_err(|m| self.invalid("RemoveWorkload", m))?;
        let key = workload_key(&key);
        self.store
            .remove_workload(&key)
            .await
            .map_err(store_error)?;
        self.metrics.registration("workload", "remove");
        let revision = self
            .index
            .register(RegistryChange::RemoveWorkload(key))
            .await?;
        Ok(Response::new(RegistrationResponse { revision }))
    }

    async fn report_capabilities(
        &self,
        request: Request<NodeCapabilities>,
    ) -> Result<Response<CapabilitiesResponse>, Status> {
        self.for_node("ReportCapabilities", &request, |r| &r.node)
            .await?;
        let report = request.into_inner();
        check_capabilities(&report).map_err(|m| self.invalid("ReportCapabilities", m))?;
        self.index.capabilities(report)?;
        Ok(Response::new(CapabilitiesResponse {}))
    }

    async fn get_status(
        &self,
        request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        // Any authenticated caller: administrators, and agents (`stackroute explain --agent`).
        let _caller: Option<Caller> = self.auth.caller("GetStatus", &request).await?;
        Ok(Response::new(self.index.status().await?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::ListenerChanges;

    fn update(revision: u64, delta_from: Option<u64>, ports: &[u32]) -> Arc<NodeUpdate> {
        let shared = Arc::new(stackroute_snapshot::SharedTables::build(
            &stackroute_snapshot::SharedInput {
                nodes: vec![stackroute_snapshot::NodeEntry {
                    name: "n1".into(),
                    zone: stackroute_snapshot::NO_ZONE,
                }],
                ..Default::default()
            },
        ));
        let tables = stackroute_snapshot::encode_node_tables(
            &shared,
            &stackroute_snapshot::NodeInput {
                revision,
                ..Default::default()
            },
        );
        Arc::new(NodeUpdate {
            revision,
            node: "n1".into(),
            snapshot: stackroute_snapshot::SnapshotParts::new(shared, tables),
            listeners: Arc::new(listeners_on(ports)),
            listener_changes: None,
            delta: delta_from.map(|base| (base, vec![2; 10])),
        })
    }

    fn listeners_on(ports: &[u32]) -> Vec<Listener> {
        ports
            .iter()
            .map(|port| Listener {
                key: Some(ListenerKey {
                    node: "n1".into(),
                    port: *port,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .collect()
    }

    fn ports(listeners: &[Listener]) -> Vec<u32> {
        listeners
            .iter()
            .map(|l| l.key.as_ref().map_or(0, |k| k.port))
            .collect()
    }

    /// A changed listener list goes as its changes to an agent that takes them and was sent the
    /// list they start from; whole to any other.
    #[test]
    fn listener_changes_go_to_agents_sent_their_base() {
        let before = update(6, Some(5), &[80, 443, 9000]);
        let mut changed = listeners_on(&[80, 8080, 9000]);
        changed[2].workload = "moved".into();
        let changes = ListenerChanges::between(&before.listeners, &changed);
        assert_eq!(ports(&changes.put), [8080, 9000]);
        assert_eq!(
            changes.removed.iter().map(|k| k.port).collect::<Vec<_>>(),
            [443]
        );
        let after = Arc::new(NodeUpdate {
            revision: 7,
            node: "n1".into(),
            snapshot: before.snapshot.clone(),
            listeners: Arc::new(changed),
            listener_changes: Some(Arc::new(changes)),
            delta: Some((6, vec![2; 10])),
        });
        let request = WatchRequest {
            node: "n1".into(),
            known_revision: 5,
            accepts_delta: true,
            accepts_listener_deltas: true,
            ..Default::default()
        };
        let mut sent = SentToAgent::new(&request, DEFAULT_CHUNK_BYTES);
        let first = sent.next(&before);
        assert_eq!(ports(&first.listeners), [80, 443, 9000]);
        assert!(!first.listeners_delta);
        let second = sent.next(&after);
        assert!(second.listeners_delta && !second.listeners_unchanged);
        assert!(second.listeners.is_empty());
        assert_eq!(ports(&second.listeners_put), [8080, 9000]);
        assert_eq!(second.listeners_removed.len(), 1);
        // The same list again (the same allocation): unchanged.
        let third = sent.next(&Arc::new(NodeUpdate {
            revision: 8,
            listener_changes: None,
            delta: Some((7, vec![2; 10])),
            snapshot: before.snapshot.clone(),
            node: "n1".into(),
            listeners: after.listeners.clone(),
        }));
        assert!(third.listeners_unchanged && !third.listeners_delta);

        // Not sent the base (a stream that starts at 7), or not taking changes: the whole list.
        let mut fresh = SentToAgent::new(&request, DEFAULT_CHUNK_BYTES);
        let whole = fresh.next(&after);
        assert!(!whole.listeners_delta && ports(&whole.listeners) == [80, 8080, 9000]);
        let mut old_agent = SentToAgent::new(
            &WatchRequest {
                accepts_listener_deltas: false,
                ..request
            },
            DEFAULT_CHUNK_BYTES,
        );
        old_agent.next(&before);
        let whole = old_agent.next(&after);
        assert!(!whole.listeners_delta && whole.listeners.len() == 3);
    }

    /// A stream sends a delta only from the revision its agent holds, the whole snapshot
    /// otherwise, and leaves out a listener list it sent before.
    #[test]
    fn a_stream_sends_deltas_from_what_its_agent_holds() {
        let request = WatchRequest {
            node: "n1".into(),
            known_revision: 5,
            accepts_delta: true,
            ..Default::default()
        };
        let mut sent = SentToAgent::new(&request, DEFAULT_CHUNK_BYTES);
        // The agent restarted holding 5; the controller's delta starts from 5.
        let first = sent.next(&update(6, Some(5), &[80]));
        assert_eq!((first.delta.len(), first.base_revision), (10, 5));
        assert!(first.snapshot.is_empty() && !first.listeners_unchanged);
        assert_eq!(first.listeners.len(), 1);
        // Same listeners: left out.
        let second = sent.next(&update(7, Some(6), &[80]));
        assert_eq!(second.base_revision, 6);
        assert!(second.listeners_unchanged && second.listeners.is_empty());
        // Revision 8 was skipped by the watch: 9's delta starts from 8, so the whole snapshot.
        let third = sent.next(&update(9, Some(8), &[80, 443]));
        assert!(third.delta.is_empty() && !third.snapshot.is_empty());
        assert!(stackroute_snapshot::Snapshot::parse(&third.snapshot).is_ok());
        assert_eq!(third.listeners.len(), 2);
        // No delta at all (larger than the snapshot): whole.
        assert!(sent.next(&update(10, None, &[80, 443])).delta.is_empty());

        // An agent that does not accept deltas always gets everything.
        let mut old_agent = SentToAgent::new(
            &WatchRequest {
                known_revision: 5,
                ..request
            },
            DEFAULT_CHUNK_BYTES,
        );
        old_agent.accepts_delta = false;
        for (revision, base) in [(6, 5), (7, 6)] {
            let message = old_agent.next(&update(revision, Some(base), &[80]));
            assert!(message.delta.is_empty() && !message.listeners_unchanged);
            assert!(!message.snapshot.is_empty() && message.listeners.len() == 1);
        }
    }

    /// A whole snapshot larger than a part goes in parts to an agent that reassembles them:
    /// consecutive, of one revision, the listeners in the first; the next revision only after
    /// the last part. Others get it whole.
    #[test]
    fn a_whole_snapshot_goes_in_parts_to_an_agent_that_takes_them() {
        let request = WatchRequest {
            node: "n1".into(),
            accepts_delta: true,
            accepts_chunks: true,
            ..Default::default()
        };
        let whole = update(3, None, &[80]);
        let bytes = whole.snapshot.assemble();
        let chunk = 100;
        assert!(bytes.len() > 3 * chunk, "{} bytes", bytes.len());
        let mut sent = SentToAgent::new(&request, chunk);
        let mut parts = vec![sent.next(&whole)];
        while let Some(part) = sent.next_part() {
            parts.push(part);
        }
        assert_eq!(parts.len(), bytes.len().div_ceil(chunk));
        let mut rebuilt = Vec::new();
        for (index, part) in parts.iter().enumerate() {
            assert_eq!(part.revision, 3);
            assert_eq!(part.snapshot_len, bytes.len() as u64);
            assert_eq!(part.snapshot_offset, rebuilt.len() as u64);
            assert!(part.snapshot.len() <= chunk && part.delta.is_empty());
            assert_eq!(part.listeners.len(), usize::from(index == 0));
            rebuilt.extend_from_slice(&part.snapshot);
        }
        assert!(rebuilt == bytes);
        // The next revision's delta starts from the revision the parts made.
        assert_eq!(sent.next(&update(4, Some(3), &[80])).base_revision, 3);

        let whole_at_once = SentToAgent::new(
            &WatchRequest {
                accepts_chunks: false,
                ..request
            },
            chunk,
        )
        .next(&whole);
        assert_eq!(whole_at_once.snapshot, bytes);
        assert_eq!(whole_at_once.snapshot_len, 0);
    }

    #[test]
    fn watch_requests_need_a_node_and_the_api_version() {
        let mut request = WatchRequest {
            node: "n1".into(),
            api_version: ApiVersion::V1alpha1 as i32,
            ..Default::default()
        };
        assert!(check_watch(&request).is_ok());
        request.api_version = 0;
        assert!(
            check_watch(&request)
                .expect_err("invalid")
                .contains("API_VERSION_V1ALPHA1")
        );
        request.api_version = ApiVersion::V1alpha1 as i32;
        request.node = String::new();
        assert_eq!(
            check_watch(&request).expect_err("invalid"),
            "node must not be empty"
        );
    }

    #[test]
    fn capability_reports_bound_rdma_ports_and_gids() {
        use stackroute_proto::v1alpha1::{RdmaDevice, RdmaGid, RdmaPort};
        let gid = RdmaGid {
            index: 0,
            gid: "fe80:0000:0000:0000:5054:00ff:fe12:3456".into(),
            r#type: "RoCE v2".into(),
            netdev: "eth0".into(),
        };
        // 1 device + 1 port + 15 port GIDs + 15 flat GIDs + 1 RoCE version = 33 entries.
        let device = RdmaDevice {
            name: "rxe0".into(),
            gids: vec![gid.gid.clone(); 15],
            state: "active".into(),
            ports: vec![RdmaPort {
                number: 1,
                state: "active".into(),
                gids: vec![gid; 15],
                ..Default::default()
            }],
            roce_versions: vec![2],
        };
        let mut report = NodeCapabilities {
            node: "n1".into(),
            rdma_devices: vec![device.clone(); MAX_RDMA_ENTRIES / 33],
            uverbs_devices: vec!["uverbs0".into()],
            rdma_cm_device: true,
            memlock_soft: 8 << 20,
            memlock_hard: u64::MAX,
            ..Default::default()
        };
        assert_eq!(check_capabilities(&report), Ok(()));
        // Few devices, but ports and GIDs past the bound: counted, not just the devices.
        report.rdma_devices.push(device);
        assert!(
            check_capabilities(&report)
                .expect_err("too many")
                .contains("too many RDMA entries"),
        );
        report.rdma_devices.clear();
        report.rdma_unavailable_reason = "x".repeat(MAX_RDMA_REASON + 1);
        assert!(check_capabilities(&report).is_err());
        report.rdma_unavailable_reason = "no /sys/class/infiniband".into();
        assert_eq!(check_capabilities(&report), Ok(()));
    }

    #[test]
    fn capability_reports_bound_dpdk_pmds_devices_and_names() {
        use stackroute_proto::v1alpha1::DpdkDevice;
        let device = DpdkDevice {
            pci_address: "0000:03:00.0".into(),
            driver: "vfio-pci".into(),
        };
        let dpdk = DpdkCapability {
            version: "22.11.11".into(),
            pmds: vec!["net_memif".into(); MAX_DPDK_LIST],
            bound_devices: vec![device.clone(); MAX_DPDK_LIST],
            vfio: true,
            unavailable_reason: String::new(),
            hugepage_size_kib: 2048,
        };
        let report = |dpdk: &DpdkCapability| NodeCapabilities {
            node: "n1".into(),
            dpdk: true,
            dpdk_detail: Some(dpdk.clone()),
            ..Default::default()
        };
        assert_eq!(check_capabilities(&report(&dpdk)), Ok(()));
        let refused = |change: &dyn Fn(&mut DpdkCapability)| {
            let mut dpdk = dpdk.clone();
            change(&mut dpdk);
            check_capabilities(&report(&dpdk)).expect_err("refused")
        };
        assert!(refused(&|d| d.pmds.push("net_tap".into())).contains("too many DPDK entries"));
        assert!(refused(&|d| d.bound_devices.push(device.clone())).contains("too many DPDK"));
        let long = "x".repeat(MAX_NAME + 1);
        assert!(refused(&|d| d.version = long.clone()).starts_with("dpdk version"));
        assert!(refused(&|d| d.pmds[7] = long.clone()).starts_with("dpdk pmd"));
        assert!(
            refused(&|d| d.bound_devices[3].pci_address = long.clone())
                .starts_with("dpdk pci_address")
        );
        assert!(refused(&|d| d.bound_devices[0].driver = long.clone()).starts_with("dpdk driver"));
        assert!(
            refused(&|d| d.unavailable_reason = "x".repeat(MAX_DPDK_REASON + 1))
                .contains("unavailable_reason")
        );
        // An older agent reports no detail.
        assert_eq!(
            check_capabilities(&NodeCapabilities {
                node: "n1".into(),
                ..Default::default()
            }),
            Ok(())
        );
    }
}
