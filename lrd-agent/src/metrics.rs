//! Prometheus metrics and the HTTP endpoints `/metrics`, `/healthz` and `/readyz`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tracing::info;

use stackroute_local_api::message::{
    DecisionCount, FallbackCount, FallbackReason, Stack, UpgradeAttempt, UpgradeRole,
};

use crate::state::{Agent, Role};

/// Labels of `stackroute_lrd_local_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Request kind (`register-listener`, …, or `invalid` for a frame that did not decode).
    pub kind: &'static str,
    /// `ok`, `queued`, `denied` or `error`.
    pub result: &'static str,
}

/// Labels of `stackroute_lrd_fallback_reports_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// Fallback reason.
    pub reason: &'static str,
}

/// Labels of `stackroute_lrd_shim_decisions_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// `Kernel`, `Userspace` or `RDMA`.
    pub stack: &'static str,
    /// `Default`, `Cubic`, `BBR`, `Reno` (anything else is counted as `other`).
    pub congestion_control: &'static str,
}

/// Labels of `stackroute_lrd_rdma_upgrade_attempts_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpgradeLabels {
    /// `client` or `server`.
    pub role: &'static str,
    /// A reason name of `stackroute-rdma-upgrade` (`other` for any it does not know).
    pub reason: &'static str,
}

/// Labels of `stackroute_lrd_userspace_instance_starts_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StartLabels {
    /// `ok` (started and ready), `failed` (a start was tried and failed) or `refused` (no
    /// start was tried: the caller may not have one, the node is at its limit, or the
    /// namespace is backing off after failures).
    pub result: &'static str,
}

/// Labels of `stackroute_lrd_userspace_connections`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkloadStateLabels {
    /// `namespace/name` of the pod or workload the instance serves.
    pub workload: String,
    /// `connecting`, `established`, `closed`, `reset` or `failed`.
    pub state: &'static str,
}

/// Labels of `stackroute_lrd_userspace_bytes`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkloadDirectionLabels {
    /// `namespace/name` of the pod or workload the instance serves.
    pub workload: String,
    /// `sent` or `received`.
    pub direction: &'static str,
}

/// Labels of `stackroute_lrd_userspace_retransmits`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkloadLabels {
    /// `namespace/name` of the pod or workload the instance serves.
    pub workload: String,
}

/// The user-space stack instances' metrics; clones share the same series.
#[derive(Clone, Debug)]
pub struct InstanceMetrics {
    /// Instances running (started or adopted).
    pub running: Gauge<i64, AtomicI64>,
    /// Start attempts and refusals.
    pub starts: Family<StartLabels, Counter<u64, AtomicU64>>,
    /// Time from the request to the instance's `ready`, for successful starts.
    pub start_seconds: Histogram,
    /// Instances seen to exit (crashed, killed, or stopped for being idle).
    pub exits: Counter<u64, AtomicU64>,
    /// Connections per workload and relay state (live and recently finished), as the
    /// instances last reported them.
    pub connections: Family<WorkloadStateLabels, Gauge<i64, AtomicI64>>,
    /// Payload bytes of those connections per workload and direction.
    pub bytes: Family<WorkloadDirectionLabels, Gauge<i64, AtomicI64>>,
    /// Retransmitted segments of those connections per workload.
    pub retransmits: Family<WorkloadLabels, Gauge<i64, AtomicI64>>,
}

impl Default for InstanceMetrics {
    fn default() -> Self {
        Self {
            running: Gauge::default(),
            starts: Family::default(),
            // 5 ms … about 10 s: a start is a few process spawns and the instance's own setup.
            start_seconds: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.005, 2.0, 12),
            ),
            exits: Counter::default(),
            connections: Family::default(),
            bytes: Family::default(),
            retransmits: Family::default(),
        }
    }
}

impl InstanceMetrics {
    /// Counts one start attempt or refusal.
    pub fn start(&self, result: &'static str) {
        self.starts.get_or_create(&StartLabels { result }).inc();
    }
}

/// Every metric the agent exports.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Revision of the published snapshot.
    pub revision: Gauge<i64, AtomicI64>,
    /// 1 while the published snapshot is a persisted one not yet confirmed by a controller.
    pub stale: Gauge<i64, AtomicI64>,
    /// Generation of the published snapshot.
    pub generation: Gauge<i64, AtomicI64>,
    /// Size of the published snapshot.
    pub snapshot_bytes: Gauge<i64, AtomicI64>,
    /// 1 while a watch stream to a controller is open.
    pub connected: Gauge<i64, AtomicI64>,
    /// Connection attempts after the first.
    pub reconnects: Counter<u64, AtomicU64>,
    /// Snapshots received and rejected (failed validation or belonged to another node).
    pub rejected: Counter<u64, AtomicU64>,
    /// Held registrations the controller refused when they were re-sent, and dropped.
    pub dropped_registrations: Counter<u64, AtomicU64>,
    /// Snapshot deltas received, by outcome (`applied`, `rejected`).
    pub deltas: Family<OutcomeLabels, Counter<u64, AtomicU64>>,
    /// Requests on the Unix socket.
    pub requests: Family<RequestLabels, Counter<u64, AtomicU64>>,
    /// Fallbacks reported by shims.
    pub fallbacks: Family<ReasonLabels, Counter<u64, AtomicU64>>,
    /// Connections decided by shims, by the transport they used.
    pub shim_decisions: Family<DecisionLabels, Counter<u64, AtomicU64>>,
    /// Hand-over requests refused, by reason (`protocol::Refusal::REASONS`).
    pub handover_refused: Family<ReasonLabels, Counter<u64, AtomicU64>>,
    /// User-space stack instances.
    pub instances: InstanceMetrics,
    /// Kernel hooks.
    pub hooks: HookMetrics,
    /// RDMA upgrade attempts reported by shims, by role and reason.
    pub rdma_upgrades: Family<UpgradeLabels, Counter<u64, AtomicU64>>,
    /// Upgrade attempts dropped from reports over `MAX_UPGRADE_REPORT`.
    pub rdma_upgrades_dropped: Counter<u64, AtomicU64>,
    /// Strings of upgrade attempts cut to `upgrades::MAX_STRING` or with control characters
    /// replaced.
    pub rdma_upgrade_strings_trimmed: Counter<u64, AtomicU64>,
    /// The attempts themselves, newest kept: here, beside their counters, so each agent (and
    /// each test's agent) has its own.
    pub upgrade_log: crate::upgrades::UpgradeLog,
}

/// Labels of `stackroute_lrd_kernel_hook_connections_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// Kernel hook connections: `applied`, `left-default`, `chosen-by-process`, `set-failed` or
    /// `no-entry`; snapshot deltas: `applied` or `rejected`.
    pub outcome: &'static str,
}

/// The kernel hooks' metrics.
#[derive(Debug, Default)]
pub struct HookMetrics {
    /// Attach requests by result (`ok`, `failed`).
    pub attaches: Family<StartLabels, Counter<u64, AtomicU64>>,
    /// Hooks attached now.
    pub attached: Gauge<i64, AtomicI64>,
    /// 1 when this node can attach hooks (found at start).
    pub available: Gauge<i64, AtomicI64>,
    /// Connections the hooks saw, by outcome.
    pub connections: Family<OutcomeLabels, Counter<u64, AtomicU64>>,
    /// The totals last exported, to turn the hooks' running sums into counter increments.
    exported: std::sync::Mutex<stackroute_kernel_hook::Counters>,
}

impl Metrics {
    /// Counts a snapshot delta by outcome.
    pub fn delta(&self, outcome: &'static str) {
        self.deltas.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    /// Registers every metric in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("stackroute_lrd");
        r.register(
            "snapshot_revision",
            "Revision of the published snapshot",
            self.revision.clone(),
        );
        r.register(
            "snapshot_stale",
            "1 while the published snapshot was loaded from disk and not yet confirmed by a controller",
            self.stale.clone(),
        );
        r.register(
            "snapshot_generation",
            "Generation of the published snapshot",
            self.generation.clone(),
        );
        r.register(
            "snapshot_bytes",
            "Size of the published snapshot in bytes",
            self.snapshot_bytes.clone(),
        );
        r.register(
            "controller_connected",
            "1 while a watch stream to a controller is open",
            self.connected.clone(),
        );
        r.register(
            "controller_reconnects",
            "Controller connection attempts after the first",
            self.reconnects.clone(),
        );
        r.register(
            "snapshots_rejected",
            "Snapshots received from a controller and rejected",
            self.rejected.clone(),
        );
        r.register(
            "snapshot_deltas",
            "Snapshot deltas received from a controller, by outcome (applied, rejected: the agent then asks for the whole snapshot)",
            self.deltas.clone(),
        );
        r.register(
            "registrations_dropped",
            "Held registrations the controller refused on re-send, dropped so the session goes on",
            self.dropped_registrations.clone(),
        );
        r.register(
            "local_requests",
            "Requests on the Unix socket by kind and result",
            self.requests.clone(),
        );
        r.register(
            "fallback_reports",
            "Fallbacks reported by shims, by reason",
            self.fallbacks.clone(),
        );
        r.register(
            "shim_decisions",
            "Connections decided by shims, by the transport used",
            self.shim_decisions.clone(),
        );
        r.register(
            "rdma_upgrade_attempts",
            "RDMA upgrade attempts reported by shims, by role and the reason the connection stayed on TCP",
            self.rdma_upgrades.clone(),
        );
        r.register(
            "rdma_upgrade_attempts_dropped",
            "RDMA upgrade attempts dropped from shim reports carrying more than the limit",
            self.rdma_upgrades_dropped.clone(),
        );
        r.register(
            "rdma_upgrade_strings_trimmed",
            "Strings of reported RDMA upgrade attempts cut to the length limit or with control characters replaced",
            self.rdma_upgrade_strings_trimmed.clone(),
        );
        r.register(
            "handover_refused",
            "Hand-over requests refused (the agent kept serving), by reason",
            self.handover_refused.clone(),
        );
        r.register(
            "userspace_instances",
            "User-space stack instances running (started or adopted by this agent)",
            self.instances.running.clone(),
        );
        r.register(
            "kernel_hook_attaches",
            "Kernel hook attach requests by result (ok, failed)",
            self.hooks.attaches.clone(),
        );
        r.register(
            "kernel_hooks",
            "Kernel hooks attached now",
            self.hooks.attached.clone(),
        );
        r.register(
            "kernel_hook_available",
            "1 when this node can attach kernel hooks (cgroup v2, BPF, capabilities)",
            self.hooks.available.clone(),
        );
        r.register(
            "kernel_hook_connections",
            "New TCP connections seen by kernel hooks, by outcome",
            self.hooks.connections.clone(),
        );
        r.register(
            "userspace_instance_starts",
            "User-space stack instance starts by result (ok, failed, refused)",
            self.instances.starts.clone(),
        );
        r.register(
            "userspace_instance_start_seconds",
            "Time to start a user-space stack instance until it is ready",
            self.instances.start_seconds.clone(),
        );
        r.register(
            "userspace_instance_exits",
            "User-space stack instances seen to exit",
            self.instances.exits.clone(),
        );
        r.register(
            "userspace_connections",
            "User-space stack connections per workload and relay state (live and finished in the last minute), as the instances last reported",
            self.instances.connections.clone(),
        );
        r.register(
            "userspace_bytes",
            "Payload bytes of those connections per workload and direction",
            self.instances.bytes.clone(),
        );
        r.register(
            "userspace_retransmits",
            "Retransmitted segments of those connections per workload",
            self.instances.retransmits.clone(),
        );
    }

    /// Counts one refused hand-over request.
    pub fn handover_refused(&self, reason: &'static str) {
        self.handover_refused
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Adds a shim's report: its decisions and its fallbacks (one counter with
    /// `fallbackReport`).
    /// A kernel hook attach request ended with `result`.
    pub fn kernel_hook_attach(&self, result: &'static str) {
        self.hooks
            .attaches
            .get_or_create(&StartLabels { result })
            .inc();
    }

    /// The hooks' counters summed since the agent started (detached hooks included), and how
    /// many are attached: exported as increments; skipped entries count as fallbacks
    /// (`not-interposable`, `no-capability`, `isolation-forbids`).
    pub fn kernel_hook_counters(&self, total: &stackroute_kernel_hook::Counters, attached: usize) {
        self.hooks.attached.set(attached as i64);
        let mut exported = self
            .hooks
            .exported
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (outcome, now, before) in [
            ("applied", total.applied, exported.applied),
            ("left-default", total.left_default, exported.left_default),
            (
                "chosen-by-process",
                total.chosen_by_process,
                exported.chosen_by_process,
            ),
            ("set-failed", total.set_failed, exported.set_failed),
            ("no-entry", total.no_entry, exported.no_entry),
        ] {
            let counter = self
                .hooks
                .connections
                .get_or_create(&OutcomeLabels { outcome });
            counter.inc_by(now.saturating_sub(before));
        }
        for (reason, now, before) in [
            (
                FallbackReason::NotInterposable,
                total.not_interposable,
                exported.not_interposable,
            ),
            (
                FallbackReason::NoCapability,
                total.no_capability,
                exported.no_capability,
            ),
            (
                FallbackReason::IsolationForbids,
                total.isolation_forbids,
                exported.isolation_forbids,
            ),
        ] {
            self.fallbacks
                .get_or_create(&ReasonLabels {
                    reason: reason.as_str(),
                })
                .inc_by(now.saturating_sub(before));
        }
        *exported = *total;
    }

    pub fn shim_report(&self, decisions: &[DecisionCount], fallbacks: &[FallbackCount]) {
        for decision in decisions {
            let congestion_control = ["Default", "Cubic", "BBR", "Reno"]
                .into_iter()
                .find(|name| *name == decision.congestion_control)
                .unwrap_or("other");
            let stack = match decision.stack {
                Stack::Kernel => "Kernel",
                Stack::Userspace => "Userspace",
                Stack::Rdma => "RDMA",
            };
            self.shim_decisions
                .get_or_create(&DecisionLabels {
                    stack,
                    congestion_control,
                })
                .inc_by(decision.count.min(1 << 32));
        }
        for fallback in fallbacks {
            self.fallbacks
                .get_or_create(&ReasonLabels {
                    reason: fallback.reason.as_str(),
                })
                .inc_by(fallback.count.min(1 << 32));
        }
    }

    /// Counts upgrade attempts (already bounded by `upgrades::sanitize`) and what was cut.
    pub fn rdma_upgrade_report(
        &self,
        attempts: &[UpgradeAttempt],
        trimmed: crate::upgrades::Trimmed,
    ) {
        for attempt in attempts {
            let role = match attempt.role {
                UpgradeRole::Client => "client",
                UpgradeRole::Server => "server",
            };
            self.rdma_upgrades
                .get_or_create(&UpgradeLabels {
                    role,
                    reason: crate::upgrades::reason_label(&attempt.reason),
                })
                .inc();
        }
        self.rdma_upgrades_dropped.inc_by(trimmed.attempts as u64);
        self.rdma_upgrade_strings_trimmed
            .inc_by(trimmed.strings as u64);
    }

    /// Counts one local request.
    pub fn request(&self, kind: &'static str, result: &'static str) {
        self.requests
            .get_or_create(&RequestLabels { kind, result })
            .inc();
    }
}

async fn metrics(State(agent): State<Arc<Agent>>) -> impl IntoResponse {
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, &agent.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        ),
        Err(error) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("cannot encode metrics: {error}\n"),
        ),
    }
}

/// How long `/healthz` keeps answering 200 once this agent has stopped serving (another agent
/// serves the socket directory): in a rolling update the old pod is deleted well before; an
/// agent that lost its directory otherwise (taken over by something else) is restarted by the
/// kubelet and takes the directory back.
pub const STOPPED_GRACE: Duration = Duration::from_secs(30);
/// How long a hand-over may keep this agent from serving before `/healthz` fails: a hand-over
/// takes at most the drain (4 s) and the wait for the new agent's confirmation (5 s).
pub const HANDING_OVER_LIMIT: Duration = Duration::from_secs(60);

/// The limits `/healthz` applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthLimits {
    /// [`STOPPED_GRACE`].
    pub stopped_grace: Duration,
    /// [`HANDING_OVER_LIMIT`].
    pub handing_over_limit: Duration,
}

impl Default for HealthLimits {
    fn default() -> Self {
        Self {
            stopped_grace: STOPPED_GRACE,
            handing_over_limit: HANDING_OVER_LIMIT,
        }
    }
}

impl HealthLimits {
    /// The defaults, or these overrides (milliseconds; the agent's hidden flags
    /// `--healthz-stopped-grace-ms` and `--healthz-handover-limit-ms`, for tests).
    pub fn new(stopped_grace_ms: Option<u64>, handing_over_limit_ms: Option<u64>) -> Self {
        let defaults = Self::default();
        Self {
            stopped_grace: stopped_grace_ms.map_or(defaults.stopped_grace, Duration::from_millis),
            handing_over_limit: handing_over_limit_ms
                .map_or(defaults.handing_over_limit, Duration::from_millis),
        }
    }

    /// Whether an agent in `role` for `age` is alive; if not, the one-line reason.
    pub fn check(&self, role: Role, age: Duration) -> Result<(), String> {
        match role {
            Role::Serving => Ok(()),
            Role::HandingOver if age > self.handing_over_limit => Err(format!(
                "handing the socket directory over for {}s, more than the limit of {}s: the hand-over is stuck",
                age.as_secs(),
                self.handing_over_limit.as_secs()
            )),
            Role::Stopped if age > self.stopped_grace => Err(format!(
                "stopped serving {}s ago (another agent serves the socket directory), more than the grace of {}s: restart this agent",
                age.as_secs(),
                self.stopped_grace.as_secs()
            )),
            Role::HandingOver | Role::Stopped => Ok(()),
        }
    }
}

async fn healthz(agent: Arc<Agent>, limits: HealthLimits) -> (StatusCode, String) {
    let (role, age) = agent.role_age();
    match limits.check(role, age) {
        Ok(()) => (StatusCode::OK, "ok\n".into()),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
    }
}

async fn readyz(State(agent): State<Arc<Agent>>) -> (StatusCode, String) {
    match agent.role() {
        Role::Serving => {}
        Role::HandingOver => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "handing the socket directory over to a new agent\n".into(),
            );
        }
        Role::Stopped => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "another agent serves the socket directory\n".into(),
            );
        }
    }
    match agent.current() {
        Some(current) => (
            StatusCode::OK,
            format!(
                "ready: revision {}{}\n",
                current.revision,
                if current.stale { " (stale)" } else { "" }
            ),
        ),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "no snapshot published yet\n".into(),
        ),
    }
}

/// How long the address may stay in use: an agent that handed over in the same network
/// namespace (host network) closes it right after the hand-over.
const BIND_RETRY_FOR: Duration = Duration::from_secs(15);

async fn bind_retrying(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let deadline = tokio::time::Instant::now() + BIND_RETRY_FOR;
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Err(error)
                if error.kind() == std::io::ErrorKind::AddrInUse
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            result => return result,
        }
    }
}

/// Serves `/metrics`, `/healthz` (with `limits`) and `/readyz` on `addr` until the process
/// ends.
pub async fn serve(
    addr: SocketAddr,
    agent: Arc<Agent>,
    limits: HealthLimits,
) -> anyhow::Result<()> {
    let listener = bind_retrying(addr).await?;
    info!(addr = %listener.local_addr()?, stopped_grace_ms = limits.stopped_grace.as_millis() as u64, handing_over_limit_ms = limits.handing_over_limit.as_millis() as u64, "serving /metrics, /healthz, /readyz");
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route(
            "/healthz",
            get(move |State(agent): State<Arc<Agent>>| healthz(agent, limits)),
        )
        .route("/readyz", get(readyz))
        .with_state(agent);
    axum::serve(listener, app).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthz_fails_for_an_agent_stopped_or_handing_over_too_long() {
        let limits = HealthLimits::new(None, None);
        assert_eq!(limits, HealthLimits::default());
        assert_eq!(
            HealthLimits::new(Some(1500), None).stopped_grace,
            Duration::from_millis(1500)
        );
        let long = Duration::from_secs(3600);
        assert_eq!(limits.check(Role::Serving, long), Ok(()));
        assert_eq!(limits.check(Role::Stopped, Duration::from_secs(29)), Ok(()));
        let reason = limits
            .check(Role::Stopped, Duration::from_secs(31))
            .unwrap_err();
        assert!(reason.contains("stopped serving 31s ago"), "{reason}");
        assert!(!reason.contains('\n'), "{reason}");
        assert_eq!(
            limits.check(Role::HandingOver, Duration::from_secs(59)),
            Ok(())
        );
        let reason = limits.check(Role::HandingOver, long).unwrap_err();
        assert!(reason.contains("the hand-over is stuck"), "{reason}");
    }

    #[test]
    fn refusals_are_counted_by_reason() {
        let metrics = Metrics::default();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        metrics.handover_refused("wrong-secret");
        metrics.handover_refused("wrong-secret");
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("stackroute_lrd_handover_refused_total{reason=\"wrong-secret\"} 2"),
            "{text}"
        );
    }

    #[test]
    fn upgrade_attempts_are_counted_by_role_and_known_reason() {
        let metrics = Metrics::default();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let attempt = |role, reason: &str| UpgradeAttempt {
            role,
            local: "10.0.0.1:1".into(),
            remote: "10.0.0.2:2".into(),
            reason: reason.into(),
            peer_reason: None,
            elapsed_us: 1,
        };
        metrics.rdma_upgrade_report(
            &[
                attempt(UpgradeRole::Client, "peer-declined"),
                attempt(UpgradeRole::Client, "peer-declined"),
                attempt(UpgradeRole::Server, "no-such-reason"),
            ],
            crate::upgrades::Trimmed {
                attempts: 5,
                strings: 2,
            },
        );
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            "stackroute_lrd_rdma_upgrade_attempts_total{role=\"client\",reason=\"peer-declined\"} 2",
            "stackroute_lrd_rdma_upgrade_attempts_total{role=\"server\",reason=\"other\"} 1",
            "stackroute_lrd_rdma_upgrade_attempts_dropped_total 5",
            "stackroute_lrd_rdma_upgrade_strings_trimmed_total 2",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
    }
}
