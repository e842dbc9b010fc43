//! The stackroute demo: one iperf3 server in the cluster, one on the internet, and three client
//! pods on three kinds of path — same node, same zone, and an internet path with a rate limit,
//! a wide-area delay and random loss. First without policy (every connection gets the
//! installation default, kernel CUBIC), then with a StackRoute that picks kernel BBR for the
//! internet path, then with the internet rule changed to the user-space stack with BBR. The
//! stack of each connection is read from outside the application: the kernel's `ss -tin` for
//! kernel connections; for the user-space run, the stack instance's own report (`Connections`
//! on its control socket) — and `ss` showing no kernel TCP socket for the flow. Needs root. Run
//! it with `scripts/demo.sh` as root (`--output json` for the runs as JSON).

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use serde_json::{Value, json};
use stackroute_e2e::cluster::{Cluster, INTERNET, INTERNET_IP, Options, Workload, node};
use stackroute_e2e::net::Impairment;
use stackroute_e2e::ss;
use stackroute_e2e::tools::{is_root, netns_preconditions, which};

#[derive(Parser)]
#[command(about = "stackroute demo: per-path transport choice, measured")]
struct Args {
    /// Seconds each internet client sends (iperf3 -t): the receiver's rate over a fixed time
    /// is the same measure for every stack, whatever each one buffers when the client stops.
    #[arg(long, default_value_t = 5)]
    seconds: u32,
    /// Bytes each in-cluster client sends (fast paths: more bytes for a measurable time).
    #[arg(long, default_value = "1G")]
    cluster_size: String,
    /// Random loss on the internet link (probability per packet).
    #[arg(long, default_value_t = 0.01)]
    loss: f64,
    /// Rate limit of the internet link, Mbit/s.
    #[arg(long, default_value_t = 50)]
    rate_mbit: u32,
    /// One-way delay on the internet path, ms (the round-trip time it adds).
    #[arg(long, default_value_t = 40)]
    delay_ms: u32,
    /// Runs of each measurement (the table shows the median).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Only measure the internet path with iperf3 -C cubic and -C bbr, no shim and no policy
    /// (checks that the link shows BBR's advantage before the demo relies on it).
    #[arg(long)]
    calibrate: bool,
    /// `text` (the tables) or `json` (the runs as a JSON array on stdout; progress on stderr).
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    output: String,
    /// Skip the third run (the internet path on the user-space stack).
    #[arg(long)]
    no_userspace: bool,
    /// Skip the fourth run (a statically linked uploader, which the shim cannot reach, on the
    /// internet path under the agent's kernel hook).
    #[arg(long)]
    no_kernel_hook: bool,
}

/// Set with `--output json`: progress goes to stderr, stdout carries only the JSON.
static JSON: AtomicBool = AtomicBool::new(false);

/// Prints a progress or table line: to stdout, or to stderr with `--output json`.
macro_rules! say {
    ($($arg:tt)*) => {
        if JSON.load(Ordering::Relaxed) {
            eprintln!($($arg)*);
        } else {
            println!($($arg)*);
        }
    };
}

/// Set by SIGINT/SIGTERM.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// The installation default of this cluster, in force in both halves: kernel CUBIC everywhere,
/// as on a stock Linux host. (A network namespace can only default to an algorithm in
/// `tcp_allowed_congestion_control`, which this machine limits to reno and bbr, so the hosts
/// themselves default to reno: a connection the shim did not handle shows as `reno`.)
const BASELINE: &str = r#"apiVersion: stackroute.dev/v1alpha1
kind: ClusterStackRoute
metadata: {name: installation-default}
spec:
  tier: Baseline
  priority: 1000
  subject: {namespaces: {}}
  rules:
  - name: everything
    transport: {stack: Kernel, congestionControl: Cubic}
"#;

/// The policy of the second half.
const POLICY: &str = r#"# The demo's StackRoute: kernel CUBIC inside the cluster, kernel BBR to the internet.
apiVersion: stackroute.dev/v1alpha1
kind: StackRoute
metadata: {name: demo-paths, namespace: e2e}
spec:
  podSelector: {matchLabels: {app: client}}
  rules:
  - name: same-node
    to: [{pods: {podSelector: {}}}]
    location: SameNode
    transport: {stack: Kernel, congestionControl: Cubic}
  - name: same-zone
    to: [{pods: {podSelector: {}}}]
    location: SameZone
    transport: {stack: Kernel, congestionControl: Cubic}
  - name: internet
    to: [{entity: World}]
    location: External
    transport: {stack: Kernel, congestionControl: BBR}
"#;

/// The policy of the third run: the same StackRoute with the internet rule on the user-space
/// stack (BBR), the kernel with CUBIC as its fallback.
const POLICY_USERSPACE: &str = r#"# The demo's StackRoute, third run: the internet path on the user-space stack.
apiVersion: stackroute.dev/v1alpha1
kind: StackRoute
metadata: {name: demo-paths, namespace: e2e}
spec:
  podSelector: {matchLabels: {app: client}}
  rules:
  - name: same-node
    to: [{pods: {podSelector: {}}}]
    location: SameNode
    transport: {stack: Kernel, congestionControl: Cubic}
  - name: same-zone
    to: [{pods: {podSelector: {}}}]
    location: SameZone
    transport: {stack: Kernel, congestionControl: Cubic}
  - name: internet
    to: [{entity: World}]
    location: External
    transport:
      stack: Userspace
      congestionControl: BBR
      fallback: [{stack: Kernel, congestionControl: Cubic}]
"#;

struct Path {
    label: &'static str,
    internet: bool,
    client: &'static str,
    node: &'static str,
    server: SocketAddr,
}

#[derive(Clone, Default)]
struct Measurement {
    seconds: f64,
    mbit: f64,
    retransmits: u64,
    /// What the server received (iperf3's `sum_received.bytes`).
    bytes_received: u64,
    cc: String,
    /// The user-space run's evidence: what the instance reported and what `ss` saw.
    userspace: Option<UserspaceReport>,
}

#[derive(Clone, Default)]
struct UserspaceReport {
    /// Payload bytes the instance sent on the run's connections.
    bytes_sent: u64,
    /// Its largest smoothed RTT among them, µs.
    smoothed_rtt_us: u64,
    /// How many connections of the run it reported.
    connections: usize,
    /// How many times `ss -tan` in the client's node was sampled (each showed no socket).
    ss_samples: usize,
}

/// The internet host's receiver for the static uploader: reads until end of file, answers the
/// byte count.
const SINK: &str = r#"
import socket, threading
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 5301))
s.listen(16)
def serve(c):
    n = 0
    while True:
        b = c.recv(1 << 16)
        if not b:
            break
        n += len(b)
    c.sendall(b"%d\n" % n)
    c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// The sink's port on the internet host.
const SINK_PORT: u16 = 5301;

/// How a run's stack is read from outside the application.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Observe {
    /// `ss -tin` in the client's node: the kernel's congestion control per connection.
    Kernel,
    /// The node's user-space stack instance (`Connections`), and `ss -tan` showing nothing.
    Userspace,
}

fn main() -> ExitCode {
    let args = Args::parse();
    JSON.store(args.output == "json", Ordering::Relaxed);
    if !is_root() {
        eprintln!(
            "stackroute-demo needs root: it creates network namespaces, veth pairs, a bridge, tc and iptables rules (all removed at exit). Run scripts/demo.sh as root"
        );
        return ExitCode::from(2);
    }
    if let Err(reason) = netns_preconditions() {
        eprintln!("stackroute-demo: {reason}");
        return ExitCode::from(2);
    }
    if which("iperf3").is_none() {
        eprintln!("stackroute-demo: iperf3 is not installed (Debian: apt-get install iperf3)");
        return ExitCode::from(2);
    }
    if !args.no_userspace && !args.calibrate && which("python3").is_none() {
        eprintln!(
            "stackroute-demo: python3 is not installed (it asks the user-space stack instance for its connections; Debian: apt-get install python3), or use --no-userspace"
        );
        return ExitCode::from(2);
    }
    // Ctrl-C: stop measuring, let the cluster's drop guards clean up, exit.
    install_sigint();
    match demo(&args, &INTERRUPTED) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("stackroute-demo: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// SIGINT/SIGTERM set `flag` instead of killing the process, so the measurement loop stops and
/// the cluster's drop guards remove everything (the children get the terminal's SIGINT too).
fn install_sigint() {
    let flag = &INTERRUPTED;
    let _ = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
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
                eprintln!("\nstackroute-demo: interrupted — cleaning up");
                flag.store(true, Ordering::Relaxed);
            });
        });
}

fn demo(args: &Args, interrupted: &AtomicBool) -> Result<()> {
    say!("stackroute demo — building the cluster: 3 nodes in 2 zones, a router, an internet host");
    say!(
        "  internet link: {} Mbit/s, {:.1} % random loss, +{} ms delay",
        args.rate_mbit,
        args.loss * 100.0,
        args.delay_ms
    );
    let mut cluster = Cluster::start(Options {
        default_cc: "reno",
        internet: Impairment {
            loss: args.loss,
            rate_mbit: Some(args.rate_mbit),
        },
        internet_delay_ms: args.delay_ms,
        control_plane: !args.calibrate,
        agent_args: Vec::new(),
        agent_env: Vec::new(),
    })?;
    let server_ip = cluster
        .add_pod("server", "node-a1", &["app=server"], true)?
        .context("server address")?;
    let in_cluster = SocketAddr::new(IpAddr::V4(server_ip), 5201);
    let internet = SocketAddr::new(IpAddr::V4(INTERNET_IP), 5201);
    let _servers = [
        cluster.spawn_plain(
            "a1",
            "iperf3-server-cluster",
            &["iperf3", "-s", "-B", &server_ip.to_string(), "-p", "5201"],
        )?,
        cluster.spawn_plain(
            INTERNET,
            "iperf3-server-internet",
            &["iperf3", "-s", "-p", "5201"],
        )?,
    ];
    cluster.wait_listening("a1", 5201)?;
    cluster.wait_listening(INTERNET, 5201)?;

    if args.calibrate {
        return calibrate(&cluster, args, internet, interrupted);
    }
    let Some(shim) = cluster.bins.shim.clone() else {
        bail!(
            "libnsocket.so is not built (looked for $STACKROUTE_SHIM, then next to the binaries): build it with `cargo build --release -p nsocket-shim`"
        );
    };
    say!("  shim: {}", shim.display());

    let paths = [
        Path {
            label: "same node",
            internet: false,
            client: "client-same-node",
            node: "node-a1",
            server: in_cluster,
        },
        Path {
            label: "same zone",
            internet: false,
            client: "client-same-zone",
            node: "node-a2",
            server: in_cluster,
        },
        Path {
            label: "internet",
            internet: true,
            client: "client-internet",
            node: "node-b1",
            server: internet,
        },
    ];
    for path in &paths {
        cluster.add_pod(path.client, path.node, &["app=client"], false)?;
    }
    cluster.set_policy("installation-default.yaml", BASELINE)?;
    for path in &paths {
        cluster.wait_decision(path.node, path.client, path.server, "Kernel/Cubic")?;
    }

    say!(
        "\n1) without policy: only the installation default (ClusterStackRoute installation-default, Baseline tier: kernel CUBIC)"
    );
    let mut before = Vec::new();
    for path in &paths {
        before.push(measure(&cluster, args, path, Observe::Kernel, interrupted)?);
    }

    say!("\n2) with StackRoute e2e/demo-paths (CUBIC in the cluster, kernel BBR to the internet)");
    cluster.set_policy("demo-policy.yaml", POLICY)?;
    let expected = ["Kernel/Cubic", "Kernel/Cubic", "Kernel/BBR"];
    for (path, expected) in paths.iter().zip(expected) {
        cluster.wait_decision(path.node, path.client, path.server, expected)?;
    }
    let mut after = Vec::new();
    for path in &paths {
        after.push(measure(&cluster, args, path, Observe::Kernel, interrupted)?);
    }

    let internet_path = &paths[2];
    let userspace = if args.no_userspace {
        None
    } else {
        say!(
            "\n3) StackRoute e2e/demo-paths changed: the internet rule on the user-space stack (Userspace/BBR, fallback kernel CUBIC)"
        );
        cluster.set_policy("demo-policy.yaml", POLICY_USERSPACE)?;
        cluster.wait_decision(
            internet_path.node,
            internet_path.client,
            internet_path.server,
            "Userspace/BBR",
        )?;
        Some(measure(
            &cluster,
            args,
            internet_path,
            Observe::Userspace,
            interrupted,
        )?)
    };

    let hooked = if args.no_kernel_hook {
        None
    } else if which("gcc").is_none() {
        say!("\n4) skipped: gcc is not installed (it builds the static uploader)");
        None
    } else {
        say!(
            "\n4) the internet rule back on kernel BBR; a statically linked uploader (no LD_PRELOAD reaches it, as none reaches a Go program) under the agent's kernel hook"
        );
        cluster.set_policy("demo-policy.yaml", POLICY)?;
        cluster.wait_decision(
            internet_path.node,
            internet_path.client,
            internet_path.server,
            "Kernel/BBR",
        )?;
        Some(measure_static(&cluster, args, internet_path, interrupted)?)
    };

    print_tables(
        args,
        &paths,
        &before,
        &after,
        userspace.as_ref(),
        hooked.as_ref(),
    );
    if JSON.load(Ordering::Relaxed) {
        let mut runs = Vec::new();
        let kernel = |path: &Path, m: &Measurement, policy: &str| {
            json!({
                "path": path.label,
                "client": format!("{} ({})", path.client, path.node),
                "server": path.server.to_string(),
                "policy": policy,
                "stack": "kernel",
                "congestionControl": m.cc,
                "seconds": round3(m.seconds),
                "mbitPerSecond": round3(m.mbit),
                "retransmits": m.retransmits,
                "observedBy": "ss -tin",
            })
        };
        for (path, m) in paths.iter().zip(&before) {
            runs.push(kernel(path, m, "installation-default"));
        }
        for (path, m) in paths.iter().zip(&after) {
            runs.push(kernel(path, m, "demo-paths"));
        }
        if let Some(m) = &userspace {
            let report = m.userspace.clone().unwrap_or_default();
            runs.push(json!({
                "path": internet_path.label,
                "client": format!("{} ({})", internet_path.client, internet_path.node),
                "server": internet_path.server.to_string(),
                "policy": "demo-paths (internet: Userspace)",
                "stack": "userspace",
                "congestionControl": m.cc,
                "seconds": round3(m.seconds),
                "mbitPerSecond": round3(m.mbit),
                "retransmits": m.retransmits,
                "observedBy": "stack instance Connections; ss -tan: no kernel socket",
                "bytesSent": report.bytes_sent,
                "smoothedRttUs": report.smoothed_rtt_us,
                "kernelSocketSamples": report.ss_samples,
            }));
        }
        if let Some(m) = &hooked {
            runs.push(json!({
                "path": internet_path.label,
                "client": format!("static uploader as {} ({})", internet_path.client, internet_path.node),
                "server": SocketAddr::new(internet_path.server.ip(), SINK_PORT).to_string(),
                "policy": "demo-paths",
                "stack": "kernel (kernel hook)",
                "congestionControl": m.cc,
                "seconds": round3(m.seconds),
                "mbitPerSecond": round3(m.mbit),
                "observedBy": "ss -tin",
            }));
        }
        println!("{}", serde_json::to_string_pretty(&Value::Array(runs))?);
    }
    Ok(())
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn print_tables(
    args: &Args,
    paths: &[Path],
    before: &[Measurement],
    after: &[Measurement],
    userspace: Option<&Measurement>,
    hooked: Option<&Measurement>,
) {
    say!(
        "\n{:<10} {:<15} {:<18}│ {:^26} │ {:^26} │ {:>8}",
        "path",
        "client (node)",
        "server",
        "without policy",
        "with StackRoute",
        "speed-up"
    );
    say!(
        "{:<10} {:<15} {:<18}│ {:<6} {:>7} {:>11} │ {:<6} {:>7} {:>11} │",
        "",
        "",
        "",
        "cc",
        "time",
        "Mbit/s",
        "cc",
        "time",
        "Mbit/s"
    );
    for ((path, a), b) in paths.iter().zip(before).zip(after) {
        say!(
            "{:<10} {:<15} {:<18}│ {:<6} {:>6.2}s {:>11.1} │ {:<6} {:>6.2}s {:>11.1} │ {:>7.2}×{}",
            path.label,
            format!(
                "{} ({})",
                path.client.trim_start_matches("client-"),
                node(path.node).host
            ),
            path.server.to_string(),
            a.cc,
            a.seconds,
            a.mbit,
            b.cc,
            b.seconds,
            b.mbit,
            b.mbit / a.mbit,
            if a.cc == b.cc {
                "  (same cc both times: noise)"
            } else {
                ""
            }
        );
    }
    say!(
        "\ncc: the congestion control the kernel reported for the client's connections (ss -tin in its node), read outside the application.\ntime, Mbit/s: iperf3's receiver-side figures for {} in the cluster (-n), {} s over the internet (-t); median of {} runs by throughput; speed-up: Mbit/s with / Mbit/s without.\nretransmits on the internet path without/with policy: {}/{}.",
        args.cluster_size,
        args.seconds,
        args.runs,
        before[2].retransmits,
        after[2].retransmits
    );

    if userspace.is_none() && hooked.is_none() {
        return;
    }
    let path = &paths[2];
    say!(
        "\nthe internet path three ways: {} → {}, {} Mbit/s, {:.1} % loss, +{} ms; iperf3 -t {} under the shim, median of {}",
        node(path.node).name,
        path.server,
        args.rate_mbit,
        args.loss * 100.0,
        args.delay_ms,
        args.seconds,
        args.runs
    );
    say!(
        "{:<4} {:<11} {:<6} {:>7} {:>8} {:>9} {:>8}  read from outside the application",
        "run",
        "stack",
        "cc",
        "time",
        "Mbit/s",
        "speed-up",
        "retrans"
    );
    let base = before[2].mbit;
    let ss_in = format!("ss -tin in node {}", node(path.node).host);
    let mut rows = vec![
        ("1", "kernel", &before[2], ss_in.clone()),
        ("2", "kernel", &after[2], ss_in.clone()),
    ];
    if let Some(us) = userspace {
        let report = us.userspace.clone().unwrap_or_default();
        rows.push((
            "3",
            "userspace",
            us,
            format!(
                "the node's stack instance (Connections): {} connection(s), {:.1} MB sent, srtt {:.0} ms; ss -tan: no kernel TCP socket to the server in {} samples",
                report.connections,
                report.bytes_sent as f64 / 1e6,
                report.smoothed_rtt_us as f64 / 1e3,
                report.ss_samples
            ),
        ));
    }
    if let Some(hooked) = hooked {
        rows.push((
            "4",
            "kernel-hook",
            hooked,
            format!("{ss_in}; a static uploader the shim cannot reach, under the kernel hook"),
        ));
    }
    for (run, stack, m, from) in rows {
        let retransmits = if stack == "kernel-hook" {
            "-".to_string()
        } else {
            m.retransmits.to_string()
        };
        say!(
            "{:<4} {:<11} {:<6} {:>6.2}s {:>8.1} {:>8.2}× {:>8}  {}",
            run,
            stack,
            m.cc,
            m.seconds,
            m.mbit,
            m.mbit / base,
            retransmits,
            from
        );
    }
    say!(
        "speed-up: Mbit/s of the run / Mbit/s of run 1 (kernel CUBIC). Retransmits: iperf3's for kernel runs, the instance's for the user-space run; not counted for the static uploader (-)."
    );
}

/// Measures `path` `args.runs` times with the current policy; the median run.
fn measure(
    cluster: &Cluster,
    args: &Args,
    path: &Path,
    observe: Observe,
    interrupted: &AtomicBool,
) -> Result<Measurement> {
    let mut runs = Vec::new();
    for _ in 0..args.runs.max(1) {
        if interrupted.load(Ordering::Relaxed) {
            bail!("interrupted");
        }
        let amount = if path.internet {
            ["-t".to_string(), args.seconds.to_string()]
        } else {
            ["-n".to_string(), args.cluster_size.clone()]
        };
        let workload = Workload {
            node: path.node,
            name: path.client,
            labels: &["app=client"],
        };
        let start = |extra: &[&str]| {
            let mut argv = vec![
                "iperf3".to_string(),
                "-c".into(),
                path.server.ip().to_string(),
            ];
            argv.extend([
                "-p".into(),
                path.server.port().to_string(),
                amount[0].clone(),
                amount[1].clone(),
                "-J".into(),
            ]);
            argv.extend(extra.iter().map(|s| s.to_string()));
            let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
            cluster.spawn(&workload, true, &argv)
        };
        let host = node(path.node).host;
        runs.push(match observe {
            Observe::Kernel => iperf3(cluster, path.server, host, start)?,
            Observe::Userspace => iperf3_userspace(cluster, path, start)?,
        });
    }
    let m = median(runs);
    say!(
        "   {:<10} {:<6} {:>7.2} s {:>8.1} Mbit/s",
        path.label,
        m.cc,
        m.seconds,
        m.mbit
    );
    Ok(m)
}

/// The static uploader on `path` (to the internet host's sink) under `stackroute run`, which
/// attaches the agent's kernel hook for it; `args.runs` times, the median run. The congestion
/// control is what `ss -tin` in the client's node shows.
fn measure_static(
    cluster: &Cluster,
    args: &Args,
    path: &Path,
    interrupted: &AtomicBool,
) -> Result<Measurement> {
    let source = concat!(env!("CARGO_MANIFEST_DIR"), "/programs/static_upload.c");
    let binary = cluster.dir().join("static_upload");
    let built = std::process::Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(&binary)
        .arg(source)
        .status()
        .context("gcc (the static uploader needs gcc and a static libc)")?;
    if !built.success() {
        bail!("gcc -static {source} failed");
    }
    let _sink = cluster.spawn_plain(INTERNET, "sink", &["python3", "-c", SINK])?;
    cluster.wait_listening(INTERNET, SINK_PORT)?;
    let sink = SocketAddr::new(path.server.ip(), SINK_PORT);
    let workload = Workload {
        node: path.node,
        name: path.client,
        labels: &["app=client"],
    };
    let host = node(path.node).host;
    let mut runs = Vec::new();
    for _ in 0..args.runs.max(1) {
        if interrupted.load(Ordering::Relaxed) {
            bail!("interrupted");
        }
        let mut seen = BTreeSet::new();
        let binary = binary.to_string_lossy();
        let ip = sink.ip().to_string();
        let port = SINK_PORT.to_string();
        let seconds = args.seconds.to_string();
        let mut client = cluster.spawn(&workload, true, &[&binary, &ip, &port, &seconds])?;
        while client.running() {
            if INTERRUPTED.load(Ordering::Relaxed) {
                client.stop();
                bail!("interrupted");
            }
            if let Ok(conns) = ss::connections_to(&cluster.net, host, sink) {
                seen.extend(
                    conns
                        .into_iter()
                        .map(|c| c.cc.unwrap_or_else(|| "?".into())),
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let output = client.success(Duration::from_secs(120))?;
        if !output.contains("kernel hook applies") {
            bail!("stackroute run attached no kernel hook for the static uploader:\n{output}");
        }
        let line = output
            .lines()
            .find(|l| l.starts_with("bytes "))
            .with_context(|| format!("the uploader printed no result:\n{output}"))?;
        let fields: Vec<&str> = line.split_whitespace().collect();
        let bytes: f64 = fields
            .get(1)
            .and_then(|f| f.parse().ok())
            .context("bytes")?;
        let seconds: f64 = fields
            .get(3)
            .and_then(|f| f.parse().ok())
            .context("seconds")?;
        runs.push(Measurement {
            seconds,
            mbit: bytes * 8.0 / seconds / 1e6,
            bytes_received: bytes as u64,
            cc: if seen.is_empty() {
                "?".into()
            } else {
                seen.into_iter().collect::<Vec<_>>().join("+")
            },
            ..Measurement::default()
        });
    }
    let m = median(runs);
    say!(
        "   {:<10} {:<6} {:>7.2} s {:>8.1} Mbit/s  (static uploader, kernel hook)",
        path.label,
        m.cc,
        m.seconds,
        m.mbit
    );
    Ok(m)
}

fn calibrate(
    cluster: &Cluster,
    args: &Args,
    server: SocketAddr,
    interrupted: &AtomicBool,
) -> Result<()> {
    say!("calibration: iperf3 -C from node-b1 to the internet host, no shim, no policy");
    for _ in 0..args.runs.max(1) {
        for cc in ["cubic", "bbr"] {
            if interrupted.load(Ordering::Relaxed) {
                bail!("interrupted");
            }
            let m = iperf3(cluster, server, "b1", |_| {
                let ip = server.ip().to_string();
                let seconds = args.seconds.to_string();
                cluster.spawn_plain(
                    "b1",
                    "iperf3-calibrate",
                    &[
                        "iperf3", "-c", &ip, "-p", "5201", "-t", &seconds, "-J", "-C", cc,
                    ],
                )
            })?;
            say!(
                "   {cc:<6} {:>7.2} s {:>8.1} Mbit/s {:>6} retransmits (ss saw {})",
                m.seconds,
                m.mbit,
                m.retransmits,
                m.cc
            );
        }
    }
    Ok(())
}

/// Runs one iperf3 client (started by `start`), sampling `ss` in `host` meanwhile.
fn iperf3(
    cluster: &Cluster,
    server: SocketAddr,
    host: &str,
    start: impl FnOnce(&[&str]) -> Result<stackroute_e2e::proc::Proc>,
) -> Result<Measurement> {
    let seen = Arc::new(Mutex::new(BTreeSet::new()));
    let mut client = start(&[])?;
    while client.running() {
        if INTERRUPTED.load(Ordering::Relaxed) {
            client.stop();
            bail!("interrupted");
        }
        if let Ok(conns) = ss::connections_to(&cluster.net, host, server) {
            let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
            seen.extend(
                conns
                    .into_iter()
                    .map(|c| c.cc.unwrap_or_else(|| "?".into())),
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut m = iperf3_result(&client.success(Duration::from_secs(300))?)?;
    let seen = seen.lock().unwrap_or_else(|e| e.into_inner());
    m.cc = if seen.is_empty() {
        "?".into()
    } else {
        seen.iter().cloned().collect::<Vec<_>>().join("+")
    };
    Ok(m)
}

/// Runs one iperf3 client on the user-space stack: meanwhile `ss -tan` in the client's node
/// must never show a kernel TCP socket to the server; afterwards the node's stack instance must
/// report the run's connections to the server, with BBR and at least what the server received.
fn iperf3_userspace(
    cluster: &Cluster,
    path: &Path,
    start: impl FnOnce(&[&str]) -> Result<stackroute_e2e::proc::Proc>,
) -> Result<Measurement> {
    let host = node(path.node).host;
    // Connections the instance already reported (earlier runs) are not this run's.
    let known = match cluster.stack_instances(path.node)?.first() {
        Some(instance) => cluster
            .stack_connections(host, instance)?
            .iter()
            .filter_map(|c| c["id"].as_u64())
            .max()
            .unwrap_or(0),
        None => 0,
    };
    // The kernel runs before this one left TIME-WAIT sockets to the same server: only a
    // socket that was not there before counts.
    let local = |line: &str| line.split_whitespace().nth(3).map(str::to_string);
    let earlier: BTreeSet<String> = ss::kernel_sockets_to(&cluster.net, host, path.server)?
        .iter()
        .filter_map(|line| local(line))
        .collect();
    let mut client = start(&[])?;
    let mut kernel_seen = BTreeSet::new();
    let mut samples = 0;
    while client.running() {
        if INTERRUPTED.load(Ordering::Relaxed) {
            client.stop();
            bail!("interrupted");
        }
        kernel_seen.extend(
            ss::kernel_sockets_to(&cluster.net, host, path.server)?
                .into_iter()
                .filter(|line| local(line).is_none_or(|l| !earlier.contains(&l))),
        );
        samples += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut m = iperf3_result(&client.success(Duration::from_secs(300))?)?;
    if !kernel_seen.is_empty() {
        bail!(
            "the user-space run left kernel TCP sockets to {} in node {host} (the connection did not run on the instance — see the agent's fallback metrics):\n{}",
            path.server,
            kernel_seen.into_iter().collect::<Vec<_>>().join("\n")
        );
    }
    let instances = cluster.stack_instances(path.node)?;
    let [instance] = instances.as_slice() else {
        bail!(
            "expected one user-space stack instance on {}, the agent records {}",
            path.node,
            instances.len()
        );
    };
    let connections: Vec<Value> = cluster
        .stack_connections(host, instance)?
        .into_iter()
        .filter(|c| c["id"].as_u64().unwrap_or(0) > known)
        .filter(|c| c["remote"].as_str() == Some(&path.server.to_string()))
        .collect();
    if connections.is_empty() {
        bail!(
            "the stack instance (pid {}) reports no connection to {} for this run",
            instance.pid,
            path.server
        );
    }
    let ccs: BTreeSet<&str> = connections
        .iter()
        .map(|c| c["congestionControl"].as_str().unwrap_or("?"))
        .collect();
    if ccs.len() != 1 || !ccs.iter().all(|cc| cc.eq_ignore_ascii_case("bbr")) {
        bail!("the stack instance reports congestion control {ccs:?}, not BBR");
    }
    let cc = ccs
        .iter()
        .next()
        .map(|cc| cc.to_string())
        .unwrap_or_default();
    let field = |c: &Value, name: &str| c[name].as_u64().unwrap_or(0);
    let report = UserspaceReport {
        bytes_sent: connections.iter().map(|c| field(c, "bytesSent")).sum(),
        smoothed_rtt_us: connections
            .iter()
            .map(|c| field(c, "smoothedRttUs"))
            .max()
            .unwrap_or(0),
        connections: connections.len(),
        ss_samples: samples,
    };
    // What the server received the instance must have sent (it may have sent more: data
    // still in flight when iperf3 stopped counting).
    if report.bytes_sent < m.bytes_received || m.bytes_received == 0 {
        bail!(
            "the stack instance reports {} bytes sent to {}; the server received {}",
            report.bytes_sent,
            path.server,
            m.bytes_received
        );
    }
    m.cc = cc;
    m.retransmits = connections.iter().map(|c| field(c, "retransmits")).sum();
    m.userspace = Some(report);
    Ok(m)
}

/// The receiver-side figures of an iperf3 `-J` client's output.
fn iperf3_result(output: &str) -> Result<Measurement> {
    let json_start = output.find('{').context("iperf3 printed no JSON")?;
    let json: Value = serde_json::from_str(&output[json_start..])
        .with_context(|| format!("iperf3 output: {output}"))?;
    let received = &json["end"]["sum_received"];
    Ok(Measurement {
        seconds: received["seconds"].as_f64().context("seconds")?,
        mbit: received["bits_per_second"]
            .as_f64()
            .context("bits_per_second")?
            / 1e6,
        retransmits: json["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0),
        bytes_received: received["bytes"].as_u64().unwrap_or(0),
        ..Measurement::default()
    })
}

fn median(mut runs: Vec<Measurement>) -> Measurement {
    runs.sort_by(|a, b| a.mbit.total_cmp(&b.mbit));
    runs.get(runs.len() / 2).cloned().unwrap_or_default()
}
