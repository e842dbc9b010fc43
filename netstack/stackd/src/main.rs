//! `stackroute-stackd`: the user-space TCP stack instance of one network namespace. The shim
//! hands it applications' connections over its control socket
//! (`stackroute_local_api::relay`); it opens them with the stackroute netstack on the
//! namespace's interface, sharing the kernel's address for a reserved port range, and relays
//! bytes between the application's socket end and the TCP connection.

#![deny(unsafe_code)]

mod control;
mod discover;
mod instance;
mod listeners;
mod rdma;
mod relay;
mod sys;

use std::io::Write as _;
use std::net::Ipv4Addr;
use std::ops::RangeInclusive;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use stackroute_local_api::relay::socket_name;
use stackroute_nethost::{BusyPoll, EngineKind, Host, SharedAddress};
use stackroute_netstack::Device as _;
use stackroute_netstack::{Ipv6Config, Stack, StackConfig};
use stackroute_pktio::{
    AfPacket, AnyDevice, DpdkConfig, NotShared, RingConfig, SharedXdp, Steer, XdpHandover,
};
use tracing::{info, warn};

/// Relay applications' TCP connections through the stackroute user-space stack.
#[derive(Parser, Debug)]
#[command(name = "stackroute-stackd", version)]
struct Cli {
    /// Tag of the control socket: listens on the abstract name `stackroute-stackd.TAG`.
    #[arg(long)]
    socket_name: String,
    /// An AF_PACKET socket created in this namespace and inherited (unbound, no rings): the
    /// instance then needs no capability.
    #[arg(long)]
    packet_fd: Option<i32>,
    /// An AF_XDP handover prepared in this namespace and inherited, as five descriptors
    /// SOCKET,UMEM,SOCKET_MAP,CONFIG_MAP,LINK (`stackroute_pktio::XdpHandover`); --packet-fd is
    /// then the packet socket filtered to the neighbour protocols. If AF_XDP cannot be set up
    /// from it, the instance says why and uses AF_PACKET on that socket.
    #[arg(long, value_parser = parse_xdp_fds)]
    xdp_fds: Option<[i32; 5]>,
    /// The interface (default: the one of the IPv4 default route, or the only one up). Without
    /// --packet-fd the instance opens AF_PACKET itself (needs CAP_NET_RAW).
    #[arg(long)]
    interface: Option<String>,
    /// Local ports of the stack's connections; the kernel must be kept off them.
    #[arg(long, default_value = "61000-62999", value_parser = parse_ports)]
    ports: RangeInclusive<u16>,
    /// The address the stack uses, IP/PREFIX (default: the interface's first IPv4 address,
    /// shared with the kernel).
    #[arg(long, value_parser = parse_cidr)]
    address: Option<(Ipv4Addr, u8)>,
    /// Next hop for off-subnet destinations (default: the IPv4 default route's gateway).
    #[arg(long)]
    gateway: Option<Ipv4Addr>,
    /// Serve IPv4 only, even if the interface has a global IPv6 address (for a namespace
    /// whose kernel could not be kept off the instance's IPv6 ports).
    #[arg(long)]
    ipv4_only: bool,
    /// Write `ready\n` to this inherited descriptor once listening, then close it.
    #[arg(long)]
    ready_fd: Option<i32>,
    /// Busy-poll this many microseconds after activity before sleeping (0 disables).
    #[arg(long, default_value_t = 200)]
    busy_poll_us: u64,
    /// Relayed connections at once (beyond: ENOBUFS).
    #[arg(long, default_value_t = 16384)]
    max_connections: usize,
    /// The verbs provider (`libstackroute_rdma.so`) for connections upgraded to RDMA; without
    /// it every upgrade this instance is asked for is declined (`stack-unavailable`).
    #[arg(long)]
    rdma_provider: Option<std::path::PathBuf>,
    /// Run on a DPDK port: EAL arguments naming it, one string with shell quoting
    /// (`"--vdev=net_af_packet0,iface=eth1"`, `"-a 0000:03:00.0"`, `"--vdev=net_memif0,…"`).
    /// If DPDK cannot open (a build without the `dpdk` feature, bad arguments, missing
    /// capabilities), the reason is logged and the instance uses its other engines.
    #[arg(long, allow_hyphen_values = true)]
    dpdk_args: Option<String>,
    /// The DPDK port by name (default: the only one EAL finds).
    #[arg(long, requires = "dpdk_args")]
    dpdk_port: Option<String>,
    /// The stack owns --address alone on a device of its own (Dedicated isolation: a NIC,
    /// an SR-IOV VF, a DPDK port): every port is the stack's, none is kept for the kernel.
    #[arg(long, requires = "address")]
    dedicated: bool,
}

fn parse_ports(text: &str) -> Result<RangeInclusive<u16>, String> {
    let (low, high) = text
        .split_once('-')
        .ok_or_else(|| format!("ports must be LOW-HIGH: {text}"))?;
    let low: u16 = low
        .trim()
        .parse()
        .map_err(|_| format!("bad port {low:?}"))?;
    let high: u16 = high
        .trim()
        .parse()
        .map_err(|_| format!("bad port {high:?}"))?;
    if low == 0 || low > high {
        return Err(format!("ports must be 1 <= LOW <= HIGH: {text}"));
    }
    Ok(low..=high)
}

fn parse_xdp_fds(text: &str) -> Result<[i32; 5], String> {
    let fds: Vec<i32> = text
        .split(',')
        .map(|fd| {
            fd.trim()
                .parse()
                .map_err(|_| format!("bad descriptor {fd:?}"))
        })
        .collect::<Result<_, _>>()?;
    fds.try_into()
        .map_err(|_| format!("--xdp-fds takes five descriptors: {text}"))
}

fn parse_cidr(text: &str) -> Result<(Ipv4Addr, u8), String> {
    let (ip, prefix) = text
        .split_once('/')
        .ok_or_else(|| format!("address must be IPv4/PREFIX: {text}"))?;
    let ip: Ipv4Addr = ip.parse().map_err(|_| format!("bad IPv4 address {ip:?}"))?;
    let prefix: u8 = prefix
        .parse()
        .ok()
        .filter(|p| *p <= 32)
        .ok_or_else(|| format!("bad prefix length {prefix:?}"))?;
    Ok((ip, prefix))
}

/// Lets the soft descriptor limit rise to the hard one: each relayed connection holds one.
fn raise_descriptor_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        let _ = setrlimit(
            Resource::Nofile,
            rustix::process::Rlimit {
                current: limit.maximum,
                maximum: limit.maximum,
            },
        );
    }
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    // Inherited descriptors first, before anything else could take their numbers.
    let mut numbers: Vec<i32> = cli.packet_fd.into_iter().chain(cli.ready_fd).collect();
    numbers.extend(cli.xdp_fds.iter().flatten());
    let mut seen = std::collections::HashSet::new();
    if let Some(twice) = numbers.iter().find(|fd| !seen.insert(**fd)) {
        bail!("descriptor {twice} is named twice (--packet-fd, --ready-fd, --xdp-fds)");
    }
    if cli.xdp_fds.is_some() && cli.packet_fd.is_none() {
        bail!("--xdp-fds needs --packet-fd (the neighbour socket)");
    }
    let packet_fd = cli
        .packet_fd
        .map(sys::take_inherited_fd)
        .transpose()
        .context("--packet-fd")?;
    let ready_fd = cli
        .ready_fd
        .map(sys::take_inherited_fd)
        .transpose()
        .context("--ready-fd")?;
    let handover = cli
        .xdp_fds
        .map(
            |[socket, umem, sockets, config, link]| -> Result<XdpHandover> {
                let take = |fd| sys::take_inherited_fd(fd).context("--xdp-fds");
                Ok(XdpHandover {
                    socket: take(socket)?,
                    umem: take(umem)?,
                    sockets: take(sockets)?,
                    config: take(config)?,
                    link: take(link)?,
                })
            },
        )
        .transpose()?;
    raise_descriptor_limit();
    let network = discover::network(
        cli.interface.as_deref(),
        cli.address,
        cli.gateway,
        !cli.ipv4_only,
    )?;
    let (device, engine, mac) = match dpdk_engine(&cli, &network.interface) {
        Some((device, mac)) => (device, "dpdk", mac),
        None => {
            let (device, engine) = packet_engine(&cli, &network, packet_fd, handover)?;
            let mac = stackroute_pktio::interface::mac(&network.interface)
                .with_context(|| format!("the Ethernet address of {}", network.interface))?;
            (device, engine, mac)
        }
    };
    let mut config = StackConfig::new(
        mac,
        network.address,
        network.prefix_len,
        stackroute_nethost::random_secret()?,
    );
    config.gateway = network.gateway;
    let ipv6 = network
        .ipv6
        .map(|(address, prefix_len, gateway)| Ipv6Config {
            gateway,
            ..Ipv6Config::new(address, prefix_len)
        });
    config.ipv6 = ipv6;
    // Every engine reports the MTU of its device (a DPDK port knows its own).
    config.mtu = device.capabilities().mtu;
    config.ephemeral_ports = cli.ports.clone();
    let mut host = Host::new(
        Stack::new(config),
        device,
        BusyPoll {
            window: Duration::from_micros(cli.busy_poll_us),
            yield_between: true,
        },
    );
    if !cli.dedicated {
        host.shared = Some(SharedAddress {
            address6: network.ipv6.map(|(address, ..)| address),
            ..SharedAddress::new(network.address, cli.ports.clone())
        });
    }
    host.max_sleep = Duration::from_millis(200);
    let name = socket_name(&cli.socket_name);
    let listener = control::listen(&name)
        .with_context(|| format!("listening on the abstract socket @{name}"))?;
    let (signal_read, signal_write) = UnixStream::pair().context("signal pipe")?;
    signal_write.set_nonblocking(true)?;
    signal_hook::low_level::pipe::register(signal_hook::consts::SIGTERM, signal_write)
        .context("handling SIGTERM")?;
    let settings = instance::Settings {
        max_connections: cli.max_connections,
        address: network.address,
        prefix_len: network.prefix_len,
        gateway: network.gateway,
        ipv6,
        rdma_provider: cli.rdma_provider.clone(),
    };
    let mut instance = instance::Instance::new(host, listener, signal_read, settings)?;
    info!(
        socket = %format!("@{name}"),
        interface = %network.interface,
        address = %format!("{}/{}", network.address, network.prefix_len),
        gateway = ?network.gateway,
        ipv6 = ?ipv6.map(|v6| format!("{}/{} via {:?}", v6.address, v6.prefix_len, v6.gateway)),
        ports = %format!("{}-{}", cli.ports.start(), cli.ports.end()),
        inherited_packet_socket = cli.packet_fd.is_some(),
        engine,
        "listening"
    );
    if let Some(fd) = ready_fd {
        signal_ready(fd, engine);
    }
    instance.run().context("event loop")?;
    Ok(())
}

/// The packet engine: AF_XDP from an inherited handover (falling back to AF_PACKET on the
/// neighbour socket, with the reason logged), AF_PACKET on an inherited socket, or AF_PACKET
/// opened here (CAP_NET_RAW). Also its name, for the readiness message and the log.
fn packet_engine(
    cli: &Cli,
    network: &discover::Network,
    packet_fd: Option<OwnedFd>,
    handover: Option<XdpHandover>,
) -> Result<(AnyDevice, &'static str)> {
    let rings = RingConfig::default();
    let interface = &network.interface;
    let packet_fd = match (handover, packet_fd) {
        (Some(handover), Some(neighbours)) => {
            let steer = Steer::SharedPorts {
                ipv4: network.address,
                ipv6: network.ipv6.map(|(address, ..)| address),
                ports: cli.ports.clone(),
            };
            match SharedXdp::from_handover(handover, neighbours, interface, &steer) {
                Ok(device) => return Ok((AnyDevice::SharedXdp(Box::new(device)), "af_xdp")),
                Err(NotShared {
                    error,
                    packet_socket,
                }) => {
                    warn!(%error, "AF_XDP is unavailable; using AF_PACKET");
                    Some(packet_socket.context(
                        "AF_XDP failed after its packet socket was set up; no AF_PACKET fallback",
                    )?)
                }
            }
        }
        (_, packet_fd) => packet_fd,
    };
    let engine = match packet_fd {
        Some(fd) => AfPacket::from_fd(fd, interface, rings)
            .with_context(|| format!("setting up the inherited AF_PACKET socket on {interface}"))?,
        None => AfPacket::open(interface, rings)
            .with_context(|| format!("opening AF_PACKET on {interface} (needs CAP_NET_RAW)"))?,
    };
    Ok((AnyDevice::AfPacket(engine), "af_packet"))
}

/// The DPDK port `--dpdk-args` names and its MAC, if it opens; why not is logged.
fn dpdk_engine(cli: &Cli, interface: &str) -> Option<(AnyDevice, [u8; 6])> {
    let args = cli.dpdk_args.as_deref()?;
    let opened = DpdkConfig::parse_eal_args(args)
        .map_err(std::io::Error::other)
        .and_then(|eal_args| {
            let config = DpdkConfig {
                eal_args,
                port: cli.dpdk_port.clone(),
                ..DpdkConfig::default()
            };
            stackroute_nethost::open_engine(EngineKind::Dpdk(config), interface)
        });
    match opened {
        Ok(opened) => Some(opened),
        Err(error) => {
            warn!(%error, "DPDK is unavailable; using the next engine");
            None
        }
    }
}

/// `engine NAME\nready\n` on the readiness descriptor, then it is closed — or, for a standard
/// stream, pointed at /dev/null so its number is not reused by a socket that stray output
/// could reach.
fn signal_ready(fd: OwnedFd, engine: &str) {
    let mut file = std::fs::File::from(fd);
    let _ = file.write_all(format!("engine {engine}\nready\n").as_bytes());
    let fd = OwnedFd::from(file);
    if std::os::fd::AsRawFd::as_raw_fd(&fd) <= 2 {
        let mut fd = fd;
        if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
            let _ = rustix::io::dup2(&null, &mut fd);
        }
        std::mem::forget(fd);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_and_addresses_parse_strictly() {
        assert_eq!(parse_ports("61000-62999"), Ok(61000..=62999));
        assert_eq!(parse_ports("5-5"), Ok(5..=5));
        for bad in ["0-10", "10-5", "61000", "a-b", "1-70000"] {
            assert!(parse_ports(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_cidr("10.0.0.1/24"),
            Ok((Ipv4Addr::new(10, 0, 0, 1), 24))
        );
        for bad in ["10.0.0.1", "10.0.0.1/33", "fd00::1/64", "x/1"] {
            assert!(parse_cidr(bad).is_err(), "{bad}");
        }
    }
}
