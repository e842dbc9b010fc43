//! `stackroute-netperf`: runs the stackroute netstack as a TCP client or server over a packet
//! I/O engine, so it can face the Linux kernel and real programs. Ends by printing one JSON line.

mod host;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use stackroute_nethost::EngineKind;
use stackroute_netstack::Ipv6Config;
use stackroute_netstack::congestion::CongestionControl;
use stackroute_pktio::{DpdkConfig, Hugepages};

/// Run the stackroute user-space TCP stack as a client or server.
#[derive(Parser, Debug)]
#[command(name = "stackroute-netperf", version)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand, Debug)]
enum Mode {
    /// Accept connections and count (or echo) what arrives, or answer HTTP requests.
    Server(ServerArgs),
    /// Connect, then send a bulk payload, run request/response round trips or fetch over HTTP.
    Client(ClientArgs),
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Engine {
    /// AF_PACKET with mmap'ed TPACKET_V2 rings.
    #[value(name = "af_packet")]
    AfPacket,
    /// AF_XDP (copy mode, XDP program in generic mode) on queue 0.
    #[value(name = "af_xdp")]
    AfXdp,
    /// A TAP interface (created if missing).
    Tap,
    /// A DPDK port (`--dpdk-args`); needs a build with `--features dpdk`.
    Dpdk,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum DpdkHugepages {
    Auto,
    On,
    Off,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Cc {
    Bbr,
    Cubic,
    Reno,
}

impl From<Cc> for CongestionControl {
    fn from(cc: Cc) -> Self {
        match cc {
            Cc::Bbr => Self::Bbr,
            Cc::Cubic => Self::Cubic,
            Cc::Reno => Self::Reno,
        }
    }
}

#[derive(Args, Debug, Clone)]
struct Common {
    /// Packet I/O engine; a comma-separated list is tried in order (`dpdk,af_packet`: DPDK, or
    /// AF_PACKET when DPDK cannot open, with the reason in the report).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "af_packet")]
    engine: Vec<Engine>,
    /// Interface to attach to (for DPDK only when another engine follows it: EAL's arguments
    /// name DPDK's device).
    #[arg(long)]
    interface: Option<String>,
    /// EAL arguments for `--engine dpdk`, one string with shell quoting
    /// (`"--vdev=net_af_packet0,iface=eth1"`, `"-a 0000:03:00.0"`). The engine adds a
    /// per-process --file-prefix, --no-shconf, --no-telemetry, --no-pci (unless PCI devices
    /// are allowed), --lcores 0@(this process's CPUs) and the memory mode, each unless given.
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    dpdk_args: String,
    /// The DPDK port by name (default: the only one EAL finds).
    #[arg(long)]
    dpdk_port: Option<String>,
    /// Mbufs in the DPDK pool (the af_xdp PMD needs several thousand).
    #[arg(long, default_value_t = 8191)]
    dpdk_mbufs: u32,
    /// DPDK memory: hugepages when enough are free (auto), always (on) or never (off).
    #[arg(long, value_enum, default_value = "auto")]
    dpdk_hugepages: DpdkHugepages,
    /// Do not use the DPDK port's checksum offloads.
    #[arg(long)]
    dpdk_no_offloads: bool,
    /// The stack's own address, IP/PREFIX (IPv4 or IPv6; give it twice for both). Use an
    /// address the kernel does not own.
    #[arg(long, required = true)]
    address: Vec<String>,
    /// Next hop for off-subnet destinations (one per address family).
    #[arg(long)]
    gateway: Vec<IpAddr>,
    /// Congestion controller.
    #[arg(long, value_enum, default_value = "bbr")]
    cc: Cc,
    /// Ethernet address to use (default: the interface's own).
    #[arg(long)]
    mac: Option<String>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// Disable Nagle's algorithm.
    #[arg(long)]
    nodelay: bool,
    /// Skip the SHA-256 of the data (it costs as much CPU as the stack at Gbit/s rates).
    #[arg(long)]
    no_checksum: bool,
    /// Busy-poll this many microseconds after activity before sleeping (0 disables). Default
    /// 200, or 0 when the process runs under a real-time policy (`chrt -f`): the kernel
    /// throttles a real-time task that never sleeps for 50 ms of every second.
    #[arg(long)]
    busy_poll_us: Option<u64>,
    /// Spin without `sched_yield()` between empty busy polls (by default the host loop yields,
    /// so a task woken on its CPU, such as ksoftirqd or the peer, runs at once).
    #[arg(long)]
    busy_poll_no_yield: bool,
}

#[derive(Args, Debug)]
struct ServerArgs {
    #[command(flatten)]
    common: Common,
    /// Port to listen on.
    #[arg(long)]
    port: u16,
    /// Echo received bytes back instead of only counting them.
    #[arg(long)]
    echo: bool,
    /// Answer each connection's HTTP request with `200 OK` and this many bytes, then close
    /// (for curl and other unmodified HTTP clients); the report has the body's SHA-256.
    #[arg(long, conflicts_with = "echo")]
    http_bytes: Option<u64>,
    /// Serve one test to an unmodified `iperf3 -c` (TCP, client sending, any -P), then exit.
    #[arg(long, conflicts_with_all = ["echo", "http_bytes"])]
    iperf3: bool,
    /// Exit after serving this many connections (0: serve until the timeout).
    #[arg(long, default_value_t = 1)]
    connections: u64,
}

#[derive(Args, Debug)]
struct ClientArgs {
    #[command(flatten)]
    common: Common,
    /// Server to connect to, IP:PORT or [IPv6]:PORT.
    #[arg(long)]
    connect: SocketAddr,
    /// Send this many bytes, shut down the write side, read until the peer closes.
    #[arg(long, conflicts_with = "rr")]
    send: Option<u64>,
    /// Run this many request/response round trips.
    #[arg(long, conflicts_with = "http_get")]
    rr: Option<u64>,
    /// Fetch this path with HTTP/1.0 `GET` (from python's http.server, nginx, ...) and read
    /// until the server closes; the report has the status, body size and body SHA-256.
    #[arg(long, conflicts_with = "send")]
    http_get: Option<String>,
    /// Request and response size for `--rr`.
    #[arg(long, default_value_t = 64)]
    rr_size: usize,
    /// Open this many connections one after another (connection churn).
    #[arg(long, default_value_t = 1)]
    connections: u64,
}

fn parse_mac(text: &str) -> Result<[u8; 6]> {
    let parts: Vec<&str> = text.split(':').collect();
    if parts.len() != 6 {
        bail!("MAC address must have six colon-separated bytes: {text}");
    }
    let mut mac = [0u8; 6];
    for (out, part) in mac.iter_mut().zip(parts) {
        *out = u8::from_str_radix(part, 16).with_context(|| format!("bad MAC byte {part}"))?;
    }
    Ok(mac)
}

fn parse_cidr(text: &str) -> Result<(IpAddr, u8)> {
    let (ip, prefix) = text
        .split_once('/')
        .with_context(|| format!("address must be IP/PREFIX: {text}"))?;
    let ip: IpAddr = ip
        .parse()
        .with_context(|| format!("bad IP address in {text}"))?;
    let prefix: u8 = prefix
        .parse()
        .with_context(|| format!("bad prefix length in {text}"))?;
    let max = if ip.is_ipv6() { 128 } else { 32 };
    if prefix > max {
        bail!("prefix length {prefix} is above {max} in {text}");
    }
    Ok((ip, prefix))
}

/// An IPv4 address, its prefix length and gateway.
type Ipv4Interface = (Ipv4Addr, u8, Option<Ipv4Addr>);

/// The interface's addresses: at most one IPv4 and one IPv6 address, each with its gateway.
fn interface_addresses(
    addresses: &[String],
    gateways: &[IpAddr],
) -> Result<(Option<Ipv4Interface>, Option<Ipv6Config>)> {
    let (mut v4, mut v6) = (None, None);
    for text in addresses {
        match parse_cidr(text)? {
            (IpAddr::V4(ip), prefix) if v4.is_none() => v4 = Some((ip, prefix, None)),
            (IpAddr::V6(ip), prefix) if v6.is_none() => v6 = Some(Ipv6Config::new(ip, prefix)),
            _ => bail!("--address {text}: one address per family (IPv4, IPv6)"),
        }
    }
    for gateway in gateways {
        match (gateway, &mut v4, &mut v6) {
            (IpAddr::V4(g), Some((_, _, slot @ None)), _) => *slot = Some(*g),
            (IpAddr::V6(g), _, Some(config)) if config.gateway.is_none() => {
                config.gateway = Some(*g);
            }
            _ => bail!(
                "--gateway {gateway}: needs an --address of its family, and one gateway per family"
            ),
        }
    }
    Ok((v4, v6))
}

/// Busy-poll window when `--busy-poll-us` is not given. A real-time task that busy-polls
/// through a bulk transfer never sleeps (the next frame always arrives within the window), and
/// the kernel's real-time throttling (`sched_rt_runtime_us`, 950 ms of every 1000 by default)
/// then stops it for ~50 ms each second: the link idles 5 % of the time. Measured at 100 Mbit/s,
/// 30 ms, 5 % loss under `chrt -f`: 87 Mbit/s busy-polling, 90.7 sleeping between frames.
fn default_busy_poll_us() -> u64 {
    const BUSY_POLL_US: u64 = 200;
    match scheduling_policy() {
        Some(policy @ (libc::SCHED_FIFO | libc::SCHED_RR)) => {
            let name = if policy == libc::SCHED_FIFO {
                "SCHED_FIFO"
            } else {
                "SCHED_RR"
            };
            eprintln!(
                "stackroute-netperf: running under {name}: busy polling off \
                 (real-time throttling would stop the loop 50 ms a second; --busy-poll-us N overrides)"
            );
            0
        }
        _ => BUSY_POLL_US,
    }
}

/// This process's scheduling policy from `/proc/self/stat` (field 41), without a system call
/// wrapper of our own; `None` if it cannot be read.
fn scheduling_policy() -> Option<i32> {
    policy_from_stat(&std::fs::read_to_string("/proc/self/stat").ok()?)
}

fn policy_from_stat(stat: &str) -> Option<i32> {
    // Field 2, the command name, may contain spaces and parentheses: count from its end.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(41 - 3)?.parse().ok()
}

fn host_config(common: &Common) -> Result<host::HostConfig> {
    let (v4, ipv6) = interface_addresses(&common.address, &common.gateway)?;
    let (address, prefix_len, gateway) = v4.unwrap_or((Ipv4Addr::UNSPECIFIED, 0, None));
    if common.engine.contains(&Engine::AfXdp) && v4.is_none() {
        bail!(
            "--engine af_xdp needs an IPv4 --address: its XDP program steers frames by IPv4 \
             address and ARP; use af_packet or tap for IPv6 only"
        );
    }
    Ok(host::HostConfig {
        engines: engines(common, address)?,
        interface: common.interface.clone().unwrap_or_default(),
        address,
        prefix_len,
        gateway,
        ipv6,
        mac: common.mac.as_deref().map(parse_mac).transpose()?,
        congestion_control: common.cc.into(),
        nodelay: common.nodelay,
        timeout: Duration::from_secs(common.timeout),
        busy_poll: Duration::from_micros(common.busy_poll_us.unwrap_or_else(default_busy_poll_us)),
        busy_poll_yield: !common.busy_poll_no_yield,
        checksum: !common.no_checksum,
    })
}

fn engines(common: &Common, address: Ipv4Addr) -> Result<Vec<EngineKind>> {
    let needs_interface = common.engine.iter().any(|&e| e != Engine::Dpdk);
    if needs_interface && common.interface.is_none() {
        bail!("--interface is required unless every --engine is dpdk");
    }
    let dpdk = DpdkConfig {
        eal_args: DpdkConfig::parse_eal_args(&common.dpdk_args).map_err(anyhow::Error::msg)?,
        port: common.dpdk_port.clone(),
        mbufs: common.dpdk_mbufs,
        hugepages: match common.dpdk_hugepages {
            DpdkHugepages::Auto => Hugepages::Auto,
            DpdkHugepages::On => Hugepages::On,
            DpdkHugepages::Off => Hugepages::Off,
        },
        offloads: !common.dpdk_no_offloads,
        ..DpdkConfig::default()
    };
    Ok(common
        .engine
        .iter()
        .map(|engine| match engine {
            Engine::AfPacket => EngineKind::AfPacket,
            Engine::Tap => EngineKind::Tap,
            Engine::AfXdp => EngineKind::AfXdp(address),
            Engine::Dpdk => EngineKind::Dpdk(dpdk.clone()),
        })
        .collect())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let report = match cli.mode {
        Mode::Server(args) => {
            let config = host_config(&args.common)?;
            if args.iperf3 {
                let report = host::run_iperf3_server(&config, args.port)?;
                println!("{report}");
                return Ok(());
            }
            let work = match (args.echo, args.http_bytes) {
                (_, Some(body_bytes)) => host::ServerWork::Http { body_bytes },
                (true, None) => host::ServerWork::Echo,
                (false, None) => host::ServerWork::Count,
            };
            host::run_server(&config, args.port, work, args.connections)?
        }
        Mode::Client(args) => {
            let config = host_config(&args.common)?;
            let work = match (args.send, args.rr, args.http_get) {
                (Some(bytes), None, None) => host::ClientWork::Send(bytes),
                (None, Some(round_trips), None) => host::ClientWork::RequestResponse {
                    round_trips,
                    size: args.rr_size.max(1),
                },
                (None, None, Some(path)) if path.starts_with('/') => {
                    host::ClientWork::HttpGet(path)
                }
                (None, None, Some(path)) => {
                    bail!("--http-get takes a path starting with /: {path}")
                }
                _ => {
                    bail!("the client needs exactly one of --send BYTES, --rr N or --http-get PATH")
                }
            };
            host::run_client(&config, args.connect, work, args.connections.max(1))?
        }
    };
    println!("{}", report);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheduling_policy_is_field_41_of_proc_stat() {
        // A SCHED_FIFO task (policy 1) whose command name holds a space and a parenthesis.
        let stat = "4242 (net perf) x) R 1 4242 4242 0 -1 4194560 600 0 0 0 12 3 0 0 -11 0 1 0 \
                    9000 10000000 500 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 10 1 0 0 0";
        assert_eq!(policy_from_stat(stat), Some(libc::SCHED_FIFO));
        assert_eq!(policy_from_stat("4242 (truncated) R 1"), None);
        // This test process: readable, and a valid policy number.
        assert!(scheduling_policy().is_some_and(|p| (0..=6).contains(&p)));
    }
}

#[cfg(test)]
mod address_tests {
    use super::*;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn one_address_and_gateway_per_family() {
        let (v4, v6) = interface_addresses(
            &strings(&["10.0.0.2/24", "fd00::2/64"]),
            &["fd00::1".parse().unwrap(), "10.0.0.1".parse().unwrap()],
        )
        .unwrap();
        assert_eq!(
            v4,
            Some((
                "10.0.0.2".parse().unwrap(),
                24,
                Some("10.0.0.1".parse().unwrap())
            ))
        );
        let v6 = v6.unwrap();
        assert_eq!(
            (v6.address, v6.prefix_len),
            ("fd00::2".parse().unwrap(), 64)
        );
        assert_eq!(v6.gateway, Some("fd00::1".parse().unwrap()));
        // IPv6 only.
        let (v4, v6) = interface_addresses(&strings(&["fd00::2/64"]), &[]).unwrap();
        assert!(v4.is_none() && v6.is_some());
    }

    #[test]
    fn bad_address_lists_are_refused_with_the_culprit_named() {
        for (addresses, gateways, culprit) in [
            (&["10.0.0.2/24", "10.0.0.3/24"][..], &[][..], "10.0.0.3/24"),
            (&["fd00::2/129"][..], &[][..], "fd00::2/129"),
            (&["10.0.0.2"][..], &[][..], "10.0.0.2"),
            (&["10.0.0.2/24"][..], &["fd00::1"][..], "fd00::1"),
            (
                &["10.0.0.2/24"][..],
                &["10.0.0.1", "10.0.0.9"][..],
                "10.0.0.9",
            ),
        ] {
            let gateways: Vec<IpAddr> = gateways.iter().map(|g| g.parse().unwrap()).collect();
            let error = interface_addresses(&strings(addresses), &gateways)
                .expect_err("must be refused")
                .to_string();
            assert!(error.contains(culprit), "{error:?} does not name {culprit}");
        }
    }
}
