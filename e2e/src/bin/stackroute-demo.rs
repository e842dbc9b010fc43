//! The stackroute demo: one iperf3 server in the cluster, one on the internet, and three client
//! pods on three kinds of path — same node, same zone, and an internet path with a rate limit,
//! a wide-area delay and random loss. First without policy (every connection gets the hosts'
//! default, kernel CUBIC), then with a StackRoute that picks BBR for the internet path; the
//! congestion control of each connection is read from the kernel (`ss -tin`), not from the
//! shim. Needs root. Run it with `sudo scripts/demo.sh`.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use stackroute_e2e::cluster::{Cluster, INTERNET, INTERNET_IP, Options, Workload, node};
use stackroute_e2e::net::Impairment;
use stackroute_e2e::ss;
use stackroute_e2e::tools::{is_root, netns_preconditions, which};

#[derive(Parser)]
#[command(about = "stackroute demo: per-path transport choice, measured")]
struct Args {
    /// Bytes the internet client sends (iperf3 -n; K, M and G suffixes work).
    #[arg(long, default_value = "8M")]
    size: String,
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
    cc: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if !is_root() {
        eprintln!(
            "stackroute-demo needs root: it creates network namespaces, veth pairs, a bridge, tc and iptables rules (all removed at exit). Run: sudo scripts/demo.sh"
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
    println!(
        "stackroute demo — building the cluster: 3 nodes in 2 zones, a router, an internet host"
    );
    println!(
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
    println!("  shim: {}", shim.display());

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

    println!(
        "\n1) without policy: only the installation default (ClusterStackRoute installation-default, Baseline tier: kernel CUBIC)"
    );
    let before = measure_all(&cluster, args, &paths, interrupted)?;

    println!("\n2) with StackRoute e2e/demo-paths (CUBIC in the cluster, BBR to the internet)");
    cluster.set_policy("demo-policy.yaml", POLICY)?;
    let expected = ["Kernel/Cubic", "Kernel/Cubic", "Kernel/BBR"];
    for (path, expected) in paths.iter().zip(expected) {
        cluster.wait_decision(path.node, path.client, path.server, expected)?;
    }
    let after = measure_all(&cluster, args, &paths, interrupted)?;

    println!(
        "\n{:<10} {:<15} {:<18}│ {:^26} │ {:^26} │ {:>8}",
        "path", "client (node)", "server", "without policy", "with StackRoute", "speed-up"
    );
    println!(
        "{:<10} {:<15} {:<18}│ {:<6} {:>7} {:>11} │ {:<6} {:>7} {:>11} │",
        "", "", "", "cc", "time", "Mbit/s", "cc", "time", "Mbit/s"
    );
    for ((path, a), b) in paths.iter().zip(&before).zip(&after) {
        println!(
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
            a.seconds / b.seconds,
            if a.cc == b.cc {
                "  (same cc both times: noise)"
            } else {
                ""
            }
        );
    }
    println!(
        "\ncc: the congestion control the kernel reported for the client's connections (ss -tin in its node), read outside the application.\ntime: iperf3's receiver-side time to move {} in the cluster, {} over the internet (median of {} runs); speed-up: time without / time with.\nretransmits on the internet path without/with policy: {}/{}.",
        args.cluster_size, args.size, args.runs, before[2].retransmits, after[2].retransmits
    );
    Ok(())
}

fn measure_all(
    cluster: &Cluster,
    args: &Args,
    paths: &[Path],
    interrupted: &AtomicBool,
) -> Result<Vec<Measurement>> {
    let mut results = Vec::new();
    for path in paths {
        let mut runs = Vec::new();
        for _ in 0..args.runs.max(1) {
            if interrupted.load(Ordering::Relaxed) {
                bail!("interrupted");
            }
            let size = if path.internet {
                &args.size
            } else {
                &args.cluster_size
            };
            let workload = Workload {
                node: path.node,
                name: path.client,
                labels: &["app=client"],
            };
            runs.push(iperf3(
                cluster,
                path.server,
                node(path.node).host,
                |extra| {
                    let mut argv = vec![
                        "iperf3".to_string(),
                        "-c".into(),
                        path.server.ip().to_string(),
                    ];
                    argv.extend([
                        "-p".into(),
                        path.server.port().to_string(),
                        "-n".into(),
                        size.clone(),
                        "-J".into(),
                    ]);
                    argv.extend(extra.iter().map(|s| s.to_string()));
                    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
                    cluster.spawn(&workload, true, &argv)
                },
            )?);
        }
        let m = median(runs);
        println!(
            "   {:<10} {:<6} {:>7.2} s {:>8.1} Mbit/s",
            path.label, m.cc, m.seconds, m.mbit
        );
        results.push(m);
    }
    Ok(results)
}

fn calibrate(
    cluster: &Cluster,
    args: &Args,
    server: SocketAddr,
    interrupted: &AtomicBool,
) -> Result<()> {
    println!("calibration: iperf3 -C from node-b1 to the internet host, no shim, no policy");
    for _ in 0..args.runs.max(1) {
        for cc in ["cubic", "bbr"] {
            if interrupted.load(Ordering::Relaxed) {
                bail!("interrupted");
            }
            let m = iperf3(cluster, server, "b1", |_| {
                let ip = server.ip().to_string();
                cluster.spawn_plain(
                    "b1",
                    "iperf3-calibrate",
                    &[
                        "iperf3", "-c", &ip, "-p", "5201", "-n", &args.size, "-J", "-C", cc,
                    ],
                )
            })?;
            println!(
                "   {cc:<6} {:>7.2} s {:>8.1} Mbit/s {:>6} retransmits (ss saw {})",
                m.seconds, m.mbit, m.retransmits, m.cc
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
    let output = client.success(Duration::from_secs(300))?;
    let json_start = output.find('{').context("iperf3 printed no JSON")?;
    let json: serde_json::Value = serde_json::from_str(&output[json_start..])
        .with_context(|| format!("iperf3 output: {output}"))?;
    let received = &json["end"]["sum_received"];
    let seen = seen.lock().unwrap_or_else(|e| e.into_inner());
    Ok(Measurement {
        seconds: received["seconds"].as_f64().context("seconds")?,
        mbit: received["bits_per_second"]
            .as_f64()
            .context("bits_per_second")?
            / 1e6,
        retransmits: json["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0),
        cc: if seen.is_empty() {
            "?".into()
        } else {
            seen.iter().cloned().collect::<Vec<_>>().join("+")
        },
    })
}

fn median(mut runs: Vec<Measurement>) -> Measurement {
    runs.sort_by(|a, b| a.seconds.total_cmp(&b.seconds));
    runs.get(runs.len() / 2).cloned().unwrap_or_default()
}
