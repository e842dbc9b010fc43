//! AF_PACKET engine with memory-mapped TPACKET_V2 RX and TX rings.
//!
//! RX frames are read in place from the ring; TX frames are written in place and handed to the
//! kernel in batches (one `send` kick per `flush`). RX frames are large enough (64 KiB) to take
//! GRO/GSO aggregates from a local kernel peer whole, and `TP_STATUS_CSUMNOTREADY` (checksum
//! left for offload by a local sender) is passed up as a trusted checksum.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use stackroute_netstack::{Device, DeviceCapabilities, RxMeta};

use crate::sys::{self, RingMap, TpacketReq};

/// `sizeof(struct tpacket2_hdr)` rounded to TPACKET_ALIGNMENT: where TX data starts.
const TX_DATA_OFFSET: usize = 32;
/// Offset of `sll_pkttype` in the `sockaddr_ll` that follows the header in RX frames.
const SLL_PKTTYPE_OFFSET: usize = 32 + 10;
const PAGE: u32 = 4096;

/// Ring geometry.
#[derive(Clone, Copy, Debug)]
pub struct RingConfig {
    /// RX frames; each holds up to `rx_frame_size` bytes including the TPACKET header.
    pub rx_frames: u32,
    /// RX frame size in bytes (a multiple of the page size).
    pub rx_frame_size: u32,
    /// TX frames of `tx_frame_size` bytes.
    pub tx_frames: u32,
    /// TX frame size in bytes (a multiple of the page size).
    pub tx_frame_size: u32,
}

impl Default for RingConfig {
    fn default() -> Self {
        Self {
            rx_frames: 256,
            rx_frame_size: 17 * PAGE,
            tx_frames: 1024,
            tx_frame_size: PAGE,
        }
    }
}

/// An AF_PACKET socket on one interface.
#[derive(Debug)]
pub struct AfPacket {
    fd: OwnedFd,
    map: RingMap,
    config: RingConfig,
    rx_next: u32,
    tx_next: u32,
    tx_pending: bool,
    mtu: usize,
    mac: [u8; 6],
}

fn ring_request(frames: u32, frame_size: u32) -> TpacketReq {
    TpacketReq {
        block_size: frame_size,
        block_nr: frames,
        frame_size,
        frame_nr: frames,
    }
}

impl AfPacket {
    /// Opens the engine on `interface` (needs CAP_NET_RAW).
    pub fn open(interface: &str, config: RingConfig) -> io::Result<Self> {
        Self::from_fd(sys::packet_socket()?, interface, config)
    }

    /// Sets the engine up on an AF_PACKET socket another process created (in this network
    /// namespace, with CAP_NET_RAW) and handed over: binding it to `interface` and mapping its
    /// rings need no capability. The socket must be unbound and have no rings yet; any
    /// protocol it was created with is replaced by "all" when it is bound.
    pub fn from_fd(fd: OwnedFd, interface: &str, config: RingConfig) -> io::Result<Self> {
        if !config.rx_frame_size.is_multiple_of(PAGE) || !config.tx_frame_size.is_multiple_of(PAGE)
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "frame sizes must be multiples of 4096",
            ));
        }
        if sys::socket_domain(&fd)? != libc::AF_PACKET {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the descriptor is not an AF_PACKET socket",
            ));
        }
        sys::set_nonblocking(&fd)?;
        let ifindex = sys::if_index(interface)?;
        let mac = sys::if_mac(interface)?;
        let mtu = sys::if_mtu(interface)?;
        sys::set_option(&fd, sys::SOL_PACKET, sys::PACKET_VERSION, &sys::TPACKET_V2)?;
        // Our own transmissions must not loop back into the RX ring (Linux ≥ 4.20); older
        // kernels are handled by the pkttype check in `receive`.
        let _ = sys::set_option(&fd, sys::SOL_PACKET, sys::PACKET_IGNORE_OUTGOING, &1i32);
        let rx = ring_request(config.rx_frames, config.rx_frame_size);
        let tx = ring_request(config.tx_frames, config.tx_frame_size);
        sys::set_option(&fd, sys::SOL_PACKET, sys::PACKET_RX_RING, &rx)?;
        sys::set_option(&fd, sys::SOL_PACKET, sys::PACKET_TX_RING, &tx)?;
        let len = (config.rx_frames * config.rx_frame_size
            + config.tx_frames * config.tx_frame_size) as usize;
        let map = RingMap::new(&fd, len)?;
        sys::bind_packet(&fd, ifindex)?;
        // Frames taken before the RX ring existed (from every interface, for a socket created
        // long before) sit on the plain queue, which keeps poll readable: drop them.
        sys::drain_receive_queue(&fd)?;
        Ok(Self {
            fd,
            map,
            config,
            rx_next: 0,
            tx_next: 0,
            tx_pending: false,
            mtu,
            mac,
        })
    }

    /// The interface's Ethernet address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The descriptor to wait on for received frames.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn rx_offset(&self, index: u32) -> usize {
        (index * self.config.rx_frame_size) as usize
    }

    fn tx_offset(&self, index: u32) -> usize {
        (self.config.rx_frames * self.config.rx_frame_size + index * self.config.tx_frame_size)
            as usize
    }

    fn read_u32(&self, offset: usize) -> u32 {
        let b = self.map.bytes(offset, 4);
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]])
    }

    fn read_u16(&self, offset: usize) -> u16 {
        let b = self.map.bytes(offset, 2);
        u16::from_ne_bytes([b[0], b[1]])
    }
}

impl Device for AfPacket {
    fn capabilities(&self) -> DeviceCapabilities {
        DeviceCapabilities {
            mtu: self.mtu,
            ..DeviceCapabilities::default()
        }
    }

    fn receive<R>(&mut self, f: impl FnOnce(&[u8], RxMeta) -> R) -> Option<R> {
        let mut f = Some(f);
        loop {
            let frame = self.rx_offset(self.rx_next);
            let status = self.map.status(frame);
            if status & sys::TP_STATUS_USER == 0 {
                return None;
            }
            self.rx_next = (self.rx_next + 1) % self.config.rx_frames;
            // tpacket2_hdr: status, len, snaplen, mac (u16), net (u16), ...
            let snaplen = self.read_u32(frame + 8) as usize;
            let mac_offset = usize::from(self.read_u16(frame + 12));
            let pkttype = self.map.bytes(frame + SLL_PKTTYPE_OFFSET, 1)[0];
            let fits = mac_offset + snaplen <= self.config.rx_frame_size as usize;
            let meta = RxMeta {
                checksum_trusted: status
                    & (sys::TP_STATUS_CSUMNOTREADY | sys::TP_STATUS_CSUM_VALID)
                    != 0,
                partial_checksum_possible: false,
                received_at: None,
            };
            let result = if pkttype != sys::PACKET_OUTGOING && fits {
                f.take()
                    .map(|f| f(self.map.bytes(frame + mac_offset, snaplen), meta))
            } else {
                None
            };
            self.map.set_status(frame, sys::TP_STATUS_KERNEL);
            if let Some(result) = result {
                return Some(result);
            }
        }
    }

    fn transmit(&mut self, max_len: usize, f: impl FnOnce(&mut [u8]) -> usize) -> Option<usize> {
        let capacity = self.config.tx_frame_size as usize - TX_DATA_OFFSET;
        if max_len > capacity {
            return None;
        }
        let frame = self.tx_offset(self.tx_next);
        let status = self.map.status(frame);
        if status == sys::TP_STATUS_WRONG_FORMAT {
            // The kernel rejected this slot's last frame; reclaim it.
            self.map.set_status(frame, sys::TP_STATUS_AVAILABLE);
        } else if status != sys::TP_STATUS_AVAILABLE {
            // Ring full: push what is queued and report no buffer.
            if self.tx_pending {
                let _ = sys::kick_tx(&self.fd);
                self.tx_pending = false;
            }
            return None;
        }
        let len = f(self.map.bytes_mut(frame + TX_DATA_OFFSET, max_len)).min(max_len);
        if len == 0 {
            return Some(0);
        }
        // tp_len, then hand the slot over.
        self.map
            .bytes_mut(frame + 4, 4)
            .copy_from_slice(&(len as u32).to_ne_bytes());
        self.map.set_status(frame, sys::TP_STATUS_SEND_REQUEST);
        self.tx_next = (self.tx_next + 1) % self.config.tx_frames;
        self.tx_pending = true;
        Some(len)
    }

    fn flush(&mut self) {
        if self.tx_pending {
            let _ = sys::kick_tx(&self.fd);
            self.tx_pending = false;
        }
    }
}
