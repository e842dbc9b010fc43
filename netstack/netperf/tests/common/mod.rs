//! A throw-away three-namespace lab for interop tests, torn down by `Drop` even on failure:
//!
//! ```text
//!  ns "a" (netstack, no kernel address)  ── veth ──  ns "r" (kernel router, loss) ── veth ──  ns "b" (kernel TCP)
//!  stack 10.N.1.2/24 gw 10.N.1.1                     10.N.1.1 / 10.N.2.1                      10.N.2.2/24
//! ```
//!
//! The netstack owns an address the kernel of its namespace does not have, so that kernel never
//! answers (no RSTs, no ARP replies) for the stack's connections. Random loss is applied by
//! `iptables -m statistic` in the router's FORWARD chain, which sees both directions.

#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);

/// Why the lab, plus these extra programs, cannot run here, if it cannot.
pub fn unavailable_with(extra_tools: &[&str]) -> Option<String> {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
        });
    if uid.as_deref() != Some("0") {
        return Some("not running as root (network namespaces need CAP_SYS_ADMIN)".into());
    }
    for &tool in ["ip", "iptables", "ip6tables", "python3"]
        .iter()
        .chain(extra_tools)
    {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return Some(format!("`{tool}` is not installed"));
        }
    }
    None
}

/// Runs when the lab, plus `extra_tools`, can run here; otherwise the trial is ignored with
/// the reason, or fails under STACKROUTE_REQUIRE_NETNS=1.
pub fn gate(extra_tools: &[&str]) -> Result<(), testkit::Ignored> {
    match unavailable_with(extra_tools) {
        None => Ok(()),
        Some(reason) if std::env::var("STACKROUTE_REQUIRE_NETNS").as_deref() == Ok("1") => {
            panic!("STACKROUTE_REQUIRE_NETNS=1 but {reason}")
        }
        Some(reason) => Err(testkit::Ignored::new(reason)),
    }
}

/// The netns gate, then the DPDK gate (a build with `--features dpdk`).
pub fn dpdk_gate(extra_tools: &[&str]) -> Result<(), testkit::Ignored> {
    gate(extra_tools)?;
    testkit::dpdk(
        cfg!(feature = "dpdk"),
        "cargo test -p stackroute-netperf --features dpdk",
    )
}

/// `--engine` arguments for `engine`: an engine name, or `dpdk:PMD` for DPDK's `net_PMD`
/// virtual device on the stack's interface (`dpdk:af_packet`, `dpdk:af_xdp`).
pub fn engine_args(engine: &str, interface: &str) -> Vec<String> {
    match engine.strip_prefix("dpdk:") {
        None => vec!["--engine".into(), engine.into()],
        Some(pmd) => {
            let queue = if pmd == "af_xdp" {
                ",start_queue=0,queue_count=1"
            } else {
                ""
            };
            vec![
                "--engine".into(),
                "dpdk".into(),
                "--dpdk-args".into(),
                format!("--vdev=net_{pmd}0,iface={interface}{queue}"),
            ]
        }
    }
}

/// After a DPDK run: the runtime directory its report names is gone.
pub fn assert_dpdk_cleaned_up(report: &serde_json::Value) {
    let Some(dir) = report["dpdk"]["runtime_dir"].as_str() else {
        return;
    };
    assert!(
        !std::path::Path::new(dir).exists(),
        "DPDK left its runtime directory {dir}"
    );
}

fn run(args: &[&str]) -> Output {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("running {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Waits (at most 5 s) until `dev` in `ns` has a link-local address and no tentative one.
fn wait_ipv6_ready(ns: &str, dev: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = run(&["ip", "-n", ns, "-6", "addr", "show", "dev", dev]);
        let text = String::from_utf8_lossy(&out.stdout);
        if text.contains("scope link") && !text.contains("tentative") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "IPv6 on {dev} in {ns} not ready: {text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn run_quiet(args: &[&str]) {
    let _ = Command::new(args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

pub struct Lab {
    pub ns_stack: String,
    pub ns_router: String,
    pub ns_kernel: String,
    pub stack_if: String,
    pub stack_addr: String,
    pub gateway: String,
    pub kernel_ip: String,
    /// The same, for IPv6 (every lab is dual-stack; neighbours found by NDP).
    pub stack_addr6: String,
    pub gateway6: String,
    pub kernel_ip6: String,
    children: Vec<Proc>,
}

struct Proc {
    child: Child,
    stdout: Arc<Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Lab {
    /// Creates the namespaces and links; `loss` is the FORWARD drop probability (0.0–1.0).
    pub fn new(loss: f64) -> Self {
        let pid = std::process::id();
        let n = LAB_COUNTER.fetch_add(1, Ordering::SeqCst);
        // Unique per process and lab: PID plus a counter.
        let tag = format!("{pid}x{n}");
        let subnet = 100 + ((pid as usize * 7 + n as usize) % 150);
        let lab = Self {
            ns_stack: format!("srA{tag}"),
            ns_router: format!("srR{tag}"),
            ns_kernel: format!("srB{tag}"),
            stack_if: format!("sa{tag}"),
            stack_addr: format!("10.{subnet}.1.2/24"),
            gateway: format!("10.{subnet}.1.1"),
            kernel_ip: format!("10.{subnet}.2.2"),
            stack_addr6: format!("fd00:{subnet}:1::2/64"),
            gateway6: format!("fd00:{subnet}:1::1"),
            kernel_ip6: format!("fd00:{subnet}:2::2"),
            children: Vec::new(),
        };
        // From here on, Drop cleans up whatever was created.
        for ns in [&lab.ns_stack, &lab.ns_router, &lab.ns_kernel] {
            run(&["ip", "netns", "add", ns]);
            run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        let r0 = format!("ra{tag}");
        let r1 = format!("rb{tag}");
        let b0 = format!("sb{tag}");
        run(&[
            "ip",
            "link",
            "add",
            &lab.stack_if,
            "netns",
            &lab.ns_stack,
            "type",
            "veth",
            "peer",
            "name",
            &r0,
            "netns",
            &lab.ns_router,
        ]);
        run(&[
            "ip",
            "link",
            "add",
            &r1,
            "netns",
            &lab.ns_router,
            "type",
            "veth",
            "peer",
            "name",
            &b0,
            "netns",
            &lab.ns_kernel,
        ]);
        let ns = |ns: &str, args: &[&str]| {
            let mut full = vec!["ip", "netns", "exec", ns];
            full.extend_from_slice(args);
            run(&full);
        };
        let gw_cidr = format!("{}/24", lab.gateway);
        let r1_cidr = format!("10.{subnet}.2.1/24");
        let b_cidr = format!("{}/24", lab.kernel_ip);
        let b_gw = format!("10.{subnet}.2.1");
        ns(&lab.ns_router, &["ip", "addr", "add", &gw_cidr, "dev", &r0]);
        ns(&lab.ns_router, &["ip", "addr", "add", &r1_cidr, "dev", &r1]);
        ns(&lab.ns_kernel, &["ip", "addr", "add", &b_cidr, "dev", &b0]);
        // IPv6 without duplicate address detection (addresses usable at once). The stack's
        // side of its link has IPv6 off in the kernel, so only the stack speaks NDP there.
        let gw6_cidr = format!("{}/64", lab.gateway6);
        let r1_6_cidr = format!("fd00:{subnet}:2::1/64");
        let b6_cidr = format!("{}/64", lab.kernel_ip6);
        let disable_ipv6 = format!("net.ipv6.conf.{}.disable_ipv6=1", lab.stack_if);
        ns(&lab.ns_stack, &["sysctl", "-qw", &disable_ipv6]);
        for (n, cidr, dev) in [
            (&lab.ns_router, &gw6_cidr, &r0),
            (&lab.ns_router, &r1_6_cidr, &r1),
            (&lab.ns_kernel, &b6_cidr, &b0),
        ] {
            // No DAD for the link-local address either: while it is tentative the kernel
            // does not answer neighbour solicitations (2 s of NDP retries before the first SYN).
            let no_dad = format!("net.ipv6.conf.{dev}.accept_dad=0");
            ns(n, &["sysctl", "-qw", &no_dad]);
            ns(n, &["ip", "-6", "addr", "add", cidr, "dev", dev, "nodad"]);
        }
        for (n, dev) in [
            (&lab.ns_stack, &lab.stack_if),
            (&lab.ns_router, &r0),
            (&lab.ns_router, &r1),
            (&lab.ns_kernel, &b0),
        ] {
            ns(n, &["ip", "link", "set", dev, "up"]);
            // Per-segment loss needs real segments: no TSO/GSO/GRO aggregates (best effort;
            // the stack copes with aggregates, the loss model does not).
            run_quiet(&[
                "ip", "netns", "exec", n, "ethtool", "-K", dev, "tso", "off", "gso", "off", "gro",
                "off",
            ]);
        }
        ns(
            &lab.ns_kernel,
            &["ip", "route", "add", "default", "via", &b_gw],
        );
        let b_gw6 = format!("fd00:{subnet}:2::1");
        ns(
            &lab.ns_kernel,
            &["ip", "-6", "route", "add", "default", "via", &b_gw6],
        );
        ns(&lab.ns_router, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        ns(
            &lab.ns_router,
            &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"],
        );
        if loss > 0.0 {
            let p = format!("{loss}");
            for table in ["iptables", "ip6tables"] {
                ns(
                    &lab.ns_router,
                    &[
                        table,
                        "-A",
                        "FORWARD",
                        "-m",
                        "statistic",
                        "--mode",
                        "random",
                        "--probability",
                        &p,
                        "-j",
                        "DROP",
                    ],
                );
            }
        }
        // The kernel ignores neighbour solicitations on an interface whose IPv6 is not up yet
        // (no link-local address, or one still tentative): the stack's first solicitation then
        // goes unanswered and its SYN leaves a second later. Wait until every kernel interface
        // of the path is ready.
        for (n, dev) in [
            (&lab.ns_router, &r0),
            (&lab.ns_router, &r1),
            (&lab.ns_kernel, &b0),
        ] {
            wait_ipv6_ready(n, dev);
        }
        lab
    }

    /// Starts a command inside the kernel-TCP namespace; its stdout is captured.
    pub fn spawn_kernel(&mut self, program: &[&str]) -> usize {
        self.spawn_in(&self.ns_kernel.clone(), program)
    }

    /// Starts `stackroute-netperf` inside the stack namespace with the lab's addressing.
    pub fn spawn_netperf(&mut self, args: &[&str]) -> usize {
        self.spawn_netperf_under(&[], args)
    }

    /// [`Lab::spawn_netperf`] run by `wrapper` (`setpriv …`: a command that runs its arguments).
    pub fn spawn_netperf_under(&mut self, wrapper: &[&str], args: &[&str]) -> usize {
        let bin = env!("CARGO_BIN_EXE_stackroute-netperf").to_owned();
        let mut full = wrapper.to_vec();
        full.push(bin.as_str());
        full.extend_from_slice(args);
        let common = [
            "--interface",
            &self.stack_if.clone(),
            "--address",
            &self.stack_addr.clone(),
            "--gateway",
            &self.gateway.clone(),
            "--address",
            &self.stack_addr6.clone(),
            "--gateway",
            &self.gateway6.clone(),
        ]
        .map(str::to_owned);
        let mut owned: Vec<String> = full.iter().map(|s| s.to_string()).collect();
        owned.extend(common);
        let refs: Vec<&str> = owned.iter().map(String::as_str).collect();
        self.spawn_in(&self.ns_stack.clone(), &refs)
    }

    /// Runs a command to completion inside the kernel-TCP namespace (setup steps).
    pub fn exec_kernel(&self, args: &[&str]) {
        let mut full = vec!["ip", "netns", "exec", self.ns_kernel.as_str()];
        full.extend_from_slice(args);
        run(&full);
    }

    /// Starts `stackroute-netperf` with exactly `args` inside the kernel-TCP namespace.
    pub fn spawn_netperf_in_kernel_ns(&mut self, args: &[&str]) -> usize {
        let bin = env!("CARGO_BIN_EXE_stackroute-netperf").to_owned();
        let mut full = vec![bin.as_str()];
        full.extend_from_slice(args);
        self.spawn_in(&self.ns_kernel.clone(), &full)
    }

    fn spawn_in(&mut self, ns: &str, program: &[&str]) -> usize {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(program)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {program:?}: {e}"));
        let stdout = Arc::new(Mutex::new(String::new()));
        let pipe = child.stdout.take().expect("stdout piped");
        let sink = Arc::clone(&stdout);
        let reader = std::thread::spawn(move || {
            let mut reader = BufReader::new(pipe);
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                sink.lock().expect("stdout lock").push_str(&line);
                line.clear();
            }
        });
        self.children.push(Proc {
            child,
            stdout,
            reader: Some(reader),
        });
        self.children.len() - 1
    }

    /// Waits for a child to print a line containing `marker` on stdout.
    pub fn wait_for_line(&mut self, index: usize, marker: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let found = self.children[index]
                .stdout
                .lock()
                .expect("stdout lock")
                .lines()
                .find(|l| l.contains(marker))
                .map(str::to_owned);
            if let Some(line) = found {
                return line;
            }
            if Instant::now() >= deadline {
                panic!("no line with {marker:?} within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (bounded) for a child to exit and returns its stdout, stderr and success.
    pub fn wait(&mut self, index: usize, timeout: Duration) -> (String, String, bool) {
        let deadline = Instant::now() + timeout;
        let proc = &mut self.children[index];
        loop {
            if let Some(status) = proc.child.try_wait().expect("try_wait") {
                if let Some(reader) = proc.reader.take() {
                    let _ = reader.join();
                }
                let mut err = String::new();
                if let Some(mut s) = proc.child.stderr.take() {
                    let _ = s.read_to_string(&mut err);
                }
                let out = proc.stdout.lock().expect("stdout lock").clone();
                return (out, err, status.success());
            }
            if Instant::now() >= deadline {
                let _ = proc.child.kill();
                let _ = proc.child.wait();
                let mut err = String::new();
                if let Some(mut s) = proc.child.stderr.take() {
                    let _ = s.read_to_string(&mut err);
                }
                panic!("child {index} did not finish within {timeout:?}; stderr: {err}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for proc in &mut self.children {
            // Only our own children, by PID.
            let _ = proc.child.kill();
            let _ = proc.child.wait();
        }
        for ns in [&self.ns_stack, &self.ns_router, &self.ns_kernel] {
            run_quiet(&["ip", "netns", "del", ns]);
        }
    }
}

/// The last JSON line a netperf run printed.
pub fn json_line(stdout: &str) -> serde_json::Value {
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON line in output: {stdout}"));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("bad JSON {line}: {e}"))
}

/// Python programs for the kernel side (unmodified CPython sockets on kernel TCP).
pub mod py {
    /// Accepts `count` connections; for each, reads to EOF, then closes; prints
    /// `RESULT <bytes> <sha256>` per connection. Prints `READY` once listening.
    pub const SINK_SERVER: &str = r#"
import hashlib, socket, sys
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, port)); s.listen(128); print("READY", flush=True)
for _ in range(count):
    c, _ = s.accept(); h = hashlib.sha256(); n = 0
    while True:
        d = c.recv(1 << 20)
        if not d: break
        h.update(d); n += len(d)
    c.close(); print("RESULT", n, h.hexdigest(), flush=True)
"#;

    /// Echo server: echoes each connection until EOF, `count` connections. Prints `READY`.
    pub const ECHO_SERVER: &str = r#"
import socket, sys
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, port)); s.listen(128); print("READY", flush=True)
for _ in range(count):
    c, _ = s.accept(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        d = c.recv(65536)
        if not d: break
        c.sendall(d)
    c.close()
print("DONE", flush=True)
"#;

    /// Client: `count` connections, each sending `size` pseudo-random bytes, shutting down,
    /// reading to EOF. Prints `RESULT <total> <sha256 of the last connection>`.
    pub const BULK_CLIENT: &str = r#"
import hashlib, random, socket, sys
host, port, size, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(7); block = rng.randbytes(1 << 20); total = 0
for _ in range(count):
    c = socket.create_connection((host, port), timeout=120); h = hashlib.sha256(); left = size
    while left > 0:
        chunk = block[: min(left, len(block))]; c.sendall(chunk); h.update(chunk); left -= len(chunk)
    c.shutdown(socket.SHUT_WR)
    while c.recv(65536): pass
    c.close(); total += size
print("RESULT", total, h.hexdigest(), flush=True)
"#;

    /// Request/response client: `n` round trips of `size` bytes; prints `RESULT <n> <mean_us>`.
    pub const RR_CLIENT: &str = r#"
import socket, sys, time
host, port, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
c = socket.create_connection((host, port), timeout=60)
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
msg = b"q" * size; total = 0.0
for _ in range(n):
    t = time.perf_counter(); c.sendall(msg); got = 0
    while got < size:
        d = c.recv(size - got)
        if not d: raise SystemExit("server closed early")
        got += len(d)
    total += time.perf_counter() - t
c.shutdown(socket.SHUT_WR)
while c.recv(65536): pass
c.close(); print("RESULT", n, int(total / n * 1e6), flush=True)
"#;
}
