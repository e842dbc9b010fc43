//! Kubernetes mode against a real API server, named by `STACKROUTE_TEST_KUBECONFIG`. Skipped
//! visibly without one; fails instead when `STACKROUTE_REQUIRE_KUBERNETES=1`.
//!
//! The test installs the CRDs (server-side apply), works in a namespace of its own, and
//! deletes that namespace at the end.

mod common;

use std::time::Duration;

use common::{Controller, decide, next_matching, watch};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, CustomResourceExt as _};
use stackroute_api::{ClusterStackRoute, StackRoute};

const WAIT: Duration = Duration::from_secs(60);

async fn client(path: &str) -> Client {
    let kubeconfig = Kubeconfig::read_from(path).expect("reading STACKROUTE_TEST_KUBECONFIG");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("a usable kubeconfig");
    Client::try_from(config).expect("a Kubernetes client")
}

fn object<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> T {
    serde_json::from_value(value).expect("a valid object")
}

#[tokio::test]
async fn api_objects_reach_agents_and_policies_get_status() {
    let Ok(kubeconfig) = std::env::var("STACKROUTE_TEST_KUBECONFIG") else {
        assert!(
            std::env::var("STACKROUTE_REQUIRE_KUBERNETES").as_deref() != Ok("1"),
            "STACKROUTE_REQUIRE_KUBERNETES=1 but STACKROUTE_TEST_KUBECONFIG is not set"
        );
        println!("SKIP: STACKROUTE_TEST_KUBECONFIG not set (no Kubernetes API server)");
        return;
    };
    let client = client(&kubeconfig).await;

    // The CRDs, exactly as `stackroute crd` prints them.
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(client.clone());
    let apply = PatchParams::apply("stackroute-test").force();
    for crd in [StackRoute::crd(), ClusterStackRoute::crd()] {
        let name = crd.metadata.name.clone().expect("CRD name");
        crds.patch(&name, &apply, &Patch::Apply(&crd))
            .await
            .expect("installing the CRDs");
    }
    tokio::time::sleep(Duration::from_secs(2)).await; // let the API server serve them

    let ns = format!("stackroute-test-{}", std::process::id());
    let node = format!("{ns}-node");
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &object(serde_json::json!({"metadata": {"name": ns}})),
        )
        .await
        .expect("creating the test namespace");
    let cleanup = NamespaceGuard(namespaces.clone(), ns.clone());

    // A pod bound to a node no kubelet runs: the object is all the controller reads.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    pods.create(
        &PostParams::default(),
        &object(serde_json::json!({
            "metadata": {"name": "web-0", "labels": {"app": "web"}},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "none"}]}
        })),
    )
    .await
    .expect("creating the pod");
    let routes: Api<StackRoute> = Api::namespaced(client.clone(), &ns);
    routes
        .create(
            &PostParams::default(),
            &object(serde_json::json!({
                "apiVersion": "stackroute.dev/v1alpha1",
                "kind": "StackRoute",
                "metadata": {"name": "web"},
                "spec": {
                    "podSelector": {"matchLabels": {"app": "web"}},
                    "rules": [{"name": "all", "transport": {"stack": "Kernel", "congestionControl": "BBR"}}]
                }
            })),
        )
        .await
        .expect("creating the StackRoute");

    let dir = tempfile::tempdir().expect("log dir");
    let controller = Controller::start_kubernetes(dir.path(), &kubeconfig, &ns).await;
    let mut grpc = controller.client().await;
    let mut stream = watch(&mut grpc, &node).await;
    next_matching(
        &mut stream,
        WAIT,
        "the pod's node snapshot with the policy",
        |u| {
            stackroute_snapshot::Snapshot::parse(&u.snapshot)
                .expect("decodes")
                .workload_by_name(&ns, "web-0")
                .is_some()
                && decide(u, &ns, "web-0", "8.8.8.8:443") == "Kernel/BBR"
        },
    )
    .await;

    // The elected writer sets Accepted=True with the generation it saw.
    let accepted = common::wait_for("Accepted=True on the StackRoute", WAIT, || {
        let routes = routes.clone();
        async move {
            let route = routes.get_status("web").await.ok()?;
            let status = route.status?;
            status
                .conditions
                .iter()
                .any(|c| c.type_ == "Accepted" && c.status == "True")
                .then_some(status)
        }
    })
    .await;
    assert_eq!(accepted.target_nodes, Some(1));
    drop(cleanup);
}

struct NamespaceGuard(Api<Namespace>, String);

impl Drop for NamespaceGuard {
    fn drop(&mut self) {
        let api = self.0.clone();
        let name = self.1.clone();
        // Best effort, on a runtime of its own (we may be unwinding).
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let _ = api.delete(&name, &DeleteParams::default()).await;
            });
        })
        .join();
    }
}
