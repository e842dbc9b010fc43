//! Just enough of iperf3's server side for an unmodified `iperf3 -c` (TCP, client sending) to
//! run a test against the stack. Written here because no crate implements the protocol; the
//! messages follow iperf3's documented control flow (`iperf_api.h` states):
//!
//! control connection: cookie (37 bytes) → PARAM_EXCHANGE → length-prefixed JSON parameters →
//! CREATE_STREAMS → one data connection per stream, each opening with the cookie →
//! TEST_START, TEST_RUNNING → data until the client sends TEST_END → EXCHANGE_RESULTS →
//! client's results JSON, ours → DISPLAY_RESULTS → the client's IPERF_DONE.

use std::time::Instant as StdInstant;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::json;
use stackroute_netstack::{SocketError, SocketHandle};

use super::{Host, HostConfig, Totals, report};

const COOKIE_SIZE: usize = 37;
const TEST_START: u8 = 1;
const TEST_RUNNING: u8 = 2;
const TEST_END: u8 = 4;
const PARAM_EXCHANGE: u8 = 9;
const CREATE_STREAMS: u8 = 10;
const EXCHANGE_RESULTS: u8 = 13;
const DISPLAY_RESULTS: u8 = 14;
const IPERF_DONE: u8 = 16;
/// iperf3's own limit on a JSON message.
const MAX_JSON: usize = 8 << 20;

/// One data connection and what it delivered.
struct Stream {
    handle: SocketHandle,
    bytes: u64,
    eof: bool,
}

/// Serves one iperf3 test on `port`, then reports like the other modes (plus `iperf3_streams`).
pub(crate) fn run_iperf3_server(config: &HostConfig, port: u16) -> Result<serde_json::Value> {
    let mut host = Host::new(config)?;
    let listener = host
        .stack
        .listen(port, 16)
        .map_err(|e| anyhow!("listen: {e}"))?;
    let control = accept(&mut host, listener)?;
    let started = StdInstant::now();
    let cookie = read_exact(&mut host, control, COOKIE_SIZE)?;
    write_all(&mut host, control, &[PARAM_EXCHANGE])?;
    let params = read_json(&mut host, control).context("reading the test parameters")?;
    if params.get("udp").is_some() || params.get("sctp").is_some() {
        bail!("only TCP tests are served: {params}");
    }
    if params.get("reverse").is_some() || params.get("bidirectional").is_some() {
        bail!("only tests where the client sends are served (no -R, no --bidir)");
    }
    let parallel = params
        .get("parallel")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(1)
        .clamp(1, 128) as usize;
    write_all(&mut host, control, &[CREATE_STREAMS])?;
    let mut streams = Vec::with_capacity(parallel);
    while streams.len() < parallel {
        let handle = accept(&mut host, listener)?;
        if read_exact(&mut host, handle, COOKIE_SIZE)? != cookie {
            bail!("a data connection presented another test's cookie");
        }
        streams.push(Stream {
            handle,
            bytes: 0,
            eof: false,
        });
    }
    write_all(&mut host, control, &[TEST_START])?;
    write_all(&mut host, control, &[TEST_RUNNING])?;
    let test_started = StdInstant::now();
    // Count data until the client says the test is over.
    let mut buf = vec![0u8; 65536];
    loop {
        drain_streams(&mut host, &mut streams, &mut buf)?;
        match host.stack.recv(control, &mut buf[..1]) {
            Ok(1) if buf[0] == TEST_END => break,
            Ok(1) => bail!("unexpected iperf3 state {} during the test", buf[0] as i8),
            Ok(_) => bail!("the client closed the control connection during the test"),
            Err(SocketError::WouldBlock) => host.turn()?,
            Err(e) => bail!("control connection: {e}"),
        }
    }
    let test_seconds = test_started.elapsed().as_secs_f64();
    write_all(&mut host, control, &[EXCHANGE_RESULTS])?;
    let client_results = read_json(&mut host, control).context("reading the client's results")?;
    // Our streams answer to the client's stream ids, in the order the client opened them.
    let ids: Vec<i64> = client_results
        .get("streams")
        .and_then(serde_json::Value::as_array)
        .map(|list| list.iter().filter_map(|s| s.get("id")?.as_i64()).collect())
        .unwrap_or_default();
    if ids.len() != streams.len() {
        bail!(
            "the client reported {} streams, {} connected: {client_results}",
            ids.len(),
            streams.len()
        );
    }
    let results = json!({
        "cpu_util_total": 0.0,
        "cpu_util_user": 0.0,
        "cpu_util_system": 0.0,
        "sender_has_retransmits": 0,
        "streams": ids.iter().zip(&streams).map(|(id, stream)| json!({
            "id": id,
            "bytes": stream.bytes,
            "retransmits": -1,
            "jitter": 0.0,
            "errors": 0,
            "packets": 0,
            "start_time": 0.0,
            "end_time": test_seconds,
        })).collect::<Vec<_>>(),
    });
    write_json(&mut host, control, &results)?;
    write_all(&mut host, control, &[DISPLAY_RESULTS])?;
    let done = read_exact(&mut host, control, 1)?;
    if done[0] != IPERF_DONE {
        bail!("expected IPERF_DONE, got state {}", done[0] as i8);
    }
    // Whatever was still in flight at TEST_END arrives before the client's FIN: drain to EOF
    // so the report counts every byte iperf3 wrote.
    while streams.iter().any(|s| !s.eof) {
        host.check_deadline()?;
        drain_streams(&mut host, &mut streams, &mut buf)?;
        host.turn()?;
    }
    let mut totals = Totals {
        bytes_received: streams.iter().map(|s| s.bytes).sum(),
        connections: 1 + streams.len() as u64,
        ..Totals::default()
    };
    for handle in streams.iter().map(|s| s.handle).chain([control]) {
        totals.retransmits += host
            .stack
            .connection_stats(handle)
            .map_or(0, |s| s.retransmits);
        let _ = host.stack.close(handle);
    }
    host.linger(std::time::Duration::from_millis(300))?;
    Ok(report(
        &totals,
        &host,
        started.elapsed().as_secs_f64(),
        json!({
            "iperf3_streams": streams.len(),
            "iperf3_bytes_at_test_end": results["streams"]
                .as_array()
                .map_or(0, |s| s.iter().filter_map(|s| s["bytes"].as_u64()).sum::<u64>()),
        }),
        config.congestion_control.name(),
    ))
}

fn accept(host: &mut Host, listener: SocketHandle) -> Result<SocketHandle> {
    loop {
        host.check_deadline()?;
        match host.stack.accept(listener) {
            Ok(handle) => return Ok(handle),
            Err(SocketError::WouldBlock) => host.turn()?,
            Err(e) => bail!("accept: {e}"),
        }
    }
}

fn drain_streams(host: &mut Host, streams: &mut [Stream], buf: &mut [u8]) -> Result<()> {
    for stream in streams.iter_mut().filter(|s| !s.eof) {
        loop {
            match host.stack.recv(stream.handle, buf) {
                Ok(0) => {
                    stream.eof = true;
                    break;
                }
                Ok(n) => stream.bytes += n as u64,
                Err(SocketError::WouldBlock) => break,
                Err(e) => bail!("data connection: {e}"),
            }
        }
    }
    Ok(())
}

fn read_exact(host: &mut Host, handle: SocketHandle, len: usize) -> Result<Vec<u8>> {
    let mut out = vec![0u8; len];
    let mut got = 0;
    while got < len {
        host.check_deadline()?;
        match host.stack.recv(handle, &mut out[got..]) {
            Ok(0) => bail!("connection closed after {got} of {len} bytes"),
            Ok(n) => got += n,
            Err(SocketError::WouldBlock) => host.turn()?,
            Err(e) => bail!("recv: {e}"),
        }
    }
    Ok(out)
}

fn write_all(host: &mut Host, handle: SocketHandle, bytes: &[u8]) -> Result<()> {
    let mut sent = 0;
    while sent < bytes.len() {
        host.check_deadline()?;
        match host.stack.send(handle, &bytes[sent..]) {
            Ok(n) => sent += n,
            Err(SocketError::WouldBlock) => host.turn()?,
            Err(e) => bail!("send: {e}"),
        }
    }
    // Push it out now: the client waits for it before sending anything else.
    let now = host.now();
    host.poll(now);
    Ok(())
}

/// A JSON message: its length as a big-endian u32, then the text.
fn read_json(host: &mut Host, handle: SocketHandle) -> Result<serde_json::Value> {
    let len = read_exact(host, handle, 4)?;
    let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
    if len > MAX_JSON {
        bail!("JSON message of {len} bytes is above iperf3's limit");
    }
    let text = read_exact(host, handle, len)?;
    serde_json::from_slice(&text).context("malformed JSON from the iperf3 client")
}

fn write_json(host: &mut Host, handle: SocketHandle, value: &serde_json::Value) -> Result<()> {
    let text = value.to_string();
    let mut message = (text.len() as u32).to_be_bytes().to_vec();
    message.extend_from_slice(text.as_bytes());
    write_all(host, handle, &message)
}
