//! The controller binary in standalone mode (embedded store), driven over real gRPC.

mod common;

use std::time::Duration;

use common::{CLUSTER, Controller, decide, next_matching, policy, status, watch};
use stackroute_proto::v1alpha1::{
    ApiVersion, Listener, ListenerKey, Protocol, RegistrationResponse, WatchRequest, Workload,
    WorkloadKey,
};

const WAIT: Duration = Duration::from_secs(10);

fn state_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("state dir");
    std::fs::write(dir.path().join("cluster.yaml"), CLUSTER).expect("write");
    std::fs::write(dir.path().join("policy.yaml"), policy("Kernel", "BBR")).expect("write");
    dir
}

#[tokio::test]
async fn a_state_change_reaches_a_watching_agent_as_a_new_revision() {
    let dir = state_dir();
    let controller = Controller::start(dir.path(), dir.path(), &[]).await;
    let mut client = controller.client().await;
    let mut stream = watch(&mut client, "n1").await;
    let first = next_matching(&mut stream, WAIT, "the first snapshot", |_| true).await;
    assert_eq!(first.node, "n1");
    assert_eq!(decide(&first, "shop", "web-0", "8.8.8.8:443"), "Kernel/BBR");

    std::fs::write(dir.path().join("policy.yaml"), policy("Userspace", "Cubic")).expect("write");
    let changed = next_matching(&mut stream, WAIT, "the changed policy", |u| {
        decide(u, "shop", "web-0", "8.8.8.8:443") == "Userspace/Cubic"
    })
    .await;
    assert!(changed.revision > first.revision);

    // The status shows the policy accepted and, once n1 acks, programmed.
    client
        .ack(stackroute_proto::v1alpha1::AckRequest {
            node: "n1".into(),
            agent_id: "test-n1".into(),
            revision: changed.revision,
            error: String::new(),
        })
        .await
        .expect("Ack");
    let report = status(&mut client).await;
    assert_eq!(report.revision, changed.revision);
    let web = report
        .policies
        .iter()
        .find(|p| p.name == "web")
        .expect("policy in status");
    assert!(web.accepted && web.programmed, "{web:?}");
    assert_eq!((web.target_nodes, web.programmed_nodes), (1, 1));
    let n1 = report.nodes.iter().find(|n| n.node == "n1").expect("n1");
    assert!(
        n1.connected && !n1.stale && n1.acked_revision == changed.revision,
        "{n1:?}"
    );

    // Metrics carry the revision and the ack.
    let (code, metrics) = common::http_get(controller.http, "/metrics").expect("/metrics");
    assert_eq!(code, 200);
    assert!(
        metrics.contains(&format!(
            "stackroute_controller_revision {}",
            changed.revision
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "stackroute_controller_node_acked_revision{{node=\"n1\"}} {}",
            changed.revision
        )),
        "{metrics}"
    );
    assert_eq!(
        common::http_get(controller.http, "/healthz").map(|r| r.0),
        Some(200)
    );
}

#[tokio::test]
async fn a_malformed_file_is_reported_and_its_last_good_version_stays_in_force() {
    let dir = state_dir();
    let controller = Controller::start(dir.path(), dir.path(), &[]).await;
    let mut client = controller.client().await;
    let mut stream = watch(&mut client, "n1").await;
    next_matching(&mut stream, WAIT, "the first snapshot", |u| {
        decide(u, "shop", "web-0", "8.8.8.8:443") == "Kernel/BBR"
    })
    .await;

    // A YAML syntax error on line 9, and at the same time a change in another file.
    let broken = policy("Userspace", "Cubic")
        .replace("congestionControl: Cubic}", "congestionControl: [Cubic}");
    std::fs::write(dir.path().join("policy.yaml"), broken).expect("write");
    let more = format!(
        "{CLUSTER}- apiVersion: v1\n  kind: Pod\n  metadata: {{name: web-1, namespace: shop, labels: {{app: web}}}}\n  spec: {{nodeName: n1, containers: []}}\n  status: {{podIP: 10.1.0.11}}\n"
    );
    std::fs::write(dir.path().join("cluster.yaml"), more).expect("write");

    let update = next_matching(&mut stream, WAIT, "web-1 from the other file", |u| {
        stackroute_snapshot::Snapshot::parse(&u.snapshot)
            .expect("decodes")
            .workload_by_name("shop", "web-1")
            .is_some()
    })
    .await;
    // The broken file's last good version is still in force, for the new pod too.
    assert_eq!(
        decide(&update, "shop", "web-0", "8.8.8.8:443"),
        "Kernel/BBR"
    );
    assert_eq!(
        decide(&update, "shop", "web-1", "8.8.8.8:443"),
        "Kernel/BBR"
    );

    let report = status(&mut client).await;
    let policy_file = dir.path().join("policy.yaml").display().to_string();
    assert_eq!(report.source_errors.len(), 1, "{:?}", report.source_errors);
    let error = &report.source_errors[0];
    assert!(
        error.starts_with(&format!("{policy_file}:9: invalid YAML")),
        "{error}"
    );
    assert!(error.contains("last good version"), "{error}");
    assert!(controller.log_text().contains(&format!("{policy_file}:9")));

    // An invalid (but well-formed) policy: rejected with its field path, old version kept.
    let invalid = policy("Kernel", "BBR").replace(
        "  - name: all\n",
        "  - name: all\n    ports: [{port: 90, endPort: 80}]\n",
    );
    std::fs::write(dir.path().join("policy.yaml"), invalid).expect("write");
    let report = common::wait_for("the invalid policy in status", WAIT, || {
        let mut client = client.clone();
        async move {
            let report = status(&mut client).await;
            report
                .source_errors
                .iter()
                .any(|e| e.contains("endPort"))
                .then_some(report)
        }
    })
    .await;
    let web = report
        .policies
        .iter()
        .find(|p| p.name == "web")
        .expect("web");
    assert!(!web.accepted, "{web:?}");
    assert!(
        web.message.contains(&format!(
            "{policy_file}:2: StackRoute/shop/web: spec.rules[0].ports[0]"
        )),
        "{}",
        web.message
    );

    // Fixing the file clears the error and applies the new version.
    std::fs::write(dir.path().join("policy.yaml"), policy("Userspace", "BBR")).expect("write");
    next_matching(&mut stream, WAIT, "the fixed policy", |u| {
        decide(u, "shop", "web-0", "8.8.8.8:443") == "Userspace/BBR"
    })
    .await;
    assert!(status(&mut client).await.source_errors.is_empty());
}

#[tokio::test]
async fn malformed_grpc_requests_are_rejected_and_the_server_keeps_serving() {
    let dir = state_dir();
    let controller = Controller::start(dir.path(), dir.path(), &[]).await;
    let mut client = controller.client().await;

    let code = |result: Result<tonic::Response<RegistrationResponse>, tonic::Status>| {
        let status = result.expect_err("rejected");
        (status.code(), status.message().to_string())
    };
    let listener = |node: &str, ip: &str, port: u32, protocol: Protocol| Listener {
        key: Some(ListenerKey {
            node: node.into(),
            ip: ip.into(),
            port,
            protocol: protocol as i32,
        }),
        ..Default::default()
    };
    let invalid = tonic::Code::InvalidArgument;
    assert_eq!(
        code(
            client
                .register_listener(listener("n1", "10.0.0.300", 80, Protocol::Tcp))
                .await
        ),
        (
            invalid,
            "key.ip \"10.0.0.300\" is not an IPv4 or IPv6 address".into()
        )
    );
    assert_eq!(
        code(
            client
                .register_listener(listener("n1", "10.1.0.10", 0, Protocol::Tcp))
                .await
        ),
        (invalid, "key.port must be 1..=65535, got 0".into())
    );
    assert_eq!(
        code(
            client
                .register_listener(listener("", "10.1.0.10", 80, Protocol::Tcp))
                .await
        ),
        (invalid, "key.node must not be empty".into())
    );
    assert_eq!(
        code(
            client
                .register_listener(listener("n1", "10.1.0.10", 80, Protocol::Unspecified))
                .await
        ),
        (
            invalid,
            "key.protocol must be PROTOCOL_TCP or PROTOCOL_UDP, got 0".into()
        )
    );
    assert_eq!(
        code(client.register_listener(Listener::default()).await),
        (invalid, "key is required".into())
    );
    let workload = Workload {
        key: Some(WorkloadKey {
            node: "n1".into(),
            namespace: String::new(),
            name: "w".into(),
        }),
        ..Default::default()
    };
    assert_eq!(
        code(client.register_workload(workload).await),
        (invalid, "key.namespace must not be empty".into())
    );
    let watch_error = |request: WatchRequest| {
        let mut client = client.clone();
        async move {
            client
                .watch_snapshots(request)
                .await
                .expect_err("rejected")
                .code()
        }
    };
    assert_eq!(
        watch_error(WatchRequest {
            node: String::new(),
            api_version: ApiVersion::V1alpha1 as i32,
            ..Default::default()
        })
        .await,
        invalid
    );
    assert_eq!(
        watch_error(WatchRequest {
            node: "n1".into(),
            api_version: 7,
            ..Default::default()
        })
        .await,
        invalid
    );

    // Bytes that are not a Listener at all: field 1 (key, a message) sent as a varint.
    #[derive(Clone, PartialEq, prost::Message)]
    struct NotAListener {
        #[prost(uint64, tag = "1")]
        key: u64,
        #[prost(bytes = "vec", tag = "4")]
        stacks: Vec<u8>,
    }
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", controller.grpc))
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut raw = tonic::client::Grpc::new(channel);
    raw.ready().await.expect("ready");
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/stackroute.v1alpha1.Distribution/RegisterListener",
    );
    let garbage: Result<tonic::Response<RegistrationResponse>, tonic::Status> = raw
        .unary(
            tonic::Request::new(NotAListener {
                key: 12345,
                stacks: vec![0xff; 16],
            }),
            path,
            tonic_prost::ProstCodec::default(),
        )
        .await;
    let status = garbage.expect_err("undecodable request rejected");
    assert_ne!(status.code(), tonic::Code::Ok);

    // Still serving, and nothing invalid was registered.
    let report = status_after(&mut client).await;
    assert_eq!(report.listeners, 0);
    assert_eq!(report.workloads, 0);
    let ok = client
        .register_listener(listener("n1", "10.1.0.10", 8080, Protocol::Tcp))
        .await
        .expect("a valid registration still works");
    assert!(ok.into_inner().revision > 0);
    let (_, metrics) = common::http_get(controller.http, "/metrics").expect("/metrics");
    assert!(
        metrics.contains(
            "stackroute_controller_invalid_requests_total{method=\"RegisterListener\"} 5"
        ),
        "{metrics}"
    );
}

async fn status_after(
    client: &mut stackroute_proto::v1alpha1::distribution_client::DistributionClient<
        tonic::transport::Channel,
    >,
) -> stackroute_proto::v1alpha1::StatusResponse {
    status(client).await
}

#[tokio::test]
async fn registered_workloads_become_pods_and_unknown_nodes_get_snapshots() {
    let dir = state_dir();
    let controller = Controller::start(dir.path(), dir.path(), &[]).await;
    let mut client = controller.client().await;
    // n9 is in no state file.
    let mut stream = watch(&mut client, "n9").await;
    let first = next_matching(&mut stream, WAIT, "n9's first snapshot", |_| true).await;
    assert_eq!(first.node, "n9");
    client
        .register_workload(Workload {
            key: Some(WorkloadKey {
                node: "n9".into(),
                namespace: "shop".into(),
                name: "web-9".into(),
            }),
            labels: [("app".to_string(), "web".to_string())].into(),
            ips: vec!["10.9.0.1".into()],
        })
        .await
        .expect("RegisterWorkload");
    let update = next_matching(&mut stream, WAIT, "web-9 in n9's snapshot", |u| {
        stackroute_snapshot::Snapshot::parse(&u.snapshot)
            .expect("decodes")
            .workload_by_name("shop", "web-9")
            .is_some()
    })
    .await;
    // The web policy selects it by its registered labels.
    assert_eq!(
        decide(&update, "shop", "web-9", "8.8.8.8:443"),
        "Kernel/BBR"
    );
    let report = status(&mut client).await;
    assert_eq!(report.workloads, 1);
    let web = report
        .policies
        .iter()
        .find(|p| p.name == "web")
        .expect("web");
    assert_eq!(web.target_nodes, 2, "n1 (web-0) and n9 (web-9): {web:?}");
}

#[tokio::test]
async fn a_slow_watcher_does_not_delay_the_others() {
    let dir = state_dir();
    let controller = Controller::start(dir.path(), dir.path(), &[]).await;
    // The slow agent has its own connection and never reads.
    let mut slow_client = controller.tiny_window_client().await;
    let mut slow = watch(&mut slow_client, "n2").await;
    let mut client = controller.client().await;
    let mut fast = watch(&mut client, "n1").await;
    let mut last = next_matching(&mut fast, WAIT, "the first snapshot", |_| true).await;

    let flavours = [
        ("Userspace", "BBR"),
        ("Kernel", "Cubic"),
        ("Userspace", "Reno"),
    ];
    for round in 0..9 {
        let (stack, cc) = flavours[round % flavours.len()];
        let started = std::time::Instant::now();
        std::fs::write(dir.path().join("policy.yaml"), policy(stack, cc)).expect("write");
        let expected = format!("{stack}/{cc}");
        last = next_matching(&mut fast, WAIT, "the fast agent's update", |u| {
            decide(u, "shop", "web-0", "8.8.8.8:443") == expected
        })
        .await;
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "round {round} took {:?}",
            started.elapsed()
        );
    }

    // The slow agent now reads: it reaches the latest revision having skipped most others.
    let mut seen = 0;
    let caught_up = next_matching(&mut slow, WAIT, "the slow agent to catch up", |u| {
        seen += 1;
        u.revision >= last.revision
    })
    .await;
    eprintln!("slow agent saw {seen} updates");
    assert_eq!(caught_up.revision, last.revision);
    assert!(
        seen < 9,
        "the slow agent got {seen} updates: it should skip stale ones"
    );
}

#[tokio::test]
async fn network_policy_gating_reaches_status_and_metrics() {
    // examples/network-policy: RDMA toward parameter servers, one of which NetworkPolicy
    // does not admit from the trainers' namespace.
    let examples =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/network-policy");
    let dir = tempfile::tempdir().expect("state dir");
    for file in ["cluster.yaml", "policies.yaml"] {
        std::fs::copy(examples.join(file), dir.path().join(file)).expect("copy example");
    }
    let controller = Controller::start(dir.path(), dir.path(), &[]).await;
    let mut client = controller.client().await;
    let report = status(&mut client).await;
    let fabric = report
        .policies
        .iter()
        .find(|p| p.name == "trainer-fabric")
        .expect("trainer-fabric in status");
    assert!(fabric.accepted, "{fabric:?}");
    assert!(fabric.network_policy_gated_rules > 0, "{fabric:?}");
    assert!(
        fabric.network_policy_message.contains("network-policy")
            && fabric.network_policy_message.contains("Rdma"),
        "{}",
        fabric.network_policy_message
    );
    let (_, metrics) = common::http_get(controller.http, "/metrics").expect("/metrics");
    let gauge = metrics
        .lines()
        .find_map(|l| l.strip_prefix("stackroute_controller_network_policy_gated_rules "))
        .expect("the gated-rules gauge");
    assert_eq!(
        gauge.trim().parse::<u32>().expect("a number"),
        fabric.network_policy_gated_rules
    );
}
