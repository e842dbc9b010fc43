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
    pub fn prepare(interface: &str, steer: &Steer) -> io::Result<(XdpHandover, OwnedFd)> {
        Ok((
            XdpHandover::prepare(interface, steer)?,
            Self::neighbour_socket()?,
        ))
    }

    /// The engine from a prepared handover and neighbour socket; needs no capability.
    pub fn from_handover(
        handover: XdpHandover,
        neighbour_socket: OwnedFd,
        interface: &str,
    ) -> io::Result<Self> {
        let neighbours = AfPacket::from_fd(neighbour_socket, interface, NEIGHBOUR_RINGS)?;
        let xdp = AfXdp::from_handover(handover, interface)?;
        let ready = sys::epoll_of(&[xdp.raw_fd(), neighbours.raw_fd()])?;
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
