//! State-machine tests with simulated time: simultaneous open and close, refusal, backlog,
//! zero-window probing, keepalive, retransmission back-off and Nagle.

use std::net::SocketAddrV4;
use std::time::Duration;

use stackroute_netstack::sim::{ADDR_A, ADDR_B, LinkConfig, Network};
use stackroute_netstack::{
    EventKind, Keepalive, SocketError, SocketHandle, SocketOption, TcpConfig, TcpError, TcpState,
};

fn link(delay_ms: u64) -> LinkConfig {
    LinkConfig {
        delay: Duration::from_millis(delay_ms),
        ..LinkConfig::default()
    }
}

/// A connects to B's `listener` on port 80; returns both ends once B has accepted.
fn connect_and_accept(net: &mut Network, listener: SocketHandle) -> (SocketHandle, SocketHandle) {
    let now = net.now();
    let a = net.a.connect(now, SocketAddrV4::new(ADDR_B, 80)).unwrap();
    let limit = net.now() + Duration::from_secs(2);
    let mut b = None;
    assert!(net.run_until(limit, |net| {
        b = net.b.accept(listener).ok();
        b.is_some()
    }));
    (a, b.unwrap())
}

fn blackhole() -> LinkConfig {
    LinkConfig {
        loss: 1.0,
        ..link(5)
    }
}

#[test]
fn simultaneous_open_reaches_established_on_both_sides() {
    let mut net = Network::new(1, link(10), link(10), |_| {});
    // Learn MACs first so both SYNs really cross in flight.
    net.a.add_neighbor(ADDR_B, [2, 0, 0, 0, 0, 2]);
    net.b.add_neighbor(ADDR_A, [2, 0, 0, 0, 0, 1]);
    let now = net.now();
    let config = TcpConfig::default();
    let a = net
        .a
        .connect_from(now, 7000, SocketAddrV4::new(ADDR_B, 7001), config.clone())
        .unwrap();
    let b = net
        .b
        .connect_from(now, 7001, SocketAddrV4::new(ADDR_A, 7000), config)
        .unwrap();
    let limit = net.now() + Duration::from_secs(5);
    assert!(net.run_until(limit, |net| {
        net.a.state(a) == Ok(TcpState::Established) && net.b.state(b) == Ok(TcpState::Established)
    }));
    // Data flows both ways on the simultaneously opened connection.
    net.a.send(a, b"from a").unwrap();
    net.b.send(b, b"from b").unwrap();
    net.run_for(Duration::from_millis(200));
    let mut buf = [0u8; 16];
    assert_eq!(net.b.recv(b, &mut buf), Ok(6));
    assert_eq!(&buf[..6], b"from a");
    assert_eq!(net.a.recv(a, &mut buf), Ok(6));
    assert_eq!(&buf[..6], b"from b");
}

#[test]
fn simultaneous_close_goes_through_closing_to_time_wait() {
    let mut net = Network::new(2, link(10), link(10), |c| {
        c.tcp.time_wait = Duration::from_secs(1);
    });
    let listener = net.b.listen(80, 4).unwrap();
    let (a, b) = connect_and_accept(&mut net, listener);
    // Both FINs leave before either arrives.
    net.a.shutdown(a).unwrap();
    net.b.shutdown(b).unwrap();
    net.run_for(Duration::from_millis(15));
    assert_eq!(net.a.state(a), Ok(TcpState::Closing));
    assert_eq!(net.b.state(b), Ok(TcpState::Closing));
    net.run_for(Duration::from_millis(20));
    assert_eq!(net.a.state(a), Ok(TcpState::TimeWait));
    assert_eq!(net.b.state(b), Ok(TcpState::TimeWait));
    let mut buf = [0u8; 4];
    assert_eq!(net.a.recv(a, &mut buf), Ok(0), "EOF");
    assert_eq!(net.a.send(a, b"x"), Err(SocketError::Shutdown));
    net.run_for(Duration::from_millis(1100));
    assert_eq!(net.a.state(a), Ok(TcpState::Closed));
}

#[test]
fn connect_to_closed_port_is_refused() {
    let mut net = Network::new(3, link(5), link(5), |_| {});
    let now = net.now();
    let a = net.a.connect(now, SocketAddrV4::new(ADDR_B, 9)).unwrap();
    net.run_for(Duration::from_millis(100));
    assert_eq!(net.a.error(a), Ok(Some(TcpError::Refused)));
    let events: Vec<_> = std::iter::from_fn(|| net.a.poll_event()).collect();
    assert!(
        events
            .iter()
            .any(|e| e.handle == a && e.kind == EventKind::Error(TcpError::Refused))
    );
    let mut buf = [0u8; 4];
    assert_eq!(
        net.a.recv(a, &mut buf),
        Err(SocketError::Connection(TcpError::Refused))
    );
}

#[test]
fn backlog_limits_pending_connections_and_the_rest_retry() {
    let mut net = Network::new(4, link(5), link(5), |_| {});
    let listener = net.b.listen(80, 2).unwrap();
    let now = net.now();
    let clients: Vec<_> = (0..4)
        .map(|_| net.a.connect(now, SocketAddrV4::new(ADDR_B, 80)).unwrap())
        .collect();
    net.run_for(Duration::from_millis(300));
    let established = |net: &Network| {
        clients
            .iter()
            .filter(|c| net.a.state(**c) == Ok(TcpState::Established))
            .count()
    };
    assert_eq!(established(&net), 2, "only the backlog's worth complete");
    assert!(net.b.stats().syn_dropped >= 2);
    let mut accepted = 0;
    let limit = net.now() + Duration::from_secs(10);
    assert!(net.run_until(limit, |net| {
        while net.b.accept(listener).is_ok() {
            accepted += 1;
        }
        accepted == 4
    }));
    assert_eq!(established(&net), 4, "SYN retransmission got the rest in");
}

#[test]
fn zero_window_is_probed_until_the_reader_drains() {
    let mut net = Network::new(5, link(5), link(5), |c| {
        c.tcp.recv_buffer = 16 * 1024;
    });
    let listener = net.b.listen(80, 2).unwrap();
    let now = net.now();
    let a = net.a.connect(now, SocketAddrV4::new(ADDR_B, 80)).unwrap();
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let mut sent = 0;
    let mut b = None;
    let limit = net.now() + Duration::from_secs(5);
    net.run_until(limit, |net| {
        if b.is_none() {
            b = net.b.accept(listener).ok();
        }
        if let Ok(n) = net.a.send(a, &data[sent..]) {
            sent += n;
        }
        false
    });
    let b = b.unwrap();
    let acked = net.a.connection_stats(a).unwrap().bytes_acked;
    assert!(
        acked <= 16 * 1024,
        "acked {acked} beyond the receive buffer"
    );
    assert_eq!(net.a.state(a), Ok(TcpState::Established));
    // Now read everything; probes and window updates must restart the flow.
    let mut received = Vec::new();
    let mut buf = vec![0u8; 8192];
    let limit = net.now() + Duration::from_secs(60);
    assert!(net.run_until(limit, |net| {
        if let Ok(n) = net.a.send(a, &data[sent..]) {
            sent += n;
        }
        while let Ok(n) = net.b.recv(b, &mut buf) {
            if n == 0 {
                break;
            }
            received.extend_from_slice(&buf[..n]);
        }
        received.len() == data.len()
    }));
    assert_eq!(received, data);
}

#[test]
fn keepalive_detects_a_dead_peer() {
    let mut net = Network::new(6, link(5), link(5), |_| {});
    let listener = net.b.listen(80, 2).unwrap();
    let now = net.now();
    let a = net.a.connect(now, SocketAddrV4::new(ADDR_B, 80)).unwrap();
    net.run_for(Duration::from_millis(100));
    assert!(net.b.accept(listener).is_ok());
    let keepalive = Keepalive {
        idle: Duration::from_secs(2),
        interval: Duration::from_secs(1),
        probes: 3,
    };
    net.a
        .set_option(a, SocketOption::Keepalive(Some(keepalive)))
        .unwrap();
    // Answered probes keep an idle connection alive.
    net.run_for(Duration::from_secs(10));
    assert_eq!(net.a.state(a), Ok(TcpState::Established));
    // Then the peer vanishes.
    net.set_links(blackhole(), blackhole());
    net.run_for(Duration::from_secs(8));
    assert_eq!(net.a.error(a), Ok(Some(TcpError::TimedOut)));
}

#[test]
fn retransmissions_back_off_then_time_out() {
    let mut net = Network::new(7, link(5), link(5), |c| {
        c.tcp.max_retransmissions = 4;
    });
    let listener = net.b.listen(80, 2).unwrap();
    let now = net.now();
    let a = net.a.connect(now, SocketAddrV4::new(ADDR_B, 80)).unwrap();
    net.run_for(Duration::from_millis(100));
    assert!(net.b.accept(listener).is_ok());
    net.set_links(blackhole(), blackhole());
    let start = net.now();
    net.a.send(a, b"into the void").unwrap();
    let limit = start + Duration::from_secs(60);
    assert!(net.run_until(limit, |net| net.a.error(a) != Ok(None)));
    assert_eq!(net.a.error(a), Ok(Some(TcpError::TimedOut)));
    let elapsed = net.now().saturating_duration_since(start);
    // RTO ≥ 200 ms, doubled four times: 0.2 + 0.4 + 0.8 + 1.6 + 3.2 s at least.
    assert!(
        elapsed >= Duration::from_millis(6200),
        "timed out after {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(30),
        "timed out after {elapsed:?}"
    );
    let stats = net.a.connection_stats(a).unwrap();
    assert_eq!(stats.rto_count, 5);
}

#[test]
fn nagle_coalesces_small_writes_and_nodelay_does_not() {
    fn segments_for_small_writes(nodelay: bool) -> u64 {
        let mut net = Network::new(8, link(20), link(20), |_| {});
        let listener = net.b.listen(80, 2).unwrap();
        let now = net.now();
        let a = net.a.connect(now, SocketAddrV4::new(ADDR_B, 80)).unwrap();
        net.run_for(Duration::from_millis(200));
        assert!(net.b.accept(listener).is_ok());
        net.a.set_option(a, SocketOption::NoDelay(nodelay)).unwrap();
        for _ in 0..20 {
            net.a.send(a, b"0123456789").unwrap();
            net.run_for(Duration::from_millis(1));
        }
        net.run_for(Duration::from_millis(500));
        let stats = net.a.connection_stats(a).unwrap();
        assert_eq!(stats.bytes_acked, 200);
        stats.segments_sent
    }
    let with_nagle = segments_for_small_writes(false);
    let without = segments_for_small_writes(true);
    assert_eq!(without, 20);
    assert!(with_nagle <= 3, "Nagle sent {with_nagle} segments");
}

#[test]
fn listener_options_reach_accepted_connections_and_options_change_midstream() {
    use stackroute_netstack::congestion::CongestionControl;

    let mut net = Network::new(9, link(10), link(10), |_| {});
    let listener = net.b.listen(80, 4).unwrap();
    // Set on the listener: inherited by what it accepts, as with Linux.
    for option in [
        SocketOption::CongestionControl(CongestionControl::Cubic),
        SocketOption::ReceiveBuffer(32 << 10),
        SocketOption::NoDelay(true),
    ] {
        net.b.set_option(listener, option).unwrap();
    }
    let (a, b) = connect_and_accept(&mut net, listener);
    assert_eq!(net.b.congestion_control(b), Ok(CongestionControl::Cubic));
    assert_eq!(net.a.congestion_control(a), Ok(CongestionControl::Bbr));
    // A 32 KiB buffer needs no window scaling: the SYN-ACK offered no shift.
    let offered = net.a.connection_stats(a).unwrap().peer_window;
    assert!(offered > 0 && offered <= 32 << 10, "offered {offered}");

    // Shrinking the buffer does not take back window already offered: 30 kB sent into the
    // 32 KiB window all arrive (no drop, no retransmission) although the buffer is now 4 KiB.
    let data: Vec<u8> = (0..30_000u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(net.a.send(a, &data), Ok(data.len()));
    net.b
        .set_option(b, SocketOption::ReceiveBuffer(4 << 10))
        .unwrap();
    net.run_for(Duration::from_millis(200));
    let mut got = vec![0u8; 64 << 10];
    assert_eq!(net.b.recv(b, &mut got), Ok(data.len()));
    assert_eq!(&got[..data.len()], &data[..]);
    let stats = net.a.connection_stats(a).unwrap();
    assert_eq!(stats.retransmits, 0);
    assert_eq!(stats.bytes_acked, data.len() as u64);

    // Growing it widens the window, up to 65535 since the scale (0) was fixed at the SYN.
    net.b
        .set_option(b, SocketOption::ReceiveBuffer(1 << 20))
        .unwrap();
    net.run_for(Duration::from_millis(100));
    assert_eq!(net.a.connection_stats(a).unwrap().peer_window, 65535);

    // TCP_CONGESTION mid-transfer: the new controller takes over and the stream is intact.
    let bulk: Vec<u8> = (0..400_000u32).map(|i| (i % 241) as u8).collect();
    let mut sent = 0;
    let mut received = Vec::new();
    let limit = net.now() + Duration::from_secs(30);
    let mut switched = false;
    while received.len() < bulk.len() && net.now() < limit {
        if sent < bulk.len() {
            sent += net.a.send(a, &bulk[sent..]).unwrap_or(0);
        }
        if !switched && sent > 100_000 {
            net.a
                .set_option(a, SocketOption::CongestionControl(CongestionControl::Reno))
                .unwrap();
            assert_eq!(net.a.congestion_control_name(a), Ok("reno"));
            switched = true;
        }
        net.run_for(Duration::from_millis(5));
        while let Ok(n) = net.b.recv(b, &mut got) {
            if n == 0 {
                break;
            }
            received.extend_from_slice(&got[..n]);
        }
    }
    assert!(switched);
    assert_eq!(received, bulk);
    assert_eq!(net.a.congestion_control(a), Ok(CongestionControl::Reno));
}

#[test]
fn a_new_syn_reuses_a_time_wait_four_tuple_when_it_is_newer() {
    // RFC 6191: the server closes first, so it holds TIME-WAIT (60 s); the client comes back
    // from the same port at once and is accepted, with and without timestamps.
    for timestamps in [true, false] {
        let mut net = Network::new(10, link(5), link(5), |c| c.tcp.timestamps = timestamps);
        let listener = net.b.listen(80, 4).unwrap();
        let config = net.a.config().tcp.clone();
        // Without reuse the SYN would get a challenge ACK, the client would reset it and
        // retry after its 1 s SYN timeout: the second connection must be faster than that.
        let serve_one = |net: &mut Network, within: Duration| {
            let now = net.now();
            let a = net
                .a
                .connect_from(now, 7000, SocketAddrV4::new(ADDR_B, 80), config.clone())
                .unwrap();
            let limit = net.now() + within;
            let mut b = None;
            let accepted = net.run_until(limit, |net| {
                b = b.or_else(|| net.b.accept(listener).ok());
                b.is_some()
            });
            assert!(
                accepted,
                "timestamps {timestamps}: not accepted within {within:?}"
            );
            let b = b.unwrap();
            net.b.close(b).unwrap();
            net.run_for(Duration::from_millis(50));
            let mut buf = [0u8; 8];
            assert_eq!(net.a.recv(a, &mut buf), Ok(0), "EOF from the server's FIN");
            net.a.close(a).unwrap();
            net.run_for(Duration::from_millis(200));
        };
        serve_one(&mut net, Duration::from_secs(2));
        assert_eq!(
            net.b.socket_count(),
            2,
            "listener and the TIME-WAIT connection"
        );
        serve_one(&mut net, Duration::from_millis(500));
        assert_eq!(net.b.stats().time_wait_reused, 1, "timestamps {timestamps}");
    }
}

#[test]
fn an_active_open_takes_over_a_time_wait_port_after_one_second_with_timestamps() {
    // One ephemeral port: the client closes first and holds TIME-WAIT (60 s). A new connection
    // to the same server finds no free port at once; a second later it takes the TIME-WAIT
    // port over (Linux's tcp_tw_reuse), but only if the old connection used timestamps.
    for timestamps in [true, false] {
        let mut net = Network::new(11, link(5), link(5), |c| {
            c.tcp.timestamps = timestamps;
            c.ephemeral_ports = 7000..=7000;
        });
        let listener = net.b.listen(80, 4).unwrap();
        let server = SocketAddrV4::new(ADDR_B, 80);
        let (a, b) = connect_and_accept(&mut net, listener);
        net.a.close(a).unwrap();
        net.run_for(Duration::from_millis(50));
        let mut buf = [0u8; 8];
        assert_eq!(net.b.recv(b, &mut buf), Ok(0), "EOF from the client's FIN");
        net.b.close(b).unwrap();
        net.run_for(Duration::from_millis(50));
        assert_eq!(net.a.socket_count(), 1, "the client's TIME-WAIT connection");

        let now = net.now();
        assert_eq!(
            net.a.connect(now, server),
            Err(SocketError::NoPortsAvailable),
            "timestamps {timestamps}: TIME-WAIT taken over at once"
        );
        net.run_for(Duration::from_millis(1000));
        let now = net.now();
        let again = net.a.connect(now, server);
        if !timestamps {
            assert_eq!(again, Err(SocketError::NoPortsAvailable));
            continue;
        }
        let again = again.expect("the TIME-WAIT port after a second");
        let mut accepted = None;
        let limit = net.now() + Duration::from_millis(500);
        assert!(net.run_until(limit, |net| {
            accepted = accepted.or_else(|| net.b.accept(listener).ok());
            accepted.is_some()
        }));
        assert_eq!(net.a.state(again), Ok(TcpState::Established));
        assert_eq!(net.a.addresses(again).unwrap().0.port(), 7000);
        assert_eq!(net.a.socket_count(), 1, "the old incarnation is gone");
        assert_eq!(net.a.stats().time_wait_reused_by_connect, 1);
    }
}
