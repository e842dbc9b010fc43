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
#![forbid(unsafe_code)]

pub mod args;
pub mod files;
pub mod grpc;
pub mod http;
pub mod index;
pub mod kubernetes;
pub mod metrics;
pub mod store;

use std::sync::Arc;

use anyhow::Context as _;
use stackroute_policy::Settings;
use stackroute_proto::MAX_MESSAGE_BYTES;
use stackroute_proto::v1alpha1::distribution_server::DistributionServer;

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
        let (ready_tx, ready_rx) = tokio::sync::watch::channel(false);
        let (handle, rx) = IndexHandle::channel();
        let mut index = Index::new(
            settings,
            args::ms(stale_after_ms),
            metrics.clone(),
            ready_tx,
        );
        if kube_client.is_some() {
            index.expect_sources(kubernetes::resources().iter().map(kubernetes::source_of));
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
                    identity,
                    duration: std::time::Duration::from_secs(15),
                },
                leader_tx,
            ));
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
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let grpc_listener = tokio::net::TcpListener::bind(grpc_addr)
            .await
            .with_context(|| format!("binding the gRPC address {grpc_addr}"))?;
        tracing::info!(addr = %grpc_listener.local_addr()?, store = store.kind(), "serving gRPC");
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(grpc_listener);
        let grpc = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, shutdown_signal());

        tokio::select! {
            result = grpc => result.context("gRPC server")?,
            result = http => result.context("HTTP server task")?.context("HTTP server")?,
        }
        tracing::info!("shut down");
        Ok(())
    }
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
