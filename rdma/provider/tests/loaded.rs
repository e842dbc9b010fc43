//! The loader over a real provider: `libstackroute_rdma_fault.so` (`rdma/fault-provider`),
//! loaded with `dlopen`, its queue pairs opened, connected to each other's endpoints and driven
//! by two relays — in one process, and in two processes in two network namespaces. Its queue
//! pairs are **emulated** (`AF_UNIX` `SOCK_SEQPACKET` sockets with RC's semantics and injected
//! faults): these tests show the provider ABI, the loader and the relay working together, not
//! RDMA working.
//!
//! The provider reads its environment (`STACKROUTE_RDMA_FAULTS`, `STACKROUTE_RDMA_FAULT_DIR`)
//! at `open` and `connect`, and the trials set it: they run one at a time. The process also
//! serves as the peer process of the cross-process trial (see [`CHILD_VAR`]).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec, poll};
use stackroute_rdma_provider::{Library, LoadedQueuePair, OpenedQueuePair};
use stackroute_rdma_relay::testing::{
    end_within, exchange_both_ways, pattern, read_to_end, send_all, spawn,
};
use stackroute_rdma_relay::{Config, End, QueuePair, Received};
use stackroute_rdma_upgrade::{Endpoint, Reason};
use testkit::{Ignored, Options, Trial};

/// The rings of these tests: the window of the upgrade's version 1, buffers small enough
/// that a window fits a socket buffer without privileges (`net.core.wmem_max`'s default).
const CONFIG: Config = Config {
    window: 16,
    buffer: 8 * 1024,
    send_queue: 64 * 1024,
};

/// Set (to the provider's path) in the peer process of the cross-process trial.
const CHILD_VAR: &str = "STACKROUTE_FAULT_PROVIDER_TEST_CHILD";

const FAULTS_VAR: &str = "STACKROUTE_RDMA_FAULTS";
const DIR_VAR: &str = "STACKROUTE_RDMA_FAULT_DIR";

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

fn main() -> std::process::ExitCode {
    if let Some(library) = std::env::var_os(CHILD_VAR) {
        return peer_process(Path::new(&library));
    }
    let trials = vec![
        Trial::test(
            "two_queue_pairs_carry_a_stream_both_ways_and_end_closed",
            two_queue_pairs_carry_a_stream_both_ways_and_end_closed,
        ),
        Trial::test(
            "a_send_fault_fails_the_connection_naming_it",
            a_send_fault_fails_the_connection_naming_it,
        ),
        Trial::test(
            "an_open_fault_refuses_with_its_reason",
            an_open_fault_refuses_with_its_reason,
        ),
        Trial::test(
            "connecting_to_an_endpoint_nobody_opened_times_out",
            connecting_to_an_endpoint_nobody_opened_times_out,
        ),
        Trial::test(
            "a_dead_peer_is_noticed_by_sending_and_leaves_the_event_fd_quiet",
            a_dead_peer_is_noticed_by_sending_and_leaves_the_event_fd_quiet,
        ),
        Trial::test(
            "a_message_longer_than_a_buffer_is_a_length_error",
            a_message_longer_than_a_buffer_is_a_length_error,
        ),
        Trial::test("queue_pairs_of_two_processes_carry_a_stream", || {
            two_processes(None)
        }),
        Trial::gated(
            "queue_pairs_of_two_processes_in_two_network_namespaces_carry_a_stream",
            unshare_net,
            |unshare| two_processes(Some(unshare)),
        ),
    ];
    // One at a time: each trial sets the provider's environment.
    testkit::run_with(Options::parallel().sequential(true), trials)
}

// === helpers ===

fn library() -> Arc<Library> {
    static LIBRARY: OnceLock<Arc<Library>> = OnceLock::new();
    LIBRARY
        .get_or_init(|| {
            let path = testkit::library(
                "stackroute-rdma-fault-provider",
                "libstackroute_rdma_fault.so",
            );
            Library::load(&path).unwrap()
        })
        .clone()
}

/// A trial's own socket directory (created by the provider, under `temp`) and faults.
fn provider_env(temp: &tempfile::TempDir, faults: &str) -> PathBuf {
    let dir = temp.path().join("queue-pairs");
    set_faults(faults);
    // SAFETY: the trials run one at a time (`Options::sequential`) and the threads of earlier
    // trials do not touch the environment (the provider reads it in `open` and `connect` only,
    // which the trials call themselves).
    unsafe { std::env::set_var(DIR_VAR, &dir) };
    dir
}

fn set_faults(faults: &str) {
    // SAFETY: as in `provider_env`.
    unsafe { std::env::set_var(FAULTS_VAR, faults) };
}

fn open() -> (OpenedQueuePair, Endpoint) {
    library().open(&CONFIG).unwrap()
}

fn control_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    (client, server)
}

fn listed(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

// === trials ===

fn two_queue_pairs_carry_a_stream_both_ways_and_end_closed() {
    let temp = tempfile::tempdir().unwrap();
    let dir = provider_env(&temp, "");
    let (opened_a, endpoint_a) = open();
    let (opened_b, endpoint_b) = open();
    assert_ne!(endpoint_a, endpoint_b);
    assert_eq!(
        std::fs::metadata(&dir).unwrap().permissions().mode() & 0o7777,
        0o1777,
        "the socket directory is created sticky and shared, like /tmp"
    );
    let mut names = listed(&dir);
    names.sort();
    let mut expected = [endpoint_a, endpoint_b].map(|e| format!("{}-{}", e.psn, e.qpn));
    expected.sort();
    assert_eq!(
        names, expected,
        "one listener per queue pair, named <psn>-<qpn>"
    );
    // One side connects well before the other: its peer accepts it when it gets there.
    let qp_a = opened_a.connect(&endpoint_b, CONNECT_TIMEOUT).unwrap();
    let qp_b = opened_b.connect(&endpoint_a, CONNECT_TIMEOUT).unwrap();
    let (a, relay_a) = spawn(qp_a, CONFIG, None);
    let (b, relay_b) = spawn(qp_b, CONFIG, None);
    let (to_b, to_a) = (pattern(2 << 20, 1), pattern(2 << 20, 2));
    exchange_both_ways(a, b, to_b, to_a);
    assert_eq!(end_within(relay_a, Duration::from_secs(10)), End::Closed);
    assert_eq!(end_within(relay_b, Duration::from_secs(10)), End::Closed);
    assert_eq!(
        listed(&dir),
        Vec::<String>::new(),
        "the listeners' paths are gone"
    );
}

fn a_send_fault_fails_the_connection_naming_it() {
    let temp = tempfile::tempdir().unwrap();
    provider_env(&temp, "send-fail-after=3");
    let (opened_a, endpoint_a) = open();
    // Read at open: only a's queue pair fails.
    set_faults("");
    let (opened_b, endpoint_b) = open();
    let qp_a = opened_a.connect(&endpoint_b, CONNECT_TIMEOUT).unwrap();
    let qp_b = opened_b.connect(&endpoint_a, CONNECT_TIMEOUT).unwrap();
    let (control_a, control_b) = control_pair();
    let (a, relay_a) = spawn(qp_a, CONFIG, Some(control_a));
    let (b, relay_b) = spawn(qp_b, CONFIG, Some(control_b));
    let _writer_a = send_all(a.try_clone().unwrap(), pattern(1 << 20, 3));
    let _writer_b = send_all(b.try_clone().unwrap(), pattern(1 << 20, 4));
    match end_within(relay_a, Duration::from_secs(10)) {
        End::Failed(why) => assert!(
            why.contains("IBV_WC_RETRY_EXC_ERR") && why.contains("emulated fault after 3 SENDs"),
            "{why}"
        ),
        End::Closed => panic!("a failed SEND ended cleanly"),
    }
    // The failed side's relay is gone with its queue pair and TCP socket: the peer notices
    // through the one or the other.
    match end_within(relay_b, Duration::from_secs(10)) {
        End::Failed(why) => assert!(
            why.contains("TCP socket") || why.contains("peer's queue pair is gone"),
            "{why}"
        ),
        End::Closed => panic!("the peer of a failed connection ended cleanly"),
    }
    drop((a, b));
}

fn an_open_fault_refuses_with_its_reason() {
    let temp = tempfile::tempdir().unwrap();
    let dir = provider_env(&temp, "open=memlock");
    let refusal = library().open(&CONFIG).unwrap_err();
    assert_eq!(refusal.reason, Reason::Memlock, "{refusal:?}");
    assert!(
        refusal.detail.contains("emulated fault") && refusal.detail.contains("open=memlock"),
        "{refusal:?}"
    );
    set_faults("open=no-such-reason");
    let refusal = library().open(&CONFIG).unwrap_err();
    assert_eq!(refusal.reason, Reason::Other, "{refusal:?}");
    assert!(refusal.detail.contains("no-such-reason"), "{refusal:?}");
    assert!(
        !dir.exists() || listed(&dir).is_empty(),
        "a refused open leaves no listener"
    );
}

fn connecting_to_an_endpoint_nobody_opened_times_out() {
    let temp = tempfile::tempdir().unwrap();
    let dir = provider_env(&temp, "");
    let (opened, endpoint) = open();
    let nobody = Endpoint {
        qpn: endpoint.qpn + 1000,
        ..endpoint
    };
    let timeout = Duration::from_millis(200);
    let start = Instant::now();
    let refusal = opened.connect(&nobody, timeout).unwrap_err();
    let took = start.elapsed();
    assert_eq!(refusal.reason, Reason::ConnectTimeout, "{refusal:?}");
    let path = dir.join(format!("{}-{}", nobody.psn, nobody.qpn));
    assert!(
        refusal.detail.contains(&path.display().to_string()) && refusal.detail.contains("os error"),
        "the detail names the path and the errno: {refusal:?}"
    );
    assert!(
        took >= timeout && took < timeout + Duration::from_millis(500),
        "connect returned after {took:?} for a timeout of {timeout:?}"
    );
    assert_eq!(
        listed(&dir),
        Vec::<String>::new(),
        "a failed connect removes its listener"
    );
}

/// Two queue pairs of this process, of `config_a` and `config_b`, connected to each other.
fn connected(config_a: &Config, config_b: &Config) -> (LoadedQueuePair, LoadedQueuePair) {
    let (opened_a, endpoint_a) = library().open(config_a).unwrap();
    let (opened_b, endpoint_b) = library().open(config_b).unwrap();
    let a = opened_a.connect(&endpoint_b, CONNECT_TIMEOUT).unwrap();
    let b = opened_b.connect(&endpoint_a, CONNECT_TIMEOUT).unwrap();
    (a, b)
}

/// Whether `qp`'s event fd becomes readable within `timeout`.
fn readable(qp: &LoadedQueuePair, timeout: Duration) -> bool {
    let mut fds = [PollFd::from_borrowed_fd(qp.event_fd(), PollFlags::IN)];
    let timeout = Timespec {
        tv_sec: timeout.as_secs() as i64,
        tv_nsec: i64::from(timeout.subsec_nanos()),
    };
    poll(&mut fds, Some(&timeout)).unwrap() == 1
}

fn a_dead_peer_is_noticed_by_sending_and_leaves_the_event_fd_quiet() {
    let temp = tempfile::tempdir().unwrap();
    provider_env(&temp, "");
    let (mut a, mut b) = connected(&CONFIG, &CONFIG);
    b.post_send(7, b"hello").unwrap();
    assert!(readable(&a, Duration::from_secs(2)), "a SEND arrives");
    let mut received = Vec::new();
    a.poll(&mut received).unwrap();
    assert_eq!(
        received,
        [Received {
            immediate: 7,
            payload: b"hello".to_vec()
        }]
    );
    // The peer's queue pair goes away. A receiver is not told (RC has no such thing); its
    // event fd wakes for the wire's end once, then stays quiet.
    drop(b);
    assert!(
        readable(&a, Duration::from_secs(2)),
        "the wire's end wakes it"
    );
    received.clear();
    a.poll(&mut received).unwrap();
    assert!(received.is_empty());
    assert!(
        !readable(&a, Duration::from_millis(50)),
        "the event fd stays readable after the peer's end"
    );
    // Sending tells.
    assert!(a.send_slots() > 0);
    a.post_send(8, b"anyone?").unwrap();
    assert!(readable(&a, Duration::from_secs(2)), "the error completion");
    let error = a.poll(&mut received).unwrap_err();
    assert!(
        error.0.contains("IBV_WC_RETRY_EXC_ERR") && error.0.contains("peer's queue pair is gone"),
        "{error}"
    );
}

fn a_message_longer_than_a_buffer_is_a_length_error() {
    let temp = tempfile::tempdir().unwrap();
    provider_env(&temp, "");
    let larger = Config {
        buffer: 2 * CONFIG.buffer,
        ..CONFIG
    };
    let (mut a, mut b) = connected(&CONFIG, &larger);
    b.post_send(1, &vec![0x5a; larger.buffer]).unwrap();
    assert!(readable(&a, Duration::from_secs(2)), "a SEND arrives");
    let error = a.poll(&mut Vec::new()).unwrap_err();
    assert!(error.0.contains("IBV_WC_LOC_LEN_ERR"), "{error}");
}

// === two processes ===

/// The gate of the network-namespace trial: how to run a process in a network namespace of
/// its own (`unshare -n` as root, `unshare -rn` with user namespaces).
fn unshare_net() -> Result<Vec<&'static str>, Ignored> {
    for command in [vec!["unshare", "-n"], vec!["unshare", "-rn"]] {
        let works = Command::new(command[0])
            .args(&command[1..])
            .arg("true")
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        if works {
            return Ok(command);
        }
    }
    Err(Ignored::new(
        "no network namespaces here: `unshare -n` and `unshare -rn` fail (root or user namespaces needed)",
    ))
}

fn network_namespace() -> String {
    std::fs::read_link("/proc/self/ns/net")
        .map(|link| link.display().to_string())
        .unwrap_or_else(|error| format!("unknown ({error})"))
}

fn endpoint_line(endpoint: &Endpoint) -> String {
    let gid: String = endpoint.gid.iter().map(|b| format!("{b:02x}")).collect();
    format!("{gid} {} {}", endpoint.qpn, endpoint.psn)
}

/// The endpoint of a line of `endpoint_line`, and what follows it.
fn parse_endpoint(line: &str) -> (Endpoint, String) {
    let mut words = line.trim().splitn(4, ' ');
    let gid_hex = words.next().unwrap();
    let mut gid = [0u8; 16];
    for (i, byte) in gid.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&gid_hex[2 * i..2 * i + 2], 16).unwrap();
    }
    let qpn = words.next().unwrap().parse().unwrap();
    let psn = words.next().unwrap().parse().unwrap();
    let rest = words.next().unwrap_or_default().to_string();
    (Endpoint { gid, qpn, psn }, rest)
}

/// This process opens a queue pair, a second process (this test binary as
/// [`peer_process`], under `unshare` when given) opens the other; each connects to the
/// other's endpoint, exchanged over the child's stdin and stdout as an upgrade would exchange
/// them. The peer echoes 2 MiB back.
fn two_processes(unshare: Option<Vec<&'static str>>) {
    let temp = tempfile::tempdir().unwrap();
    let dir = provider_env(&temp, "");
    let (opened, endpoint) = open();
    let library = testkit::library(
        "stackroute-rdma-fault-provider",
        "libstackroute_rdma_fault.so",
    );
    let exe = std::env::current_exe().unwrap();
    let mut command = match &unshare {
        Some(unshare) => {
            let mut command = Command::new(unshare[0]);
            command.args(&unshare[1..]).arg(&exe);
            command
        }
        None => Command::new(&exe),
    };
    let mut child = command
        .env(CHILD_VAR, &library)
        .env(DIR_VAR, &dir)
        .env(FAULTS_VAR, "")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child_out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    child_out.read_line(&mut line).unwrap();
    assert!(!line.is_empty(), "the peer process said nothing");
    let (peer, peer_namespace) = parse_endpoint(&line);
    assert_ne!(peer.psn, endpoint.psn, "another process");
    if unshare.is_some() {
        assert_ne!(
            peer_namespace,
            network_namespace(),
            "the peer runs in a network namespace of its own"
        );
    }
    let mut child_in = child.stdin.take().unwrap();
    writeln!(child_in, "{}", endpoint_line(&endpoint)).unwrap();
    let qp = opened.connect(&peer, CONNECT_TIMEOUT).unwrap();
    let (app, relay) = spawn(qp, CONFIG, None);
    let data = pattern(2 << 20, 7);
    let writer = send_all(app.try_clone().unwrap(), data.clone());
    let echoed = read_to_end(&mut { app });
    writer.join().unwrap().unwrap();
    assert!(
        echoed == data,
        "echoed {} bytes of {}",
        echoed.len(),
        data.len()
    );
    assert_eq!(end_within(relay, Duration::from_secs(10)), End::Closed);
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            panic!("the peer process did not end");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut last = String::new();
    child_out.read_to_string(&mut last).unwrap();
    assert!(
        status.success(),
        "the peer process: {status}, said {last:?}"
    );
    assert_eq!(last.trim(), "closed");
    assert_eq!(
        listed(&dir),
        Vec::<String>::new(),
        "the listeners' paths are gone"
    );
}

/// The peer process of [`two_processes`]: prints its endpoint and network namespace, reads
/// the other's endpoint, connects, and echoes what arrives until the other side finishes.
fn peer_process(library: &Path) -> std::process::ExitCode {
    let library = Library::load(library).unwrap();
    let (opened, endpoint) = library.open(&CONFIG).unwrap();
    println!("{} {}", endpoint_line(&endpoint), network_namespace());
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    let (peer, _) = parse_endpoint(&line);
    let qp = match opened.connect(&peer, CONNECT_TIMEOUT) {
        Ok(qp) => qp,
        Err(refusal) => {
            eprintln!("peer process: connect: {refusal:?}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let (mut app, relay) = spawn(qp, CONFIG, None);
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let n = app.read(&mut buffer).unwrap();
        if n == 0 {
            break;
        }
        app.write_all(&buffer[..n]).unwrap();
    }
    app.shutdown(Shutdown::Write).unwrap();
    match end_within(relay, Duration::from_secs(10)) {
        End::Closed => {
            println!("closed");
            std::process::ExitCode::SUCCESS
        }
        End::Failed(why) => {
            println!("failed: {why}");
            std::process::ExitCode::FAILURE
        }
    }
}
