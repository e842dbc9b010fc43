//! Real processes for the agent's integration tests: the controller, agents and the CLI, each
//! killed by PID when its guard drops; every wait has a timeout.
//!
//! The binaries come from the same target directory as the test: `cargo test --workspace`
//! builds them; with `-p stackroute-lrd`, run `cargo build -p stackroute-controller -p
//! stackroute-cli` first.
#![allow(dead_code, unreachable_pub)]

pub mod netns;

use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use stackroute_local_api::frame;
use stackroute_local_api::message::{Request, Response};
use stackroute_local_api::published;

pub const WAIT: Duration = Duration::from_secs(15);

/// Three nodes with one web pod each, and a db pod on n2.
pub const CLUSTER: &str = r#"apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Node, metadata: {name: n1, labels: {topology.kubernetes.io/zone: z1}}, status: {addresses: [{type: InternalIP, address: 10.0.0.1}]}}
- {apiVersion: v1, kind: Node, metadata: {name: n2, labels: {topology.kubernetes.io/zone: z1}}, status: {addresses: [{type: InternalIP, address: 10.0.0.2}]}}
- {apiVersion: v1, kind: Node, metadata: {name: n3, labels: {topology.kubernetes.io/zone: z2}}, status: {addresses: [{type: InternalIP, address: 10.0.0.3}]}}
- {apiVersion: v1, kind: Namespace, metadata: {name: shop}}
- {apiVersion: v1, kind: Pod, metadata: {name: web-1, namespace: shop, labels: {app: web}}, spec: {nodeName: n1, containers: []}, status: {podIP: 10.1.0.11}}
- {apiVersion: v1, kind: Pod, metadata: {name: web-2, namespace: shop, labels: {app: web}}, spec: {nodeName: n2, containers: []}, status: {podIP: 10.1.0.12}}
- {apiVersion: v1, kind: Pod, metadata: {name: web-3, namespace: shop, labels: {app: web}}, spec: {nodeName: n3, containers: []}, status: {podIP: 10.1.0.13}}
- {apiVersion: v1, kind: Pod, metadata: {name: db-0, namespace: shop, labels: {app: db}}, spec: {nodeName: n2, containers: []}, status: {podIP: 10.1.0.20}}
"#;

/// Writes the cluster and a web policy (`stack`, `cc`) into a controller state directory; the
/// policy is written then renamed, so the controller never reads half a file.
pub fn write_state(dir: &Path, stack: &str, cc: &str) {
    std::fs::write(dir.join("cluster.yaml"), CLUSTER).unwrap();
    std::fs::write(dir.join(".policy.tmp"), policy(stack, cc)).unwrap();
    std::fs::rename(dir.join(".policy.tmp"), dir.join("policy.yaml")).unwrap();
}

/// `ROOT/state`, created and holding the cluster and a web policy (`stack`, `cc`).
/// A controller and one agent (`n1`) on a Kernel/BBR policy, returned once the agent has
/// published a fresh snapshot.
pub fn controller_and_agent(root: &Path) -> (Controller, Agent) {
    let state = new_state_dir(root, "Kernel", "BBR");
    let controller = Controller::start(&state, root, free_port());
    let agent = Agent::start("n1", &format!("http://{}", controller.grpc), root);
    wait_for("a fresh snapshot", WAIT, || {
        agent.published().filter(|p| !p.2)
    });
    (controller, agent)
}

/// A hand-over protocol frame: the JSON's length (little-endian u32), then the JSON.
pub fn handover_frame(json: &str) -> Vec<u8> {
    let mut bytes = (json.len() as u32).to_le_bytes().to_vec();
    bytes.extend_from_slice(json.as_bytes());
    bytes
}

pub fn new_state_dir(root: &Path, stack: &str, cc: &str) -> PathBuf {
    let state = root.join("state");
    std::fs::create_dir(&state).unwrap();
    write_state(&state, stack, cc);
    state
}

/// The lookup of `shop/WORKLOAD` → db-0 (10.1.0.20:5432, TCP).
pub fn lookup_db(workload: &str) -> Request {
    Request::Lookup {
        namespace: "shop".into(),
        workload: workload.into(),
        ip: "10.1.0.20".parse().unwrap(),
        port: 5432,
        protocol: stackroute_local_api::message::Protocol::Tcp,
    }
}

/// Web → anything (see [`testkit::web_policy`]).
pub fn policy(stack: &str, congestion_control: &str) -> String {
    testkit::web_policy(stack, congestion_control)
}

/// A binary built into the same target directory as this test.
// Each test binary uses some of these (the shim tests `library`).
#[allow(unused_imports)]
pub use testkit::{bin, free_port, http_get, library, wait_for};

/// This test process's CA and credentials (controller serving certificate, per-node and admin
/// client certificates), made by `stackroute-controller credentials`.
pub fn pki() -> &'static testkit::pki::Pki {
    static PKI: std::sync::OnceLock<testkit::pki::Pki> = std::sync::OnceLock::new();
    PKI.get_or_init(|| {
        testkit::pki::Pki::for_process(
            &bin("stackroute-controller"),
            Path::new(env!("CARGO_TARGET_TMPDIR")),
        )
    })
}

/// A child process killed by PID when dropped.
pub struct Proc {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    fn spawn(mut command: Command, log: PathBuf) -> Self {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {command:?}: {e}"));
        Self {
            child: Some(child),
            log,
        }
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether the process still runs.
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends `signal` (a `kill` name: TERM, STOP, CONT, …) to the process, by PID.
    pub fn signal(&self, signal: &str) {
        let pid = self.pid().expect("a running process");
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {pid}");
    }

    /// Waits up to `timeout` for the process to exit; its status, if it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut()?;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The controller on a fixed gRPC port (so it can come back on the same address).
pub struct Controller {
    pub proc: Proc,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    state: PathBuf,
}

impl Controller {
    pub fn start(state: &Path, logs: &Path, grpc_port: u16) -> Self {
        Self::start_with(state, logs, grpc_port, &[])
    }

    /// Like [`Controller::start`], with extra flags.
    pub fn start_with(state: &Path, logs: &Path, grpc_port: u16, extra_args: &[&str]) -> Self {
        let grpc = SocketAddr::from(([127, 0, 0, 1], grpc_port));
        let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut command = Command::new(bin("stackroute-controller"));
        command
            .arg("--state")
            .arg(state)
            .args([
                "--grpc-addr",
                &grpc.to_string(),
                "--metrics-addr",
                &http.to_string(),
            ])
            .args(["--debounce-ms", "30", "--poll-ms", "50"])
            .arg("--grpc-tls-dir")
            .arg(pki().server())
            .args(extra_args)
            .env("RUST_LOG", "info");
        let proc = Proc::spawn(command, logs.join(format!("controller-{grpc_port}.log")));
        let mut controller = Self {
            proc,
            grpc,
            http,
            state: state.to_path_buf(),
        };
        wait_for("the controller to be ready", WAIT, || {
            assert!(
                controller.proc.alive(),
                "controller exited:\n{}",
                controller.proc.log_text()
            );
            http_get(http, "/readyz").filter(|(code, _)| *code == 200)
        });
        controller
    }
}

/// A node agent with its own socket and state directories.
pub struct Agent {
    pub proc: Proc,
    pub node: String,
    pub socket_dir: PathBuf,
    pub state_dir: PathBuf,
    pub http: SocketAddr,
    controller: String,
    logs: PathBuf,
    extra_args: Vec<String>,
    /// A program (and its arguments) that runs the agent, e.g. `setpriv` dropping a capability.
    wrapper: Vec<String>,
}

impl Agent {
    pub fn start(node: &str, controller: &str, root: &Path) -> Self {
        Self::start_with(node, controller, root, &[])
    }

    /// Like [`Agent::start`], with extra flags.
    pub fn start_with(node: &str, controller: &str, root: &Path, extra_args: &[&str]) -> Self {
        let _ = std::fs::remove_file(
            root.join(format!("{node}-run"))
                .join(published::SOCKET_FILE),
        );
        Self::start_in_place(node, controller, root, extra_args)
    }

    /// Like [`Agent::start_with`], leaving whatever is in the socket directory for the agent
    /// to deal with.
    pub fn start_in_place(node: &str, controller: &str, root: &Path, extra_args: &[&str]) -> Self {
        Self::start_wrapped(node, controller, root, &[], extra_args)
    }

    /// Like [`Agent::start_in_place`], the agent run by `wrapper` (program and arguments).
    pub fn start_wrapped(
        node: &str,
        controller: &str,
        root: &Path,
        wrapper: &[&str],
        extra_args: &[&str],
    ) -> Self {
        let socket_dir = root.join(format!("{node}-run"));
        let state_dir = root.join(format!("{node}-state"));
        let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut agent = Self {
            proc: Proc {
                child: None,
                log: root.join(format!("agent-{node}.log")),
            },
            node: node.into(),
            socket_dir,
            state_dir,
            http,
            controller: controller.into(),
            logs: root.to_path_buf(),
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
            wrapper: wrapper.iter().map(|a| a.to_string()).collect(),
        };
        agent.spawn();
        agent
    }

    /// A second agent on this one's socket and state directories (its own metrics port and
    /// log `agent-LABEL.log`), started while this one runs; returns once it serves /healthz.
    pub fn successor(&self, label: &str, extra_args: &[&str]) -> Self {
        let mut agent = Self {
            proc: Proc {
                child: None,
                log: self.logs.join(format!("agent-{label}.log")),
            },
            node: self.node.clone(),
            socket_dir: self.socket_dir.clone(),
            state_dir: self.state_dir.clone(),
            http: SocketAddr::from(([127, 0, 0, 1], free_port())),
            controller: self.controller.clone(),
            logs: self.logs.clone(),
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
            wrapper: self.wrapper.clone(),
        };
        agent.spawn();
        agent
    }

    fn spawn(&mut self) {
        let mut command = match &self.wrapper[..] {
            [] => Command::new(bin("stackroute-lrd")),
            [program, args @ ..] => {
                let mut command = Command::new(program);
                command.args(args).arg(bin("stackroute-lrd"));
                command
            }
        };
        command
            .args(["--controller", &self.controller, "--node", &self.node])
            .arg("--credentials")
            .arg(pki().node(&self.node))
            .arg("--socket-dir")
            .arg(&self.socket_dir)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .args(["--metrics-addr", &self.http.to_string()])
            .args(&self.extra_args)
            .env("STACKROUTE_LOG", "info,stackroute_lrd=debug");
        self.proc = Proc::spawn(command, self.proc.log.clone());
        let socket = self.socket_dir.join(published::SOCKET_FILE);
        wait_for("the agent socket", WAIT, || {
            assert!(self.proc.alive(), "agent exited:\n{}", self.proc.log_text());
            UnixStream::connect(&socket).ok()?;
            http_get(self.http, "/healthz").filter(|(code, _)| *code == 200)
        });
    }

    /// Kills the agent and starts it again with the same directories.
    pub fn restart(&mut self) {
        self.proc.kill();
        let _ = std::fs::remove_file(self.socket_dir.join(published::SOCKET_FILE));
        self.spawn();
    }

    /// The published snapshot: (generation, revision, stale, snapshot bytes as the controller
    /// sent them — the file's without the Service verdicts the agent adds).
    pub fn published(&self) -> Option<(u64, u64, bool, Vec<u8>)> {
        let bytes = std::fs::read(self.socket_dir.join(published::SNAPSHOT_FILE)).ok()?;
        let view = published::parse(&bytes).expect("the published file always parses");
        let snapshot = stackroute_snapshot::Snapshot::parse(view.snapshot)
            .expect("the published snapshot always validates");
        Some((
            view.generation,
            view.revision,
            view.stale,
            snapshot.without_service_verdicts(),
        ))
    }

    /// The generation counter file.
    pub fn generation(&self) -> u64 {
        let bytes = std::fs::read(self.socket_dir.join(published::GENERATION_FILE)).unwrap();
        published::parse_generation(&bytes).expect("a generation file")
    }

    /// One request on a new connection.
    pub fn call(&self, request: &Request) -> Response {
        let mut stream = connect(&self.socket_dir);
        frame::call(&mut stream, request).expect("a reply from the agent")
    }

    pub fn metrics(&self) -> String {
        http_get(self.http, "/metrics").expect("metrics").1
    }
}

pub fn connect(socket_dir: &Path) -> UnixStream {
    let stream = UnixStream::connect(socket_dir.join(published::SOCKET_FILE)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream
}

/// Runs `command` to completion, killing it if it takes longer than `WAIT`.
pub fn output_within(mut command: Command) -> Output {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("starting {command:?}: {e}"));
    let deadline = Instant::now() + WAIT;
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{command:?} timed out");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs the `stackroute` CLI with a timeout.
pub fn cli(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(bin("stackroute"));
    command.args(args);
    // `stackroute status` authenticates as an administrator.
    command.env("STACKROUTE_CREDENTIALS", pki().admin());
    for (key, value) in env {
        command.env(key, value);
    }
    output_within(command)
}

/// `stackroute status --controller URL --output json`, which must succeed.
pub fn status_json(url: &str) -> Value {
    let output = cli(&["status", "--controller", url, "--output", "json"], &[]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("status --output json")
}

/// `stackroute explain --agent DIR --from FROM --to TO --output json`, if it succeeds.
pub fn explain_agent(socket_dir: &Path, from: &str, to: &str) -> Option<Value> {
    let dir = socket_dir.to_str().expect("utf-8 path");
    let output = cli(
        &[
            "explain", "--agent", dir, "--from", from, "--to", to, "--output", "json",
        ],
        &[],
    );
    output
        .status
        .success()
        .then(|| serde_json::from_slice(&output.stdout).expect("JSON"))
}

/// "Stack/CC" of an explanation.
pub fn transport(explanation: &Value) -> String {
    format!(
        "{}/{}",
        explanation["transport"]["stack"].as_str().unwrap_or("?"),
        explanation["transport"]["congestionControl"]
            .as_str()
            .unwrap_or("?")
    )
}

// === hand-over helpers ===

/// The node's hand-over secret as a request carries it: `STATE_DIR/handover.key` in hex.
pub fn handover_secret(state_dir: &Path) -> String {
    let key = std::fs::read(state_dir.join("handover.key")).expect("the node's hand-over key");
    assert_eq!(key.len(), 32, "a hand-over key of 32 bytes");
    key.iter().map(|b| format!("{b:02x}")).collect()
}

/// A hand-over request for `node` as a real successor sends it: the current protocol version
/// and the node's secret from `state_dir`.
pub fn handover_request_json(node: &str, state_dir: &Path) -> String {
    format!(
        r#"{{"kind":"request","version":2,"node":"{node}","secret":"{}"}}"#,
        handover_secret(state_dir)
    )
}
