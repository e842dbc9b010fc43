//! Prometheus metrics and the HTTP endpoints `/metrics`, `/healthz` and `/readyz`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64};

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
use prometheus_client::registry::Registry;
use tracing::info;

use stackroute_local_api::message::{DecisionCount, FallbackCount, Stack};

use crate::state::Agent;

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
    /// Requests on the Unix socket.
    pub requests: Family<RequestLabels, Counter<u64, AtomicU64>>,
    /// Fallbacks reported by shims.
    pub fallbacks: Family<ReasonLabels, Counter<u64, AtomicU64>>,
    /// Connections decided by shims, by the transport they used.
    pub shim_decisions: Family<DecisionLabels, Counter<u64, AtomicU64>>,
}

impl Metrics {
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
    }

    /// Adds a shim's report: its decisions and its fallbacks (one counter with
    /// `fallbackReport`).
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

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(agent): State<Arc<Agent>>) -> (StatusCode, String) {
    match agent.role() {
        crate::state::Role::Serving => {}
        crate::state::Role::HandingOver => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "handing the socket directory over to a new agent\n".into(),
            );
        }
        crate::state::Role::Stopped => {
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
const BIND_RETRY_FOR: std::time::Duration = std::time::Duration::from_secs(15);

async fn bind_retrying(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let deadline = tokio::time::Instant::now() + BIND_RETRY_FOR;
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Err(error)
                if error.kind() == std::io::ErrorKind::AddrInUse
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            result => return result,
        }
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `addr` until the process ends.
pub async fn serve(addr: SocketAddr, agent: Arc<Agent>) -> anyhow::Result<()> {
    let listener = bind_retrying(addr).await?;
    info!(addr = %listener.local_addr()?, "serving /metrics, /healthz, /readyz");
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(agent);
    axum::serve(listener, app).await?;
    Ok(())
}
