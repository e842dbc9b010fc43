//! The controller's gRPC trust boundary, against a real controller over TLS: each attack of the
//! security audit (T2, I4) now fails with the documented error, and honest callers lose
//! nothing.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{CLUSTER, Controller, policy};
use stackroute_proto::client::{self, Security};
use stackroute_proto::v1alpha1::{
    AckRequest, ApiVersion, Listener, ListenerKey, Protocol, SnapshotUpdate, StatusRequest,
    WatchRequest, Workload, WorkloadKey,
};
use testkit::pki::Pki;
use tonic::Code;

const WAIT: Duration = Duration::from_secs(10);

struct Setup {
    dir: tempfile::TempDir,
    pki: Pki,
    controller: Controller,
}

async fn setup() -> Setup {
    setup_with(&[]).await
}

async fn setup_with(extra: &[&str]) -> Setup {
    let dir = tempfile::tempdir().expect("temp dir");
    let state = dir.path().join("state");
    std::fs::create_dir(&state).expect("state dir");
    std::fs::write(state.join("cluster.yaml"), CLUSTER).expect("write");
    std::fs::write(state.join("policy.yaml"), policy("Kernel", "BBR")).expect("write");
    let pki = Pki::new(
        Path::new(env!("CARGO_BIN_EXE_stackroute-controller")),
        &dir.path().join("pki"),
        &[],
    );
    let server = pki.server().display().to_string();
    let mut args = vec!["--grpc-tls-dir", server.as_str()];
    args.extend_from_slice(extra);
    let controller = Controller::start(&state, dir.path(), &args).await;
    Setup {
        dir,
        pki,
        controller,
    }
}

impl Setup {
    fn address(&self) -> String {
        self.controller.grpc.to_string()
    }

    async fn client(&self, credentials: &Path) -> client::Client {
        client::connect(
            &self.address(),
            &Security::Tls {
                dir: credentials.to_path_buf(),
                server_name: None,
            },
        )
        .await
        .unwrap_or_else(|e| panic!("connecting with {}: {e}", credentials.display()))
    }

    async fn node(&self, node: &str) -> client::Client {
        self.client(&self.pki.node(node)).await
    }

    fn metrics(&self) -> String {
        common::http_get(self.controller.http, "/metrics")
            .expect("/metrics")
            .1
    }
}

fn watch_request(node: &str, known_revision: u64) -> WatchRequest {
    WatchRequest {
        node: node.into(),
        agent_id: format!("test-{node}"),
        known_revision,
        api_version: ApiVersion::V1alpha1 as i32,
        accepts_delta: false,
        accepts_chunks: false,
        accepts_listener_deltas: false,
    }
}

async fn first_update(client: &mut client::Client, request: WatchRequest) -> SnapshotUpdate {
    let mut stream = client
        .watch_snapshots(request)
        .await
        .expect("WatchSnapshots")
        .into_inner();
    tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("a snapshot in time")
        .expect("stream healthy")
        .expect("an update")
}

fn listener(node: &str, port: u32, endpoint_bytes: usize) -> Listener {
    Listener {
        key: Some(ListenerKey {
            node: node.into(),
            ip: "10.1.0.10".into(),
            port,
            protocol: Protocol::Tcp as i32,
        }),
        namespace: "shop".into(),
        workload: "web-0".into(),
        stacks: vec![],
        endpoints: [("Kernel".to_string(), "x".repeat(endpoint_bytes))].into(),
    }
}

#[tokio::test]
async fn a_caller_without_credentials_is_refused_with_one_clear_line() {
    let setup = setup().await;
    // TLS that trusts the controller, but no client certificate and no token.
    let bare = setup.dir.path().join("bare");
    std::fs::create_dir(&bare).expect("dir");
    std::fs::copy(setup.pki.server().join("ca.crt"), bare.join("ca.crt")).expect("copy");
    let mut anonymous = setup.client(&bare).await;
    let error = anonymous
        .watch_snapshots(watch_request("n1", 0))
        .await
        .expect_err("anonymous watch");
    assert_eq!(error.code(), Code::Unauthenticated, "{error:?}");
    assert!(
        error
            .message()
            .starts_with("no client certificate and no bearer token"),
        "{}",
        error.message()
    );
    let error = anonymous
        .get_status(StatusRequest {})
        .await
        .expect_err("anonymous status");
    assert_eq!(error.code(), Code::Unauthenticated);

    // Plaintext against the TLS port does not even get an HTTP/2 session.
    let plaintext = client::connect(&setup.address(), &Security::Plaintext).await;
    if let Ok(mut plaintext) = plaintext {
        let error = plaintext
            .get_status(StatusRequest {})
            .await
            .expect_err("plaintext status");
        assert_ne!(error.code(), Code::Ok);
    }

    // A certificate from another CA fails the handshake.
    let foreign = Pki::new(
        Path::new(env!("CARGO_BIN_EXE_stackroute-controller")),
        &setup.dir.path().join("foreign"),
        &[],
    );
    let forged = setup.dir.path().join("forged");
    std::fs::create_dir(&forged).expect("dir");
    std::fs::copy(setup.pki.server().join("ca.crt"), forged.join("ca.crt")).expect("copy");
    for file in ["tls.crt", "tls.key"] {
        std::fs::copy(foreign.node("n1").join(file), forged.join(file)).expect("copy");
    }
    let refused = match client::connect(
        &setup.address(),
        &Security::Tls {
            dir: forged,
            server_name: None,
        },
    )
    .await
    {
        Err(_) => true,
        Ok(mut client) => client.get_status(StatusRequest {}).await.is_err(),
    };
    assert!(refused, "a certificate of a foreign CA was accepted");

    let metrics = setup.metrics();
    assert!(
        metrics.contains(
            "stackroute_controller_denied_requests_total{method=\"WatchSnapshots\",reason=\"unauthenticated\"} 1"
        ),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_node_may_watch_ack_and_register_only_as_itself() {
    let setup = setup().await;
    let mut n1 = setup.node("n1").await;

    // Honest: n1 watches, acks and registers as n1.
    let update = first_update(&mut n1, watch_request("n1", 0)).await;
    assert_eq!(update.node, "n1");
    n1.ack(AckRequest {
        node: "n1".into(),
        agent_id: "test-n1".into(),
        revision: update.revision,
        error: String::new(),
    })
    .await
    .expect("own ack");
    n1.register_listener(listener("n1", 8080, 8))
        .await
        .expect("own listener");

    // n1 acting for n2: every method refused with PERMISSION_DENIED naming both.
    let denied = [
        n1.watch_snapshots(watch_request("n2", 0))
            .await
            .map(|_| ())
            .expect_err("watch as n2"),
        n1.ack(AckRequest {
            node: "n2".into(),
            agent_id: "forged".into(),
            revision: u64::MAX,
            error: String::new(),
        })
        .await
        .map(|_| ())
        .expect_err("ack as n2"),
        n1.register_listener(listener("n2", 8080, 8))
            .await
            .map(|_| ())
            .expect_err("listener for n2"),
        n1.register_workload(Workload {
            key: Some(WorkloadKey {
                node: "n2".into(),
                namespace: "shop".into(),
                name: "db-0".into(),
            }),
            labels: [("app".to_string(), "evil".to_string())].into(),
            ips: vec![],
        })
        .await
        .map(|_| ())
        .expect_err("workload for n2"),
    ];
    for error in &denied {
        assert_eq!(error.code(), Code::PermissionDenied, "{error:?}");
        assert_eq!(
            error.message(),
            "node n1 may not act for node n2: a node's agent may only speak for itself"
        );
    }

    // The forged ack changed nothing: n2 has acked nothing.
    let mut admin = setup.client(&setup.pki.admin()).await;
    let status = admin
        .get_status(StatusRequest {})
        .await
        .expect("admin status")
        .into_inner();
    let n2_acked = status
        .nodes
        .iter()
        .find(|n| n.node == "n2")
        .map_or(0, |n| n.acked_revision);
    assert_eq!(n2_acked, 0, "{status:?}");
    // An administrator reads status but does not act for a node.
    let error = admin
        .watch_snapshots(watch_request("n1", 0))
        .await
        .expect_err("admin watch");
    assert_eq!(error.code(), Code::PermissionDenied);

    let metrics = setup.metrics();
    for method in [
        "WatchSnapshots",
        "Ack",
        "RegisterListener",
        "RegisterWorkload",
    ] {
        assert!(
            metrics.contains(&format!(
                "stackroute_controller_denied_requests_total{{method=\"{method}\",reason=\"other-node\"}}"
            )),
            "{method}: {metrics}"
        );
    }
}

#[tokio::test]
async fn a_huge_known_revision_is_ignored() {
    let setup = setup().await;
    let mut n1 = setup.node("n1").await;
    let update = first_update(&mut n1, watch_request("n1", u64::MAX - 1)).await;
    assert!(
        update.revision < u64::MAX / 2,
        "the controller adopted the caller's revision: {}",
        update.revision
    );
    // Later revisions keep increasing from the controller's own.
    std::fs::write(
        setup.dir.path().join("state").join("policy.yaml"),
        policy("Kernel", "Cubic"),
    )
    .expect("write");
    let mut stream = n1
        .watch_snapshots(watch_request("n1", update.revision))
        .await
        .expect("watch")
        .into_inner();
    let later = tokio::time::timeout(WAIT, async {
        loop {
            let next = stream.message().await.expect("stream").expect("update");
            if next.revision > update.revision {
                return next;
            }
        }
    })
    .await
    .expect("a later revision");
    assert!(later.revision < u64::MAX / 2, "{}", later.revision);
}

#[tokio::test]
async fn oversize_requests_and_stream_floods_are_refused() {
    let setup = setup().await;
    // A client that would send anything: the limit must hold at the controller.
    let mut n1 = setup.node("n1").await.max_encoding_message_size(usize::MAX);
    // 100 KiB: over the 64 KiB request limit (the validator's own limits are smaller still).
    let error = n1
        .register_listener(listener("n1", 8080, 100 * 1024))
        .await
        .expect_err("oversize request");
    assert_eq!(error.code(), Code::OutOfRange, "{error:?}");
    assert!(error.message().contains("too large"), "{error:?}");
    // The controller still serves.
    first_update(&mut n1, watch_request("n1", 0)).await;

    // At most four snapshot streams per node.
    let mut streams = Vec::new();
    for _ in 0..4 {
        streams.push(
            n1.watch_snapshots(watch_request("n1", 0))
                .await
                .expect("watch within the limit"),
        );
    }
    let error = n1
        .watch_snapshots(watch_request("n1", 0))
        .await
        .expect_err("fifth stream");
    assert_eq!(error.code(), Code::ResourceExhausted, "{error:?}");
    // Another node is not affected.
    let mut n2 = setup.node("n2").await;
    first_update(&mut n2, watch_request("n2", 0)).await;
    // Closing one stream frees its slot.
    drop(streams.pop());
    tokio::time::sleep(Duration::from_millis(300)).await;
    n1.watch_snapshots(watch_request("n1", 0))
        .await
        .expect("a freed slot");
}

#[tokio::test]
async fn quotas_bound_what_a_node_registers() {
    let setup = setup_with(&["--max-listeners-per-node", "2"]).await;
    let mut n1 = setup.node("n1").await;
    for port in [8080, 8081] {
        n1.register_listener(listener("n1", port, 8))
            .await
            .expect("within the quota");
    }
    let error = n1
        .register_listener(listener("n1", 8082, 8))
        .await
        .expect_err("over the quota");
    assert_eq!(error.code(), Code::ResourceExhausted);
    assert_eq!(error.message(), "node n1 is at its quota of 2 listeners");
    // At its quota a node still re-registers what it holds (an agent re-sends on reconnect).
    n1.register_listener(listener("n1", 8081, 16))
        .await
        .expect("a re-registration at the quota");
    // Another node has its own quota.
    let mut n2 = setup.node("n2").await;
    n2.register_listener(listener("n2", 8082, 8))
        .await
        .expect("n2's own quota");
    assert!(setup.metrics().contains(
        "stackroute_controller_denied_requests_total{method=\"RegisterListener\",reason=\"quota\"} 1"
    ));
}

#[tokio::test]
async fn registrations_of_a_departed_agent_expire() {
    let setup = setup_with(&["--registration-lease-secs", "1"]).await;
    let mut admin = setup.client(&setup.pki.admin()).await;
    // n1's agent stays (its watch stream is open); n2's registers and leaves.
    let mut n1 = setup.node("n1").await;
    n1.register_listener(listener("n1", 8080, 8))
        .await
        .expect("n1 listener");
    let _n1_watch = n1
        .watch_snapshots(watch_request("n1", 0))
        .await
        .expect("n1 watch");
    {
        let mut n2 = setup.node("n2").await;
        n2.register_listener(listener("n2", 8080, 8))
            .await
            .expect("n2 listener");
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let status = admin
            .get_status(StatusRequest {})
            .await
            .expect("status")
            .into_inner();
        if status.listeners == 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "n2's listener did not expire: {} listeners",
            status.listeners
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // What remains is n1's: its agent is connected.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status = admin
        .get_status(StatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!(
        status.listeners, 1,
        "n1's listener must stay while its agent watches"
    );
    assert!(
        setup.metrics().contains(
            "stackroute_controller_registrations_total{kind=\"listener\",op=\"expire\"} 1"
        ),
        "{}",
        setup.metrics()
    );
}
