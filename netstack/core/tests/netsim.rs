//! End-to-end tests over the deterministic simulated network.

use std::net::{SocketAddr, SocketAddrV4};
use std::time::Duration;

use stackroute_netstack::congestion::CongestionControl;
use stackroute_netstack::sim::{ADDR_B, ADDR6_B, LinkConfig, Network, SimRng};
use stackroute_netstack::{SocketError, SocketHandle, Stack, TcpState};

const PORT: u16 = 5001;

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = SimRng::new(seed);
    (0..len).map(|_| rng.next_u64() as u8).collect()
}

/// Client on `a` sends `data` to a server on `b`, shuts down, and the server echoes nothing but
/// reads to EOF and then closes. Returns what the server received and the simulated duration.
struct Transfer {
    client: SocketHandle,
    server: Option<SocketHandle>,
    listener: SocketHandle,
    sent: usize,
    received: Vec<u8>,
    server_eof: bool,
    client_eof: bool,
}

impl Transfer {
    fn start(net: &mut Network, cc: CongestionControl, to: SocketAddr) -> Self {
        let listener = net.b.listen(PORT, 8).unwrap();
        let mut config = net.a.config().tcp.clone();
        config.congestion_control = cc;
        let now = net.now();
        let client = net.a.connect_with(now, to, config).unwrap();
        Self {
            client,
            server: None,
            listener,
            sent: 0,
            received: Vec::new(),
            server_eof: false,
            client_eof: false,
        }
    }

    /// Moves data between the applications and the stacks; returns true when both sides saw EOF.
    fn pump(&mut self, net: &mut Network, data: &[u8]) -> bool {
        if self.server.is_none()
            && let Ok(h) = net.b.accept(self.listener)
        {
            self.server = Some(h);
        }
        while self.sent < data.len() {
            match net.a.send(self.client, &data[self.sent..]) {
                Ok(n) => {
                    self.sent += n;
                    if self.sent == data.len() {
                        net.a.shutdown(self.client).unwrap();
                    }
                }
                Err(SocketError::WouldBlock) => break,
                Err(e) => panic!("client send failed: {e}"),
            }
        }
        if let Some(server) = self.server {
            let mut buf = [0u8; 65536];
            while !self.server_eof {
                match net.b.recv(server, &mut buf) {
                    Ok(0) => {
                        self.server_eof = true;
                        net.b.close(server).unwrap();
                    }
                    Ok(n) => self.received.extend_from_slice(&buf[..n]),
                    Err(SocketError::WouldBlock) => break,
                    Err(e) => panic!("server recv failed: {e}"),
                }
            }
        }
        if !self.client_eof {
            let mut buf = [0u8; 1024];
            match net.a.recv(self.client, &mut buf) {
                Ok(0) => self.client_eof = true,
                Ok(_) => panic!("server sent unexpected data"),
                Err(SocketError::WouldBlock) => {}
                Err(e) => panic!("client recv failed: {e}"),
            }
        }
        self.server_eof && self.client_eof
    }
}

fn run_transfer(
    seed: u64,
    link: LinkConfig,
    cc: CongestionControl,
    len: usize,
    limit: Duration,
) -> (Network, Transfer, Vec<u8>, bool) {
    let to = SocketAddrV4::new(ADDR_B, PORT).into();
    run_transfer_to(seed, link, cc, len, limit, |_| to)
}

/// `run_transfer` to the address `to` picks once the network exists.
fn run_transfer_to(
    seed: u64,
    link: LinkConfig,
    cc: CongestionControl,
    len: usize,
    limit: Duration,
    to: impl Fn(&Network) -> SocketAddr,
) -> (Network, Transfer, Vec<u8>, bool) {
    let mut net = Network::new(seed, link, link, |_| {});
    let data = pattern(len, seed);
    let destination = to(&net);
    let mut transfer = Transfer::start(&mut net, cc, destination);
    let deadline = net.now() + limit;
    let done = net.run_until(deadline, |net| transfer.pump(net, &data));
    (net, transfer, data, done)
}

fn assert_exact(transfer: &Transfer, data: &[u8]) {
    assert_eq!(transfer.received.len(), data.len(), "byte count");
    let first_diff = transfer.received.iter().zip(data).position(|(a, b)| a != b);
    assert_eq!(first_diff, None, "payload differs");
}

#[test]
fn clean_link_transfers_every_byte_in_order() {
    let link = LinkConfig {
        delay: Duration::from_millis(5),
        rate_bps: 50_000_000,
        ..LinkConfig::default()
    };
    let (net, transfer, data, done) = run_transfer(
        1,
        link,
        CongestionControl::Bbr,
        2_000_000,
        Duration::from_secs(20),
    );
    assert!(
        done,
        "transfer did not finish: sent {} received {} eofs {} {} state {:?} {:?} at {:?}",
        transfer.sent,
        transfer.received.len(),
        transfer.server_eof,
        transfer.client_eof,
        net.a.state(transfer.client),
        net.a.connection_stats(transfer.client),
        net.now()
    );
    assert_exact(&transfer, &data);
    let stats = net.a.connection_stats(transfer.client).unwrap();
    assert_eq!(stats.retransmits, 0, "no loss, no retransmissions");
}

/// 20 Mbit/s, 20 ms RTT, 3% loss, 2% duplication, 5% reordering by 3 ms.
fn impaired_link() -> LinkConfig {
    LinkConfig {
        delay: Duration::from_millis(10),
        rate_bps: 20_000_000,
        queue_bytes: 100_000,
        loss: 0.03,
        duplicate: 0.02,
        reorder: 0.05,
        reorder_delay: Duration::from_millis(3),
    }
}

#[test]
fn impaired_link_delivers_exactly_once_in_order_for_every_controller() {
    let link = impaired_link();
    for (seed, cc) in [
        (11, CongestionControl::Bbr),
        (12, CongestionControl::Cubic),
        (13, CongestionControl::Reno),
    ] {
        let (net, transfer, data, done) =
            run_transfer(seed, link, cc, 1_000_000, Duration::from_secs(120));
        assert!(done, "{cc:?}: transfer did not finish by {:?}", net.now());
        assert_exact(&transfer, &data);
        assert!(net.dropped_frames() > 0);
    }
}

#[test]
fn ipv6_transfers_find_the_neighbor_by_ndp_and_arrive_exactly_once() {
    let link = impaired_link();
    // No static neighbours in the simulator: the first solicitation (or its answer) may be
    // lost too, and is repeated.
    let to_global = |_: &Network| SocketAddr::new(ADDR6_B.into(), PORT);
    let (net, transfer, data, done) = run_transfer_to(
        21,
        link,
        CongestionControl::Bbr,
        1_000_000,
        Duration::from_secs(120),
        to_global,
    );
    assert!(done, "global: transfer did not finish by {:?}", net.now());
    assert_exact(&transfer, &data);
    let (local, remote) = net.a.addresses(transfer.client).unwrap();
    assert_eq!(remote, to_global(&net));
    assert!(local.is_ipv6());
    assert!(net.dropped_frames() > 0);
    assert!(net.a.connection_stats(transfer.client).unwrap().retransmits > 0);

    // To the peer's link-local address: our link-local address is the source.
    let to_link_local =
        |net: &Network| SocketAddr::new(net.b.link_local_address().unwrap().into(), PORT);
    let (net, transfer, data, done) = run_transfer_to(
        22,
        LinkConfig {
            delay: Duration::from_millis(2),
            ..LinkConfig::default()
        },
        CongestionControl::Cubic,
        200_000,
        Duration::from_secs(30),
        to_link_local,
    );
    assert!(done, "link-local: transfer did not finish");
    assert_exact(&transfer, &data);
    let (local, _) = net.a.addresses(transfer.client).unwrap();
    assert_eq!(local.ip(), net.a.link_local_address().unwrap());
}

#[test]
fn dsack_widens_the_reordering_window_so_reordering_stops_causing_retransmissions() {
    // No loss, but 3% of segments arrive 8 ms late on a 20 ms path: past RACK's initial
    // reordering window (min RTT / 4 = 5 ms), so the first ones are retransmitted spuriously.
    // The receiver reports each duplicate with a DSACK, the sender widens its window, and
    // the rest of the reordering is tolerated.
    let link = LinkConfig {
        delay: Duration::from_millis(10),
        rate_bps: 50_000_000,
        reorder: 0.03,
        reorder_delay: Duration::from_millis(8),
        ..LinkConfig::default()
    };
    let (net, transfer, data, done) = run_transfer(
        31,
        link,
        CongestionControl::Bbr,
        4_000_000,
        Duration::from_secs(60),
    );
    assert!(done, "transfer did not finish by {:?}", net.now());
    assert_exact(&transfer, &data);
    let stats = net.a.connection_stats(transfer.client).unwrap();
    // ≈ 2760 segments, ≈ 80 of them reordered.
    eprintln!("{stats:?}");
    assert!(stats.dsacks_received >= 1, "{stats:?}");
    assert!(
        stats.reorder_window_us > 5_000,
        "window not widened: {stats:?}"
    );
    assert!(
        stats.retransmits <= 20,
        "reordering still retransmitted: {stats:?}"
    );
}

#[test]
fn high_loss_and_heavy_reordering_still_complete() {
    let link = LinkConfig {
        delay: Duration::from_millis(20),
        rate_bps: 10_000_000,
        queue_bytes: 200_000,
        loss: 0.15,
        duplicate: 0.05,
        reorder: 0.2,
        reorder_delay: Duration::from_millis(15),
    };
    let (_net, transfer, data, done) = run_transfer(
        21,
        link,
        CongestionControl::Bbr,
        300_000,
        Duration::from_secs(300),
    );
    assert!(done, "transfer did not finish");
    assert_exact(&transfer, &data);
}

fn stack_state(stack: &Stack, handle: SocketHandle) -> Option<TcpState> {
    stack.state(handle).ok()
}

#[test]
fn both_directions_close_and_sockets_are_freed_after_time_wait() {
    let link = LinkConfig::default();
    let mut net = Network::new(3, link, link, |c| c.tcp.time_wait = Duration::from_secs(2));
    let data = pattern(10_000, 3);
    let mut transfer = Transfer::start(
        &mut net,
        CongestionControl::Bbr,
        SocketAddrV4::new(ADDR_B, PORT).into(),
    );
    let deadline = net.now() + Duration::from_secs(10);
    assert!(net.run_until(deadline, |net| transfer.pump(net, &data)));
    assert_exact(&transfer, &data);
    // The client shut down first, so after its close it lingers in TIME-WAIT.
    assert_eq!(
        stack_state(&net.a, transfer.client),
        Some(TcpState::TimeWait)
    );
    net.a.close(transfer.client).unwrap();
    net.b.close(transfer.listener).unwrap();
    assert_eq!(
        net.a.socket_count(),
        1,
        "TIME-WAIT connection kept after close"
    );
    net.run_for(Duration::from_secs(3));
    assert_eq!(net.a.socket_count(), 0);
    assert_eq!(net.b.socket_count(), 0);
}

/// With segmentation offload (the simulated NIC cuts frames longer than the MTU into MSS
/// segments and completes their checksums) the stack hands over several MSS of new data per
/// frame, each MSS its own entry for SACK, RACK and retransmission: on a clean link every byte
/// arrives without a retransmission, and on the impaired one every byte arrives exactly once and
/// in order, for BBR (paced) and CUBIC (window-limited bursts).
#[test]
fn segmentation_offload_keeps_the_stream_exact_clean_and_impaired() {
    let clean = LinkConfig {
        delay: Duration::from_millis(5),
        rate_bps: 50_000_000,
        ..LinkConfig::default()
    };
    for (seed, link, cc) in [
        (21, clean, CongestionControl::Bbr),
        (22, impaired_link(), CongestionControl::Bbr),
        (23, impaired_link(), CongestionControl::Cubic),
    ] {
        let mut net = Network::new(seed, link, link, |_| {});
        net.set_tso(Some(65_000));
        let data = pattern(2_000_000, seed);
        let to = SocketAddrV4::new(ADDR_B, PORT).into();
        let mut transfer = Transfer::start(&mut net, cc, to);
        let deadline = net.now() + Duration::from_secs(120);
        let done = net.run_until(deadline, |net| transfer.pump(net, &data));
        assert!(
            done,
            "{cc:?} seed {seed}: transfer did not finish by {:?}",
            net.now()
        );
        assert_exact(&transfer, &data);
        assert!(
            net.tso_frames() > 0,
            "{cc:?}: no frame used segmentation offload"
        );
        let stats = net.a.connection_stats(transfer.client).unwrap();
        if link.loss == 0.0 {
            assert_eq!(
                stats.retransmits, 0,
                "no loss, no retransmissions: {stats:?}"
            );
        } else {
            assert!(net.dropped_frames() > 0);
        }
        eprintln!(
            "{cc:?} loss {}: {} frames cut by the NIC, {} segments, {} retransmits",
            link.loss,
            net.tso_frames(),
            stats.segments_sent,
            stats.retransmits
        );
    }
}
