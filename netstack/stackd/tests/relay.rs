//! `stackroute-stackd` against kernel TCP servers in a second network namespace, driven the
//! way the shim drives it (a socket pair per connection, the application's end pre-filled, the
//! other end handed over with `SCM_RIGHTS`). Root only: without root (or a tool) every trial
//! shows as ignored with the reason, or fails under `STACKROUTE_REQUIRE_NETNS=1`.

mod support;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use rustix::event::PollFlags;
use stackroute_local_api::relay::{MAX_MESSAGE, RelayRequest, RelayResponse, RelayState};
use support::*;
use testkit::{Options, Trial};

fn main() -> ExitCode {
    let trial = |name: &str, body: fn()| Trial::gated(name, netns_gate, move |()| body());
    // One at a time: each trial has its own namespaces, but the throughput figures and the
    // descriptor counts are clearer on an otherwise idle 2-core machine.
    testkit::run_with(
        Options::parallel().sequential(true),
        vec![
            trial(
                "data_both_ways_10mb_sha256_match_and_no_kernel_socket",
                data_both_ways,
            ),
            trial(
                "own_packet_socket_and_discovered_addressing",
                own_packet_socket,
            ),
            trial(
                "connect_to_a_closed_port_hangs_up_with_econnrefused",
                closed_port,
            ),
            trial(
                "app_end_is_writable_only_after_the_handshake",
                writable_after_handshake,
            ),
            trial("peer_reset_mid_transfer_reports_econnreset", peer_reset),
            trial(
                "app_writes_20mb_and_closes_at_once_server_gets_all",
                write_then_close,
            ),
            trial(
                "app_closing_with_unread_data_resets_the_peer",
                close_with_unread_data,
            ),
            trial("peer_fin_gives_the_app_end_of_file", peer_fin),
            trial("reset_on_close_and_options", reset_on_close_and_options),
            trial("two_hundred_concurrent_connections_and_paging", concurrent),
            trial(
                "two_thousand_sequential_connections_leave_no_descriptors",
                sequential,
            ),
            trial(
                "malformed_control_packets_are_refused_and_it_keeps_serving",
                malformed,
            ),
            trial("sigterm_resets_connections_and_exits_zero", sigterm),
            trial("throughput_of_a_100mb_relay_against_kernel_tcp", throughput),
            Trial::gated(
                "dedicated_device_on_dpdk_relays_both_ways",
                dpdk_gate,
                |()| dedicated_device_on_dpdk(),
            ),
        ],
    )
}

const TIMEOUT: Duration = Duration::from_secs(60);

/// Makes the application's end blocking with timeouts (as most applications use it).
fn blocking(end: &UnixStream) {
    end.set_nonblocking(false).unwrap();
    end.set_read_timeout(Some(TIMEOUT)).unwrap();
    end.set_write_timeout(Some(TIMEOUT)).unwrap();
}

fn read_all(end: &mut UnixStream) -> Vec<u8> {
    let mut data = Vec::new();
    end.read_to_end(&mut data).expect("reading to end of file");
    data
}

/// Polls `Status` until the connection is no longer live; returns the final state and errno.
fn final_status(control: &Control, id: u64) -> (RelayState, Option<i32>) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match control.status(id) {
            RelayResponse::Status { state, error, .. }
                if !matches!(state, RelayState::Connecting | RelayState::Established) =>
            {
                return (state, error);
            }
            RelayResponse::Status { .. } => {}
            other => panic!("status of {id}: {other:?}"),
        }
        assert!(Instant::now() < deadline, "connection {id} never finished");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn assert_no_kernel_tcp(lab: &Lab) {
    let sockets = lab.client_kernel_sockets();
    assert!(
        sockets.is_empty(),
        "kernel TCP sockets in the client namespace: {sockets:?}"
    );
}

fn data_both_ways() {
    let lab = Lab::new();
    let sink = lab.start_server("sink", 5001, 0);
    let source = lab.start_server("source", 5002, 10_000_000);
    let instance = lab.start_instance(PacketSocket::Inherited, &[]);
    assert_eq!(
        instance.effective_capabilities(),
        "0000000000000000",
        "the instance runs without capabilities on the inherited socket"
    );
    let control = instance.control();

    // Upload: the application writes 10 MB, shuts down, reads the server's end of file.
    let app = control.open(lab.server(5001)).expect("connect");
    assert_eq!(
        app.local.ip().to_string(),
        CLIENT_IP,
        "the kernel's address, shared"
    );
    assert!((61000..=62999).contains(&app.local.port()), "{}", app.local);
    assert!(app.filler > 0);
    let data = payload(1, 10_000_000);
    let expected = format!("RESULT 10000000 {}", sha256_hex(&data));
    let mut end = app.end;
    blocking(&end);
    let writer = std::thread::spawn(move || {
        end.write_all(&data).expect("writing 10 MB");
        end.shutdown(Shutdown::Write).unwrap();
        read_all(&mut end).len()
    });
    let mut samples = 0;
    while !writer.is_finished() {
        assert_no_kernel_tcp(&lab);
        samples += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(writer.join().unwrap(), 0, "the sink sends nothing back");
    assert_eq!(sink.line("RESULT", TIMEOUT), expected);
    assert_eq!(final_status(&control, app.id), (RelayState::Closed, None));
    eprintln!("upload: `ss -tan` sampled {samples} times during the transfer, always empty");

    // Download: the server sends 10 MB and closes.
    let app = control.open(lab.server(5002)).expect("connect");
    let mut end = app.end;
    blocking(&end);
    let received = read_all(&mut end);
    assert_no_kernel_tcp(&lab);
    drop(end);
    let sent = source.line("SENT", TIMEOUT);
    assert_eq!(sent, format!("SENT 10000000 {}", sha256_hex(&received)));
    assert_eq!(final_status(&control, app.id), (RelayState::Closed, None));
    let RelayResponse::Status {
        info: Some(info), ..
    } = control.status(app.id)
    else {
        panic!("status without figures");
    };
    assert_eq!(info.bytes_received, 10_000_000);
    assert!(info.min_rtt_us > 0 && info.cwnd_bytes > 0, "{info:?}");
    assert_eq!(lab.client_kernel_resets(), 0, "the client kernel sent RSTs");
}

fn own_packet_socket() {
    let lab = Lab::new();
    let _echo = lab.start_server("echo", 5001, 0);
    let instance = lab.start_instance(PacketSocket::Own, &[]);
    let app = instance.open(lab.server(5001)).expect("connect");
    assert_eq!(app.local.ip().to_string(), CLIENT_IP);
    let mut end = app.end;
    blocking(&end);
    end.write_all(b"ping").unwrap();
    let mut reply = [0u8; 4];
    end.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"ping");
    end.shutdown(Shutdown::Write).unwrap();
    assert!(read_all(&mut end).is_empty());
    assert_eq!(lab.client_kernel_resets(), 0);
}

fn closed_port() {
    let lab = Lab::new();
    let instance = lab.start_instance(PacketSocket::Inherited, &[]);
    let control = instance.control();
    let app = control.open(lab.server(5999)).expect("the SYN is sent");
    let events = poll_events(&app.end, PollFlags::IN, Duration::from_secs(10));
    assert!(events.contains(PollFlags::HUP), "{events:?}");
    // The instance closed its end without reading the filler: Linux reports that unread data
    // as ECONNRESET on the application's end (the shim asks `Status` for the real errno).
    let mut end = app.end;
    let mut byte = [0u8; 1];
    match end.read(&mut byte) {
        Ok(0) => {}
        Err(e) if e.raw_os_error() == Some(104) => {}
        other => panic!("the application's end must hang up: {other:?}"),
    }
    assert_eq!(
        final_status(&control, app.id),
        (RelayState::Failed, Some(111))
    );
}

fn writable_after_handshake() {
    let lab = Lab::new();
    let _echo = lab.start_server("echo", 5003, 0);
    let drop_syns = [
        "iptables", "INPUT", "-p", "tcp", "--dport", "5003", "--syn", "-j", "DROP",
    ];
    let rule = |action: &str| {
        let mut args = drop_syns.to_vec();
        args.insert(1, action);
        lab.exec_server(&args);
    };
    rule("-A");
    let instance = lab.start_instance(PacketSocket::Inherited, &[]);
    let control = instance.control();
    let app = control.open(lab.server(5003)).expect("connect");
    let events = poll_events(&app.end, PollFlags::OUT, Duration::from_millis(500));
    assert!(
        !events.contains(PollFlags::OUT),
        "writable before the handshake: {events:?}"
    );
    assert!(matches!(
        control.status(app.id),
        RelayResponse::Status {
            state: RelayState::Connecting,
            ..
        }
    ));
    rule("-D");
    // The SYN is retransmitted after the initial RTO (1 s).
    let started = Instant::now();
    let events = poll_events(&app.end, PollFlags::OUT, Duration::from_secs(10));
    assert!(events.contains(PollFlags::OUT), "{events:?}");
    assert!(matches!(
        control.status(app.id),
        RelayResponse::Status {
            state: RelayState::Established,
            ..
        }
    ));
    eprintln!(
        "writable {} ms after the SYNs were let through",
        started.elapsed().as_millis()
    );
    let mut end = app.end;
    blocking(&end);
    end.write_all(b"after").unwrap();
    let mut reply = [0u8; 5];
    end.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"after", "no filler byte reached the server");
}

fn peer_reset() {
    let lab = Lab::new();
    let server = lab.start_server("rst", 5004, 1_000_000);
    let instance = lab.start_instance(PacketSocket::Inherited, &[]);
    let control = instance.control();
    let app = control.open(lab.server(5004)).expect("connect");
    let mut end = app.end;
    blocking(&end);
    let chunk = payload(2, 65536);
    let mut written = 0u64;
    let error = loop {
        match end.write(&chunk) {
            Ok(n) => written += n as u64,
            Err(e) => break e,
        }
        assert!(written < 1 << 30, "writes never failed");
    };
    server.line("RST", TIMEOUT);
    // EPIPE, or ECONNRESET when the instance closed its end with our bytes unread.
    assert!(
        matches!(error.raw_os_error(), Some(32 | 104)),
        "the instance closed its end: {error}"
    );
    assert_eq!(
        final_status(&control, app.id),
        (RelayState::Reset, Some(104))
    );
}

fn write_then_close() {
    let lab = Lab::new();
    let sink = lab.start_server("sink", 5005, 0);
    let instance = lab.start_instance(PacketSocket::Inherited, &[]);
    let data = payload(3, 20_000_000);
    let expected = format!("RESULT 20000000 {}", sha256_hex(&data));
    for shutdown_first in [true, false] {
        let app = instance.open(lab.server(5005)).expect("connect");
        let mut end = app.end;
        blocking(&end);
        end.write_all(&data).unwrap();
        if shutdown_first {
            end.shutdown(Shutdown::Write).unwrap();
        }
        // The application is gone: nothing of the connection is left on its side.
        drop(end);
        let deadline = Instant::now() + TIMEOUT;
        let want = if shutdown_first { 1 } else { 2 };
        while sink.lines("RESULT").len() < want {
            assert!(Instant::now() < deadline, "sink: {}", sink.stdout());
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(sink.lines("RESULT")[want - 1], expected);
    }
    assert!(sink.lines("RESET").is_empty(), "{}", sink.stdout());
    assert_eq!(lab.client_kernel_resets(), 0);
}

fn close_with_unread_data() {
    let lab = Lab::new();
    let server = lab.start_server("push", 5006, 100_000);
    let instance = lab.start_instance(PacketSocket::Inherited, &[]);
    let control = instance.control();
    let app = control.open(lab.server(5006)).expect("connect");
    let events = poll_events(&app.end, PollFlags::IN, Duration::from_secs(10));
    assert!(events.contains(PollFlags::IN), "{events:?}");
    drop(app.end);
    assert_eq!(server.line("RESET", TIMEOUT), "RESET");
    assert_eq!(final_status(&control, app.id), (RelayState::Closed, None));
}

fn peer_fin() {
    let lab = Lab::new();
    let server = lab.start_server("fin", 5007, 0);
    let instance = lab.start_instance(PacketSocket::Inherited, &[]);
    let control = instance.control();
    let app = control.open(lab.server(5007)).expect("connect");
    let mut end = app.end;
    blocking(&end);
    assert_eq!(read_all(&mut end), b"hello", "then end of file");
    // Half-closed: the application can still send.
    end.write_all(b"bye").unwrap();
    assert!(matches!(
        control.status(app.id),
        RelayResponse::Status {
            state: RelayState::Established,
            ..
        }
    ));
    drop(end);
    assert_eq!(server.line("GOT", TIMEOUT), "GOT 3");
    assert_eq!(final_status(&control, app.id), (RelayState::Closed, None));
}

fn reset_on_close_and_options() {
    let lab = Lab::new();
    let sink = lab.start_server("sink", 5008, 0);
    let instance = lab.start_instance(PacketSocket::Inherited, &[]);
    let control = instance.control();
    let app = control.open(lab.server(5008)).expect("connect");
    let set = |option| control.request(&RelayRequest::SetOption { id: app.id, option }, None);
    use stackroute_local_api::relay::RelayOption;
    for option in [
        RelayOption::NoDelay(true),
        RelayOption::Keepalive(true),
        RelayOption::CongestionControl("cubic".into()),
        RelayOption::SendBuffer(1 << 20),
        RelayOption::ReceiveBuffer(1 << 20),
        RelayOption::ResetOnClose(true),
    ] {
        assert_eq!(set(option.clone()), RelayResponse::Done, "{option:?}");
    }
    assert!(matches!(
        set(RelayOption::CongestionControl("vegas".into())),
        RelayResponse::Error { errno: 2, .. }
    ));
    let mut end = app.end;
    blocking(&end);
    end.write_all(b"some bytes").unwrap();
    let RelayResponse::Status {
        info: Some(info), ..
    } = control.status(app.id)
    else {
        panic!("no status");
    };
    assert_eq!(
        info.congestion_control.to_ascii_lowercase(),
        "cubic",
        "{info:?}"
    );
    drop(end);
    assert!(sink.line("RESET", TIMEOUT).starts_with("RESET"));
    assert!(matches!(
        control.request(
            &RelayRequest::SetOption {
                id: app.id,
                option: RelayOption::NoDelay(false)
            },
            None
        ),
        RelayResponse::Error { errno: 107, .. }
    ));
}

/// `STACKD_CONCURRENT` / `STACKD_SEQUENTIAL` raise the counts for a longer run.
fn count(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn concurrent() {
    let count = count("STACKD_CONCURRENT", 200);
    let lab = Lab::new();
    let _echo = lab.start_server("echo", 5009, 0);
    let instance = lab.start_instance(PacketSocket::Inherited, &[]);
    let control = instance.control();
    let apps: Vec<App> = (0..count)
        .map(|_| control.open(lab.server(5009)).expect("connect"))
        .collect();
    for (i, app) in apps.iter().enumerate() {
        blocking(&app.end);
        (&app.end).write_all(&payload(i as u64 + 10, 1000)).unwrap();
    }
    for (i, app) in apps.iter().enumerate() {
        let mut reply = vec![0u8; 1000];
        (&app.end).read_exact(&mut reply).unwrap();
        assert_eq!(reply, payload(i as u64 + 10, 1000), "connection {i}");
    }
    assert_no_kernel_tcp(&lab);
    // Paging through every connection, 64 at a time.
    let mut after = 0;
    let mut seen = Vec::new();
    loop {
        let RelayResponse::Connections { connections, more } =
            control.request(&RelayRequest::Connections { after, limit: 64 }, None)
        else {
            panic!("not a page");
        };
        assert!(connections.len() <= 64);
        seen.extend(connections.iter().map(|c| c.id));
        if !more {
            break;
        }
        after = connections.last().expect("a page with more has entries").id;
    }
    let ids: Vec<u64> = apps.iter().map(|a| a.id).collect();
    assert_eq!(seen, ids, "every connection once, by increasing id");
    for app in &apps {
        app.end.shutdown(Shutdown::Write).unwrap();
    }
    for app in apps {
        let mut end = app.end;
        assert!(read_all(&mut end).is_empty());
    }
    assert_eq!(lab.client_kernel_resets(), 0);
}

fn sequential() {
    let count = count("STACKD_SEQUENTIAL", 2000);
    let lab = Lab::new();
    let _reply = lab.start_server("reply", 5010, 100);
    let instance = lab.start_instance(PacketSocket::Inherited, &[]);
    let control = instance.control();
    let one = |i: usize| {
        let app = control.open(lab.server(5010)).expect("connect");
        let mut end = app.end;
        blocking(&end);
        let request = payload(i as u64, 100);
        end.write_all(&request).unwrap();
        assert_eq!(read_all(&mut end), request, "connection {i}");
        app.id
    };
    let id = one(0);
    final_status(&control, id);
    std::thread::sleep(Duration::from_millis(500));
    let (fds_before, rss_before) = (instance.fd_count(), instance.rss_kib());
    let started = Instant::now();
    let mut last = 0;
    for i in 1..=count {
        last = one(i);
    }
    let seconds = started.elapsed().as_secs_f64();
    assert_eq!(final_status(&control, last), (RelayState::Closed, None));
    std::thread::sleep(Duration::from_millis(500));
    let (fds_after, rss_after) = (instance.fd_count(), instance.rss_kib());
    eprintln!(
        "{count} sequential connections in {seconds:.1} s ({:.0}/s); descriptors {fds_before} → \
         {fds_after}; RSS {rss_before} → {rss_after} KiB",
        count as f64 / seconds
    );
    assert_eq!(fds_after, fds_before, "descriptors leaked");
    assert!(
        rss_after < rss_before + 16 * 1024,
        "RSS grew from {rss_before} to {rss_after} KiB"
    );
    assert_eq!(lab.client_kernel_resets(), 0);
}

fn malformed() {
    let lab = Lab::new();
    let _echo = lab.start_server("echo", 5011, 0);
    let instance = lab.start_instance(PacketSocket::Inherited, &[]);
    let fds_before = instance.fd_count();
    let refused_and_closed = |bytes: &[u8], fds: &[std::os::fd::BorrowedFd<'_>], errno: i32| {
        let control = instance.control();
        control.send_raw(bytes, fds).unwrap();
        let reply: RelayResponse =
            serde_json::from_slice(&control.receive_raw().expect("an error reply")).unwrap();
        assert!(
            matches!(reply, RelayResponse::Error { errno: e, .. } if e == errno),
            "{reply:?}"
        );
        assert!(
            control.receive_raw().is_none(),
            "connection closed after a refusal"
        );
    };
    refused_and_closed(b"{not json", &[], 22);
    refused_and_closed(br#"{"kind":"listen","port":80}"#, &[], 22);
    let connect = serde_json::to_vec(&RelayRequest::Connect {
        remote: lab.server(5011),
        original: None,
        congestion_control: "BBR".into(),
        nodelay: false,
        filler: 0,
    })
    .unwrap();
    refused_and_closed(&connect, &[], 22);
    // Descriptors on the wrong packet, or too many: refused, and closed by the instance (our
    // ends of those pairs then read end of file).
    let (a, a_peer) = UnixStream::pair().unwrap();
    let (b, b_peer) = UnixStream::pair().unwrap();
    refused_and_closed(br#"{"kind":"status","id":1}"#, &[a.as_fd()], 22);
    refused_and_closed(&connect, &[a.as_fd(), b.as_fd()], 22);
    drop((a, b));
    for mut peer in [a_peer, b_peer] {
        peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut byte = [0u8; 1];
        assert_eq!(
            peer.read(&mut byte).unwrap(),
            0,
            "the instance closed the descriptor"
        );
    }
    refused_and_closed(&vec![b' '; MAX_MESSAGE + 100], &[], 90);
    // An empty packet reads as the end of the connection.
    let control = instance.control();
    control.send_raw(b"", &[]).unwrap();
    assert!(control.receive_raw().is_none());
    // Refusals that keep the connection: a descriptor that is not a socket, unknown
    // congestion control, an IPv6 destination, an unknown connection.
    let control = instance.control();
    let null = std::fs::File::open("/dev/null").unwrap();
    let reply = |request: &RelayRequest, fd| control.request(request, fd);
    assert!(matches!(
        reply(
            &serde_json::from_slice(&connect).unwrap(),
            Some(null.as_fd())
        ),
        RelayResponse::Error { errno: 22, .. }
    ));
    let (x, _x_peer) = UnixStream::pair().unwrap();
    let with = |remote: &str, cc: &str| RelayRequest::Connect {
        remote: remote.parse().unwrap(),
        original: None,
        congestion_control: cc.into(),
        nodelay: false,
        filler: 0,
    };
    assert!(matches!(
        reply(&with("10.77.0.2:5011", "vegas"), Some(x.as_fd())),
        RelayResponse::Error { errno: 22, .. }
    ));
    assert!(matches!(
        reply(&with("[fd00::2]:5011", "BBR"), Some(x.as_fd())),
        RelayResponse::Error { errno: 101, .. }
    ));
    assert!(matches!(
        reply(&RelayRequest::Status { id: 999_999 }, None),
        RelayResponse::Error { errno: 2, .. }
    ));
    drop((control, x, null));
    // Still serving.
    let mut proc_alive = instance.proc.stdout();
    proc_alive.clear();
    let app = instance.open(lab.server(5011)).expect("connect");
    let mut end = app.end;
    blocking(&end);
    end.write_all(b"still here").unwrap();
    let mut reply = [0u8; 10];
    end.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"still here");
    end.shutdown(Shutdown::Write).unwrap();
    assert!(read_all(&mut end).is_empty());
    drop(end);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(instance.fd_count(), fds_before, "descriptors left behind");
}

fn sigterm() {
    let lab = Lab::new();
    let sink = lab.start_server("sink", 5012, 0);
    let mut instance = lab.start_instance(PacketSocket::Inherited, &[]);
    let app = instance.open(lab.server(5012)).expect("connect");
    let end = app.end;
    blocking(&end);
    (&end).write_all(&payload(4, 1_000_000)).unwrap();
    instance.proc.signal("TERM");
    assert_eq!(instance.proc.wait(Duration::from_secs(10)), Some(0));
    assert!(
        sink.line("RESET", TIMEOUT).starts_with("RESET"),
        "{}",
        sink.stdout()
    );
    assert!(instance.proc.stderr().contains("terminated"));
}

fn throughput() {
    let bytes: u64 = std::env::var("STACKD_THROUGHPUT_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000_000);
    let lab = Lab::new();
    let sink = lab.start_server("sink", 5013, 0);
    let instance = lab.start_instance(PacketSocket::Inherited, &[]);
    let data = payload(5, 1 << 20);
    let app = instance.open(lab.server(5013)).expect("connect");
    let mut end = app.end;
    blocking(&end);
    let started = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(data.len() as u64) as usize;
        end.write_all(&data[..n]).unwrap();
        left -= n as u64;
    }
    drop(end);
    sink.line("RESULT", Duration::from_secs(300));
    let relay_seconds = started.elapsed().as_secs_f64();
    // The same transfer with kernel TCP from the client namespace.
    let kernel = format!(
        "import socket,time\nb=bytes(1<<20);s=socket.create_connection(('{SERVER_IP}',5013));t=time.time();left={bytes}\n\
         while left>0:\n n=min(left,len(b));s.sendall(b[:n]);left-=n\n\
         s.shutdown(socket.SHUT_WR);s.recv(1);print(time.time()-t)"
    );
    let kernel_seconds: f64 = lab
        .exec_client(&["python3", "-c", &kernel])
        .trim()
        .parse()
        .unwrap();
    let rate = |seconds: f64| bytes as f64 * 8.0 / seconds / 1e6;
    eprintln!(
        "{} MB: relay {:.0} Mbit/s ({relay_seconds:.2} s), kernel {:.0} Mbit/s ({kernel_seconds:.2} s){}",
        bytes / 1_000_000,
        rate(relay_seconds),
        rate(kernel_seconds),
        if cfg!(debug_assertions) {
            " [debug build]"
        } else {
            ""
        }
    );
}

/// The instance alone on a device of its own, through DPDK (`net_af_packet` on a second veth
/// whose client side has no kernel address: the Dedicated isolation's shape with a NIC or VF):
/// `engine dpdk` in its readiness message, 10 MB each way checked by SHA-256 from the stack's
/// own address, no port kept for a kernel. SIGTERM ends it with exit code 0 and EAL's runtime
/// directory removed. With EAL arguments DPDK refuses, the instance says why and runs on
/// AF_PACKET instead.
fn dedicated_device_on_dpdk() {
    let lab = Lab::new();
    let device = lab.add_dedicated_link();
    let sink = lab.start_server("sink", 5020, 0);
    let source = lab.start_server("source", 5021, 10_000_000);
    let address = format!("{DEDICATED_STACK}/24");
    let args = |dpdk_args: String| {
        [
            "--dpdk-args".to_string(),
            dpdk_args,
            "--interface".into(),
            device.clone(),
            "--address".into(),
            address.clone(),
            "--gateway".into(),
            DEDICATED_GATEWAY.into(),
            "--ipv4-only".into(),
            "--dedicated".into(),
        ]
    };
    let dpdk = args(format!("--vdev=net_af_packet0,iface={device}"));
    let mut instance = lab.start_instance(
        PacketSocket::Named,
        &dpdk.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert!(
        instance.proc.stdout().contains("engine dpdk"),
        "{}",
        instance.proc.stdout()
    );
    let control = instance.control();

    let app = control.open(lab.server(5020)).expect("connect");
    assert_eq!(app.local.ip().to_string(), DEDICATED_STACK);
    let data = payload(7, 10_000_000);
    let expected = format!("RESULT 10000000 {}", sha256_hex(&data));
    let mut end = app.end;
    blocking(&end);
    end.write_all(&data).unwrap();
    end.shutdown(Shutdown::Write).unwrap();
    assert!(read_all(&mut end).is_empty());
    assert_eq!(sink.line("RESULT", TIMEOUT), expected);

    let app = control.open(lab.server(5021)).expect("connect");
    let mut end = app.end;
    blocking(&end);
    let received = read_all(&mut end);
    drop(end);
    let sent = source.line("SENT", TIMEOUT);
    assert_eq!(sent, format!("SENT 10000000 {}", sha256_hex(&received)));
    assert_eq!(final_status(&control, app.id), (RelayState::Closed, None));

    let pid = instance.proc.pid();
    instance.proc.signal("TERM");
    assert_eq!(instance.proc.wait(Duration::from_secs(10)), Some(0));
    let prefix = format!("stackroute-{pid}-");
    let left: Vec<String> = std::fs::read_dir("/var/run/dpdk")
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| name.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "EAL runtime directories left: {left:?}");

    // Arguments EAL refuses: the reason is logged, AF_PACKET carries the connection.
    let refused = args(format!(
        "--vdev=net_af_packet0,iface={device} --no-such-flag"
    ));
    let instance = lab.start_instance(
        PacketSocket::Named,
        &refused.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert!(
        instance.proc.stdout().contains("engine af_packet"),
        "{}",
        instance.proc.stdout()
    );
    assert!(
        instance.proc.stderr().contains("DPDK is unavailable"),
        "{}",
        instance.proc.stderr()
    );
    let app = instance
        .open(lab.server(5020))
        .expect("connect over AF_PACKET");
    let mut end = app.end;
    blocking(&end);
    end.write_all(b"fallback").unwrap();
    end.shutdown(Shutdown::Write).unwrap();
    assert!(read_all(&mut end).is_empty());
    assert_eq!(
        sink.line("RESULT 8 ", TIMEOUT),
        format!("RESULT 8 {}", sha256_hex(b"fallback"))
    );
}
