//! What the integration tests of the controller, the agent, the shim and the e2e suites share:
//! free ports, polling, a plain HTTP GET for `/metrics` and probes, and the workspace's
//! binaries and libraries built into the test's own target directory.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// A TCP port free on every address, for a child process to bind a moment later.
///
/// Taken below the kernel's ephemeral range (`ip_local_port_range`): a port from `bind(:0)`
/// is one that any connection's source port or another trial's `bind(:0)` can take before
/// the child binds it (CI saw a controller's bind fail with EADDRINUSE that way). Below the
/// range only an explicit bind competes: a per-process counter keeps this process's trials
/// apart and a start derived from the PID spreads concurrent test binaries.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOWEST: u32 = 10_000;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    if ephemeral_low <= LOWEST + 1_000 {
        return TcpListener::bind("0.0.0.0:0")
            .and_then(|l| l.local_addr())
            .expect("a free TCP port")
            .port();
    }
    let span = ephemeral_low - LOWEST;
    let start = std::process::id().wrapping_mul(7919) % span;
    for _ in 0..span {
        let offset = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (LOWEST + (start + offset) % span) as u16;
        if bindable(port) {
            return port;
        }
    }
    panic!("no free TCP port in {LOWEST}..{ephemeral_low}");
}

/// Whether `port` can be bound on every IPv4 address and then on every IPv6 one (tried one
/// after the other: a dual-stack `::` bind collides with a held `0.0.0.0` one). A host without
/// IPv6 has no `::` to collide on.
fn bindable(port: u16) -> bool {
    let ipv4 = TcpListener::bind(("0.0.0.0", port)).is_ok();
    ipv4 && match TcpListener::bind(("::", port)) {
        Ok(_) => true,
        Err(e) => e.kind() != std::io::ErrorKind::AddrInUse,
    }
}

/// Polls `check` every `every` until it returns `Some`; after `timeout` an error naming
/// `what`.
pub fn poll<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> Result<T, String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            return Err(format!("timed out after {timeout:?} waiting for {what}"));
        }
        std::thread::sleep(every);
    }
}

/// [`poll`] every 25 ms, panicking on the timeout.
#[track_caller]
pub fn wait_for<T>(what: &str, timeout: Duration, check: impl FnMut() -> Option<T>) -> T {
    poll(what, timeout, Duration::from_millis(25), check).unwrap_or_else(|error| panic!("{error}"))
}

/// [`wait_for`] with an async check (on the caller's tokio runtime).
pub async fn wait_for_async<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A plain HTTP/1.0 GET: (status code, body), or `None` if nothing answers.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let code = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())?;
    Some((code, body))
}

/// `target/<profile>` of the running test executable (`target/<profile>/deps/<test>`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps")
        .to_path_buf()
}

/// A binary of the workspace in the test's target directory (`cargo test --workspace` builds
/// them; a test of one package names what to build in the message).
pub fn bin(name: &str) -> PathBuf {
    let path = profile_dir().join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build -p stackroute-controller -p stackroute-lrd -p stackroute-cli` (or `cargo test --workspace`)",
        path.display()
    );
    path
}

/// A shared library of a workspace package, built (once per test process) into the same
/// target directory and profile as the test: `cargo test` builds a package's `rlib` for its
/// tests but never its `cdylib`, so a fresh `cargo test --workspace` would lack it, and a kept
/// target directory would hold a stale one (a CI run tested an old `libnsocket.so` against a
/// new test). Cargo's own freshness check makes the build a no-op when nothing changed.
pub fn library(package: &str, file: &str) -> PathBuf {
    static BUILT: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let profile_dir = profile_dir();
    let path = profile_dir.join(file);
    let mut built = BUILT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if !built.iter().any(|p| p == package) {
        let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => "dev",
            Some(other) => other,
        };
        let target_dir = profile_dir.parent().expect("target directory");
        let status = Command::new(env!("CARGO"))
            .args(["build", "--lib", "-p", package, "--profile", profile])
            .arg("--target-dir")
            .arg(target_dir)
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
            .status()
            .expect("run cargo build");
        assert!(status.success(), "cargo build -p {package} failed");
        built.push(package.to_owned());
    }
    assert!(
        path.is_file(),
        "{} is missing after building",
        path.display()
    );
    path
}

/// The control-plane tests' policy: web pods → anything over `stack` with `congestion_control`
/// (StackRoute `shop/web`, rule `all`), and a second StackRoute (`shop/web-rdma`, evaluated
/// after) that lets web pods pick RDMA to trainer pods. There are none, so no decision changes;
/// it makes RDMA possible on the web pods' nodes, and only such nodes get the cluster's listener
/// registrations.
pub fn web_policy(stack: &str, congestion_control: &str) -> String {
    format!(
        r#"# the web policy
apiVersion: stackroute.dev/v1alpha1
kind: StackRoute
metadata: {{name: web, namespace: shop}}
spec:
  podSelector: {{matchLabels: {{app: web}}}}
  rules:
  - name: all
    transport: {{stack: {stack}, congestionControl: {congestion_control}}}
---
apiVersion: stackroute.dev/v1alpha1
kind: StackRoute
metadata: {{name: web-rdma, namespace: shop}}
spec:
  priority: 900
  podSelector: {{matchLabels: {{app: web}}}}
  rules:
  - name: trainers
    to: [{{pods: {{podSelector: {{matchLabels: {{app: trainer}}}}}}}}]
    transport: {{stack: RDMA, fallback: [{{stack: Kernel, congestionControl: BBR}}]}}
"#
    )
}
