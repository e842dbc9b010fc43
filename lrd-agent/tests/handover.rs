//! A new agent taking the socket directory over from a running one, with real processes: the
//! hand-over itself (clients calling throughout, the generation file sampled throughout), an
//! old agent that does not answer, garbage and callers without the node's secret on the
//! hand-over socket (in the state directory), `/healthz` of a stopped agent.

mod common;

use std::io::{Read as _, Write as _};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use stackroute_local_api::frame;
use stackroute_local_api::message::{Protocol, Request, Response, Stack};
use stackroute_local_api::published;

const TO_DB: &str = "10.1.0.20:5432";
const HANDOVER_SOCKET: &str = "handover.sock";

fn find_listener_request() -> Request {
    Request::FindListener {
        ip: "127.0.0.1".parse().unwrap(),
        port: 7002,
        protocol: Protocol::Tcp,
    }
}

/// Reads the generation file and the published snapshot in a loop until `stop`: the counter
/// never goes backwards, the snapshot file is always there, complete, valid, and never older
/// than the counter read before it. Returns the number of samples, or the first violation.
fn sample_generations(dir: PathBuf, stop: Arc<AtomicBool>) -> JoinHandle<Result<u64, String>> {
    std::thread::spawn(move || {
        let (mut samples, mut last) = (0u64, 0u64);
        while !stop.load(Ordering::Relaxed) {
            let bytes = std::fs::read(dir.join(published::GENERATION_FILE))
                .map_err(|e| format!("generation file: {e}"))?;
            let generation =
                published::parse_generation(&bytes).ok_or("generation file unreadable")?;
            if generation < last {
                return Err(format!("generation went from {last} back to {generation}"));
            }
            last = generation;
            let bytes = std::fs::read(dir.join(published::SNAPSHOT_FILE))
                .map_err(|e| format!("snapshot missing at generation {generation}: {e}"))?;
            let view = published::parse(&bytes).map_err(|e| format!("snapshot header: {e}"))?;
            if view.generation < generation {
                return Err(format!(
                    "snapshot of generation {} older than the counter {generation}",
                    view.generation
                ));
            }
            stackroute_snapshot::Snapshot::parse(view.snapshot)
                .map_err(|e| format!("snapshot invalid: {e}"))?;
            samples += 1;
        }
        Ok(samples)
    })
}

/// What a client calling the local API in a loop saw.
#[derive(Debug, Default)]
struct Calls {
    ok: u64,
    failed: Vec<String>,
    slowest: Duration,
}

/// Calls the agent socket in `dir` until `stop`, one request per connection like the shim and
/// the CLI, without any retry: every failure is counted.
fn keep_calling(
    dir: PathBuf,
    request: Request,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
) -> JoinHandle<Calls> {
    std::thread::spawn(move || {
        let mut calls = Calls::default();
        while !stop.load(Ordering::Relaxed) {
            let started = Instant::now();
            let reply = UnixStream::connect(dir.join(published::SOCKET_FILE))
                .map_err(|e| format!("connect: {e}"))
                .and_then(|mut stream| {
                    stream
                        .set_read_timeout(Some(Duration::from_secs(5)))
                        .unwrap();
                    frame::call::<_, _, Response>(&mut stream, &request)
                        .map_err(|e| format!("call: {e}"))
                });
            calls.slowest = calls.slowest.max(started.elapsed());
            match reply {
                Ok(Response::Decision(_)) | Ok(Response::Listener { listener: Some(_) }) => {
                    calls.ok += 1
                }
                Ok(other) => calls.failed.push(format!("{other:?}")),
                Err(error) => calls.failed.push(error),
            }
            done.fetch_add(1, Ordering::Relaxed);
        }
        calls
    })
}

/// The numeric `field` of the first log line containing `message` (colour codes removed).
fn log_field(log: &str, message: &str, field: &str) -> Option<u64> {
    let line = log.lines().find(|l| l.contains(message))?;
    let mut plain = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            chars.by_ref().find(|c| *c == 'm');
        } else {
            plain.push(c);
        }
    }
    let (_, rest) = plain.split_once(&format!(" {field}="))?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

#[test]
fn a_new_agent_takes_over_from_a_running_one_without_a_failed_call() {
    let tmp = tempfile::tempdir().unwrap();
    let state = new_state_dir(tmp.path(), "Kernel", "BBR");
    let controller = Controller::start(&state, tmp.path(), free_port());
    let mut old = Agent::start("n1", &format!("http://{}", controller.grpc), tmp.path());
    wait_for("a fresh snapshot", WAIT, || {
        old.published().filter(|p| !p.2)
    });

    // Registrations held by the old agent for this (live) process.
    let reply = old.call(&Request::RegisterWorkload {
        namespace: "shop".into(),
        name: "job-1".into(),
        labels: [("app".to_string(), "web".to_string())].into(),
        ips: vec![],
    });
    assert!(
        matches!(reply, Response::Ok { queued: false, .. }),
        "{reply:?}"
    );
    let reply = old.call(&Request::RegisterListener {
        ip: "127.0.0.1".parse().unwrap(),
        port: 7002,
        protocol: Protocol::Tcp,
        namespace: "shop".into(),
        workload: "job-1".into(),
        stacks: vec![Stack::Rdma],
        endpoints: Default::default(),
    });
    assert!(
        matches!(reply, Response::Ok { queued: false, .. }),
        "{reply:?}"
    );
    wait_for(
        "job-1 and its listener served by the old agent",
        WAIT,
        || {
            let listed = matches!(
                old.call(&find_listener_request()),
                Response::Listener { listener: Some(_) }
            );
            let decided = matches!(old.call(&lookup_db("job-1")), Response::Decision(_));
            (listed && decided).then_some(())
        },
    );
    let generation_before = old.generation();

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let sampler = sample_generations(old.socket_dir.clone(), stop.clone());
    // This process registered shop/job-1 above, so the agent answers its lookups for job-1
    // only (a caller looks up its own workload).
    let clients: Vec<_> = [
        lookup_db("job-1"),
        find_listener_request(),
        lookup_db("job-1"),
    ]
    .into_iter()
    .map(|request| keep_calling(old.socket_dir.clone(), request, stop.clone(), done.clone()))
    .collect();
    wait_for("clients calling the old agent", WAIT, || {
        (done.load(Ordering::Relaxed) > 100).then_some(())
    });

    let new = old.successor("n1-new", &[]);
    wait_for("the new agent to be ready", WAIT, || {
        http_get(new.http, "/readyz").filter(|(code, _)| *code == 200)
    });
    let (code, body) = http_get(old.http, "/readyz").unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("another agent serves"), "{body}");
    // Calls keep succeeding on the new agent.
    let after = done.load(Ordering::Relaxed);
    wait_for("clients calling the new agent", WAIT, || {
        (done.load(Ordering::Relaxed) > after + 300).then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    let calls: Vec<Calls> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let samples = sampler
        .join()
        .unwrap()
        .expect("the published files stayed consistent");
    let failed: Vec<&String> = calls.iter().flat_map(|c| &c.failed).collect();
    let slowest = calls.iter().map(|c| c.slowest).max().unwrap();
    let total: u64 = calls.iter().map(|c| c.ok).sum();
    let handed_ms = log_field(
        &old.proc.log_text(),
        "handed the socket directory over",
        "elapsed_ms",
    );
    eprintln!(
        "hand-over: {total} calls ok, {} failed, slowest call {slowest:?}, {samples} generation samples, the old agent took {handed_ms:?} ms from request to confirmation",
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "failed calls during the hand-over: {failed:?}"
    );
    assert!(samples > 10, "{samples} samples");

    let old_log = old.proc.log_text();
    let new_log = new.proc.log_text();
    assert!(
        old_log.contains("handed the socket directory over"),
        "{old_log}"
    );
    assert!(
        new_log.contains("took the socket directory over from the running agent"),
        "{new_log}"
    );
    assert!(
        new_log.contains("serving the snapshot handed over"),
        "{new_log}"
    );
    assert!(
        !new_log.contains("hand-over from the running agent failed"),
        "{new_log}"
    );
    // The old agent waits for SIGTERM without serving; the new one holds the registrations
    // and serves the generation the old one handed over (nothing was republished).
    assert!(old.proc.alive());
    let handed = log_field(&old_log, "handed the socket directory over", "generation").unwrap();
    let adopted = log_field(&new_log, "serving the snapshot handed over", "generation").unwrap();
    assert_eq!(adopted, handed);
    assert!(handed >= generation_before);
    match new.call(&find_listener_request()) {
        Response::Listener {
            listener: Some(listener),
        } => {
            assert_eq!(
                (listener.workload.as_str(), listener.stacks.as_slice()),
                ("job-1", &[Stack::Kernel, Stack::Rdma][..])
            )
        }
        other => panic!("{other:?}"),
    }
    let held = std::fs::read_to_string(new.state_dir.join("registrations.json")).unwrap();
    assert!(held.contains("job-1") && held.contains("7002"), "{held}");

    // The new agent has the controller session: a policy change reaches it at the next
    // generation, and the old agent publishes nothing more.
    let published_by_old = old.proc.log_text().matches("published snapshot").count();
    write_state(&state, "Kernel", "Reno");
    wait_for("shop/web-1: Kernel/Reno via the new agent", WAIT, || {
        explain_agent(&new.socket_dir, "shop/web-1", TO_DB)
            .filter(|e| transport(e) == "Kernel/Reno")
    });
    assert!(new.generation() > handed);
    assert_eq!(
        old.proc.log_text().matches("published snapshot").count(),
        published_by_old
    );

    old.proc.signal("TERM");
    let status = old
        .proc
        .wait_exit(WAIT)
        .expect("the old agent exits on SIGTERM");
    assert!(status.success(), "{status:?}");
    // The socket stays served by the new agent.
    assert!(matches!(
        new.call(&lookup_db("job-1")),
        Response::Decision(_)
    ));
    drop(controller);
}

#[test]
fn a_stopped_agent_is_taken_over_after_the_timeout_and_stops_when_it_wakes() {
    let tmp = tempfile::tempdir().unwrap();
    let state = new_state_dir(tmp.path(), "Kernel", "BBR");
    let controller = Controller::start(&state, tmp.path(), free_port());
    let mut old = Agent::start_with(
        "n1",
        &format!("http://{}", controller.grpc),
        tmp.path(),
        &["--exit-after-handover"],
    );
    wait_for("a fresh snapshot", WAIT, || {
        old.published().filter(|p| !p.2)
    });
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_generations(old.socket_dir.clone(), stop.clone());

    old.proc.signal("STOP");
    let started = Instant::now();
    let new = old.successor("n1-new", &["--handover-timeout-ms", "1500"]);
    wait_for("the new agent to be ready", WAIT, || {
        http_get(new.http, "/readyz").filter(|(code, _)| *code == 200)
    });
    assert!(started.elapsed() >= Duration::from_millis(1500));
    let log = new.proc.log_text();
    assert!(
        log.contains("hand-over from the running agent failed"),
        "{log}"
    );
    assert!(
        log.contains("the running agent did not answer in time"),
        "{log}"
    );
    assert!(matches!(
        new.call(&lookup_db("web-1")),
        Response::Decision(_)
    ));

    // The old agent wakes up to a directory that is no longer its own: it stops (and, with
    // --exit-after-handover, exits 0) without publishing anything.
    old.proc.signal("CONT");
    let status = old
        .proc
        .wait_exit(WAIT)
        .expect("the old agent stops once it wakes");
    assert!(status.success(), "{status:?}");
    let log = old.proc.log_text();
    assert!(log.contains("took this socket directory over"), "{log}");
    // The new agent still serves, and publishes above everything seen so far.
    write_state(&state, "Kernel", "Reno");
    wait_for("shop/web-1: Kernel/Reno via the new agent", WAIT, || {
        explain_agent(&new.socket_dir, "shop/web-1", TO_DB)
            .filter(|e| transport(e) == "Kernel/Reno")
    });
    stop.store(true, Ordering::Relaxed);
    sampler
        .join()
        .unwrap()
        .expect("the published files stayed consistent");
    drop(controller);
}

/// One frame of the hand-over protocol, as JSON.
fn read_handover_frame(stream: &mut UnixStream) -> Option<Value> {
    let mut header = [0; 4];
    stream.read_exact(&mut header).ok()?;
    let mut body = vec![0; u32::from_le_bytes(header) as usize];
    stream.read_exact(&mut body).ok()?;
    serde_json::from_slice(&body).ok()
}

#[test]
fn a_running_agent_refuses_garbage_and_strangers_and_keeps_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let (controller, agent) = controller_and_agent(tmp.path());
    let path = agent.state_dir.join(HANDOVER_SOCKET);
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);

    let secret = handover_secret(&agent.state_dir);
    let valid_request = handover_request_json("n1", &agent.state_dir);
    let wrong_secret = format!(
        r#"{{"kind":"request","version":2,"node":"n1","secret":"{}"}}"#,
        "ab".repeat(32)
    );
    let cases: [(&str, Vec<u8>, &str); 7] = [
        (
            "HTTP",
            b"GET / HTTP/1.0\r\n\r\n".to_vec(),
            "more than the limit",
        ),
        (
            "bad JSON",
            handover_frame("{not json"),
            "malformed hand-over message",
        ),
        (
            "wrong kind",
            handover_frame(r#"{"kind":"taken"}"#),
            "expected a hand-over request",
        ),
        (
            "previous protocol version",
            handover_frame(r#"{"kind":"request","version":1,"node":"n1"}"#),
            "version 1 is not supported",
        ),
        (
            "no secret",
            handover_frame(r#"{"kind":"request","version":2,"node":"n1"}"#),
            "carries no hand-over secret",
        ),
        (
            "wrong secret",
            handover_frame(&wrong_secret),
            "secret does not match",
        ),
        (
            "wrong node, with the secret",
            handover_frame(&format!(
                r#"{{"kind":"request","version":2,"node":"n2","secret":"{secret}"}}"#
            )),
            "requester serves node \"n2\"",
        ),
    ];
    for (what, bytes, expected) in cases {
        let mut stream = UnixStream::connect(&path).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        stream.write_all(&bytes).unwrap();
        let reply = read_handover_frame(&mut stream).unwrap_or_else(|| panic!("{what}: no reply"));
        assert_eq!(reply["kind"], "refused", "{what}: {reply}");
        let message = reply["message"].as_str().unwrap();
        assert!(message.contains(expected), "{what}: {message}");
    }
    // Silent, and cut off half-way: refused on its timeout, or dropped; no reply to wait for.
    let mut silent = UnixStream::connect(&path).unwrap();
    silent.set_read_timeout(Some(WAIT)).unwrap();
    let reply = read_handover_frame(&mut silent).expect("a refusal after the request timeout");
    assert!(
        reply["message"]
            .as_str()
            .unwrap()
            .contains("did not answer in time"),
        "{reply}"
    );
    let mut cut = UnixStream::connect(&path).unwrap();
    cut.write_all(&handover_frame(&valid_request)[..10])
        .unwrap();
    drop(cut);

    // Still serving, still ready, and every refusal is in the log.
    wait_for("the cut-off request to be refused", WAIT, || {
        agent
            .proc
            .log_text()
            .contains("in the middle of a message")
            .then_some(())
    });
    assert!(matches!(
        agent.call(&lookup_db("web-1")),
        Response::Decision(_)
    ));
    assert_eq!(http_get(agent.http, "/readyz").unwrap().0, 200);
    let log = agent.proc.log_text();
    assert_eq!(
        log.matches("refused a hand-over request; still serving")
            .count(),
        9,
        "{log}"
    );
    assert!(!log.contains(&secret), "the secret is never logged");
    // …and counted by reason.
    let metrics = agent.metrics();
    for (reason, count) in [
        ("malformed", 4),
        ("kind", 1),
        ("version", 1),
        ("missing-secret", 1),
        ("wrong-secret", 1),
        ("node", 1),
    ] {
        let line = format!("stackroute_lrd_handover_refused_total{{reason=\"{reason}\"}} {count}");
        assert!(metrics.contains(&line), "{line} in\n{metrics}");
    }
    assert_eq!(http_get(agent.http, "/healthz").unwrap().0, 200);
    drop(controller);
}

#[test]
fn the_hand_over_socket_and_secret_live_in_the_state_directory_only() {
    use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
    let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o7777;
    let tmp = tempfile::tempdir().unwrap();
    let dead_controller = format!("127.0.0.1:{}", free_port());
    // What an agent of the previous release leaves: a hand-over socket in the socket
    // directory, and a state directory as the kubelet creates a hostPath (0755).
    let socket_dir = tmp.path().join("n1-run");
    let state_dir = tmp.path().join("n1-state");
    std::fs::create_dir_all(&socket_dir).unwrap();
    std::fs::create_dir_all(&state_dir).unwrap();
    std::fs::set_permissions(&state_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    drop(UnixListener::bind(socket_dir.join(HANDOVER_SOCKET)).unwrap());

    let mut agent = Agent::start_in_place("n1", &dead_controller, tmp.path(), &[]);
    assert_eq!(agent.socket_dir, socket_dir);
    assert!(
        !socket_dir.join(HANDOVER_SOCKET).exists(),
        "the socket directory (mounted into pods) has no hand-over socket"
    );
    assert_eq!(mode(&state_dir), 0o700);
    let socket = state_dir.join(HANDOVER_SOCKET);
    let meta = std::fs::symlink_metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(mode(&socket), 0o600);
    let key = state_dir.join("handover.key");
    assert_eq!(mode(&key), 0o600);
    let secret = handover_secret(&state_dir);
    let log = agent.proc.log_text();
    assert!(
        log.contains("removed the hand-over socket an agent of an earlier release left"),
        "{log}"
    );
    assert!(!log.contains(&secret), "{log}");
    // The key is the node's: a restarted agent keeps it.
    agent.restart();
    assert_eq!(handover_secret(&state_dir), secret);
    assert!(!socket_dir.join(HANDOVER_SOCKET).exists());

    // A state directory inside the socket directory is refused outright (before any
    // controller is dialled; the variable only satisfies the controller-security flags).
    let output = output_within({
        let mut command = std::process::Command::new(bin("stackroute-lrd"));
        command
            .env("STACKROUTE_INSECURE_PLAINTEXT", "true")
            .args(["--controller", &dead_controller, "--node", "n9"])
            .arg("--socket-dir")
            .arg(tmp.path().join("n9-run"))
            .arg("--state-dir")
            .arg(tmp.path().join("n9-run/state"));
        command
    });
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("is inside --socket-dir"), "{stderr}");
}

#[test]
fn a_stopped_agent_fails_healthz_after_the_grace_period() {
    let tmp = tempfile::tempdir().unwrap();
    let state = new_state_dir(tmp.path(), "Kernel", "BBR");
    let controller = Controller::start(&state, tmp.path(), free_port());
    let grace = Duration::from_millis(2000);
    let old = Agent::start_with(
        "n1",
        &format!("http://{}", controller.grpc),
        tmp.path(),
        &["--healthz-stopped-grace-ms", &grace.as_millis().to_string()],
    );
    wait_for("a fresh snapshot", WAIT, || {
        old.published().filter(|p| !p.2)
    });
    assert_eq!(
        http_get(old.http, "/healthz").unwrap(),
        (200, "ok\n".into())
    );

    let new = old.successor("n1-new", &[]);
    wait_for("the old agent to stop", WAIT, || {
        http_get(old.http, "/readyz").filter(|(code, _)| *code == 503)
    });
    let stopped = Instant::now();
    // Within the grace: still alive (a rollout deletes the old pod in that time).
    let (code, body) = http_get(old.http, "/healthz").unwrap();
    if stopped.elapsed() < grace / 2 {
        assert_eq!(code, 200, "{body}");
    }
    let (code, body) = wait_for("/healthz to fail", WAIT, || {
        http_get(old.http, "/healthz").filter(|(code, _)| *code != 200)
    });
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("stopped serving"), "{body}");
    assert!(body.contains("restart this agent"), "{body}");
    assert_eq!(body.lines().count(), 1, "{body}");
    assert!(
        stopped.elapsed() + Duration::from_millis(100) >= grace / 2,
        "failed after {:?}",
        stopped.elapsed()
    );
    // The agent that serves is healthy.
    assert_eq!(http_get(new.http, "/healthz").unwrap().0, 200);
    assert_eq!(http_get(new.http, "/readyz").unwrap().0, 200);
    drop(controller);
}

/// A fake "running agent": a listening `agent.sock` in `dir` that never accepts and a
/// `handover.sock` in `state_dir` that answers the first request with `answer`.
fn fake_running_agent(
    dir: &Path,
    state_dir: &Path,
    answer: Vec<u8>,
) -> (UnixListener, JoinHandle<()>) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::create_dir_all(state_dir).unwrap();
    let _ = std::fs::remove_file(dir.join(published::SOCKET_FILE));
    let _ = std::fs::remove_file(state_dir.join(HANDOVER_SOCKET));
    let agent_socket = UnixListener::bind(dir.join(published::SOCKET_FILE)).unwrap();
    let handover = UnixListener::bind(state_dir.join(HANDOVER_SOCKET)).unwrap();
    let server = std::thread::spawn(move || {
        let (mut stream, _) = handover.accept().unwrap();
        let mut header = [0; 4];
        stream.read_exact(&mut header).unwrap();
        let mut body = vec![0; u32::from_le_bytes(header) as usize];
        stream.read_exact(&mut body).unwrap();
        let _ = stream.write_all(&answer);
        // Then it hangs up (or, for the silent case, the test's timeout has passed).
    });
    (agent_socket, server)
}

#[test]
fn a_new_agent_starts_when_the_running_one_answers_garbage_or_dies_mid_hand_over() {
    let tmp = tempfile::tempdir().unwrap();
    let dead_controller = format!("127.0.0.1:{}", free_port());
    let node_state = r#""version":2,"node":"n1","generation":3,"registrations":{"listeners":[],"workloads":[],"removals":[]},"clusterListeners":[]"#;
    let cases: [(&str, Vec<u8>, &str); 5] = [
        (
            "garbage",
            b"\xde\xad\xbe\xef garbage garbage".to_vec(),
            "the running agent sent garbage",
        ),
        (
            "bad JSON",
            handover_frame("[1, 2"),
            "malformed hand-over message",
        ),
        (
            "no socket",
            handover_frame(&format!(r#"{{"kind":"state",{node_state}}}"#)),
            "got 0 descriptors",
        ),
        (
            "refusal",
            handover_frame(r#"{"kind":"refused","message":"not today"}"#),
            "refused: not today",
        ),
        (
            "dies mid-way",
            handover_frame(r#"{"kind":"state","version":2}"#)[..12].to_vec(),
            "in the middle of a message",
        ),
    ];
    for (i, (what, answer, expected)) in cases.into_iter().enumerate() {
        let root = tmp.path().join(format!("case-{i}"));
        let (fake_socket, fake) =
            fake_running_agent(&root.join("n1-run"), &root.join("n1-state"), answer);
        // Returns once the new agent serves its socket and /healthz.
        let agent = Agent::start_in_place(
            "n1",
            &dead_controller,
            &root,
            &["--handover-timeout-ms", "3000"],
        );
        fake.join().unwrap();
        let log = agent.proc.log_text();
        assert!(
            log.contains("hand-over from the running agent failed"),
            "{what}: {log}"
        );
        assert!(
            log.contains(expected),
            "{what}: expected {expected:?} in {log}"
        );
        // It serves the local API (no snapshot yet: no controller), on a socket of its own.
        match agent.call(&lookup_db("web-1")) {
            Response::Error { message } => {
                assert!(message.contains("no snapshot"), "{what}: {message}")
            }
            other => panic!("{what}: {other:?}"),
        }
        drop(fake_socket);
        assert!(matches!(
            agent.call(&lookup_db("web-1")),
            Response::Error { .. }
        ));
    }
}
