//! Dual listen: an application in the server namespace keeps a plain kernel listener; the
//! server namespace's instance accepts user-space peers (the client namespace's instance,
//! connecting from its port range) on the wire and hands each to that listener over loopback,
//! while kernel clients reach the listener directly. Root only: without root (or a tool) every
//! trial shows as ignored with the reason, or fails under `STACKROUTE_REQUIRE_NETNS=1`.

mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use stackroute_local_api::relay::{RelayOption, RelayRequest, RelayResponse, RelayState};
use support::*;
use testkit::{Options, Trial};

fn main() -> ExitCode {
    let trial = |name: &str, body: fn()| Trial::gated(name, netns_gate, move |()| body());
    testkit::run_with(
        Options::parallel().sequential(true),
        vec![
            trial(
                "user_space_and_kernel_clients_share_one_kernel_listener_10mb_each_way",
                shared_listener,
            ),
            trial(
                "app_not_listening_resets_the_user_space_client",
                app_not_listening,
            ),
            trial(
                "app_closing_with_unread_data_resets_the_user_space_client",
                app_closes_with_unread_data,
            ),
            trial(
                "unlisten_refuses_new_peers_keeps_existing_and_wire_reset_reaches_the_app",
                unlisten,
            ),
            trial(
                "ipv6_and_ipv4_user_space_peers_share_one_dual_stack_listener",
                ipv6_peer,
            ),
        ],
    )
}

const TIMEOUT: Duration = Duration::from_secs(60);
const PORT: u16 = 7070;
const MB10: usize = 10_000_000;

/// The application: a kernel listener on `0.0.0.0:PORT` (with a fourth argument `dual`: on
/// `[::]:PORT`, taking IPv4 too; IPv4 peers still print as `a.b.c.d:port`), one accept loop, a
/// thread per connection; it prints `ACCEPT <peer>` for each. Modes:
/// - `both`: sends `arg` bytes (xorshift payload, seed 2) while reading to end of file, then
///   prints `RESULT <peer> <bytes read> <sha256 read>` and closes;
/// - `unread`: waits 0.5 s without reading, closes (with the unread data: a RST), prints `CLOSED`;
/// - `echo`: echoes until end of file (`EOF <peer>`) or a reset (`RESET <peer>`).
const APP: &str = r#"
import hashlib, socket, struct, sys, threading, time
mode, port, arg = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def payload(seed, n):
    x = seed | 1; out = bytearray(); m = (1 << 64) - 1
    while len(out) < n:
        x ^= (x << 13) & m; x ^= x >> 7; x ^= (x << 17) & m
        out += struct.pack("<Q", x)
    return bytes(out[:n])
data = payload(2, arg) if mode == "both" else b""
dual = sys.argv[4:] == ["dual"]
s = socket.socket(socket.AF_INET6 if dual else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
if dual: s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::" if dual else "0.0.0.0", port)); s.listen(128); print("READY", flush=True)
def serve(c, peer):
    try:
        if mode == "both":
            def send():
                c.sendall(data); c.shutdown(socket.SHUT_WR)
            t = threading.Thread(target=send); t.start()
            h = hashlib.sha256(); n = 0
            while True:
                d = c.recv(1 << 20)
                if not d: break
                h.update(d); n += len(d)
            t.join()
            print("RESULT", peer, n, h.hexdigest(), flush=True)
        elif mode == "unread":
            time.sleep(0.5); c.close(); print("CLOSED", peer, flush=True)
        elif mode == "echo":
            try:
                while True:
                    d = c.recv(65536)
                    if not d: break
                    c.sendall(d)
                print("EOF", peer, flush=True)
            except ConnectionResetError:
                print("RESET", peer, flush=True)
    except OSError as e:
        print("ERROR", peer, e, flush=True)
    finally:
        c.close()
while True:
    c, a = s.accept()
    ip = a[0][len("::ffff:"):] if a[0].startswith("::ffff:") else a[0]
    peer = ("[%s]:%d" if ":" in ip else "%s:%d") % (ip, a[1])
    print("ACCEPT", peer, flush=True)
    threading.Thread(target=serve, args=(c, peer), daemon=True).start()
"#;

fn start_app(lab: &Lab, mode: &str, arg: usize) -> Proc {
    start_app_with(lab, mode, arg, &[])
}

fn start_app_with(lab: &Lab, mode: &str, arg: usize, extra: &[&str]) -> Proc {
    let mut command = Command::new("ip");
    command.args(["netns", "exec", &lab.server_ns, "python3", "-u", "-c", APP]);
    command.args([mode, &PORT.to_string(), &arg.to_string()]);
    command.args(extra);
    let proc = Proc::spawn(command);
    proc.line("READY", Duration::from_secs(20));
    proc
}

fn listen(server: &Instance) {
    listen_on(server, &format!("0.0.0.0:{PORT}"));
}

fn listen_on(server: &Instance, address: &str) {
    let control = server.control();
    let address: SocketAddr = address.parse().unwrap();
    assert_eq!(
        control.request(&RelayRequest::Listen { address }, None),
        RelayResponse::Done
    );
    // Idempotent.
    assert_eq!(
        control.request(&RelayRequest::Listen { address }, None),
        RelayResponse::Done
    );
}

fn blocking(end: &UnixStream) {
    end.set_nonblocking(false).unwrap();
    end.set_read_timeout(Some(TIMEOUT)).unwrap();
    end.set_write_timeout(Some(TIMEOUT)).unwrap();
}

/// Polls `Status` until the connection is no longer live.
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

fn peer_of(server: &Instance, local: &str) -> RelayResponse {
    server.control().request(
        &RelayRequest::PeerOf {
            local: local.parse().unwrap(),
        },
        None,
    )
}

/// Sends `data`, shuts down, reads to end of file on a blocking stream; returns what it read.
fn exchange<S: Read + Write + Send + 'static>(
    mut stream: S,
    data: Vec<u8>,
    shutdown: impl FnOnce(&S) + Send + 'static,
    clone: impl FnOnce(&S) -> S,
) -> std::thread::JoinHandle<Vec<u8>> {
    let mut writer = clone(&stream);
    std::thread::spawn(move || {
        let sender = std::thread::spawn(move || {
            writer.write_all(&data).expect("writing");
            shutdown(&writer);
        });
        let mut received = Vec::new();
        stream.read_to_end(&mut received).expect("reading to end");
        sender.join().unwrap();
        received
    })
}

fn in_range(address: &str) -> bool {
    address
        .rsplit_once(':')
        .and_then(|(_, port)| port.parse::<u16>().ok())
        .is_some_and(|port| (61000..=62999).contains(&port))
}

fn shared_listener() {
    let lab = Lab::new();
    let app = start_app(&lab, "both", MB10);
    let server = lab.start_server_instance();
    let client = lab.start_instance(PacketSocket::Inherited, &[]);
    listen(&server);
    let server_resets = lab.kernel_resets(&lab.server_ns);
    let client_resets = lab.kernel_resets(&lab.client_ns);
    let expected_from_app = sha256_hex(&payload(2, MB10));

    // During the transfers the server namespace's kernel has the listener, the kernel
    // client's connection and the loopback pair, and no socket facing the user-space peer.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = std::sync::Arc::clone(&stop);
        let ns = lab.server_ns.clone();
        std::thread::spawn(move || {
            let (mut samples, mut seen) = (0, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let out = Command::new("ip")
                    .args(["netns", "exec", &ns, "ss", "-tanH"])
                    .output()
                    .unwrap();
                for line in String::from_utf8_lossy(&out.stdout).lines() {
                    let peer = line.split_whitespace().nth(4).unwrap_or("");
                    if in_range(peer) {
                        seen.push(line.to_owned());
                    }
                }
                samples += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            (samples, seen)
        })
    };
    // The user-space client, through both instances.
    let control = client.control();
    let user = control.open(lab.server(PORT)).expect("connect");
    blocking(&user.end);
    let user_data = payload(11, MB10);
    let user_sha = sha256_hex(&user_data);
    let user_run = exchange(
        user.end,
        user_data,
        |s| s.shutdown(Shutdown::Write).unwrap(),
        |s| s.try_clone().unwrap(),
    );
    // A kernel client of the client namespace at the same time, to the same listener.
    let kernel_data = payload(12, MB10);
    let kernel_sha = sha256_hex(&kernel_data);
    let target = lab.server(PORT);
    let kernel_stream = in_netns(&lab.client_ns, move || {
        TcpStream::connect_timeout(&target, TIMEOUT).expect("kernel connect")
    });
    kernel_stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let kernel_local = kernel_stream.local_addr().unwrap().to_string();
    let kernel_run = exchange(
        kernel_stream,
        kernel_data,
        |s| s.shutdown(Shutdown::Write).unwrap(),
        |s| s.try_clone().unwrap(),
    );

    // Who the application accepted: the kernel client by its address, the user-space one by
    // the instance's loopback end, which PeerOf turns into the real peer.
    let deadline = Instant::now() + TIMEOUT;
    let accepted = loop {
        let lines = app.lines("ACCEPT");
        if lines.len() >= 2 || Instant::now() > deadline {
            break lines;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let peers: Vec<String> = accepted
        .iter()
        .map(|l| l.split_whitespace().nth(1).unwrap().to_owned())
        .collect();
    assert_eq!(peers.len(), 2, "{accepted:?}");
    assert!(peers.contains(&kernel_local), "{peers:?} vs {kernel_local}");
    let loopback = peers
        .iter()
        .find(|p| p.starts_with("127.0.0.1:"))
        .unwrap_or_else(|| panic!("no loopback peer in {peers:?}"))
        .clone();
    assert!(!in_range(&loopback), "a kernel ephemeral port: {loopback}");
    match peer_of(&server, &loopback) {
        RelayResponse::Peer {
            remote: Some(remote),
            id: Some(_),
        } => assert_eq!(remote, user.local, "the client's real address"),
        other => panic!("PeerOf {loopback}: {other:?}"),
    }
    assert_eq!(
        peer_of(&server, &kernel_local),
        RelayResponse::Peer {
            remote: None,
            id: None
        }
    );
    // Mapped form, as a dual-stack socket reports it.
    assert!(matches!(
        peer_of(
            &server,
            &format!(
                "[::ffff:{}]:{}",
                "127.0.0.1",
                loopback.rsplit_once(':').unwrap().1
            )
        ),
        RelayResponse::Peer {
            remote: Some(_),
            ..
        }
    ));
    let user_received = user_run.join().unwrap();
    let kernel_received = kernel_run.join().unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (samples, seen) = sampler.join().unwrap();
    assert!(seen.is_empty(), "the kernel saw user-space peers: {seen:?}");
    assert_eq!(sha256_hex(&user_received), expected_from_app);
    assert_eq!(sha256_hex(&kernel_received), expected_from_app);
    let results = {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let lines = app.lines("RESULT");
            if lines.len() >= 2 || Instant::now() > deadline {
                break lines;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    assert!(
        results.contains(&format!("RESULT {loopback} {MB10} {user_sha}")),
        "{results:?}"
    );
    assert!(
        results.contains(&format!("RESULT {kernel_local} {MB10} {kernel_sha}")),
        "{results:?}"
    );
    assert_eq!(final_status(&control, user.id), (RelayState::Closed, None));
    // The server instance lists the accepted connection by its wire addresses.
    let RelayResponse::Connections { connections, .. } = server.control().request(
        &RelayRequest::Connections {
            after: 0,
            limit: 100,
        },
        None,
    ) else {
        panic!("no connections page");
    };
    assert_eq!(connections.len(), 1, "{connections:?}");
    assert_eq!(connections[0].remote, user.local);
    assert_eq!(connections[0].local, lab.server(PORT));
    assert_eq!(connections[0].bytes_received, MB10 as u64);
    assert_eq!(connections[0].bytes_sent, MB10 as u64);
    // The kernels answered nothing of it.
    assert_eq!(
        lab.kernel_resets(&lab.server_ns),
        server_resets,
        "server OutRsts"
    );
    assert_eq!(
        lab.kernel_resets(&lab.client_ns),
        client_resets,
        "client OutRsts"
    );
    assert_eq!(server_resets + client_resets, 0);
    let dropped = lab.peer_segments_dropped(&lab.server_ns);
    assert!(dropped > 1000, "{dropped} user-space peer segments dropped");
    eprintln!(
        "10 MB each way for both clients; `ss -tan` of the server namespace sampled {samples} \
         times, never a user-space peer; its raw table dropped {dropped} segments from peers"
    );
}

fn app_not_listening() {
    let lab = Lab::new();
    let server = lab.start_server_instance();
    let client = lab.start_instance(PacketSocket::Inherited, &[]);
    listen(&server);
    let control = client.control();
    let user = control.open(lab.server(PORT)).expect("connect");
    blocking(&user.end);
    let mut end = user.end;
    let mut buffer = [0u8; 16];
    let read = end.read(&mut buffer);
    assert!(
        matches!(read, Ok(0)) || read.is_err(),
        "the application end hangs up: {read:?}"
    );
    let (state, error) = final_status(&control, user.id);
    assert!(
        matches!(
            (state, error),
            (RelayState::Reset, Some(104)) | (RelayState::Failed, Some(111 | 104))
        ),
        "{state:?} {error:?}"
    );
    // Two ways to the same end, depending on timing: the instance relays the SYN and the
    // server namespace's kernel answers its loopback SYN to the closed port with one RST; or a
    // housekeeping pass already found no kernel listener on the port, withdrew the dual
    // listen, and the stack refused the SYN itself. Either way no kernel RST went on the wire.
    let server_resets = lab.kernel_resets(&lab.server_ns);
    assert!(
        server_resets <= 1,
        "{server_resets} kernel RSTs in the server namespace"
    );
    assert_eq!(lab.kernel_resets(&lab.client_ns), 0);
}

fn app_closes_with_unread_data() {
    let lab = Lab::new();
    let app = start_app(&lab, "unread", 0);
    let server = lab.start_server_instance();
    let client = lab.start_instance(PacketSocket::Inherited, &[]);
    listen(&server);
    let control = client.control();
    let user = control.open(lab.server(PORT)).expect("connect");
    blocking(&user.end);
    let mut end = user.end;
    end.write_all(&payload(3, 100_000)).unwrap();
    app.line("CLOSED", TIMEOUT);
    assert_eq!(
        final_status(&control, user.id),
        (RelayState::Reset, Some(104))
    );
    let mut buffer = [0u8; 16];
    let read = end.read(&mut buffer);
    assert!(read.is_err() || matches!(read, Ok(0)), "{read:?}");
    assert_eq!(lab.kernel_resets(&lab.client_ns), 0);
}

fn unlisten() {
    let lab = Lab::new();
    let app = start_app(&lab, "echo", 0);
    let server = lab.start_server_instance();
    let client = lab.start_instance(PacketSocket::Inherited, &[]);
    listen(&server);
    let control = client.control();
    let first = control.open(lab.server(PORT)).expect("connect");
    blocking(&first.end);
    let mut end = first.end;
    end.write_all(b"before").unwrap();
    let mut buffer = [0u8; 6];
    end.read_exact(&mut buffer).unwrap();
    assert_eq!(&buffer, b"before");
    let address: SocketAddr = format!("0.0.0.0:{PORT}").parse().unwrap();
    assert_eq!(
        server
            .control()
            .request(&RelayRequest::Unlisten { address }, None),
        RelayResponse::Done
    );
    // A new user-space connection is refused (the stack answers, the kernel never sees it).
    let second = control.open(lab.server(PORT)).expect("connect");
    assert_eq!(
        final_status(&control, second.id),
        (RelayState::Failed, Some(111))
    );
    // The existing one goes on.
    end.write_all(b"after!").unwrap();
    end.read_exact(&mut buffer).unwrap();
    assert_eq!(&buffer, b"after!");
    // A reset on the wire reaches the application as ECONNRESET.
    assert_eq!(
        control.request(
            &RelayRequest::SetOption {
                id: first.id,
                option: RelayOption::ResetOnClose(true),
            },
            None
        ),
        RelayResponse::Done
    );
    drop(end);
    let reset = app.line("RESET", TIMEOUT);
    assert!(reset.starts_with("RESET 127.0.0.1:"), "{reset}");
    assert_eq!(
        app.lines("ACCEPT").len(),
        1,
        "the refused peer never reached the app"
    );
    // The one RST the server namespace's kernel sent is the instance's loopback abort
    // (`SO_LINGER {1, 0}`), on loopback.
    assert_eq!(lab.kernel_resets(&lab.server_ns), 1);
    assert_eq!(lab.kernel_resets(&lab.client_ns), 0);
}

fn ipv6_peer() {
    let lab = Lab::new();
    let app = start_app_with(&lab, "echo", 0, &["dual"]);
    let server = lab.start_server_instance();
    let client = lab.start_instance(PacketSocket::Inherited, &[]);
    listen_on(&server, &format!("[::]:{PORT}"));
    let control = client.control();
    // An IPv6 user-space peer: 1 MB echoed, delivered over ::1, its real address by PeerOf.
    let user = control.open(lab.server6(PORT)).expect("connect over IPv6");
    assert!(
        user.local.is_ipv6() && in_range(&user.local.to_string()),
        "the client instance's IPv6 address and a port of its range: {}",
        user.local
    );
    blocking(&user.end);
    let data = payload(21, 1_000_000);
    let echoed = exchange(
        user.end,
        data.clone(),
        |s| s.shutdown(Shutdown::Write).unwrap(),
        |s| s.try_clone().unwrap(),
    )
    .join()
    .unwrap();
    assert!(
        echoed == data,
        "{} of {} bytes echoed intact",
        echoed.len(),
        data.len()
    );
    let accepted = app.line("ACCEPT", TIMEOUT);
    let loopback = accepted.split_whitespace().nth(1).unwrap().to_owned();
    assert!(loopback.starts_with("[::1]:"), "{accepted}");
    match peer_of(&server, &loopback) {
        RelayResponse::Peer {
            remote: Some(remote),
            id: Some(_),
        } => assert_eq!(remote, user.local, "the client's real IPv6 address"),
        other => panic!("PeerOf {loopback}: {other:?}"),
    }
    app.line("EOF [::1]:", TIMEOUT);
    // An IPv4 user-space peer of the same listener still arrives over 127.0.0.1.
    let four = control.open(lab.server(PORT)).expect("connect over IPv4");
    blocking(&four.end);
    let mut end = four.end;
    end.write_all(b"four").unwrap();
    let mut buffer = [0u8; 4];
    end.read_exact(&mut buffer).unwrap();
    assert_eq!(&buffer, b"four");
    let accepted = app.lines("ACCEPT");
    assert!(
        accepted.len() == 2 && accepted[1].starts_with("ACCEPT 127.0.0.1:"),
        "{accepted:?}"
    );
    assert_eq!(lab.kernel_resets(&lab.client_ns), 0);
    assert_eq!(lab.kernel_resets(&lab.server_ns), 0);
}
