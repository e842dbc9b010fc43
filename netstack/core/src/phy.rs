//! The boundary between the stack and packet I/O engines.
//!
//! Frames are lent, not returned: `receive` passes the engine's own buffer to a closure and
//! `transmit` lets the stack write straight into a ring slot, so batched, zero-copy engines
//! (TPACKET rings, AF_XDP UMEM, DPDK mbufs) fit without an extra copy.

use crate::time::Instant;

/// What an engine can do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceCapabilities {
    /// IP MTU in bytes (the Ethernet payload size, 1500 on most links).
    pub mtu: usize,
    /// The engine completes the checksums of the TCP frames it sends (a NIC's checksum
    /// offload): the stack leaves 0 in the IPv4 header checksum and the pseudo-header sum in
    /// the TCP checksum field, as DPDK's `RTE_MBUF_F_TX_TCP_CKSUM` and Linux's
    /// `CHECKSUM_PARTIAL` expect, and does not sum the segment itself.
    pub tx_checksum_offload: bool,
    /// TCP segmentation offload: the engine cuts a TCP frame of up to this many bytes (Ethernet
    /// header included) into wire segments, so the stack may hand it several MSS of new data at
    /// once through [`Device::transmit_segmented`] (for TCP over IPv4). Implies
    /// `tx_checksum_offload`.
    pub tso_max_frame: Option<usize>,
}

impl Default for DeviceCapabilities {
    fn default() -> Self {
        Self {
            mtu: 1500,
            tx_checksum_offload: false,
            tso_max_frame: None,
        }
    }
}

/// Per-frame facts the engine learned from the kernel or hardware.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RxMeta {
    /// The transport checksum was already verified, or was never filled in because the frame
    /// came from a local sender with checksum offload (AF_PACKET `TP_STATUS_CSUMNOTREADY`).
    pub checksum_trusted: bool,
    /// The engine cannot tell offloaded frames apart (generic-mode AF_XDP), so a TCP checksum
    /// field holding exactly the pseudo-header sum is an unfinished offload from a local sender
    /// (Linux `CHECKSUM_PARTIAL`), not corruption, and is accepted.
    pub partial_checksum_possible: bool,
    /// When the host took the frame out of the engine, on the clock it passes to
    /// `Stack::poll`. The stack processes the frame at this time (never earlier than its current
    /// time) instead of the `now` the poll started with: a host can be descheduled between
    /// reading its clock and reading its ring (a real-time task throttled for 50 ms once a
    /// second, a busy 2-core machine), and an ACK that arrived meanwhile, processed at the stale
    /// `now`, looks as if it came back up to the whole stall sooner than it did. That put RTT
    /// samples of 12 µs to 18 ms on a 30 ms path into BBR's minimum RTT. `None`: the poll's
    /// `now` (hosts whose clock cannot go stale, such as the simulator).
    pub received_at: Option<Instant>,
}

/// A packet I/O engine.
pub trait Device {
    /// The engine's capabilities.
    fn capabilities(&self) -> DeviceCapabilities;

    /// Passes the next received Ethernet frame to `f`; `None` when no frame is waiting.
    fn receive<R>(&mut self, f: impl FnOnce(&[u8], RxMeta) -> R) -> Option<R>;

    /// Lends a buffer of at least `max_len` bytes. `f` writes one Ethernet frame and returns its
    /// length, or 0 to send nothing. `None` when no transmit buffer is free.
    fn transmit(&mut self, max_len: usize, f: impl FnOnce(&mut [u8]) -> usize) -> Option<usize>;

    /// [`Device::transmit`] for an engine with `tso_max_frame`: a frame longer than the MTU that
    /// `f` writes is one TCP segment whose payload the engine cuts into `segment_size`-byte
    /// pieces, each with a copy of the headers (sequence numbers advanced, checksums completed).
    /// Without segmentation offload, a plain transmit.
    fn transmit_segmented(
        &mut self,
        max_len: usize,
        segment_size: usize,
        f: impl FnOnce(&mut [u8]) -> usize,
    ) -> Option<usize> {
        let _ = segment_size;
        self.transmit(max_len, f)
    }

    /// Pushes batched transmissions to the wire.
    fn flush(&mut self) {}
}
