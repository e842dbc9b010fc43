//! Pure index tests: no server, no store but the embedded one.

use std::time::{Duration, Instant};

use stackroute_proto::v1alpha1::{ListenerKey, Protocol, SnapshotUpdate, WorkloadKey};
use stackroute_snapshot::{NoTrace, Snapshot, delta};

use super::*;
use crate::store::MemoryStore;

const CLUSTER: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: n1, labels: {topology.kubernetes.io/zone: z1}}
status: {addresses: [{type: InternalIP, address: 10.0.0.1}]}
---
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: shop, labels: {app: web}}
spec: {nodeName: n1, containers: []}
status: {podIP: 10.1.0.10}
"#;

const POLICY_BBR: &str = r#"
apiVersion: stackroute.dev/v1alpha1
kind: StackRoute
metadata: {name: web, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  rules:
  - name: all
    transport: {stack: Kernel, congestionControl: BBR}
"#;

const POLICY_BROKEN: &str = r#"
apiVersion: stackroute.dev/v1alpha1
kind: StackRoute
metadata: {name: web, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  rules:
  - name: all
    ports: [{port: 90, endPort: 80}]
    transport: {stack: Userspace}
"#;

fn mk_index() -> (Index, watch::Receiver<bool>) {
    let (ready, ready_rx) = watch::channel(false);
    (
        Index::new(
            Settings::default(),
            Duration::from_secs(5),
            Arc::new(Metrics::default()),
            ready,
        ),
        ready_rx,
    )
}

fn changed(source: &str, text: &str) -> FileEvent {
    FileEvent::Changed(source.to_string(), text.to_string())
}

fn mk_workload(node: &str, name: &str, ip: &str) -> Workload {
    Workload {
        key: Some(WorkloadKey {
            node: node.into(),
            namespace: "shop".into(),
            name: name.into(),
        }),
        labels: [("app".to_string(), "web".to_string())].into(),
        ips: vec![ip.into()],
    }
}

// === debounce ===

#[test]
fn debounce_waits_for_quiet_then_fires() {
    let t0 = Instant::now();
    let ms = Duration::from_millis;
    let mut debouncer = Debouncer::new(ms(100), ms(1000));
    assert_eq!(debouncer.deadline(), None);
    debouncer.changed(t0);
    assert_eq!(debouncer.deadline(), Some(t0 + ms(100)));
    debouncer.changed(t0 + ms(60));
    assert_eq!(debouncer.deadline(), Some(t0 + ms(160)));
    debouncer.take();
    assert_eq!(debouncer.deadline(), None);
}

#[test]
fn debounce_fires_within_the_maximum_delay_under_constant_churn() {
    let t0 = Instant::now();
    let ms = Duration::from_millis;
    let mut debouncer = Debouncer::new(ms(100), ms(1000));
    for step in 0..40 {
        debouncer.changed(t0 + ms(step * 50));
        let deadline = debouncer.deadline().expect("due");
        assert!(
            deadline <= t0 + ms(1000),
            "step {step}: {:?}",
            deadline - t0
        );
    }
    assert_eq!(debouncer.deadline(), Some(t0 + ms(1000)));
}

#[test]
fn a_waiting_agent_makes_the_compile_urgent() {
    let t0 = Instant::now();
    let ms = Duration::from_millis;
    let mut debouncer = Debouncer::new(ms(100), ms(1000));
    debouncer.changed(t0);
    debouncer.urgent(t0 + ms(5));
    assert_eq!(debouncer.deadline(), Some(t0 + ms(15)));
    debouncer.take();
    debouncer.urgent(t0 + ms(20));
    assert_eq!(debouncer.deadline(), Some(t0 + ms(30)));
}

// === last good file ===

#[test]
fn a_broken_file_keeps_its_last_good_version_while_others_apply() {
    let (mut index, _) = mk_index();
    index.apply_file(changed("dir/cluster.yaml", CLUSTER));
    index.apply_file(changed("dir/policy.yaml", POLICY_BBR));
    assert_eq!(index.merged_state().stack_routes.len(), 1);

    index.apply_file(changed("dir/policy.yaml", POLICY_BROKEN));
    // Another file changes at the same time and applies.
    let more = CLUSTER
        .replace("web-0", "web-1")
        .replace("10.1.0.10", "10.1.0.11");
    index.apply_file(changed("dir/cluster.yaml", &more));

    let state = index.merged_state();
    assert_eq!(state.stack_routes.len(), 1, "the last good policy stays");
    let rule = &state.stack_routes[0].spec.rules[0];
    assert!(rule.ports.is_none(), "the broken version is not in force");
    assert_eq!(state.pods.len(), 1);
    assert_eq!(state.pods[0].name, "web-1");

    let status = index.status(Instant::now());
    assert_eq!(status.source_errors.len(), 1, "{:?}", status.source_errors);
    let error = &status.source_errors[0];
    assert!(
        error.starts_with("dir/policy.yaml:2: StackRoute/shop/web: spec.rules[0].ports[0]"),
        "{error}"
    );
    assert!(error.contains("last good version"), "{error}");
    assert_eq!(index.metrics.source_errors.get(), 1);

    // Removing the file removes its objects and its problem.
    index.apply_file(FileEvent::Removed("dir/policy.yaml".into()));
    assert!(index.merged_state().stack_routes.is_empty());
    assert!(index.status(Instant::now()).source_errors.is_empty());
}

// === registries ===

#[test]
fn a_registration_without_addresses_or_labels_keeps_the_file_pods() {
    let (mut index, _) = mk_index();
    index.apply_file(changed("c.yaml", CLUSTER));
    let file_pod = index.merged_state().pods[0].clone();
    assert!(!file_pod.ips.is_empty() && !file_pod.labels.is_empty());
    let mut bare = mk_workload("n1", "web-0", "");
    bare.ips.clear();
    bare.labels.clear();
    index.apply_registry(RegistryChange::PutWorkload(bare));
    let state = index.merged_state();
    assert_eq!(state.pods.len(), 1);
    // The registration says the process runs; the file still says what it is.
    assert_eq!(state.pods[0].node.as_deref(), Some("n1"));
    assert_eq!(state.pods[0].ips, file_pod.ips);
    assert_eq!(state.pods[0].labels, file_pod.labels);
}

#[test]
fn workloads_become_pods_and_agent_nodes_become_nodes() {
    let (mut index, _) = mk_index();
    index.apply_file(changed("c.yaml", CLUSTER));
    assert_eq!(
        index.apply_registry(RegistryChange::PutWorkload(mk_workload(
            "n1", "web-0", "10.9.0.1"
        ))),
        Effect::Changed
    );
    // The same registration again changes nothing.
    assert_eq!(
        index.apply_registry(RegistryChange::PutWorkload(mk_workload(
            "n1", "web-0", "10.9.0.1"
        ))),
        Effect::None
    );
    let (_rx, effect) = index.subscribe("n7", "agent-7", 0, 1);
    assert_eq!(effect, Effect::Urgent);
    let state = index.merged_state();
    // The registered workload replaced the file's pod of the same name on its node.
    assert_eq!(state.pods.len(), 1);
    assert_eq!(state.pods[0].node.as_deref(), Some("n1"));
    assert_eq!(
        state.pods[0].ips,
        vec!["10.9.0.1".parse::<IpAddr>().unwrap()]
    );
    let n7 = state
        .nodes
        .iter()
        .find(|n| n.name == "n7")
        .expect("agent node added");
    assert_eq!(n7.zone, None);
    assert_eq!(
        index.apply_registry(RegistryChange::RemoveWorkload("n1/shop/web-0".into())),
        Effect::Changed
    );
    assert_eq!(
        index.merged_state().pods[0].ips,
        vec!["10.1.0.10".parse::<IpAddr>().unwrap()]
    );
    // A new workload of a node is added as a pod of that node.
    index.apply_registry(RegistryChange::PutWorkload(mk_workload(
        "n9", "job-1", "10.9.0.2",
    )));
    let state = index.merged_state();
    let job = state
        .pods
        .iter()
        .find(|p| p.name == "job-1")
        .expect("job-1");
    assert_eq!(job.node.as_deref(), Some("n9"));
}

#[test]
fn a_registration_never_moves_another_nodes_pod() {
    // The audit's identity hijack (E3): node n9 registers shop/web-0, which runs on n1.
    let (mut index, _) = mk_index();
    index.apply_file(changed("c.yaml", CLUSTER));
    let mut forged = mk_workload("n9", "web-0", "10.9.0.1");
    forged.labels = [("app".to_string(), "evil".to_string())].into();
    index.apply_registry(RegistryChange::PutWorkload(forged));
    let state = index.merged_state();
    assert_eq!(state.pods.len(), 1);
    let web = &state.pods[0];
    assert_eq!(web.node.as_deref(), Some("n1"));
    assert_eq!(web.ips, vec!["10.1.0.10".parse::<IpAddr>().unwrap()]);
    assert_eq!(web.labels.get("app").map(String::as_str), Some("web"));

    // With the API server as the source, not even the pod's own node replaces it.
    let (mut index, _) = mk_index();
    index.pods_from_api_server();
    index.apply_file(changed("c.yaml", CLUSTER));
    let mut relabelled = mk_workload("n1", "web-0", "10.9.0.1");
    relabelled.labels = [("app".to_string(), "evil".to_string())].into();
    index.apply_registry(RegistryChange::PutWorkload(relabelled));
    let state = index.merged_state();
    assert_eq!(state.pods.len(), 1);
    assert_eq!(
        state.pods[0].labels.get("app").map(String::as_str),
        Some("web")
    );
}

#[test]
fn a_registry_reset_replaces_everything() {
    let (mut index, _) = mk_index();
    let listener = |port| Listener {
        key: Some(ListenerKey {
            node: "n1".into(),
            ip: "10.1.0.10".into(),
            port,
            protocol: Protocol::Tcp as i32,
        }),
        ..Default::default()
    };
    index.apply_registry(RegistryChange::PutListener(listener(80)));
    index.apply_registry(RegistryChange::Reset {
        listeners: vec![listener(81)],
        workloads: vec![],
        acks: vec![],
    });
    let keys: Vec<&String> = index.listeners.keys().collect();
    assert_eq!(keys, vec!["n1/10.1.0.10/81/TCP"]);
    assert!(index.registry_synced);
}

/// A registration as the gRPC service makes it: its effect and the revision it is answered.
fn register(index: &mut Index, change: RegistryChange) -> (Effect, u64) {
    let (reply, mut rx) = oneshot::channel();
    let effect = index.handle(Command::Registry(change, Some(reply)), Instant::now());
    (effect, rx.try_recv().expect("answered at once"))
}

#[test]
fn a_registration_that_changes_no_table_is_answered_with_the_published_revision() {
    let (mut index, _) = mk_index();
    index.handle(Command::File(changed("c.yaml", CLUSTER)), Instant::now());
    let mut bare = mk_workload("n1", "web-0", "");
    bare.ips.clear();
    bare.labels.clear();
    // Nothing published yet: even a no-op waits for the first revision.
    assert_eq!(
        register(&mut index, RegistryChange::PutWorkload(bare.clone())),
        (Effect::None, 1)
    );
    publish(&mut index, 10);

    // Saying what the file already says about web-0 (on n1, app=web, 10.1.0.10) changes no
    // table: revision 10 has it, nothing to compile. Nor does removing such a registration.
    let same = mk_workload("n1", "web-0", "10.1.0.10");
    for change in [
        RegistryChange::PutWorkload(bare),
        RegistryChange::PutWorkload(same.clone()),
        RegistryChange::PutWorkload(same),
        RegistryChange::RemoveWorkload("n1/shop/web-0".into()),
    ] {
        assert_eq!(
            register(&mut index, change.clone()),
            (Effect::None, 10),
            "{change:?}"
        );
    }

    // A new address changes n1's table: the next revision.
    let moved = mk_workload("n1", "web-0", "10.9.0.1");
    assert_eq!(
        register(&mut index, RegistryChange::PutWorkload(moved.clone())),
        (Effect::Changed, 11)
    );
    // The same registration again (the store's echo of it, an agent's re-send) changes nothing,
    // but revision 10 does not have it yet.
    assert_eq!(
        register(&mut index, RegistryChange::PutWorkload(moved.clone())),
        (Effect::None, 11)
    );
    publish(&mut index, 11);
    assert_eq!(
        register(&mut index, RegistryChange::PutWorkload(moved.clone())),
        (Effect::None, 11)
    );

    // Any unpublished change holds the answer back, even one elsewhere.
    index.handle(Command::File(changed("p.yaml", POLICY_BBR)), Instant::now());
    assert_eq!(
        register(&mut index, RegistryChange::PutWorkload(moved)),
        (Effect::None, 12)
    );
    publish(&mut index, 12);
    // A workload no source knows is a new pod; another node's pod is not replaced.
    assert_eq!(
        register(
            &mut index,
            RegistryChange::PutWorkload(mk_workload("n1", "job-1", "10.1.0.30"))
        ),
        (Effect::Changed, 13)
    );
    publish(&mut index, 13);
    assert_eq!(
        register(
            &mut index,
            RegistryChange::PutWorkload(mk_workload("n9", "web-0", "10.9.0.9"))
        ),
        (Effect::None, 13)
    );
}

// === acks shared between replicas ===

/// An index with the cluster and the BBR policy, published as this replica's `revision`.
fn published_at(revision: u64) -> (Index, u64) {
    let (mut index, _) = mk_index();
    index.apply_file(changed("c.yaml", CLUSTER));
    index.apply_file(changed("p.yaml", POLICY_BBR));
    publish(&mut index, revision);
    let version = index.policies[0].fingerprint;
    (index, version)
}

fn publish(index: &mut Index, revision: u64) {
    let output = compile(index.compile_input(), revision);
    index.publish(output, Instant::now());
}

fn remote(node: &str, revision: u64, contained: &[u64]) -> RegistryChange {
    RegistryChange::Ack(AckRecord {
        node: node.into(),
        revision,
        contained: contained.to_vec(),
    })
}

fn node_status(index: &Index, node: &str) -> NodeStatus {
    index
        .status(Instant::now())
        .nodes
        .into_iter()
        .find(|n| n.node == node)
        .unwrap_or_else(|| panic!("{node} in the status"))
}

fn web_status(index: &Index) -> PolicyStatus {
    index
        .status(Instant::now())
        .policies
        .into_iter()
        .find(|p| p.name == "web")
        .expect("web in the status")
}

#[test]
fn remote_acks_only_move_forward_and_connect_nobody() {
    let (mut index, _) = mk_index();
    assert_eq!(
        index.apply_registry(remote("n5", 10, &[2, 1])),
        Effect::None
    );
    let n5 = node_status(&index, "n5");
    assert_eq!(n5.acked_revision, 10);
    assert!(!n5.connected && n5.stale && n5.agents.is_empty(), "{n5:?}");
    assert_eq!(index.metrics.connected_agents.get(), 0);
    let metrics = index.metrics.clone();
    let gauge = || {
        metrics
            .acked_revision
            .get_or_create(&vec![("node".to_string(), "n5".to_string())])
            .get()
    };
    assert_eq!(gauge(), 10);

    // Earlier revisions change nothing; the same one adds what else it is known to contain.
    index.apply_registry(remote("n5", 7, &[3]));
    assert_eq!(index.nodes["n5"].acked, 10);
    assert_eq!(index.nodes["n5"].contained, vec![1, 2]);
    index.apply_registry(remote("n5", 10, &[3, 1]));
    assert_eq!(index.nodes["n5"].contained, vec![1, 2, 3]);

    // A full re-read takes the maximum too, and leaves the registries' sync flag set.
    index.apply_registry(RegistryChange::Reset {
        listeners: vec![],
        workloads: vec![],
        acks: vec![
            AckRecord {
                node: "n5".into(),
                revision: 9,
                contained: vec![],
            },
            AckRecord {
                node: "n6".into(),
                revision: 12,
                contained: vec![],
            },
        ],
    });
    assert_eq!(index.nodes["n5"].acked, 10);
    assert_eq!(index.nodes["n6"].acked, 12);
    assert_eq!(gauge(), 10);

    // A local agent of a node known only from remote acks is a connected agent as usual.
    let (_rx, _) = index.subscribe("n5", "agent-5", 0, 1);
    let n5 = node_status(&index, "n5");
    assert!(n5.connected && n5.agents == vec!["agent-5".to_string()]);
    assert_eq!(n5.acked_revision, 10);
}

#[test]
fn a_later_remote_revision_without_the_spec_is_not_programmed() {
    // Replica B compiled revision 101 before it saw the spec this replica (A) compiled at 100:
    // comparing revisions (101 >= 100) would call it programmed; the ack's contents do not.
    let (mut index, version) = published_at(100);
    assert!(!web_status(&index).programmed);
    index.apply_registry(remote("n1", 101, &[]));
    assert_eq!(node_status(&index, "n1").acked_revision, 101);
    let web = web_status(&index);
    assert!(!web.programmed && web.programmed_nodes == 0, "{web:?}");
    index.apply_registry(remote("n1", 102, &[version ^ 1, version]));
    let web = web_status(&index);
    assert!(web.programmed && web.programmed_nodes == 1, "{web:?}");
}

#[test]
fn an_earlier_remote_revision_with_the_spec_is_programmed() {
    // B saw the spec first and compiled it at 150; A only at 200. A revision comparison would
    // wait for a B revision >= 200 (which may never come: B compiles only on changes).
    let (mut index, version) = published_at(200);
    index.apply_registry(remote("n1", 150, &[version]));
    let web = web_status(&index);
    assert!(web.programmed && web.programmed_nodes == 1, "{web:?}");
    assert!(!node_status(&index, "n1").connected);
}

#[test]
fn local_acks_are_shared_with_what_their_snapshot_contained() {
    let (mut index, version) = published_at(100);
    let (_rx, _) = index.subscribe("n1", "a", 0, 1);
    let shared = index.ack("n1", "a", 100, String::new());
    assert_eq!(
        shared,
        Some(AckRecord {
            node: "n1".into(),
            revision: 100,
            contained: vec![version],
        })
    );
    assert!(web_status(&index).programmed);
    // The same ack again, or our own share coming back through the store: nothing new.
    assert_eq!(index.ack("n1", "a", 100, String::new()), None);
    index.apply_registry(remote("n1", 100, &[version]));
    assert!(web_status(&index).programmed);
    // A rejection is not shared.
    assert_eq!(index.ack("n1", "a", 100, "bad".into()), None);
    assert_eq!(index.nodes["n1"].last_error, "bad");

    // A new spec: not programmed until the node acks a revision containing it, and a late
    // ack of the revision before does not count.
    index.apply_file(changed("p.yaml", &POLICY_BBR.replace("BBR", "Cubic")));
    publish(&mut index, 101);
    let new_version = index.policies[0].fingerprint;
    assert_ne!(new_version, version);
    assert!(!web_status(&index).programmed);
    let shared = index.ack("n1", "a", 101, String::new()).expect("shared");
    assert_eq!(shared.contained, vec![new_version]);
    assert!(web_status(&index).programmed);
    // Back to the first spec: the same version as before, contained from 102 on.
    index.apply_file(changed("p.yaml", POLICY_BBR));
    publish(&mut index, 102);
    assert_eq!(index.policies[0].fingerprint, version);
    assert!(!web_status(&index).programmed, "101 had the Cubic spec");
}

#[test]
fn an_ack_of_a_revision_this_replica_did_not_publish_proves_nothing() {
    // The agent's connection moved here with an ack of another replica's revision 150.
    let (mut index, version) = published_at(100);
    assert_eq!(index.ack("n1", "a", 150, String::new()), None);
    assert_eq!(node_status(&index, "n1").acked_revision, 150);
    assert!(!web_status(&index).programmed);
    // The replica that published 150 shares what it contained.
    index.apply_registry(remote("n1", 150, &[version]));
    assert!(web_status(&index).programmed);
}

#[test]
fn policy_versions_are_stable_and_name_the_object() {
    let spec = serde_json::json!({"rules": [{"name": "all"}]});
    let a = policy_version("StackRoute/shop/web", &spec);
    assert_eq!(a, policy_version("StackRoute/shop/web", &spec));
    assert_ne!(a, policy_version("StackRoute/shop/web2", &spec));
    // FNV-1a 64 of the bytes: the same in every process and build.
    assert_eq!(policy_version("", &""), {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in [0u8, b'"', b'"'] {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        hash
    });
}

// === the task ===

/// The whole update a new stream would send.
fn full(update: &NodeUpdate) -> SnapshotUpdate {
    SnapshotUpdate {
        revision: update.revision,
        node: update.node.clone(),
        snapshot: update.snapshot.assemble(),
        listeners: update.listeners.to_vec(),
        ..Default::default()
    }
}

async fn next_update(rx: &mut watch::Receiver<Published>) -> SnapshotUpdate {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            rx.changed().await.expect("index alive");
            if let Some(update) = rx.borrow_and_update().clone() {
                return full(&update);
            }
        }
    })
    .await
    .expect("an update within 10 s")
}

fn spawn_index() -> IndexHandle {
    let (index, _ready) = mk_index();
    let (handle, rx) = IndexHandle::channel();
    tokio::spawn(run(
        index,
        handle.clone(),
        rx,
        Arc::new(MemoryStore::default()),
        Debouncer::new(Duration::from_millis(20), Duration::from_millis(200)),
    ));
    handle
}

fn decide_web(update: &SnapshotUpdate) -> String {
    let snapshot = Snapshot::parse(&update.snapshot).expect("snapshot decodes");
    assert_eq!(snapshot.revision(), update.revision);
    let web = snapshot
        .workload_by_name("shop", "web-0")
        .expect("web-0 in its node's snapshot");
    let decision = snapshot.decide(
        web,
        "8.8.8.8".parse().unwrap(),
        443,
        stackroute_snapshot::Protocol::Tcp,
        &mut NoTrace,
    );
    decision.transport().to_string()
}

#[tokio::test]
async fn nothing_is_published_before_every_source_synced() {
    let handle = spawn_index();
    let subscription = handle.subscribe("n1", "a", 0).await.expect("subscribe");
    let (mut rx, _guard) = subscription.into_parts();
    handle.file(changed("c.yaml", CLUSTER)).unwrap();
    // The registry synced (embedded store) but the directory did not: nothing goes out.
    handle.registry(RegistryChange::Reset {
        listeners: vec![],
        workloads: vec![],
        acks: vec![],
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(rx.borrow().is_none(), "published before the sources synced");
    handle.file(changed("p.yaml", POLICY_BBR)).unwrap();
    handle
        .file(FileEvent::Synced(crate::files::DIRECTORY.into()))
        .unwrap();
    let update = next_update(&mut rx).await;
    assert_eq!(
        decide_web(&update),
        "Kernel/BBR",
        "the first snapshot has every file"
    );
}

#[tokio::test]
async fn revisions_increase_and_snapshots_follow_changes() {
    let handle = spawn_index();
    handle.registry(RegistryChange::Reset {
        listeners: vec![],
        workloads: vec![],
        acks: vec![],
    });
    handle.file(changed("c.yaml", CLUSTER)).unwrap();
    handle
        .file(FileEvent::Synced(crate::files::DIRECTORY.into()))
        .unwrap();
    let (mut rx, _guard) = handle.subscribe("n1", "a", 0).await.unwrap().into_parts();
    let first = next_update(&mut rx).await;
    assert_eq!(decide_web(&first), "Kernel/Default");

    // A burst of changes is debounced into few revisions, each greater than the last.
    let mut last = first.revision;
    for _ in 0..5 {
        handle.file(changed("p.yaml", POLICY_BBR)).unwrap();
        handle.file(FileEvent::Removed("p.yaml".into())).unwrap();
    }
    handle.file(changed("p.yaml", POLICY_BBR)).unwrap();
    let update = loop {
        let update = next_update(&mut rx).await;
        assert!(update.revision > last, "{} after {last}", update.revision);
        last = update.revision;
        if decide_web(&update) == "Kernel/BBR" {
            break update;
        }
    };
    assert!(
        update.revision - first.revision <= 3,
        "the burst was debounced"
    );

    // A registration returns a revision that the next published one reaches.
    let promised = handle
        .register(RegistryChange::PutListener(Listener {
            key: Some(ListenerKey {
                node: "n1".into(),
                ip: "10.1.0.10".into(),
                port: 8080,
                protocol: Protocol::Tcp as i32,
            }),
            ..Default::default()
        }))
        .await
        .unwrap();
    let with_listener = next_update(&mut rx).await;
    assert!(with_listener.revision >= promised);
    // n1's policies cannot pick RDMA: it needs no listener registrations (see
    // `only_nodes_that_can_pick_rdma_get_the_listeners`).
    assert_eq!(with_listener.listeners.len(), 0);

    // Status: the policy is accepted, and programmed once n1 acks.
    let status = handle.status().await.unwrap();
    let policy = &status.policies[0];
    assert!(policy.accepted && !policy.programmed, "{policy:?}");
    assert_eq!(policy.target_nodes, 1);
    handle
        .ack(
            "n1".into(),
            "a".into(),
            with_listener.revision,
            String::new(),
        )
        .await
        .unwrap();
    let status = handle.status().await.unwrap();
    let policy = &status.policies[0];
    assert!(policy.programmed, "{policy:?}");
    let n1 = status.nodes.iter().find(|n| n.node == "n1").unwrap();
    assert!(n1.connected && !n1.stale);
    assert_eq!(n1.acked_revision, with_listener.revision);
}

#[tokio::test]
async fn a_known_revision_beyond_the_controllers_own_is_never_adopted() {
    let handle = spawn_index();
    handle.registry(RegistryChange::Reset {
        listeners: vec![],
        workloads: vec![],
        acks: vec![],
    });
    handle
        .file(FileEvent::Synced(crate::files::DIRECTORY.into()))
        .unwrap();
    // The audit's attack: every later revision would have been u64::MAX.
    let known = u64::MAX - 1;
    let (mut rx, _guard) = handle
        .subscribe("n1", "a", known)
        .await
        .unwrap()
        .into_parts();
    let first = next_update(&mut rx).await.revision;
    assert!(
        first < u64::MAX / 2,
        "adopted the caller's revision: {first}"
    );
    handle
        .register(RegistryChange::PutWorkload(mk_workload(
            "n1", "w", "10.0.0.9",
        )))
        .await
        .unwrap();
    let second = next_update(&mut rx).await.revision;
    assert!(
        second > first,
        "revisions must keep increasing: {first} then {second}"
    );
}

#[test]
fn registrations_expire_a_lease_after_their_agent_is_gone_everywhere() {
    let (mut index, _) = mk_index();
    let lease = Duration::from_secs(600);
    let start = Instant::now();
    index.apply_registry(RegistryChange::PutWorkload(mk_workload(
        "n1",
        "web-0",
        "10.1.0.10",
    )));
    index.apply_registry(RegistryChange::PutWorkload(mk_workload(
        "n2",
        "db-0",
        "10.1.0.20",
    )));
    // n1's agent watches here; n2's was never seen: its clock starts at the first look.
    let (_rx, _) = index.subscribe("n1", "a1", 0, 1);
    let first = index.liveness(start, 0, lease);
    assert_eq!(first.connected, vec!["n1".to_string()]);
    assert!(first.expired_workloads.is_empty());
    let later = start + lease;
    assert_eq!(
        index.liveness(later, 0, lease).expired_workloads,
        vec!["n2/shop/db-0".to_string()]
    );
    // Another replica said n2's agent is connected to it: kept.
    let now_ms = 10_000_000;
    index.apply_registry(RegistryChange::Alive {
        node: "n2".into(),
        unix_ms: now_ms - 1_000,
    });
    assert!(
        index
            .liveness(later, now_ms, lease)
            .expired_workloads
            .is_empty()
    );
    // n1's agent leaves: a lease later its registrations go too (n2's mark is old by then).
    index.unsubscribe("n1", 1);
    let gone = Instant::now();
    let expired = index.liveness(gone + lease, now_ms + 600_000, lease);
    assert!(expired.connected.is_empty());
    assert_eq!(
        expired.expired_workloads,
        vec!["n1/shop/web-0".to_string(), "n2/shop/db-0".to_string()]
    );
    assert_eq!(
        index.node_registrations("n1"),
        NodeRegistrations {
            listeners: 0,
            workloads: 1,
            bytes: prost::Message::encoded_len(&mk_workload("n1", "web-0", "10.1.0.10")),
            replaces: false,
        }
    );
}

/// Each revision's update carries the delta from the node's previous snapshot, and it rebuilds
/// the new snapshot exactly.
#[test]
fn each_revision_carries_the_delta_from_the_nodes_previous_snapshot() {
    let (mut index, _) = mk_index();
    let (rx, _) = index.subscribe("n1", "a", 0, 1);
    index.apply_file(changed("c.yaml", CLUSTER));
    publish(&mut index, 10);
    let first = rx.borrow().clone().expect("published");
    assert!(first.delta.is_none(), "nothing to start from");
    index.apply_file(changed("p.yaml", POLICY_BBR));
    publish(&mut index, 11);
    let second = rx.borrow().clone().expect("published");
    let (base, delta) = second.delta.clone().expect("a delta");
    assert_eq!(base, 10);
    assert!(delta.len() < second.snapshot.len());
    let rebuilt = delta::apply(&first.snapshot.assemble(), &delta).unwrap();
    assert_eq!(rebuilt, second.snapshot.assemble());
    // Both share the revision's shared tables with every other node: the parts hold no copy.
    assert!(second.snapshot.own_len() < second.snapshot.len());
}

/// Listener registrations go to the nodes whose policies can pick RDMA (an RDMA client finds
/// the server's endpoint there), and to no other: a node gets the list when a policy makes RDMA
/// possible for its pods and an empty one when none does any more.
#[test]
fn only_nodes_that_can_pick_rdma_get_the_listeners() {
    const POLICY_RDMA: &str = "apiVersion: stackroute.dev/v1alpha1\nkind: StackRoute\nmetadata: {name: web, namespace: shop}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  rules:\n  - name: trainers\n    to: [{pods: {podSelector: {matchLabels: {app: trainer}}}}]\n    transport: {stack: RDMA, fallback: [{stack: Kernel}]}\n";
    let (mut index, _) = mk_index();
    let (rx, _) = index.subscribe("n1", "a", 0, 1);
    index.apply_file(changed("c.yaml", CLUSTER));
    index.apply_registry(RegistryChange::PutListener(Listener {
        key: Some(ListenerKey {
            node: "n1".into(),
            ip: "10.1.0.10".into(),
            port: 80,
            protocol: Protocol::Tcp as i32,
        }),
        ..Default::default()
    }));
    let listeners_at = |revision| {
        let update = rx.borrow().clone().expect("published");
        assert_eq!(update.revision, revision);
        update.listeners.len()
    };
    index.apply_file(changed("p.yaml", POLICY_BBR));
    publish(&mut index, 10);
    assert_eq!(listeners_at(10), 0, "Kernel only: no listeners");
    index.apply_file(changed("p.yaml", POLICY_RDMA));
    publish(&mut index, 11);
    assert_eq!(listeners_at(11), 1, "RDMA possible: the list");
    index.apply_file(changed("p.yaml", POLICY_BBR));
    publish(&mut index, 12);
    assert_eq!(listeners_at(12), 0, "Kernel only again: none");
}
