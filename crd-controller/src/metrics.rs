//! Prometheus metrics (`/metrics`, text format).

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label set `[(name, value)]`.
pub type Labels = Vec<(String, String)>;

/// Every metric the controller exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Last published revision.
    pub revision: Gauge,
    /// Compile (and encode) time per revision.
    pub compile_seconds: Histogram,
    /// Open WatchSnapshots streams.
    pub connected_agents: Gauge,
    /// Highest revision each node acked.
    pub acked_revision: Family<Labels, Gauge>,
    /// Registrations by kind (listener, workload) and operation (put, remove).
    pub registrations: Family<Labels, Counter>,
    /// Problems in the state sources.
    pub source_errors: Gauge,
    /// Rules (per source identity) the NetworkPolicy gate took a kernel-bypass stack from.
    pub network_policy_gated_rules: Gauge,
    /// Registered listeners.
    pub listeners: Gauge,
    /// Registered workloads.
    pub workloads: Gauge,
    /// gRPC requests rejected as invalid, by method.
    pub invalid_requests: Family<Labels, Counter>,
    /// gRPC calls refused for want of an identity or authority, by method and reason.
    pub denied_requests: Family<Labels, Counter>,
    /// Injection webhook reviews by result.
    pub webhook_requests: Family<Labels, Counter>,
    /// Pods that opted in to injection but carry no `stackroute.dev/injected` (Kubernetes mode).
    pub pods_not_injected: Gauge,
    /// Snapshot updates sent to agents, by encoding (full, delta).
    pub snapshot_updates: Family<Labels, Counter>,
    /// Bytes of snapshot sent to agents, by encoding (full, delta).
    pub snapshot_bytes: Family<Labels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("stackroute_controller");
        let revision = Gauge::default();
        registry.register("revision", "Last published revision", revision.clone());
        let compile_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "compile_duration_seconds",
            "Time to compile the state and encode the watched nodes' snapshots",
            compile_seconds.clone(),
        );
        let connected_agents = Gauge::default();
        registry.register(
            "connected_agents",
            "Open WatchSnapshots streams",
            connected_agents.clone(),
        );
        let acked_revision = Family::<Labels, Gauge>::default();
        registry.register(
            "node_acked_revision",
            "Highest revision each node acknowledged",
            acked_revision.clone(),
        );
        let registrations = Family::<Labels, Counter>::default();
        registry.register(
            "registrations",
            "Listener and workload registrations and removals",
            registrations.clone(),
        );
        let network_policy_gated_rules = Gauge::default();
        registry.register(
            "network_policy_gated_rules",
            "Rules (per source identity) whose kernel-bypass stacks NetworkPolicy removed in the last revision",
            network_policy_gated_rules.clone(),
        );
        let source_errors = Gauge::default();
        registry.register(
            "source_errors",
            "Problems in the state sources (the last good version of a broken file stays in force)",
            source_errors.clone(),
        );
        let listeners = Gauge::default();
        registry.register("listeners", "Registered listeners", listeners.clone());
        let workloads = Gauge::default();
        registry.register("workloads", "Registered workloads", workloads.clone());
        let invalid_requests = Family::<Labels, Counter>::default();
        registry.register(
            "invalid_requests",
            "gRPC requests rejected as invalid",
            invalid_requests.clone(),
        );
        let denied_requests = Family::<Labels, Counter>::default();
        registry.register(
            "denied_requests",
            "gRPC calls refused by method and reason (unauthenticated, other-node, not-a-node, stream-limit)",
            denied_requests.clone(),
        );
        let webhook_requests = Family::<Labels, Counter>::default();
        registry.register(
            "webhook_requests",
            "Injection webhook reviews by result (injected, unchanged, skipped, namespace_error, invalid)",
            webhook_requests.clone(),
        );
        let pods_not_injected = Gauge::default();
        registry.register(
            "pods_not_injected",
            "Pods that opted in to injection but were not injected (Kubernetes mode, listed every minute)",
            pods_not_injected.clone(),
        );
        let snapshot_updates = Family::<Labels, Counter>::default();
        registry.register(
            "snapshot_updates",
            "Snapshot updates sent to agents by encoding (full, delta)",
            snapshot_updates.clone(),
        );
        let snapshot_bytes = Family::<Labels, Counter>::default();
        registry.register(
            "snapshot_bytes",
            "Bytes of snapshot (whole or delta) sent to agents by encoding (full, delta)",
            snapshot_bytes.clone(),
        );
        Self {
            registry,
            revision,
            compile_seconds,
            connected_agents,
            acked_revision,
            registrations,
            source_errors,
            network_policy_gated_rules,
            listeners,
            workloads,
            invalid_requests,
            denied_requests,
            webhook_requests,
            pods_not_injected,
            snapshot_updates,
            snapshot_bytes,
        }
    }
}

impl Metrics {
    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        encode(&mut text, &self.registry).expect("encoding metrics into a String");
        text
    }

    /// Counts a registration.
    pub fn registration(&self, kind: &str, op: &str) {
        self.registrations
            .get_or_create(&vec![
                ("kind".to_string(), kind.to_string()),
                ("op".to_string(), op.to_string()),
            ])
            .inc();
    }

    /// Counts an invalid request.
    pub fn invalid(&self, method: &str) {
        self.invalid_requests
            .get_or_create(&vec![("method".to_string(), method.to_string())])
            .inc();
    }

    /// Counts a refused gRPC call.
    pub fn denied(&self, method: &str, reason: &str) {
        self.denied_requests
            .get_or_create(&vec![
                ("method".to_string(), method.to_string()),
                ("reason".to_string(), reason.to_string()),
            ])
            .inc();
    }

    /// Counts a snapshot update sent to an agent: `delta` or `full`, and its bytes.
    pub fn snapshot_sent(&self, encoding: &str, bytes: usize) {
        let labels = vec![("encoding".to_string(), encoding.to_string())];
        self.snapshot_updates.get_or_create(&labels).inc();
        self.snapshot_bytes
            .get_or_create(&labels)
            .inc_by(bytes as u64);
    }

    /// Counts a webhook review.
    pub fn webhook_request(&self, result: &str) {
        self.webhook_requests
            .get_or_create(&vec![("result".to_string(), result.to_string())])
            .inc();
    }
}
