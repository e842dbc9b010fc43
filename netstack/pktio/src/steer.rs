//! The AF_XDP engine's steering program (`bpf/steer.c`, built by `build.rs` with clang),
//! loaded with aya and attached through a BPF link: frames for the stack go to its AF_XDP
//! socket, the rest to the kernel. Also the program's socket filter (`neighbours`) that
//! leaves a packet socket only the ARP, ICMP and ICMPv6 frames a stack sharing the kernel's
//! address still needs to read.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd as _, AsRawFd, OwnedFd};

use aya::Ebpf;
use aya::maps::{Array, MapData, XskMap};
use aya::programs::{SocketFilter, Xdp};

use crate::sys;

/// The compiled program (ELF), aligned as aya's parser needs.
static PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/steer.o"));

/// `XDP_FLAGS_SKB_MODE`: generic XDP, which works on every interface, veth included.
const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;

/// What the program steers to the stack (`struct steer_config` in `bpf/steer.c`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Steer {
    /// Everything for an IPv4 address the stack owns alone: IPv4 to it, ARP asking for it.
    WholeAddress(Ipv4Addr),
    /// TCP to the kernel's own addresses whose destination or source port is in `ports`.
    SharedPorts {
        /// The shared IPv4 address.
        ipv4: Ipv4Addr,
        /// The shared IPv6 address, if the stack serves IPv6.
        ipv6: Option<Ipv6Addr>,
        /// The stack's ports (its connections' local ports; dual-listen clients' source
        /// ports).
        ports: std::ops::RangeInclusive<u16>,
    },
}

/// `struct steer_config` as six native-endian words: the IPv4 address, the IPv6 address, and
/// the two 16-bit ports in one word (laid out as the C struct lays them out).
fn config_words(steer: &Steer) -> [u32; 6] {
    // Compared with addresses as loaded from packet memory: network-order bytes.
    let word = |bytes: &[u8]| u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let mut words = [0; 6];
    match steer {
        Steer::WholeAddress(address) => words[0] = word(&address.octets()),
        Steer::SharedPorts { ipv4, ipv6, ports } => {
            words[0] = word(&ipv4.octets());
            if let Some(v6) = ipv6 {
                for (slot, chunk) in words[1..5].iter_mut().zip(v6.octets().chunks_exact(4)) {
                    *slot = word(chunk);
                }
            }
            let (low, high) = (ports.start().to_ne_bytes(), ports.end().to_ne_bytes());
            words[5] = word(&[low[0], low[1], high[0], high[1]]);
        }
    }
    words
}

/// The steering program attached to an interface, with the descriptors that keep it there.
#[derive(Debug)]
pub(crate) struct Steering {
    /// The socket map (`xsks`): a socket bound to queue Q receives through entry Q.
    pub(crate) sockets: OwnedFd,
    /// The `config` map: what to steer.
    pub(crate) config: OwnedFd,
    /// The BPF link: the program is detached when the last descriptor of it closes.
    pub(crate) link: OwnedFd,
}

impl Steering {
    /// Loads the program, steering nothing until [`Steering::configure`], and attaches it to
    /// interface `ifindex` of the calling thread's network namespace (needs CAP_BPF and
    /// CAP_NET_ADMIN there).
    pub(crate) fn attach(ifindex: u32) -> io::Result<Self> {
        let mut ebpf = Ebpf::load(PROGRAM).map_err(|e| failed("loading bpf/steer.c", e))?;
        // Descriptors of the maps that outlive the loaded object.
        let map_fd = |ebpf: &mut Ebpf, name: &str| match map(ebpf, name)? {
            aya::maps::Map::XskMap(data) | aya::maps::Map::Array(data) => {
                data.fd().as_fd().try_clone_to_owned()
            }
            _ => Err(io::Error::other(format!(
                "bpf/steer.c's `{name}` has an unexpected type"
            ))),
        };
        let sockets = map_fd(&mut ebpf, "xsks")?;
        let config = map_fd(&mut ebpf, "config")?;
        let program: &mut Xdp = ebpf
            .program_mut("steer")
            .ok_or_else(|| io::Error::other("bpf/steer.c has no program `steer`"))?
            .try_into()
            .map_err(|e| failed("the steer program", e))?;
        program
            .load()
            .map_err(|e| failed("loading the steer program", e))?;
        let fd = program
            .fd()
            .map_err(|e| failed("the steer program's descriptor", e))?;
        let link = sys::xdp_link_create(fd.as_fd().as_raw_fd(), ifindex, XDP_FLAGS_SKB_MODE)
            .map_err(|e| io::Error::new(e.kind(), format!("attaching the steer program: {e}")))?;
        // Dropping `ebpf` closes its descriptors; the link keeps the program and its maps.
        Ok(Self {
            sockets,
            config,
            link,
        })
    }

    /// Writes what to steer into the program's `config` map (through its descriptor; no
    /// capability needed).
    pub(crate) fn configure(config: &OwnedFd, steer: &Steer) -> io::Result<()> {
        let data = MapData::from_fd(config.try_clone()?)
            .map_err(|e| failed("the config map's descriptor", e))?;
        let mut map: Array<_, [u32; 6]> = Array::try_from(aya::maps::Map::Array(data))
            .map_err(|e| failed("the config map", e))?;
        map.set(0, config_words(steer), 0)
            .map_err(|e| failed("writing the steering configuration", e))
    }

    /// Puts `socket` (an AF_XDP socket bound to queue `queue`) into the socket map; needs no
    /// capability, only the map's descriptor.
    pub(crate) fn insert(sockets: &OwnedFd, queue: u32, socket: &OwnedFd) -> io::Result<()> {
        let data = MapData::from_fd(sockets.try_clone()?)
            .map_err(|e| failed("the socket map's descriptor", e))?;
        let mut map = XskMap::try_from(aya::maps::Map::XskMap(data))
            .map_err(|e| failed("the socket map", e))?;
        map.set(queue, socket.as_raw_fd(), 0)
            .map_err(|e| failed("adding the AF_XDP socket to the socket map", e))
    }
}

/// Takes the socket filter off `socket` again.
pub(crate) fn remove_filter(socket: &OwnedFd) -> io::Result<()> {
    sys::detach_socket_filter(socket)
}

/// Leaves `socket` (AF_PACKET) only ARP, ICMP and ICMPv6 frames (the program `neighbours`).
pub(crate) fn filter_to_neighbours(socket: &OwnedFd) -> io::Result<()> {
    let mut ebpf = Ebpf::load(PROGRAM).map_err(|e| failed("loading bpf/steer.c", e))?;
    let program: &mut SocketFilter = ebpf
        .program_mut("neighbours")
        .ok_or_else(|| io::Error::other("bpf/steer.c has no program `neighbours`"))?
        .try_into()
        .map_err(|e| failed("the neighbours program", e))?;
    program
        .load()
        .map_err(|e| failed("loading the neighbours program", e))?;
    let fd = program
        .fd()
        .map_err(|e| failed("the neighbours program's descriptor", e))?;
    // Attached by hand rather than with aya's `attach`, whose link detaches the filter when
    // dropped: the socket outlives this function and goes to another process.
    sys::attach_socket_filter(socket, fd.as_fd().as_raw_fd())
}

fn map<'a>(ebpf: &'a mut Ebpf, name: &str) -> io::Result<&'a mut aya::maps::Map> {
    ebpf.map_mut(name)
        .ok_or_else(|| io::Error::other(format!("bpf/steer.c has no map `{name}`")))
}

/// An aya error as an I/O error naming the step; permission errors keep their kind.
fn failed(step: &str, error: impl std::error::Error + 'static) -> io::Error {
    let mut source: Option<&dyn std::error::Error> = Some(&error);
    let mut kind = io::ErrorKind::Other;
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            kind = io.kind();
            break;
        }
        source = e.source();
    }
    io::Error::new(kind, format!("{step}: {error}"))
}
