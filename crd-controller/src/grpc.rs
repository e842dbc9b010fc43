//! The `Distribution` gRPC service: validates every request at the edge, then talks to the
//! index through its channel. A malformed request gets `InvalidArgument` with the reason and
//! never reaches the index.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;

use stackroute_proto::v1alpha1::distribution_server::Distribution;
use stackroute_proto::v1alpha1::{
    AckRequest, AckResponse, ApiVersion, CapabilitiesResponse, Listener, ListenerKey,
    NodeCapabilities, Protocol, RegistrationResponse, SnapshotUpdate, Stack, StatusRequest,
    StatusResponse, WatchRequest, Workload, WorkloadKey,
};
use tokio_stream::{Stream, StreamExt as _};
use tonic::{Request, Response, Status};

use crate::index::{IndexClosed, IndexHandle, RegistryChange};
use crate::metrics::Metrics;
use crate::store::{Store, listener_key, workload_key};

/// Longest node, namespace, workload or label text accepted.
const MAX_NAME: usize = 253;
/// Most labels, IPs or endpoints in one registration.
const MAX_ITEMS: usize = 64;

/// The service.
#[derive(Clone)]
pub struct DistributionService {
    index: IndexHandle,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
}

impl DistributionService {
    /// A service over the index and store.
    pub fn new(index: IndexHandle, store: Arc<dyn Store>, metrics: Arc<Metrics>) -> Self {
        Self {
            index,
            store,
            metrics,
        }
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

// === validation ===

/// Checks a name-like field: non-empty, bounded, printable, no `/` (keys use it).
pub fn check_name(field: &str, value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err(format!("{field} must not be empty"));
    }
    if value.len() > MAX_NAME {
        return Err(format!("{field} is longer than {MAX_NAME} bytes"));
    }
    if let Some(c) = value
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || *c == '/')
    {
        return Err(format!("{field} {value:?} contains {c:?}"));
    }
    Ok(())
}

fn check_ip(field: &str, value: &str) -> Result<IpAddr, String> {
    value
        .parse::<IpAddr>()
        .map_err(|_| format!("{field} {value:?} is not an IPv4 or IPv6 address"))
}

fn check_protocol(value: i32) -> Result<Protocol, String> {
    match Protocol::try_from(value) {
        Ok(p @ (Protocol::Tcp | Protocol::Udp)) => Ok(p),
        _ => Err(format!(
            "key.protocol must be PROTOCOL_TCP or PROTOCOL_UDP, got {value}"
        )),
    }
}

/// Validates a listener key.
pub fn check_listener_key(key: Option<&ListenerKey>) -> Result<&ListenerKey, String> {
    let key = key.ok_or("key is required")?;
    check_name("key.node", &key.node)?;
    check_ip("key.ip", &key.ip)?;
    if !(1..=65535).contains(&key.port) {
        return Err(format!("key.port must be 1..=65535, got {}", key.port));
    }
    check_protocol(key.protocol)?;
    Ok(key)
}

/// Validates a listener and normalises it: the kernel is always among the stacks.
pub fn check_listener(mut listener: Listener) -> Result<Listener, String> {
    check_listener_key(listener.key.as_ref())?;
    if !listener.namespace.is_empty() {
        check_name("namespace", &listener.namespace)?;
    }
    if !listener.workload.is_empty() {
        check_name("workload", &listener.workload)?;
    }
    if listener.stacks.len() > MAX_ITEMS || listener.endpoints.len() > MAX_ITEMS {
        return Err(format!("at most {MAX_ITEMS} stacks and endpoints"));
    }
    for (position, stack) in listener.stacks.iter().enumerate() {
        match Stack::try_from(*stack) {
            Ok(Stack::Kernel | Stack::Userspace | Stack::Rdma) => {}
            _ => return Err(format!("stacks[{position}]: unknown stack {stack}")),
        }
    }
    for (stack, endpoint) in &listener.endpoints {
        let known = Stack::from_str_name(stack).is_some()
            || ["Kernel", "Userspace", "RDMA"]
                .iter()
                .any(|name| name.eq_ignore_ascii_case(stack));
        if !known {
            return Err(format!(
                "endpoints: key {stack:?} is not a stack name (Kernel, Userspace, RDMA)"
            ));
        }
        if endpoint.len() > 1024 {
            return Err(format!("endpoints[{stack}] is longer than 1024 bytes"));
        }
    }
    if let Some(key) = listener.key.as_mut() {
        // Canonical address text, so equal registrations compare equal.
        key.ip = check_ip("key.ip", &key.ip)?.to_string();
    }
    if !listener.stacks.contains(&(Stack::Kernel as i32)) {
        listener.stacks.insert(0, Stack::Kernel as i32);
    }
    Ok(listener)
}

/// Validates a workload key.
pub fn check_workload_key(key: Option<&WorkloadKey>) -> Result<&WorkloadKey, String> {
    let key = key.ok_or("key is required")?;
    check_name("key.node", &key.node)?;
    check_name("key.namespace", &key.namespace)?;
    check_name("key.name", &key.name)?;
    Ok(key)
}

/// Validates a workload and normalises its addresses.
pub fn check_workload(mut workload: Workload) -> Result<Workload, String> {
    check_workload_key(workload.key.as_ref())?;
    if workload.labels.len() > MAX_ITEMS || workload.ips.len() > MAX_ITEMS {
        return Err(format!("at most {MAX_ITEMS} labels and ips"));
    }
    for (key, value) in &workload.labels {
        if key.is_empty() || key.len() > MAX_NAME || value.len() > 63 {
            return Err(format!(
                "label {key:?}={value:?}: keys must be 1..={MAX_NAME} bytes, values at most 63"
            ));
        }
    }
    let mut ips = Vec::with_capacity(workload.ips.len());
    for (position, ip) in workload.ips.iter().enumerate() {
        ips.push(check_ip(&format!("ips[{position}]"), ip)?.to_string());
    }
    workload.ips = ips;
    Ok(workload)
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
        let request = request.into_inner();
        check_watch(&request).map_err(|m| self.invalid("WatchSnapshots", m))?;
        let subscription = self
            .index
            .subscribe(&request.node, &request.agent_id, request.known_revision)
            .await?;
        let (rx, guard) = subscription.into_parts();
        // The guard lives inside the stream: when tonic drops the stream (client gone), the
        // index hears about it.
        let stream = tokio_stream::wrappers::WatchStream::new(rx).filter_map(move |update| {
            let _alive = &guard;
            update.map(|update| Ok(SnapshotUpdate::clone(&update)))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn ack(&self, request: Request<AckRequest>) -> Result<Response<AckResponse>, Status> {
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
        let listener = check_listener(request.into_inner())
            .map_err(|m| self.invalid("RegisterListener", m))?;
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
        let workload = check_workload(request.into_inner())
            .map_err(|m| self.invalid("RegisterWorkload", m))?;
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
        let report = request.into_inner();
        check_capabilities(&report).map_err(|m| self.invalid("ReportCapabilities", m))?;
        self.index.capabilities(report)?;
        Ok(Response::new(CapabilitiesResponse {}))
    }

    async fn get_status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        Ok(Response::new(self.index.status().await?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ip: &str, port: u32, protocol: Protocol) -> ListenerKey {
        ListenerKey {
            node: "n1".into(),
            ip: ip.into(),
            port,
            protocol: protocol as i32,
        }
    }

    #[test]
    fn listener_keys_are_checked() {
        assert!(check_listener_key(Some(&key("10.0.0.1", 80, Protocol::Tcp))).is_ok());
        let bad = [
            (key("10.0.0.1", 0, Protocol::Tcp), "key.port"),
            (key("10.0.0.1", 70000, Protocol::Tcp), "key.port"),
            (key("10.0.0.300", 80, Protocol::Tcp), "key.ip"),
            (key("10.0.0.1", 80, Protocol::Unspecified), "key.protocol"),
        ];
        for (k, field) in bad {
            let error = check_listener_key(Some(&k)).expect_err("invalid");
            assert!(error.starts_with(field), "{error}");
        }
        let mut k = key("::1", 80, Protocol::Udp);
        k.node = String::new();
        assert_eq!(
            check_listener_key(Some(&k)).expect_err("invalid"),
            "key.node must not be empty"
        );
        assert_eq!(
            check_listener_key(None).expect_err("invalid"),
            "key is required"
        );
    }

    #[test]
    fn listeners_always_accept_the_kernel_and_use_canonical_addresses() {
        let listener = check_listener(Listener {
            key: Some(key("fd00:0:0::1", 80, Protocol::Tcp)),
            stacks: vec![Stack::Rdma as i32],
            ..Default::default()
        })
        .expect("valid");
        assert_eq!(
            listener.stacks,
            vec![Stack::Kernel as i32, Stack::Rdma as i32]
        );
        assert_eq!(listener.key.expect("key").ip, "fd00::1");
        let error = check_listener(Listener {
            key: Some(key("10.0.0.1", 80, Protocol::Tcp)),
            stacks: vec![42],
            ..Default::default()
        })
        .expect_err("invalid");
        assert_eq!(error, "stacks[0]: unknown stack 42");
    }

    #[test]
    fn workloads_are_checked() {
        let workload = |namespace: &str, ips: Vec<&str>| Workload {
            key: Some(WorkloadKey {
                node: "n1".into(),
                namespace: namespace.into(),
                name: "w".into(),
            }),
            labels: [("app".to_string(), "x".to_string())].into(),
            ips: ips.into_iter().map(String::from).collect(),
        };
        assert!(check_workload(workload("ns", vec!["10.0.0.1", "fd00::1"])).is_ok());
        assert_eq!(
            check_workload(workload("", vec![])).expect_err("invalid"),
            "key.namespace must not be empty"
        );
        assert_eq!(
            check_workload(workload("a/b", vec![])).expect_err("invalid"),
            "key.namespace \"a/b\" contains '/'"
        );
        assert_eq!(
            check_workload(workload("ns", vec!["nope"])).expect_err("invalid"),
            "ips[0] \"nope\" is not an IPv4 or IPv6 address"
        );
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
}
