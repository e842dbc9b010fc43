//! The engine of a stack sharing the kernel's addresses ([`Steer::SharedPorts`]): AF_XDP for
//! the stack's TCP, plus a packet socket filtered to ARP, ICMP and ICMPv6. XDP cannot hand one
//! frame to both the kernel and a socket, and the kernel, which owns the address, must keep
//! answering ARP and neighbour solicitations; the stack reads copies of those from the packet
//! socket instead (a few frames a second), and everything else of the kernel's traffic never
//! reaches it.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use stackroute_netstack::{Device, DeviceCapabilities, RxMeta};

use crate::af_packet::{AfPacket, RingConfig};
use crate::af_xdp::{AfXdp, XdpHandover};
use crate::steer::{self, Steer};
use crate::sys;

/// AF_XDP plus a packet socket for the neighbour protocols; waits on both through one epoll.
#[derive(Debug)]
pub struct SharedXdp {
    xdp: AfXdp,
    neighbours: AfPacket,
    /// Readable when either socket is.
    ready: OwnedFd,
}

/// Why [`SharedXdp::from_handover`] failed, and the packet socket if it can still serve an
/// AF_PACKET engine (its filter removed).
#[derive(Debug)]
pub struct NotShared {
    /// What failed.
    pub error: io::Error,
    /// The neighbour socket, unfiltered again; `None` once it was consumed.
    pub packet_socket: Option<OwnedFd>,
}

/// The RX ring of the neighbour socket: ARP and ICMP frames only, a small ring suffices.
const NEIGHBOUR_RINGS: RingConfig = RingConfig {
    rx_frames: 64,
    rx_frame_size: 4096,
    tx_frames: 8,
    tx_frame_size: 4096,
};

impl SharedXdp {
    /// A packet socket (of the calling thread's network namespace) that keeps only ARP, ICMP
    /// and ICMPv6 frames: the other half of the handover. Needs CAP_NET_RAW and CAP_BPF.
    pub fn neighbour_socket() -> io::Result<OwnedFd> {
        let socket = sys::packet_socket()?;
        steer::filter_to_neighbours(&socket)?;
        Ok(socket)
    }

    /// Prepares both halves in the calling thread's namespace (needs root): for tests and
    /// for a stack that holds the capabilities itself.
    pub fn prepare(interface: &str) -> io::Result<(XdpHandover, OwnedFd)> {
        Ok((XdpHandover::prepare(interface)?, Self::neighbour_socket()?))
    }

    /// The engine from a prepared handover and neighbour socket, steering `steer` (a
    /// [`Steer::SharedPorts`]); needs no capability. If AF_XDP cannot be set up, the neighbour
    /// socket comes back with its filter removed, for an AF_PACKET engine instead.
    pub fn from_handover(
        handover: XdpHandover,
        neighbour_socket: OwnedFd,
        interface: &str,
        steer: &Steer,
    ) -> Result<Self, NotShared> {
        let xdp = match AfXdp::from_handover(handover, interface, steer) {
            Ok(xdp) => xdp,
            Err(error) => {
                let packet_socket = steer::remove_filter(&neighbour_socket)
                    .is_ok()
                    .then_some(neighbour_socket);
                return Err(NotShared {
                    error,
                    packet_socket,
                });
            }
        };
        let not_shared = |error| NotShared {
            error,
            packet_socket: None,
        };
        let neighbours =
            AfPacket::from_fd(neighbour_socket, interface, NEIGHBOUR_RINGS).map_err(not_shared)?;
        let ready = sys::epoll_of(&[xdp.raw_fd(), neighbours.raw_fd()]).map_err(not_shared)?;
        Ok(Self {
            xdp,
            neighbours,
            ready,
        })
    }

    /// The interface's Ethernet address.
    pub fn mac(&self) -> [u8; 6] {
        self.xdp.mac()
    }

    /// The descriptor to wait on: an epoll instance over both sockets.
    pub fn raw_fd(&self) -> RawFd {
        self.ready.as_raw_fd()
    }
}

impl Device for SharedXdp {
    fn capabilities(&self) -> DeviceCapabilities {
        self.xdp.capabilities()
    }

    fn receive<R>(&mut self, f: impl FnOnce(&[u8], RxMeta) -> R) -> Option<R> {
        // The neighbour socket first: a resolution waited on holds back the stack's sends.
        let mut f = Some(f);
        if let Some(result) = self
            .neighbours
            .receive(|frame, meta| f.take().map(|f| f(frame, meta)))
        {
            return result;
        }
        let f = f?;
        self.xdp.receive(f)
    }

    fn transmit(&mut self, max_len: usize, f: impl FnOnce(&mut [u8]) -> usize) -> Option<usize> {
        self.xdp.transmit(max_len, f)
    }

    fn flush(&mut self) {
        self.xdp.flush();
    }
}
