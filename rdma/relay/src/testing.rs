//! Helpers of the data path's tests (feature `testing`): the relay tests over emulated, loaded
//! and device queue pairs drive two relays the same way.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::{Config, End, QueuePair, Relay};

/// One side's relay of `qp` (watching `control` if given) on its own thread; the application's
/// end of its socketpair is returned.
pub fn spawn<Q: QueuePair + Send + 'static>(
    qp: Q,
    config: Config,
    control: Option<TcpStream>,
) -> (UnixStream, JoinHandle<End>) {
    let (app, relayed) = UnixStream::pair().expect("a socketpair");
    let mut relay = Relay::new(relayed, qp, config);
    if let Some(control) = control {
        relay = relay.with_control(control);
    }
    (app, std::thread::spawn(move || relay.run()))
}

/// `len` bytes of a pattern that differs for each `seed` and shows misordered blocks.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u64 * 31 + u64::from(seed)) as u8 ^ (i >> 13) as u8)
        .collect()
}

/// Writes `data` then shuts down writing, on a thread (which stops at an error: tests of
/// failures break the connection under it).
pub fn send_all(mut socket: UnixStream, data: Vec<u8>) -> JoinHandle<std::io::Result<()>> {
    std::thread::spawn(move || {
        socket.write_all(&data)?;
        socket.shutdown(Shutdown::Write)
    })
}

/// Everything `socket` delivers until its end.
pub fn read_to_end(socket: &mut UnixStream) -> Vec<u8> {
    let mut out = Vec::new();
    socket.read_to_end(&mut out).expect("reading to the end");
    out
}

/// How `relay` ended, failing the test if it runs longer than `limit`.
pub fn end_within(relay: JoinHandle<End>, limit: Duration) -> End {
    let start = Instant::now();
    while !relay.is_finished() {
        assert!(
            start.elapsed() < limit,
            "the relay did not end within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    relay.join().expect("the relay thread")
}

/// Sends `to_b` from `a` and `to_a` from `b` at once (each then shuts down writing), reads both
/// to their ends, and checks every byte arrived once and in order.
pub fn exchange_both_ways(a: UnixStream, b: UnixStream, to_b: Vec<u8>, to_a: Vec<u8>) {
    let writer_a = send_all(a.try_clone().expect("a clone"), to_b.clone());
    let writer_b = send_all(b.try_clone().expect("a clone"), to_a.clone());
    let (mut a, mut b) = (a, b);
    let reader_b = std::thread::spawn(move || read_to_end(&mut b));
    let got_a = read_to_end(&mut a);
    let got_b = reader_b.join().expect("the reader thread");
    assert!(
        got_b == to_b,
        "a → b: {} bytes of {}",
        got_b.len(),
        to_b.len()
    );
    assert!(
        got_a == to_a,
        "b → a: {} bytes of {}",
        got_a.len(),
        to_a.len()
    );
    writer_a.join().expect("writer a").expect("writing a");
    writer_b.join().expect("writer b").expect("writing b");
}
