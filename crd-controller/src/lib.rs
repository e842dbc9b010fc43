//! The stackroute controller.
//!
//! ```text
//! --state DIR ─► files (poller) ─┐
//! agents (gRPC) ─► grpc ─────────┼─► index (one task) ─► per-node watch channels ─► WatchSnapshots
//! store (memory | etcd) ─────────┘        │
//!                                         └─► GetStatus, /metrics, /readyz
//! ```
//!
//! - [`files`]: the standalone source, per-file last-good-version logic.
//! - [`index`]: the single-owner index, debounce, compile, publish, status.
//! - [`store`]: registries and revisions, embedded or in etcd.
//! - [`grpc`]: the `Distribution` service with input validation.
//! - [`http`] and [`metrics`]: `/metrics`, `/healthz`, `/readyz`.
//! - [`webhook`]: the pod injection webhook over HTTPS (decisions and patch in
//!   `stackroute-injector`), its certificates, and the not-injected report.
#![forbid(unsafe_code)]

pub mod args;
pub mod files;
pub mod grpc;
pub mod http;
pub mod index;
pub mod kubernetes;
pub mod metrics;
pub mod store;
pub mod webhook;

use std::sync::Arc;

use anyhow::Context as _;
use stackroute_policy::Settings;
use stackroute_proto::v1alpha1::distribution_server::DistributionServer;
use stackroute_proto::{MAX_REQUEST_BYTES, MAX_UPDATE_BYTES};

pub use args::Args;

use crate::index::{Debouncer, Index, IndexHandle};
use crate::metrics::Metrics;
use crate::store::{EtcdStore, MemoryStore, Store};

impl Args {
    /// Runs the controller until it is interrupted (SIGINT/SIGTERM) or a server fails.
    pub async fn run(self) -> anyhow::Result<()> {
        let Self {
            state,
            kubernetes,
            lease_namespace,
            lease_name,
            identity,
            grpc_addr,
            metrics_addr,
            etcd_endpoints,
            etcd_prefix,
            cluster_networks,
            debounce_ms,
            debounce_max_ms,
            poll_ms,
            stale_after_ms,
            webhook_addr,
            webhook_cert_dir,
            webhook_ca_secret,
            webhook_config_name,
            webhook_service,
            shim_image,
            socket_dir,
        } = self;
        if let Some(state) = &state {
            anyhow::ensure!(
                state.is_dir(),
                "--state {} is not a directory",
                state.display()
            );
        }
        let kube_client =
            if kubernetes {
                Some(kube::Client::try_default().await.context(
                    "connecting to the Kubernetes API (in-cluster config or KUBECONFIG)",
                )?)
            } else {
                None
            };
        // The webhook's settings; the controller's own namespace is never injected.
        let injector_config = webhook_addr.map(|_| stackroute_injector::Config {
            shim_image: shim_image.clone().unwrap_or_default(),
            socket_dir: socket_dir.clone(),
            own_namespace: kube_client.as_ref().map_or_else(
                || lease_namespace.clone(),
                |c| c.default_namespace().to_string(),
            ),
        });
        let mut settings = Settings::default();
        if !cluster_networks.is_empty() {
            settings.cluster_networks = cluster_networks;
        }

        let store: Arc<dyn Store> = if etcd_endpoints.is_empty() {
            Arc::new(MemoryStore::default())
        } else {
            Arc::new(EtcdStore::connect(&etcd_endpoints, &etcd_prefix).await?)
        };
        let metrics = Arc::new(Metrics::default());
        let webhook = match (webhook_addr, &injector_config) {
            (Some(addr), Some(config)) => Some(
                start_webhook(
                    addr,
                    config.clone(),
                    webhook_cert_dir.context("--webhook-addr needs --webhook-cert-dir")?,
                    kube_client.as_ref(),
                    webhook_ca_secret.zip(webhook_config_name.zip(webhook_service)),
                    metrics.clone(),
                )
                .await?,
            ),
            _ => None,
        };
        let (ready_tx, ready_rx) = tokio::sync::watch::channel(false);
        let (handle, rx) = IndexHandle::channel();
        let mut index = Index::new(
            settings,
            args::ms(stale_after_ms),
            metrics.clone(),
            ready_tx,
        );
        if kube_client.is_some() {
            index.expect_sources(kubernetes::sources());
        }
        let debouncer = Debouncer::new(args::ms(debounce_ms), args::ms(debounce_max_ms));
        tokio::spawn(index::run(
            index,
            handle.clone(),
            rx,
            store.clone(),
            debouncer,
        ));

        // The registries (the store resyncs by itself after errors).
        {
            let store = store.clone();
            let handle = handle.clone();
            tokio::spawn(async move { store.run(handle).await });
        }

        // The state directory, polled on its own thread.
        if let Some(state) = state {
            let handle = handle.clone();
            let interval = args::ms(poll_ms);
            std::thread::Builder::new()
                .name("state-dir".into())
                .spawn(move || {
                    files::poll_dir(&state, interval, |event| handle.file(event).is_ok());
                })
                .context("starting the state directory poller")?;
        }

        // Or the API server, with one status writer elected through a Lease.
        if let Some(client) = kube_client {
            tokio::spawn(kubernetes::report_server_version(client.clone()));
            kubernetes::spawn_watchers(&client, &handle);
            let identity = identity
                .or_else(|| std::env::var("HOSTNAME").ok())
                .unwrap_or_else(|| format!("stackroute-controller-{}", std::process::id()));
            let (leader_tx, leader_rx) = tokio::sync::watch::channel(false);
            tokio::spawn(kubernetes::hold_lease(
                client.clone(),
                kubernetes::LeaseConfig {
                    namespace: lease_namespace,
                    name: lease_name,
                    identity: identity.clone(),
                    duration: std::time::Duration::from_secs(15),
                },
                leader_tx,
            ));
            if let Some(config) = injector_config {
                tokio::spawn(webhook::kubernetes::report_not_injected(
                    client.clone(),
                    config,
                    metrics.clone(),
                    leader_rx.clone(),
                    identity.clone(),
                ));
            }
            tokio::spawn(kubernetes::write_statuses(
                client,
                handle.clone(),
                leader_rx,
            ));
        } else {
            let _ = (lease_namespace, lease_name, identity);
        }

        let http_listener = http::bind(metrics_addr).await?;
        tracing::info!(addr = %http_listener.local_addr()?, "serving /metrics, /healthz, /readyz");
        let http = tokio::spawn(http::serve(http_listener, metrics.clone(), ready_rx));

        let service = DistributionServer::new(grpc::DistributionService::new(
            handle,
            store.clone(),
            metrics,
        ))
        .max_decoding_message_size(MAX_REQUEST_BYTES)
        .max_encoding_message_size(MAX_UPDATE_BYTES);
        let grpc_listener = tokio::net::TcpListener::bind(grpc_addr)
            .await
            .with_context(|| format!("binding the gRPC address {grpc_addr}"))?;
        tracing::info!(addr = %grpc_listener.local_addr()?, store = store.kind(), "serving gRPC");
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(grpc_listener);
        let grpc = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, shutdown_signal());

        let webhook = async {
            match webhook {
                Some(task) => task.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            result = grpc => result.context("gRPC server")?,
            result = webhook => result.context("webhook server task")?.context("webhook server")?,
            result = http => result.context("HTTP server task")?.context("HTTP server")?,
        }
        tracing::info!("shut down");
        Ok(())
    }
}

/// How often the webhook's certificate files are checked for changes.
const CERT_POLL: std::time::Duration = std::time::Duration::from_secs(2);

/// Binds the webhook listener, loads (or, with a CA Secret, issues) its certificate and starts
/// serving.
async fn start_webhook(
    addr: std::net::SocketAddr,
    config: stackroute_injector::Config,
    cert_dir: std::path::PathBuf,
    client: Option<&kube::Client>,
    ca: Option<(String, (String, String))>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<()>>> {
    config
        .validate()
        .map_err(|e| anyhow::anyhow!("--shim-image/--socket-dir: {e}"))?;
    let files = webhook::tls::CertFiles::new(&cert_dir);
    match (ca, client) {
        (Some((secret, (config_name, service))), Some(client)) => {
            tokio::spawn(
                webhook::kubernetes::CertificateManager {
                    client: client.clone(),
                    namespace: config.own_namespace.clone(),
                    secret,
                    config_name,
                    service,
                    files: files.clone(),
                }
                .run(),
            );
        }
        (Some(_), None) => anyhow::bail!("--webhook-ca-secret needs --kubernetes"),
        (None, _) => {
            if let Err(error) = files.reload() {
                tracing::warn!(error = %format!("{error:#}"),
                    "webhook certificate not loaded yet; TLS handshakes fail until it appears");
            }
        }
    }
    tokio::spawn(files.clone().watch(CERT_POLL));
    let namespaces: Arc<dyn webhook::Namespaces> = match client {
        Some(client) => Arc::new(webhook::kubernetes::KubeNamespaces::new(client.clone())),
        None => Arc::new(webhook::StaticNamespaces::default()),
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the webhook address {addr}"))?;
    tracing::info!(addr = %listener.local_addr()?, cert_dir = %cert_dir.display(),
        own_namespace = %config.own_namespace, "serving the injection webhook (HTTPS /inject)");
    let app = webhook::router(Arc::new(webhook::Webhook {
        config,
        namespaces,
        metrics,
    }));
    Ok(tokio::spawn(webhook::serve(
        listener,
        files.server_config()?,
        app,
    )))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
