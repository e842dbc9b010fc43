//! The hand-over hijack of the security audit (T3, experiment E2), replayed against a real
//! agent: a process renamed `stackroute-lrd` — the only thing the agent used to check — asks
//! for the socket directory. It cannot find the hand-over socket where pods can reach (the
//! socket directory), and on the socket itself (in the state directory) it is refused without
//! the node's secret, with a wrong one, and with the previous protocol's request; the agent
//! keeps serving and a real successor still takes over afterwards. This test renames its own
//! process, which is why it has a binary of its own.

mod common;

use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;

use common::*;
use serde_json::Value;
use stackroute_local_api::message::Response;

fn ask(path: &std::path::Path, request: &str) -> Value {
    let mut stream = UnixStream::connect(path).expect("connect to the hand-over socket");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.write_all(&handover_frame(request)).unwrap();
    let mut header = [0; 4];
    stream.read_exact(&mut header).expect("an answer");
    let mut body = vec![0; u32::from_le_bytes(header) as usize];
    stream.read_exact(&mut body).unwrap();
    serde_json::from_slice(&body).unwrap()
}

#[test]
fn a_process_named_like_the_agent_without_the_secret_cannot_take_the_socket_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let (controller, agent) = controller_and_agent(tmp.path());
    std::fs::write("/proc/self/comm", "stackroute-lrd").expect("rename this process");
    assert_eq!(
        std::fs::read_to_string("/proc/self/comm")
            .unwrap()
            .trim_end(),
        "stackroute-lrd"
    );

    // Where E2 found it: the socket directory, which every injected pod mounts.
    let error = UnixStream::connect(agent.socket_dir.join("handover.sock")).unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::NotFound, "{error}");

    // On the socket itself (which a pod cannot reach): nothing without the node's secret.
    let path = agent.state_dir.join("handover.sock");
    let secret = handover_secret(&agent.state_dir);
    let wrong = {
        // The right length, one digit off.
        let mut wrong = secret.clone().into_bytes();
        wrong[0] = if wrong[0] == b'0' { b'1' } else { b'0' };
        String::from_utf8(wrong).unwrap()
    };
    for (what, request, expected) in [
        (
            "E2's request (protocol version 1)",
            r#"{"kind":"request","version":1,"node":"n1"}"#.to_string(),
            "version 1 is not supported",
        ),
        (
            "no secret",
            r#"{"kind":"request","version":2,"node":"n1"}"#.to_string(),
            "carries no hand-over secret",
        ),
        (
            "a wrong secret",
            format!(r#"{{"kind":"request","version":2,"node":"n1","secret":"{wrong}"}}"#),
            "secret does not match",
        ),
        (
            "an empty secret",
            r#"{"kind":"request","version":2,"node":"n1","secret":""}"#.to_string(),
            "secret does not match",
        ),
    ] {
        let reply = ask(&path, &request);
        assert_eq!(reply["kind"], "refused", "{what}: {reply}");
        let message = reply["message"].as_str().unwrap();
        assert!(message.contains(expected), "{what}: {message}");
        // Still serving after each: local API answered, ready, healthy.
        assert!(
            matches!(agent.call(&lookup_db("web-1")), Response::Decision(_)),
            "{what}"
        );
        assert_eq!(http_get(agent.http, "/readyz").unwrap().0, 200, "{what}");
        assert_eq!(http_get(agent.http, "/healthz").unwrap().0, 200, "{what}");
    }
    let log = agent.proc.log_text();
    assert_eq!(
        log.matches("refused a hand-over request; still serving")
            .count(),
        4,
        "{log}"
    );
    assert!(!log.contains("hand-over requested"), "{log}");
    assert!(!log.contains("handed the socket directory over"), "{log}");
    // The caller's name is in the log, for whoever investigates; it decided nothing.
    assert!(log.contains("stackroute-lrd"), "{log}");
    let metrics = agent.metrics();
    for (reason, count) in [("version", 1), ("missing-secret", 1), ("wrong-secret", 2)] {
        let line = format!("stackroute_lrd_handover_refused_total{{reason=\"{reason}\"}} {count}");
        assert!(metrics.contains(&line), "{line} in\n{metrics}");
    }

    // A real successor (the node's secret from the state directory) still takes over.
    let new = agent.successor("n1-new", &[]);
    wait_for("the successor to be ready", WAIT, || {
        http_get(new.http, "/readyz").filter(|(code, _)| *code == 200)
    });
    assert!(
        new.proc
            .log_text()
            .contains("took the socket directory over from the running agent")
    );
    assert_eq!(http_get(agent.http, "/readyz").unwrap().0, 503);
    assert!(matches!(
        new.call(&lookup_db("web-1")),
        Response::Decision(_)
    ));
    drop(controller);
}
