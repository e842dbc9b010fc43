//! The node agent with real processes: the controller binary, three agents, the CLI.

mod common;

use std::io::{Read as _, Write as _};
use std::time::Duration;

use common::*;
use serde_json::Value;
use stackroute_local_api::frame;
use stackroute_local_api::message::{FallbackReason, Protocol, Request, Response, Stack};
use stackroute_local_api::published;

const TO_DB: &str = "10.1.0.20:5432";

/// Waits until the agent is between updates — the generation file, the published file, the
/// persisted copy and the revision metric agree — and returns the published snapshot.
fn settled(agent: &Agent) -> (u64, u64, bool, Vec<u8>) {
    wait_for("the agent to settle", WAIT, || {
        let generation = agent.generation();
        let published = agent.published()?;
        let persisted = std::fs::read(agent.state_dir.join("snapshot")).ok()?;
        let metrics = agent.metrics();
        let revision = format!("stackroute_lrd_snapshot_revision {}\n", published.1);
        (generation == published.0 && persisted == published.3 && metrics.contains(&revision))
            .then_some(published)
    })
}

fn lookup(agent: &Agent, workload: &str) -> Response {
    agent.call(&lookup_db(workload))
}

/// `stackroute_lrd_snapshot_deltas_total{outcome}` in a metrics page (0 when absent).
fn deltas(metrics: &str, outcome: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!(
                "stackroute_lrd_snapshot_deltas_total{{outcome=\"{outcome}\"}} "
            ))
        })
        .map_or(0, |n| n.parse().unwrap())
}

/// The agent is killed (SIGKILL) at varying moments after a policy change — before, while or
/// after the controller's delta arrives, is applied and persisted — and restarted on the same
/// state directory. Whole snapshots come in parts of 256 bytes (`--snapshot-chunk-bytes`), so
/// restarts also land between the parts of one. Each time it first publishes a complete, valid
/// snapshot (what it persisted: never half of a revision), resumes from that revision and
/// converges on the controller's latest; after the last restart, changes arrive as deltas
/// again and none is refused.
#[test]
fn an_agent_killed_mid_delta_restarts_whole_and_converges() {
    let tmp = tempfile::tempdir().unwrap();
    let state = new_state_dir(tmp.path(), "Kernel", "BBR");
    let controller = Controller::start_with(
        &state,
        tmp.path(),
        free_port(),
        &["--snapshot-chunk-bytes", "256"],
    );
    let mut agent = Agent::start("n1", &format!("http://{}", controller.grpc), tmp.path());
    let converged = |agent: &Agent, cc: &str| {
        let want = format!("Kernel/{cc}");
        wait_for(&format!("web-1 on {want}"), WAIT, || {
            explain_agent(&agent.socket_dir, "shop/web-1", TO_DB)
                .filter(|e| transport(e) == want)
                .and_then(|_| agent.published().filter(|p| !p.2))
        })
    };
    converged(&agent, "BBR");
    for (round, cc) in ["Cubic", "Reno", "BBR", "Cubic", "Reno", "BBR"]
        .into_iter()
        .enumerate()
    {
        write_state(&state, "Kernel", cc);
        std::thread::sleep(Duration::from_millis(round as u64 * 23 % 90));
        agent.restart();
        let (_, revision, _, bytes) = wait_for("the restarted agent's first table", WAIT, || {
            agent.published()
        });
        let snapshot = stackroute_snapshot::Snapshot::parse(&bytes)
            .unwrap_or_else(|e| panic!("round {round}: published an invalid snapshot: {e}"));
        assert_eq!(snapshot.revision(), revision);
        let (_, latest, _, _) = converged(&agent, cc);
        assert!(
            latest >= revision,
            "round {round}: went back from {revision} to {latest}"
        );
    }
    write_state(&state, "Kernel", "Cubic");
    converged(&agent, "Cubic");
    let metrics = agent.metrics();
    assert!(deltas(&metrics, "applied") >= 1, "{metrics}");
    assert_eq!(deltas(&metrics, "rejected"), 0, "{metrics}");
    // Every whole snapshot went in parts: far more whole messages than revisions.
    let sent = http_get(controller.http, "/metrics")
        .expect("controller metrics")
        .1;
    let whole_messages: u64 = sent
        .lines()
        .find_map(|l| {
            l.strip_prefix(r#"stackroute_controller_snapshot_updates_total{encoding="full"} "#)
        })
        .map_or(0, |n| n.parse().unwrap());
    let (_, revision, _, bytes) = agent.published().unwrap();
    assert!(
        whole_messages as usize >= bytes.len() / 256,
        "{whole_messages} whole-snapshot messages for revision {revision} of {} bytes",
        bytes.len()
    );
}

#[test]
fn a_policy_change_reaches_every_agent_and_explain_agent_reflects_it() {
    let tmp = tempfile::tempdir().unwrap();
    let state = new_state_dir(tmp.path(), "Kernel", "BBR");
    let controller = Controller::start(&state, tmp.path(), free_port());
    let url = format!("http://{}", controller.grpc);
    // n3 is given a dead controller address first: it rotates to the live one.
    let dead_then_live = format!("http://127.0.0.1:{},{url}", free_port());
    let agents: Vec<Agent> = [("n1", &url), ("n2", &url), ("n3", &dead_then_live)]
        .iter()
        .map(|(n, controllers)| Agent::start(n, controllers, tmp.path()))
        .collect();

    for (i, agent) in agents.iter().enumerate() {
        let from = format!("shop/web-{}", i + 1);
        let explanation = wait_for(&format!("{from}: Kernel/BBR"), WAIT, || {
            explain_agent(&agent.socket_dir, &from, TO_DB).filter(|e| transport(e) == "Kernel/BBR")
        });
        assert_eq!(explanation["matched"]["name"], "web", "{explanation}");
        let (_, _, stale, _) = settled(agent);
        assert!(!stale);
        assert_eq!(http_get(agent.http, "/readyz").unwrap().0, 200);
    }
    let before: Vec<u64> = agents.iter().map(|a| a.published().unwrap().1).collect();

    // A reader that keeps loading n1's published files while revisions change: every snapshot
    // it sees is complete and valid, and generations never go backwards.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = std::thread::spawn({
        let dir = agents[0].socket_dir.clone();
        let stop = stop.clone();
        move || {
            let (mut reads, mut last_generation) = (0u64, 0u64);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let generation = std::fs::read(dir.join(published::GENERATION_FILE)).unwrap();
                let generation = published::parse_generation(&generation).unwrap();
                assert!(generation >= last_generation, "generation went backwards");
                last_generation = generation;
                let bytes = std::fs::read(dir.join(published::SNAPSHOT_FILE)).unwrap();
                let view = published::parse(&bytes).expect("a complete published file");
                assert!(view.generation >= generation, "file older than the counter");
                stackroute_snapshot::Snapshot::parse(view.snapshot).expect("a valid snapshot");
                reads += 1;
            }
            reads
        }
    });

    write_state(&state, "Kernel", "Reno");
    for (i, agent) in agents.iter().enumerate() {
        let from = format!("shop/web-{}", i + 1);
        wait_for(&format!("{from}: Kernel/Reno"), WAIT, || {
            explain_agent(&agent.socket_dir, &from, TO_DB).filter(|e| transport(e) == "Kernel/Reno")
        });
        let (_, revision, stale, _) = settled(agent);
        assert!(revision > before[i] && !stale);
        // The lookup on the socket agrees with the mapped table.
        match lookup(agent, &format!("web-{}", i + 1)) {
            Response::Decision(answer) => {
                assert_eq!(answer.transports[0].stack, Stack::Kernel);
                assert_eq!(answer.transports[0].congestion_control, "Reno");
                assert_eq!(answer.matched.as_deref(), Some("StackRoute/shop/web#all"));
            }
            other => panic!("{other:?}"),
        }
        let metrics = agent.metrics();
        assert!(
            metrics.contains(&format!("stackroute_lrd_snapshot_revision {revision}")),
            "{metrics}"
        );
        assert!(
            metrics.contains("stackroute_lrd_snapshot_stale 0"),
            "{metrics}"
        );
        assert!(
            metrics.contains("stackroute_lrd_controller_connected 1"),
            "{metrics}"
        );
        // The change came as a delta from the revision the agent held, rebuilt whole.
        assert!(deltas(&metrics, "applied") >= 1, "{metrics}");
        assert_eq!(deltas(&metrics, "rejected"), 0, "{metrics}");
    }

    // The same JSON as the offline form (db-0 runs on n2, so n2's table names it too); only
    // the revision differs (the offline form compiles at revision 0), and the live form says
    // which path decides (the shim; no kernel hook is attached for web-2).
    let offline = cli(
        &[
            "explain",
            "--state",
            state.to_str().unwrap(),
            "--from",
            "shop/web-2",
            "--to",
            TO_DB,
            "--output",
            "json",
        ],
        &[],
    );
    assert!(
        offline.status.success(),
        "{}",
        String::from_utf8_lossy(&offline.stderr)
    );
    let mut offline: Value = serde_json::from_slice(&offline.stdout).unwrap();
    let mut live = explain_agent(&agents[1].socket_dir, "shop/web-2", TO_DB).unwrap();
    assert_eq!(live["destination"], "pod shop/db-0");
    offline["revision"] = Value::Null;
    live["revision"] = Value::Null;
    let path = live
        .as_object_mut()
        .and_then(|object| object.remove("path"))
        .unwrap_or_default();
    assert!(
        path.as_str()
            .is_some_and(|p| p.starts_with("path: the shim decides; no kernel hook")),
        "{path}"
    );
    assert_eq!(live, offline);

    // A listener registered through n1's agent reaches n2's agent with the next snapshot.
    let reply = agents[0].call(&Request::RegisterListener {
        ip: "127.0.0.1".parse().unwrap(),
        port: 7002,
        protocol: Protocol::Tcp,
        namespace: "shop".into(),
        workload: "web-1".into(),
        stacks: vec![Stack::Rdma],
        endpoints: [("RDMA".to_string(), "fe80::1/7002".to_string())].into(),
    });
    assert!(
        matches!(
            reply,
            Response::Ok {
                revision: Some(_),
                queued: false
            }
        ),
        "{reply:?}"
    );
    let find = Request::FindListener {
        ip: "127.0.0.1".parse().unwrap(),
        port: 7002,
        protocol: Protocol::Tcp,
    };
    let listener = wait_for("the listener at n2", WAIT, || match agents[1].call(&find) {
        Response::Listener { listener } => listener,
        other => panic!("{other:?}"),
    });
    assert_eq!(
        (listener.node.as_str(), listener.workload.as_str()),
        ("n1", "web-1")
    );
    assert_eq!(listener.stacks, [Stack::Kernel, Stack::Rdma]);
    assert_eq!(listener.endpoints["RDMA"], "fe80::1/7002");
    let other_port = Request::FindListener {
        ip: "127.0.0.1".parse().unwrap(),
        port: 7003,
        protocol: Protocol::Tcp,
    };
    assert_eq!(
        agents[1].call(&other_port),
        Response::Listener { listener: None }
    );
    // A second listener, then the first one's removal: each reaches n2 as the list's changes.
    for (port, register) in [(7003, true), (7002, false)] {
        let (ip, protocol) = ("127.0.0.1".parse().unwrap(), Protocol::Tcp);
        let reply = agents[0].call(&if register {
            Request::RegisterListener {
                ip,
                port,
                protocol,
                namespace: "shop".into(),
                workload: "web-1".into(),
                stacks: vec![Stack::Kernel],
                endpoints: Default::default(),
            }
        } else {
            Request::RemoveListener { ip, port, protocol }
        });
        assert!(matches!(reply, Response::Ok { .. }), "{reply:?}");
        let find = Request::FindListener { ip, port, protocol };
        wait_for("the listener change at n2", WAIT, || {
            match agents[1].call(&find) {
                Response::Listener { listener } => (listener.is_some() == register).then_some(()),
                other => panic!("{other:?}"),
            }
        });
    }
    assert!(matches!(
        agents[1].call(&other_port),
        Response::Listener { listener: Some(_) }
    ));

    // The controller sees every node ack the revision: `stackroute status`.
    let latest = agents
        .iter()
        .map(|a| a.published().unwrap().1)
        .max()
        .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let metrics = agents[2].metrics();
    let reconnects: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("stackroute_lrd_controller_reconnects_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no reconnect counter: {metrics}"));
    assert!(reconnects >= 1, "n3 failed over to the live controller");
    let reads = reader
        .join()
        .expect("the reader saw only complete, valid snapshots");
    assert!(reads > 10, "{reads} reads");

    let status: Value = wait_for("every node acked", WAIT, || {
        let status = status_json(&url);
        let nodes = status["nodes"].as_array()?;
        let acked = ["n1", "n2", "n3"].iter().all(|n| {
            nodes
                .iter()
                .any(|x| x["node"] == *n && x["ackedRevision"].as_u64() >= Some(latest))
        });
        acked.then_some(status)
    });
    let web = status["policies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "web")
        .unwrap();
    assert_eq!(web["accepted"], true, "{status}");
    let text = cli(&["status", "--controller", &url], &[]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("NODE") && text.contains("n3") && text.contains("StackRoute"),
        "{text}"
    );
    drop(controller);
}

#[test]
fn without_the_controller_agents_keep_answering_and_restart_stale_from_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let state = new_state_dir(tmp.path(), "Kernel", "BBR");
    let port = free_port();
    let mut controller = Controller::start(&state, tmp.path(), port);
    let url = format!("http://{}", controller.grpc);
    let mut agent = Agent::start("n1", &url, tmp.path());
    wait_for("a fresh snapshot", WAIT, || {
        agent.published().filter(|p| !p.2)
    });
    let (_, revision, _, snapshot) = agent.published().unwrap();

    controller.proc.kill();
    // Still answering on its socket, from the same table.
    wait_for("the agent to notice", WAIT, || {
        agent
            .metrics()
            .contains("stackroute_lrd_controller_connected 0")
            .then_some(())
    });
    match lookup(&agent, "web-1") {
        Response::Decision(answer) => {
            assert_eq!((answer.revision, answer.stale), (revision, false));
            assert_eq!(answer.transports[0].congestion_control, "BBR");
        }
        other => panic!("{other:?}"),
    }
    let explanation = explain_agent(&agent.socket_dir, "shop/web-1", TO_DB).unwrap();
    assert_eq!(transport(&explanation), "Kernel/BBR");
    // A registration made meanwhile is queued and sent when a controller is back.
    let reply = agent.call(&Request::RegisterListener {
        ip: "127.0.0.1".parse().unwrap(),
        port: 7001,
        protocol: Protocol::Tcp,
        namespace: "shop".into(),
        workload: "web-1".into(),
        stacks: vec![Stack::Userspace],
        endpoints: Default::default(),
    });
    assert_eq!(
        reply,
        Response::Ok {
            revision: None,
            queued: true
        }
    );

    // The agent's writer thread persists it within moments (a crash before that would lose
    // it: at most one write interval's changes).
    wait_for("the queued registration on disk", WAIT, || {
        std::fs::read_to_string(agent.state_dir.join("registrations.json"))
            .ok()
            .filter(|held| held.contains("\"port\":7001"))
    });

    // Restarted with no controller: the persisted snapshot, marked stale, at once.
    agent.restart();
    let (_, stale_revision, stale, stale_snapshot) =
        wait_for("the persisted snapshot", WAIT, || {
            agent.published().filter(|p| p.2)
        });
    assert!(stale);
    assert_eq!((stale_revision, stale_snapshot), (revision, snapshot));
    assert_eq!(http_get(agent.http, "/readyz").unwrap().0, 200);
    assert!(agent.metrics().contains("stackroute_lrd_snapshot_stale 1"));
    match lookup(&agent, "web-1") {
        Response::Decision(answer) => assert!(answer.stale && answer.revision == revision),
        other => panic!("{other:?}"),
    }
    // The queued registration survived the restart (its owner, this test, still runs).
    let held = std::fs::read_to_string(agent.state_dir.join("registrations.json")).unwrap();
    assert!(held.contains("\"port\":7001"), "{held}");

    // The controller comes back on the same address: fresh again, and the listener arrives.
    let controller = Controller::start(&state, tmp.path(), port);
    wait_for(
        "a fresh snapshot after the controller returned",
        WAIT,
        || agent.published().filter(|p| !p.2),
    );
    let explanation = explain_agent(&agent.socket_dir, "shop/web-1", TO_DB).unwrap();
    assert_eq!(transport(&explanation), "Kernel/BBR");
    wait_for("the queued listener at the controller", WAIT, || {
        let output = cli(&["status", "--controller", &url, "--output", "json"], &[]);
        let status: Value = serde_json::from_slice(&output.stdout).ok()?;
        (status["listeners"] == 1).then_some(())
    });
    drop(controller);
}

#[test]
fn malformed_and_oversized_socket_messages_are_rejected_without_a_crash() {
    let tmp = tempfile::tempdir().unwrap();
    // No controller listens there: the socket works regardless.
    let mut agent = Agent::start("n1", &format!("127.0.0.1:{}", free_port()), tmp.path());
    let read_reply = |stream: &mut std::os::unix::net::UnixStream| -> Response {
        frame::decode(&frame::read_frame(stream).expect("a reply")).expect("a valid reply")
    };
    let error = |reply: Response| match reply {
        Response::Error { message } => message,
        other => panic!("expected an error, got {other:?}"),
    };

    let mut stream = connect(&agent.socket_dir);
    for body in [
        &b"{not json"[..],
        b"[]",
        br#"{"kind":"format","disk":"c:"}"#,
        b"\xff\xfe",
        b"",
    ] {
        stream
            .write_all(&(body.len() as u32).to_le_bytes())
            .unwrap();
        stream.write_all(body).unwrap();
        let message = error(read_reply(&mut stream));
        assert!(message.starts_with("malformed message"), "{message}");
    }
    // The same connection still serves valid requests.
    let report = Request::FallbackReport {
        reason: FallbackReason::ConnectFailed,
        count: 3,
    };
    frame::write_frame(&mut stream, &report).unwrap();
    assert_eq!(
        read_reply(&mut stream),
        Response::Ok {
            revision: None,
            queued: false
        }
    );
    // A lookup before any snapshot exists is an error, not a crash.
    assert!(error(lookup(&agent, "web-1")).contains("no snapshot"));

    // Oversized: refused from the header alone, then the connection is closed.
    let mut stream = connect(&agent.socket_dir);
    stream.write_all(&(10u32 << 20).to_le_bytes()).unwrap();
    let message = error(read_reply(&mut stream));
    assert!(message.contains("exceeds the limit of 65536"), "{message}");
    let mut rest = Vec::new();
    assert_eq!(
        stream.read_to_end(&mut rest).unwrap(),
        0,
        "closed after an oversized frame"
    );

    // Truncated frame and hang-up.
    let mut stream = connect(&agent.socket_dir);
    stream.write_all(&100u32.to_le_bytes()).unwrap();
    stream.write_all(b"{\"kind\"").unwrap();
    drop(stream);

    // Listener on an address the caller's namespace does not own: denied.
    let message = error(agent.call(&Request::RegisterListener {
        ip: "203.0.113.9".parse().unwrap(),
        port: 80,
        protocol: Protocol::Tcp,
        namespace: "shop".into(),
        workload: "web-1".into(),
        stacks: vec![],
        endpoints: Default::default(),
    }));
    assert!(
        message.contains("not assigned to an interface"),
        "{message}"
    );
    // Bad names.
    let message = error(agent.call(&Request::RegisterWorkload {
        namespace: String::new(),
        name: "x".into(),
        labels: Default::default(),
        ips: vec![],
    }));
    assert!(message.contains("namespace"), "{message}");

    // Still alive, and it counted everything.
    assert!(agent.proc.alive(), "{}", agent.proc.log_text());
    let metrics = wait_for("metrics", WAIT, || {
        let m = agent.metrics();
        m.contains(r#"kind="invalid",result="error"} 7"#)
            .then_some(m)
    });
    assert!(
        metrics.contains(r#"stackroute_lrd_fallback_reports_total{reason="connect-failed"} 3"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"kind="register-listener",result="denied"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"kind="lookup",result="error"} 1"#),
        "{metrics}"
    );
    assert_eq!(http_get(agent.http, "/readyz").unwrap().0, 503);
    assert_eq!(http_get(agent.http, "/healthz").unwrap().0, 200);
    let log = agent.proc.log_text();
    assert!(
        log.contains("rejected message") && log.contains("rejected frame"),
        "{log}"
    );
    agent.proc.kill();
}

#[test]
fn stackroute_run_registers_the_workload_and_execs_the_command() {
    let tmp = tempfile::tempdir().unwrap();
    let (controller, agent) = controller_and_agent(tmp.path());
    let dir = agent.socket_dir.to_str().unwrap().to_string();

    // The command outlives the check below (its registration is withdrawn when it exits). It
    // first looks itself up: `run` starts it only once the agent publishes the revision that
    // includes it, so its very first connection is decided by its own policies.
    let script = format!(
        "{} explain --agent $STACKROUTE_SOCKET_DIR --from shop/job-1 --to {TO_DB} >/dev/null && echo ok $STACKROUTE_NAMESPACE/$STACKROUTE_WORKLOAD ${{LD_PRELOAD-unset}} $STACKROUTE_SOCKET_DIR; sleep 4",
        bin("stackroute").display()
    );
    let child = std::thread::spawn({
        let dir = dir.clone();
        move || {
            cli(
                &[
                    "run",
                    "--namespace",
                    "shop",
                    "--name",
                    "job-1",
                    "--labels",
                    "app=web,tier=batch",
                    "--socket-dir",
                    &dir,
                    "--",
                    "sh",
                    "-c",
                    &script,
                ],
                &[("STACKROUTE_SHIM", "/nonexistent/libnsocket.so")],
            )
        }
    });
    let explanation = wait_for("shop/job-1 in the agent's table", WAIT, || {
        explain_agent(&agent.socket_dir, "shop/job-1", TO_DB)
    });
    assert_eq!(
        transport(&explanation),
        "Kernel/BBR",
        "selected by its registered labels"
    );
    let output = child.join().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // $STACKROUTE_SHIM names no file, so run falls back to a shim next to its own binary (built
    // there by the shim's tests, or not).
    let next_to_cli = bin("stackroute").with_file_name("libnsocket.so");
    let preload = if next_to_cli.is_file() {
        next_to_cli.display().to_string()
    } else {
        "unset".to_string()
    };
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        format!("ok shop/job-1 {preload} {dir}")
    );
    // The only warnings are about the shim this test hides; nothing about the registration.
    let stderr = String::from_utf8_lossy(&output.stderr);
    let other: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.contains("libnsocket.so") && !l.contains("STACKROUTE_SHIM"))
        .collect();
    assert!(other.is_empty(), "{stderr}");
    // The command exited: the agent withdraws its registration and the table drops it.
    wait_for("shop/job-1 to leave the table", WAIT, || {
        explain_agent(&agent.socket_dir, "shop/job-1", TO_DB)
            .is_none()
            .then_some(())
    });
    assert!(agent.proc.log_text().contains("workload exited; removing"));

    // Fail-open: no agent, a warning, the command still runs.
    let empty = tmp.path().join("no-agent");
    let output = cli(
        &[
            "run",
            "--socket-dir",
            empty.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            "echo ok",
        ],
        &[],
    );
    assert!(output.status.success());
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "ok");
    assert!(String::from_utf8_lossy(&output.stderr).contains("warning: no agent"));
    drop(controller);
}

#[test]
fn a_corrupt_persisted_snapshot_is_not_served() {
    let tmp = tempfile::tempdir().unwrap();
    let state_dir = tmp.path().join("n1-state");
    std::fs::create_dir_all(&state_dir).unwrap();
    std::fs::write(
        state_dir.join("snapshot"),
        b"\x89SRSNAP\nnot really a snapshot",
    )
    .unwrap();
    let agent = Agent::start("n1", &format!("127.0.0.1:{}", free_port()), tmp.path());
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        agent.published().is_none(),
        "nothing published from a corrupt file"
    );
    assert_eq!(http_get(agent.http, "/readyz").unwrap().0, 503);
    assert!(
        agent.proc.log_text().contains("corrupt"),
        "{}",
        agent.proc.log_text()
    );

    // A second agent on the same socket directory takes it over: tests/handover.rs.
}
