//! The DPDK engine: one ethdev port (a PCI device bound to vfio-pci, or a virtual device such
//! as `net_af_packet`, `net_af_xdp`, `net_memif`, `net_tap`) with one RX and one TX queue, polled
//! by the host loop. Received mbufs are lent to the stack in place (a chained mbuf is copied
//! once); the stack writes transmitted frames straight into mbufs, which leave in bursts on
//! `flush`. Checksums the port verified are trusted. Without the `dpdk` cargo feature
//! [`Dpdk::open`] says how to get a build with DPDK, so callers fall back the same way in
//! every build.

mod config;
#[cfg(feature = "dpdk")]
mod eal;
#[cfg(feature = "dpdk")]
mod offload;

pub use config::{DpdkConfig, Hugepages, Memory};

/// What a report says about the engine.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DpdkStatus {
    /// DPDK's version ("DPDK 22.11.11").
    pub version: String,
    /// The port's name (`net_af_packet0`, `0000:03:00.0`).
    pub port: String,
    /// Its driver (`net_af_packet`, `net_ice`).
    pub driver: String,
    /// Where EAL memory comes from.
    pub memory: String,
    /// EAL's runtime directory, removed when the engine closes.
    pub runtime_dir: String,
    /// How long `rte_eal_init` took, in ms.
    pub eal_init_ms: u64,
    /// Mbufs in the pool.
    pub mbufs: u32,
    /// Of them, in use now (the port's RX ring, frames in flight, the TX stash).
    pub mbufs_in_use: u32,
    /// The port verifies received checksums.
    pub rx_checksum_offload: bool,
    /// The port completes sent TCP frames' checksums.
    pub tx_checksum_offload: bool,
    /// Frames sent with their checksums left to the port.
    pub tx_checksum_offloaded: u64,
    /// The port cuts frames longer than the MTU into segments (TSO).
    pub tso: bool,
    /// Frames the port was asked to cut.
    pub tx_segmented: u64,
    /// Frames dropped because the port found a bad checksum.
    pub rx_bad_checksum: u64,
    /// Chained (multi-segment) frames received, each copied once.
    pub rx_chained: u64,
    /// The port's counters.
    pub counters: PortCounters,
}

/// A DPDK port's counters (`rte_eth_stats`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortCounters {
    /// Frames received and sent.
    pub ipackets: u64,
    pub opackets: u64,
    /// Frames the port dropped for want of RX descriptors, and receive errors.
    pub imissed: u64,
    pub ierrors: u64,
    /// Transmit errors.
    pub oerrors: u64,
    /// Receive failures for want of mbufs.
    pub rx_nombuf: u64,
}

#[cfg(feature = "dpdk")]
mod engine;
#[cfg(feature = "dpdk")]
pub use engine::Dpdk;

#[cfg(not(feature = "dpdk"))]
mod disabled {
    use std::io;

    use stackroute_netstack::{Device, DeviceCapabilities, RxMeta};

    use super::{DpdkConfig, DpdkStatus};

    /// The DPDK engine, absent from this build (no value of this type exists).
    #[derive(Debug)]
    pub struct Dpdk {
        never: std::convert::Infallible,
    }

    impl Dpdk {
        /// Always `Unsupported`, saying how to get a build with DPDK.
        pub fn open(_config: &DpdkConfig) -> io::Result<Self> {
            Err(io::Error::new(
                io::ErrorKind::Unsupported,
                stackroute_dpdk_sys::HOW_TO_ENABLE,
            ))
        }

        /// The port's MAC.
        pub fn mac(&self) -> [u8; 6] {
            match self.never {}
        }

        /// The engine's report.
        pub fn status(&self) -> DpdkStatus {
            match self.never {}
        }
    }

    impl Device for Dpdk {
        fn capabilities(&self) -> DeviceCapabilities {
            match self.never {}
        }

        fn receive<R>(&mut self, _f: impl FnOnce(&[u8], RxMeta) -> R) -> Option<R> {
            match self.never {}
        }

        fn transmit(&mut self, _: usize, _: impl FnOnce(&mut [u8]) -> usize) -> Option<usize> {
            match self.never {}
        }
    }
}
#[cfg(not(feature = "dpdk"))]
pub use disabled::Dpdk;

#[cfg(all(test, not(feature = "dpdk")))]
mod tests {
    #[test]
    fn without_the_feature_open_says_how_to_enable() {
        let error = super::Dpdk::open(&super::DpdkConfig::default()).unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::Unsupported);
        assert!(error.to_string().contains("--features dpdk"), "{error}");
    }
}
