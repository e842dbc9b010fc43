//! A new agent that dies in the middle of a hand-over: the running agent serves again. The
//! "new agent" is this test process, which asks as a real successor does: on the hand-over
//! socket in the state directory, with the node's secret read from `STATE_DIR/handover.key`
//! (its process name plays no part). While it holds the state without confirming, the running
//! agent is handing over: `/healthz` fails once that lasts longer than its limit.

mod common;

use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::*;
use stackroute_local_api::frame;
use stackroute_local_api::message::Response;
use stackroute_local_api::published;

fn request_frame(state_dir: &std::path::Path) -> Vec<u8> {
    handover_frame(&handover_request_json("n1", state_dir))
}

#[test]
fn the_running_agent_serves_again_when_the_new_one_dies_mid_hand_over() {
    let tmp = tempfile::tempdir().unwrap();
    let state = new_state_dir(tmp.path(), "Kernel", "BBR");
    let controller = Controller::start(&state, tmp.path(), free_port());
    let agent = Agent::start_with(
        "n1",
        &format!("http://{}", controller.grpc),
        tmp.path(),
        &["--healthz-handover-limit-ms", "300"],
    );
    wait_for("a fresh snapshot", WAIT, || {
        agent.published().filter(|p| !p.2)
    });

    // A client keeps calling throughout; none of its calls may fail.
    let stop = Arc::new(AtomicBool::new(false));
    let client = std::thread::spawn({
        let dir = agent.socket_dir.clone();
        let stop = stop.clone();
        move || {
            let (mut ok, mut failed) = (0u64, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let reply = UnixStream::connect(dir.join(published::SOCKET_FILE))
                    .map_err(|e| e.to_string())
                    .and_then(|mut s| {
                        s.set_read_timeout(Some(WAIT)).unwrap();
                        frame::call::<_, _, Response>(&mut s, &lookup_db("web-1"))
                            .map_err(|e| e.to_string())
                    });
                match reply {
                    Ok(Response::Decision(_)) => ok += 1,
                    other => failed.push(format!("{other:?}")),
                }
            }
            (ok, failed)
        }
    });

    for (round, confirmation) in [&b""[..], b"\x05\x00\x00\x00junk!"].into_iter().enumerate() {
        let mut stream =
            UnixStream::connect(agent.state_dir.join("handover.sock")).expect("connect");
        stream.set_read_timeout(Some(WAIT)).unwrap();
        stream.write_all(&request_frame(&agent.state_dir)).unwrap();
        // The state arrives (its descriptor is discarded by a plain read); then this "new
        // agent" hangs up, or confirms with garbage.
        let mut header = [0; 4];
        stream.read_exact(&mut header).expect("the agent's state");
        let mut body = vec![0; u32::from_le_bytes(header) as usize];
        stream.read_exact(&mut body).unwrap();
        let state: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(state["kind"], "state", "{state}");
        assert_eq!(http_get(agent.http, "/readyz").unwrap().0, 503);
        if round == 0 {
            // Held past the limit (300 ms here; the new agent has 5 s to confirm): stuck.
            let (code, body) = wait_for("/healthz to fail while handing over", WAIT, || {
                http_get(agent.http, "/healthz").filter(|(code, _)| *code != 200)
            });
            assert_eq!(code, 503, "{body}");
            assert!(body.contains("the hand-over is stuck"), "{body}");
        }
        stream.write_all(confirmation).unwrap();
        drop(stream);
        wait_for("the agent to serve again", WAIT, || {
            let log = agent.proc.log_text();
            (log.matches("hand-over failed; serving again").count() > round).then_some(())
        });
        wait_for("the agent to be ready again", WAIT, || {
            http_get(agent.http, "/readyz").filter(|(code, _)| *code == 200)
        });
        assert!(matches!(
            agent.call(&lookup_db("web-1")),
            Response::Decision(_)
        ));
        assert_eq!(http_get(agent.http, "/healthz").unwrap().0, 200);
    }
    let log = agent.proc.log_text();
    assert!(
        log.contains("closed the connection without answering"),
        "{log}"
    );
    assert!(log.contains("the new agent sent garbage"), "{log}");

    // It still publishes: a policy change reaches its table.
    std::fs::write(state.join(".p"), policy("Kernel", "Reno")).unwrap();
    std::fs::rename(state.join(".p"), state.join("policy.yaml")).unwrap();
    wait_for("Kernel/Reno", WAIT, || {
        explain_agent(&agent.socket_dir, "shop/web-1", "10.1.0.20:5432")
            .filter(|e| transport(e) == "Kernel/Reno")
    });
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = client.join().unwrap();
    assert!(failed.is_empty(), "{failed:?}");
    assert!(ok > 0);
    drop(controller);
}
