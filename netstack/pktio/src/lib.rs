//! Packet I/O engines for the stackroute netstack, behind the core's `Device` trait:
//! - [`AfPacket`]: AF_PACKET with mmap'ed TPACKET_V2 RX/TX rings (zero-copy in the ring);
//! - [`AfXdp`]: AF_XDP in copy mode with a UMEM and an XDP steering program (C in `bpf/`,
//!   built by clang, loaded with aya; generic mode, so it works on veth);
//! - [`SharedXdp`]: AF_XDP for a stack sharing the kernel's addresses by port range, with a
//!   packet socket filtered to the neighbour protocols beside it;
//! - [`Dpdk`]: a DPDK ethdev port (PCI or virtual device), with the `dpdk` cargo feature;
//! - [`Tap`]: a TAP interface.
//!
//! All `unsafe` code lives in the `sys` module, one system call, FFI call
//! or raw-memory access per block, each with a `// SAFETY:` line.

#![deny(unsafe_code)]

mod af_packet;
mod af_xdp;
mod dpdk;
mod shared_xdp;
mod steer;
mod sys;
mod tap;

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

pub use af_packet::{AfPacket, RingConfig};
pub use af_xdp::{AfXdp, XdpHandover};
pub use dpdk::{Dpdk, DpdkConfig, DpdkStatus, Hugepages, Memory, PortCounters};
pub use shared_xdp::{NotShared, SharedXdp};
use stackroute_netstack::{Device, DeviceCapabilities, RxMeta};
pub use steer::Steer;
pub use tap::Tap;

/// Interface facts read from the kernel.
pub mod interface {
    use std::io;

    /// The interface's Ethernet address.
    pub fn mac(name: &str) -> io::Result<[u8; 6]> {
        crate::sys::if_mac(name)
    }

    /// The interface's MTU.
    pub fn mtu(name: &str) -> io::Result<usize> {
        crate::sys::if_mtu(name)
    }

    /// The interface's primary IPv4 address and its prefix length.
    pub fn ipv4(name: &str) -> io::Result<(std::net::Ipv4Addr, u8)> {
        crate::sys::if_ipv4(name)
    }

    /// Whether the interface is administratively up.
    pub fn is_up(name: &str) -> io::Result<bool> {
        Ok(crate::sys::if_flags(name)? & libc::IFF_UP != 0)
    }

    /// The names of the interfaces of the calling thread's network namespace.
    pub fn names() -> io::Result<Vec<String>> {
        crate::sys::if_names()
    }

    /// Whether the interface is a loopback interface.
    pub fn is_loopback(name: &str) -> io::Result<bool> {
        Ok(crate::sys::if_flags(name)? & libc::IFF_LOOPBACK != 0)
    }
}

/// Waits until `fd` is readable or `timeout` passes; returns whether it is readable.
pub fn wait_readable(fd: RawFd, timeout: Option<Duration>) -> io::Result<bool> {
    sys::wait_readable(&[fd], timeout)
}

/// Waits until any of `fds` is readable or `timeout` passes.
pub fn wait_any_readable(fds: &[RawFd], timeout: Option<Duration>) -> io::Result<bool> {
    sys::wait_readable(fds, timeout)
}

/// An engine chosen at run time.
#[derive(Debug)]
pub enum AnyDevice {
    /// AF_PACKET rings.
    AfPacket(AfPacket),
    /// AF_XDP socket (boxed: its ring state is large).
    AfXdp(Box<AfXdp>),
    /// AF_XDP on a shared address, with its neighbour socket.
    SharedXdp(Box<SharedXdp>),
    /// TAP.
    Tap(Tap),
    /// A DPDK port (boxed: its bursts are inline).
    Dpdk(Box<Dpdk>),
}

impl AnyDevice {
    /// The descriptor that becomes readable when frames arrive; `None` for a polled engine
    /// (DPDK), which the host polls at least every [`AnyDevice::max_idle`].
    pub fn wait_fd(&self) -> Option<RawFd> {
        match self {
            Self::AfPacket(d) => Some(d.raw_fd()),
            Self::AfXdp(d) => Some(d.raw_fd()),
            Self::SharedXdp(d) => Some(d.raw_fd()),
            Self::Tap(d) => Some(d.raw_fd()),
            Self::Dpdk(_) => None,
        }
    }

    /// The longest the host may sleep without polling: a DPDK port has no descriptor to wake
    /// it, so idle hosts poll it every 50 µs (a poll-mode driver's nature, at a few percent of
    /// a CPU instead of all of it).
    pub fn max_idle(&self) -> Option<Duration> {
        match self {
            Self::Dpdk(_) => Some(DPDK_IDLE_POLL),
            _ => None,
        }
    }

    /// The engine's name, as reports and logs say it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::AfPacket(_) => "af_packet",
            Self::AfXdp(_) => "af_xdp",
            Self::SharedXdp(_) => "shared_xdp",
            Self::Tap(_) => "tap",
            Self::Dpdk(_) => "dpdk",
        }
    }
}

/// See [`AnyDevice::max_idle`].
const DPDK_IDLE_POLL: Duration = Duration::from_micros(50);

impl Device for AnyDevice {
    fn capabilities(&self) -> DeviceCapabilities {
        match self {
            Self::AfPacket(d) => d.capabilities(),
            Self::AfXdp(d) => d.capabilities(),
            Self::SharedXdp(d) => d.capabilities(),
            Self::Tap(d) => d.capabilities(),
            Self::Dpdk(d) => d.capabilities(),
        }
    }

    fn receive<R>(&mut self, f: impl FnOnce(&[u8], RxMeta) -> R) -> Option<R> {
        match self {
            Self::AfPacket(d) => d.receive(f),
            Self::AfXdp(d) => d.receive(f),
            Self::SharedXdp(d) => d.receive(f),
            Self::Tap(d) => d.receive(f),
            Self::Dpdk(d) => d.receive(f),
        }
    }

    fn transmit(&mut self, max_len: usize, f: impl FnOnce(&mut [u8]) -> usize) -> Option<usize> {
        match self {
            Self::AfPacket(d) => d.transmit(max_len, f),
            Self::AfXdp(d) => d.transmit(max_len, f),
            Self::SharedXdp(d) => d.transmit(max_len, f),
            Self::Tap(d) => d.transmit(max_len, f),
            Self::Dpdk(d) => d.transmit(max_len, f),
        }
    }

    fn transmit_segmented(
        &mut self,
        max_len: usize,
        segment_size: usize,
        f: impl FnOnce(&mut [u8]) -> usize,
    ) -> Option<usize> {
        match self {
            Self::Dpdk(d) => d.transmit_segmented(max_len, segment_size, f),
            other => other.transmit(max_len, f),
        }
    }

    fn flush(&mut self) {
        match self {
            Self::AfPacket(d) => d.flush(),
            Self::AfXdp(d) => d.flush(),
            Self::SharedXdp(d) => d.flush(),
            Self::Tap(d) => d.flush(),
            Self::Dpdk(d) => d.flush(),
        }
    }
}
