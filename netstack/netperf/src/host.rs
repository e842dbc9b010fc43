//! The host loop: owns the clock and the engine, drives the sans-IO stack, and runs the
//! client or server application on the socket API.

use std::net::{Ipv4Addr, SocketAddr};
use std::ops::{Deref, DerefMut};
use std::time::{Duration, Instant as StdInstant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::json;
use sha2::{Digest, Sha256};
use stackroute_nethost::{BusyPoll, EngineKind};
use stackroute_netstack::congestion::CongestionControl;
use stackroute_netstack::sim::SimRng;
use stackroute_netstack::{
    Device, Ipv6Config, SocketError, SocketHandle, SocketOption, Stack, StackConfig,
};
use stackroute_pktio::AnyDevice;

pub(crate) struct HostConfig {
    /// Tried in order.
    pub(crate) engines: Vec<EngineKind>,
    pub(crate) interface: String,
    /// Unspecified: no IPv4.
    pub(crate) address: Ipv4Addr,
    pub(crate) prefix_len: u8,
    pub(crate) gateway: Option<Ipv4Addr>,
    pub(crate) ipv6: Option<Ipv6Config>,
    pub(crate) mac: Option<[u8; 6]>,
    pub(crate) congestion_control: CongestionControl,
    pub(crate) nodelay: bool,
    pub(crate) timeout: Duration,
    pub(crate) busy_poll: Duration,
    /// `sched_yield()` between empty busy polls instead of spinning.
    pub(crate) busy_poll_yield: bool,
    pub(crate) checksum: bool,
}

pub(crate) enum ClientWork {
    Send(u64),
    RequestResponse {
        round_trips: u64,
        size: usize,
    },
    /// `GET` this path over HTTP/1.0 and read the response until the server closes.
    HttpGet(String),
}

/// The payload sent by `--send`: one pseudo-random MiB, repeated, so both ends can checksum it
/// without the generator costing as much as the stack.
fn payload_block() -> Vec<u8> {
    let mut rng = SimRng::new(0x5eed);
    let mut block = vec![0u8; 1 << 20];
    for chunk in block.chunks_mut(8) {
        chunk.copy_from_slice(&rng.next_u64().to_le_bytes()[..chunk.len()]);
    }
    block
}

mod iperf3;
pub(crate) use iperf3::run_iperf3_server;

/// The library host loop plus what this tool adds: a deadline for the whole run and the
/// connection options of the command line.
struct Host {
    inner: stackroute_nethost::Host,
    /// The engines that could not open before the one in use, with why.
    fallbacks: Vec<serde_json::Value>,
    deadline: StdInstant,
    config_cc: CongestionControl,
    nodelay: bool,
}

impl Deref for Host {
    type Target = stackroute_nethost::Host;

    fn deref(&self) -> &Self::Target {
        &self.inner
    }
}

impl DerefMut for Host {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.inner
    }
}

impl Host {
    fn new(config: &HostConfig) -> Result<Self> {
        let opened = stackroute_nethost::open_first(&config.engines, &config.interface)?;
        let device = opened.device;
        let mut stack_config = StackConfig::new(
            config.mac.unwrap_or(opened.mac),
            config.address,
            config.prefix_len,
            stackroute_nethost::random_secret()?,
        );
        stack_config.gateway = config.gateway;
        stack_config.ipv6 = config.ipv6;
        // Every engine reports the MTU of its device (a DPDK port knows its own).
        stack_config.mtu = device.capabilities().mtu;
        stack_config.tcp.congestion_control = config.congestion_control;
        stack_config.tcp.nodelay = config.nodelay;
        let busy_poll = BusyPoll {
            window: config.busy_poll,
            yield_between: config.busy_poll_yield,
        };
        let fallbacks = opened
            .fallbacks
            .iter()
            .map(|(engine, error)| json!({ "engine": engine, "error": error.to_string() }))
            .collect();
        Ok(Self {
            inner: stackroute_nethost::Host::new(Stack::new(stack_config), device, busy_poll),
            fallbacks,
            deadline: StdInstant::now() + config.timeout,
            config_cc: config.congestion_control,
            nodelay: config.nodelay,
        })
    }

    fn check_deadline(&self) -> Result<()> {
        if StdInstant::now() >= self.deadline {
            bail!("timed out");
        }
        Ok(())
    }

    fn connect(&mut self, remote: SocketAddr) -> Result<SocketHandle> {
        let mut tcp = self.stack.config().tcp.clone();
        tcp.congestion_control = self.config_cc;
        tcp.nodelay = self.nodelay;
        let deadline = self.deadline;
        self.inner
            .connect(remote, tcp, deadline)
            .map_err(|e| anyhow!("connect to {remote}: {e}"))
    }
}

#[derive(Default)]
struct Totals {
    bytes_sent: u64,
    bytes_received: u64,
    retransmits: u64,
    rto_count: u64,
    tlp_count: u64,
    last_srtt_us: u64,
    connections: u64,
    /// Time spent in `connect` (SYN → established).
    handshake_seconds: f64,
}

/// The engine in use, the ones that failed before it, and for DPDK the port's report.
fn engine_report(host: &Host) -> serde_json::Value {
    let mut value = json!({
        "engine": host.device.name(),
        "engine_fallbacks": host.fallbacks,
    });
    if let AnyDevice::Dpdk(port) = &host.device {
        let status = port.status();
        value["dpdk"] = json!({
            "version": status.version,
            "port": status.port,
            "driver": status.driver,
            "memory": status.memory,
            "runtime_dir": status.runtime_dir,
            "eal_init_ms": status.eal_init_ms,
            "mbufs": status.mbufs,
            "mbufs_in_use": status.mbufs_in_use,
            "rx_checksum_offload": status.rx_checksum_offload,
            "tx_checksum_offload": status.tx_checksum_offload,
            "tx_checksum_offloaded": status.tx_checksum_offloaded,
            "tso": status.tso,
            "tx_segmented": status.tx_segmented,
            "rx_bad_checksum": status.rx_bad_checksum,
            "rx_chained": status.rx_chained,
            "port_stats": {
                "ipackets": status.counters.ipackets,
                "opackets": status.counters.opackets,
                "imissed": status.counters.imissed,
                "ierrors": status.counters.ierrors,
                "oerrors": status.counters.oerrors,
                "rx_nombuf": status.counters.rx_nombuf,
            },
        });
    }
    value
}

fn report(
    totals: &Totals,
    host: &Host,
    seconds: f64,
    extra: serde_json::Value,
    cc: &str,
) -> serde_json::Value {
    let interface = host.stack.stats();
    // Like iperf3, goodput counts from the established connection: a lost SYN costs the
    // initial RTO (1 s, RFC 6298) before any data moves, which says nothing about the transfer.
    let transfer_seconds = seconds - totals.handshake_seconds;
    let goodput = if transfer_seconds > 0.0 {
        (totals.bytes_sent.max(totals.bytes_received) as f64 * 8.0 / transfer_seconds) as u64
    } else {
        0
    };
    let mut value = json!({
        "bytes_sent": totals.bytes_sent,
        "bytes_received": totals.bytes_received,
        "seconds": seconds,
        "handshake_seconds": totals.handshake_seconds,
        "goodput_bps": goodput,
        "retransmits": totals.retransmits,
        "connections": totals.connections,
        "congestion_control": cc,
        "rto_count": totals.rto_count,
        "tlp_count": totals.tlp_count,
        "smoothed_rtt_us": totals.last_srtt_us,
        "rx_frames": interface.rx_frames,
        "rx_dropped": interface.rx_dropped,
        "tx_frames": interface.tx_frames,
        "tx_no_buffer": interface.tx_dropped,
    });
    for extra in [engine_report(host), extra] {
        if let (Some(map), serde_json::Value::Object(extra)) = (value.as_object_mut(), extra) {
            map.extend(extra);
        }
    }
    value
}

/// Client: `--send` or `--rr`, over `connections` sequential connections.
pub(crate) fn run_client(
    config: &HostConfig,
    remote: SocketAddr,
    work: ClientWork,
    connections: u64,
) -> Result<serde_json::Value> {
    let mut host = Host::new(config)?;
    let mut totals = Totals::default();
    let mut latencies_us: Vec<u64> = Vec::new();
    let mut sent_hash = Sha256::new();
    let mut received_hash = Sha256::new();
    let block = payload_block();
    let mut rx_buf = vec![0u8; 65536];
    let mut http_response = HttpResponse::default();
    let checksum = config.checksum;
    let started = StdInstant::now();
    for _ in 0..connections {
        let dialed = StdInstant::now();
        let handle = host.connect(remote)?;
        totals.handshake_seconds += dialed.elapsed().as_secs_f64();
        match work {
            ClientWork::Send(bytes) => {
                let mut remaining = bytes;
                let mut block_offset = 0usize;
                // STACKROUTE_NETPERF_TRACE=1 traces once a second; a larger number is the
                // interval in milliseconds.
                let trace_every = std::env::var("STACKROUTE_NETPERF_TRACE").ok().map(|v| {
                    match v.parse::<u64>() {
                        Ok(ms) if ms > 1 => Duration::from_millis(ms),
                        _ => Duration::from_secs(1),
                    }
                });
                let trace = trace_every.is_some();
                let trace_every = trace_every.unwrap_or_default();
                let mut next_trace = StdInstant::now();
                while remaining > 0 {
                    host.check_deadline()?;
                    if trace && StdInstant::now() >= next_trace {
                        next_trace += trace_every;
                        eprintln!(
                            "at {:.3} s: {:?}",
                            started.elapsed().as_secs_f64(),
                            host.stack.connection_stats(handle)
                        );
                    }
                    if block_offset >= block.len() {
                        block_offset = 0;
                    }
                    let want = (block.len() - block_offset).min(remaining as usize);
                    let chunk = &block[block_offset..block_offset + want];
                    match host.stack.send(handle, chunk) {
                        Ok(n) => {
                            if checksum {
                                sent_hash.update(&chunk[..n]);
                            }
                            block_offset += n;
                            remaining -= n as u64;
                            totals.bytes_sent += n as u64;
                        }
                        Err(SocketError::WouldBlock) => host.turn()?,
                        Err(e) => bail!("send: {e}"),
                    }
                    drain(
                        &mut host,
                        handle,
                        &mut totals,
                        &mut received_hash,
                        &mut rx_buf,
                    )?;
                }
                host.stack.shutdown(handle).map_err(|e| anyhow!("{e}"))?;
                while !drain(
                    &mut host,
                    handle,
                    &mut totals,
                    &mut received_hash,
                    &mut rx_buf,
                )? {
                    host.check_deadline()?;
                    if trace && StdInstant::now() >= next_trace {
                        // The last send buffer's worth drains here: keep tracing until the end.
                        next_trace = StdInstant::now() + Duration::from_millis(100);
                        if let Ok(stats) = host.stack.connection_stats(handle) {
                            eprintln!(
                                "closing at {:.3} s: {stats:?}",
                                started.elapsed().as_secs_f64()
                            );
                        }
                    }
                    host.turn()?;
                }
            }
            ClientWork::HttpGet(ref path) => {
                let request = format!(
                    "GET {path} HTTP/1.0\r\nHost: {remote}\r\nUser-Agent: stackroute-netperf\r\n\r\n"
                );
                let mut written = 0;
                while written < request.len() {
                    host.check_deadline()?;
                    match host.stack.send(handle, &request.as_bytes()[written..]) {
                        Ok(n) => written += n,
                        Err(SocketError::WouldBlock) => host.turn()?,
                        Err(e) => bail!("send: {e}"),
                    }
                }
                totals.bytes_sent += request.len() as u64;
                loop {
                    host.check_deadline()?;
                    match host.stack.recv(handle, &mut rx_buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            totals.bytes_received += n as u64;
                            http_response.push(&rx_buf[..n]);
                        }
                        Err(SocketError::WouldBlock) => host.turn()?,
                        Err(e) => bail!("recv: {e}"),
                    }
                }
                host.stack.shutdown(handle).map_err(|e| anyhow!("{e}"))?;
            }
            ClientWork::RequestResponse { round_trips, size } => {
                let request = vec![0x52u8; size];
                let mut buf = vec![0u8; size.max(4096)];
                for _ in 0..round_trips {
                    let t0 = StdInstant::now();
                    let mut written = 0;
                    while written < size {
                        host.check_deadline()?;
                        match host.stack.send(handle, &request[written..]) {
                            Ok(n) => written += n,
                            Err(SocketError::WouldBlock) => host.turn()?,
                            Err(e) => bail!("send: {e}"),
                        }
                    }
                    totals.bytes_sent += size as u64;
                    // Push the request out now rather than on the next timer.
                    let now = host.now();
                    host.poll(now);
                    let mut got = 0;
                    while got < size {
                        host.check_deadline()?;
                        match host.stack.recv(handle, &mut buf[..size - got]) {
                            Ok(0) => bail!("server closed mid-response"),
                            Ok(n) => got += n,
                            Err(SocketError::WouldBlock) => host.turn()?,
                            Err(e) => bail!("recv: {e}"),
                        }
                    }
                    totals.bytes_received += size as u64;
                    latencies_us.push(t0.elapsed().as_micros() as u64);
                }
                host.stack.shutdown(handle).map_err(|e| anyhow!("{e}"))?;
                let mut sink = Sha256::new();
                while !drain(&mut host, handle, &mut totals, &mut sink, &mut rx_buf)? {
                    host.check_deadline()?;
                    host.turn()?;
                }
            }
        }
        if let Ok(stats) = host.stack.connection_stats(handle) {
            totals.retransmits += stats.retransmits;
            totals.rto_count += stats.rto_count;
            totals.tlp_count += stats.tlp_count;
            totals.last_srtt_us = stats.smoothed_rtt_us;
        }
        totals.connections += 1;
        host.stack.close(handle).map_err(|e| anyhow!("{e}"))?;
    }
    let seconds = started.elapsed().as_secs_f64();
    host.linger(Duration::from_millis(200))?;
    latencies_us.sort_unstable();
    let pct = |p: f64| -> u64 {
        if latencies_us.is_empty() {
            return 0;
        }
        let idx = ((latencies_us.len() - 1) as f64 * p).round() as usize;
        latencies_us[idx]
    };
    let extra = match work {
        ClientWork::Send(_) if checksum => json!({
            "sent_sha256": hex(&sent_hash.finalize()),
            "received_sha256": hex(&received_hash.finalize()),
        }),
        ClientWork::Send(_) => json!({}),
        ClientWork::HttpGet(_) => http_response.report()?,
        ClientWork::RequestResponse { .. } => json!({
            "round_trips": latencies_us.len(),
            "rtt_us_mean": if latencies_us.is_empty() { 0 } else {
                latencies_us.iter().sum::<u64>() / latencies_us.len() as u64
            },
            "rtt_us_p50": pct(0.5),
            "rtt_us_p99": pct(0.99),
        }),
    };
    Ok(report(
        &totals,
        &host,
        seconds,
        extra,
        config.congestion_control.name(),
    ))
}

/// An HTTP response read as it arrives: the header kept until its blank line, the body hashed.
#[derive(Default)]
struct HttpResponse {
    header: Vec<u8>,
    header_done: bool,
    body_bytes: u64,
    body_hash: Sha256,
}

impl HttpResponse {
    fn push(&mut self, mut bytes: &[u8]) {
        if !self.header_done {
            let before = self.header.len();
            self.header.extend_from_slice(bytes);
            let Some(end) = header_end(&self.header) else {
                return;
            };
            self.header_done = true;
            self.header.truncate(end);
            bytes = &bytes[end - before..];
        }
        self.body_bytes += bytes.len() as u64;
        self.body_hash.update(bytes);
    }

    /// `http_status`, `body_bytes` and `body_sha256`; an error if no status line arrived.
    fn report(&self) -> Result<serde_json::Value> {
        let header = String::from_utf8_lossy(&self.header);
        let status: u16 = header
            .split_whitespace()
            .nth(1)
            .filter(|_| self.header_done && header.starts_with("HTTP/"))
            .and_then(|code| code.parse().ok())
            .with_context(|| format!("no HTTP status line in the response: {header:.80}"))?;
        Ok(json!({
            "http_status": status,
            "body_bytes": self.body_bytes,
            "body_sha256": hex(&self.body_hash.clone().finalize()),
        }))
    }
}

/// Reads everything available; returns true at EOF.
fn drain(
    host: &mut Host,
    handle: SocketHandle,
    totals: &mut Totals,
    hash: &mut Sha256,
    buf: &mut [u8],
) -> Result<bool> {
    loop {
        match host.stack.recv(handle, buf) {
            Ok(0) => return Ok(true),
            Ok(n) => {
                hash.update(&buf[..n]);
                totals.bytes_received += n as u64;
            }
            Err(SocketError::WouldBlock) => return Ok(false),
            Err(e) => bail!("recv: {e}"),
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What the server does with a connection.
#[derive(Clone, Copy, Debug)]
pub(crate) enum ServerWork {
    /// Count (and checksum) what arrives.
    Count,
    /// Send back what arrives.
    Echo,
    /// Read an HTTP/1.0 request, answer `200 OK` with this many bytes of the payload stream,
    /// then close first: enough HTTP for curl or any other unmodified client.
    Http { body_bytes: u64 },
}

struct ServerConn {
    handle: SocketHandle,
    /// Bytes to send before anything else: echoed data or the HTTP header.
    pending: Vec<u8>,
    eof: bool,
    hash: Sha256,
    http: HttpReply,
}

/// Progress of an HTTP reply.
#[derive(Default)]
struct HttpReply {
    /// The request so far, until its blank line.
    request: Vec<u8>,
    /// Body bytes still to send, once the request is complete.
    body_left: Option<u64>,
    body_offset: usize,
    body_hash: Sha256,
    /// Our FIN is queued.
    shut_down: bool,
}

/// End of an HTTP request's header block.
fn header_end(bytes: &[u8]) -> Option<usize> {
    bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4)
}

/// Server: accept, count, echo or answer HTTP; close when the peer closes.
pub(crate) fn run_server(
    config: &HostConfig,
    port: u16,
    work: ServerWork,
    connections: u64,
) -> Result<serde_json::Value> {
    let block = payload_block();
    let mut body_hash = String::new();
    let mut host = Host::new(config)?;
    let listener = host
        .stack
        .listen(port, 128)
        .map_err(|e| anyhow!("listen: {e}"))?;
    let mut totals = Totals::default();
    let mut open: Vec<ServerConn> = Vec::new();
    let mut first_accept: Option<StdInstant> = None;
    let mut last_close = StdInstant::now();
    let mut last_hash = String::new();
    let mut buf = vec![0u8; 65536];
    loop {
        if StdInstant::now() >= host.deadline {
            if connections == 0 {
                break;
            }
            bail!(
                "timed out with {} of {connections} connections served",
                totals.connections
            );
        }
        while let Ok(handle) = host.stack.accept(listener) {
            first_accept.get_or_insert_with(StdInstant::now);
            if host.nodelay {
                let _ = host.stack.set_option(handle, SocketOption::NoDelay(true));
            }
            open.push(ServerConn {
                handle,
                pending: Vec::new(),
                eof: false,
                hash: Sha256::new(),
                http: HttpReply::default(),
            });
        }
        let mut finished = Vec::new();
        for (i, conn) in open.iter_mut().enumerate() {
            while !conn.eof {
                match host.stack.recv(conn.handle, &mut buf) {
                    Ok(0) => conn.eof = true,
                    Ok(n) => {
                        totals.bytes_received += n as u64;
                        if config.checksum {
                            conn.hash.update(&buf[..n]);
                        }
                        match work {
                            ServerWork::Count => {}
                            ServerWork::Echo => conn.pending.extend_from_slice(&buf[..n]),
                            ServerWork::Http { body_bytes } => {
                                let http = &mut conn.http;
                                if http.body_left.is_none() {
                                    http.request.extend_from_slice(&buf[..n]);
                                    if header_end(&http.request).is_some() {
                                        http.body_left = Some(body_bytes);
                                        conn.pending = format!(
                                            "HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {body_bytes}\r\nConnection: close\r\n\r\n"
                                        )
                                        .into_bytes();
                                    } else if http.request.len() > 64 << 10 {
                                        eprintln!("HTTP request header above 64 KiB: closing");
                                        http.body_left = Some(0);
                                    }
                                }
                            }
                        }
                        if conn.pending.len() > 4 << 20 {
                            break;
                        }
                    }
                    Err(SocketError::WouldBlock) => break,
                    Err(e) => {
                        eprintln!("connection error: {e}");
                        conn.eof = true;
                        conn.pending.clear();
                        conn.http.body_left = None;
                    }
                }
            }
            while !conn.pending.is_empty() {
                match host.stack.send(conn.handle, &conn.pending) {
                    Ok(n) => {
                        conn.pending.drain(..n);
                        totals.bytes_sent += n as u64;
                    }
                    Err(_) => break,
                }
            }
            let http = &mut conn.http;
            while conn.pending.is_empty() && http.body_left.is_some_and(|left| left > 0) {
                let left = http.body_left.unwrap_or(0);
                if http.body_offset >= block.len() {
                    http.body_offset = 0;
                }
                let want = (block.len() - http.body_offset).min(left as usize);
                let chunk = &block[http.body_offset..http.body_offset + want];
                match host.stack.send(conn.handle, chunk) {
                    Ok(n) => {
                        http.body_hash.update(&chunk[..n]);
                        http.body_offset += n;
                        http.body_left = Some(left - n as u64);
                        totals.bytes_sent += n as u64;
                    }
                    Err(_) => break,
                }
            }
            if conn.pending.is_empty() && http.body_left == Some(0) && !http.shut_down {
                // HTTP/1.0 without keep-alive: the server closes first; the client closes
                // once it has read to our FIN, and that EOF ends the connection here.
                host.stack
                    .shutdown(conn.handle)
                    .map_err(|e| anyhow!("shutdown: {e}"))?;
                http.shut_down = true;
                body_hash = hex(&std::mem::take(&mut http.body_hash).finalize());
            }
            if conn.eof && conn.pending.is_empty() {
                finished.push(i);
            }
        }
        for i in finished.into_iter().rev() {
            let conn = open.remove(i);
            totals.retransmits += host
                .stack
                .connection_stats(conn.handle)
                .map(|s| s.retransmits)
                .unwrap_or(0);
            let _ = host.stack.close(conn.handle);
            totals.connections += 1;
            last_close = StdInstant::now();
            last_hash = hex(&conn.hash.finalize());
        }
        if connections > 0 && totals.connections >= connections {
            break;
        }
        host.turn()?;
    }
    host.linger(Duration::from_millis(300))?;
    let seconds = first_accept.map_or(0.0, |t| last_close.duration_since(t).as_secs_f64());
    Ok(report(
        &totals,
        &host,
        seconds,
        match work {
            ServerWork::Http { .. } => json!({ "body_sha256": body_hash }),
            _ => json!({ "received_sha256": last_hash }),
        },
        config.congestion_control.name(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_response_splits_header_and_body_across_reads() {
        let response = b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello";
        // Every split point, including inside the blank line.
        for split in 0..response.len() {
            let mut parsed = HttpResponse::default();
            parsed.push(&response[..split]);
            parsed.push(&response[split..]);
            let report = parsed.report().expect("status line");
            assert_eq!(report["http_status"], 200);
            assert_eq!(report["body_bytes"], 5);
            assert_eq!(
                report["body_sha256"],
                hex(&Sha256::digest(b"hello")),
                "split at {split}"
            );
        }
        let mut garbage = HttpResponse::default();
        garbage.push(b"SSH-2.0-OpenSSH\r\n\r\n");
        assert!(garbage.report().is_err());
    }
}
