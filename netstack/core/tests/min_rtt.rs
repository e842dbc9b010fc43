//! Regression test for the throughput collapse of real-network runs: BBR's minimum RTT held
//! samples of 12 µs to 18 ms on a 30 ms path, so its BDP and window shrank to a few segments.
//!
//! Root cause (found with per-sample tracing on the benchmark path): the host loop reads its
//! clock, then calls `Stack::poll(now)`; when the host is descheduled between the two (under
//! `chrt -f` the kernel throttles a busy real-time task for ~50 ms once a second; on a loaded
//! 2-core machine any task can be), ACKs that arrived during the stall were processed at the
//! stale `now`. An ACK for a segment sent just before the stall then looked as if it had come
//! back up to the whole stall sooner than it did: the sample was `stale now − send time`, not
//! the real RTT. The traced samples had `real processing time − send time` ≥ 30 ms every time
//! while the stack's `now` lagged the real clock by 9–48 ms.
//!
//! The fix: hosts stamp each frame with the time they take it from the engine
//! (`RxMeta::received_at`) and the stack processes it no earlier than that. The simulator's
//! `HostStall` models exactly this host, with and without stamping.

use std::net::SocketAddrV4;
use std::time::Duration;

use stackroute_netstack::SocketError;
use stackroute_netstack::sim::{ADDR_B, HostStall, LinkConfig, Network};

/// One-way propagation delay: a 30 ms round trip, as in `bench.sh`.
const ONE_WAY: Duration = Duration::from_millis(15);
const LINK_BPS: u64 = 20_000_000;

struct Outcome {
    min_rtt_us: u64,
    goodput_mbps: f64,
}

/// A 6 s bulk transfer from `a` to `b` over 20 Mbit/s, 30 ms RTT with data loss, reordering and
/// duplication, and ACK loss and duplication, while `a`'s host stalls 45 ms once a second.
fn transfer(stamp_receive_time: bool, seed: u64) -> Outcome {
    let data_path = LinkConfig {
        delay: ONE_WAY,
        rate_bps: LINK_BPS,
        queue_bytes: 75_000,
        loss: 0.03,
        duplicate: 0.01,
        reorder: 0.02,
        reorder_delay: Duration::from_millis(3),
    };
    let ack_path = LinkConfig {
        loss: 0.02,
        duplicate: 0.02,
        reorder: 0.0,
        ..data_path
    };
    let mut net = Network::new(seed, data_path, ack_path, |_| {});
    net.set_host_stall(Some(HostStall {
        every: Duration::from_secs(1),
        length: Duration::from_millis(45),
        stamp_receive_time,
    }));
    let listener = net.b.listen(5001, 4).unwrap();
    let now = net.now();
    let client = net.a.connect(now, SocketAddrV4::new(ADDR_B, 5001)).unwrap();
    let chunk = vec![0x5au8; 128 * 1024];
    let mut buf = vec![0u8; 128 * 1024];
    let mut server = None;
    let mut received = 0u64;
    let duration = Duration::from_secs(6);
    let start = net.now();
    let finished = net.run_until(start + duration, |net| {
        while net.a.send(client, &chunk).is_ok() {}
        if server.is_none() {
            server = net.b.accept(listener).ok();
        }
        if let Some(s) = server {
            loop {
                match net.b.recv(s, &mut buf) {
                    Ok(0) | Err(SocketError::WouldBlock) => break,
                    Ok(n) => received += n as u64,
                    Err(e) => panic!("recv: {e}"),
                }
            }
        }
        false
    });
    assert!(!finished);
    assert!(server.is_some(), "handshake did not complete");
    let stats = net.a.connection_stats(client).unwrap();
    println!(
        "stamped {stamp_receive_time} seed {seed}: min RTT {} µs, {:.1} Mbit/s, {} retransmits",
        stats.min_rtt_us,
        received as f64 * 8.0 / duration.as_secs_f64() / 1e6,
        stats.retransmits
    );
    Outcome {
        min_rtt_us: stats.min_rtt_us,
        goodput_mbps: received as f64 * 8.0 / duration.as_secs_f64() / 1e6,
    }
}

#[test]
fn min_rtt_never_below_the_propagation_rtt_when_the_host_stalls() {
    let propagation_us = 2 * ONE_WAY.as_micros() as u64;
    for seed in [1, 2, 3] {
        let outcome = transfer(true, seed);
        assert!(
            outcome.min_rtt_us >= propagation_us,
            "seed {seed}: min RTT {} µs below the path's {propagation_us} µs",
            outcome.min_rtt_us
        );
        // The window stays built on a real BDP: goodput near link × (1 − 3% loss).
        assert!(
            outcome.goodput_mbps >= 0.75 * LINK_BPS as f64 / 1e6 * 0.97,
            "seed {seed}: goodput {:.1} Mbit/s",
            outcome.goodput_mbps
        );
    }
}

#[test]
fn unstamped_frames_after_a_stall_reproduce_the_impossible_samples() {
    // The same host without receive times: the mechanism behind the collapse. If this stops
    // producing short samples, the simulator no longer models the stall that the test above
    // guards against.
    let propagation_us = 2 * ONE_WAY.as_micros() as u64;
    let outcome = transfer(false, 1);
    assert!(
        outcome.min_rtt_us < propagation_us / 2,
        "min RTT {} µs: the stall model no longer produces stale-clock samples",
        outcome.min_rtt_us
    );
}
