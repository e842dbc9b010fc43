//! Goodput per congestion controller × random-loss rate on a simulated 20 Mbit/s, 40 ms RTT path.
//! The table is an `insta` snapshot, so any behaviour change shows up as a reviewable diff; the
//! assertions encode the targets that must hold regardless.

use std::net::SocketAddrV4;
use std::time::Duration;

use stackroute_netstack::SocketError;
use stackroute_netstack::congestion::CongestionControl;
use stackroute_netstack::sim::{ADDR_B, LinkConfig, Network};

const LINK_BPS: u64 = 20_000_000;
const DURATION: Duration = Duration::from_secs(8);
const LOSS_RATES: [f64; 4] = [0.0, 0.01, 0.05, 0.10];

/// Mbit/s of application data received in `DURATION` (after the handshake).
fn goodput(cc: CongestionControl, loss: f64, seed: u64) -> f64 {
    let data_path = LinkConfig {
        delay: Duration::from_millis(20),
        rate_bps: LINK_BPS,
        // 1.5 BDP of buffering at the bottleneck.
        queue_bytes: 150_000,
        loss,
        ..LinkConfig::default()
    };
    let ack_path = LinkConfig {
        loss: 0.0,
        ..data_path
    };
    let mut net = Network::new(seed, data_path, ack_path, |c| {
        c.tcp.congestion_control = cc;
    });
    let listener = net.b.listen(5001, 4).unwrap();
    let now = net.now();
    let client = net.a.connect(now, SocketAddrV4::new(ADDR_B, 5001)).unwrap();
    let chunk = vec![0x42u8; 256 * 1024];
    let mut server = None;
    let mut received = 0u64;
    let mut buf = vec![0u8; 256 * 1024];
    let mut start = None;
    let limit = net.now() + DURATION * 2;
    let finished = net.run_until(limit, |net| {
        loop {
            match net.a.send(client, &chunk) {
                Ok(_) => {}
                Err(SocketError::WouldBlock) => break,
                Err(e) => panic!("send: {e}"),
            }
        }
        if server.is_none() {
            server = net.b.accept(listener).ok();
            if server.is_some() {
                start = Some(net.now());
            }
        }
        if let Some(s) = server {
            while let Ok(n) = net.b.recv(s, &mut buf) {
                if n == 0 {
                    break;
                }
                received += n as u64;
            }
        }
        start.is_some_and(|t| net.now() >= t + DURATION)
    });
    assert!(finished, "{cc:?} at {loss}: handshake did not complete");
    received as f64 * 8.0 / DURATION.as_secs_f64() / 1e6
}

#[test]
fn goodput_table_per_controller_and_loss_rate() {
    let mut table = String::from("controller  loss   goodput_mbps  of_link×(1−loss)\n");
    let mut bbr = Vec::new();
    let mut others = Vec::new();
    for cc in [
        CongestionControl::Bbr,
        CongestionControl::Cubic,
        CongestionControl::Reno,
    ] {
        for (i, loss) in LOSS_RATES.into_iter().enumerate() {
            let mbps = goodput(cc, loss, 100 + i as u64);
            let ideal = LINK_BPS as f64 / 1e6 * (1.0 - loss);
            table.push_str(&format!(
                "{:<10}  {:>4.0}%  {:>12.1}  {:>15.0}%\n",
                cc.name(),
                loss * 100.0,
                mbps,
                mbps / ideal * 100.0
            ));
            if cc == CongestionControl::Bbr {
                bbr.push((loss, mbps, ideal));
            } else {
                others.push((cc, loss, mbps));
            }
        }
    }
    println!("{table}");
    // The targets: BBR keeps goodput near link × (1 − loss) up to 10% random loss...
    for (loss, mbps, ideal) in &bbr {
        assert!(
            mbps / ideal >= 0.75,
            "BBR at {loss} loss: {mbps:.1} Mbit/s is below 75% of {ideal:.1}"
        );
    }
    // ...and beats loss-based control by a wide margin at 5% loss.
    for (cc, loss, mbps) in &others {
        if *loss == 0.05 {
            assert!(
                bbr[2].1 >= 5.0 * mbps,
                "BBR vs {cc:?} at 5%: {} vs {mbps}",
                bbr[2].1
            );
        }
    }
    insta::assert_snapshot!(table);
}
