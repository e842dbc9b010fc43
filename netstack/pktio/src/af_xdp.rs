//! AF_XDP engine: an XSK socket on one queue of an interface, a UMEM of 2 KiB frames, and an
//! XDP program (`bpf/steer.c`, attached in generic/SKB mode, so it works on veth) that steers
//! to the socket only the frames for the stack ([`Steer`]: an address it owns alone, or a port
//! range on addresses it shares with the kernel). Everything else goes on to the kernel, so
//! stack and kernel share the interface. The privileged part ([`XdpHandover::prepare`]) and
//! the unprivileged part ([`AfXdp::from_handover`]) can run in different processes. Detaching
//! is automatic: the program is held by a BPF link that closes with the engine (or the
//! process).
//!
//! Ring protocol (Documentation/networking/af_xdp.rst): user space produces on the fill and TX
//! rings and consumes the RX and completion rings; indices are free-running u32 counters.

use std::collections::VecDeque;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use stackroute_netstack::{Device, DeviceCapabilities, RxMeta};

use crate::steer::{Steer, Steering};
use crate::sys::{self, RingMap};

const FRAME_SIZE: u32 = 2048;
const FRAME_COUNT: u32 = 4096;
const RING_SIZE: u32 = 2048;
/// `struct xdp_desc`: addr u64, len u32, options u32.
const XDP_DESC_SIZE: usize = 16;
/// An Ethernet header without VLAN tag: frames are at most MTU + this.
const ETHERNET_HEADER: usize = 14;

/// One mapped ring.
#[derive(Debug)]
struct Ring {
    map: RingMap,
    producer: usize,
    consumer: usize,
    desc: usize,
    /// Our private copy of the index we own (producer for fill/TX, consumer for RX/completion).
    local: u32,
}

impl Ring {
    fn map(
        fd: &OwnedFd,
        offsets: &libc::xdp_ring_offset,
        entry_size: usize,
        page_offset: u64,
    ) -> io::Result<Self> {
        let len = offsets.desc as usize + RING_SIZE as usize * entry_size;
        let map = RingMap::socket_at(fd, len, page_offset)?;
        Ok(Self {
            map,
            producer: offsets.producer as usize,
            consumer: offsets.consumer as usize,
            desc: offsets.desc as usize,
            local: 0,
        })
    }

    fn slot(&self, index: u32, entry_size: usize) -> usize {
        self.desc + (index & (RING_SIZE - 1)) as usize * entry_size
    }
}

/// What a privileged process prepares, in the network namespace of an interface, so that an
/// unprivileged stack can use AF_XDP there ([`AfXdp::from_handover`]): everything that needs a
/// capability is done, everything that needs the stack's own address space is left.
#[derive(Debug)]
pub struct XdpHandover {
    /// The AF_XDP socket, created in the namespace (CAP_NET_RAW), its UMEM registered and ring
    /// sizes set; not yet bound (its rings can only be mapped before binding).
    pub socket: OwnedFd,
    /// The UMEM: a shared-memory file, registered (and pinned) by the preparing process, so
    /// the stack needs no locked-memory allowance of its own.
    pub umem: OwnedFd,
    /// The steering program's socket map, where the stack puts its socket once bound.
    pub sockets: OwnedFd,
    /// The steering program's configuration, which the stack writes (it knows its addresses
    /// and ports); until then the program steers nothing.
    pub config: OwnedFd,
    /// The link attaching the steering program: it detaches when the last descriptor closes,
    /// i.e. when the stack exits.
    pub link: OwnedFd,
}

impl XdpHandover {
    /// Prepares queue 0 of `interface` (of the calling thread's network namespace) for a
    /// stack. Needs CAP_NET_RAW, CAP_BPF and CAP_NET_ADMIN.
    pub fn prepare(interface: &str) -> io::Result<Self> {
        let ifindex = sys::if_index(interface)?;
        let socket = sys::xdp_socket()?;
        let len = (FRAME_SIZE * FRAME_COUNT) as usize;
        let umem = sys::memfd(c"stackroute-umem", len)?;
        {
            let mapped = RingMap::new(&umem, len)?;
            let reg = libc::xdp_umem_reg {
                addr: mapped.address(),
                len: len as u64,
                chunk_size: FRAME_SIZE,
                headroom: 0,
                flags: 0,
                tx_metadata_len: 0,
            };
            sys::set_option(&socket, libc::SOL_XDP, libc::XDP_UMEM_REG, &reg)?;
            // Unmapped here; the registration keeps the pages pinned for the socket's life.
        }
        for ring in [
            libc::XDP_UMEM_FILL_RING,
            libc::XDP_UMEM_COMPLETION_RING,
            libc::XDP_RX_RING,
            libc::XDP_TX_RING,
        ] {
            sys::set_option(&socket, libc::SOL_XDP, ring, &RING_SIZE)?;
        }
        let steering = Steering::attach(ifindex)?;
        Ok(Self {
            socket,
            umem,
            sockets: steering.sockets,
            config: steering.config,
            link: steering.link,
        })
    }
}

/// An AF_XDP socket bound to queue 0 of an interface, in copy mode.
#[derive(Debug)]
pub struct AfXdp {
    socket: OwnedFd,
    umem: RingMap,
    fill: Ring,
    completion: Ring,
    rx: Ring,
    tx: Ring,
    free_tx_frames: VecDeque<u64>,
    tx_pending: bool,
    /// A frame arriving in several pieces (a segmentation aggregate), put back together.
    assembly: Vec<u8>,
    assembling: bool,
    mtu: usize,
    mac: [u8; 6],
    // Held for the engine's lifetime: closing it detaches the steering program.
    _link: OwnedFd,
}

impl AfXdp {
    /// Opens queue 0 of `interface` for a stack owning `address` alone (needs root).
    pub fn open(interface: &str, address: Ipv4Addr) -> io::Result<Self> {
        Self::from_handover(
            XdpHandover::prepare(interface)?,
            interface,
            &Steer::WholeAddress(address),
        )
    }

    /// Maps the prepared socket's rings and UMEM, binds it to queue 0 of `interface`, puts it
    /// into the steering program's socket map and has the program steer `steer` to it. Needs
    /// no capability.
    pub fn from_handover(
        handover: XdpHandover,
        interface: &str,
        steer: &Steer,
    ) -> io::Result<Self> {
        let XdpHandover {
            socket,
            umem,
            sockets,
            config,
            link,
        } = handover;
        let ifindex = sys::if_index(interface)?;
        let mac = sys::if_mac(interface)?;
        let mtu = sys::if_mtu(interface)?;
        if mtu + ETHERNET_HEADER > FRAME_SIZE as usize {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("{interface}'s MTU {mtu} does not fit the {FRAME_SIZE}-byte AF_XDP frames"),
            ));
        }
        let queue = 0;
        let len = (FRAME_SIZE * FRAME_COUNT) as usize;
        if sys::file_len(&umem)? != len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("the UMEM file is not {len} bytes"),
            ));
        }
        let umem = RingMap::new(&umem, len)?;
        let offsets = sys::xdp_mmap_offsets(&socket)?;
        let fill = Ring::map(&socket, &offsets.fr, 8, libc::XDP_UMEM_PGOFF_FILL_RING)?;
        let completion = Ring::map(
            &socket,
            &offsets.cr,
            8,
            libc::XDP_UMEM_PGOFF_COMPLETION_RING,
        )?;
        let rx = Ring::map(
            &socket,
            &offsets.rx,
            XDP_DESC_SIZE,
            libc::XDP_PGOFF_RX_RING as u64,
        )?;
        let tx = Ring::map(
            &socket,
            &offsets.tx,
            XDP_DESC_SIZE,
            libc::XDP_PGOFF_TX_RING as u64,
        )?;
        // XDP_USE_SG: a frame larger than one chunk arrives in pieces instead of being dropped.
        sys::bind_xdp(&socket, ifindex, queue, libc::XDP_COPY | libc::XDP_USE_SG)?;
        Steering::insert(&sockets, queue, &socket)?;
        Steering::configure(&config, steer)?;

        let mut engine = Self {
            socket,
            umem,
            fill,
            completion,
            rx,
            tx,
            // The upper half of the UMEM is for transmission, the lower half for reception.
            free_tx_frames: (FRAME_COUNT / 2..FRAME_COUNT)
                .map(|i| u64::from(i * FRAME_SIZE))
                .collect(),
            tx_pending: false,
            assembly: Vec::new(),
            assembling: false,
            mtu,
            mac,
            _link: link,
        };
        for i in 0..FRAME_COUNT / 2 {
            engine.give_to_fill(u64::from(i * FRAME_SIZE));
        }
        Ok(engine)
    }

    /// The interface's Ethernet address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The descriptor to wait on for received frames.
    pub fn raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }

    fn give_to_fill(&mut self, addr: u64) {
        let consumer = self.fill.map.status(self.fill.consumer);
        if self.fill.local.wrapping_sub(consumer) >= RING_SIZE {
            // Cannot happen: the fill ring is as large as the RX half of the UMEM.
            return;
        }
        let slot = self.fill.slot(self.fill.local, 8);
        self.fill
            .map
            .bytes_mut(slot, 8)
            .copy_from_slice(&addr.to_ne_bytes());
        self.fill.local = self.fill.local.wrapping_add(1);
        let producer = self.fill.producer;
        let local = self.fill.local;
        self.fill.map.set_status(producer, local);
    }

    fn reclaim_completions(&mut self) {
        let produced = self.completion.map.status(self.completion.producer);
        while self.completion.local != produced {
            let slot = self.completion.slot(self.completion.local, 8);
            let bytes = self.completion.map.bytes(slot, 8);
            let mut addr = [0u8; 8];
            addr.copy_from_slice(bytes);
            self.free_tx_frames.push_back(u64::from_ne_bytes(addr));
            self.completion.local = self.completion.local.wrapping_add(1);
        }
        let consumer = self.completion.consumer;
        let local = self.completion.local;
        self.completion.map.set_status(consumer, local);
    }
}

impl AfXdp {
    /// The next RX descriptor (address, length, options), consumed.
    fn next_rx(&mut self) -> Option<(u64, usize, u32)> {
        let produced = self.rx.map.status(self.rx.producer);
        if self.rx.local == produced {
            return None;
        }
        let slot = self.rx.slot(self.rx.local, XDP_DESC_SIZE);
        let desc = self.rx.map.bytes(slot, XDP_DESC_SIZE);
        let addr = u64::from_ne_bytes(desc[0..8].try_into().unwrap_or([0; 8]));
        let len = u32::from_ne_bytes(desc[8..12].try_into().unwrap_or([0; 4])) as usize;
        let options = u32::from_ne_bytes(desc[12..16].try_into().unwrap_or([0; 4]));
        self.rx.local = self.rx.local.wrapping_add(1);
        let consumer = self.rx.consumer;
        let local = self.rx.local;
        self.rx.map.set_status(consumer, local);
        Some((addr, len, options))
    }
}

impl Device for AfXdp {
    fn capabilities(&self) -> DeviceCapabilities {
        DeviceCapabilities {
            mtu: self.mtu,
            ..DeviceCapabilities::default()
        }
    }

    fn receive<R>(&mut self, f: impl FnOnce(&[u8], RxMeta) -> R) -> Option<R> {
        // Generic XDP hands over frames whose checksums the kernel has not verified (they are
        // checked in software) and, from a local sender with checksum offload, not even filled
        // in: the stack recognises the latter by its pseudo-header-only checksum.
        let meta = RxMeta {
            checksum_trusted: false,
            partial_checksum_possible: true,
            received_at: None,
        };
        loop {
            let (addr, len, options) = self.next_rx()?;
            let chunk = addr - addr % u64::from(FRAME_SIZE);
            let start = (addr % u64::from(FRAME_SIZE * FRAME_COUNT)) as usize;
            let len = len.min((FRAME_SIZE * FRAME_COUNT) as usize - start);
            let more = options & libc::XDP_PKT_CONTD != 0;
            if !more && !self.assembling {
                let result = f(self.umem.bytes(start, len), meta);
                self.give_to_fill(chunk);
                return Some(result);
            }
            if !self.assembling {
                self.assembly.clear();
                self.assembling = true;
            }
            self.assembly.extend_from_slice(self.umem.bytes(start, len));
            self.give_to_fill(chunk);
            if !more {
                self.assembling = false;
                return Some(f(&self.assembly, meta));
            }
        }
    }

    fn transmit(&mut self, max_len: usize, f: impl FnOnce(&mut [u8]) -> usize) -> Option<usize> {
        if max_len > FRAME_SIZE as usize {
            return None;
        }
        if self.free_tx_frames.is_empty() {
            self.reclaim_completions();
        }
        let consumer = self.tx.map.status(self.tx.consumer);
        if self.tx.local.wrapping_sub(consumer) >= RING_SIZE || self.free_tx_frames.is_empty() {
            self.flush();
            return None;
        }
        let addr = self.free_tx_frames.pop_front()?;
        let len = f(self.umem.bytes_mut(addr as usize, max_len)).min(max_len);
        if len == 0 {
            self.free_tx_frames.push_front(addr);
            return Some(0);
        }
        let slot = self.tx.slot(self.tx.local, XDP_DESC_SIZE);
        let desc = self.tx.map.bytes_mut(slot, XDP_DESC_SIZE);
        desc[0..8].copy_from_slice(&addr.to_ne_bytes());
        desc[8..12].copy_from_slice(&(len as u32).to_ne_bytes());
        desc[12..16].copy_from_slice(&0u32.to_ne_bytes());
        self.tx.local = self.tx.local.wrapping_add(1);
        let producer = self.tx.producer;
        let local = self.tx.local;
        self.tx.map.set_status(producer, local);
        self.tx_pending = true;
        Some(len)
    }

    fn flush(&mut self) {
        if self.tx_pending {
            // Copy mode transmits only when kicked.
            let _ = sys::kick_tx(&self.socket);
            self.tx_pending = false;
        }
        self.reclaim_completions();
    }
}
