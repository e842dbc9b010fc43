//! The relay over the **emulated** queue pair (a socketpair with RC semantics and injected
//! faults, see `stackroute_rdma_relay::emulated`): two relays, each with its application's
//! socket end and the TCP connection an upgrade would have been negotiated on. These drive the
//! data path's code where no RDMA device exists; they do not show RDMA working (the device
//! trial of `stackroute-rdma-verbs` does, on RDMA hosts).

use std::io::{ErrorKind, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use stackroute_rdma_relay::emulated::{self, Faults};
use stackroute_rdma_relay::testing::{
    end_within, exchange_both_ways, pattern, read_to_end, send_all, spawn,
};
use stackroute_rdma_relay::{CONTROL_GRACE, Config, End};

const CONFIG: Config = Config {
    window: 8,
    buffer: 8 * 1024,
    send_queue: 64 * 1024,
};

fn control_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    (client, server)
}

struct Connection {
    a: UnixStream,
    b: UnixStream,
    relay_a: JoinHandle<End>,
    relay_b: JoinHandle<End>,
}

fn connect(faults: (Faults, Faults)) -> Connection {
    let (qp_a, qp_b) = emulated::pair(CONFIG, faults).unwrap();
    let (control_a, control_b) = control_pair();
    let (a, relay_a) = spawn(qp_a, CONFIG, Some(control_a));
    let (b, relay_b) = spawn(qp_b, CONFIG, Some(control_b));
    Connection {
        a,
        b,
        relay_a,
        relay_b,
    }
}

#[test]
fn a_stream_crosses_both_ways_intact_and_ends_closed() {
    let Connection {
        a,
        b,
        relay_a,
        relay_b,
    } = connect(Default::default());
    let (to_b, to_a) = (pattern(4 << 20, 1), pattern(3 << 20, 2));
    exchange_both_ways(a, b, to_b, to_a);
    assert_eq!(end_within(relay_a, Duration::from_secs(5)), End::Closed);
    assert_eq!(end_within(relay_b, Duration::from_secs(5)), End::Closed);
}

#[test]
fn a_half_close_lets_the_other_direction_finish() {
    let Connection {
        mut a,
        mut b,
        relay_a,
        relay_b,
    } = connect(Default::default());
    a.write_all(b"request").unwrap();
    a.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_to_end(&mut b), b"request");
    let reply = pattern(300 * 1024, 3);
    b.write_all(&reply).unwrap();
    b.shutdown(Shutdown::Write).unwrap();
    assert!(read_to_end(&mut a) == reply);
    assert_eq!(end_within(relay_a, Duration::from_secs(5)), End::Closed);
    assert_eq!(end_within(relay_b, Duration::from_secs(5)), End::Closed);
}

#[test]
fn a_reader_that_stops_stops_the_writer_and_loses_nothing() {
    let Connection {
        a,
        mut b,
        relay_a,
        relay_b,
    } = connect(Default::default());
    a.set_nonblocking(true).unwrap();
    let mut sent = Vec::new();
    let mut chunk = 0u8;
    let mut quiet_since = Instant::now();
    // Write until nothing more is taken for 300 ms: the credits of an idle reader ran out.
    while quiet_since.elapsed() < Duration::from_millis(300) {
        let data = pattern(16 * 1024, chunk);
        match (&a).write(&data) {
            Ok(n) => {
                sent.extend_from_slice(&data[..n]);
                chunk = chunk.wrapping_add(1);
                quiet_since = Instant::now();
            }
            Err(error) if error.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(error) => panic!("{error}"),
        }
    }
    // What an idle reader lets a writer queue: both socketpairs' buffers, the stream's send
    // queue, a window of received buffers and the relays' chunks — bounded, far below this.
    assert!(
        sent.len() < 8 << 20,
        "the writer queued {} bytes with nobody reading",
        sent.len()
    );
    a.set_nonblocking(false).unwrap();
    a.shutdown(Shutdown::Write).unwrap();
    let got = read_to_end(&mut b);
    assert!(got == sent, "{} bytes arrived of {}", got.len(), sent.len());
    drop(b);
    assert_eq!((read_to_end(&mut { a }).len()), 0, "nothing was sent back");
    assert_eq!(end_within(relay_a, Duration::from_secs(5)), End::Closed);
    assert_eq!(end_within(relay_b, Duration::from_secs(5)), End::Closed);
}

#[test]
fn an_error_completion_fails_both_ends() {
    let faults = Faults {
        fail_after_sends: Some(5),
    };
    let Connection {
        a,
        b,
        relay_a,
        relay_b,
    } = connect((faults, Faults::default()));
    let _writer = send_all(a.try_clone().unwrap(), pattern(1 << 20, 4));
    match end_within(relay_a, Duration::from_secs(5)) {
        End::Failed(why) => assert!(
            why.contains("IBV_WC_RETRY_EXC_ERR") && why.contains("after 5 SENDs"),
            "{why}"
        ),
        End::Closed => panic!("a failed SEND ended cleanly"),
    }
    // The failed side's relay is gone with its queue pair and TCP socket: the peer notices
    // through the one or the other (its credit messages find no queue pair).
    match end_within(relay_b, Duration::from_secs(5)) {
        End::Failed(why) => assert!(
            why.contains("TCP socket") || why.contains("peer's queue pair is gone"),
            "{why}"
        ),
        End::Closed => panic!("the peer of a failed connection ended cleanly"),
    }
    drop((a, b));
}

#[test]
fn a_dead_peer_is_noticed_by_an_idle_reader_through_the_control_connection() {
    let (qp_a, qp_b) = emulated::pair(CONFIG, Default::default()).unwrap();
    let (control_a, control_b) = control_pair();
    let (mut a, relay_a) = spawn(qp_a, CONFIG, Some(control_a));
    a.write_all(b"are you there?").unwrap();
    std::thread::sleep(Duration::from_millis(50));
    // The peer process dies: its queue pair and its TCP socket go with it, without a FIN on
    // the stream. An RC receiver alone would never learn it.
    let died = Instant::now();
    drop((qp_b, control_b));
    match end_within(relay_a, Duration::from_secs(5)) {
        End::Failed(why) => assert!(why.contains("TCP socket"), "{why}"),
        End::Closed => panic!("a dead peer ended cleanly"),
    }
    assert!(
        died.elapsed() < CONTROL_GRACE + Duration::from_secs(1),
        "noticed after {:?}",
        died.elapsed()
    );
}

#[test]
fn without_the_control_connection_a_dead_peer_is_noticed_by_sending() {
    let (qp_a, qp_b) = emulated::pair(CONFIG, Default::default()).unwrap();
    let (mut a, relay_a) = spawn(qp_a, CONFIG, None);
    drop(qp_b);
    a.write_all(&pattern(64 * 1024, 5)).unwrap();
    match end_within(relay_a, Duration::from_secs(5)) {
        End::Failed(why) => assert!(why.contains("peer's queue pair is gone"), "{why}"),
        End::Closed => panic!("sending to a dead peer ended cleanly"),
    }
}

#[test]
fn an_application_that_closes_with_unread_bytes_fails_the_connection() {
    let Connection {
        a,
        b,
        relay_a,
        relay_b,
    } = connect(Default::default());
    let _writer = send_all(a.try_clone().unwrap(), pattern(2 << 20, 6));
    std::thread::sleep(Duration::from_millis(50));
    drop(b);
    match end_within(relay_b, Duration::from_secs(5)) {
        End::Failed(why) => assert!(why.contains("not read"), "{why}"),
        End::Closed => panic!("bytes were dropped and the relay ended cleanly"),
    }
    match end_within(relay_a, Duration::from_secs(5)) {
        End::Failed(why) => assert!(
            why.contains("TCP socket") || why.contains("peer's queue pair is gone"),
            "{why}"
        ),
        End::Closed => panic!("the writer's side ended cleanly"),
    }
    drop(a);
}
