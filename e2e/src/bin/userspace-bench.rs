//! The user-space stack behind the shim, measured (not a test: it prints figures and ratios
//! against the issue's targets, met or not). Needs root and a release build:
//!
//! ```sh
//! sudo scripts/bench-userspace.sh        # builds, then runs target/release/userspace-bench
//! ```
//!
//! On the e2e cluster (controller, one agent per node, policy, `stackroute run` with the shim)
//! plus one emulated path: the router's `far0` ─ `stackroute-linkemu` (its own namespace) ─ a
//! far host 198.51.100.10, the same emulation as netstack's benchmark
//! (netstack/netperf/scripts/bench.sh: RATE Mbit/s and DELAY ms each way, a one-BDP queue,
//! random loss on the data path, the emulator under `chrt -f 20`). The plain path is node →
//! zone bridge → router → the internet host, veth only. Three StackRoutes by label:
//! `bench=userspace` → Userspace/BBR (fallback kernel CUBIC), `bench=kbbr` → Kernel/BBR,
//! `bench=kcubic` → Kernel/CUBIC. User-space clients run on node-a1 (where the agent starts
//! the instance), kernel clients and the standalone `stackroute-netperf` (own address
//! 10.0.1.3 on the node's interface) on node-a2, whose interface no packet socket taps; both
//! reach the router over the same bridge.
//!
//! Measured, in one run:
//! - emulated path, per loss rate: iperf3 `-t` under the shim on the user-space stack, on
//!   kernel BBR and on kernel CUBIC (iperf3's receiver figure), and the same bytes sent by a
//!   client that times from the established connection to the peer's close — a Python client
//!   under the shim on the user-space stack and on kernel BBR, and standalone
//!   `stackroute-netperf client --send` (what netstack's benchmark reports);
//! - plain path: iperf3 under the shim on the user-space stack vs kernel CUBIC; 64-byte
//!   request/response round trips (a Python client, under the shim on the user-space stack vs
//!   on the kernel) p50/p99;
//! - instance start: connect-to-established of the first `Userspace` connection of a
//!   namespace (the agent starts the instance) vs the following ones;
//! - scale: `--concurrent` connections open at once from one pod (each echoing a token), then
//!   `--sequential` connections one after another (the client closes first, so each leaves
//!   TIME-WAIT in the instance), with the instance's descriptors and memory and the client's
//!   descriptors sampled as they go.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use serde_json::Value;
use stackroute_e2e::cluster::{
    Cluster, INTERNET, INTERNET_IP, Options, ROUTER, StackInstance, Workload, node,
};
use stackroute_e2e::proc::Proc;
use stackroute_e2e::tools::{is_root, netns_preconditions, which};

#[derive(Parser)]
#[command(about = "user-space stack behind the shim vs kernel TCP vs standalone netperf")]
struct Args {
    /// Seconds per throughput run (iperf3 -t; the send clients move RATE × SECONDS bytes).
    #[arg(long, default_value_t = 10)]
    seconds: u32,
    /// Runs per cell (the median is reported, every run in brackets).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Loss rates of the emulated path.
    #[arg(long, default_value = "0.01,0.05", value_delimiter = ',')]
    losses: Vec<f64>,
    /// Emulated rate each way, Mbit/s.
    #[arg(long, default_value_t = 100)]
    rate_mbit: u32,
    /// Emulated delay each way, ms.
    #[arg(long, default_value_t = 15)]
    delay_ms: u32,
    /// Round trips per request/response run.
    #[arg(long, default_value_t = 5000)]
    round_trips: u32,
    /// Sequential connections per instance-start run (the first starts the instance).
    #[arg(long, default_value_t = 20)]
    connects: u32,
    /// Connections held open at once by one client (scale run).
    #[arg(long, default_value_t = 1000)]
    concurrent: u32,
    /// Sequential connections after them (scale run; 0 skips the run).
    #[arg(long, default_value_t = 100_000)]
    sequential: u32,
    /// Skip the emulated path.
    #[arg(long)]
    skip_emulated: bool,
    /// Skip the plain path.
    #[arg(long)]
    skip_plain: bool,
    /// The node of the kernel clients and the standalone netperf: node-a2 (default; no packet
    /// socket taps its interface) or node-a1 (the user-space clients' node, with the instance).
    #[arg(long, default_value = "node-a2", value_parser = ["node-a1", "node-a2"])]
    kernel_node: String,
}

const FAR_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const IPERF_PORT: u16 = 5201;
const SINK_PORT: u16 = 5301;
const ECHO_PORT: u16 = 5312;
/// The standalone netperf's own address on node-a2's interface (bench.sh does the same).
const NETPERF_ADDR: &str = "10.0.1.3/24";

/// One StackRoute per client kind; all to `External` (both servers are outside the cluster).
fn policy(name: &str, label: &str, transport: &str) -> String {
    format!(
        r#"apiVersion: stackroute.dev/v1alpha1
kind: StackRoute
metadata: {{name: {name}, namespace: e2e}}
spec:
  podSelector: {{matchLabels: {{bench: {label}}}}}
  rules:
  - name: external
    to: [{{entity: World}}]
    location: External
    transport: {transport}
"#
    )
}

/// Reads every connection to EOF and closes it; serves forever (one thread per connection).
const SINK: &str = r#"
import socket, sys, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(64); print("READY", flush=True)
def serve(c):
    while c.recv(1 << 20): pass
    c.close()
while True:
    c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// Echoes every connection (TCP_NODELAY) until EOF; serves forever.
const ECHO: &str = r#"
import socket, sys, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(64); print("READY", flush=True)
def serve(c):
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        d = c.recv(65536)
        if not d: break
        c.sendall(d)
    c.close()
while True:
    c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// bench.sh's `kbbr-send` without the `TCP_CONGESTION` call (policy picks the transport): sends
/// the bytes, shuts down, reads until the peer closes; Mbit/s from the established connection.
const SEND: &str = r#"
import socket, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])))
left = int(sys.argv[3]); block = memoryview(bytes(range(256)) * 4096); t = time.perf_counter()
while left:
    n = c.send(block[:min(left, len(block))]); left -= n
c.shutdown(socket.SHUT_WR)
while c.recv(65536): pass
print("%.3f" % (int(sys.argv[3]) * 8 / (time.perf_counter() - t) / 1e6))
"#;

/// bench.sh's request/response client: 64-byte round trips, µs mean p50 p99.
const RR: &str = r#"
import socket, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])))
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
n = int(sys.argv[3]); lat = []
for _ in range(200):
    c.sendall(b"w" * 64); got = 0
    while got < 64: got += len(c.recv(64 - got))
for _ in range(n):
    t = time.perf_counter(); c.sendall(b"q" * 64); got = 0
    while got < 64: got += len(c.recv(64 - got))
    lat.append(time.perf_counter() - t)
lat.sort(); print(sum(lat) / n * 1e6, lat[n // 2] * 1e6, lat[int(n * 0.99)] * 1e6)
"#;

/// Sequential connections: ms from `connect()` to established (blocking connect returns),
/// one line of figures; each connection sends a byte and reads its echo before closing.
const CONNECTS: &str = r#"
import socket, sys, time
out = []
for _ in range(int(sys.argv[3])):
    t = time.perf_counter()
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])))
    out.append((time.perf_counter() - t) * 1e3)
    c.sendall(b"x"); c.recv(1); c.close()
print(" ".join("%.3f" % x for x in out))
"#;

/// The scale client: N connections at once, each echoing a token, held for two seconds
/// ("held"), then S sequential ones closed by the client first; "progress K" every tenth, the
/// client's descriptors over its idle count at the end.
const SCALE: &str = r#"
import os, resource, socket, sys, time
host, port, n, seq = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, n + 256)), hard))
def fds(): return len(os.listdir("/proc/self/fd"))
def echoed(c, token):
    c.sendall(token); got = b""
    while len(got) < len(token):
        chunk = c.recv(len(token) - len(got))
        if not chunk: break
        got += chunk
    return got == token
w = socket.create_connection((host, port)); echoed(w, b"warm"); w.close()
idle = fds(); t = time.perf_counter()
conns = [socket.create_connection((host, port)) for _ in range(n)]
ok = sum(echoed(c, b"c%d." % i) for i, c in enumerate(conns))
print("held", ok, "%.3f" % (time.perf_counter() - t), flush=True)
time.sleep(2)
for c in conns: c.close()
conns = None; ok = 0; t = time.perf_counter(); step = max(seq // 10, 1)
for i in range(seq):
    c = socket.create_connection((host, port)); ok += echoed(c, b"s%d." % i); c.close()
    if (i + 1) % step == 0: print("progress", i + 1, "%.3f" % (time.perf_counter() - t), flush=True)
print("done", ok, "%.3f" % (time.perf_counter() - t), fds() - idle, flush=True)
"#;

fn main() -> ExitCode {
    let args = Args::parse();
    if !is_root() {
        eprintln!(
            "userspace-bench needs root (network namespaces). Run: sudo scripts/bench-userspace.sh"
        );
        return ExitCode::from(2);
    }
    if let Err(reason) = netns_preconditions() {
        eprintln!("userspace-bench: {reason}");
        return ExitCode::from(2);
    }
    for program in ["iperf3", "python3", "chrt"] {
        if which(program).is_none() {
            eprintln!("userspace-bench: {program} is not installed");
            return ExitCode::from(2);
        }
    }
    install_signal_handler();
    match bench(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("userspace-bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Set by SIGINT/SIGTERM: the next client start fails, and the drop guards remove everything.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

fn install_signal_handler() {
    let _ = std::thread::Builder::new()
        .name("signals".into())
        .spawn(|| {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async {
                use tokio::signal::unix::{SignalKind, signal};
                let (Ok(mut int), Ok(mut term)) = (
                    signal(SignalKind::interrupt()),
                    signal(SignalKind::terminate()),
                ) else {
                    return;
                };
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
                eprintln!("\nuserspace-bench: interrupted — cleaning up");
                INTERRUPTED.store(true, Ordering::Relaxed);
            });
        });
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}

/// A binary next to this one (the same target directory).
fn sibling(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.parent().context("executable directory")?.join(name);
    if !path.is_file() {
        bail!(
            "{} is missing: cargo build --release -p {}",
            path.display(),
            if name == "stackroute-stackd" {
                "stackroute-stackd"
            } else {
                name
            }
        );
    }
    Ok(path)
}

fn python() -> &'static str {
    if std::path::Path::new("/usr/bin/python3").is_file() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

struct Bench<'a> {
    cluster: Cluster,
    args: &'a Args,
    netperf: PathBuf,
    linkemu: PathBuf,
}

/// The client workloads: (pod name, node, label value).
const US_NODE: &str = "node-a1";
/// Where the kernel clients and the standalone netperf run (`--kernel-node`).
static KERNEL_NODE: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();

fn kernel_node() -> &'static str {
    KERNEL_NODE.get().copied().unwrap_or("node-a2")
}
const START_NODE: &str = "node-b1";

fn workload<'a>(name: &'a str, node: &'a str, labels: &'a [&'a str]) -> Workload<'a> {
    Workload { node, name, labels }
}

fn bench(args: &Args) -> Result<()> {
    let _ = KERNEL_NODE.set(node(&args.kernel_node).name);
    let netperf = sibling("stackroute-netperf")?;
    let linkemu = sibling("stackroute-linkemu")?;
    sibling("stackroute-stackd")?;
    println!("# user-space stack behind the shim — building the cluster");
    let mut cluster = Cluster::start(Options::default())?;
    if cluster.bins.shim.is_none() {
        bail!("libnsocket.so is not built: cargo build --release -p nsocket-shim");
    }
    build_far_path(&mut cluster)?;
    for (name, node, label) in [
        ("us", US_NODE, "bench=userspace"),
        ("us-start-a1", US_NODE, "bench=userspace"),
        ("us-start-b1", START_NODE, "bench=userspace"),
        ("kbbr", kernel_node(), "bench=kbbr"),
        ("kcubic", kernel_node(), "bench=kcubic"),
    ] {
        cluster.add_pod(name, node, &[label], false)?;
    }
    cluster.set_policy(
        "bench-userspace.yaml",
        &policy(
            "bench-userspace",
            "userspace",
            "{stack: Userspace, congestionControl: BBR, fallback: [{stack: Kernel, congestionControl: Cubic}]}",
        ),
    )?;
    cluster.set_policy(
        "bench-kbbr.yaml",
        &policy(
            "bench-kbbr",
            "kbbr",
            "{stack: Kernel, congestionControl: BBR}",
        ),
    )?;
    cluster.set_policy(
        "bench-kcubic.yaml",
        &policy(
            "bench-kcubic",
            "kcubic",
            "{stack: Kernel, congestionControl: Cubic}",
        ),
    )?;
    let far = SocketAddr::new(IpAddr::V4(FAR_IP), IPERF_PORT);
    let inet = SocketAddr::new(IpAddr::V4(INTERNET_IP), IPERF_PORT);
    for (node, pod, expected) in [
        (US_NODE, "us", "Userspace/BBR"),
        (US_NODE, "us-start-a1", "Userspace/BBR"),
        (START_NODE, "us-start-b1", "Userspace/BBR"),
        (kernel_node(), "kbbr", "Kernel/BBR"),
        (kernel_node(), "kcubic", "Kernel/Cubic"),
    ] {
        cluster.wait_decision(node, pod, far, expected)?;
        cluster.wait_decision(node, pod, inet, expected)?;
    }

    // Servers: iperf3, a sink and an echo server on both far hosts.
    let py = python();
    let far_ip = FAR_IP.to_string();
    let inet_ip = INTERNET_IP.to_string();
    let mut servers = Vec::new();
    for (host, ip) in [("far", &far_ip), (INTERNET, &inet_ip)] {
        servers.push(cluster.spawn_plain(
            host,
            &format!("iperf3-{host}"),
            &["iperf3", "-s", "-B", ip, "-p", &IPERF_PORT.to_string()],
        )?);
        servers.push(cluster.spawn_plain(
            host,
            &format!("sink-{host}"),
            &[py, "-c", SINK, ip, &SINK_PORT.to_string()],
        )?);
        servers.push(cluster.spawn_plain(
            host,
            &format!("echo-{host}"),
            &[py, "-c", ECHO, ip, &ECHO_PORT.to_string()],
        )?);
        for port in [IPERF_PORT, SINK_PORT, ECHO_PORT] {
            cluster.wait_listening(host, port)?;
        }
    }
    let bench = Bench {
        cluster,
        args,
        netperf,
        linkemu,
    };
    let mut report = Vec::new();
    bench.instance_start(&mut report)?;
    if !args.skip_emulated {
        for &loss in &args.losses {
            bench.emulated(loss, &mut report)?;
        }
    }
    if !args.skip_plain {
        bench.plain(&mut report)?;
    }
    if args.sequential > 0 || args.concurrent > 0 {
        bench.scale(&mut report)?;
    }
    println!("\n# summary");
    for line in &report {
        println!("{line}");
    }
    drop(servers);
    Ok(())
}

/// router `far0` ─ [emu: e0 ─ linkemu ─ e1] ─ far `eth0` 198.51.100.10; the router's
/// 198.51.100.1 is on the same (emulated) segment.
fn build_far_path(cluster: &mut Cluster) -> Result<()> {
    let net = &mut cluster.net;
    net.add_host("emu", "reno")?;
    net.add_host("far", "reno")?;
    net.veth(ROUTER, "far0", "emu", "e0")?;
    net.veth("emu", "e1", "far", "eth0")?;
    net.addr(ROUTER, "far0", "198.51.100.1/24")?;
    net.addr("far", "eth0", &format!("{FAR_IP}/24"))?;
    net.route("far", "default", "198.51.100.1")?;
    for dev in ["e0", "e1"] {
        stackroute_e2e::net::ip(&["-n", &net.ns("emu"), "link", "set", dev, "promisc", "on"])?;
    }
    Ok(())
}

fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn runs(values: &[f64]) -> String {
    values
        .iter()
        .map(|v| format!("{v:.1}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn verdict(ratio: f64, target: f64, higher_is_better: bool) -> String {
    let met = if higher_is_better {
        ratio >= target
    } else {
        ratio <= target
    };
    if met {
        "PASS".into()
    } else if higher_is_better {
        format!("MISS by {:.1} %", (target - ratio) / target * 100.0)
    } else {
        format!("MISS by {:.1} %", (ratio - target) / target * 100.0)
    }
}

/// The user-space instance of `node_name`: (pid, utime + stime in clock ticks).
fn instance_cpu(cluster: &Cluster, node_name: &str) -> Option<(i32, u64)> {
    let instance = cluster
        .stack_instances(node_name)
        .ok()?
        .into_iter()
        .next()?;
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", instance.pid)).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // After the command: state is field 3, utime 14, stime 15 (1-based) → indices 11, 12.
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some((instance.pid, ticks))
}

impl Bench<'_> {
    fn spawn_client(&self, pod: &str, args: &[&str]) -> Result<Proc> {
        check_interrupted()?;
        let (node, label) = match pod {
            "us" | "us-start-a1" => (US_NODE, "bench=userspace"),
            "us-start-b1" => (START_NODE, "bench=userspace"),
            "kbbr" => (kernel_node(), "bench=kbbr"),
            "kcubic" => (kernel_node(), "bench=kcubic"),
            other => bail!("no client {other}"),
        };
        let labels = [label];
        self.cluster
            .spawn(&workload(pod, node, &labels), true, args)
    }

    /// Runs a client to completion; its last output line.
    fn finish(&self, client: Proc, timeout: Duration) -> Result<String> {
        let output = client_output(client, timeout)?;
        Ok(output.trim().lines().last().unwrap_or_default().to_string())
    }

    /// iperf3 -t under the shim as `pod` to `server`: receiver Mbit/s, and the instance's CPU
    /// share meanwhile when `pod` is on the user-space stack.
    fn iperf3(&self, pod: &str, server: IpAddr) -> Result<(f64, Option<f64>)> {
        let seconds = self.args.seconds.to_string();
        let ip = server.to_string();
        let before = instance_cpu(&self.cluster, US_NODE);
        let machine = machine_cpu();
        let started = std::time::Instant::now();
        let client = self.spawn_client(
            pod,
            &[
                "iperf3",
                "-c",
                &ip,
                "-p",
                &IPERF_PORT.to_string(),
                "-t",
                &seconds,
                "-J",
            ],
        )?;
        let output = client_output(
            client,
            Duration::from_secs(u64::from(self.args.seconds) + 60),
        )?;
        let elapsed = started.elapsed().as_secs_f64();
        let cpu = cpu_share(before, instance_cpu(&self.cluster, US_NODE), elapsed);
        println!(
            "#     {pod} iperf3: machine CPU busy {:.0} % (of {} CPUs)",
            machine_busy(machine, machine_cpu()),
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        let json_start = output.find('{').context("iperf3 printed no JSON")?;
        let json: Value = serde_json::from_str(&output[json_start..])
            .with_context(|| format!("iperf3 output: {output}"))?;
        let bps = json["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .with_context(|| format!("iperf3: {output}"))?;
        Ok((bps / 1e6, cpu))
    }

    /// The send client under the shim as `pod`: Mbit/s from established to the peer's close.
    fn send(&self, pod: &str, server: IpAddr, bytes: u64) -> Result<(f64, Option<f64>)> {
        let before = instance_cpu(&self.cluster, US_NODE);
        let started = std::time::Instant::now();
        let client = self.spawn_client(
            pod,
            &[
                python(),
                "-c",
                SEND,
                &server.to_string(),
                &SINK_PORT.to_string(),
                &bytes.to_string(),
            ],
        )?;
        let line = self.finish(client, Duration::from_secs(180))?;
        let cpu = cpu_share(
            before,
            instance_cpu(&self.cluster, US_NODE),
            started.elapsed().as_secs_f64(),
        );
        let mbit = line
            .parse()
            .with_context(|| format!("send client printed {line:?}"))?;
        Ok((mbit, cpu))
    }

    /// Standalone `stackroute-netperf client --send` in node-a2 on its own address.
    fn netperf_send(&self, server: IpAddr, bytes: u64) -> Result<f64> {
        check_interrupted()?;
        let netperf = self.netperf.to_string_lossy().into_owned();
        let connect = format!("{server}:{SINK_PORT}");
        let client = self.cluster.spawn_plain(
            node(kernel_node()).host,
            "netperf-send",
            &[
                &netperf,
                "client",
                "--engine",
                "af_packet",
                "--interface",
                "eth0",
                "--address",
                NETPERF_ADDR,
                "--gateway",
                "10.0.1.254",
                "--connect",
                &connect,
                "--send",
                &bytes.to_string(),
                "--cc",
                "bbr",
                "--no-checksum",
                "--timeout",
                "120",
            ],
        )?;
        let output = client_output(client, Duration::from_secs(180))?;
        let json_line = output
            .lines()
            .rev()
            .find(|l| l.trim_start().starts_with('{'))
            .with_context(|| format!("netperf printed no JSON: {output}"))?;
        let value: Value = serde_json::from_str(json_line)?;
        Ok(value["goodput_bps"].as_f64().context("goodput_bps")? / 1e6)
    }

    fn emulated(&self, loss: f64, report: &mut Vec<String>) -> Result<()> {
        let a = self.args;
        println!(
            "\n# emulated path: {} Mbit/s, {} ms each way (RTT {} ms), one-BDP queue, {:.0} % loss on the data path",
            a.rate_mbit,
            a.delay_ms,
            2 * a.delay_ms,
            loss * 100.0
        );
        let linkemu = self.linkemu.to_string_lossy().into_owned();
        let loss_arg = format!("{loss}");
        let delay = a.delay_ms.to_string();
        let rate = a.rate_mbit.to_string();
        let mut emu = self.cluster.spawn_plain(
            "emu",
            "linkemu",
            &[
                "chrt",
                "-f",
                "20",
                &linkemu,
                "--left",
                "e0",
                "--right",
                "e1",
                "--loss",
                &loss_arg,
                "--delay-ms",
                &delay,
                "--rate-mbit",
                &rate,
            ],
        )?;
        std::thread::sleep(Duration::from_millis(300));
        let far = IpAddr::V4(FAR_IP);
        let bytes = u64::from(a.rate_mbit) * 1_000_000 / 8 * u64::from(a.seconds);
        let mut cells: Vec<(&str, Vec<f64>, Vec<f64>)> = [
            "us-iperf3",
            "kbbr-iperf3",
            "kcubic-iperf3",
            "us-send",
            "kbbr-send",
            "netperf-send",
        ]
        .into_iter()
        .map(|name| (name, Vec::new(), Vec::new()))
        .collect();
        for round in 0..a.repeat.max(1) {
            for cell in &mut cells {
                let (mbit, cpu) = match cell.0 {
                    "us-iperf3" => self.iperf3("us", far)?,
                    "kbbr-iperf3" => self.iperf3("kbbr", far)?,
                    "kcubic-iperf3" => self.iperf3("kcubic", far)?,
                    "us-send" => self.send("us", far, bytes)?,
                    "kbbr-send" => self.send("kbbr", far, bytes)?,
                    _ => (self.netperf_send(far, bytes)?, None),
                };
                println!(
                    "#   round {} {:<14} {mbit:>8.1} Mbit/s{}",
                    round + 1,
                    cell.0,
                    cpu.map(|c| format!("   instance CPU {c:.0} %"))
                        .unwrap_or_default()
                );
                cell.1.push(mbit);
                if let Some(cpu) = cpu {
                    cell.2.push(cpu);
                }
            }
        }
        emu.stop();
        let m = |name: &str| {
            cells
                .iter()
                .find(|c| c.0 == name)
                .map(|c| median(&c.1))
                .unwrap_or(f64::NAN)
        };
        let cell_text = |name: &str| {
            let c = cells.iter().find(|c| c.0 == name).expect("cell");
            let cpu = if c.2.is_empty() {
                String::new()
            } else {
                format!(", instance CPU {:.0} %", median(&c.2))
            };
            format!("{:.1} ({}){cpu}", median(&c.1), runs(&c.1))
        };
        let lines = [
            format!(
                "emulated {:.0}% loss: iperf3 -t {} Mbit/s — user-space {} | kernel BBR {} | kernel CUBIC {}",
                loss * 100.0,
                a.seconds,
                cell_text("us-iperf3"),
                cell_text("kbbr-iperf3"),
                cell_text("kcubic-iperf3")
            ),
            format!(
                "emulated {:.0}% loss: send {} MB, Mbit/s from established to close — user-space under the shim {} | kernel BBR under the shim {} | standalone netperf {}",
                loss * 100.0,
                bytes / 1_000_000,
                cell_text("us-send"),
                cell_text("kbbr-send"),
                cell_text("netperf-send")
            ),
            format!(
                "emulated {:.0}% loss: user-space / kernel BBR (iperf3) {:.3}× [target ≥ 1.0: {}]; user-space / kernel BBR (send) {:.3}×; user-space / standalone netperf (send) {:.3}× [target ≥ 0.95: {}]; user-space / kernel CUBIC {:.1}×",
                loss * 100.0,
                m("us-iperf3") / m("kbbr-iperf3"),
                verdict(m("us-iperf3") / m("kbbr-iperf3"), 1.0, true),
                m("us-send") / m("kbbr-send"),
                m("us-send") / m("netperf-send"),
                verdict(m("us-send") / m("netperf-send"), 0.95, true),
                m("us-iperf3") / m("kcubic-iperf3"),
            ),
        ];
        for line in lines {
            println!("{line}");
            report.push(line);
        }
        Ok(())
    }

    fn plain(&self, report: &mut Vec<String>) -> Result<()> {
        let a = self.args;
        println!(
            "\n# plain path: node → zone bridge → router → internet host, veth only, no emulator"
        );
        let inet = IpAddr::V4(INTERNET_IP);
        let (mut us, mut kernel, mut cpus) = (Vec::new(), Vec::new(), Vec::new());
        let (mut us_rr, mut k_rr) = (Vec::new(), Vec::new());
        for round in 0..a.repeat.max(1) {
            let (mbit, cpu) = self.iperf3("us", inet)?;
            let (kmbit, _) = self.iperf3("kcubic", inet)?;
            println!(
                "#   round {} iperf3 -t {}: user-space {mbit:.0} Mbit/s (instance CPU {:.0} %), kernel CUBIC {kmbit:.0}",
                round + 1,
                a.seconds,
                cpu.unwrap_or(f64::NAN)
            );
            us.push(mbit);
            kernel.push(kmbit);
            cpus.extend(cpu);
            let u = self.rr("us", inet)?;
            let k = self.rr("kcubic", inet)?;
            println!(
                "#   round {} request/response µs mean/p50/p99: user-space {:.0}/{:.0}/{:.0}, kernel {:.0}/{:.0}/{:.0}",
                round + 1,
                u[0],
                u[1],
                u[2],
                k[0],
                k[1],
                k[2]
            );
            us_rr.push(u);
            k_rr.push(k);
        }
        let throughput = median(&us) / median(&kernel);
        let col = |v: &[[f64; 3]], i: usize| v.iter().map(|x| x[i]).collect::<Vec<_>>();
        let p50 = median(&col(&us_rr, 1)) / median(&col(&k_rr, 1));
        let lines = [
            format!(
                "plain: iperf3 -t {} Mbit/s — user-space under the shim {:.0} ({}), instance CPU {:.0} % | kernel CUBIC under the shim {:.0} ({}) — ratio {:.3}× [target ≥ 0.5: {}]",
                a.seconds,
                median(&us),
                runs(&us),
                median(&cpus),
                median(&kernel),
                runs(&kernel),
                throughput,
                verdict(throughput, 0.5, true)
            ),
            format!(
                "plain: request/response 64 B, {} round trips, µs mean/p50/p99 (median of runs) — user-space {:.0}/{:.0}/{:.0} (p50 runs {}; p99 runs {}) | kernel {:.0}/{:.0}/{:.0} (p50 runs {}; p99 runs {}) — p50 ratio {:.2}× [target ≤ 2: {}], p99 ratio {:.2}×",
                a.round_trips,
                median(&col(&us_rr, 0)),
                median(&col(&us_rr, 1)),
                median(&col(&us_rr, 2)),
                runs(&col(&us_rr, 1)),
                runs(&col(&us_rr, 2)),
                median(&col(&k_rr, 0)),
                median(&col(&k_rr, 1)),
                median(&col(&k_rr, 2)),
                runs(&col(&k_rr, 1)),
                runs(&col(&k_rr, 2)),
                p50,
                verdict(p50, 2.0, false),
                median(&col(&us_rr, 2)) / median(&col(&k_rr, 2)),
            ),
        ];
        for line in lines {
            println!("{line}");
            report.push(line);
        }
        Ok(())
    }

    /// The request/response client under the shim as `pod`: [mean, p50, p99] µs.
    fn rr(&self, pod: &str, server: IpAddr) -> Result<[f64; 3]> {
        let client = self.spawn_client(
            pod,
            &[
                python(),
                "-c",
                RR,
                &server.to_string(),
                &ECHO_PORT.to_string(),
                &self.args.round_trips.to_string(),
            ],
        )?;
        let line = self.finish(client, Duration::from_secs(120))?;
        let v: Vec<f64> = line
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        let [mean, p50, p99] = v[..] else {
            bail!("request/response client printed {line:?}");
        };
        Ok([mean, p50, p99])
    }

    /// `--concurrent` connections held at once, then `--sequential` ones, from pod "us" to the
    /// internet host's echo server: the instance's descriptors and memory as they go; then the
    /// same from the kernel pod (at most 20,000 sequential: its TIME-WAIT sockets hold ports).
    fn scale(&self, report: &mut Vec<String>) -> Result<()> {
        let (n, seq) = (self.args.concurrent, self.args.sequential);
        println!("\n# scale: {n} concurrent, then {seq} sequential connections from one pod");
        let instance = self
            .cluster
            .stack_instances(US_NODE)?
            .into_iter()
            .next()
            .context("no instance on node-a1 (the instance-start run makes one)")?;
        let idle = footprint(instance.pid).context("the instance's /proc entry")?;
        let us = self.scale_run("us", n, seq, Some(&instance))?;
        for (line, fds, rss) in &us.samples {
            println!("#   {line:<32} instance: {fds} descriptors, {rss} KiB");
        }
        let kernel_seq = seq.min(20_000);
        println!(
            "# the same on kernel BBR ({kernel_node}, {kernel_seq} sequential)",
            kernel_node = kernel_node()
        );
        let kernel = self.scale_run("kbbr", n, kernel_seq, None)?;
        let held = us.samples.first().map_or((0, 0), |s| (s.1, s.2));
        let progress: Vec<_> = us
            .samples
            .iter()
            .filter(|s| s.0.starts_with("progress"))
            .collect();
        let (first, last) = match (progress.first(), progress.last()) {
            (Some(f), Some(l)) => ((f.1, f.2), (l.1, l.2)),
            _ => ((0, 0), (0, 0)),
        };
        let (us_rate, kernel_rate) = (us.rate(), kernel.rate());
        let lines = [
            format!(
                "scale: {}/{n} concurrent connections echoed in {:.1} s (kernel BBR {:.1} s); the instance had {} ESTABLISHED, {} descriptors, {} KiB (idle: {}, {} KiB)",
                us.held_ok,
                us.held_seconds,
                kernel.held_seconds,
                us.established.unwrap_or(0),
                held.0,
                held.1,
                idle.0,
                idle.1
            ),
            format!(
                "scale: {}/{seq} sequential connections (connect, echo, close) at {us_rate:.0}/s vs kernel BBR {kernel_rate:.0}/s ({:.2}×); instance descriptors {} → {}, RSS {} → {} KiB (first → last tenth); client descriptors leaked: {}",
                us.done_ok,
                us_rate / kernel_rate,
                first.0,
                last.0,
                first.1,
                last.1,
                us.leaked
            ),
        ];
        for line in lines {
            println!("{line}");
            report.push(line);
        }
        Ok(())
    }

    /// One scale client as `pod`; with `instance`, its descriptors and memory at "held" and
    /// at every progress line (polling the client's output), and its ESTABLISHED count.
    fn scale_run(
        &self,
        pod: &str,
        n: u32,
        seq: u32,
        instance: Option<&StackInstance>,
    ) -> Result<ScaleRun> {
        let inet = INTERNET_IP.to_string();
        let mut client = self.spawn_client(
            pod,
            &[
                python(),
                "-c",
                SCALE,
                &inet,
                &ECHO_PORT.to_string(),
                &n.to_string(),
                &seq.to_string(),
            ],
        )?;
        let mut samples: Vec<(String, usize, u64)> = Vec::new();
        let mut established = None;
        let mut seen = 0;
        let deadline = std::time::Instant::now() + Duration::from_secs(u64::from(seq) / 50 + 300);
        loop {
            check_interrupted()?;
            let output = client.output();
            let lines: Vec<&str> = output.lines().collect();
            for line in &lines[seen.min(lines.len())..] {
                let Some(instance) = instance else { break };
                let words: Vec<&str> = line.split_whitespace().collect();
                if matches!(words.first(), Some(&"held" | &"progress" | &"done")) {
                    let (fds, rss) = footprint(instance.pid).unwrap_or_default();
                    if words[0] == "held" {
                        let relayed = self
                            .cluster
                            .stack_connections(node(US_NODE).host, instance)?;
                        established = Some(
                            relayed
                                .iter()
                                .filter(|c| c["tcpState"] == "ESTABLISHED")
                                .count(),
                        );
                    }
                    samples.push((line.to_string(), fds, rss));
                }
            }
            seen = lines.len();
            if !client.running() || std::time::Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let output = client.success(Duration::from_secs(1))?;
        let field = |prefix: &str, index: usize| -> Option<f64> {
            output
                .lines()
                .find(|l| l.starts_with(prefix))?
                .split_whitespace()
                .nth(index)?
                .parse()
                .ok()
        };
        let (Some(held_ok), Some(held_seconds), Some(done_ok), Some(done_seconds), Some(leaked)) = (
            field("held", 1),
            field("held", 2),
            field("done", 1),
            field("done", 2),
            field("done", 3),
        ) else {
            bail!("the scale client ({pod}) printed {output:?}");
        };
        Ok(ScaleRun {
            held_ok: held_ok as u64,
            held_seconds,
            done_ok: done_ok as u64,
            done_seconds,
            sequential: seq,
            leaked: leaked as i64,
            samples,
            established,
        })
    }

    /// The first Userspace connection of node-b1's and node-a1's namespaces (no instance yet)
    /// and the following ones: ms from connect() to established.
    fn instance_start(&self, report: &mut Vec<String>) -> Result<()> {
        println!("\n# instance start: sequential connections to the internet host's echo server");
        let inet = INTERNET_IP.to_string();
        let mut firsts = Vec::new();
        let mut rest = Vec::new();
        let mut engines = Vec::new();
        for (pod, node_name) in [("us-start-b1", START_NODE), ("us-start-a1", US_NODE)] {
            if !self.cluster.stack_instances(node_name)?.is_empty() {
                bail!(
                    "{node_name} already has an instance: the first connection would not start one"
                );
            }
            let client = self.spawn_client(
                pod,
                &[
                    python(),
                    "-c",
                    CONNECTS,
                    &inet,
                    &ECHO_PORT.to_string(),
                    &self.args.connects.to_string(),
                ],
            )?;
            let line = self.finish(client, Duration::from_secs(60))?;
            let ms: Vec<f64> = line
                .split_whitespace()
                .filter_map(|w| w.parse().ok())
                .collect();
            let instances = self.cluster.stack_instances(node_name)?;
            if ms.len() < 2 || instances.is_empty() {
                bail!("{pod}: {line:?}, and no instance on {node_name}");
            }
            engines.extend(instances.into_iter().map(|i| i.engine));
            println!(
                "#   {node_name}: first {:.2} ms, then median {:.3} ms (max {:.3}) over {}",
                ms[0],
                median(&ms[1..]),
                ms[1..].iter().copied().fold(0.0, f64::max),
                ms.len() - 1
            );
            firsts.push(ms[0]);
            rest.extend_from_slice(&ms[1..]);
        }
        let line = format!(
            "instance start: first Userspace connect of a namespace {} ms (node-b1, node-a1; packet engine {}); later connects median {:.3} ms, p99 {:.3} ms ({} connections)",
            firsts
                .iter()
                .map(|v| format!("{v:.1}"))
                .collect::<Vec<_>>()
                .join(", "),
            engines.join(", "),
            median(&rest),
            percentile(&rest, 0.99),
            rest.len()
        );
        println!("{line}");
        report.push(line);
        Ok(())
    }
}

/// What one scale client reported (and, for the user-space one, what was sampled).
struct ScaleRun {
    held_ok: u64,
    held_seconds: f64,
    done_ok: u64,
    done_seconds: f64,
    sequential: u32,
    leaked: i64,
    /// (client line, instance descriptors, instance RSS KiB).
    samples: Vec<(String, usize, u64)>,
    established: Option<usize>,
}

impl ScaleRun {
    /// Sequential connections per second.
    fn rate(&self) -> f64 {
        f64::from(self.sequential) / self.done_seconds
    }
}

/// A process's open descriptors and resident memory (KiB).
fn footprint(pid: i32) -> Option<(usize, u64)> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some((fds, rss))
}

fn percentile(values: &[f64], q: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(((v.len() as f64 - 1.0) * q).round() as usize)
        .copied()
        .unwrap_or(f64::NAN)
}

/// Waits for the client (polling, so that an interruption stops it) and returns its output.
fn client_output(mut client: Proc, timeout: Duration) -> Result<String> {
    let deadline = std::time::Instant::now() + timeout;
    while client.running() && std::time::Instant::now() < deadline {
        if INTERRUPTED.load(Ordering::Relaxed) {
            client.stop();
            bail!("interrupted");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    client.success(Duration::from_secs(1))
}

/// The machine's CPU counters (`/proc/stat`, all CPUs): (busy, total) jiffies.
fn machine_cpu() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: u64 = fields.iter().take(8).sum();
    // idle + iowait are not busy.
    let idle = fields.get(3)? + fields.get(4)?;
    Some((total - idle, total))
}

/// Percent of the machine's CPU time that was busy between two readings.
fn machine_busy(before: Option<(u64, u64)>, after: Option<(u64, u64)>) -> f64 {
    match (before, after) {
        (Some(b), Some(a)) if a.1 > b.1 => (a.0 - b.0) as f64 / (a.1 - b.1) as f64 * 100.0,
        _ => f64::NAN,
    }
}

/// CPU share (percent of one core) between two readings `elapsed` seconds apart.
fn cpu_share(before: Option<(i32, u64)>, after: Option<(i32, u64)>, elapsed: f64) -> Option<f64> {
    let (before, after) = (before?, after?);
    if before.0 != after.0 || elapsed <= 0.0 {
        return None;
    }
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((after.1 - before.1) as f64 / ticks / elapsed * 100.0)
}
