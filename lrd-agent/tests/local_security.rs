//! The local API bound to its callers, with real processes: the controller, an agent, this test
//! and helper processes (this binary started again in a helper role, some inside network
//! namespaces made with `ip netns`).
//!
//! - A caller looks up, and registers listeners for, only its own workload; a standalone
//!   workload held by another live process cannot be taken; Kubernetes mode binds a caller to
//!   the pod whose address its network namespace holds and refuses `registerWorkload`.
//! - Wildcard listeners are kept per pod (network namespace): two pods on one port both stay
//!   registered, neither removes the other's, `findListener` answers each pod's address with
//!   that pod.
//! - Idle connections are closed; a flood of idle connections from one caller leaves the others
//!   served; quotas refuse with an error naming the quota.
//! - An invalid registration is refused at once with the shared validator's message (the agent
//!   and the controller use the same one, so nothing the agent holds can be refused on
//!   re-send), and the node keeps receiving snapshots.
//!
//! Trials that need network namespaces need root: without it they show as ignored with the
//! reason (and fail under `STACKROUTE_REQUIRE_NETNS=1`). Every namespace is deleted by name
//! and every process killed by PID when its guard drops.

mod common;

use std::io::Read as _;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use common::netns::{Helper, Netns, answer_requests, helper_role};
use common::*;
use serde_json::Value;
use stackroute_local_api::frame;
use stackroute_local_api::message::{FallbackReason, Protocol, Request, Response};
use testkit::{Ignored, Trial};

/// One node with three pods on documentation addresses (TEST-NET-1): a and b (app=web) and
/// db. No traffic is ever sent to them: the network-namespace trials only assign them.
const POD_CLUSTER: &str = r#"apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Node, metadata: {name: n1, labels: {topology.kubernetes.io/zone: z1}}, status: {addresses: [{type: InternalIP, address: 198.51.100.1}]}}
- {apiVersion: v1, kind: Namespace, metadata: {name: shop}}
- {apiVersion: v1, kind: Pod, metadata: {name: a, namespace: shop, labels: {app: web}}, spec: {nodeName: n1, containers: []}, status: {podIP: 192.0.2.11}}
- {apiVersion: v1, kind: Pod, metadata: {name: b, namespace: shop, labels: {app: web}}, spec: {nodeName: n1, containers: []}, status: {podIP: 192.0.2.12}}
- {apiVersion: v1, kind: Pod, metadata: {name: db, namespace: shop, labels: {app: db}}, spec: {nodeName: n1, containers: []}, status: {podIP: 192.0.2.20}}
"#;

fn main() -> ExitCode {
    if let Some((role, socket)) = helper_role() {
        return helper(&role, &socket);
    }
    testkit::run(vec![
        Trial::test(
            "forged_lookups_and_listeners_for_another_workload_are_refused",
            forged_lookups_and_listeners_for_another_workload_are_refused,
        ),
        Trial::test(
            "idle_connections_are_closed_and_busy_ones_kept",
            idle_connections_are_closed_and_busy_ones_kept,
        ),
        Trial::test(
            "quotas_are_enforced_with_an_error_naming_the_quota",
            quotas_are_enforced_with_an_error_naming_the_quota,
        ),
        Trial::test(
            "an_invalid_registration_is_refused_at_once_and_snapshots_keep_coming",
            an_invalid_registration_is_refused_at_once_and_snapshots_keep_coming,
        ),
        Trial::test(
            "a_held_registration_the_controller_refuses_on_resend_is_dropped",
            a_held_registration_the_controller_refuses_on_resend_is_dropped,
        ),
        Trial::gated(
            "kubernetes_mode_binds_callers_to_their_pod_and_keeps_wildcards_per_pod",
            netns_gate,
            |()| kubernetes_mode_binds_callers_to_their_pod_and_keeps_wildcards_per_pod(),
        ),
        Trial::gated(
            "standalone_workloads_in_two_namespaces_keep_their_names_and_listeners",
            netns_gate,
            |()| standalone_workloads_in_two_namespaces_keep_their_names_and_listeners(),
        ),
        Trial::gated(
            "an_idle_connection_flood_does_not_lock_out_other_callers",
            netns_gate,
            |()| an_idle_connection_flood_does_not_lock_out_other_callers(),
        ),
    ])
}

// === helpers: processes, namespaces, replies ===

/// Root and `ip` for network namespaces; otherwise ignored with the reason (a failure under
/// `STACKROUTE_REQUIRE_NETNS=1`).
fn netns_gate() -> Result<(), Ignored> {
    netns::netns_gate(&["ip"], "needs `ip` (iproute2)")
}

/// The helper side: `client` answers one request per stdin line (each on a new connection),
/// one reply per stdout line; `flood:N` opens N connections and keeps them idle, reporting
/// how many the agent closed.
fn helper(role: &str, socket: &Path) -> ExitCode {
    if role == "client" {
        answer_requests(socket, Duration::from_secs(5));
        return ExitCode::SUCCESS;
    }
    let count: usize = role
        .strip_prefix("flood:")
        .and_then(|n| n.parse().ok())
        .expect("flood:N");
    let streams: Vec<_> = (0..count)
        .filter_map(|_| std::os::unix::net::UnixStream::connect(socket).ok())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let (mut open, mut refused, mut message) = (0, 0, String::new());
    for mut stream in streams.iter() {
        stream.set_nonblocking(true).unwrap();
        let mut buffer = [0; 4096];
        match stream.read(&mut buffer) {
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => open += 1,
            Ok(n) if n > frame::HEADER_LEN => {
                refused += 1;
                if let Ok(Response::Error { message: m }) =
                    frame::decode::<Response>(&buffer[frame::HEADER_LEN..n])
                {
                    message = m;
                }
            }
            _ => refused += 1,
        }
    }
    println!(
        "{}",
        serde_json::json!({"connected": streams.len(), "open": open, "refused": refused, "message": message})
    );
    // Keep the open ones until the test is done with us.
    let _ = std::io::stdin().lines().count();
    drop(streams);
    ExitCode::SUCCESS
}

/// A controller on `cluster` (and the Kernel/BBR web policy) and one agent `n1` with
/// `agent_args`, returned once the agent has published a fresh snapshot.
fn start(root: &Path, cluster: &str, agent_args: &[&str]) -> (Controller, Agent) {
    let state = root.join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::write(state.join("cluster.yaml"), cluster).unwrap();
    std::fs::write(state.join("policy.yaml"), policy("Kernel", "BBR")).unwrap();
    let controller = Controller::start(&state, root, free_port());
    let agent = Agent::start_with(
        "n1",
        &format!("http://{}", controller.grpc),
        root,
        agent_args,
    );
    wait_for("a fresh snapshot", WAIT, || {
        agent.published().filter(|p| !p.2)
    });
    (controller, agent)
}

fn lookup(namespace: &str, workload: &str, to: &str) -> Request {
    Request::Lookup {
        namespace: namespace.into(),
        workload: workload.into(),
        ip: to.parse().unwrap(),
        port: 5432,
        protocol: Protocol::Tcp,
    }
}

fn listener(ip: &str, port: u16, namespace: &str, workload: &str) -> Request {
    Request::RegisterListener {
        ip: ip.parse().unwrap(),
        port,
        protocol: Protocol::Tcp,
        namespace: namespace.into(),
        workload: workload.into(),
        stacks: vec![],
        endpoints: Default::default(),
    }
}

fn remove(ip: &str, port: u16) -> Request {
    Request::RemoveListener {
        ip: ip.parse().unwrap(),
        port,
        protocol: Protocol::Tcp,
    }
}

fn workload(namespace: &str, name: &str, ips: &[&str]) -> Request {
    Request::RegisterWorkload {
        namespace: namespace.into(),
        name: name.into(),
        labels: Default::default(),
        ips: ips.iter().map(|ip| ip.parse().unwrap()).collect(),
    }
}

fn find(ip: &str, port: u16) -> Request {
    Request::FindListener {
        ip: ip.parse().unwrap(),
        port,
        protocol: Protocol::Tcp,
    }
}

/// The message of an error reply that starts with `denied:`.
#[track_caller]
fn denied(reply: Response) -> String {
    match reply {
        Response::Error { message } if message.starts_with("denied:") => message,
        other => panic!("expected a denial, got {other:?}"),
    }
}

/// The message of an error reply.
#[track_caller]
fn error(reply: Response) -> String {
    match reply {
        Response::Error { message } => message,
        other => panic!("expected an error, got {other:?}"),
    }
}

#[track_caller]
fn accepted(reply: Response) {
    assert!(matches!(reply, Response::Ok { .. }), "{reply:?}");
}

#[track_caller]
fn decided(reply: Response) {
    assert!(matches!(reply, Response::Decision(_)), "{reply:?}");
}

/// `(namespace/workload, ip)` of the listener the agent finds at `ip:port`, if any.
fn found(agent: &Agent, ip: &str, port: u16) -> Option<(String, String)> {
    match agent.call(&find(ip, port)) {
        Response::Listener { listener } => {
            listener.map(|l| (format!("{}/{}", l.namespace, l.workload), l.ip))
        }
        other => panic!("{other:?}"),
    }
}

/// `STATE/registrations.json` once it contains `needle` (it is written by the agent's writer
/// thread, shortly after a change).
fn held_file(agent: &Agent, needle: &str) -> String {
    wait_for(&format!("{needle} in registrations.json"), WAIT, || {
        std::fs::read_to_string(agent.state_dir.join("registrations.json"))
            .ok()
            .filter(|held| held.contains(needle))
    })
}

fn metric(agent: &Agent, line_start: &str) -> u64 {
    let metrics = agent.metrics();
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(line_start))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

// === trials ===

fn forged_lookups_and_listeners_for_another_workload_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (_controller, agent) = start(tmp.path(), POD_CLUSTER, &[]);
    const TO_DB: &str = "192.0.2.20";

    // Unidentified (standalone: no registration in its ancestry), this process may look up
    // anything: `stackroute explain --agent` reads the same answers from the published file.
    decided(agent.call(&lookup("shop", "b", TO_DB)));

    // Once it declares itself shop/a (labels and address come from the cluster's Pod), it is
    // a and nothing else.
    accepted(agent.call(&workload("shop", "a", &[])));
    decided(agent.call(&lookup("shop", "a", TO_DB)));
    let message = denied(agent.call(&lookup("shop", "b", TO_DB)));
    assert!(
        message.contains("the caller is shop/a (registered by the caller's own process")
            && message.contains("not shop/b"),
        "{message}"
    );
    let message = denied(agent.call(&listener("127.0.0.1", 7101, "shop", "b")));
    assert!(
        message.contains("shop/a") && message.contains("not shop/b"),
        "{message}"
    );
    accepted(agent.call(&listener("127.0.0.1", 7101, "shop", "a")));

    // A child process is what its parent registered (`stackroute run` starts programs so).
    let mut child = Helper::start("client", &agent.socket_dir, None, None);
    let message = denied(child.call(&lookup("shop", "b", TO_DB)));
    assert!(
        message.contains(&format!("ancestor process, pid {}", std::process::id())),
        "{message}"
    );
    decided(child.call(&lookup("shop", "a", TO_DB)));

    // The child declares itself job-9 and registers a listener: this process can take
    // neither the name nor the listener while the child lives.
    accepted(child.call(&workload("shop", "job-9", &[])));
    accepted(child.call(&listener("127.0.0.1", 7102, "shop", "job-9")));
    let message = denied(agent.call(&workload("shop", "job-9", &[])));
    assert!(
        message.contains(&format!("another live process (pid {})", child.pid)),
        "{message}"
    );
    let message = denied(agent.call(&remove("127.0.0.1", 7102)));
    assert!(
        message.contains(&format!("pid {}", child.pid)) && message.contains("only its owner"),
        "{message}"
    );
    let message = denied(agent.call(&listener("127.0.0.1", 7102, "shop", "a")));
    assert!(message.contains("only its owner"), "{message}");
    // Its owner removes it.
    accepted(child.call(&remove("127.0.0.1", 7102)));

    // Once the child has exited, the sweep withdraws its name, and it can be taken.
    drop(child);
    wait_for("job-9 to be free after its owner exited", WAIT, || {
        matches!(
            agent.call(&workload("shop", "job-9", &[])),
            Response::Ok { .. }
        )
        .then_some(())
    });
    assert!(
        metric(
            &agent,
            r#"stackroute_lrd_local_requests_total{kind="lookup",result="denied"} "#
        ) >= 2
    );
}

fn idle_connections_are_closed_and_busy_ones_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let agent = Agent::start_with(
        "n1",
        &format!("127.0.0.1:{}", free_port()),
        tmp.path(),
        &["--local-idle-timeout-ms", "700"],
    );
    let report = Request::FallbackReport {
        reason: FallbackReason::Other,
        count: 1,
    };
    let mut idle = connect(&agent.socket_dir);
    let mut busy = connect(&agent.socket_dir);
    // A connection that keeps sending is kept past the timeout…
    let started = Instant::now();
    let mut last_reply = Instant::now();
    while started.elapsed() < Duration::from_millis(2000) {
        let reply: Response = frame::call(&mut busy, &report).expect("the busy connection is kept");
        last_reply = Instant::now();
        accepted(reply);
        std::thread::sleep(Duration::from_millis(250));
    }
    // …one that sent nothing was closed after the idle timeout.
    let mut rest = Vec::new();
    assert_eq!(idle.read_to_end(&mut rest).unwrap(), 0, "closed, no reply");
    // The busy one, once quiet, is closed too: not sooner than the timeout after its last
    // reply, and well within a few timeouts.
    assert_eq!(busy.read_to_end(&mut rest).unwrap(), 0);
    let closed_after = last_reply.elapsed();
    assert!(
        closed_after >= Duration::from_millis(650) && closed_after < Duration::from_secs(4),
        "{closed_after:?}"
    );
    assert!(
        agent
            .proc
            .log_text()
            .contains("idle local connection; closing")
    );
}

fn quotas_are_enforced_with_an_error_naming_the_quota() {
    let tmp = tempfile::tempdir().unwrap();
    // No controller: registrations are held (queued); quotas are the agent's own.
    let agent = Agent::start_with(
        "n1",
        &format!("127.0.0.1:{}", free_port()),
        tmp.path(),
        &[
            "--max-listeners-per-pod",
            "3",
            "--max-listeners-per-node",
            "4",
            "--max-workloads-per-pod",
            "2",
            "--max-registration-bytes-per-pod",
            "3000",
        ],
    );
    // Bytes: one listener with 3 KiB of endpoints.
    let big = Request::RegisterListener {
        ip: "127.0.0.1".parse().unwrap(),
        port: 7300,
        protocol: Protocol::Tcp,
        namespace: "shop".into(),
        workload: "web-1".into(),
        stacks: vec![],
        endpoints: ["Kernel", "Userspace", "RDMA"]
            .iter()
            .map(|stack| (stack.to_string(), "x".repeat(1000)))
            .collect(),
    };
    let message = denied(agent.call(&big));
    assert!(
        message.contains("quota exceeded: registration bytes per pod is 3000")
            && message.contains("--max-registration-bytes-per-pod"),
        "{message}"
    );
    // Listeners per pod (here: this process's uid, network namespace and cgroup).
    for port in 7301..=7303 {
        accepted(agent.call(&listener("127.0.0.1", port, "shop", "web-1")));
    }
    let message = denied(agent.call(&listener("127.0.0.1", 7304, "shop", "web-1")));
    assert!(
        message.contains("quota exceeded: listeners per pod is 3")
            && message.contains("--max-listeners-per-pod"),
        "{message}"
    );
    // Replacing one of its own is not an addition; removing one makes room.
    accepted(agent.call(&listener("127.0.0.1", 7301, "shop", "web-1")));
    accepted(agent.call(&remove("127.0.0.1", 7303)));
    accepted(agent.call(&listener("127.0.0.1", 7304, "shop", "web-1")));
    // Listeners per node: another workload (a child process that declared itself) gets one
    // more, then the node is full.
    let mut other = Helper::start("client", &agent.socket_dir, None, None);
    accepted(other.call(&workload("shop", "h", &[])));
    accepted(other.call(&listener("127.0.0.1", 7305, "shop", "h")));
    let message = denied(other.call(&listener("127.0.0.1", 7306, "shop", "h")));
    assert!(
        message.contains("quota exceeded: listeners per node is 4")
            && message.contains("--max-listeners-per-node"),
        "{message}"
    );
    // Workloads per pod.
    accepted(other.call(&workload("shop", "h2", &[])));
    let message = denied(other.call(&workload("shop", "h3", &[])));
    assert!(
        message.contains("quota exceeded: workloads per pod is 2")
            && message.contains("--max-workloads-per-pod"),
        "{message}"
    );
    assert_eq!(
        metric(
            &agent,
            r#"stackroute_lrd_local_requests_total{kind="register-listener",result="denied"} "#
        ),
        3
    );
    // Nothing refused was held.
    let held = held_file(&agent, "7305");
    assert!(!held.contains("7306") && !held.contains("\"h3\""), "{held}");
}

fn an_invalid_registration_is_refused_at_once_and_snapshots_keep_coming() {
    // The agent checks registrations with the controller's own validator
    // (`stackroute_proto::validate`), so no registration it holds can be refused when it is
    // re-sent: what used to be a poison pill (E1) is refused at the agent, at once.
    let tmp = tempfile::tempdir().unwrap();
    let state = new_state_dir(tmp.path(), "Kernel", "BBR");
    let port = free_port();
    let agent = Agent::start("n1", &format!("http://127.0.0.1:{port}"), tmp.path());
    let message = error(agent.call(&listener("0.0.0.0", 8080, "shop", "a b")));
    assert!(message.contains("contains ' '"), "{message}");
    let message = error(agent.call(&Request::RegisterWorkload {
        namespace: "shop".into(),
        name: "job-1".into(),
        labels: [("app".to_string(), "x".repeat(100))].into(),
        ips: vec![],
    }));
    assert!(message.contains("values at most 63"), "{message}");
    // A valid one is held for the controller.
    assert_eq!(
        agent.call(&listener("127.0.0.1", 7401, "shop", "web-1")),
        Response::Ok {
            revision: None,
            queued: true
        }
    );
    let held = held_file(&agent, "7401");
    assert!(!held.contains("a b") && !held.contains("xxxx"), "{held}");

    // The controller comes: the held listener is delivered, the node gets its snapshots, and
    // keeps getting them.
    let _controller = Controller::start(&state, tmp.path(), port);
    let (_, first, _, _) = wait_for("a fresh snapshot", WAIT, || {
        agent.published().filter(|p| !p.2)
    });
    let url = format!("http://127.0.0.1:{port}");
    wait_for("the held listener at the controller", WAIT, || {
        let output = cli(&["status", "--controller", &url, "--output", "json"], &[]);
        let status: Value = serde_json::from_slice(&output.stdout).ok()?;
        (status["listeners"] == 1).then_some(())
    });
    write_state(&state, "Kernel", "Reno");
    wait_for("a later revision", WAIT, || {
        agent.published().filter(|p| !p.2 && p.1 > first)
    });
    assert_eq!(
        metric(&agent, "stackroute_lrd_registrations_dropped_total "),
        0
    );
    let log = agent.proc.log_text();
    assert!(!log.contains("controller session failed: "), "{log}");
}

fn a_held_registration_the_controller_refuses_on_resend_is_dropped() {
    // What the controller refuses and the agent accepts: the controller's per-node quota (2
    // listeners here; the agent's own quotas are larger). Three listeners are held while no
    // controller is reachable; when one comes, it takes two and refuses the third on re-send.
    // That one is dropped (logged and counted), and the session goes on: the node gets its
    // snapshots, and later ones.
    let tmp = tempfile::tempdir().unwrap();
    let state = new_state_dir(tmp.path(), "Kernel", "BBR");
    let port = free_port();
    let agent = Agent::start("n1", &format!("http://127.0.0.1:{port}"), tmp.path());
    for port in 7501..=7503 {
        assert_eq!(
            agent.call(&listener("127.0.0.1", port, "shop", "web-1")),
            Response::Ok {
                revision: None,
                queued: true
            }
        );
    }
    held_file(&agent, "7503");
    let _controller =
        Controller::start_with(&state, tmp.path(), port, &["--max-listeners-per-node", "2"]);
    let deadline = Instant::now() + WAIT;
    let first = loop {
        if let Some((_, revision, false, _)) = agent.published() {
            break revision;
        }
        assert!(
            Instant::now() < deadline,
            "no fresh snapshot: the node is stuck on the refused registration:\n{}",
            agent.proc.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    wait_for("the refused registration dropped", WAIT, || {
        (metric(&agent, "stackroute_lrd_registrations_dropped_total ") == 1).then_some(())
    });
    let url = format!("http://127.0.0.1:{port}");
    wait_for("two listeners at the controller", WAIT, || {
        let output = cli(&["status", "--controller", &url, "--output", "json"], &[]);
        let status: Value = serde_json::from_slice(&output.stdout).ok()?;
        (status["listeners"] == 2).then_some(())
    });
    write_state(&state, "Kernel", "Reno");
    wait_for("a later revision", WAIT, || {
        agent.published().filter(|p| !p.2 && p.1 > first)
    });
    let log = agent.proc.log_text();
    assert!(
        log.contains("the controller refused a held registration; dropped"),
        "{log}"
    );
    // A new registration over the controller's quota is refused to its caller at once, not
    // held for a re-send that would be refused again.
    let message = error(agent.call(&listener("127.0.0.1", 7504, "shop", "web-1")));
    assert!(
        message.contains("the controller refused") && message.contains("quota"),
        "{message}"
    );
}

fn kubernetes_mode_binds_callers_to_their_pod_and_keeps_wildcards_per_pod() {
    let tmp = tempfile::tempdir().unwrap();
    let (_controller, agent) = start(tmp.path(), POD_CLUSTER, &["--mode", "kubernetes"]);
    let (ns_a, ns_b) = (
        Netns::with_address("ka", "192.0.2.11"),
        Netns::with_address("kb", "192.0.2.12"),
    );
    let mut a = Helper::start("client", &agent.socket_dir, Some(&ns_a), None);
    let mut b = Helper::start("client", &agent.socket_dir, Some(&ns_b), None);

    // Each pod is found by the address its namespace holds; it looks up only itself.
    decided(a.call(&lookup("shop", "a", "192.0.2.20")));
    let message = denied(a.call(&lookup("shop", "b", "192.0.2.20")));
    assert!(
        message.contains("shop/a (its network namespace holds 192.0.2.11)")
            && message.contains("not shop/b"),
        "{message}"
    );
    decided(b.call(&lookup("shop", "b", "192.0.2.20")));
    // A process in no pod's namespace (this test, on the host network) is nobody.
    let message = denied(agent.call(&lookup("shop", "a", "192.0.2.20")));
    assert!(message.contains("cannot tell which pod"), "{message}");
    let message = denied(agent.call(&listener("127.0.0.1", 8080, "shop", "a")));
    assert!(message.contains("cannot tell which pod"), "{message}");
    // The API server is the source of identity: no local registerWorkload at all.
    let message = denied(a.call(&workload("shop", "a", &[])));
    assert!(message.contains("Kubernetes mode"), "{message}");

    // Wildcard listeners: a pod registers only as itself; two pods on one port both stay,
    // each under its own address (what the controller gets as n1/IP/8080/TCP).
    let message = denied(a.call(&listener("0.0.0.0", 8080, "shop", "b")));
    assert!(message.contains("not shop/b"), "{message}");
    accepted(a.call(&listener("0.0.0.0", 8080, "shop", "a")));
    accepted(b.call(&listener("::", 8080, "shop", "b")));
    let both = wait_for("both listeners in the registry", WAIT, || {
        let found = (
            found(&agent, "192.0.2.11", 8080)?,
            found(&agent, "192.0.2.12", 8080)?,
        );
        Some(found)
    });
    assert_eq!(
        both,
        (
            ("shop/a".to_string(), "192.0.2.11".to_string()),
            ("shop/b".to_string(), "192.0.2.12".to_string())
        )
    );
    // Neither the address of the node nor an unknown one answers with a pod's listener.
    assert_eq!(found(&agent, "198.51.100.1", 8080), None);
    assert_eq!(found(&agent, "192.0.2.99", 8080), None);

    // B can neither take nor remove A's.
    let message = denied(b.call(&listener("192.0.2.11", 8080, "shop", "b")));
    assert!(message.contains("not assigned"), "{message}");
    let message = denied(b.call(&remove("192.0.2.11", 8080)));
    assert!(message.contains("not assigned"), "{message}");
    // B's wildcard removal removes B's only.
    accepted(b.call(&remove("::", 8080)));
    wait_for("b's listener removed", WAIT, || {
        found(&agent, "192.0.2.12", 8080).is_none().then_some(())
    });
    assert_eq!(
        found(&agent, "192.0.2.11", 8080),
        Some(("shop/a".to_string(), "192.0.2.11".to_string()))
    );
    let held = held_file(&agent, r#""wildcard":"0.0.0.0""#);
    assert!(held.contains(r#""ip":"192.0.2.11""#), "{held}");
    wait_for("b's listener gone from the file", WAIT, || {
        let held = std::fs::read_to_string(agent.state_dir.join("registrations.json")).ok()?;
        (!held.contains("192.0.2.12")).then_some(())
    });
}

fn standalone_workloads_in_two_namespaces_keep_their_names_and_listeners() {
    let tmp = tempfile::tempdir().unwrap();
    let (_controller, agent) = start(tmp.path(), POD_CLUSTER, &[]);
    let (ns_a, ns_b) = (
        Netns::with_address("sa", "192.0.2.11"),
        Netns::with_address("sb", "192.0.2.12"),
    );
    let mut a = Helper::start("client", &agent.socket_dir, Some(&ns_a), None);
    let mut b = Helper::start("client", &agent.socket_dir, Some(&ns_b), None);

    accepted(a.call(&workload("shop", "a", &["192.0.2.11"])));
    // B cannot take A's name, nor claim A's address.
    let message = denied(b.call(&workload("shop", "a", &["192.0.2.12"])));
    assert!(
        message.contains(&format!("another live process (pid {})", a.pid)),
        "{message}"
    );
    let message = denied(b.call(&workload("shop", "b", &["192.0.2.11"])));
    assert!(message.contains("not assigned"), "{message}");
    accepted(b.call(&workload("shop", "b", &["192.0.2.12"])));

    // Wildcards of both on one port: each under its registered address.
    accepted(a.call(&listener("0.0.0.0", 9090, "shop", "a")));
    accepted(b.call(&listener("0.0.0.0", 9090, "shop", "b")));
    let message = denied(b.call(&listener("0.0.0.0", 9091, "shop", "a")));
    assert!(message.contains("shop/b"), "{message}");
    wait_for("both listeners", WAIT, || {
        (found(&agent, "192.0.2.11", 9090)? == ("shop/a".into(), "192.0.2.11".into())
            && found(&agent, "192.0.2.12", 9090)? == ("shop/b".into(), "192.0.2.12".into()))
            .then_some(())
    });
    // A re-registering its port (a restart of its server) keeps B's.
    accepted(a.call(&listener("0.0.0.0", 9090, "shop", "a")));
    accepted(a.call(&remove("0.0.0.0", 9090)));
    wait_for("a's listener removed", WAIT, || {
        found(&agent, "192.0.2.11", 9090).is_none().then_some(())
    });
    assert_eq!(
        found(&agent, "192.0.2.12", 9090),
        Some(("shop/b".into(), "192.0.2.12".into()))
    );
}

fn an_idle_connection_flood_does_not_lock_out_other_callers() {
    let tmp = tempfile::tempdir().unwrap();
    // 128 connection slots in all, as in the audit's experiment E4 (an agent with 256 open
    // files): one caller used to hold them all with idle connections.
    let agent = Agent::start_with(
        "n1",
        &format!("127.0.0.1:{}", free_port()),
        tmp.path(),
        &["--max-local-connections", "128"],
    );
    let ns = Netns::with_address("flood", "192.0.2.66");
    let mut flood = Helper::start("flood:200", &agent.socket_dir, Some(&ns), None);
    let report: Value = serde_json::from_str(&flood.line()).unwrap();
    assert_eq!(report["connected"], 200, "{report}");
    assert_eq!(report["open"], 64, "at most 64 per caller: {report}");
    assert_eq!(report["refused"], 136, "{report}");
    let message = report["message"].as_str().unwrap();
    assert!(
        message.starts_with("denied: too many connections from this caller")
            && message.contains("at most 64"),
        "{message}"
    );
    // Another caller is served at once, on every try.
    for _ in 0..20 {
        let started = Instant::now();
        let mut stream = connect(&agent.socket_dir);
        let reply: Response = frame::call(
            &mut stream,
            &Request::FallbackReport {
                reason: FallbackReason::Other,
                count: 1,
            },
        )
        .expect("served");
        accepted(reply);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
    }
    assert!(
        metric(
            &agent,
            r#"stackroute_lrd_local_requests_total{kind="connection",result="denied"} "#
        ) >= 136
    );
    drop(flood);
}
