//! The pod injection webhook: `POST /inject` (AdmissionReview v1) and `GET /healthz` over
//! HTTPS, with the serving certificate reloaded from files.
//!
//! ```text
//! API server ─► TLS (tls::CertFiles, polled) ─► /inject ─► review::parse ─► decide
//!                                                   (namespace lookup only when the pod does not decide)
//!                                                   (with RDMA on: do the pod's policies list RDMA? rdma::RdmaPolicies)
//!                                               ─► patch::build_with_rdma ─► AdmissionReview response
//! ```
//!
//! The decisions and the patch are the pure `stackroute-injector` crate; this module adds the
//! I/O: the server, the namespace lookup ([`Namespaces`]), the policy question ([`rdma`]),
//! metrics and logs.
//! [`kubernetes`] holds the Kubernetes-mode parts (CA Secret, `caBundle`, the report of pods
//! that opted in but were not injected).

pub mod kubernetes;
pub mod rdma;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::Value;
use stackroute_injector::review::{self, Invalid};
use stackroute_injector::{Config, NamespaceMeta, Rdma, decide};
use stackroute_policy::selector::Labels;

use self::rdma::RdmaPolicies;

use crate::metrics::Metrics;

/// Largest request body accepted (an AdmissionReview carries the object, at most ~1.5 MiB in
/// etcd, plus the request around it).
pub const MAX_BODY_BYTES: usize = 3 * 1024 * 1024;
/// How long a namespace lookup may take before the pod is admitted uninjected.
pub const NAMESPACE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the RDMA policy question may take before the pod is injected without RDMA.
pub const POLICY_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a client has for the TLS handshake and for sending request headers.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A boxed, sendable future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where the webhook reads a namespace's labels and annotations (the AdmissionRequest does not
/// carry them): the API server in Kubernetes mode, a fixed map in tests and standalone mode.
pub trait Namespaces: Send + Sync {
    /// The namespace's metadata; `Ok(None)` when it does not exist.
    fn get<'a>(&'a self, name: &'a str) -> BoxFuture<'a, anyhow::Result<Option<NamespaceMeta>>>;
}

/// A fixed set of namespaces (tests; standalone mode uses an empty one: only pod opt-ins).
#[derive(Clone, Debug, Default)]
pub struct StaticNamespaces(pub BTreeMap<String, NamespaceMeta>);

impl Namespaces for StaticNamespaces {
    fn get<'a>(&'a self, name: &'a str) -> BoxFuture<'a, anyhow::Result<Option<NamespaceMeta>>> {
        Box::pin(async move { Ok(self.0.get(name).cloned()) })
    }
}

/// The webhook's configuration and collaborators.
pub struct Webhook {
    /// Shim image, socket directory, own namespace.
    pub config: Config,
    /// Namespace metadata source.
    pub namespaces: Arc<dyn Namespaces>,
    /// `stackroute_controller_webhook_requests_total{result}`.
    pub metrics: Arc<Metrics>,
    /// RDMA resources for pods whose policies can pick RDMA (`--rdma-resource`); `None`: off.
    pub rdma: Option<RdmaInjection>,
}

/// What pods whose policies can pick RDMA get, and where the webhook asks.
pub struct RdmaInjection {
    /// The resource, its count, `IPC_LOCK`.
    pub config: Rdma,
    /// The policies.
    pub policies: Arc<dyn RdmaPolicies>,
}

/// What one review came to (the `result` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A patch was returned.
    Injected,
    /// Opted in, but everything was already there (a reinvocation).
    Unchanged,
    /// Not opted in, opted out, excluded, or not a pod CREATE.
    Skipped,
    /// Admitted uninjected because the namespace could not be read.
    NamespaceError,
    /// A malformed or unexpected request.
    Invalid,
}

impl Outcome {
    /// The metric label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Injected => "injected",
            Self::Unchanged => "unchanged",
            Self::Skipped => "skipped",
            Self::NamespaceError => "namespace_error",
            Self::Invalid => "invalid",
        }
    }
}

impl Webhook {
    /// Answers one AdmissionReview body: `Ok` is an AdmissionReview response (possibly a
    /// refusal of a malformed review), `Err` a message for HTTP 400 (no UID to answer to).
    pub async fn review(&self, body: &[u8]) -> (Outcome, Result<Value, String>) {
        let request = match review::parse(body) {
            Ok(request) => request,
            Err(invalid) => {
                tracing::warn!(error = invalid.message(), "invalid admission request");
                return match invalid {
                    Invalid::NoUid(message) => (Outcome::Invalid, Err(message)),
                    Invalid::Review { uid, message } => {
                        (Outcome::Invalid, Ok(review::reject(&uid, &message)))
                    }
                };
            }
        };
        let Some(pod) = &request.pod else {
            // Not a pod CREATE (an UPDATE, a subresource): nothing to inject.
            return (Outcome::Skipped, Ok(review::allow(&request.uid, &[], &[])));
        };
        let pod_name = pod
            .metadata
            .name
            .clone()
            .or_else(|| pod.metadata.generate_name.as_ref().map(|g| format!("{g}*")))
            .unwrap_or_default();
        let namespace = request.namespace.as_str();

        let mut ns_meta = None;
        if decide::needs_namespace(pod, namespace, &self.config) {
            let lookup = tokio::time::timeout(NAMESPACE_TIMEOUT, self.namespaces.get(namespace));
            match lookup.await {
                Ok(Ok(meta)) => ns_meta = Some(meta.unwrap_or_default()),
                Ok(Err(error)) => {
                    tracing::warn!(namespace, pod = %pod_name, error = %format!("{error:#}"),
                        "namespace lookup failed; pod admitted without injection");
                }
                Err(_) => {
                    tracing::warn!(namespace, pod = %pod_name,
                        "namespace lookup timed out; pod admitted without injection");
                }
            }
        }
        let settings = match decide(pod, namespace, ns_meta.as_ref(), &self.config) {
            Ok(settings) => settings,
            Err(skip) => {
                let outcome = if skip == stackroute_injector::Skip::NamespaceUnknown {
                    Outcome::NamespaceError
                } else {
                    Outcome::Skipped
                };
                tracing::debug!(namespace, pod = %pod_name, reason = %skip, "not injected");
                let warnings = if outcome == Outcome::NamespaceError {
                    vec![format!(
                        "stackroute: not injected: {skip} (it will be reported as not injected)"
                    )]
                } else {
                    Vec::new()
                };
                return (outcome, Ok(review::allow(&request.uid, &[], &warnings)));
            }
        };
        let (rdma, rdma_warning) = self.rdma_for(pod, namespace, &pod_name).await;
        let mut injection =
            stackroute_injector::build_with_rdma(pod, &settings, &self.config, rdma);
        injection.warnings.extend(rdma_warning);
        let outcome = if injection.ops.is_empty() {
            Outcome::Unchanged
        } else {
            Outcome::Injected
        };
        tracing::info!(
            namespace,
            pod = %pod_name,
            operations = injection.ops.len(),
            libc = settings.libc.as_str(),
            rdma = rdma.is_some(),
            dry_run = request.dry_run,
            warnings = ?injection.warnings,
            "{}",
            if outcome == Outcome::Injected { "injected" } else { "already injected" }
        );
        let warnings: Vec<String> = injection
            .warnings
            .iter()
            .map(|w| format!("stackroute: {w}"))
            .collect();
        (
            outcome,
            Ok(review::allow(&request.uid, &injection.ops, &warnings)),
        )
    }
}

impl Webhook {
    /// The RDMA settings when RDMA is on and a policy that can pick RDMA selects the pod, with
    /// a warning when that could not be found out (the pod is still injected, without RDMA:
    /// the shim then reports `no-device` and falls back, which beats failing the admission).
    async fn rdma_for(
        &self,
        pod: &k8s_openapi::api::core::v1::Pod,
        namespace: &str,
        pod_name: &str,
    ) -> (Option<&Rdma>, Option<String>) {
        let Some(rdma) = &self.rdma else {
            return (None, None);
        };
        let labels: Labels = pod.metadata.labels.clone().unwrap_or_default();
        let question = rdma.policies.selects(namespace, &labels);
        let error = match tokio::time::timeout(POLICY_TIMEOUT, question).await {
            Ok(Ok(true)) => return (Some(&rdma.config), None),
            Ok(Ok(false)) => return (None, None),
            Ok(Err(error)) => format!("{error:#}"),
            Err(_) => "timed out".to_string(),
        };
        tracing::warn!(namespace, pod = %pod_name, %error,
            "could not tell whether the pod's policies pick RDMA; injected without RDMA resources");
        (
            None,
            Some(format!(
                "RDMA resources not added: the policies could not be read ({error})"
            )),
        )
    }
}

/// The routes: `POST /inject`, `GET /healthz`.
pub fn router(webhook: Arc<Webhook>) -> Router {
    Router::new()
        .route("/inject", post(inject))
        .route("/healthz", get(|| async { "ok\n" }))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(webhook)
}

async fn inject(
    State(webhook): State<Arc<Webhook>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(body) => body,
        Err(rejection) => {
            tracing::warn!(error = %rejection.body_text(), "admission request body rejected");
            webhook.metrics.webhook_request(Outcome::Invalid.label());
            return (rejection.status(), rejection.body_text()).into_response();
        }
    };
    let (outcome, answer) = webhook.review(&body).await;
    webhook.metrics.webhook_request(outcome.label());
    match answer {
        Ok(value) => (
            [(header::CONTENT_TYPE, "application/json")],
            value.to_string(),
        )
            .into_response(),
        Err(message) => (StatusCode::BAD_REQUEST, format!("{message}\n")).into_response(),
    }
}

/// Serves `app` over TLS on `listener` until the process ends. Each connection is handled on
/// its own task; a client that does not finish its handshake or headers in
/// [`HANDSHAKE_TIMEOUT`] is dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: Router,
) -> anyhow::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "webhook accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(error)) => {
                    tracing::debug!(%peer, %error, "webhook TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "webhook TLS handshake timed out");
                    return;
                }
            };
            let service = hyper_util::service::TowerToHyperService::new(app);
            let result = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HANDSHAKE_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
            if let Err(error) = result {
                tracing::debug!(%peer, %error, "webhook connection ended with an error");
            }
        });
    }
}
