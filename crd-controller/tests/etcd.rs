//! The controller with its registries in a real etcd (Debian `etcd-server`), started by the
//! test on free loopback ports. Skipped visibly when etcd is not installed, unless
//! `STACKROUTE_REQUIRE_ETCD=1`.

mod common;

use std::time::Duration;

use common::{CLUSTER, Controller, Etcd, decide, next_matching, policy, status, watch};
use stackroute_proto::v1alpha1::{Listener, ListenerKey, Protocol, Stack, Workload, WorkloadKey};

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

#[tokio::test]
async fn a_listener_registered_through_one_replica_reaches_agents_of_another() {
    let Some(etcd) = Etcd::start("replicas").await else {
        return;
    };
    let dir = state_dir();
    let etcd_args = [
        "--etcd-endpoints",
        etcd.endpoint.as_str(),
        "--etcd-prefix",
        "/t1/",
    ];
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

    // Removal through B reaches an agent of A.
    let mut agent_on_a = watch(&mut client_a, "n2").await;
    next_matching(
        &mut agent_on_a,
        WAIT,
        "n2's snapshot with the listener",
        |u| u.listeners.len() == 1,
    )
    .await;
    client_b
        .remove_listener(rdma_listener(5432).key.expect("key"))
        .await
        .expect("RemoveListener on B");
    next_matching(&mut agent_on_a, WAIT, "the removal via A", |u| {
        u.listeners.is_empty()
    })
    .await;
}

#[tokio::test]
async fn a_killed_and_restarted_controller_loses_no_registration() {
    let Some(etcd) = Etcd::start("restart").await else {
        return;
    };
    let dir = state_dir();
    let etcd_args = [
        "--etcd-endpoints",
        etcd.endpoint.as_str(),
        "--etcd-prefix",
        "/t2/",
    ];
    let mut controller = Controller::start(dir.path(), dir.path(), &etcd_args).await;
    let mut client = controller.client().await;
    client
        .register_listener(rdma_listener(7000))
        .await
        .expect("RegisterListener");
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
        stackroute_snapshot::Snapshot::parse(&u.snapshot)
            .expect("decodes")
            .workload_by_name("shop", "web-3")
            .is_some()
    })
    .await;
    drop(stream);

    controller.restart().await; // kill -9, then start again on the same ports
    let mut client = controller.client().await;
    let report = status(&mut client).await;
    assert_eq!((report.listeners, report.workloads), (1, 1), "{report:?}");
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
    assert_eq!(after.listeners, vec![rdma_listener(7000)]);
    assert_eq!(decide(&after, "shop", "web-3", "8.8.8.8:443"), "Kernel/BBR");
}
