//! The DPDK engine in this process over `net_ring` (a virtual port whose TX ring is its RX
//! ring: frames come back), unprivileged: EAL's lifecycle, the frame path and cleanup. One test:
//! EAL runs once per process.

#![cfg_attr(not(feature = "dpdk"), allow(dead_code, unused_imports))]

use std::time::{Duration, Instant};

use stackroute_netstack::Device;
use stackroute_pktio::{Dpdk, DpdkConfig, Hugepages};

fn allowed_cpus() -> String {
    let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim()
        .to_string()
}

fn ring_config(port: &str) -> DpdkConfig {
    DpdkConfig {
        eal_args: vec![format!("--vdev={port}")],
        hugepages: Hugepages::Off,
        mbufs: 2047,
        ..DpdkConfig::default()
    }
}

#[cfg(not(feature = "dpdk"))]
#[test]
#[ignore = "built without DPDK: cargo test -p stackroute-pktio --features dpdk"]
fn eal_lifecycle_and_frames_on_net_ring() {}

#[cfg(feature = "dpdk")]
#[test]
fn eal_lifecycle_and_frames_on_net_ring() {
    let cpus = allowed_cpus();
    let mut dpdk = Dpdk::open(&ring_config("net_ring0")).expect("opening net_ring0");
    let status = dpdk.status();
    assert!(status.version.starts_with("DPDK "), "{status:?}");
    assert_eq!(status.driver, "net_ring", "{status:?}");
    assert!(status.memory.starts_with("no-huge"), "{status:?}");
    assert!(
        std::path::Path::new(&status.runtime_dir).is_dir(),
        "{status:?}"
    );
    assert_eq!(
        allowed_cpus(),
        cpus,
        "EAL must leave this thread's CPUs alone"
    );
    assert!(dpdk.capabilities().mtu >= 1500, "{:?}", dpdk.capabilities());
    let in_use_before = status.mbufs_in_use;

    // A burst of frames, each different, comes back byte for byte and in order.
    let frames: Vec<Vec<u8>> = (0..40u8)
        .map(|i| (0..60 + usize::from(i)).map(|b| (b as u8) ^ i).collect())
        .collect();
    for frame in &frames {
        let sent = dpdk.transmit(1514, |buffer| {
            buffer[..frame.len()].copy_from_slice(frame);
            frame.len()
        });
        assert_eq!(sent, Some(frame.len()));
    }
    assert_eq!(
        dpdk.transmit(1514, |_| 0),
        Some(0),
        "writing nothing sends nothing"
    );
    let mut received = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while received.len() < frames.len() && Instant::now() < deadline {
        dpdk.flush();
        if dpdk
            .receive(|frame, _| received.push(frame.to_vec()))
            .is_none()
        {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    assert_eq!(received, frames);
    let status = dpdk.status();
    assert_eq!(status.counters.opackets, 40, "{status:?}");
    assert_eq!(status.counters.ipackets, 40, "{status:?}");
    // Every lent and sent mbuf went back (the TX stash may hold some).
    assert!(
        status.mbufs_in_use <= in_use_before + 32,
        "{status:?} vs {in_use_before}"
    );

    // EAL is this process's: other arguments are refused with the reason.
    let error = Dpdk::open(&ring_config("net_ring1")).unwrap_err();
    assert!(error.to_string().contains("once per process"), "{error}");

    let runtime_dir = status.runtime_dir.clone();
    drop(dpdk);
    assert!(
        !std::path::Path::new(&runtime_dir).exists(),
        "{runtime_dir} must be removed at close"
    );
    let error = Dpdk::open(&ring_config("net_ring0")).unwrap_err();
    assert!(error.to_string().contains("already cleaned up"), "{error}");
}
