//! The shim's overhead on kernel sockets, side by side in one run on the same veth path
//! (node-a1 → node-a2 over the zone bridge): request/response latency (sockperf ping-pong,
//! p50 and p99) and bulk throughput (iperf3), with and without `LD_PRELOAD=libnsocket.so`,
//! interleaved A B B A per round to cancel drift; plus the start-up cost of loading the shim.
//! Both ends run under `stackroute run` in both variants (the agent, the registration and the
//! policy are the same); the only difference is the preload. Needs root.
//!
//! `sudo target/release/shim-overhead [--rounds N] [--seconds S]`

use std::net::Ipv4Addr;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use stackroute_e2e::cluster::{Cluster, Options, Workload};
use stackroute_e2e::tools::{is_root, netns_preconditions, which};

#[derive(Parser)]
#[command(about = "libnsocket.so overhead on kernel sockets: latency and throughput ratios")]
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
    /// Process starts per variant for the start-up cost.
    #[arg(long, default_value_t = 200)]
    starts: usize,
}

#[derive(Clone, Copy, PartialEq)]
enum Variant {
    Plain,
    Shim,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Self::Plain => "plain",
            Self::Shim => "shim ",
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
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

/// One measurement's with/without pairs, one per round.
#[derive(Default)]
struct Paired {
    plain: Vec<f64>,
    shim: Vec<f64>,
}

impl Paired {
    fn push(&mut self, variant: Variant, value: f64) {
        match variant {
            Variant::Plain => self.plain.push(value),
            Variant::Shim => self.shim.push(value),
        }
    }

    /// Median of the per-round ratios shim / plain, with the interquartile range. Each round's
    /// two runs are back to back, so the ratio cancels the drift between rounds that a ratio of
    /// medians would keep.
    fn ratio(&self) -> (f64, f64, f64) {
        let mut ratios: Vec<f64> = self
            .shim
            .iter()
            .zip(&self.plain)
            .map(|(shim, plain)| shim / plain)
            .collect();
        (
            quantile(&mut ratios, 0.5),
            quantile(&mut ratios, 0.25),
            quantile(&mut ratios, 0.75),
        )
    }

    fn medians(&self) -> (f64, f64) {
        (
            median(&mut self.plain.clone()),
            median(&mut self.shim.clone()),
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

fn bench(args: &Args) -> Result<()> {
    let mut cluster = Cluster::start(Options::default())?;
    let Some(shim) = cluster.bins.shim.clone() else {
        bail!("libnsocket.so is not built: cargo build --release -p nsocket-shim");
    };
    let server_ip = cluster
        .add_pod("bench-server", "node-a2", &["app=server"], true)?
        .context("address")?;
    cluster.add_pod("bench-client", "node-a1", &["app=client"], false)?;
    let pinning = Pinning::new(!args.no_pin);
    println!(
        "shim-overhead: node-a1 → node-a2 ({server_ip}) over veth + bridge; shim {}",
        shim.display()
    );
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
    for round in 0..args.rounds {
        let order = if round % 2 == 0 {
            [Variant::Plain, Variant::Shim]
        } else {
            [Variant::Shim, Variant::Plain]
        };
        let mut line = format!("  round {round:2}");
        for variant in order {
            // sockperf discards its 400 ms warm-up; a run stalled by the VM can end with no
            // observation left. That run is repeated once (and said so), not dropped.
            let (a, b) = match sockperf(&cluster, &pinning, server_ip, variant, args.seconds) {
                Ok(figures) => figures,
                Err(error) => {
                    println!(
                        "  round {round:2} {}: sockperf failed, run again: {error:#}",
                        variant.name().trim()
                    );
                    sockperf(&cluster, &pinning, server_ip, variant, args.seconds)?
                }
            };
            p50.push(variant, a);
            p99.push(variant, b);
            line += &format!("  {} p50 {a:6.2} µs p99 {b:6.2} µs", variant.name());
        }
        for variant in order {
            let g = iperf3(&cluster, &pinning, server_ip, variant, args.seconds)?;
            gbit.push(variant, g);
            line += &format!("  {} {g:5.2} Gbit/s", variant.name());
        }
        println!("{line}");
    }
    let starts = startup(&shim, args.starts)?;

    println!(
        "\n{} rounds (sockperf: half round trip, TCP, 64 B; iperf3: 1 stream); ratio = median of \
         the per-round ratios with / without [interquartile range]:",
        args.rounds
    );
    println!("| measurement | without shim (median) | with shim (median) | ratio [IQR] | target |");
    println!("|---|---|---|---|---|");
    let verdict = |ok: bool| if ok { "PASS" } else { "MISS" };
    for (name, paired, unit, at_most) in [
        ("latency p50", &p50, "µs", Some(1.02)),
        ("latency p99", &p99, "µs", Some(1.02)),
        ("throughput", &gbit, "Gbit/s", None),
    ] {
        let (plain, with) = paired.medians();
        let (ratio, q1, q3) = paired.ratio();
        let target = match at_most {
            Some(limit) => format!("≤ {limit} {}", verdict(ratio <= limit)),
            None => format!("≥ 0.99 {}", verdict(ratio >= 0.99)),
        };
        println!(
            "| {name} | {plain:.2} {unit} | {with:.2} {unit} | {ratio:.3} [{q1:.3}–{q3:.3}] | {target} |"
        );
    }
    println!(
        "| process start (`/bin/true`, median of {}) | {:.0} µs | {:.0} µs | +{:.0} µs | |",
        args.starts,
        starts.0,
        starts.1,
        starts.1 - starts.0
    );
    Ok(())
}

fn workload(node: &'static str, name: &'static str) -> Workload<'static> {
    Workload {
        node,
        name,
        labels: &[],
    }
}

/// Quiet time of the control plane before a measurement starts (see `Cluster::wait_settled`):
/// with the shim, the server's `listen()` registers a listener, which the controller compiles
/// and every agent publishes; that work would otherwise land in the shim variant's run only.
const SETTLE: Duration = Duration::from_millis(500);

fn pinned<'a>(prefix: &[&'a str], command: &[&'a str]) -> Vec<&'a str> {
    prefix.iter().chain(command).copied().collect()
}

/// One sockperf ping-pong run: (p50, p99) of half the round trip, µs.
fn sockperf(
    cluster: &Cluster,
    pinning: &Pinning,
    ip: Ipv4Addr,
    variant: Variant,
    seconds: u32,
) -> Result<(f64, f64)> {
    let shim = variant == Variant::Shim;
    let ip = ip.to_string();
    let _server = cluster.spawn(
        &workload("node-a2", "bench-server"),
        shim,
        &pinned(
            &pinning.server,
            &["sockperf", "sr", "--tcp", "-i", &ip, "-p", "11111"],
        ),
    )?;
    cluster.wait_listening("a2", 11111)?;
    cluster.wait_settled(SETTLE)?;
    let mut client = cluster.spawn(
        &workload("node-a1", "bench-client"),
        shim,
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

/// One iperf3 run: received Gbit/s.
fn iperf3(
    cluster: &Cluster,
    pinning: &Pinning,
    ip: Ipv4Addr,
    variant: Variant,
    seconds: u32,
) -> Result<f64> {
    let shim = variant == Variant::Shim;
    let ip = ip.to_string();
    let _server = cluster.spawn(
        &workload("node-a2", "bench-server"),
        shim,
        &pinned(
            &pinning.server,
            &["iperf3", "-s", "-B", &ip, "-p", "5201", "-1"],
        ),
    )?;
    cluster.wait_listening("a2", 5201)?;
    cluster.wait_settled(SETTLE)?;
    let mut client = cluster.spawn(
        &workload("node-a1", "bench-client"),
        shim,
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

/// Median wall time of starting `/bin/true` without and with the shim preloaded, µs.
fn startup(shim: &std::path::Path, n: usize) -> Result<(f64, f64)> {
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
