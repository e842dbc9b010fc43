//! The controller with its registries in a real etcd (Debian `etcd-server`), started by the
//! test on free loopback ports. Without etcd the trials show as ignored with the reason, unless
//! `STACKROUTE_REQUIRE_ETCD=1`.

mod common;

use std::process::ExitCode;
use std::time::Duration;

use common::{CLUSTER, Controller, Etcd, decide, next_matching, policy, status, watch, watch_from};
use stackroute_proto::v1alpha1::distribution_client::DistributionClient;
use stackroute_proto::v1alpha1::{
    AckRequest, Listener, ListenerKey, NodeStatus, PolicyStatus, Protocol, SnapshotUpdate, Stack,
    StatusResponse, Workload, WorkloadKey,
};
use stackroute_snapshot::{Snapshot, delta};
use testkit::Trial;
use tonic::transport::Channel;

const WAIT: Duration = Duration::from_secs(10);

fn state_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("state dir");
    std::fs::write(dir.path().join("cluster.yaml"), CLUSTER).expect("write");
    std::fs::write(dir.path().join("policy.yaml"), policy("Kernel", "BBR")).expect("write");
    dir
}

fn rdma_listener(port: u32) -> Listener {
    Listener {
        key: Some(ListenerKey {
            node: "n2".into(),
            ip: "10.1.0.20".into(),
            port,
            protocol: Protocol::Tcp as i32,
        }),
        namespace: "shop".into(),
        workload: "db-0".into(),
        stacks: vec![Stack::Kernel as i32, Stack::Rdma as i32],
        endpoints: [("RDMA".to_string(), "fe80::1:4791".to_string())].into(),
    }
}

fn main() -> ExitCode {
    // etcd from Debian's etcd-server; without it the trials show as ignored with the reason.
    testkit::run(vec![
        Trial::gated(
            "a_listener_registered_through_one_replica_reaches_agents_of_another",
            common::etcd_installed,
            |_| {
                testkit::block_on(
                    a_listener_registered_through_one_replica_reaches_agents_of_another(),
                )
            },
        ),
        Trial::gated(
            "a_killed_and_restarted_controller_loses_no_registration",
            common::etcd_installed,
            |_| testkit::block_on(a_killed_and_restarted_controller_loses_no_registration()),
        ),
        Trial::gated(
            "the_controller_talks_to_etcd_over_tls_with_a_client_certificate",
            common::etcd_installed,
            |_| {
                testkit::block_on(the_controller_talks_to_etcd_over_tls_with_a_client_certificate())
            },
        ),
        Trial::gated(
            "agents_holding_different_revisions_fail_over_to_another_replica",
            common::etcd_installed,
            |_| {
                testkit::block_on(agents_holding_different_revisions_fail_over_to_another_replica())
            },
        ),
        Trial::gated(
            "acks_through_one_replica_program_policies_in_the_status_of_another",
            common::etcd_installed,
            |_| {
                testkit::block_on(
                    acks_through_one_replica_program_policies_in_the_status_of_another(),
                )
            },
        ),
    ])
}

async fn a_listener_registered_through_one_replica_reaches_agents_of_another() {
    let etcd = Etcd::start().await;
    let dir = state_dir();
    let etcd_args = etcd.args("/t1/");
    let a = Controller::start(dir.path(), dir.path(), &etcd_args).await;
    let b = Controller::start(dir.path(), dir.path(), &etcd_args).await;
    let mut client_a = a.client().await;
    let mut client_b = b.client().await;

    let mut agent_on_b = watch(&mut client_b, "n1").await;
    let first = next_matching(&mut agent_on_b, WAIT, "n1's snapshot from B", |_| true).await;
    assert!(first.listeners.is_empty());

    let promised = client_a
        .register_listener(rdma_listener(5432))
        .await
        .expect("RegisterListener on A")
        .into_inner()
        .revision;
    let update = next_matching(&mut agent_on_b, WAIT, "the listener via B", |u| {
        !u.listeners.is_empty()
    })
    .await;
    assert_eq!(update.listeners, vec![rdma_listener(5432)]);
    assert!(update.revision > first.revision);
    assert!(promised > 0);

    // Revisions come from etcd: B's next revision is above anything A handed out.
    let a_status = status(&mut client_a).await;
    assert!(update.revision > 0 && a_status.revision > 0);
    assert_eq!(status(&mut client_b).await.listeners, 1);

    // Removal through B reaches an agent of A (n1's: web pods may pick RDMA; n2 runs only db,
    // whose policies cannot, and gets no listeners at all).
    let mut agent_on_a = watch(&mut client_a, "n1").await;
    next_matching(
        &mut agent_on_a,
        WAIT,
        "n1's snapshot with the listener",
        |u| u.listeners.len() == 1,
    )
    .await;
    let mut n2_on_a = watch(&mut client_a, "n2").await;
    let n2 = next_matching(&mut n2_on_a, WAIT, "n2's snapshot", |_| true).await;
    assert!(n2.listeners.is_empty() && !n2.listeners_unchanged);
    client_b
        .remove_listener(rdma_listener(5432).key.expect("key"))
        .await
        .expect("RemoveListener on B");
    next_matching(&mut agent_on_a, WAIT, "the removal via A", |u| {
        u.listeners.is_empty()
    })
    .await;
}

async fn a_killed_and_restarted_controller_loses_no_registration() {
    let etcd = Etcd::start().await;
    let dir = state_dir();
    let etcd_args = etcd.args("/t2/");
    let mut controller = Controller::start(dir.path(), dir.path(), &etcd_args).await;
    let mut client = controller.client().await;
    // More listeners than one page of the controller's initial read (200 keys): a restart
    // reads them all, in pages at one revision.
    for port in std::iter::once(7000).chain(10_000..10_450) {
        client
            .register_listener(rdma_listener(port))
            .await
            .expect("RegisterListener");
    }
    client
        .register_workload(Workload {
            key: Some(WorkloadKey {
                node: "n3".into(),
                namespace: "shop".into(),
                name: "web-3".into(),
            }),
            labels: [("app".to_string(), "web".to_string())].into(),
            ips: vec!["10.3.0.1".into()],
        })
        .await
        .expect("RegisterWorkload");
    let mut stream = watch(&mut client, "n3").await;
    let before = next_matching(&mut stream, WAIT, "web-3 before the restart", |u| {
        Snapshot::parse(&u.snapshot)
            .expect("decodes")
            .workload_by_name("shop", "web-3")
            .is_some()
    })
    .await;
    drop(stream);

    controller.restart().await; // kill -9, then start again on the same ports
    let mut client = controller.client().await;
    let report = status(&mut client).await;
    assert_eq!((report.listeners, report.workloads), (451, 1), "{report:?}");
    let mut stream = watch(&mut client, "n3").await;
    let after = next_matching(&mut stream, WAIT, "n3's snapshot after the restart", |_| {
        true
    })
    .await;
    assert!(
        after.revision > before.revision,
        "revisions stay monotonic across restarts: {} then {}",
        before.revision,
        after.revision
    );
    assert_eq!(after.listeners.len(), 451);
    assert!(after.listeners.contains(&rdma_listener(7000)));
    assert_eq!(decide(&after, "shop", "web-3", "8.8.8.8:443"), "Kernel/BBR");
}

/// Polls replica's status until `accept` holds for it (10 s).
async fn status_until(
    client: &mut DistributionClient<Channel>,
    what: &str,
    accept: impl Fn(&StatusResponse) -> bool,
) -> StatusResponse {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let report = status(client).await;
        if accept(&report) {
            return report;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {WAIT:?} waiting for {what}; last status: {report:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn web(report: &StatusResponse) -> &PolicyStatus {
    report
        .policies
        .iter()
        .find(|p| p.name == "web")
        .expect("web in the status")
}

fn n1(report: &StatusResponse) -> Option<&NodeStatus> {
    report.nodes.iter().find(|n| n.node == "n1")
}

fn ack(revision: u64) -> AckRequest {
    AckRequest {
        node: "n1".into(),
        agent_id: "test-n1".into(),
        revision,
        error: String::new(),
    }
}

async fn acks_through_one_replica_program_policies_in_the_status_of_another() {
    let etcd = Etcd::start().await;
    // Malformed acks left in etcd are logged and skipped; the one of n1 gets replaced.
    let mut kv = etcd_client::Client::connect([etcd.endpoint.as_str()], None)
        .await
        .expect("etcd client");
    for (key, value) in [
        ("/t3/acks/n1", "garbage"),
        ("/t3/acks/bad node", "00000000000000000001"),
    ] {
        kv.put(key, value, None).await.expect("etcd put");
    }
    // Each replica reads its own state directory, so the test decides which one sees a new
    // spec first.
    let dir_a = state_dir();
    let dir_b = state_dir();
    let etcd_args = etcd.args("/t3/");
    let a = Controller::start(dir_a.path(), dir_a.path(), &etcd_args).await;
    let b = Controller::start(dir_b.path(), dir_b.path(), &etcd_args).await;
    let mut client_a = a.client().await;
    let mut client_b = b.client().await;
    assert!(
        a.log_text().contains("skipping a malformed ack"),
        "{}",
        a.log_text()
    );

    // An agent of n1 watches replica B and acks there; replica A (the status writer, say)
    // sees the node acked and the policy programmed.
    let mut agent_on_b = watch(&mut client_b, "n1").await;
    let u1 = next_matching(&mut agent_on_b, WAIT, "n1's snapshot from B", |_| true).await;
    assert_eq!(decide(&u1, "shop", "web-0", "8.8.8.8:443"), "Kernel/BBR");
    client_b.ack(ack(u1.revision)).await.expect("Ack on B");
    let report = status_until(&mut client_a, "A to see n1's ack through B", |r| {
        n1(r).is_some_and(|n| n.acked_revision == u1.revision) && web(r).programmed
    })
    .await;
    assert_eq!(
        (web(&report).target_nodes, web(&report).programmed_nodes),
        (1, 1)
    );
    let node = n1(&report).expect("n1");
    assert!(!node.connected && node.agents.is_empty(), "{node:?}");
    let stored = kv.get("/t3/acks/n1", None).await.expect("etcd get");
    let value = String::from_utf8_lossy(stored.kvs()[0].value()).to_string();
    assert!(
        value.starts_with(&format!("{:020} ", u1.revision)),
        "{value}"
    );
    assert!(
        b.log_text().contains("replacing a malformed ack in etcd"),
        "{}",
        b.log_text()
    );
    let report = status(&mut client_b).await;
    assert!(web(&report).programmed && n1(&report).is_some_and(|n| n.connected));

    // B sees a new spec first: its revision is below A's first one with that spec, and still
    // programs it (comparing revisions would wait for a later B revision that never comes).
    std::fs::write(dir_b.path().join("policy.yaml"), policy("Kernel", "Cubic")).expect("write");
    let u2 = next_matching(&mut agent_on_b, WAIT, "Cubic from B", |u| {
        decide(u, "shop", "web-0", "8.8.8.8:443") == "Kernel/Cubic"
    })
    .await;
    std::fs::write(dir_a.path().join("policy.yaml"), policy("Kernel", "Cubic")).expect("write");
    let report = status_until(&mut client_a, "A to compile Cubic", |r| {
        r.revision > u2.revision && !web(r).programmed
    })
    .await;
    assert_eq!(web(&report).programmed_nodes, 0);
    client_b.ack(ack(u2.revision)).await.expect("Ack on B");
    let report = status_until(&mut client_a, "Cubic programmed through B", |r| {
        n1(r).is_some_and(|n| n.acked_revision == u2.revision) && web(r).programmed
    })
    .await;
    assert!(u2.revision < report.revision);

    // A sees a new spec first; B then compiles a later revision without it: acked, but not
    // programmed (comparing revisions would say it is).
    std::fs::write(dir_a.path().join("policy.yaml"), policy("Kernel", "Reno")).expect("write");
    let a_revision = status_until(&mut client_a, "A to compile Reno", |r| !web(r).programmed)
        .await
        .revision;
    let mut cluster = std::fs::read_to_string(dir_b.path().join("cluster.yaml")).expect("read");
    cluster.push_str("# touched: B recompiles\n");
    std::fs::write(dir_b.path().join("cluster.yaml"), cluster).expect("write");
    let u3 = next_matching(&mut agent_on_b, WAIT, "B's next revision", |u| {
        u.revision > u2.revision
    })
    .await;
    assert_eq!(decide(&u3, "shop", "web-0", "8.8.8.8:443"), "Kernel/Cubic");
    assert!(u3.revision > a_revision, "{} > {a_revision}", u3.revision);
    client_b.ack(ack(u3.revision)).await.expect("Ack on B");
    let report = status_until(
        &mut client_a,
        "A to see the ack of B's later revision",
        |r| n1(r).is_some_and(|n| n.acked_revision == u3.revision),
    )
    .await;
    let policy_status = web(&report);
    assert!(
        !policy_status.programmed && policy_status.programmed_nodes == 0,
        "{policy_status:?}"
    );
    // Once B has the spec too and the agent acks it, A reports it programmed.
    std::fs::write(dir_b.path().join("policy.yaml"), policy("Kernel", "Reno")).expect("write");
    let u4 = next_matching(&mut agent_on_b, WAIT, "Reno from B", |u| {
        decide(u, "shop", "web-0", "8.8.8.8:443") == "Kernel/Reno"
    })
    .await;
    client_b.ack(ack(u4.revision)).await.expect("Ack on B");
    status_until(&mut client_a, "Reno programmed through B", |r| {
        n1(r).is_some_and(|n| n.acked_revision == u4.revision) && web(r).programmed
    })
    .await;

    // An older ack never moves the shared one backwards.
    client_b.ack(ack(u1.revision)).await.expect("Ack on B");
    let stored = kv.get("/t3/acks/n1", None).await.expect("etcd get");
    let value = String::from_utf8_lossy(stored.kvs()[0].value()).to_string();
    assert!(
        value.starts_with(&format!("{:020} ", u4.revision)),
        "{value}"
    );
    let report = status(&mut client_a).await;
    assert_eq!(n1(&report).expect("n1").acked_revision, u4.revision);
}

async fn the_controller_talks_to_etcd_over_tls_with_a_client_certificate() {
    let dir = state_dir();
    let pki = testkit::pki::Pki::new(
        std::path::Path::new(env!("CARGO_BIN_EXE_stackroute-controller")),
        &dir.path().join("pki"),
        &[],
    );
    let etcd = Etcd::start_tls(&pki.server(), &dir.path().join("pki").join("ca.crt")).await;
    let client_dir = pki.admin().display().to_string();
    let args = [
        "--etcd-endpoints",
        etcd.endpoint.as_str(),
        "--etcd-prefix",
        "/tls/",
        "--etcd-tls-dir",
        client_dir.as_str(),
    ];
    let mut controller = Controller::start(dir.path(), dir.path(), &args).await;
    let mut client = controller.client().await;
    client
        .register_listener(rdma_listener(7000))
        .await
        .expect("register over a TLS etcd");
    controller.restart().await;
    let mut client = controller.client().await;
    assert_eq!(status(&mut client).await.listeners, 1, "kept in etcd");

    // Without the client certificate etcd refuses, and the controller says so and exits.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_stackroute-controller"))
        .arg("--state")
        .arg(dir.path())
        .args(["--insecure-plaintext", "--grpc-addr", "127.0.0.1:0"])
        .args(["--metrics-addr", "127.0.0.1:0"])
        .args(["--etcd-endpoints", etcd.endpoint.as_str()])
        .output()
        .expect("controller");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("etcd"), "{stderr}");
}

/// What an agent holds: the last snapshot it applied, rebuilt from deltas as the agent does.
struct Held {
    node: &'static str,
    /// `None` while the agent is away.
    stream: Option<tonic::Streaming<SnapshotUpdate>>,
    revision: u64,
    bytes: Vec<u8>,
    deltas: usize,
}

impl Held {
    async fn watch(client: &mut DistributionClient<Channel>, node: &'static str) -> Self {
        Self {
            node,
            stream: Some(watch_from(client, node, 0, true).await),
            revision: 0,
            bytes: Vec::new(),
            deltas: 0,
        }
    }

    /// Resumes on another replica with the revision held.
    async fn resume(&mut self, client: &mut DistributionClient<Channel>) {
        self.stream = Some(watch_from(client, self.node, self.revision, true).await);
    }

    /// How web-0 (on n1) reaches 8.8.8.8:443 in what it holds.
    fn web_transport(&self) -> String {
        let update = SnapshotUpdate {
            node: self.node.into(),
            revision: self.revision,
            snapshot: self.bytes.clone(),
            ..Default::default()
        };
        decide(&update, "shop", "web-0", "8.8.8.8:443")
    }

    /// Applies the next update (a delta must name the revision held and rebuild a snapshot that
    /// validates) and returns it.
    async fn next(&mut self, what: &str) -> SnapshotUpdate {
        let stream = self.stream.as_mut().expect("the agent is connected");
        let update = next_matching(stream, WAIT, what, |_| true).await;
        if update.delta.is_empty() {
            assert!(
                !update.snapshot.is_empty(),
                "{what}: neither snapshot nor delta"
            );
            self.bytes = update.snapshot.clone();
        } else {
            assert_eq!(
                update.base_revision, self.revision,
                "{what}: delta from another base"
            );
            self.bytes = delta::apply(&self.bytes, &update.delta)
                .unwrap_or_else(|e| panic!("{what}: the delta does not apply: {e}"));
            self.deltas += 1;
        }
        let snapshot = Snapshot::parse(&self.bytes).expect("what the agent holds validates");
        assert_eq!(snapshot.revision(), update.revision);
        self.revision = update.revision;
        update
    }
}

/// Two replicas share etcd. Agents of n1 and n2 watch replica A; n2's agent goes away after
/// the first revision, n1's stays and applies A's delta for the second. A dies; both resume on
/// B with the revision they hold (n1 the newer, n2 the older). B sends each what applies to it
/// — its first update to an agent it has sent nothing is whole — and deltas from then on; both
/// end byte for byte on the snapshot a fresh watcher of B gets.
async fn agents_holding_different_revisions_fail_over_to_another_replica() {
    let etcd = Etcd::start().await;
    let dir = state_dir();
    let etcd_args = etcd.args("/t5/");
    let mut a = Controller::start(dir.path(), dir.path(), &etcd_args).await;
    let b = Controller::start(dir.path(), dir.path(), &etcd_args).await;
    let mut client_a = a.client().await;
    let mut client_b = b.client().await;

    let mut n1 = Held::watch(&mut client_a, "n1").await;
    let mut n2 = Held::watch(&mut client_a, "n2").await;
    let first = n1.next("n1's first snapshot from A").await;
    n2.next("n2's first snapshot from A").await;
    assert_eq!(decide(&first, "shop", "web-0", "8.8.8.8:443"), "Kernel/BBR");
    let (n1_first, n2_first) = (n1.revision, n2.revision);

    // n2's agent goes away; n1's gets the next revision as a delta.
    n2.stream = None;
    std::fs::write(dir.path().join("policy.yaml"), policy("Kernel", "Cubic")).expect("write");
    while n1.web_transport() != "Kernel/Cubic" {
        n1.next("Cubic on n1 from A").await;
    }
    assert!(n1.deltas >= 1, "A sent n1 whole snapshots only");
    assert!(n1.revision > n1_first && n2.revision == n2_first);

    // A dies; each agent resumes on B holding a different revision.
    a.kill();
    n1.resume(&mut client_b).await;
    n2.resume(&mut client_b).await;
    let n1_resumed = n1.next("n1's first update from B").await;
    let n2_resumed = n2.next("n2's first update from B").await;
    assert!(n1_resumed.delta.is_empty() && n2_resumed.delta.is_empty());
    assert!(n1.revision > n1_first && n2.revision > n2_first);
    assert_eq!(n1.web_transport(), "Kernel/Cubic");

    // B's next revisions reach both as deltas from what B sent them.
    let deltas_before = (n1.deltas, n2.deltas);
    std::fs::write(dir.path().join("policy.yaml"), policy("Kernel", "Reno")).expect("write");
    while n1.web_transport() != "Kernel/Reno" {
        n1.next("Reno on n1 from B").await;
    }
    while n2.revision < n1.revision {
        n2.next("n2 catching up on B").await;
    }
    assert!(n1.deltas > deltas_before.0 && n2.deltas > deltas_before.1);
    for held in [&n1, &n2] {
        let mut fresh = watch(&mut client_b, held.node).await;
        let whole = next_matching(&mut fresh, WAIT, "a fresh watcher's snapshot", |u| {
            u.revision == held.revision
        })
        .await;
        assert!(
            whole.snapshot == held.bytes,
            "{}: what the agent rebuilt differs from B's snapshot of revision {}",
            held.node,
            held.revision
        );
    }
}
