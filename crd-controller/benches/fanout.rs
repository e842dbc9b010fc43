//! Controller benchmark (issue 3): change-to-last-ack latency and resident memory.
//!
//! Run with `cargo bench -p stackroute-controller --bench fanout` (release profile). A plain
//! `harness = false` binary that spawns the real `stackroute-controller` (embedded store,
//! default debounce 100 ms and state-directory poll 200 ms) and prints measured figures with a
//! PASS/MISS line per target; it never fails on a missed target.
//!
//! 1. Fan-out: N lightweight agents (100, then 1,000), each a tokio task with its own gRPC
//!    connection over loopback TCP, watch their own node's snapshot and ack every revision.
//!    Each round rewrites the policy file; the latency of a round is the time from the write
//!    to the moment the last agent's ack returned. The poll interval and the debounce are part
//!    of it, as they would be in production.
//! 2. Memory and one label change at scale: 100,000 pods on 500 nodes and 10,000 rules (1,000
//!    StackRoutes of 10 rules) in the state directory, 20 and then 500 agents watching (every
//!    node); the controller's VmRSS and VmHWM after the first publish; then one pod gets a
//!    label nobody had (a new identity): change → last ack, the bytes each agent received for
//!    that revision, and the controller's memory again.
//!
//! 3. Kubernetes' envelope, with `FANOUT_ENVELOPE_NODES=5000`: 5,000 nodes of 30 pods, a Service
//!    per node in front of its pods (5,000 Services, 150,000 backends), 10,000
//!    rules, one lightweight agent per node (counts bytes and acks, holds nothing); three pods
//!    relabelled in turn, each to a new identity.
//!
//! Agents accept deltas and apply them as the real agent does (a delta that does not apply is
//! an error). Sizes can be overridden: `FANOUT_AGENTS=100,1000 FANOUT_ROUNDS=20
//! MEMORY_PODS=100000 MEMORY_AGENTS=20,500`; `FANOUT_CHUNK_BYTES` sets the controller's
//! `--snapshot-chunk-bytes`.

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use std::time::{Duration, Instant};
use testkit::free_port;

use stackroute_proto::client::Security;
use stackroute_proto::v1alpha1::distribution_client::DistributionClient;
use stackroute_proto::v1alpha1::{AckRequest, ApiVersion, WatchRequest};
use tokio::sync::watch;

const TARGET_P99_100: Duration = Duration::from_millis(500);
const TARGET_P99_1000: Duration = Duration::from_secs(2);
const TARGET_RSS_BYTES: u64 = 1 << 30;

/// Set while a scenario's controller is being stopped: its agents' errors are expected.
static STOPPING: AtomicBool = AtomicBool::new(false);

fn report_agent_error(node: &str, error: &anyhow::Error) {
    if !STOPPING.load(Ordering::SeqCst) {
        eprintln!("agent {node}: {error:#}");
    }
}

fn env_list(name: &str, default: &[usize]) -> Vec<usize> {
    std::env::var(name)
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
        .unwrap_or_else(|| default.to_vec())
}

struct Controller {
    child: Child,
    grpc: SocketAddr,
}

impl Controller {
    fn start(state: &Path) -> Self {
        let grpc = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let child = Command::new(env!("CARGO_BIN_EXE_stackroute-controller"))
            .arg("--state")
            .arg(state)
            // Distribution cost alone: TLS handshakes are not part of this figure.
            .arg("--insecure-plaintext")
            .args(["--grpc-addr", &grpc.to_string()])
            .args(["--metrics-addr", &http.to_string()])
            // FANOUT_CHUNK_BYTES: the size of the parts whole snapshots are sent in.
            .args(
                std::env::var("FANOUT_CHUNK_BYTES")
                    .map(|bytes| vec!["--snapshot-chunk-bytes".to_string(), bytes])
                    .unwrap_or_default(),
            )
            .env(
                "RUST_LOG",
                std::env::var("BENCH_CONTROLLER_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting stackroute-controller");
        let deadline = Instant::now() + Duration::from_secs(600);
        while TcpStream::connect(grpc).is_err() {
            assert!(Instant::now() < deadline, "the controller did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, grpc }
    }

    fn memory(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
                .map_or(0, |kb| kb * 1024)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn cluster_yaml(nodes: usize, pods_per_node: usize) -> String {
    let mut text = String::from("apiVersion: v1\nkind: List\nitems:\n");
    text.push_str("- {apiVersion: v1, kind: Namespace, metadata: {name: bench}}\n");
    node_items(&mut text, 0..nodes, pods_per_node, None);
    text
}

/// One Service per node (`svc-N`, ClusterIP in 10.96.0.0/16), its backends the node's pods
/// (`node_items`' addresses) through one EndpointSlice: Kubernetes' envelope has a Service per
/// 30 pods.
fn node_services(nodes: usize, pods_per_node: usize) -> String {
    let mut text = String::from("apiVersion: v1\nkind: List\nitems:\n");
    for n in 0..nodes {
        let _ = writeln!(
            text,
            "- {{apiVersion: v1, kind: Service, metadata: {{name: svc-{n}, namespace: bench}}, spec: {{clusterIP: 10.96.{}.{}, ports: [{{name: http, port: 80, targetPort: 8080, protocol: TCP}}]}}}}",
            n / 250,
            n % 250 + 1
        );
        let endpoints: Vec<String> = (0..pods_per_node)
            .map(|p| {
                format!(
                    "{{addresses: [10.{}.{}.{}], conditions: {{ready: true}}}}",
                    100 + n / 250,
                    n % 250,
                    p + 1
                )
            })
            .collect();
        let _ = writeln!(
            text,
            "- {{apiVersion: discovery.k8s.io/v1, kind: EndpointSlice, metadata: {{name: svc-{n}-x, namespace: bench, labels: {{kubernetes.io/service-name: svc-{n}}}}}, addressType: IPv4, ports: [{{name: http, port: 8080, protocol: TCP}}], endpoints: [{}]}}",
            endpoints.join(", ")
        );
    }
    text
}

/// List items for `nodes` and their pods (`app-N-P`, labelled `app: appP%10`); with `relabel`,
/// pod `app-0-0` also carries `bench-change: VALUE`.
fn node_items(
    text: &mut String,
    nodes: std::ops::Range<usize>,
    pods_per_node: usize,
    relabel: Option<&str>,
) {
    for n in nodes {
        let _ = writeln!(
            text,
            "- {{apiVersion: v1, kind: Node, metadata: {{name: node-{n}, labels: {{topology.kubernetes.io/zone: z{}}}}}, status: {{addresses: [{{type: InternalIP, address: 10.0.{}.{}}}]}}}}",
            n % 3,
            n / 250,
            n % 250 + 1
        );
        for p in 0..pods_per_node {
            let extra = match (n, p, relabel) {
                (0, 0, Some(value)) => format!(", bench-change: '{value}'"),
                _ => String::new(),
            };
            let _ = writeln!(
                text,
                "- {{apiVersion: v1, kind: Pod, metadata: {{name: app-{n}-{p}, namespace: bench, labels: {{app: app{}{extra}}}}}, spec: {{nodeName: node-{n}, containers: []}}, status: {{podIP: 10.{}.{}.{}}}}}",
                p % 10,
                100 + n / 250,
                n % 250,
                p + 1
            );
        }
    }
}

/// 1,000 StackRoutes of 10 rules (10,000 rules), each selecting pods of one of ten apps and
/// naming another app's pods as peers.
fn many_policies() -> String {
    let mut policies = String::new();
    for p in 0..1000 {
        let _ = write!(
            policies,
            "---\napiVersion: stackroute.dev/v1alpha1\nkind: StackRoute\nmetadata: {{name: r{p}, namespace: bench}}\nspec:\n  priority: {}\n  podSelector: {{matchLabels: {{app: app{}}}}}\n  rules:\n",
            p % 1000,
            p % 10
        );
        for r in 0..10 {
            let _ = write!(
                policies,
                "  - name: r{r}\n    to: [{{pods: {{podSelector: {{matchLabels: {{app: app{}}}}}}}}}]\n    ports: [{{port: {}}}]\n    transport: {{stack: Userspace, congestionControl: BBR}}\n",
                (p + r) % 10,
                1000 + p * 10 + r
            );
        }
    }
    policies
}

fn policy_yaml(congestion_control: &str) -> String {
    format!(
        "apiVersion: stackroute.dev/v1alpha1\nkind: StackRoute\nmetadata: {{name: bench, namespace: bench}}\nspec:\n  podSelector: {{}}\n  rules:\n  - name: all\n    transport: {{stack: Kernel, congestionControl: {congestion_control}}}\n"
    )
}

/// One agent: watches its node, applies deltas, validates and acks every revision, publishes
/// the highest acked revision and adds the encoded size of every update to `received`.
async fn agent(
    grpc: SocketAddr,
    node: String,
    acked: watch::Sender<u64>,
    received: Arc<AtomicU64>,
    holds: bool,
) -> anyhow::Result<()> {
    // The real agent's endpoint (its HTTP/2 windows bound what the controller buffers).
    let (endpoint, _) =
        stackroute_proto::client::endpoint(&grpc.to_string(), &Security::Plaintext)?;
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("connect (raise `ulimit -n` for many agents): {e}"))?;
    let mut client = DistributionClient::new(channel)
        .max_decoding_message_size(stackroute_proto::MAX_UPDATE_BYTES);
    let mut stream = client
        .watch_snapshots(WatchRequest {
            node: node.clone(),
            agent_id: format!("bench-{node}"),
            known_revision: 0,
            api_version: ApiVersion::V1alpha1 as i32,
            accepts_delta: true,
            accepts_chunks: true,
            accepts_listener_deltas: true,
        })
        .await?
        .into_inner();
    let mut held: Vec<u8> = Vec::new();
    let mut parts: Vec<u8> = Vec::new();
    while let Some(update) = stream.message().await? {
        received.fetch_add(
            prost::Message::encoded_len(&update) as u64,
            Ordering::Relaxed,
        );
        if !holds {
            // Lightweight: acks each complete revision without keeping or checking it.
            let last_part = update.snapshot_len == 0
                || update.snapshot_offset + update.snapshot.len() as u64 >= update.snapshot_len;
            if !last_part {
                continue;
            }
        } else {
            held = if update.snapshot_len > 0 {
                // A whole snapshot in parts, in order (the agent checks more).
                if update.snapshot_offset == 0 {
                    parts.clear();
                }
                parts.extend_from_slice(&update.snapshot);
                if (parts.len() as u64) < update.snapshot_len {
                    continue;
                }
                std::mem::take(&mut parts)
            } else if update.delta.is_empty() {
                update.snapshot
            } else {
                stackroute_snapshot::delta::apply(&held, &update.delta)
                    .map_err(|e| anyhow::anyhow!("delta does not apply: {e}"))?
            };
            // A real agent validates before it acks.
            stackroute_snapshot::Snapshot::parse(&held)
                .map_err(|e| anyhow::anyhow!("bad snapshot: {e:?}"))?;
        }
        client
            .ack(AckRequest {
                node: node.clone(),
                agent_id: format!("bench-{node}"),
                revision: update.revision,
                error: String::new(),
            })
            .await?;
        acked.send_replace(update.revision);
    }
    Ok(())
}

/// Starts `count` agents for nodes `node-0` … : their acked revisions and received bytes.
/// Agents that `hold` apply, keep and validate every snapshot as the real agent does; the others
/// only count bytes and ack (5,000 held snapshots would not fit this machine).
fn spawn_agents(
    grpc: SocketAddr,
    count: usize,
    hold: bool,
) -> (Vec<watch::Receiver<u64>>, Vec<Arc<AtomicU64>>) {
    let mut acks = Vec::with_capacity(count);
    let mut received = Vec::with_capacity(count);
    for n in 0..count {
        let (tx, rx) = watch::channel(0u64);
        let bytes = Arc::new(AtomicU64::new(0));
        acks.push(rx);
        received.push(bytes.clone());
        tokio::spawn(async move {
            let node = format!("node-{n}");
            if let Err(error) = agent(grpc, node.clone(), tx, bytes, hold).await {
                report_agent_error(&node, &error);
            }
        });
    }
    (acks, received)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

async fn fanout(agents: usize, rounds: usize) {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("cluster.yaml"), cluster_yaml(agents, 2)).expect("write");
    std::fs::write(dir.path().join("policy.yaml"), policy_yaml("BBR")).expect("write");
    let controller = Controller::start(dir.path());
    let (acks, _) = spawn_agents(controller.grpc, agents, true);
    let acks = Arc::new(acks);
    let all_acked_above = |floor: u64| {
        let acks = acks.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            for rx in acks.iter() {
                let mut rx = rx.clone();
                let remaining = deadline.saturating_duration_since(Instant::now());
                tokio::time::timeout(remaining, rx.wait_for(|r| *r > floor))
                    .await
                    .expect("every agent acks within 60 s")
                    .expect("agent alive");
            }
            acks.iter().map(|rx| *rx.borrow()).max().unwrap_or(0)
        }
    };
    let mut current = all_acked_above(0).await;
    let mut latencies = Vec::with_capacity(rounds);
    for round in 0..rounds {
        // Let the poller see a new mtime tick, then change the policy at a varying phase of
        // the 200 ms poll period.
        let jitter = (round as u64 * 73) % 200;
        tokio::time::sleep(Duration::from_millis(300 + jitter)).await;
        let cc = ["Cubic", "BBR", "Reno"][round % 3];
        let started = Instant::now();
        std::fs::write(dir.path().join("policy.yaml"), policy_yaml(cc)).expect("write");
        current = all_acked_above(current).await;
        latencies.push(started.elapsed());
    }
    latencies.sort();
    let p50 = percentile(&latencies, 0.5);
    let p99 = percentile(&latencies, 0.99);
    let target = if agents <= 100 {
        TARGET_P99_100
    } else {
        TARGET_P99_1000
    };
    let (rss, hwm) = controller.memory();
    println!(
        "fanout {agents:>5} agents, {rounds} rounds: change→last ack p50 {:>4} ms, p99 {:>4} ms, max {:>4} ms (target p99 < {} ms: {}); controller RSS {} MiB (peak {} MiB)",
        p50.as_millis(),
        p99.as_millis(),
        latencies.last().copied().unwrap_or_default().as_millis(),
        target.as_millis(),
        if p99 < target { "PASS" } else { "MISS" },
        rss >> 20,
        hwm >> 20,
    );
    stop(controller).await;
}

/// Stops a scenario's controller; its agents' connection errors are expected then.
async fn stop(controller: Controller) {
    STOPPING.store(true, Ordering::SeqCst);
    drop(controller);
    tokio::time::sleep(Duration::from_millis(500)).await;
    STOPPING.store(false, Ordering::SeqCst);
}

async fn memory(pods: usize, watchers: usize) {
    let nodes = 500;
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        dir.path().join("cluster.yaml"),
        cluster_yaml(nodes, pods / nodes),
    )
    .expect("write");
    std::fs::write(dir.path().join("policies.yaml"), many_policies()).expect("write");
    let (controller, mut acks, received, elapsed) = start_watched(dir.path(), watchers, true).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (rss, hwm) = controller.memory();
    println!(
        "memory {pods} pods / 500 nodes / 10000 rules, {watchers} agents: first ack after {:.1} s (YAML load + compile); controller RSS {} MiB, peak {} MiB (target < 1024 MiB: {}); first update per agent {} bytes",
        elapsed.as_secs_f64(),
        rss >> 20,
        hwm >> 20,
        if hwm < TARGET_RSS_BYTES {
            "PASS"
        } else {
            "MISS"
        },
        received[0].load(Ordering::Relaxed),
    );
    // One pod gets a label nobody had: a new identity.
    let mut relabelled = String::from("apiVersion: v1\nkind: List\nitems:\n");
    relabelled.push_str("- {apiVersion: v1, kind: Namespace, metadata: {name: bench}}\n");
    node_items(&mut relabelled, 0..nodes, pods / nodes, Some("1"));
    let (last_ack, bytes) = until_every_ack(&mut acks, &received, || {
        std::fs::write(dir.path().join("cluster.yaml"), relabelled).expect("write");
    })
    .await;
    let (rss, hwm) = controller.memory();
    println!(
        "  one pod relabelled (new identity), {watchers} agents: change → last ack {} ms; bytes received per agent median {}, max {}; controller RSS {} MiB, peak {} MiB",
        last_ack.as_millis(),
        bytes[bytes.len() / 2],
        bytes.last().copied().unwrap_or(0),
        rss >> 20,
        hwm >> 20,
    );
    stop(controller).await;
}

/// Starts the controller on `state` and `count` agents (see [`spawn_agents`]), and waits for
/// every agent's first ack: how long that took from the start.
async fn start_watched(
    state: &Path,
    count: usize,
    hold: bool,
) -> (
    Controller,
    Vec<watch::Receiver<u64>>,
    Vec<Arc<AtomicU64>>,
    Duration,
) {
    let started = Instant::now();
    let controller = Controller::start(state);
    let (mut acks, received) = spawn_agents(controller.grpc, count, hold);
    for rx in &mut acks {
        tokio::time::timeout(Duration::from_secs(1800), rx.wait_for(|r| *r > 0))
            .await
            .expect("first snapshot within 30 min")
            .expect("agent alive");
    }
    (controller, acks, received, started.elapsed())
}

/// Makes `change` and waits until every agent has acked a later revision: how long that took,
/// and the bytes each agent received meanwhile, ascending.
async fn until_every_ack(
    acks: &mut [watch::Receiver<u64>],
    received: &[Arc<AtomicU64>],
    change: impl FnOnce(),
) -> (Duration, Vec<u64>) {
    let floor: Vec<u64> = acks.iter().map(|rx| *rx.borrow()).collect();
    let before: Vec<u64> = received.iter().map(|b| b.load(Ordering::Relaxed)).collect();
    tokio::time::sleep(Duration::from_millis(500)).await; // a new mtime tick for the poller
    let changed = Instant::now();
    change();
    for (rx, floor) in acks.iter_mut().zip(&floor) {
        tokio::time::timeout(Duration::from_secs(300), rx.wait_for(|r| r > floor))
            .await
            .expect("every agent acks the change within 5 min")
            .expect("agent alive");
    }
    let elapsed = changed.elapsed();
    let mut bytes: Vec<u64> = received
        .iter()
        .zip(&before)
        .map(|(b, before)| b.load(Ordering::Relaxed) - before)
        .collect();
    bytes.sort_unstable();
    (elapsed, bytes)
}

/// Kubernetes' envelope: `nodes` nodes of 30 pods (150,000 at 5,000), 10,000 rules, one
/// lightweight agent per node. The cluster is split into files of 100 nodes, so a relabel
/// re-reads 3,000 pods, as a watch event would carry one. Three relabels to a new identity:
/// change → last ack and bytes per agent, and the controller's memory.
async fn envelope(nodes: usize) {
    let dir = tempfile::tempdir().expect("temp dir");
    let write_group = |group: usize, relabel: Option<&str>| {
        let mut text = String::from("apiVersion: v1\nkind: List\nitems:\n");
        node_items(
            &mut text,
            group * 100..((group + 1) * 100).min(nodes),
            30,
            relabel,
        );
        let path = dir.path().join(format!("cluster-{group:03}.yaml"));
        std::fs::write(dir.path().join(".tmp"), text).expect("write");
        std::fs::rename(dir.path().join(".tmp"), path).expect("rename");
    };
    std::fs::write(
        dir.path().join("namespace.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: bench}\n",
    )
    .expect("write");
    for group in 0..nodes.div_ceil(100) {
        write_group(group, None);
    }
    std::fs::write(dir.path().join("policies.yaml"), many_policies()).expect("write");
    std::fs::write(dir.path().join("services.yaml"), node_services(nodes, 30)).expect("write");
    let (controller, mut acks, received, elapsed) = start_watched(dir.path(), nodes, false).await;
    let (rss, hwm) = controller.memory();
    println!(
        "envelope {nodes} nodes / {} pods / 10000 rules / {nodes} Services, {nodes} lightweight agents: every first ack after {:.1} s; whole snapshot {} bytes; controller RSS {} MiB, peak {} MiB",
        nodes * 30,
        elapsed.as_secs_f64(),
        received[0].load(Ordering::Relaxed),
        rss >> 20,
        hwm >> 20,
    );
    for round in 0..3 {
        let (last_ack, bytes) = until_every_ack(&mut acks, &received, || {
            write_group(0, Some(&round.to_string()));
        })
        .await;
        let (rss, hwm) = controller.memory();
        println!(
            "  relabel {}: change → last ack {} ms (target ≤ 2000 ms: {}); bytes per agent median {} (target ≤ 65536: {}), max {}; controller RSS {} MiB, peak {} MiB",
            round + 1,
            last_ack.as_millis(),
            if last_ack <= Duration::from_secs(2) {
                "PASS"
            } else {
                "MISS"
            },
            bytes[bytes.len() / 2],
            if bytes[bytes.len() / 2] <= 65536 {
                "PASS"
            } else {
                "MISS"
            },
            bytes.last().copied().unwrap_or(0),
            rss >> 20,
            hwm >> 20,
        );
    }
    stop(controller).await;
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes `--bench`; nothing else is accepted.
    let rounds = env_list("FANOUT_ROUNDS", &[20])[0];
    for agents in env_list("FANOUT_AGENTS", &[100, 1000]) {
        fanout(agents, rounds).await;
    }
    for pods in env_list("MEMORY_PODS", &[100_000]) {
        for watchers in env_list("MEMORY_AGENTS", &[20, 500]) {
            memory(pods, watchers).await;
        }
    }
    // Not by default: minutes and most of this machine.
    for nodes in env_list("FANOUT_ENVELOPE_NODES", &[]) {
        envelope(nodes).await;
    }
}
