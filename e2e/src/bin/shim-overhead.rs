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
    #[arg(long, default_value_t = 4)]
    rounds: usize,
    /// Seconds per measurement run.
    #[arg(long, default_value_t = 3)]
    seconds: u32,
    /// Process starts per variant for the start-up cost.
    #[arg(long, default_value_t = 200)]
    starts: usize,
}

#[derive(Clone, Copy, PartialEq)]
enum Variant {
    Plain,
    Shim,
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
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
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
    println!(
        "shim-overhead: node-a1 → node-a2 ({server_ip}) over veth + bridge; shim {}",
        shim.display()
    );
    println!(
        "{} rounds × {} s per run, variants interleaved (plain/shim, then shim/plain)\n",
        args.rounds, args.seconds
    );

    let mut p50 = [Vec::new(), Vec::new()];
    let mut p99 = [Vec::new(), Vec::new()];
    let mut gbit = [Vec::new(), Vec::new()];
    for round in 0..args.rounds {
        let order = if round % 2 == 0 {
            [Variant::Plain, Variant::Shim]
        } else {
            [Variant::Shim, Variant::Plain]
        };
        for variant in order {
            let i = variant as usize;
            let (a, b) = sockperf(&cluster, server_ip, variant, args.seconds)?;
            p50[i].push(a);
            p99[i].push(b);
            let g = iperf3(&cluster, server_ip, variant, args.seconds)?;
            gbit[i].push(g);
            println!(
                "  round {round} {:<5}  latency p50 {a:6.2} µs  p99 {b:6.2} µs   throughput {g:6.2} Gbit/s",
                if variant == Variant::Shim {
                    "shim"
                } else {
                    "plain"
                }
            );
        }
    }
    let starts = startup(&shim, args.starts)?;

    let [mut p50_plain, mut p50_shim] = p50;
    let [mut p99_plain, mut p99_shim] = p99;
    let [mut g_plain, mut g_shim] = gbit;
    let (p50_plain, p50_shim) = (median(&mut p50_plain), median(&mut p50_shim));
    let (p99_plain, p99_shim) = (median(&mut p99_plain), median(&mut p99_shim));
    let (g_plain, g_shim) = (median(&mut g_plain), median(&mut g_shim));
    println!(
        "\nmedians over {} rounds (sockperf: half round trip, TCP, 64 B):",
        args.rounds
    );
    println!("| measurement | without shim | with shim | ratio | target |");
    println!("|---|---|---|---|---|");
    let verdict = |ok: bool| if ok { "PASS" } else { "MISS" };
    println!(
        "| latency p50 | {p50_plain:.2} µs | {p50_shim:.2} µs | {:.3} | ≤ 1.02 {} |",
        p50_shim / p50_plain,
        verdict(p50_shim / p50_plain <= 1.02)
    );
    println!(
        "| latency p99 | {p99_plain:.2} µs | {p99_shim:.2} µs | {:.3} | ≤ 1.02 {} |",
        p99_shim / p99_plain,
        verdict(p99_shim / p99_plain <= 1.02)
    );
    println!(
        "| throughput (iperf3, 1 stream) | {g_plain:.2} Gbit/s | {g_shim:.2} Gbit/s | {:.3} | ≥ 0.99 {} |",
        g_shim / g_plain,
        verdict(g_shim / g_plain >= 0.99)
    );
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

/// One sockperf ping-pong run: (p50, p99) of half the round trip, µs.
fn sockperf(cluster: &Cluster, ip: Ipv4Addr, variant: Variant, seconds: u32) -> Result<(f64, f64)> {
    let shim = variant == Variant::Shim;
    let ip = ip.to_string();
    let _server = cluster.spawn(
        &workload("node-a2", "bench-server"),
        shim,
        &["sockperf", "sr", "--tcp", "-i", &ip, "-p", "11111"],
    )?;
    cluster.wait_listening("a2", 11111)?;
    let mut client = cluster.spawn(
        &workload("node-a1", "bench-client"),
        shim,
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
fn iperf3(cluster: &Cluster, ip: Ipv4Addr, variant: Variant, seconds: u32) -> Result<f64> {
    let shim = variant == Variant::Shim;
    let ip = ip.to_string();
    let _server = cluster.spawn(
        &workload("node-a2", "bench-server"),
        shim,
        &["iperf3", "-s", "-B", &ip, "-p", "5201", "-1"],
    )?;
    cluster.wait_listening("a2", 5201)?;
    let mut client = cluster.spawn(
        &workload("node-a1", "bench-client"),
        shim,
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
