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
//! - [`memory`]: the one FFI call (giving freed heap back to the kernel); no other unsafe code.
#![deny(unsafe_code)]

pub mod args;
pub mod auth;
pub mod certs;
pub mod credentials;
pub mod files;
pub mod grpc;
pub mod http;
pub mod index;
pub mod kubernetes;
pub mod memory;
pub mod metrics;
pub mod store;
pub mod tls;
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
            command,
            state,
            kubernetes,
            lease_namespace,
            lease_name,
            identity,
            grpc_addr,
            metrics_addr,
            etcd_endpoints,
            etcd_prefix,
            etcd_tls_dir,
            cluster_networks,
            debounce_ms,
            debounce_max_ms,
            poll_ms,
            stale_after_ms,
            grpc_tls_dir,
            insecure_plaintext,
            agent_service_account,
            grpc_service,
            ca_config_map,
            registration_lease_secs,
            max_listeners_per_node,
            max_workloads_per_node,
            max_registration_bytes_per_node,
            snapshot_chunk_bytes,
            webhook_addr,
            webhook_cert_dir,
            webhook_ca_secret,
            webhook_config_name,
            webhook_service,
            shim_image,
            socket_dir,
            rdma_resource,
            rdma_resource_count,
            rdma_ipc_lock,
        } = self;
        if let Some(args::Command::Credentials { action }) = command {
            return action.run();
        }
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
        let token_reviewer = match (&kube_client, agent_service_account) {
            (Some(client), Some(account)) => {
                Some(auth::TokenReviewer::new(client.clone(), account))
            }
            _ => None,
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
            Arc::new(
                EtcdStore::connect(&etcd_endpoints, &etcd_prefix, etcd_tls_dir.as_deref()).await?,
            )
        };
        let metrics = Arc::new(Metrics::default());
        let webhook_files = webhook_cert_dir.as_deref().map(tls::CertFiles::new);
        let grpc_files = grpc_tls_dir.as_deref().map(tls::CertFiles::new);
        let manages_certificates = webhook_ca_secret.is_some();
        if let Some(secret) = webhook_ca_secret {
            let client = kube_client
                .clone()
                .context("--webhook-ca-secret needs --kubernetes")?;
            let mut targets = Vec::new();
            if let (Some(service), Some(files)) = (webhook_service, &webhook_files) {
                targets.push(webhook::kubernetes::ServingTarget {
                    service,
                    files: files.clone(),
                    with_ca: false,
                });
            }
            if let (Some(service), Some(files)) = (grpc_service, &grpc_files) {
                targets.push(webhook::kubernetes::ServingTarget {
                    service,
                    files: files.clone(),
                    with_ca: true,
                });
            }
            tokio::spawn(
                webhook::kubernetes::CertificateManager {
                    namespace: client.default_namespace().to_string(),
                    client,
                    secret,
                    targets,
                    webhook_config: webhook_config_name,
                    ca_config_map,
                }
                .run(),
            );
        }
        // Before the webhook: it asks the index whether a pod's policies can pick RDMA.
        let (handle, rx) = IndexHandle::channel();
        let rdma = rdma_resource.map(|resource_name| stackroute_injector::Rdma {
            resource_name,
            resource_count: rdma_resource_count,
            ipc_lock: rdma_ipc_lock,
        });
        let webhook = match (webhook_addr, &injector_config) {
            (Some(addr), Some(config)) => Some(
                start_webhook(
                    addr,
                    config.clone(),
                    webhook_files.context("--webhook-addr needs --webhook-cert-dir")?,
                    kube_client.as_ref(),
                    metrics.clone(),
                    rdma.map(|config| (config, handle.clone())),
                )
                .await?,
            ),
            _ => None,
        };
        let (ready_tx, ready_rx) = tokio::sync::watch::channel(false);
        let mut index = Index::new(
            settings,
            args::ms(stale_after_ms),
            metrics.clone(),
            ready_tx,
        );
        if kube_client.is_some() {
            index.expect_sources(kubernetes::sources());
            index.pods_from_api_server();
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

        let auth = match &grpc_files {
            None => {
                anyhow::ensure!(
                    insecure_plaintext,
                    "gRPC needs --grpc-tls-dir or --insecure-plaintext"
                );
                tracing::warn!(
                    "gRPC in plaintext without authentication (--insecure-plaintext): \
                    any caller may act for any node"
                );
                auth::Authenticator::insecure(metrics.clone())
            }
            Some(_) => auth::Authenticator::secure(token_reviewer, metrics.clone()),
        };
        tokio::spawn(expire_registrations(
            handle.clone(),
            store.clone(),
            metrics.clone(),
            std::time::Duration::from_secs(registration_lease_secs),
        ));
        let service = DistributionServer::new(
            grpc::DistributionService::new(
                handle,
                store.clone(),
                metrics,
                auth,
                grpc::Quotas {
                    listeners: max_listeners_per_node,
                    workloads: max_workloads_per_node,
                    bytes: max_registration_bytes_per_node,
                },
            )
            .with_chunk_bytes(snapshot_chunk_bytes as usize),
        )
        .max_decoding_message_size(MAX_REQUEST_BYTES)
        .max_encoding_message_size(MAX_UPDATE_BYTES);
        let grpc_listener = listen(grpc_addr, GRPC_BACKLOG)
            .with_context(|| format!("binding the gRPC address {grpc_addr}"))?;
        tracing::info!(addr = %grpc_listener.local_addr()?, store = store.kind(),
            tls = grpc_files.is_some(), "serving gRPC");
        let server = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
            .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
            .add_service(service);
        let grpc = async move {
            match grpc_files {
                None => {
                    // Small replies (registrations, acks) must not wait for Nagle's 40 ms:
                    // tonic's own `tcp_nodelay` covers only listeners it binds itself.
                    let incoming = tokio_stream::StreamExt::map(
                        tokio_stream::wrappers::TcpListenerStream::new(grpc_listener),
                        |accepted| accepted.inspect(|tcp| drop(tcp.set_nodelay(true))),
                    );
                    server
                        .serve_with_incoming_shutdown(incoming, shutdown_signal())
                        .await
                }
                Some(files) => {
                    let incoming = tls_incoming(grpc_listener, files, manages_certificates).await?;
                    server
                        .serve_with_incoming_shutdown(incoming, shutdown_signal())
                        .await
                }
            }
            .map_err(anyhow::Error::from)
        };

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
    files: Arc<tls::CertFiles>,
    client: Option<&kube::Client>,
    metrics: Arc<Metrics>,
    rdma: Option<(stackroute_injector::Rdma, IndexHandle)>,
) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<()>>> {
    config
        .validate()
        .map_err(|e| anyhow::anyhow!("--shim-image/--socket-dir: {e}"))?;
    let rdma = match rdma {
        Some((config, index)) => {
            config
                .validate()
                .map_err(|e| anyhow::anyhow!("--rdma-resource/--rdma-resource-count: {e}"))?;
            tracing::info!(resource = %config.resource_name, count = config.resource_count,
                ipc_lock = config.ipc_lock, "RDMA resources for pods whose policies can pick RDMA");
            Some(webhook::RdmaInjection {
                config,
                policies: Arc::new(index),
            })
        }
        None => None,
    };
    let cert_dir = files.dir().to_path_buf();
    if let Err(error) = files.reload() {
        tracing::warn!(error = %format!("{error:#}"),
            "webhook certificate not loaded yet; TLS handshakes fail until it appears");
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
        rdma,
    }));
    Ok(tokio::spawn(webhook::serve(
        listener,
        files.server_config()?,
        app,
    )))
}

/// Every quarter lease (at least every second): tells the other replicas which agents are
/// connected here, and removes the registrations of nodes whose agent has been gone from
/// every replica for a whole lease.
async fn expire_registrations(
    index: IndexHandle,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    lease: std::time::Duration,
) {
    let period = (lease / 4).max(std::time::Duration::from_secs(1));
    loop {
        tokio::time::sleep(period).await;
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let Ok(liveness) = index.liveness(lease, unix_ms).await else {
            return;
        };
        for node in &liveness.connected {
            if let Err(error) = store.put_alive(node, unix_ms).await {
                tracing::warn!(
                    node,
                    error = format!("{error:#}"),
                    "could not share a liveness mark"
                );
            }
        }
        let expired = liveness
            .expired_listeners
            .into_iter()
            .map(|key| ("listener", key))
            .chain(
                liveness
                    .expired_workloads
                    .into_iter()
                    .map(|key| ("workload", key)),
            );
        for (kind, key) in expired {
            let (removed, change) = if kind == "listener" {
                (
                    store.remove_listener(&key).await,
                    index::RegistryChange::RemoveListener(key.clone()),
                )
            } else {
                (
                    store.remove_workload(&key).await,
                    index::RegistryChange::RemoveWorkload(key.clone()),
                )
            };
            if removed.is_ok() && index.register(change).await.is_ok() {
                tracing::info!(kind, key, "expired a registration: its agent is gone");
                metrics.registration(kind, "expire");
            }
        }
    }
}

/// Most concurrent calls on one HTTP/2 connection (an agent needs a few).
const MAX_STREAMS_PER_CONNECTION: u32 = 32;
/// Time a client has to finish its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The gRPC connections, over TLS with the certificate in `files` (reloaded when it changes)
/// and client certificates checked against the CA next to it; `wait`: the material is being
/// written by the certificate manager, wait for it instead of failing. Handshakes run on their own
/// tasks so that a slow client holds up nobody else.
async fn tls_incoming(
    listener: tokio::net::TcpListener,
    files: Arc<tls::CertFiles>,
    wait: bool,
) -> anyhow::Result<
    impl tokio_stream::Stream<
        Item = std::io::Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>,
    >,
> {
    // In Kubernetes the certificate manager writes the directory shortly after start: wait for
    // it (connections wait in the listen backlog meanwhile).
    let ca_path = files.dir().join(tls::CA_FILE);
    let mut warned = false;
    let client_ca = loop {
        let loaded = files.reload().and_then(|_| {
            anyhow::ensure!(files.loaded(), "no usable tls.crt/tls.key yet");
            std::fs::read(&ca_path).with_context(|| format!("reading {}", ca_path.display()))
        });
        match loaded {
            Ok(client_ca) => break client_ca,
            Err(error) if !wait => {
                return Err(error.context(format!(
                    "loading the gRPC TLS material from --grpc-tls-dir {}",
                    files.dir().display()
                )));
            }
            Err(error) if !warned => {
                tracing::warn!(dir = %files.dir().display(), error = %format!("{error:#}"),
                    "gRPC TLS material not there yet; waiting for it");
                warned = true;
            }
            Err(_) => {}
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(files.grpc_server_config(&client_ca)?);
    tokio::spawn(files.watch(CERT_POLL));
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "gRPC accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true); // as for plaintext
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(error)) => {
                        tracing::info!(%peer, %error, "gRPC TLS handshake failed");
                    }
                    Err(_) => tracing::info!(%peer, "gRPC TLS handshake timed out"),
                }
            });
        }
    });
    Ok(tokio_stream::wrappers::ReceiverStream::new(rx))
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

/// Connections the gRPC listener queues before they are accepted: every node's agent connects
/// at once after a controller restart, and tokio's default (1,024) resets the rest. The kernel
/// caps it at `net.core.somaxconn`.
const GRPC_BACKLOG: u32 = 8192;

fn listen(addr: std::net::SocketAddr, backlog: u32) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}
