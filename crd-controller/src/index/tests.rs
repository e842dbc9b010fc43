//! Pure index tests: no server, no store but the embedded one.

use std::time::{Duration, Instant};

use stackroute_proto::v1alpha1::{ListenerKey, Protocol, WorkloadKey};
use stackroute_snapshot::{NoTrace, Snapshot};

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
    let mut bare = mk_workload("n9", "web-0", "");
    bare.ips.clear();
    bare.labels.clear();
    index.apply_registry(RegistryChange::PutWorkload(bare));
    let state = index.merged_state();
    assert_eq!(state.pods.len(), 1);
    // The registration says where the process runs; the file still says what it is.
    assert_eq!(state.pods[0].node.as_deref(), Some("n9"));
    assert_eq!(state.pods[0].ips, file_pod.ips);
    assert_eq!(state.pods[0].labels, file_pod.labels);
}

#[test]
fn workloads_become_pods_and_agent_nodes_become_nodes() {
    let (mut index, _) = mk_index();
    index.apply_file(changed("c.yaml", CLUSTER));
    assert_eq!(
        index.apply_registry(RegistryChange::PutWorkload(mk_workload(
            "n9", "web-0", "10.9.0.1"
        ))),
        Effect::Changed
    );
    // The same registration again changes nothing.
    assert_eq!(
        index.apply_registry(RegistryChange::PutWorkload(mk_workload(
            "n9", "web-0", "10.9.0.1"
        ))),
        Effect::None
    );
    let (_rx, effect) = index.subscribe("n7", "agent-7", 0, 1);
    assert_eq!(effect, Effect::Urgent);
    let state = index.merged_state();
    // The registered workload replaced the file's pod of the same name.
    assert_eq!(state.pods.len(), 1);
    assert_eq!(state.pods[0].node.as_deref(), Some("n9"));
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
        index.apply_registry(RegistryChange::RemoveWorkload("n9/shop/web-0".into())),
        Effect::Changed
    );
    assert_eq!(index.merged_state().pods[0].node.as_deref(), Some("n1"));
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
    });
    let keys: Vec<&String> = index.listeners.keys().collect();
    assert_eq!(keys, vec!["n1/10.1.0.10/81/TCP"]);
    assert!(index.registry_synced);
}

// === the task ===

async fn next_update(rx: &mut watch::Receiver<Published>) -> Arc<SnapshotUpdate> {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            rx.changed().await.expect("index alive");
            if let Some(update) = rx.borrow_and_update().clone() {
                return update;
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
    assert_eq!(with_listener.listeners.len(), 1);

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
        .unwrap();
    let status = handle.status().await.unwrap();
    let policy = &status.policies[0];
    assert!(policy.programmed, "{policy:?}");
    let n1 = status.nodes.iter().find(|n| n.node == "n1").unwrap();
    assert!(n1.connected && !n1.stale);
    assert_eq!(n1.acked_revision, with_listener.revision);
}

#[tokio::test]
async fn an_agent_that_knows_a_later_revision_gets_a_greater_one() {
    let handle = spawn_index();
    handle.registry(RegistryChange::Reset {
        listeners: vec![],
        workloads: vec![],
    });
    handle
        .file(FileEvent::Synced(crate::files::DIRECTORY.into()))
        .unwrap();
    let known = u64::MAX / 4;
    let (mut rx, _guard) = handle
        .subscribe("n1", "a", known)
        .await
        .unwrap()
        .into_parts();
    assert!(next_update(&mut rx).await.revision > known);
}
