//! Command-line arguments.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use stackroute_snapshot::Cidr;

/// The stackroute controller: compiles policy into per-node snapshots and serves them to node
/// agents over gRPC.
#[derive(Clone, Debug, clap::Parser)]
#[command(
    name = "stackroute-controller",
    version,
    subcommand_negates_reqs = true,
    args_conflicts_with_subcommands = true
)]
pub struct Args {
    /// Without a subcommand: run the controller.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Standalone mode: a directory of Kubernetes YAML/JSON (Namespaces, Nodes, Pods, Services,
    /// EndpointSlices, StackRoutes, ClusterStackRoutes), watched for changes.
    #[arg(
        long,
        env = "STACKROUTE_CONTROLLER_STATE_DIR",
        required_unless_present = "kubernetes",
        conflicts_with = "kubernetes"
    )]
    pub state: Option<PathBuf>,

    /// Kubernetes mode: watch the API server (in-cluster config or KUBECONFIG) and write
    /// StackRoute/ClusterStackRoute status from the replica holding the Lease.
    #[arg(long, env = "STACKROUTE_CONTROLLER_KUBERNETES")]
    pub kubernetes: bool,

    /// Namespace of the status-writer Lease (Kubernetes mode).
    #[arg(
        long,
        env = "STACKROUTE_CONTROLLER_LEASE_NAMESPACE",
        default_value = "stackroute-system"
    )]
    pub lease_namespace: String,

    /// Name of the status-writer Lease (Kubernetes mode).
    #[arg(
        long,
        env = "STACKROUTE_CONTROLLER_LEASE_NAME",
        default_value = "stackroute-controller-status"
    )]
    pub lease_name: String,

    /// This replica's identity in the Lease; default: $HOSTNAME (the pod name).
    #[arg(long, env = "STACKROUTE_CONTROLLER_IDENTITY")]
    pub identity: Option<String>,

    /// gRPC listen address for agents and tools.
    #[arg(
        long,
        env = "STACKROUTE_CONTROLLER_GRPC_ADDR",
        default_value = "127.0.0.1:7420"
    )]
    pub grpc_addr: SocketAddr,

    /// HTTP listen address for /metrics, /healthz and /readyz.
    #[arg(
        long,
        env = "STACKROUTE_CONTROLLER_METRICS_ADDR",
        default_value = "127.0.0.1:7421"
    )]
    pub metrics_addr: SocketAddr,

    /// etcd endpoints (comma-separated URLs); registries and revisions then live in etcd,
    /// shared by every replica. Without it, the embedded in-memory store is used.
    #[arg(
        long,
        env = "STACKROUTE_CONTROLLER_ETCD_ENDPOINTS",
        value_delimiter = ','
    )]
    pub etcd_endpoints: Vec<String>,

    /// Key prefix in etcd.
    #[arg(
        long,
        env = "STACKROUTE_CONTROLLER_ETCD_PREFIX",
        default_value = "/stackroute/"
    )]
    pub etcd_prefix: String,

    /// Connect to etcd over TLS with the client certificate in this directory: `ca.crt` (the
    /// etcd server's CA), `tls.crt` and `tls.key` (use `https://` endpoints).
    #[arg(
        long,
        env = "STACKROUTE_CONTROLLER_ETCD_TLS_DIR",
        requires = "etcd_endpoints"
    )]
    pub etcd_tls_dir: Option<PathBuf>,

    /// Networks that count as inside the cluster (comma-separated CIDRs); default: RFC 1918,
    /// 100.64.0.0/10 and fd00::/8.
    #[arg(
        long,
        env = "STACKROUTE_CONTROLLER_CLUSTER_NETWORKS",
        value_delimiter = ','
    )]
    pub cluster_networks: Vec<Cidr>,

    /// Quiet period before a recompile, in milliseconds.
    #[arg(long, env = "STACKROUTE_CONTROLLER_DEBOUNCE_MS", default_value_t = 100)]
    pub debounce_ms: u64,

    /// Longest a change waits for a recompile under constant churn, in milliseconds.
    #[arg(
        long,
        env = "STACKROUTE_CONTROLLER_DEBOUNCE_MAX_MS",
        default_value_t = 1000
    )]
    pub debounce_max_ms: u64,

    /// How often the state directory is polled, in milliseconds.
    #[arg(long, env = "STACKROUTE_CONTROLLER_POLL_MS", default_value_t = 200)]
    pub poll_ms: u64,

    /// A connected node that has not acked the current revision this long after it was
    /// published is reported stale, in milliseconds.
    #[arg(
        long,
        env = "STACKROUTE_CONTROLLER_STALE_AFTER_MS",
        default_value_t = 10_000
    )]
    pub stale_after_ms: u64,

    /// Directory of the gRPC service's TLS material: `tls.crt` and `tls.key` (served; reloaded
    /// when they change) and `ca.crt` (the CA that signs client certificates). Standalone:
    /// `stackroute-controller credentials init` writes one. Kubernetes: with --webhook-ca-secret
    /// and --grpc-service the controller writes it itself.
    #[arg(
        long,
        env = "STACKROUTE_CONTROLLER_GRPC_TLS_DIR",
        required_unless_present = "insecure_plaintext"
    )]
    pub grpc_tls_dir: Option<PathBuf>,

    /// Serve gRPC in plaintext without authentication: every caller may act for every node.
    /// For development on one machine only.
    #[arg(
        long,
        env = "STACKROUTE_CONTROLLER_INSECURE_PLAINTEXT",
        conflicts_with = "grpc_tls_dir"
    )]
    pub insecure_plaintext: bool,

    /// Kubernetes mode: accept agents' projected service-account tokens (audience
    /// `stackroute.dev/agent`) of this service account, NAMESPACE:NAME; each agent may then act
    /// only for the node its pod runs on.
    #[arg(
        long,
        env = "STACKROUTE_CONTROLLER_AGENT_SERVICE_ACCOUNT",
        requires = "kubernetes"
    )]
    pub agent_service_account: Option<String>,

    /// Kubernetes mode: the Service in front of the gRPC port. With --webhook-ca-secret the
    /// controller issues the gRPC serving certificate for NAME.NAMESPACE.svc (and its short
    /// forms) into --grpc-tls-dir.
    #[arg(
        long,
        env = "STACKROUTE_CONTROLLER_GRPC_SERVICE",
        requires = "kubernetes"
    )]
    pub grpc_service: Option<String>,

    /// Kubernetes mode: the ConfigMap (controller's namespace) where the controller publishes
    /// its CA certificate (key `ca.crt`) for the agents to trust.
    #[arg(
        long,
        env = "STACKROUTE_CONTROLLER_CA_CONFIG_MAP",
        requires = "kubernetes"
    )]
    pub ca_config_map: Option<String>,

    /// How long a node's registrations outlive its agent: once no replica has had a watch
    /// stream of the node for this long, its listeners and workloads are removed.
    #[arg(
        long,
        env = "STACKROUTE_CONTROLLER_REGISTRATION_LEASE_SECS",
        default_value_t = 600
    )]
    pub registration_lease_secs: u64,

    /// Most listeners one node may register.
    #[arg(
        long,
        env = "STACKROUTE_CONTROLLER_MAX_LISTENERS_PER_NODE",
        default_value_t = 4096
    )]
    pub max_listeners_per_node: usize,

    /// Most workloads one node may register.
    #[arg(
        long,
        env = "STACKROUTE_CONTROLLER_MAX_WORKLOADS_PER_NODE",
        default_value_t = 1024
    )]
    pub max_workloads_per_node: usize,

    /// Most bytes (encoded) of registrations one node may hold.
    #[arg(
        long,
        env = "STACKROUTE_CONTROLLER_MAX_REGISTRATION_BYTES_PER_NODE",
        default_value_t = 4 * 1024 * 1024
    )]
    pub max_registration_bytes_per_node: usize,

    /// A whole snapshot larger than this goes to agents that reassemble parts as several
    /// messages of at most this many bytes, each read from the snapshot's parts when its turn
    /// comes: a stream then holds one part in its buffers (tonic keeps a stream's encoding
    /// buffer at its largest message), not a copy of the whole snapshot.
    #[arg(
        long,
        env = "STACKROUTE_CONTROLLER_SNAPSHOT_CHUNK_BYTES",
        default_value_t = crate::grpc::DEFAULT_CHUNK_BYTES as u32,
        value_parser = clap::value_parser!(u32).range(256..=64 * 1024 * 1024)
    )]
    pub snapshot_chunk_bytes: u32,

    /// HTTPS listen address of the pod injection webhook (`POST /inject`, `GET /healthz`);
    /// the webhook is off without it.
    #[arg(
        long,
        env = "STACKROUTE_CONTROLLER_WEBHOOK_ADDR",
        requires_all = ["webhook_cert_dir", "shim_image"]
    )]
    pub webhook_addr: Option<SocketAddr>,

    /// Directory of the webhook's serving certificate, `tls.crt` and `tls.key` (reloaded when
    /// they change). With --webhook-ca-secret the controller writes them there itself.
    #[arg(long, env = "STACKROUTE_CONTROLLER_WEBHOOK_CERT_DIR")]
    pub webhook_cert_dir: Option<PathBuf>,

    /// Kubernetes mode: the Secret (in the controller's namespace) holding the controller-owned
    /// CA, created when missing; the controller issues its serving certificates from it (the
    /// webhook's, with --webhook-service, patching caBundle of --webhook-config-name; the gRPC
    /// service's, with --grpc-service).
    #[arg(
        long,
        alias = "ca-secret",
        env = "STACKROUTE_CONTROLLER_WEBHOOK_CA_SECRET",
        requires = "kubernetes"
    )]
    pub webhook_ca_secret: Option<String>,

    /// The MutatingWebhookConfiguration whose webhooks get the CA as caBundle.
    #[arg(long, env = "STACKROUTE_CONTROLLER_WEBHOOK_CONFIG_NAME")]
    pub webhook_config_name: Option<String>,

    /// The Service in front of the webhook: the serving certificate names
    /// NAME.NAMESPACE.svc (and NAME.NAMESPACE.svc.cluster.local, NAME.NAMESPACE, NAME).
    #[arg(long, env = "STACKROUTE_CONTROLLER_WEBHOOK_SERVICE")]
    pub webhook_service: Option<String>,

    /// Image of the injected init container (holds /stackroute/lib/libnsocket.so, the musl
    /// build under /stackroute/lib/musl/, and /bin/sh with cp).
    #[arg(long, env = "STACKROUTE_CONTROLLER_SHIM_IMAGE")]
    pub shim_image: Option<String>,

    /// The node agent's socket directory on every node, mounted read-only into injected pods.
    #[arg(
        long,
        env = "STACKROUTE_CONTROLLER_SOCKET_DIR",
        default_value = "/run/stackroute"
    )]
    pub socket_dir: String,

    /// Extended resource (a device plugin's, e.g. rdma/hca_shared_devices_a) that the webhook
    /// adds to every application container of an injected pod when one of the pod's policies
    /// lists an RDMA transport; without it no pod gets RDMA resources.
    #[arg(
        long,
        env = "STACKROUTE_CONTROLLER_RDMA_RESOURCE",
        requires = "webhook_addr"
    )]
    pub rdma_resource: Option<String>,

    /// How many of --rdma-resource each container requests (and is limited to), unless the
    /// pod sets it itself.
    #[arg(
        long,
        env = "STACKROUTE_CONTROLLER_RDMA_RESOURCE_COUNT",
        default_value_t = 1,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub rdma_resource_count: u32,

    /// With --rdma-resource, also add the IPC_LOCK capability (`--rdma-ipc-lock=false` to
    /// leave capabilities alone, e.g. under Pod Security "baseline", which forbids it).
    #[arg(
        long,
        env = "STACKROUTE_CONTROLLER_RDMA_IPC_LOCK",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub rdma_ipc_lock: bool,
}

/// The controller's subcommands.
#[derive(Clone, Debug, clap::Subcommand)]
pub enum Command {
    /// Create a development CA, the controller's serving certificate and client credentials
    /// for standalone deployments.
    Credentials {
        /// What to create.
        #[command(subcommand)]
        action: crate::credentials::Action,
    },
}

/// Milliseconds as a duration.
pub fn ms(value: u64) -> Duration {
    Duration::from_millis(value)
}
