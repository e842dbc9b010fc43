//! Every DPDK call of the engine (`crate::dpdk`), each `unsafe` block one FFI call with its
//! precondition. Owners free what they hold: [`Mbuf`] on drop, [`Mempool`] on drop (after its
//! mbufs: the engine declares them first), ports are stopped and closed by the engine's port
//! guard.

use std::collections::VecDeque;
use std::ffi::{CStr, CString, c_char};
use std::io;
use std::ptr::NonNull;

use stackroute_dpdk_sys as ffi;

use crate::dpdk::PortCounters;

/// `rte_strerror` of `rte_errno` (or of a negative return value's errno).
pub(crate) fn dpdk_error(errno: i32) -> String {
    let errno = errno.abs();
    // SAFETY: rte_strerror returns a pointer to a static or per-thread string for any value.
    let text = unsafe { CStr::from_ptr(ffi::rte_strerror(errno)) };
    text.to_string_lossy().into_owned()
}

fn last_error() -> i32 {
    // SAFETY: reads the calling thread's rte_errno; no other precondition.
    unsafe { ffi::sr_errno() }
}

/// DPDK's version string ("DPDK 22.11.11").
pub(crate) fn version() -> String {
    // SAFETY: sr_version returns DPDK's static version string.
    let text = unsafe { CStr::from_ptr(ffi::sr_version()) };
    text.to_string_lossy().into_owned()
}

/// `rte_eal_init` with `args` (argv[0] first). EAL prints its usage and messages to stdout,
/// which carries our tools' reports: `sr_eal_init` sends them to stderr.
pub(crate) fn eal_init(args: &[String]) -> Result<(), String> {
    let owned: Vec<CString> = args
        .iter()
        .map(|a| CString::new(a.as_str()).map_err(|_| format!("EAL argument {a:?} holds a NUL")))
        .collect::<Result<_, _>>()?;
    // EAL may reorder argv (getopt); it must stay valid for the process: leaked on purpose.
    let mut argv: Vec<*mut c_char> = owned.into_iter().map(CString::into_raw).collect();
    let argc = i32::try_from(argv.len()).map_err(|_| "too many EAL arguments".to_string())?;
    let argv_ptr = argv.as_mut_ptr();
    std::mem::forget(argv);
    // SAFETY: argv holds argc valid NUL-terminated strings that are never freed; EAL is
    // initialised at most once per process (crate::dpdk::eal holds the process-wide state).
    let rc = unsafe { ffi::sr_eal_init(argc, argv_ptr) };
    if rc < 0 {
        return Err(dpdk_error(last_error()));
    }
    Ok(())
}

/// `rte_eal_cleanup`: releases EAL's memory and threads; no DPDK call may follow.
pub(crate) fn eal_cleanup() {
    // SAFETY: called once, after every port, pool and mbuf of the process was released.
    unsafe {
        ffi::rte_eal_cleanup();
    }
}

/// The ids of the ports EAL probed.
pub(crate) fn port_ids() -> Vec<u16> {
    (0..ffi::RTE_MAX_ETHPORTS as u16)
        // SAFETY: any port id may be asked about after EAL init.
        .filter(|&port| unsafe { ffi::rte_eth_dev_is_valid_port(port) } == 1)
        .collect()
}

/// A port's name, driver, MAC, MTU and offloads.
#[derive(Clone, Debug)]
pub(crate) struct PortInfo {
    pub(crate) name: String,
    pub(crate) driver: String,
    pub(crate) mac: [u8; 6],
    pub(crate) mtu: u16,
    pub(crate) max_rx_pktlen: u32,
    pub(crate) offloads: u32,
}

fn c_text(bytes: &[c_char]) -> String {
    let bytes: Vec<u8> = bytes
        .iter()
        .take_while(|&&b| b != 0)
        .map(|&b| b as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

pub(crate) fn port_info(port: u16) -> io::Result<PortInfo> {
    let mut info = ffi::sr_port_info::default();
    // SAFETY: `info` is a valid, writable sr_port_info; the port id was validated by port_ids.
    let rc = unsafe { ffi::sr_port_info(port, &mut info) };
    if rc != 0 {
        return Err(errno_error(
            rc,
            &format!("reading port {port}'s information"),
        ));
    }
    Ok(PortInfo {
        name: c_text(&info.name),
        driver: c_text(&info.driver),
        mac: info.mac,
        mtu: info.mtu,
        max_rx_pktlen: info.max_rx_pktlen,
        offloads: info.offloads,
    })
}

fn errno_error(rc: i32, what: &str) -> io::Error {
    io::Error::new(
        io::Error::from_raw_os_error(rc.abs()).kind(),
        format!("{what}: {}", dpdk_error(rc)),
    )
}

/// A packet mbuf pool.
#[derive(Debug)]
pub(crate) struct Mempool(NonNull<ffi::rte_mempool>);

// SAFETY: a DPDK mempool is safe to use from any thread (its operations are thread-safe, the
// per-lcore cache is not used by non-EAL threads).
unsafe impl Send for Mempool {}

impl Mempool {
    /// `count` mbufs with `data_room` bytes each (headroom included).
    pub(crate) fn create(name: &str, count: u32, data_room: u16) -> io::Result<Self> {
        let name = CString::new(name).map_err(|_| io::Error::other("pool name holds a NUL"))?;
        // DPDK refuses a per-lcore cache above count / 1.5.
        let cache = (count * 2 / 3).min(256);
        // SAFETY: after EAL init; `name` is a valid C string copied by DPDK; socket -1 (any).
        let pool =
            unsafe { ffi::rte_pktmbuf_pool_create(name.as_ptr(), count, cache, 0, data_room, -1) };
        NonNull::new(pool).map(Self).ok_or_else(|| {
            let errno = last_error();
            io::Error::new(
                io::Error::from_raw_os_error(errno).kind(),
                format!("creating a pool of {count} mbufs: {}", dpdk_error(errno)),
            )
        })
    }

    /// Mbufs taken out of the pool and not returned.
    pub(crate) fn in_use(&self) -> u32 {
        // SAFETY: the pool is live (owned by self).
        unsafe { ffi::rte_mempool_in_use_count(self.0.as_ptr()) }
    }

    /// Fills `out` with up to `n` fresh mbufs; false when the pool has fewer.
    pub(crate) fn alloc_bulk(&self, out: &mut Vec<Mbuf>, n: usize) -> bool {
        let mut raw: [*mut ffi::rte_mbuf; 64] = [std::ptr::null_mut(); 64];
        let n = n.min(raw.len());
        // SAFETY: `raw` has room for n pointers; the pool is live. On success every entry is a
        // fresh mbuf owned by the caller.
        let rc = unsafe { ffi::sr_pktmbuf_alloc_bulk(self.0.as_ptr(), raw.as_mut_ptr(), n as u32) };
        if rc != 0 {
            return false;
        }
        out.extend(raw[..n].iter().filter_map(|&m| NonNull::new(m)).map(Mbuf));
        true
    }
}

impl Drop for Mempool {
    fn drop(&mut self) {
        // SAFETY: the pool is live and no mbuf of it is referenced any more (the engine drops
        // its mbufs and closes its port first).
        unsafe { ffi::rte_mempool_free(self.0.as_ptr()) }
    }
}

/// One packet buffer (the head of a chain), freed on drop.
#[derive(Debug)]
#[repr(transparent)]
pub(crate) struct Mbuf(NonNull<ffi::rte_mbuf>);

// SAFETY: an mbuf is plain memory owned by whoever holds the pointer; freeing it from another
// thread is allowed (mempool put is thread-safe).
unsafe impl Send for Mbuf {}

impl Mbuf {
    /// The first segment's bytes and the number of segments.
    pub(crate) fn first_segment(&self) -> (&[u8], u16) {
        let (mut len, mut segments) = (0u16, 0u16);
        // SAFETY: the mbuf is live and owned; the out-pointers are valid.
        let data = unsafe { ffi::sr_pktmbuf_data(self.0.as_ptr(), &mut len, &mut segments) };
        // SAFETY: DPDK guarantees data_len bytes at the data pointer; they live as long as the
        // mbuf, which `&self` borrows.
        (
            unsafe { std::slice::from_raw_parts(data, usize::from(len)) },
            segments,
        )
    }

    /// Appends every segment's bytes to `out`.
    pub(crate) fn copy_chain(&self, out: &mut Vec<u8>) {
        let mut segment = self.0.as_ptr();
        while !segment.is_null() {
            let (mut len, mut segments) = (0u16, 0u16);
            // SAFETY: `segment` is the head or a `next` of this live chain.
            let data = unsafe { ffi::sr_pktmbuf_data(segment, &mut len, &mut segments) };
            // SAFETY: data_len bytes at the data pointer, borrowed from the live chain.
            out.extend_from_slice(unsafe { std::slice::from_raw_parts(data, usize::from(len)) });
            // SAFETY: as above; returns NULL at the end of the chain.
            segment = unsafe { ffi::sr_pktmbuf_next(segment) };
        }
    }

    /// Resets the mbuf to one empty segment and makes it `len` bytes long; `None` if its room
    /// is smaller.
    pub(crate) fn reset_to(&mut self, len: u16) -> Option<&mut [u8]> {
        // SAFETY: the mbuf is live, owned, and not shared with the driver.
        let data = unsafe { ffi::sr_pktmbuf_reset_to(self.0.as_ptr(), len) };
        if data.is_null() {
            return None;
        }
        // SAFETY: DPDK made `len` bytes at `data` part of this mbuf; `&mut self` is exclusive.
        Some(unsafe { std::slice::from_raw_parts_mut(data, usize::from(len)) })
    }

    /// Shortens the (single-segment) mbuf to `len` bytes.
    pub(crate) fn set_len(&mut self, len: u16) {
        // SAFETY: the mbuf is live and owned; sr_pktmbuf_set_len never grows it.
        unsafe { ffi::sr_pktmbuf_set_len(self.0.as_ptr(), len) }
    }

    /// Asks the port to complete this TCP frame's checksums (see `sr_tx_tcp_checksum`).
    pub(crate) fn offload_tcp_checksum(&mut self, l3_len: u16, ipv6: bool) {
        // SAFETY: the mbuf is live, owned and not yet handed to the driver.
        unsafe { ffi::sr_tx_tcp_checksum(self.0.as_ptr(), l3_len, i32::from(ipv6)) }
    }

    /// Asks the port to cut this TCP/IPv4 frame into `segment_size`-byte segments (see
    /// `sr_tx_tcp_segmentation`).
    pub(crate) fn offload_tcp_segmentation(&mut self, l3_len: u16, l4_len: u16, segment_size: u16) {
        // SAFETY: the mbuf is live, owned, not yet handed to the driver, and holds an
        // Ethernet/IPv4/TCP frame with these header lengths (checked by the caller).
        unsafe { ffi::sr_tx_tcp_segmentation(self.0.as_ptr(), l3_len, l4_len, segment_size) }
    }

    /// `SR_RX_*` checksum facts the port set on a received mbuf.
    pub(crate) fn rx_checksum(&self) -> u32 {
        // SAFETY: the mbuf is live.
        unsafe { ffi::sr_rx_checksum(self.0.as_ptr()) }
    }
}

impl Drop for Mbuf {
    fn drop(&mut self) {
        // SAFETY: the mbuf is owned by self and not referenced elsewhere (a transmitted mbuf is
        // forgotten, not dropped: the driver owns it).
        unsafe { ffi::sr_pktmbuf_free(self.0.as_ptr()) }
    }
}

/// One RX and one TX queue with `rx_desc`/`tx_desc` descriptors and `offloads` (`SR_OFFLOAD_*`).
pub(crate) fn port_configure(
    port: u16,
    rx_desc: u16,
    tx_desc: u16,
    pool: &Mempool,
    offloads: u32,
) -> io::Result<()> {
    // SAFETY: valid port id, live pool that outlives the port (the engine closes the port
    // before it frees the pool).
    let rc = unsafe { ffi::sr_port_configure(port, rx_desc, tx_desc, pool.0.as_ptr(), offloads) };
    if rc != 0 {
        return Err(errno_error(rc, "configuring the port's queues"));
    }
    Ok(())
}

pub(crate) fn port_start(port: u16) -> io::Result<()> {
    // SAFETY: valid, configured port.
    let rc = unsafe { ffi::rte_eth_dev_start(port) };
    if rc != 0 {
        return Err(errno_error(rc, "starting the port"));
    }
    // SAFETY: valid, started port. Failing is harmless (the port may already receive only its
    // own MAC, which is the stack's).
    unsafe {
        ffi::rte_eth_promiscuous_enable(port);
    }
    Ok(())
}

/// Stops and closes the port; its RX ring's mbufs go back to their pool.
pub(crate) fn port_close(port: u16) {
    // SAFETY: valid port; stop then close is the documented teardown, each at most once.
    unsafe {
        ffi::rte_eth_dev_stop(port);
        ffi::rte_eth_dev_close(port);
    }
}

/// The port's counters (zero if it cannot tell).
pub(crate) fn port_stats(port: u16) -> PortCounters {
    let mut stats = ffi::rte_eth_stats::default();
    // SAFETY: valid port; `stats` is a valid, writable rte_eth_stats.
    if unsafe { ffi::rte_eth_stats_get(port, &mut stats) } != 0 {
        return PortCounters::default();
    }
    PortCounters {
        ipackets: stats.ipackets,
        opackets: stats.opackets,
        imissed: stats.imissed,
        ierrors: stats.ierrors,
        oerrors: stats.oerrors,
        rx_nombuf: stats.rx_nombuf,
    }
}

/// Receives up to `max` frames from queue 0 into `out`.
pub(crate) fn rx_burst(port: u16, out: &mut VecDeque<Mbuf>, max: usize) -> usize {
    let mut raw: [*mut ffi::rte_mbuf; 64] = [std::ptr::null_mut(); 64];
    let max = max.min(raw.len());
    // SAFETY: started port, queue 0 set up; `raw` has room for `max` pointers. Each returned
    // pointer is an mbuf the caller now owns. Only this engine polls the queue.
    let n = unsafe { ffi::sr_rx_burst(port, 0, raw.as_mut_ptr(), max as u16) };
    let n = usize::from(n);
    out.extend(raw[..n].iter().filter_map(|&m| NonNull::new(m)).map(Mbuf));
    n
}

/// Transmits the front of `pending` on queue 0; what the driver took leaves `pending`.
pub(crate) fn tx_burst(port: u16, pending: &mut VecDeque<Mbuf>) -> usize {
    let frames = pending.make_contiguous();
    let n = frames.len().min(usize::from(u16::MAX));
    // SAFETY: Mbuf is a transparent NonNull<rte_mbuf>, so `frames` is an array of n mbuf
    // pointers; the driver takes ownership of the first `sent` of them (forgotten below, never
    // freed here).
    let sent = unsafe { ffi::sr_tx_burst(port, 0, frames.as_mut_ptr().cast(), n as u16) };
    let sent = usize::from(sent);
    for mbuf in pending.drain(..sent) {
        std::mem::forget(mbuf);
    }
    sent
}
