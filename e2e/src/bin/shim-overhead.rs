//! The shim's overhead on kernel sockets, side by side in one run on the same veth path
//! (node-a1 → node-a2 over the zone bridge): request/response latency (sockperf ping-pong,
//! p50 and p99), bulk throughput (iperf3) and connection setup (fresh connections, each
//! connect + one 64-byte request/response), with and without `LD_PRELOAD=libnsocket.so`,
//! interleaved A B B A per round to cancel drift; plus the start-up cost of loading the shim.
//! Both ends run under `stackroute run` in both variants (the agent, the registration and the
//! policy are the same); the only difference is the preload. Needs root.
//!
//! `--transport rdma` compares policies instead, both ends under the shim in both variants: a
//! client pod whose StackRoute to the server pod is `{stack: Kernel, congestionControl: BBR}`
//! against one whose StackRoute is `{stack: RDMA, fallback: [{stack: Kernel, congestionControl:
//! BBR}]}`, the latter's two ends with a verbs provider (`STACKROUTE_RDMA_PROVIDER`, an RDMA
//! pod). What each variant actually ran on is read from the agents' counters (connections
//! decided, fallbacks by reason) and printed: a connection counted under a fallback reason
//! stayed on TCP.
//!
//! `sudo target/release/shim-overhead [--rounds N] [--seconds S] [--connects C]`
//! `sudo target/release/shim-overhead --transport rdma [--rdma-provider PATH] [--rdma-client-faults probe=ok | --rdma-emulated]`

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use stackroute_e2e::cluster::{Cluster, Options, Workload, http_get};
use stackroute_e2e::proc::Proc;
use stackroute_e2e::tools::{is_root, netns_preconditions, which};

#[derive(Parser)]
#[command(
    about = "libnsocket.so overhead on kernel sockets (or an RDMA policy against a kernel \
                   TCP one): latency, throughput and connection setup ratios"
)]
struct Args {
    /// Rounds; each runs both variants of each measurement (A B B A order alternates).
    #[arg(long, default_value_t = 12)]
    rounds: usize,
    /// Seconds per measurement run.
    #[arg(long, default_value_t = 2)]
    seconds: u32,
    /// Let the scheduler place client and server (by default they are pinned to CPUs 0 and 1).
    #[arg(long)]
    no_pin: bool,
    /// Process starts per variant for the start-up cost (`--transport shim`).
    #[arg(long, default_value_t = 200)]
    starts: usize,
    /// Fresh connections per run for the connection setup (each: connect, a 64-byte request,
    /// its reply, close; after 20 not counted); 0 skips it.
    #[arg(long, default_value_t = 500)]
    connects: usize,
    /// Set `TCP_NODELAY` on the connection setup's connections (as sockperf and curl do; by
    /// default they keep Nagle's algorithm, as most programs do).
    #[arg(long)]
    connect_nodelay: bool,
    /// What the two variants are: `shim` — without and with the preload (no policy); `rdma` —
    /// a Kernel/BBR policy and an RDMA policy falling back to Kernel/BBR, both under the shim.
    #[arg(long, value_enum, default_value_t = Transport::Shim)]
    transport: Transport,
    /// `--transport rdma`: the verbs provider of both ends of the RDMA variant
    /// (`STACKROUTE_RDMA_PROVIDER`); `libstackroute_rdma.so` next to the binaries by default.
    #[arg(long, value_name = "PATH")]
    rdma_provider: Option<PathBuf>,
    /// `--transport rdma`: the RDMA variant's client gets the fault-injecting provider
    /// (`libstackroute_rdma_fault.so` next to the binaries) with these `STACKROUTE_RDMA_FAULTS`,
    /// e.g. `probe=ok`: it says capable, so every connection proposes the upgrade to the server,
    /// which keeps `--rdma-provider`. Without a device here: the cost of a declined upgrade.
    #[arg(long, value_name = "FAULTS")]
    rdma_client_faults: Option<String>,
    /// `--transport rdma` without an RDMA device: both ends' shims get the fault-injecting
    /// provider saying capable, and the stack instances its **emulated** queue pairs (Unix
    /// sockets with RC's semantics): every connection is upgraded and relayed, so this measures
    /// the data path's machinery (exchange, instances, relays) — not RDMA.
    #[arg(long)]
    rdma_emulated: bool,
    #[command(subcommand)]
    helper: Option<Helper>,
}

/// The benchmark's own programs, which it starts under `stackroute run` for the connection
/// setup (a Python loop is too slow to time microseconds).
#[derive(Subcommand)]
enum Helper {
    /// Connects `warmup + count` times in a row to IP:PORT, each time sending 64 bytes and
    /// reading 64 back; prints one `connect-loop {json}` line with the counted ones' figures.
    #[command(hide = true)]
    ConnectLoop {
        ip: Ipv4Addr,
        port: u16,
        count: usize,
        warmup: usize,
        /// `TCP_NODELAY` on each connection.
        #[arg(long)]
        nodelay: bool,
    },
    /// Accepts `count` connections on IP:PORT one after another, echoing 64 bytes on each.
    #[command(hide = true)]
    EchoServer {
        ip: Ipv4Addr,
        port: u16,
        count: usize,
    },
}

#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum Transport {
    Shim,
    Rdma,
}

/// Connections made before the counted ones, in each connection setup run (the first
/// connection of a process loads the shim's table, the verbs provider, …).
const WARMUP_CONNECTS: usize = 20;

#[derive(Clone, Copy, PartialEq)]
enum Variant {
    Plain,
    Shim,
    /// `--transport rdma`: the Kernel/BBR policy.
    Kernel,
    /// `--transport rdma`: the RDMA policy (falling back to Kernel/BBR).
    Rdma,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Self::Plain => "plain",
            Self::Shim => "shim",
            Self::Kernel => "kernel",
            Self::Rdma => "rdma",
        }
    }

    /// The variant the ratios divide by.
    fn is_base(self) -> bool {
        matches!(self, Self::Plain | Self::Kernel)
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(helper) = &args.helper {
        let result = match *helper {
            Helper::ConnectLoop {
                ip,
                port,
                count,
                warmup,
                nodelay,
            } => connect_loop(SocketAddr::from((ip, port)), count, warmup, nodelay),
            Helper::EchoServer { ip, port, count } => {
                echo_server(SocketAddr::from((ip, port)), count)
            }
        };
        return match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("shim-overhead helper: {error:#}");
                ExitCode::FAILURE
            }
        };
    }
    if !is_root() {
        eprintln!("shim-overhead needs root (network namespaces). Run it with sudo.");
        return ExitCode::from(2);
    }
    if let Err(reason) = netns_preconditions() {
        eprintln!("shim-overhead: {reason}");
        return ExitCode::from(2);
    }
    for tool in ["sockperf", "iperf3"] {
        if which(tool).is_none() {
            eprintln!("shim-overhead: {tool} is not installed (Debian: apt-get install {tool})");
            return ExitCode::from(2);
        }
    }
    match bench(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("shim-overhead: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn median(values: &mut [f64]) -> f64 {
    quantile(values, 0.5)
}

/// The `q` quantile of `values`, interpolated between neighbours.
fn quantile(values: &mut [f64], q: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    if values.is_empty() {
        return f64::NAN;
    }
    let position = q * (values.len() - 1) as f64;
    let (low, high) = (position.floor() as usize, position.ceil() as usize);
    values[low] + (values[high] - values[low]) * (position - low as f64)
}

/// One measurement's pairs (the base variant — without the shim, or the kernel TCP policy —
/// and the other), one per round.
#[derive(Default)]
struct Paired {
    base: Vec<f64>,
    other: Vec<f64>,
}

impl Paired {
    fn push(&mut self, variant: Variant, value: f64) {
        if variant.is_base() {
            self.base.push(value);
        } else {
            self.other.push(value);
        }
    }

    /// Median of the per-round ratios other / base, with the interquartile range. Each round's
    /// two runs are back to back, so the ratio cancels the drift between rounds that a ratio of
    /// medians would keep.
    fn ratio(&self) -> (f64, f64, f64) {
        let mut ratios: Vec<f64> = self
            .other
            .iter()
            .zip(&self.base)
            .map(|(other, base)| other / base)
            .collect();
        (
            quantile(&mut ratios, 0.5),
            quantile(&mut ratios, 0.25),
            quantile(&mut ratios, 0.75),
        )
    }

    fn medians(&self) -> (f64, f64) {
        (
            median(&mut self.base.clone()),
            median(&mut self.other.clone()),
        )
    }
}

/// `taskset` prefixes that keep the client on CPU 0 and the server on CPU 1 (veth processing
/// runs on the sender's CPU; without pinning, migrations add more spread than the shim costs).
struct Pinning {
    client: Vec<&'static str>,
    server: Vec<&'static str>,
}

impl Pinning {
    fn new(enabled: bool) -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        if enabled && cpus >= 2 && which("taskset").is_some() {
            Self {
                client: vec!["taskset", "-c", "0"],
                server: vec!["taskset", "-c", "1"],
            }
        } else {
            Self {
                client: Vec::new(),
                server: Vec::new(),
            }
        }
    }

    fn describe(&self) -> &'static str {
        if self.client.is_empty() {
            "not pinned"
        } else {
            "client pinned to CPU 0, server to CPU 1"
        }
    }
}

/// How one variant's two ends run: under the shim or not, as which workloads, with which
/// extra environment (the verbs provider of an RDMA pod).
struct Ends {
    variant: Variant,
    shim: bool,
    client: Workload<'static>,
    server: Workload<'static>,
    client_env: Vec<(&'static str, String)>,
    server_env: Vec<(&'static str, String)>,
}

impl Ends {
    fn client_env(&self) -> Vec<(&str, &str)> {
        env_pairs(&self.client_env)
    }

    fn server_env(&self) -> Vec<(&str, &str)> {
        env_pairs(&self.server_env)
    }
}

fn env_pairs<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// `--transport rdma`'s StackRoutes: the kernel TCP policy's client pod and the RDMA policy's.
const KERNEL_POLICY: &str = r#"apiVersion: stackroute.dev/v1alpha1
kind: StackRoute
metadata: {name: bench-kernel, namespace: e2e}
spec:
  podSelector: {matchLabels: {app: tcp-client}}
  rules:
  - name: ps
    to: [{pods: {podSelector: {matchLabels: {app: ps}}}}]
    transport: {stack: Kernel, congestionControl: BBR}
"#;
const RDMA_POLICY: &str = r#"apiVersion: stackroute.dev/v1alpha1
kind: StackRoute
metadata: {name: bench-rdma, namespace: e2e}
spec:
  podSelector: {matchLabels: {app: trainer}}
  rules:
  - name: ps
    to: [{pods: {podSelector: {matchLabels: {app: ps}}}}]
    transport: {stack: RDMA, fallback: [{stack: Kernel, congestionControl: BBR}]}
"#;

/// The variants' ends and the server's address; for `--transport rdma` also the policies
/// (applied and decided at node-a1) and a line on the providers.
fn setup(args: &Args, cluster: &mut Cluster) -> Result<([Ends; 2], Ipv4Addr, String)> {
    if args.transport == Transport::Shim {
        let server_ip = cluster
            .add_pod("bench-server", "node-a2", &["app=server"], true)?
            .context("address")?;
        cluster.add_pod("bench-client", "node-a1", &["app=client"], false)?;
        let ends = |variant: Variant| Ends {
            variant,
            shim: variant == Variant::Shim,
            client: workload("node-a1", "bench-client", &[]),
            server: workload("node-a2", "bench-server", &[]),
            client_env: Vec::new(),
            server_env: Vec::new(),
        };
        return Ok((
            [ends(Variant::Plain), ends(Variant::Shim)],
            server_ip,
            String::new(),
        ));
    }
    let server_ip = cluster
        .add_pod("ps", "node-a2", &["app=ps"], true)?
        .context("address")?;
    cluster.add_pod("tcp-client", "node-a1", &["app=tcp-client"], false)?;
    cluster.add_pod("trainer", "node-a1", &["app=trainer"], false)?;
    cluster.set_policy("bench-kernel.yaml", KERNEL_POLICY)?;
    cluster.set_policy("bench-rdma.yaml", RDMA_POLICY)?;
    let ps = SocketAddr::from((server_ip, 11111));
    cluster.wait_decision("node-a1", "tcp-client", ps, "Kernel/BBR")?;
    cluster.wait_decision("node-a1", "trainer", ps, "RDMA/Default")?;
    // The provider libraries are built next to the binaries (`cargo build -p
    // stackroute-rdma-verbs -p stackroute-rdma-fault-provider`).
    let dir = cluster
        .bins
        .cli
        .parent()
        .context("the binaries' directory")?
        .to_path_buf();
    let existing = |path: PathBuf, package: &str| -> Result<String> {
        if !path.is_file() {
            bail!(
                "{} is missing: cargo build --release -p {package} (same target directory)",
                path.display()
            );
        }
        Ok(path.to_string_lossy().into_owned())
    };
    let provider = match &args.rdma_provider {
        Some(path) if !path.is_file() => bail!("--rdma-provider {}: no such file", path.display()),
        Some(path) => path.to_string_lossy().into_owned(),
        None => existing(dir.join("libstackroute_rdma.so"), "stackroute-rdma-verbs")?,
    };
    let mut client_env = vec![("STACKROUTE_RDMA_PROVIDER", provider.clone())];
    let mut server_env = client_env.clone();
    let mut providers =
        format!("RDMA variant: both ends' and the stack instances' provider {provider}");
    if args.rdma_emulated {
        let fault = existing(
            dir.join("libstackroute_rdma_fault.so"),
            "stackroute-rdma-fault-provider",
        )?;
        providers = format!(
            "RDMA variant: EMULATED — both ends' provider the fault-injecting {fault} (probe=ok),              the stack instances' queue pairs emulated over Unix sockets: the upgrade, the              instances and their relays run; no RDMA does"
        );
        client_env = vec![
            ("STACKROUTE_RDMA_PROVIDER", fault),
            ("STACKROUTE_RDMA_FAULTS", "probe=ok".into()),
        ];
        server_env = client_env.clone();
    } else if let Some(faults) = &args.rdma_client_faults {
        let fault = existing(
            dir.join("libstackroute_rdma_fault.so"),
            "stackroute-rdma-fault-provider",
        )?;
        providers = format!(
            "RDMA variant: server's provider {provider}; client's the fault-injecting {fault} \
             with STACKROUTE_RDMA_FAULTS={faults} (it moves no byte: nothing it does is RDMA)"
        );
        client_env = vec![
            ("STACKROUTE_RDMA_PROVIDER", fault),
            ("STACKROUTE_RDMA_FAULTS", faults.clone()),
        ];
    }
    let kernel = Ends {
        variant: Variant::Kernel,
        shim: true,
        client: workload("node-a1", "tcp-client", &["app=tcp-client"]),
        server: workload("node-a2", "ps", &["app=ps"]),
        // No verbs provider: not an RDMA pod (an empty value is none, whatever the caller's
        // environment holds).
        client_env: vec![("STACKROUTE_RDMA_PROVIDER", String::new())],
        server_env: vec![("STACKROUTE_RDMA_PROVIDER", String::new())],
    };
    let rdma = Ends {
        variant: Variant::Rdma,
        shim: true,
        client: workload("node-a1", "trainer", &["app=trainer"]),
        server: workload("node-a2", "ps", &["app=ps"]),
        client_env,
        server_env,
    };
    Ok(([kernel, rdma], server_ip, providers))
}

/// The agents' options: for `--transport rdma`, the stack instances' verbs provider (the real
/// one, or with `--rdma-emulated` the fault provider's emulated queue pairs).
fn cluster_options(args: &Args, fault_dir: &Path) -> Result<Options> {
    if args.transport != Transport::Rdma {
        return Ok(Options::default());
    }
    let dir = stackroute_e2e::tools::Bins::find()?
        .cli
        .parent()
        .context("the binaries' directory")?
        .to_path_buf();
    let provider = if args.rdma_emulated {
        dir.join("libstackroute_rdma_fault.so")
    } else {
        args.rdma_provider
            .clone()
            .unwrap_or_else(|| dir.join("libstackroute_rdma.so"))
    };
    Ok(Options {
        agent_args: vec!["--rdma-provider".into(), provider.display().to_string()],
        agent_env: vec![(
            "STACKROUTE_RDMA_FAULT_DIR".into(),
            fault_dir.display().to_string(),
        )],
        ..Options::default()
    })
}

fn bench(args: &Args) -> Result<()> {
    let fault_dir = tempfile::Builder::new()
        .prefix("stackroute-rdma-fault-")
        .tempdir()?;
    let mut cluster = Cluster::start(cluster_options(args, fault_dir.path())?)?;
    let Some(shim) = cluster.bins.shim.clone() else {
        bail!("libnsocket.so is not built: cargo build --release -p nsocket-shim");
    };
    let (variants, server_ip, providers) = setup(args, &mut cluster)?;
    let pinning = Pinning::new(!args.no_pin);
    let rdma = args.transport == Transport::Rdma;
    if rdma {
        println!(
            "shim-overhead --transport rdma: node-a1 → node-a2 ({server_ip}) over veth + bridge, \
             both ends under the shim {}; variant kernel: StackRoute Kernel/BBR; variant rdma: \
             StackRoute RDMA, fallback Kernel/BBR\n{providers}",
            shim.display()
        );
    } else {
        println!(
            "shim-overhead: node-a1 → node-a2 ({server_ip}) over veth + bridge; shim {}",
            shim.display()
        );
    }
    println!(
        "{} rounds × {} s per run; in each round the two variants run back to back (order \
         alternates); {}\n",
        args.rounds,
        args.seconds,
        pinning.describe()
    );

    let mut p50 = Paired::default();
    let mut p99 = Paired::default();
    let mut gbit = Paired::default();
    let mut setup_p50 = Paired::default();
    let mut setup_p99 = Paired::default();
    let mut first_p50 = Paired::default();
    let mut first_p99 = Paired::default();
    let mut per_second = Paired::default();
    let mut ran = [Counted::default(), Counted::default()];
    for round in 0..args.rounds {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        let mut line = format!("  round {round:2}");
        for i in order {
            let ends = &variants[i];
            let name = ends.variant.name();
            // sockperf discards its 400 ms warm-up; a run stalled by the VM can end with no
            // observation left. That run is repeated once (and said so), not dropped.
            let run = || sockperf(&cluster, &pinning, server_ip, ends, args.seconds);
            let (a, b) = match counted(&cluster, rdma, &mut ran[i], run) {
                Ok(figures) => figures,
                Err(error) => {
                    println!("  round {round:2} {name}: sockperf failed, run again: {error:#}");
                    counted(&cluster, rdma, &mut ran[i], run)?
                }
            };
            p50.push(ends.variant, a);
            p99.push(ends.variant, b);
            line += &format!("  {name:<6} p50 {a:6.2} µs p99 {b:6.2} µs");
        }
        for i in order {
            let ends = &variants[i];
            let g = counted(&cluster, rdma, &mut ran[i], || {
                iperf3(&cluster, &pinning, server_ip, ends, args.seconds)
            })?;
            gbit.push(ends.variant, g);
            line += &format!("  {:<6} {g:5.2} Gbit/s", ends.variant.name());
        }
        if args.connects > 0 {
            for i in order {
                let ends = &variants[i];
                let figures = counted(&cluster, rdma, &mut ran[i], || {
                    connects(
                        &cluster,
                        &pinning,
                        server_ip,
                        ends,
                        args.connects,
                        args.connect_nodelay,
                    )
                })?;
                setup_p50.push(ends.variant, figures.connect.0);
                setup_p99.push(ends.variant, figures.connect.1);
                first_p50.push(ends.variant, figures.first.0);
                first_p99.push(ends.variant, figures.first.1);
                per_second.push(ends.variant, figures.per_second);
                line += &format!(
                    "  {:<6} connect p50 {:6.1} µs +request {:6.1} µs {:5.0}/s",
                    ends.variant.name(),
                    figures.connect.0,
                    figures.first.0,
                    figures.per_second
                );
            }
        }
        println!("{line}");
    }

    let (base, other) = if rdma {
        ("kernel TCP policy", "RDMA policy")
    } else {
        ("without shim", "with shim")
    };
    println!(
        "\n{} rounds (sockperf: half round trip, TCP, 64 B; iperf3: 1 stream; connection setup: \
         {} fresh connections per run, each connect + 64 B request/response, sequential{}); \
         ratio = median of the per-round ratios {other} / {base} [interquartile range]:",
        args.rounds,
        args.connects,
        if args.connect_nodelay {
            ", TCP_NODELAY"
        } else {
            ", Nagle on"
        }
    );
    println!("| measurement | {base} (median) | {other} (median) | ratio [IQR] | target |");
    println!("|---|---|---|---|---|");
    let verdict = |ok: bool| if ok { "PASS" } else { "MISS" };
    // The issue's targets are the shim's on kernel sockets: (at most, at least).
    let (latency, throughput) = if rdma {
        (None, None)
    } else {
        (Some((true, 1.02)), Some((false, 0.99)))
    };
    let mut rows = vec![
        ("latency p50", &p50, "µs", latency),
        ("latency p99", &p99, "µs", latency),
        ("throughput", &gbit, "Gbit/s", throughput),
    ];
    if args.connects > 0 {
        rows.extend([
            ("connect() p50", &setup_p50, "µs", None),
            ("connect() p99", &setup_p99, "µs", None),
            ("connect + first request p50", &first_p50, "µs", None),
            ("connect + first request p99", &first_p99, "µs", None),
            ("connections per second", &per_second, "/s", None),
        ]);
    }
    for (name, paired, unit, target) in rows {
        let (without, with) = paired.medians();
        let (ratio, q1, q3) = paired.ratio();
        let target = match target {
            Some((true, limit)) => format!("≤ {limit} {}", verdict(ratio <= limit)),
            Some((false, limit)) => format!("≥ {limit} {}", verdict(ratio >= limit)),
            None => String::new(),
        };
        println!(
            "| {name} | {without:.2} {unit} | {with:.2} {unit} | {ratio:.3} [{q1:.3}–{q3:.3}] | {target} |"
        );
    }
    if rdma {
        println!(
            "\nwhat each variant ran on (the agents' counters over its runs; node-a1: the \
             client's shim, node-a2: the server's):"
        );
        for (ends, counted) in variants.iter().zip(&ran) {
            println!("  {}", counted.describe(ends.variant));
        }
    } else {
        let starts = startup(&shim, args.starts)?;
        println!(
            "| process start (`/bin/true`, median of {}) | {:.0} µs | {:.0} µs | +{:.0} µs | |",
            args.starts,
            starts.0,
            starts.1,
            starts.1 - starts.0
        );
    }
    Ok(())
}

fn workload(
    node: &'static str,
    name: &'static str,
    labels: &'static [&'static str],
) -> Workload<'static> {
    Workload { node, name, labels }
}

/// Quiet time of the control plane before a measurement starts (see `Cluster::wait_settled`):
/// with the shim, the server's `listen()` registers a listener, which the controller compiles
/// and every agent publishes; that work would otherwise land in the shim variant's run only.
/// (For the RDMA variant this is also what makes the server known at node-a1 as an upgrade
/// endpoint; a client that asked too early counts `peer-not-registered`.)
const SETTLE: Duration = Duration::from_millis(500);

fn pinned<'a>(prefix: &[&'a str], command: &[&'a str]) -> Vec<&'a str> {
    prefix.iter().chain(command).copied().collect()
}

/// One sockperf ping-pong run: (p50, p99) of half the round trip, µs.
fn sockperf(
    cluster: &Cluster,
    pinning: &Pinning,
    ip: Ipv4Addr,
    ends: &Ends,
    seconds: u32,
) -> Result<(f64, f64)> {
    let ip = ip.to_string();
    let mut server = cluster.spawn_with(
        &ends.server,
        ends.shim,
        &ends.server_env(),
        &pinned(
            &pinning.server,
            &["sockperf", "sr", "--tcp", "-i", &ip, "-p", "11111"],
        ),
    )?;
    listening(cluster, &mut server, 11111)?;
    cluster.wait_settled(SETTLE)?;
    let mut client = cluster.spawn_with(
        &ends.client,
        ends.shim,
        &ends.client_env(),
        &pinned(
            &pinning.client,
            &[
                "sockperf",
                "pp",
                "--tcp",
                "-i",
                &ip,
                "-p",
                "11111",
                "-m",
                "64",
                "-t",
                &seconds.to_string(),
            ],
        ),
    )?;
    let output = client.success(Duration::from_secs(u64::from(seconds) + 30))?;
    let percentile = |p: &str| -> Result<f64> {
        output
            .lines()
            .find(|l| l.contains(&format!("percentile {p}")))
            .and_then(|l| l.rsplit('=').next())
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("sockperf printed no percentile {p}:\n{output}"))
    };
    Ok((percentile("50.000")?, percentile("99.000")?))
}

/// Waits for `server`'s listener on node-a2's `port`; if none comes, says whether the server
/// still runs (with its pid, to look at) or how it ended, and what it printed.
fn listening(cluster: &Cluster, server: &mut Proc, port: u16) -> Result<()> {
    cluster.wait_listening("a2", port).map_err(|error| {
        let state = if server.running() {
            format!("still running as pid {}", server.pid())
        } else {
            match server.wait(Duration::ZERO) {
                Ok(status) => format!("ended: {status}"),
                Err(why) => format!("state unknown: {why:#}"),
            }
        };
        anyhow::anyhow!(
            "{error:#}; the server {state}; its output:\n{}",
            server.output()
        )
    })
}

/// One iperf3 run: received Gbit/s.
fn iperf3(
    cluster: &Cluster,
    pinning: &Pinning,
    ip: Ipv4Addr,
    ends: &Ends,
    seconds: u32,
) -> Result<f64> {
    let ip = ip.to_string();
    let mut server = cluster.spawn_with(
        &ends.server,
        ends.shim,
        &ends.server_env(),
        &pinned(
            &pinning.server,
            &["iperf3", "-s", "-B", &ip, "-p", "5201", "-1"],
        ),
    )?;
    listening(cluster, &mut server, 5201)?;
    cluster.wait_settled(SETTLE)?;
    let mut client = cluster.spawn_with(
        &ends.client,
        ends.shim,
        &ends.client_env(),
        &pinned(
            &pinning.client,
            &[
                "iperf3",
                "-c",
                &ip,
                "-p",
                "5201",
                "-t",
                &seconds.to_string(),
                "-J",
            ],
        ),
    )?;
    let output = client.success(Duration::from_secs(u64::from(seconds) + 30))?;
    let json: serde_json::Value =
        serde_json::from_str(&output[output.find('{').context("no JSON")?..])?;
    Ok(json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("bits_per_second")?
        / 1e9)
}

/// One connection setup run's figures (µs; connections per second).
struct Setup {
    /// `connect()` (p50, p99): the handshake, the shim's decision and, with an RDMA policy, its
    /// upgrade exchange, which runs inside `connect`.
    connect: (f64, f64),
    /// `connect()` + a 64-byte request + its reply (p50, p99).
    first: (f64, f64),
    /// Counted connections per second of the whole loop (close included).
    per_second: f64,
}

/// One connection setup run: this program's `echo-server` on node-a2 and its `connect-loop`
/// on node-a1, both under `stackroute run` as the variant's workloads.
fn connects(
    cluster: &Cluster,
    pinning: &Pinning,
    ip: Ipv4Addr,
    ends: &Ends,
    count: usize,
    nodelay: bool,
) -> Result<Setup> {
    const PORT: u16 = 11112;
    let exe = std::env::current_exe()?;
    let exe = exe.to_str().context("this program's path")?;
    let (ip, port) = (ip.to_string(), PORT.to_string());
    let (total, count_text, warmup) = (
        (count + WARMUP_CONNECTS).to_string(),
        count.to_string(),
        WARMUP_CONNECTS.to_string(),
    );
    let mut server = cluster.spawn_with(
        &ends.server,
        ends.shim,
        &ends.server_env(),
        &pinned(&pinning.server, &[exe, "echo-server", &ip, &port, &total]),
    )?;
    listening(cluster, &mut server, PORT)?;
    cluster.wait_settled(SETTLE)?;
    let mut command = vec![exe, "connect-loop", &ip, &port, &count_text, &warmup];
    if nodelay {
        command.push("--nodelay");
    }
    let mut client = cluster.spawn_with(
        &ends.client,
        ends.shim,
        &ends.client_env(),
        &pinned(&pinning.client, &command),
    )?;
    let output = client.success(Duration::from_secs(60 + count as u64 / 50))?;
    // The server ends by itself after the last connection (its shim reports its counters).
    server.success(Duration::from_secs(10))?;
    let json: serde_json::Value = output
        .lines()
        .find_map(|line| line.strip_prefix("connect-loop "))
        .with_context(|| format!("no figures from the connect loop:\n{output}"))
        .and_then(|text| Ok(serde_json::from_str(text)?))?;
    let pair = |key: &str| -> Result<(f64, f64)> {
        let value = &json[key];
        Ok((
            value[0].as_f64().context("p50")?,
            value[1].as_f64().context("p99")?,
        ))
    };
    Ok(Setup {
        connect: pair("connect_us")?,
        first: pair("first_request_us")?,
        per_second: json["per_second"].as_f64().context("per_second")?,
    })
}

/// `connect-loop`: `warmup + count` fresh connections to `address` one after another; prints
/// the counted ones' connect and connect + first request/response p50/p99 (µs) and their rate.
fn connect_loop(address: SocketAddr, count: usize, warmup: usize, nodelay: bool) -> Result<()> {
    let request = [0x5a_u8; 64];
    let mut reply = [0_u8; 64];
    let mut connect_us = Vec::with_capacity(count);
    let mut first_us = Vec::with_capacity(count);
    let mut started = Instant::now();
    for i in 0..warmup + count {
        if i == warmup {
            started = Instant::now();
        }
        let start = Instant::now();
        let mut stream =
            TcpStream::connect(address).with_context(|| format!("connection {i} to {address}"))?;
        let connected = start.elapsed();
        if nodelay {
            stream.set_nodelay(true)?;
        }
        stream.write_all(&request)?;
        stream.read_exact(&mut reply)?;
        let answered = start.elapsed();
        drop(stream);
        if reply != request {
            bail!("connection {i}: the echo differs from the request");
        }
        if i >= warmup {
            connect_us.push(connected.as_secs_f64() * 1e6);
            first_us.push(answered.as_secs_f64() * 1e6);
        }
    }
    let per_second = count as f64 / started.elapsed().as_secs_f64();
    let figures = serde_json::json!({
        "connect_us": [quantile(&mut connect_us, 0.5), quantile(&mut connect_us, 0.99)],
        "first_request_us": [quantile(&mut first_us, 0.5), quantile(&mut first_us, 0.99)],
        "per_second": per_second,
    });
    println!("connect-loop {figures}");
    Ok(())
}

/// `echo-server`: `count` connections on `address`, one after another, 64 bytes echoed on each.
fn echo_server(address: SocketAddr, count: usize) -> Result<()> {
    let listener = TcpListener::bind(address).with_context(|| format!("bind {address}"))?;
    let mut buffer = [0_u8; 64];
    for i in 0..count {
        let (mut stream, _) = listener.accept()?;
        stream
            .read_exact(&mut buffer)
            .and_then(|()| stream.write_all(&buffer))
            .with_context(|| format!("connection {i}"))?;
    }
    Ok(())
}

/// The agents' counters of what shims ran, as `/metrics` prints them (series → value): the
/// connections decided by transport and the fallbacks by reason.
fn shim_counters(cluster: &Cluster, node: &str) -> Result<BTreeMap<String, f64>> {
    let (_, body) = http_get(cluster.agent_metrics_port(node), "/metrics")?;
    Ok(body
        .lines()
        .filter(|line| {
            line.starts_with("stackroute_lrd_shim_decisions_total{")
                || line.starts_with("stackroute_lrd_fallback_reports_total{")
                || line.starts_with("stackroute_lrd_rdma_upgrade_attempts_total{")
        })
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect())
}

/// What the shims counted during one variant's runs: the changes of node-a1's (the client's)
/// and node-a2's (the server's) counters.
#[derive(Default)]
struct Counted {
    client: BTreeMap<String, f64>,
    server: BTreeMap<String, f64>,
}

/// Runs `run` and, when `enabled`, adds the changes of the agents' counters over it (the
/// processes have exited, so their shims have reported) to `into`.
fn counted<T>(
    cluster: &Cluster,
    enabled: bool,
    into: &mut Counted,
    run: impl FnOnce() -> Result<T>,
) -> Result<T> {
    if !enabled {
        return run();
    }
    let before = [
        shim_counters(cluster, "node-a1")?,
        shim_counters(cluster, "node-a2")?,
    ];
    let result = run()?;
    let after = [
        shim_counters(cluster, "node-a1")?,
        shim_counters(cluster, "node-a2")?,
    ];
    for ((into, before), after) in [&mut into.client, &mut into.server]
        .into_iter()
        .zip(&before)
        .zip(&after)
    {
        for (series, value) in after {
            let delta = value - before.get(series).copied().unwrap_or(0.0);
            if delta > 0.0 {
                *into.entry(series.clone()).or_default() += delta;
            }
        }
    }
    Ok(result)
}

impl Counted {
    /// `(label value, count)` of the series of `metric` whose one label is `label`.
    fn by<'a>(
        map: &'a BTreeMap<String, f64>,
        metric: &str,
    ) -> impl Iterator<Item = (&'a str, f64)> {
        let prefix = format!("{metric}{{");
        map.iter().filter_map(move |(series, value)| {
            let labels = series.strip_prefix(&prefix)?.strip_suffix('}')?;
            Some((labels, *value))
        })
    }

    fn fallbacks(map: &BTreeMap<String, f64>) -> Vec<(String, f64)> {
        Self::by(map, "stackroute_lrd_fallback_reports_total")
            .map(|(labels, n)| {
                let reason = labels
                    .strip_prefix("reason=\"")
                    .and_then(|r| r.strip_suffix('"'))
                    .unwrap_or(labels);
                (reason.to_string(), n)
            })
            .collect()
    }

    /// The upgrade attempts of `role` (`client`, `server`) by reason (`upgraded` or why not).
    fn attempts(map: &BTreeMap<String, f64>, role: &str) -> Vec<(String, f64)> {
        let role = format!("role=\"{role}\"");
        Self::by(map, "stackroute_lrd_rdma_upgrade_attempts_total")
            .filter_map(|(labels, n)| {
                let mut parts = labels.split(',');
                let reason = parts.find_map(|part| part.strip_prefix("reason="))?;
                labels
                    .split(',')
                    .any(|part| part == role)
                    .then(|| (reason.trim_matches('"').to_string(), n))
            })
            .collect()
    }

    /// One line: the connections the client's shim decided (by transport) and the fallbacks
    /// both shims reported; for the RDMA variant also the upgrade attempts each side reported,
    /// `upgraded` counting the connections that ran on (emulated) queue pairs. A connection
    /// under the RDMA policy is decided twice: on the kernel entry that carries it until the
    /// upgrade, and as RDMA.
    fn describe(&self, variant: Variant) -> String {
        let list = |items: &[(String, f64)]| {
            if items.is_empty() {
                "none".to_string()
            } else {
                items
                    .iter()
                    .map(|(what, n)| format!("{what} {n:.0}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        };
        let decided: Vec<(String, f64)> =
            Self::by(&self.client, "stackroute_lrd_shim_decisions_total")
                .map(|(labels, n)| {
                    let transport = labels
                        .replace("stack=", "")
                        .replace(",congestion_control=", "/")
                        .replace('"', "");
                    (transport, n)
                })
                .collect();
        let connections: f64 = decided.iter().map(|(_, n)| n).sum();
        let client = Self::fallbacks(&self.client);
        let server = Self::fallbacks(&self.server);
        if variant != Variant::Rdma {
            return format!(
                "{}: {connections:.0} connections decided at node-a1 ({}); fallbacks at \
                 node-a1: {}; at node-a2: {}",
                variant.name(),
                list(&decided),
                list(&client),
                list(&server)
            );
        }
        // Every RDMA decision either fell back with a counted reason or was upgraded.
        let rdma_decided: f64 = decided
            .iter()
            .filter(|(transport, _)| transport.starts_with("RDMA"))
            .map(|(_, n)| n)
            .sum();
        let stayed: f64 = client
            .iter()
            .filter(|(reason, _)| reason != "no-capability")
            .map(|(_, n)| n)
            .sum();
        format!(
            "{}: decisions at node-a1: {}; {:.0} RDMA connections upgraded ({stayed:.0} fell \
             back: node-a1 {}; node-a2 {}); attempt records (a shim report carries at most 64: \
             a sample) — the client's: {}; the server's: {}",
            variant.name(),
            list(&decided),
            (rdma_decided - stayed).max(0.0),
            list(&client),
            list(&server),
            list(&Self::attempts(&self.client, "client")),
            list(&Self::attempts(&self.server, "server")),
        )
    }
}

/// Median wall time of starting `/bin/true` without and with the shim preloaded, µs.
fn startup(shim: &Path, n: usize) -> Result<(f64, f64)> {
    let mut plain = Vec::new();
    let mut preloaded = Vec::new();
    for i in 0..n * 2 {
        let with = i % 2 == 1;
        let mut command = Command::new("/bin/true");
        command.env_remove("LD_PRELOAD");
        if with {
            command.env("LD_PRELOAD", shim);
        }
        let start = Instant::now();
        let status = command.status()?;
        let micros = start.elapsed().as_secs_f64() * 1e6;
        if !status.success() {
            bail!("/bin/true failed ({status})");
        }
        if with {
            preloaded.push(micros);
        } else {
            plain.push(micros);
        }
    }
    Ok((median(&mut plain), median(&mut preloaded)))
}
