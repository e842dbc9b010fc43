//! The AF_XDP engine's steering program (`bpf/steer.c`, built by `build.rs` with clang),
//! loaded and attached with aya: frames for the stack's IPv4 address (IPv4 to it, ARP for it)
//! go to the engine's socket, the rest to the kernel.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};

use aya::Ebpf;
use aya::maps::{Array, XskMap};
use aya::programs::{Xdp, XdpFlags};

/// The compiled program (ELF), aligned as aya's parser needs.
static PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/steer.o"));

/// The program attached to an interface in generic (SKB) mode, so that it works on veth; it is
/// detached, and its maps freed, when this is dropped.
#[derive(Debug)]
pub(crate) struct Steering {
    _ebpf: Ebpf,
}

impl Steering {
    /// Steers frames for `address` arriving on queue `queue` of interface `ifindex` to
    /// `socket` (an AF_XDP socket bound there).
    pub(crate) fn attach(
        ifindex: u32,
        queue: u32,
        socket: &OwnedFd,
        address: Ipv4Addr,
    ) -> io::Result<Self> {
        let mut ebpf = Ebpf::load(PROGRAM).map_err(|e| failed("loading bpf/steer.c", e))?;
        {
            let mut config: Array<_, u32> = Array::try_from(map(&mut ebpf, "config")?)
                .map_err(|e| failed("the config map", e))?;
            // Compared with the packet's address as loaded from memory: network order bytes.
            config
                .set(0, u32::from_ne_bytes(address.octets()), 0)
                .map_err(|e| failed("setting the address", e))?;
        }
        {
            let mut sockets = XskMap::try_from(map(&mut ebpf, "xsks")?)
                .map_err(|e| failed("the socket map", e))?;
            sockets
                .set(queue, socket.as_raw_fd(), 0)
                .map_err(|e| failed("adding the AF_XDP socket", e))?;
        }
        let program: &mut Xdp = ebpf
            .program_mut("steer")
            .ok_or_else(|| io::Error::other("bpf/steer.c has no program `steer`"))?
            .try_into()
            .map_err(|e| failed("the steer program", e))?;
        program
            .load()
            .map_err(|e| failed("loading the steer program", e))?;
        program
            .attach_to_if_index(ifindex, XdpFlags::SKB_MODE)
            .map_err(|e| failed("attaching the steer program", e))?;
        Ok(Self { _ebpf: ebpf })
    }
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
