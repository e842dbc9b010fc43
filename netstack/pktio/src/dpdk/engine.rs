//! The engine over a live EAL (built with the `dpdk` feature).

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;

use stackroute_dpdk_sys::{
    SR_OFFLOAD_RX_CHECKSUM, SR_OFFLOAD_TX_IPV4_CHECKSUM, SR_OFFLOAD_TX_TCP_CHECKSUM,
    SR_OFFLOAD_TX_TCP_TSO, SR_RX_IP_BAD, SR_RX_L4_BAD, SR_RX_L4_GOOD,
};
use stackroute_netstack::{Device, DeviceCapabilities, RxMeta};

use super::config::{MBUF_DATA_ROOM, TSO_DATA_ROOM, TSO_MBUFS};
use super::eal::Eal;
use super::offload::tcp_frame;
use super::{DpdkConfig, DpdkStatus};
use crate::sys::dpdk::{self as sys, Mbuf, Mempool, PortInfo};

/// The transmit offloads the engine uses: both, or neither (an IPv4 frame whose TCP checksum the
/// port completes needs its header checksum completed too).
const TX_CHECKSUM: u32 = SR_OFFLOAD_TX_IPV4_CHECKSUM | SR_OFFLOAD_TX_TCP_CHECKSUM;

/// The longest frame the stack may hand over for segmentation: a TSO mbuf's room less its
/// headroom, rounded down.
const TSO_MAX_FRAME: usize = 65_000;

/// Drivers fed by the Linux kernel, where a local sender's frame may carry an unfinished
/// (`CHECKSUM_PARTIAL`) TCP checksum the PMD cannot flag.
const KERNEL_FED: [&str; 3] = ["net_af_packet", "net_af_xdp", "net_tap"];

/// Stops and closes the port when dropped, before the pool its RX ring draws from.
#[derive(Debug)]
struct Port(u16);

impl Drop for Port {
    fn drop(&mut self) {
        sys::port_close(self.0);
    }
}

/// A DPDK port as a packet engine.
#[derive(Debug)]
pub struct Dpdk {
    // Field order is drop order: mbufs, then the port (its rings' mbufs return to the pool),
    // then the pool, then EAL.
    rx: VecDeque<Mbuf>,
    stash: Vec<Mbuf>,
    tso_stash: Vec<Mbuf>,
    pending: VecDeque<Mbuf>,
    port: Port,
    pool: Mempool,
    /// Mbufs of 64 KiB for frames the port cuts into segments, when it offers TSO.
    tso_pool: Option<Mempool>,
    eal: Arc<Eal>,
    info: PortInfo,
    config: DpdkConfig,
    offloads: u32,
    kernel_fed: bool,
    assembly: Vec<u8>,
    rx_bad_checksum: u64,
    rx_chained: u64,
    tx_checksum_offloaded: u64,
    tx_segmented: u64,
}

impl Dpdk {
    /// Starts EAL (or joins this process's live one) and opens the configured port.
    pub fn open(config: &DpdkConfig) -> io::Result<Self> {
        let eal = Eal::acquire(config)?;
        let ports = sys::port_ids();
        let mut infos = Vec::with_capacity(ports.len());
        for &port in &ports {
            infos.push((port, sys::port_info(port)?));
        }
        let (port, info) = choose_port(&infos, config.port.as_deref())?;
        let info = info.clone();
        let pool = Mempool::create(
            &format!("sr-pool-{}", info.name),
            config.mbufs,
            MBUF_DATA_ROOM,
        )?;
        let mut offloads = match config.offloads {
            false => 0,
            true if info.offloads & TX_CHECKSUM == TX_CHECKSUM => {
                info.offloads & (SR_OFFLOAD_RX_CHECKSUM | TX_CHECKSUM | SR_OFFLOAD_TX_TCP_TSO)
            }
            true => info.offloads & SR_OFFLOAD_RX_CHECKSUM,
        };
        // TSO needs frames larger than a packet mbuf; without their pool, no TSO.
        let tso_pool = (offloads & SR_OFFLOAD_TX_TCP_TSO != 0)
            .then(|| {
                Mempool::create(&format!("sr-tso-{}", info.name), TSO_MBUFS, TSO_DATA_ROOM).ok()
            })
            .flatten();
        if tso_pool.is_none() {
            offloads &= !SR_OFFLOAD_TX_TCP_TSO;
        }
        let context = |e: io::Error| {
            let hint = if e.kind() == io::ErrorKind::PermissionDenied {
                " (PMDs over kernel interfaces need CAP_NET_RAW and CAP_NET_ADMIN, net_af_xdp \
                 also CAP_BPF and CAP_SYS_ADMIN)"
            } else {
                ""
            };
            io::Error::new(e.kind(), format!("port {}: {e}{hint}", info.name))
        };
        sys::port_configure(
            port,
            config.descriptors,
            config.descriptors,
            &pool,
            offloads,
        )
        .map_err(context)?;
        let port = Port(port);
        sys::port_start(port.0).map_err(context)?;
        Ok(Self {
            rx: VecDeque::with_capacity(config.burst),
            stash: Vec::with_capacity(config.burst),
            tso_stash: Vec::new(),
            pending: VecDeque::with_capacity(config.burst),
            port,
            pool,
            tso_pool,
            eal,
            kernel_fed: KERNEL_FED.contains(&info.driver.as_str()),
            info,
            config: config.clone(),
            offloads,
            assembly: Vec::new(),
            rx_bad_checksum: 0,
            rx_chained: 0,
            tx_checksum_offloaded: 0,
            tx_segmented: 0,
        })
    }

    /// The port's MAC.
    pub fn mac(&self) -> [u8; 6] {
        self.info.mac
    }

    /// The engine's report.
    pub fn status(&self) -> DpdkStatus {
        DpdkStatus {
            version: sys::version(),
            port: self.info.name.clone(),
            driver: self.info.driver.clone(),
            memory: self.eal.memory.to_string(),
            runtime_dir: self.eal.runtime_dir.display().to_string(),
            eal_init_ms: self.eal.init_time.as_millis() as u64,
            mbufs: self.config.mbufs,
            mbufs_in_use: self.pool.in_use(),
            rx_checksum_offload: self.offloads & SR_OFFLOAD_RX_CHECKSUM != 0,
            tx_checksum_offload: self.offloads & TX_CHECKSUM != 0,
            tx_checksum_offloaded: self.tx_checksum_offloaded,
            tso: self.tso_pool.is_some(),
            tx_segmented: self.tx_segmented,
            rx_bad_checksum: self.rx_bad_checksum,
            rx_chained: self.rx_chained,
            counters: sys::port_stats(self.port.0),
        }
    }

    /// Lends an mbuf of at least `max_len` bytes to `f` and queues what it wrote, marked for
    /// the port's offloads: a TCP frame longer than the MTU is cut into `segment_size` pieces
    /// (TSO), any other TCP frame gets its checksums completed.
    fn send(
        &mut self,
        max_len: usize,
        segment_size: Option<usize>,
        f: impl FnOnce(&mut [u8]) -> usize,
    ) -> Option<usize> {
        if self.pending.len() >= self.config.burst {
            self.flush();
            if self.pending.len() >= self.config.burst {
                return None;
            }
        }
        let large = max_len > usize::from(MBUF_DATA_ROOM - 128);
        let (pool, stash) = match (&self.tso_pool, large) {
            (Some(pool), true) => (pool, &mut self.tso_stash),
            (None, true) => return None,
            (_, false) => (&self.pool, &mut self.stash),
        };
        if stash.is_empty()
            && !pool.alloc_bulk(stash, self.config.burst)
            && !pool.alloc_bulk(stash, 1)
        {
            return None;
        }
        let mut mbuf = stash.pop()?;
        let Some(buffer) = u16::try_from(max_len)
            .ok()
            .and_then(|len| mbuf.reset_to(len))
        else {
            stash.push(mbuf);
            return None;
        };
        let len = f(buffer).min(max_len);
        if len == 0 {
            stash.push(mbuf);
            return Some(0);
        }
        let tcp = (self.offloads & TX_CHECKSUM != 0)
            .then(|| mbuf.first_segment().0.get(..len).and_then(tcp_frame))
            .flatten();
        mbuf.set_len(len as u16);
        let mtu_frame = self.capabilities().mtu + 14;
        match (tcp, segment_size) {
            (Some(tcp), Some(size)) if len > mtu_frame && !tcp.ipv6 => {
                let headers = 14 + usize::from(tcp.l3_len + tcp.l4_len);
                // net_tap (22.11) refuses a segment whose headers, Ethernet's included, and
                // payload exceed the MTU, and then stops its whole burst: its segments are
                // cut 14 bytes shorter than the MSS (the receiver does not mind).
                let size = match self.info.driver.as_str() {
                    "net_tap" => size.min(usize::from(self.info.mtu).saturating_sub(headers)),
                    _ => size,
                };
                mbuf.offload_tcp_segmentation(tcp.l3_len, tcp.l4_len, size as u16);
                self.tx_segmented += 1;
            }
            (Some(tcp), _) => {
                mbuf.offload_tcp_checksum(tcp.l3_len, tcp.ipv6);
                self.tx_checksum_offloaded += 1;
            }
            (None, _) => {}
        }
        self.pending.push_back(mbuf);
        Some(len)
    }
}

/// The port named `wanted`, or the only one.
fn choose_port<'a>(
    ports: &'a [(u16, PortInfo)],
    wanted: Option<&str>,
) -> io::Result<(u16, &'a PortInfo)> {
    let names = || {
        ports
            .iter()
            .map(|(_, info)| format!("{} ({})", info.name, info.driver))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let not_found = |message: String| io::Error::new(io::ErrorKind::NotFound, message);
    match (wanted, ports) {
        (_, []) => Err(not_found(
            "EAL found no DPDK port: name one with --vdev or allow a PCI device with -a (net_af_packet \
             needs CAP_NET_RAW and CAP_NET_ADMIN, net_af_xdp root; a PCI device must be bound to \
             vfio-pci)"
                .into(),
        )),
        (None, [(id, info)]) => Ok((*id, info)),
        (None, _) => Err(not_found(format!(
            "EAL found {} ports ({}): choose one with --dpdk-port",
            ports.len(),
            names()
        ))),
        (Some(name), _) => ports
            .iter()
            .find(|(_, info)| info.name == name)
            .map(|(id, info)| (*id, info))
            .ok_or_else(|| not_found(format!("no DPDK port named {name}; EAL found {}", names()))),
    }
}

impl Device for Dpdk {
    fn capabilities(&self) -> DeviceCapabilities {
        // The IP MTU: the port's, within what one mbuf and the port's longest frame hold.
        let frame_limit = usize::from(MBUF_DATA_ROOM - 128).min(self.info.max_rx_pktlen as usize);
        DeviceCapabilities {
            mtu: usize::from(self.info.mtu).min(frame_limit.saturating_sub(18)),
            tx_checksum_offload: self.offloads & TX_CHECKSUM != 0,
            tso_max_frame: self.tso_pool.is_some().then_some(TSO_MAX_FRAME),
        }
    }

    fn receive<R>(&mut self, f: impl FnOnce(&[u8], RxMeta) -> R) -> Option<R> {
        loop {
            if self.rx.is_empty()
                && sys::rx_burst(self.port.0, &mut self.rx, self.config.burst) == 0
            {
                return None;
            }
            let mbuf = self.rx.pop_front()?;
            let checksum = mbuf.rx_checksum();
            if checksum & (SR_RX_L4_BAD | SR_RX_IP_BAD) != 0 {
                self.rx_bad_checksum += 1;
                continue;
            }
            let meta = RxMeta {
                checksum_trusted: checksum & SR_RX_L4_GOOD != 0,
                partial_checksum_possible: self.kernel_fed,
                received_at: None,
            };
            let (data, segments) = mbuf.first_segment();
            if segments <= 1 {
                return Some(f(data, meta));
            }
            self.rx_chained += 1;
            self.assembly.clear();
            mbuf.copy_chain(&mut self.assembly);
            return Some(f(&self.assembly, meta));
        }
    }

    fn transmit(&mut self, max_len: usize, f: impl FnOnce(&mut [u8]) -> usize) -> Option<usize> {
        self.send(max_len, None, f)
    }

    fn transmit_segmented(
        &mut self,
        max_len: usize,
        segment_size: usize,
        f: impl FnOnce(&mut [u8]) -> usize,
    ) -> Option<usize> {
        self.send(max_len, Some(segment_size), f)
    }

    fn flush(&mut self) {
        if !self.pending.is_empty() {
            sys::tx_burst(self.port.0, &mut self.pending);
        }
    }
}
