//! Socket semantics of relayed connections (the user-space stack behind the shim), against
//! Linux kernel TCP as the oracle.
//!
//! Every trial builds its own lab: two network namespaces joined by a veth (client
//! `10.77.0.1/24`, server `10.77.0.2/24`, named after this process's pid), a standalone
//! controller and agent in the host's namespace (the agent's socket directory is reached by
//! path from inside the client namespace; the agent starts `stackroute-stackd` in the client
//! namespace at the first `Userspace` connection). The policy sends the server's address to
//! `{stack: Userspace, congestionControl: BBR, fallback: [{stack: Kernel}]}`, and ports
//! 7000-7099 to the kernel.
//!
//! A probe (`tests/probes/relay.c`, compiled here with `cc`, or a Python script) prints what it
//! observed; it runs twice against a fresh kernel server (`tests/probes/server.py`) in the
//! server namespace: without the shim (the oracle: kernel TCP) and under `stackroute run` (the
//! relay). Both sides' observations must be equal, the relayed run must really have been
//! relayed (the server saw a client port in the instance's range 61000-62999, the shim logged
//! `transport=Userspace/BBR`), and the client namespace's kernel must send no RST during it
//! (`/proc/net/snmp` `Tcp: OutRsts`).
//!
//! Needs root, `ip`, `iptables`, `ethtool`, `cc`, `python3` and the binaries (`cargo build -p
//! stackroute-controller -p stackroute-lrd -p stackroute-cli -p nsocket-shim -p
//! stackroute-stackd`, same target directory); otherwise the trials show as ignored with the
//! reason, and fail under `STACKROUTE_REQUIRE_NETNS=1`.

#[path = "../../lrd-agent/tests/common/mod.rs"]
mod common;

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::{Agent, Controller, explain_agent, free_port, transport, wait_for};
use testkit::{Ignored, Trial};

const REQUIRE: &str = "STACKROUTE_REQUIRE_NETNS";
const CLIENT_IP: &str = "10.77.0.1";
const SERVER_IP: &str = "10.77.0.2";
const CLIENT_IP6: &str = "fd77::1";
const SERVER_IP6: &str = "fd77::2";
/// The instance's ports (the agent's default `--userspace-ports`).
const RESERVED: std::ops::RangeInclusive<u16> = 61000..=62999;
/// A server port the policy sends to the user-space stack, and one it sends to the kernel.
const US_PORT: u16 = 8000;
const KERNEL_PORT: u16 = 7000;
const PROBE_TIMEOUT: Duration = Duration::from_secs(40);

const CLUSTER: &str = r#"apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Node, metadata: {name: n1, labels: {topology.kubernetes.io/zone: z1}}, status: {addresses: [{type: InternalIP, address: 10.0.0.1}]}}
- {apiVersion: v1, kind: Namespace, metadata: {name: lab}}
- {apiVersion: v1, kind: Pod, metadata: {name: client, namespace: lab, labels: {app: client}}, spec: {nodeName: n1, containers: []}}
"#;

fn policy(userspace: bool) -> String {
    let transport = if userspace {
        "{stack: Userspace, congestionControl: BBR, fallback: [{stack: Kernel}]}"
    } else {
        "{stack: Kernel}"
    };
    format!(
        "apiVersion: stackroute.dev/v1alpha1
kind: StackRoute
metadata: {{name: lab, namespace: lab}}
spec:
  podSelector: {{matchLabels: {{app: client}}}}
  rules:
  - {{name: kernel, ports: [{{port: {KERNEL_PORT}, endPort: 7099}}], transport: {{stack: Kernel}}}}
  - {{name: server, to: [{{networks: [\"{SERVER_IP}/32\", \"{SERVER_IP6}/128\"]}}], transport: {transport}}}
"
    )
}

fn main() -> ExitCode {
    let trials: Vec<(&str, fn())> = vec![
        (
            "nonblocking_connect_is_writable_only_after_the_handshake",
            nonblocking_connect_is_writable_only_after_the_handshake,
        ),
        (
            "connect_to_a_closed_port_is_refused",
            connect_to_a_closed_port_is_refused,
        ),
        (
            "edge_triggered_epollout_after_eagain",
            edge_triggered_epollout_after_eagain,
        ),
        (
            "edge_triggered_epollin_and_rdhup",
            edge_triggered_epollin_and_rdhup,
        ),
        ("nested_epoll_poll_and_select", nested_epoll_poll_and_select),
        (
            "epoll_registration_before_connect_survives",
            epoll_registration_before_connect_survives,
        ),
        (
            "fork_exec_scm_rights_and_daemon_share_the_socket",
            fork_exec_scm_rights_and_daemon_share_the_socket,
        ),
        (
            "bulk_write_then_exit_or_sigkill_delivers_everything",
            bulk_write_then_exit_or_sigkill_delivers_everything,
        ),
        (
            "close_with_unread_data_resets",
            close_with_unread_data_resets,
        ),
        ("half_close_both_ways", half_close_both_ways),
        (
            "reset_is_econnreset_never_eof",
            reset_is_econnreset_never_eof,
        ),
        (
            "names_and_options_look_like_tcp",
            names_and_options_look_like_tcp,
        ),
        (
            "policy_change_keeps_live_connections",
            policy_change_keeps_live_connections,
        ),
        (
            "killed_instance_resets_and_the_next_connection_works",
            killed_instance_resets_and_the_next_connection_works,
        ),
        (
            "kernel_connections_side_by_side",
            kernel_connections_side_by_side,
        ),
        ("python_asyncio_download", python_asyncio_download),
        (
            "ipv6_names_and_a_download_match_the_kernel",
            ipv6_names_and_a_download_match_the_kernel,
        ),
        (
            "a_thousand_concurrent_then_sequential_connections",
            a_thousand_concurrent_then_sequential_connections,
        ),
    ];
    testkit::run(
        trials
            .into_iter()
            .map(|(name, body)| Trial::gated(name, gate, move |()| body()))
            .collect(),
    )
}

// === preconditions ===

fn gate() -> Result<(), Ignored> {
    static REASON: OnceLock<Option<String>> = OnceLock::new();
    let reason = REASON.get_or_init(missing).clone();
    match reason {
        None => Ok(()),
        Some(reason) if std::env::var(REQUIRE).is_ok_and(|v| v == "1") => {
            panic!("{reason}, and {REQUIRE}=1")
        }
        Some(reason) => Err(Ignored::new(reason)),
    }
}

fn which(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path)
            .chain(["/usr/sbin".into(), "/sbin".into()])
            .any(|dir| dir.join(program).is_file())
    })
}

fn missing() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (network namespaces, veth, iptables)".into());
    }
    for program in ["ip", "iptables", "ethtool", "sysctl", "cc", "python3"] {
        if !which(program) {
            return Some(format!("{program} is not installed"));
        }
    }
    let dir = profile_dir();
    for bin in [
        "stackroute-controller",
        "stackroute-lrd",
        "stackroute",
        "stackroute-stackd",
    ] {
        if !dir.join(bin).is_file() {
            return Some(format!(
                "{} is missing: cargo build -p stackroute-controller -p stackroute-lrd -p stackroute-cli -p nsocket-shim -p stackroute-stackd (same target directory)",
                dir.join(bin).display()
            ));
        }
    }
    None
}

fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps")
        .to_path_buf()
}

fn probes() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/probes")
}

/// The C probe, compiled once per run.
fn relay_probe() -> &'static Path {
    static PROBE: OnceLock<PathBuf> = OnceLock::new();
    PROBE.get_or_init(|| {
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("nsocket-relay-probe");
        let status = Command::new("cc")
            .args(["-O1", "-Wall", "-o"])
            .arg(&out)
            .arg(probes().join("relay.c"))
            .status()
            .expect("cc runs");
        assert!(status.success(), "compiling tests/probes/relay.c");
        out
    })
}

fn shim() -> &'static Path {
    static SHIM: OnceLock<PathBuf> = OnceLock::new();
    SHIM.get_or_init(|| common::library("nsocket-shim", "libnsocket.so"))
}

// === the lab ===

static NEXT: AtomicU32 = AtomicU32::new(0);
const PREFIX: &str = "srshim-";

fn sh(program: &str, args: &[&str]) -> Result<String, String> {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "{program} {args:?}: {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

fn must(program: &str, args: &[&str]) -> String {
    sh(program, args).unwrap_or_else(|e| panic!("{e}"))
}

/// Two namespaces, a controller and an agent; dropping it kills every process left in the
/// namespaces (by pid) and deletes them.
struct Lab {
    client: String,
    server: String,
    agent: Agent,
    _controller: Controller,
    state: PathBuf,
    tmp: tempfile::TempDir,
}

impl Lab {
    /// The client namespace's instance reads and writes through AF_XDP (the agent's default),
    /// not AF_PACKET: its record says so and the steering program is on the interface.
    fn assert_af_xdp(&self) {
        let recorded = std::fs::read_to_string(self.agent.state_dir.join("instances.json"))
            .unwrap_or_default();
        assert!(recorded.contains(r#""engine": "af_xdp""#), "{recorded}");
        let link = must("ip", &["-n", &self.client, "link", "show", "v0"]);
        assert!(link.contains("xdpgeneric"), "{link}");
    }

    fn new() -> Self {
        remove_leftovers();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let base = format!("{PREFIX}{}-{n}", std::process::id());
        let (client, server) = (format!("{base}-c"), format!("{base}-s"));
        must("ip", &["netns", "add", &client]);
        // From here on, Drop cleans up (the agent and controller are started below).
        let tmp = tempfile::tempdir().expect("temp dir");
        let guard = NamespacesGuard(vec![client.clone()]);
        must("ip", &["netns", "add", &server]);
        let guard = NamespacesGuard([guard.take(), vec![server.clone()]].concat());
        for ns in [&client, &server] {
            must("ip", &["-n", ns, "link", "set", "lo", "up"]);
        }
        must(
            "ip",
            &[
                "-n", &client, "link", "add", "v0", "type", "veth", "peer", "name", "v1", "netns",
                &server,
            ],
        );
        for (ns, dev, cidr, cidr6) in [
            (&client, "v0", CLIENT_IP, CLIENT_IP6),
            (&server, "v1", SERVER_IP, SERVER_IP6),
        ] {
            must(
                "ip",
                &["-n", ns, "addr", "add", &format!("{cidr}/24"), "dev", dev],
            );
            // No duplicate address detection: usable at once (the instance reads it as
            // the interface's global IPv6 address).
            must(
                "ip",
                &[
                    "-n",
                    ns,
                    "addr",
                    "add",
                    &format!("{cidr6}/64"),
                    "dev",
                    dev,
                    "nodad",
                ],
            );
            must("ip", &["-n", ns, "link", "set", dev, "up"]);
            // Wire-sized frames: the instance reads and writes the veth with AF_PACKET.
            must(
                "ip",
                &[
                    "netns", "exec", ns, "ethtool", "-K", dev, "tso", "off", "gso", "off", "gro",
                    "off",
                ],
            );
        }
        must(
            "ip",
            &["-n", &client, "route", "add", "default", "via", SERVER_IP],
        );
        // The client namespace's kernel default is BBR, as the policy's: the oracle's
        // TCP_CONGESTION then reads what the relay's does.
        let _ = sh("modprobe", &["tcp_bbr"]);
        must(
            "ip",
            &[
                "netns",
                "exec",
                &client,
                "sysctl",
                "-qw",
                "net.ipv4.tcp_congestion_control=bbr",
            ],
        );
        let state = tmp.path().join("state");
        std::fs::create_dir(&state).unwrap();
        std::fs::write(state.join("cluster.yaml"), CLUSTER).unwrap();
        write_policy(&state, true);
        let controller = Controller::start(&state, tmp.path(), free_port());
        let agent = Agent::start("n1", &format!("http://{}", controller.grpc), tmp.path());
        let lab = Self {
            client,
            server,
            agent,
            _controller: controller,
            state,
            tmp,
        };
        std::mem::forget(guard);
        lab.wait_transport(US_PORT, "Userspace/BBR");
        lab.wait_transport(KERNEL_PORT, "Kernel/");
        lab
    }

    /// Waits until the agent decides `expected` (a prefix of `Stack/CC`) for `SERVER_IP:port`.
    fn wait_transport(&self, port: u16, expected: &str) {
        self.wait_transport_to(&format!("{SERVER_IP}:{port}"), expected);
    }

    fn wait_transport_to(&self, to: &str, expected: &str) {
        wait_for(
            &format!("lab/client → {to} decided {expected}"),
            Duration::from_secs(20),
            || {
                explain_agent(&self.agent.socket_dir, "lab/client", to)
                    .filter(|e| transport(e).starts_with(expected))
            },
        );
    }

    fn set_policy(&self, userspace: bool) {
        write_policy(&self.state, userspace);
    }

    /// `ip netns exec NS ARGS…`.
    fn command(&self, ns: &str, args: &[&str]) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", ns]).args(args);
        command.env_remove("LD_PRELOAD");
        command
    }

    /// A program in the client namespace, under the shim (`stackroute run`) or plainly.
    fn client_command(&self, shim: bool, args: &[&str]) -> Command {
        if !shim {
            return self.command(&self.client, args);
        }
        let cli = profile_dir().join("stackroute");
        let dir = self.agent.socket_dir.to_str().unwrap().to_string();
        let mut full = vec![
            cli.to_str().unwrap(),
            "run",
            "--socket-dir",
            &dir,
            "--namespace",
            "lab",
            "--name",
            "client",
            "--labels",
            "app=client",
            "--",
        ];
        full.extend_from_slice(args);
        let mut command = self.command(&self.client, &full);
        command
            .env("STACKROUTE_SHIM", shim_path())
            .env("STACKROUTE_LOG", "debug");
        command
    }

    fn probe(&self, shim: bool, mode: &str, port: u16, extra: &[&str]) -> Proc {
        let probe = relay_probe().to_str().unwrap().to_string();
        let port = port.to_string();
        let mut args = vec![probe.as_str(), mode, SERVER_IP, &port];
        args.extend_from_slice(extra);
        Proc::spawn(mode, self.client_command(shim, &args))
    }

    fn python(&self, shim: bool, script: &str, args: &[&str]) -> Proc {
        let path = probes().join(script);
        let mut full = vec!["python3", path.to_str().unwrap()];
        full.extend_from_slice(args);
        Proc::spawn(script, self.client_command(shim, &full))
    }

    /// `server.py MODE PORT CONNS ARG` in the server namespace, once it listens.
    fn server(&self, mode: &str, port: u16, conns: u32, arg: &str) -> Proc {
        let script = probes().join("server.py");
        let (port, conns) = (port.to_string(), conns.to_string());
        let mut server = Proc::spawn(
            &format!("server-{mode}"),
            self.command(
                &self.server,
                &[
                    "python3",
                    script.to_str().unwrap(),
                    mode,
                    &port,
                    &conns,
                    arg,
                ],
            ),
        );
        server.expect("listening", Duration::from_secs(10));
        server
    }

    /// The client namespace's `Tcp: OutRsts` (kernel RSTs sent).
    fn out_rsts(&self) -> u64 {
        let snmp = self
            .command(&self.client, &["cat", "/proc/net/snmp"])
            .output()
            .expect("cat /proc/net/snmp");
        let text = String::from_utf8_lossy(&snmp.stdout);
        let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
        let (names, values) = (tcp.next().unwrap_or(""), tcp.next().unwrap_or(""));
        names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(name, _)| *name == "OutRsts")
            .and_then(|(_, value)| value.parse().ok())
            .expect("OutRsts in /proc/net/snmp")
    }

    /// Drops SYNs to `port` at the server (`iptables`), or stops doing so.
    fn drop_syns(&self, port: u16, on: bool) {
        let port = port.to_string();
        let op = if on { "-I" } else { "-D" };
        let status = self
            .command(
                &self.server,
                &[
                    "iptables", "-w", op, "INPUT", "-p", "tcp", "--dport", &port, "--syn", "-j",
                    "DROP",
                ],
            )
            .status()
            .expect("iptables runs");
        assert!(status.success(), "iptables {op} in the server namespace");
    }

    /// The pid of the instance serving the client namespace.
    fn instance_pid(&self) -> Option<u32> {
        let ns = std::fs::metadata(format!("/run/netns/{}", self.client)).ok()?;
        std::fs::read_dir("/proc")
            .ok()?
            .flatten()
            .find_map(|entry| {
                let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
                let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
                let first = cmdline.split(|b| *b == 0).next()?;
                if !String::from_utf8_lossy(first).ends_with("stackroute-stackd") {
                    return None;
                }
                let net = std::fs::metadata(entry.path().join("ns/net")).ok()?;
                (net.ino() == ns.ino() && net.dev() == ns.dev()).then_some(pid)
            })
    }
}

fn shim_path() -> &'static Path {
    shim()
}

fn write_policy(state: &Path, userspace: bool) {
    std::fs::write(state.join(".policy.tmp"), policy(userspace)).unwrap();
    std::fs::rename(state.join(".policy.tmp"), state.join("policy.yaml")).unwrap();
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in [&self.client, &self.server] {
            remove_namespace(ns);
        }
        let _ = &self.tmp;
    }
}

/// Deletes namespaces if the lab is not finished being built.
struct NamespacesGuard(Vec<String>);

impl NamespacesGuard {
    fn take(self) -> Vec<String> {
        let names = self.0.clone();
        std::mem::forget(self);
        names
    }
}

impl Drop for NamespacesGuard {
    fn drop(&mut self) {
        for ns in &self.0 {
            remove_namespace(ns);
        }
    }
}

/// Kills every process in `ns` by pid, then deletes it.
fn remove_namespace(ns: &str) {
    for _ in 0..5 {
        let pids = sh("ip", &["netns", "pids", ns]).unwrap_or_default();
        let pids: Vec<i32> = pids
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            // SAFETY: kill(2) with a pid read from `ip netns pids` of our own namespace.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if let Err(error) = sh("ip", &["netns", "del", ns]) {
        eprintln!("cannot delete network namespace {ns}: {error}");
    }
}

/// Deletes `srshim-<pid>-…` namespaces whose creating process is gone.
fn remove_leftovers() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            remove_namespace(&name);
        }
    }
}

// === processes ===

/// A child with piped stdio: stdout read line by line, stderr collected; killed by pid when
/// dropped.
struct Proc {
    name: String,
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
    stderr: Arc<Mutex<String>>,
    status: Option<ExitStatus>,
}

impl Proc {
    fn spawn(name: &str, mut command: Command) -> Self {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {command:?}: {e}"));
        let (tx, lines) = channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().unwrap();
        let collected = stderr.clone();
        std::thread::spawn(move || {
            let mut buffer = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buffer) {
                if n == 0 {
                    break;
                }
                collected
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buffer[..n]));
            }
        });
        Self {
            name: name.into(),
            child,
            lines,
            seen: Vec::new(),
            stderr,
            status: None,
        }
    }

    /// Waits for a line starting with `prefix`; returns it.
    fn expect(&mut self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.starts_with(prefix) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "{}: no line starting with {prefix:?} within {timeout:?}; stdout so far:\n{}\nstderr:\n{}",
                    self.name,
                    self.seen.join("\n"),
                    self.stderr()
                ),
            }
        }
    }

    fn say(&mut self, line: &str) {
        let stdin = self.child.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{line}").expect("write to the probe");
        stdin.flush().unwrap();
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits until stdout closes and the process exits (killing it after `timeout`): stdout.
    fn finish(&mut self, timeout: Duration) -> String {
        drop(self.child.stdin.take());
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    self.kill();
                    panic!(
                        "{}: not finished within {timeout:?}; stdout:\n{}\nstderr:\n{}",
                        self.name,
                        self.seen.join("\n"),
                        self.stderr()
                    );
                }
            }
        }
        while self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
            if Instant::now() > deadline {
                self.kill();
                panic!("{}: did not exit within {timeout:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.seen.join("\n")
    }

    /// Everything read so far, after a short wait for more (for servers that are killed).
    fn output_after(&mut self, wait: Duration) -> String {
        let deadline = Instant::now() + wait;
        while let Ok(line) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            self.seen.push(line);
        }
        self.seen.join("\n")
    }

    fn kill(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

// === comparing runs ===

/// What one run observed.
#[derive(Debug)]
struct Run {
    /// The client's lines, without `info` lines.
    client: Vec<String>,
    /// The server's lines, without `listening` and `peer` lines.
    server: Vec<String>,
    /// Client ports the server saw.
    peers: Vec<u16>,
    raw: String,
}

fn compared(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| !l.starts_with("info ") && !l.starts_with("peer ") && *l != "listening")
        .map(str::to_string)
        .collect()
}

fn peers(text: &str) -> Vec<u16> {
    text.lines()
        .filter_map(|l| l.strip_prefix("peer ")?.parse().ok())
        .collect()
}

/// How the server side of a case runs.
struct Server<'a> {
    mode: &'a str,
    conns: u32,
    arg: &'a str,
}

const fn server(mode: &str) -> Server<'_> {
    Server {
        mode,
        conns: 1,
        arg: "-",
    }
}

/// Runs the C probe `mode` (with `extra`) against a fresh `server`, once without the shim and
/// once with it; `during` runs while the probe runs (it may read the probe's lines). Asserts
/// the two observed the same, that the second was relayed, and that the client namespace's
/// kernel sent no RST meanwhile. Returns (oracle, relayed).
fn oracle_and_relay(
    lab: &Lab,
    mode: &str,
    extra: &[&str],
    server: &Server,
    during: &dyn Fn(&Lab, &mut Proc),
) -> (Run, Run) {
    oracle_and_relay_with(lab, mode, extra, server, &|_| {}, during)
}

/// [`oracle_and_relay`] with `before` run before each probe starts.
fn oracle_and_relay_with(
    lab: &Lab,
    mode: &str,
    extra: &[&str],
    server: &Server,
    before: &dyn Fn(&Lab),
    during: &dyn Fn(&Lab, &mut Proc),
) -> (Run, Run) {
    let runs: Vec<Run> = [false, true]
        .into_iter()
        .map(|shim| {
            let mut srv = lab.server(server.mode, US_PORT, server.conns, server.arg);
            let rsts = lab.out_rsts();
            before(lab);
            let mut probe = lab.probe(shim, mode, US_PORT, extra);
            during(lab, &mut probe);
            let client = probe.finish(PROBE_TIMEOUT);
            let server_out = srv.finish(PROBE_TIMEOUT);
            let stderr = probe.stderr();
            let raw = format!(
                "{} run of {mode}:\n--- client ---\n{client}\n--- server ---\n{server_out}\n--- client stderr ---\n{stderr}",
                if shim { "relayed" } else { "kernel" }
            );
            eprintln!("{raw}");
            let run = Run {
                client: compared(&client),
                server: compared(&server_out),
                peers: peers(&server_out),
                raw,
            };
            if shim {
                assert!(
                    stderr.contains("transport=Userspace/BBR"),
                    "not relayed:\n{}",
                    run.raw
                );
                assert!(
                    !run.peers.is_empty() && run.peers.iter().all(|p| RESERVED.contains(p)),
                    "the server saw client ports {:?}, not the instance's\n{}",
                    run.peers,
                    run.raw
                );
                let after = lab.out_rsts();
                assert_eq!(
                    after, rsts,
                    "the client namespace's kernel sent {} RSTs during the relayed run\n{}",
                    after - rsts,
                    run.raw
                );
            } else {
                assert!(
                    run.peers.iter().all(|p| !RESERVED.contains(p)),
                    "{}",
                    run.raw
                );
            }
            run
        })
        .collect();
    let mut runs = runs.into_iter();
    let (kernel, relayed) = (runs.next().unwrap(), runs.next().unwrap());
    assert_eq!(
        kernel.client, relayed.client,
        "{mode}: the client saw different things (left: kernel, right: relay)\n{}\n{}",
        kernel.raw, relayed.raw
    );
    assert_eq!(
        kernel.server, relayed.server,
        "{mode}: the server saw different things (left: kernel, right: relay)\n{}\n{}",
        kernel.raw, relayed.raw
    );
    (kernel, relayed)
}

fn nothing(_: &Lab, _: &mut Proc) {}

/// Asserts `run`'s client printed each of `lines`.
fn expect_lines(run: &Run, lines: &[&str]) {
    for line in lines {
        assert!(
            run.client.iter().any(|l| l == line),
            "expected {line:?} from the client\n{}",
            run.raw
        );
    }
}

fn expect_server(run: &Run, lines: &[&str]) {
    for line in lines {
        assert!(
            run.server.iter().any(|l| l == line),
            "expected {line:?} from the server\n{}",
            run.raw
        );
    }
}

// === the cases ===

fn nonblocking_connect_is_writable_only_after_the_handshake() {
    let lab = Lab::new();
    // SYNs to the server are dropped from before the probe starts until it has connected and
    // 300 ms more: EPOLLOUT comes with the SYN retransmission's handshake, not before.
    let (_, relayed) = oracle_and_relay_with(
        &lab,
        "nb_connect",
        &[],
        &server("collect"),
        &|lab| lab.drop_syns(US_PORT, true),
        &|lab, probe| {
            probe.expect("waiting", Duration::from_secs(20));
            std::thread::sleep(Duration::from_millis(300));
            lab.drop_syns(US_PORT, false);
        },
    );
    expect_lines(
        &relayed,
        &[
            "connect=EINPROGRESS",
            "writable_at_once=0",
            "connect_while_connecting=EALREADY",
            "epollout=1 delayed=1",
            "so_error=0",
            "connect_again=0",
            "connect_third=EISCONN",
            "reply=got nb end=eof",
        ],
    );
}

fn connect_to_a_closed_port_is_refused() {
    let lab = Lab::new();
    for mode in ["nb_refused", "block_refused"] {
        let mut runs = Vec::new();
        for shim in [false, true] {
            let mut probe = lab.probe(shim, mode, US_PORT + 1, &[]);
            let out = probe.finish(PROBE_TIMEOUT);
            let stderr = probe.stderr();
            eprintln!("{mode} shim={shim}:\n{out}\n{stderr}");
            if shim {
                assert!(stderr.contains("transport=Userspace/BBR"), "{stderr}");
            }
            runs.push(compared(&out));
        }
        assert_eq!(runs[0], runs[1], "{mode}: kernel (left) and relay (right)");
        let want = if mode == "nb_refused" {
            vec![
                "connect=EINPROGRESS",
                "ready=1 pollerr=1",
                "so_error=ECONNREFUSED",
            ]
        } else {
            vec!["connect=ECONNREFUSED"]
        };
        assert_eq!(runs[1], want);
    }
}

fn edge_triggered_epollout_after_eagain() {
    let lab = Lab::new();
    let (_, relayed) = oracle_and_relay(
        &lab,
        "et_out",
        &[],
        &Server {
            mode: "drain",
            conns: 1,
            arg: "3",
        },
        &nothing,
    );
    expect_lines(
        &relayed,
        &[
            "initial_out=1",
            "filled_until=EAGAIN",
            "out_while_full=0",
            "out_after_drain=1",
            "writes_again=1",
        ],
    );
}

fn edge_triggered_epollin_and_rdhup() {
    let lab = Lab::new();
    let (_, relayed) = oracle_and_relay(&lab, "et_in", &[], &server("et_in"), &nothing);
    expect_lines(
        &relayed,
        &[
            "in1=1 rdhup1=0",
            "read_partial=100",
            "edge_after_partial=0",
            "in2=1",
            "drained=1900 then=EAGAIN",
            "fin_event=1 rdhup=1 in=1",
            "read_at_fin=eof",
        ],
    );
}

fn nested_epoll_poll_and_select() {
    let lab = Lab::new();
    let (_, relayed) = oracle_and_relay(&lab, "nested", &[], &server("nested"), &nothing);
    expect_lines(
        &relayed,
        &[
            "inner_before=0",
            "outer=1 data=2",
            "poll_inner=1",
            "inner=1 data=1",
            "select=2 readable=1 writable=1",
            "read=1",
        ],
    );
}

fn epoll_registration_before_connect_survives() {
    let lab = Lab::new();
    let (_, relayed) = oracle_and_relay(&lab, "epoll_before", &[], &server("echo"), &nothing);
    expect_lines(
        &relayed,
        &[
            "connect=EINPROGRESS",
            "lt=1 out=1 data=0xfeedbeef",
            "et=1 data=0xe7",
            "deleted=0",
            "modified=1 data=0x2",
            "add_again=EEXIST",
            "in=1 data=0xabc",
            "echo=echo",
            "del=0",
        ],
    );
}

fn fork_exec_scm_rights_and_daemon_share_the_socket() {
    let lab = Lab::new();
    let (_, relayed) = oracle_and_relay(&lab, "fork", &[], &server("collect"), &nothing);
    expect_lines(
        &relayed,
        &["child_exit=0", "reply=got child,parent end=eof"],
    );
    let peer = format!("{SERVER_IP}:{US_PORT} family=AF_INET len=16");
    let (_, relayed) = oracle_and_relay(&lab, "exec", &[], &server("collect"), &nothing);
    expect_lines(
        &relayed,
        &[
            &format!("peer={peer}"),
            "so_domain=AF_INET so_type=1 so_protocol=6",
            "local_family=AF_INET",
            "reply=got exec end=eof",
        ],
    );
    let (_, relayed) = oracle_and_relay(&lab, "scm", &[], &server("collect"), &nothing);
    expect_lines(
        &relayed,
        &[
            &format!("received_peer={peer}"),
            "so_domain=AF_INET so_type=1 so_protocol=6",
            "reply=got passed end=eof",
            "receiver_exit=0",
        ],
    );
    let (_, relayed) = oracle_and_relay(&lab, "daemon", &[], &server("collect"), &nothing);
    expect_lines(
        &relayed,
        &[
            "parent_exit=0",
            &format!("daemon_peer={peer}"),
            "reply=got daemon end=eof",
        ],
    );
}

fn bulk_write_then_exit_or_sigkill_delivers_everything() {
    let lab = Lab::new();
    for mode in ["bulk_exit", "bulk_kill"] {
        let (_, relayed) = oracle_and_relay(&lab, mode, &["20"], &server("count"), &nothing);
        expect_server(&relayed, &["bytes=20971520 pattern_ok=1 end=eof"]);
    }
}

fn close_with_unread_data_resets() {
    let lab = Lab::new();
    let (_, relayed) = oracle_and_relay(&lab, "unread_close", &[], &server("unread"), &nothing);
    expect_lines(&relayed, &["unread_data=1", "closed=1"]);
    expect_server(&relayed, &["recv=ECONNRESET"]);
}

fn half_close_both_ways() {
    let lab = Lab::new();
    let (_, relayed) = oracle_and_relay(&lab, "half_close", &[], &server("collect"), &nothing);
    expect_lines(&relayed, &["reply=got request end=eof"]);
    expect_server(&relayed, &["received=request end=eof"]);
    let (_, relayed) = oracle_and_relay(&lab, "server_half", &[], &server("halfclose"), &nothing);
    expect_lines(
        &relayed,
        &[
            "read=hello end=eof",
            "read_again=0",
            "write_after_eof=9",
            "final=eof",
        ],
    );
    expect_server(&relayed, &["got=after-eof end=eof"]);
}

fn reset_is_econnreset_never_eof() {
    let lab = Lab::new();
    // A write before any read: ECONNRESET first (not EPIPE), then EPIPE; the bytes stay
    // readable (Linux keeps the receive queue of a reset socket).
    let (_, relayed) = oracle_and_relay(&lab, "reset", &["write"], &server("rst"), &nothing);
    expect_lines(
        &relayed,
        &["write=ECONNRESET", "write_again=EPIPE", "send_after=EPIPE"],
    );
    for how in ["read", "recv", "readv"] {
        let (_, relayed) = oracle_and_relay(&lab, "reset", &[how], &server("rst"), &nothing);
        expect_lines(&relayed, &["bytes=5000 end=ECONNRESET", "send_after=EPIPE"]);
    }
}

fn names_and_options_look_like_tcp() {
    let lab = Lab::new();
    let (_, relayed) = oracle_and_relay(&lab, "names", &[], &server("echo"), &nothing);
    expect_lines(
        &relayed,
        &[
            "set_nodelay=0",
            "set_keepalive=0",
            "echo=5",
            // A destination on a connected socket is ignored, as TCP does.
            "sendto=3 echo=3",
            "sendto_junk=3 echo=3",
            "sendmsg=3 echo=3",
            "sendmmsg=2 lens=3,3 echo=6",
            &format!("local={CLIENT_IP} family=AF_INET len=16 port_set=1"),
            &format!("peer={SERVER_IP}:{US_PORT} family=AF_INET len=16"),
            "so_domain=AF_INET so_type=1 so_protocol=6",
            "nodelay=1 keepalive=1 so_error=0",
            "tcp_info=0 state=1 rtt_positive=1",
            "congestion=bbr",
            "set_cc_unknown=errno2",
        ],
    );
    // Python's socket(fileno=…) asks the fd what it is.
    let mut runs = Vec::new();
    for shim in [false, true] {
        let mut srv = lab.server("echo", US_PORT, 1, "-");
        let port = US_PORT.to_string();
        let mut client = lab.python(shim, "pyclient.py", &["fileno", SERVER_IP, &port]);
        let out = client.finish(PROBE_TIMEOUT);
        let server_out = srv.finish(PROBE_TIMEOUT);
        eprintln!(
            "python fileno shim={shim}:\n{out}\n{server_out}\n{}",
            client.stderr()
        );
        if shim {
            assert!(peers(&server_out).iter().all(|p| RESERVED.contains(p)));
        }
        runs.push(compared(&out));
    }
    assert_eq!(runs[0], runs[1], "python: kernel (left) and relay (right)");
    assert!(
        runs[1].contains(&"family=AF_INET type=SOCK_STREAM proto=6".to_string()),
        "{:?}",
        runs[1]
    );
}

/// A download on A; the test acts (`act`); then B to `port2`; returns the probe's output and
/// the server outputs.
fn two_phase(lab: &Lab, port2: u16, order: &str, act: &dyn Fn(&Lab)) -> (String, String, String) {
    let same = port2 == US_PORT;
    let size = (8 << 20).to_string();
    let mut a_server = Proc::spawn("server-a", {
        let script = probes().join("server.py");
        lab.command(
            &lab.server,
            &[
                "python3",
                script.to_str().unwrap(),
                "stream",
                &US_PORT.to_string(),
                if same { "2" } else { "1" },
                &size,
            ],
        )
    });
    a_server.expect("listening", Duration::from_secs(10));
    let mut b_server = (!same).then(|| lab.server("stream", port2, 1, "1048576"));
    let mut probe = lab.probe(true, "two_phase", US_PORT, &[&port2.to_string(), order]);
    probe.expect("started=1", Duration::from_secs(20));
    act(lab);
    probe.say("go");
    let client = probe.finish(Duration::from_secs(60));
    let stderr = probe.stderr();
    let a = a_server.output_after(Duration::from_millis(200));
    let b = b_server
        .as_mut()
        .map(|s| s.output_after(Duration::from_millis(200)))
        .unwrap_or_default();
    eprintln!(
        "two_phase {order}:\n{client}\n--- server A ---\n{a}\n--- server B ---\n{b}\n--- stderr ---\n{stderr}"
    );
    (client, a, b)
}

fn info_port(output: &str, key: &str) -> u16 {
    output
        .lines()
        .find_map(|l| l.strip_prefix(&format!("info {key}="))?.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in:\n{output}"))
}

fn policy_change_keeps_live_connections() {
    let lab = Lab::new();
    let rsts = lab.out_rsts();
    let (client, _, _) = two_phase(&lab, US_PORT, "b_first", &|lab| {
        lab.set_policy(false);
        lab.wait_transport(US_PORT, "Kernel/");
    });
    assert!(
        RESERVED.contains(&info_port(&client, "a_port")),
        "A was not relayed:\n{client}"
    );
    assert!(
        !RESERVED.contains(&info_port(&client, "b_port")),
        "B, made after the policy moved to the kernel, was relayed:\n{client}"
    );
    let lines = compared(&client);
    for line in [
        "b_bytes=8388608 b_end=eof b_pattern_ok=1",
        "a_bytes=8388608 a_end=eof a_pattern_ok=1",
    ] {
        assert!(lines.iter().any(|l| l == line), "{line:?} in\n{client}");
    }
    assert_eq!(lab.out_rsts(), rsts, "kernel RSTs in the client namespace");
}

fn killed_instance_resets_and_the_next_connection_works() {
    let lab = Lab::new();
    let (client, _, _) = two_phase(&lab, KERNEL_PORT + 1, "a_first", &|lab| {
        let pid = lab
            .instance_pid()
            .expect("the instance runs in the client namespace");
        // SAFETY: kill(2) of the instance's pid, found in /proc by its namespace.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    });
    assert!(RESERVED.contains(&info_port(&client, "a_port")), "{client}");
    let lines = compared(&client);
    assert!(
        lines.iter().any(|l| l.starts_with("a_end=ECONNRESET")),
        "the relayed read after the instance died:\n{client}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l == "b_bytes=1048576 b_end=eof b_pattern_ok=1"),
        "{client}"
    );
    // B went to the kernel port (a Kernel rule); now a Userspace connection after the death:
    // either a fresh instance relays it or it falls back to the kernel (stack-unavailable).
    let mut srv = lab.server("stream", US_PORT, 1, "1048576");
    let size = "1048576";
    let port = US_PORT.to_string();
    let mut py = lab.python(true, "pyclient.py", &["asyncio", SERVER_IP, &port, size]);
    let out = py.finish(PROBE_TIMEOUT);
    let server_out = srv.finish(PROBE_TIMEOUT);
    let stderr = py.stderr();
    eprintln!("after the kill:\n{out}\n{server_out}\n{stderr}");
    assert!(out.contains("bytes=1048576 sha256_ok=1"), "{out}\n{stderr}");
    let port = peers(&server_out)[0];
    let fresh = RESERVED.contains(&port) && stderr.contains("transport=Userspace/BBR");
    let fallback = !RESERVED.contains(&port) && stderr.contains("fallback=stack-unavailable");
    assert!(
        fresh || fallback,
        "neither a fresh instance nor a stack-unavailable fallback (port {port}):\n{stderr}"
    );
}

fn kernel_connections_side_by_side() {
    let lab = Lab::new();
    let rsts = lab.out_rsts();
    let (client, _, _) = two_phase(&lab, KERNEL_PORT, "b_first", &|_| {});
    assert!(RESERVED.contains(&info_port(&client, "a_port")), "{client}");
    assert!(
        !RESERVED.contains(&info_port(&client, "b_port")),
        "{client}"
    );
    let lines = compared(&client);
    for line in [
        "b_bytes=1048576 b_end=eof b_pattern_ok=1",
        "a_bytes=8388608 a_end=eof a_pattern_ok=1",
    ] {
        assert!(lines.iter().any(|l| l == line), "{line:?} in\n{client}");
    }
    assert_eq!(lab.out_rsts(), rsts, "kernel RSTs in the client namespace");
}

/// Runs [`Lab::assert_af_xdp`] when the trial is done (unless it already failed).
struct CheckAfXdp<'a>(&'a Lab);

impl Drop for CheckAfXdp<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            self.0.assert_af_xdp();
        }
    }
}

fn python_asyncio_download() {
    let lab = Lab::new();
    let _checked_at_the_end = CheckAfXdp(&lab);
    let mut runs = Vec::new();
    for shim in [false, true] {
        let size = (4 << 20).to_string();
        let mut srv = lab.server("stream", US_PORT, 1, &size);
        let port = US_PORT.to_string();
        let mut client = lab.python(shim, "pyclient.py", &["asyncio", SERVER_IP, &port, &size]);
        let out = client.finish(PROBE_TIMEOUT);
        let server_out = srv.finish(PROBE_TIMEOUT);
        eprintln!(
            "asyncio shim={shim}:\n{out}\n{server_out}\n{}",
            client.stderr()
        );
        assert_eq!(
            peers(&server_out).iter().all(|p| RESERVED.contains(p)),
            shim,
            "{server_out}"
        );
        runs.push(compared(&out));
    }
    assert_eq!(runs[0], runs[1]);
    assert!(runs[1].contains(&"bytes=4194304 sha256_ok=1".to_string()));
}

/// Descriptors open in a process.
fn descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |dir| dir.count())
}

fn a_thousand_concurrent_then_sequential_connections() {
    const CONCURRENT: usize = 1000;
    // More than the instance's 2,000 ports, each left in TIME-WAIT by the client's close: the
    // later ones take over ports a second into TIME-WAIT (our tcp_tw_reuse).
    const SEQUENTIAL: usize = 2200;
    let lab = Lab::new();
    let rsts = lab.out_rsts();
    let total = (1 + CONCURRENT + SEQUENTIAL) as u32;
    let mut srv = lab.server("echo", US_PORT, total, "");
    let (port, n, s) = (
        US_PORT.to_string(),
        CONCURRENT.to_string(),
        SEQUENTIAL.to_string(),
    );
    let mut client = lab.python(true, "pyclient.py", &["many", SERVER_IP, &port, &n, &s]);
    client.expect("warm_ok=1", PROBE_TIMEOUT);
    let pid = lab
        .instance_pid()
        .expect("the first connection started an instance");
    let idle = descriptors(pid);
    let held = client.expect("held", Duration::from_secs(120));
    let open = descriptors(pid);
    let kernel_sockets = lab
        .command(
            &lab.client,
            &["ss", "-Htn", "state", "all", "dst", SERVER_IP],
        )
        .output()
        .expect("ss runs");
    let kernel_sockets = String::from_utf8_lossy(&kernel_sockets.stdout).into_owned();
    client.say("release");
    let out = client.finish(Duration::from_secs(300));
    let server_out = srv.finish(PROBE_TIMEOUT);
    eprintln!("{out}\ninstance descriptors: idle {idle}, {CONCURRENT} open {open}");
    assert_eq!(held, "held");
    let lines = compared(&out);
    let expected =
        format!("concurrent={CONCURRENT} echoed_ok={CONCURRENT} open_descriptors={CONCURRENT}");
    assert!(lines.contains(&expected), "{expected:?} in\n{out}");
    // One descriptor per relayed connection (idle counts a few transient ones).
    assert!(
        open > CONCURRENT,
        "the instance relays {CONCURRENT} connections with {open} descriptors (idle {idle})"
    );
    assert_eq!(
        kernel_sockets.trim(),
        "",
        "kernel TCP sockets to the server"
    );
    let expected = format!("sequential={SEQUENTIAL} echoed_ok={SEQUENTIAL} leaked_descriptors=0");
    assert!(lines.contains(&expected), "{expected:?} in\n{out}");
    let ports = peers(&server_out);
    assert_eq!(
        ports.len(),
        total as usize,
        "connections the server accepted"
    );
    let distinct: std::collections::BTreeSet<_> = ports.iter().collect();
    assert!(
        distinct.len() <= RESERVED.len(),
        "{} distinct client ports for {} connections",
        distinct.len(),
        ports.len()
    );
    let kernel: Vec<_> = ports.iter().filter(|p| !RESERVED.contains(p)).collect();
    assert!(
        kernel.is_empty(),
        "{} connections fell back to the kernel (ports {:?}…):\n{}",
        kernel.len(),
        &kernel[..kernel.len().min(5)],
        client
            .stderr()
            .lines()
            .filter(|l| l.contains("fallback"))
            .take(5)
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Every relay is gone once the connections are: the instance is back to its idle count.
    let settled = testkit::support::poll(
        "the instance's descriptors back to idle",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || (descriptors(pid) <= idle).then_some(()),
    );
    assert!(
        settled.is_ok(),
        "instance descriptors {} after all connections closed, {idle} when idle",
        descriptors(pid)
    );
    assert_eq!(lab.out_rsts(), rsts, "kernel RSTs in the client namespace");
}

fn ipv6_names_and_a_download_match_the_kernel() {
    let lab = Lab::new();
    let _checked_at_the_end = CheckAfXdp(&lab);
    lab.wait_transport_to(&format!("[{SERVER_IP6}]:{US_PORT}"), "Userspace/BBR");
    let port = US_PORT.to_string();
    let size = (4 << 20).to_string();
    let mut runs = Vec::new();
    for shim in [false, true] {
        let mut srv = lab.server("echo", US_PORT, 1, "-");
        let mut client = lab.python(shim, "pyclient.py", &["fileno", SERVER_IP6, &port]);
        let names = client.finish(PROBE_TIMEOUT);
        let names_server = srv.finish(PROBE_TIMEOUT);
        let mut srv = lab.server("stream", US_PORT, 1, &size);
        let mut client = lab.python(shim, "pyclient.py", &["asyncio", SERVER_IP6, &port, &size]);
        let download = client.finish(PROBE_TIMEOUT);
        let download_server = srv.finish(PROBE_TIMEOUT);
        eprintln!(
            "IPv6 shim={shim}:\n{names}\n{download}\n{names_server}\n{download_server}\n{}",
            client.stderr()
        );
        let ports = [peers(&names_server), peers(&download_server)].concat();
        assert_eq!(ports.len(), 2, "{names_server}\n{download_server}");
        assert_eq!(
            ports.iter().all(|p| RESERVED.contains(p)),
            shim,
            "user-space ports with the shim only: {ports:?}"
        );
        if shim {
            assert!(
                client.stderr().contains("transport=Userspace/BBR"),
                "{}",
                client.stderr()
            );
        }
        runs.push([compared(&names), compared(&download)].concat());
    }
    assert_eq!(runs[0], runs[1], "kernel (left) and relay (right)");
    for line in [
        "family=AF_INET6 type=SOCK_STREAM proto=6".to_owned(),
        format!("local_ip={CLIENT_IP6} local_port_set=1"),
        "bytes=4194304 sha256_ok=1".to_owned(),
    ] {
        assert!(runs[1].contains(&line), "{line:?} in {:?}", runs[1]);
    }
}
