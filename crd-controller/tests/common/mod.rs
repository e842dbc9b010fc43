//! Real processes for the integration tests: the controller binary and etcd, each killed by PID
//! when its guard drops; every wait has a timeout.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use stackroute_proto::v1alpha1::distribution_client::DistributionClient;
use stackroute_proto::v1alpha1::{
    ApiVersion, SnapshotUpdate, StatusRequest, StatusResponse, WatchRequest,
};
use tonic::transport::Channel;

pub const CLUSTER: &str = r#"apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Node
  metadata: {name: n1, labels: {topology.kubernetes.io/zone: z1}}
  status: {addresses: [{type: InternalIP, address: 10.0.0.1}]}
- apiVersion: v1
  kind: Node
  metadata: {name: n2, labels: {topology.kubernetes.io/zone: z1}}
  status: {addresses: [{type: InternalIP, address: 10.0.0.2}]}
- apiVersion: v1
  kind: Namespace
  metadata: {name: shop}
- apiVersion: v1
  kind: Pod
  metadata: {name: web-0, namespace: shop, labels: {app: web}}
  spec: {nodeName: n1, containers: []}
  status: {podIP: 10.1.0.10}
- apiVersion: v1
  kind: Pod
  metadata: {name: db-0, namespace: shop, labels: {app: db}}
  spec: {nodeName: n2, containers: []}
  status: {podIP: 10.1.0.20}
"#;

/// Web → anything (see [`testkit::web_policy`]).
pub fn policy(stack: &str, congestion_control: &str) -> String {
    testkit::web_policy(stack, congestion_control)
}

pub use testkit::{free_port, http_get, wait_for_async as wait_for};

// === the controller ===

pub struct Controller {
    child: Option<Child>,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub log: PathBuf,
    /// Arguments after the addresses (`--state DIR …` or `--kubernetes …`).
    mode: Vec<String>,
    env: Vec<(String, String)>,
}

impl Controller {
    /// Starts the controller on free ports and waits until `/readyz` says ready.
    pub async fn start(state: &Path, log_dir: &Path, extra: &[&str]) -> Self {
        let mut mode = vec!["--state".to_string(), state.display().to_string()];
        mode.extend(extra.iter().map(|s| s.to_string()));
        Self::start_with(log_dir, mode, Vec::new()).await
    }

    /// Starts it in Kubernetes mode against `kubeconfig`, its Lease in `namespace`.
    pub async fn start_kubernetes(log_dir: &Path, kubeconfig: &str, namespace: &str) -> Self {
        let mode = [
            "--kubernetes",
            "--lease-namespace",
            namespace,
            "--identity",
            "test",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        Self::start_with(
            log_dir,
            mode,
            vec![("KUBECONFIG".into(), kubeconfig.into())],
        )
        .await
    }

    async fn start_with(log_dir: &Path, mode: Vec<String>, env: Vec<(String, String)>) -> Self {
        let grpc = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut controller = Self {
            child: None,
            grpc,
            http,
            log: log_dir.join(format!("controller-{}.log", grpc.port())),
            mode,
            env,
        };
        controller.spawn().await;
        controller
    }

    async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("controller log file");
        let child = Command::new(env!("CARGO_BIN_EXE_stackroute-controller"))
            .arg("--grpc-addr")
            .arg(self.grpc.to_string())
            .arg("--metrics-addr")
            .arg(self.http.to_string())
            .args(["--debounce-ms", "50", "--poll-ms", "50"])
            // These tests are about the index and the stores; tests/security.rs runs TLS.
            .args(
                (!self.mode.iter().any(|a| a == "--grpc-tls-dir"))
                    .then_some("--insecure-plaintext"),
            )
            .args(&self.mode)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting stackroute-controller");
        self.child = Some(child);
        let http = self.http;
        let log = self.log.clone();
        wait_for(
            "the controller to be ready",
            Duration::from_secs(20),
            || {
                let ready = http_get(http, "/readyz").is_some_and(|(code, _)| code == 200);
                let log = log.clone();
                async move {
                    if !ready {
                        // Fail fast with the log if the process died.
                        let text = std::fs::read_to_string(&log).unwrap_or_default();
                        assert!(!text.contains("Error: "), "controller exited:\n{text}");
                    }
                    ready.then_some(())
                }
            },
        )
        .await;
    }

    /// kill -9, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same ports.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    pub async fn client(&self) -> DistributionClient<Channel> {
        let url = format!("http://{}", self.grpc);
        let channel = wait_for("a gRPC connection", Duration::from_secs(10), || {
            let url = url.clone();
            async move {
                Channel::from_shared(url)
                    .expect("valid URL")
                    .connect()
                    .await
                    .ok()
            }
        })
        .await;
        DistributionClient::new(channel)
            .max_decoding_message_size(stackroute_proto::MAX_UPDATE_BYTES)
    }

    /// A client whose HTTP/2 windows are tiny: it can hold almost nothing unread, like an
    /// agent that stopped reading.
    pub async fn tiny_window_client(&self) -> DistributionClient<Channel> {
        let endpoint = Channel::from_shared(format!("http://{}", self.grpc))
            .expect("valid URL")
            .initial_stream_window_size(Some(256))
            .initial_connection_window_size(Some(256));
        let channel = endpoint.connect().await.expect("gRPC connection");
        DistributionClient::new(channel)
            .max_decoding_message_size(stackroute_proto::MAX_UPDATE_BYTES)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- controller log {} ---\n{}",
                self.log.display(),
                self.log_text()
            );
        }
        self.kill();
    }
}

pub async fn status(client: &mut DistributionClient<Channel>) -> StatusResponse {
    client
        .get_status(StatusRequest {})
        .await
        .expect("GetStatus")
        .into_inner()
}

/// A watch stream of a node.
pub async fn watch(
    client: &mut DistributionClient<Channel>,
    node: &str,
) -> tonic::Streaming<SnapshotUpdate> {
    watch_from(client, node, 0, false).await
}

/// Watches `node` as an agent holding `known_revision` (0: nothing) that does or does not
/// accept deltas.
pub async fn watch_from(
    client: &mut DistributionClient<Channel>,
    node: &str,
    known_revision: u64,
    accepts_delta: bool,
) -> tonic::Streaming<SnapshotUpdate> {
    client
        .watch_snapshots(WatchRequest {
            node: node.into(),
            agent_id: format!("test-{node}"),
            known_revision,
            api_version: ApiVersion::V1alpha1 as i32,
            accepts_delta,
            accepts_chunks: false,
            accepts_listener_deltas: false,
        })
        .await
        .expect("WatchSnapshots")
        .into_inner()
}

/// The next update of a stream that satisfies `accept`, within `timeout`.
pub async fn next_matching(
    stream: &mut tonic::Streaming<SnapshotUpdate>,
    timeout: Duration,
    what: &str,
    mut accept: impl FnMut(&SnapshotUpdate) -> bool,
) -> SnapshotUpdate {
    tokio::time::timeout(timeout, async {
        loop {
            let update = stream
                .message()
                .await
                .expect("stream healthy")
                .expect("stream open");
            if accept(&update) {
                return update;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out after {timeout:?} waiting for {what}"))
}

/// The first transport `ns/pod` gets towards `ip:port` (TCP) in this snapshot.
pub fn decide(update: &SnapshotUpdate, namespace: &str, pod: &str, to: &str) -> String {
    let snapshot =
        stackroute_snapshot::Snapshot::parse(&update.snapshot).expect("the snapshot decodes");
    assert_eq!(snapshot.revision(), update.revision);
    let workload = snapshot
        .workload_by_name(namespace, pod)
        .unwrap_or_else(|| panic!("{namespace}/{pod} in the snapshot of {}", update.node));
    let (ip, port) = to.rsplit_once(':').expect("IP:PORT");
    snapshot
        .decide(
            workload,
            ip.parse().expect("IP"),
            port.parse().expect("port"),
            stackroute_snapshot::Protocol::Tcp,
            &mut stackroute_snapshot::NoTrace,
        )
        .transport()
        .to_string()
}

// === etcd ===

pub struct Etcd {
    child: Child,
    pub endpoint: String,
    _data: tempfile::TempDir,
}

/// The gate of the etcd trials: `etcd` on PATH, else ignored (a failure with
/// `STACKROUTE_REQUIRE_ETCD=1`).
pub fn etcd_installed() -> Result<PathBuf, testkit::Ignored> {
    testkit::program(
        "etcd",
        "STACKROUTE_REQUIRE_ETCD",
        "Debian: apt-get install etcd-server",
    )
}

impl Etcd {
    /// The controller's flags for this etcd, its keys under `prefix`.
    pub fn args<'a>(&'a self, prefix: &'a str) -> [&'a str; 4] {
        ["--etcd-endpoints", &self.endpoint, "--etcd-prefix", prefix]
    }

    /// Starts etcd on free loopback ports (the trial's gate, [`etcd_installed`], found it).
    pub async fn start() -> Self {
        Self::start_with(None).await
    }

    /// Starts etcd serving clients over TLS with `server` (`tls.crt`, `tls.key`) and requiring
    /// client certificates signed by `client_ca`.
    pub async fn start_tls(server: &Path, client_ca: &Path) -> Self {
        Self::start_with(Some((server, client_ca))).await
    }

    async fn start_with(tls: Option<(&Path, &Path)>) -> Self {
        let data = tempfile::tempdir().expect("etcd data dir");
        let client = free_port();
        let peer = free_port();
        let health = free_port();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let client_url = format!("{scheme}://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let mut command = Command::new("etcd");
        if let Some((server, client_ca)) = tls {
            command
                .arg("--cert-file")
                .arg(server.join("tls.crt"))
                .arg("--key-file")
                .arg(server.join("tls.key"))
                .arg("--client-cert-auth")
                .arg("--trusted-ca-file")
                .arg(client_ca);
        }
        let child = command
            .args(["--name", "test", "--data-dir"])
            .arg(data.path())
            // /health in plaintext on its own port, whatever the client port speaks.
            .args([
                "--listen-metrics-urls",
                &format!("http://127.0.0.1:{health}"),
            ])
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("test={peer_url}")])
            .args(["--initial-cluster-state", "new"])
            .args(["--heartbeat-interval", "10", "--election-timeout", "100"])
            .args(["--log-level", "warn", "--logger", "zap"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting etcd");
        let etcd = Self {
            child,
            endpoint: client_url,
            _data: data,
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], health));
        wait_for("etcd to be healthy", Duration::from_secs(15), || {
            let healthy = http_get(addr, "/health").is_some_and(|(_, body)| body.contains("true"));
            async move { healthy.then_some(()) }
        })
        .await;
        etcd
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
