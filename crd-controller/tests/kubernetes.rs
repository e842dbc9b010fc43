//! Kubernetes mode against a real API server, named by `STACKROUTE_TEST_KUBECONFIG` (a
//! `harness = false` binary on the testkit harness). Without one every trial shows as
//! ignored, with the reason; with `STACKROUTE_REQUIRE_KUBERNETES=1` they fail instead.
//!
//! Each trial installs the CRDs for the server's version (server-side apply; without the CEL
//! rules below Kubernetes 1.25), works in a namespace of its own, and deletes that namespace
//! at the end. The trials run one after the other: each starts a controller, and every
//! controller writes the status of every policy it sees.

mod common;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use common::{Controller, decide, next_matching, watch};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use stackroute_api::{RouteStatus, StackRoute};
use stackroute_controller::kubernetes::{
    ENDPOINT_SLICE_GROUP, EndpointSliceVersion, choose_endpoint_slice_version,
};
use testkit::{Options, Trial};

const WAIT: Duration = Duration::from_secs(60);

fn main() -> ExitCode {
    // The trials install the CRDs; the cluster is left as found: CRDs that were not there
    // before are removed afterwards (a later `helm install` of the CRD chart could not adopt
    // them).
    let installed_here = std::env::var_os(testkit::KUBECONFIG_VAR)
        .filter(|path| !path.is_empty())
        .map(PathBuf::from)
        .and_then(|path| testkit::block_on(missing_crds(&path)).map(|names| (path, names)));
    let code = testkit::run_with(
        Options::parallel().sequential(true),
        vec![
            Trial::gated(
                "api_objects_reach_agents_and_policies_get_status",
                testkit::kubernetes,
                |kubeconfig| {
                    testkit::block_on(api_objects_reach_agents_and_policies_get_status(
                        &kubeconfig,
                    ))
                },
            ),
            Trial::gated(
                "a_network_policy_in_the_api_server_takes_rdma_out",
                testkit::kubernetes,
                |kubeconfig| {
                    testkit::block_on(a_network_policy_in_the_api_server_takes_rdma_out(
                        &kubeconfig,
                    ))
                },
            ),
            Trial::gated(
                "a_policy_breaking_a_cel_rule_is_refused_or_reported",
                testkit::kubernetes,
                |kubeconfig| {
                    testkit::block_on(a_policy_breaking_a_cel_rule_is_refused_or_reported(
                        &kubeconfig,
                    ))
                },
            ),
        ],
    );
    if let Some((path, names)) = installed_here {
        testkit::block_on(remove_crds(&path, &names));
    }
    code
}

/// The stackroute CRDs the cluster lacks now; `None` if it cannot be asked (the trials report that).
async fn missing_crds(path: &Path) -> Option<Vec<String>> {
    let client = kube::Config::from_custom_kubeconfig(
        Kubeconfig::read_from(path).ok()?,
        &KubeConfigOptions::default(),
    )
    .await
    .ok()
    .and_then(|config| Client::try_from(config).ok())?;
    let api: Api<CustomResourceDefinition> = Api::all(client);
    let mut missing = Vec::new();
    for crd in stackroute_api::crds() {
        let name = crd.metadata.name.expect("CRD name");
        if api.get_opt(&name).await.ok()?.is_none() {
            missing.push(name);
        }
    }
    Some(missing)
}

async fn remove_crds(path: &Path, names: &[String]) {
    let crds: Api<CustomResourceDefinition> = Api::all(client(path).await);
    for name in names {
        if let Err(error) = crds.delete(name, &DeleteParams::default()).await {
            eprintln!("could not remove the CRD {name} this test installed: {error}");
        }
    }
}

async fn client(path: &Path) -> Client {
    let kubeconfig = Kubeconfig::read_from(path).expect("reading STACKROUTE_TEST_KUBECONFIG");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("a usable kubeconfig");
    Client::try_from(config).expect("a Kubernetes client")
}

fn object<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> T {
    serde_json::from_value(value).expect("a valid object")
}

fn kubeconfig_str(path: &Path) -> &str {
    path.to_str().expect("STACKROUTE_TEST_KUBECONFIG is UTF-8")
}

/// The server's `(major, minor)` version.
async fn server_version(client: &Client) -> (u32, u32) {
    let info = client.apiserver_version().await.expect("GET /version");
    let version = stackroute_api::server_version(&info.major, &info.minor)
        .unwrap_or_else(|| panic!("an API server version: {info:?}"));
    println!(
        "API server {} (CEL rules {})",
        info.git_version,
        if stackroute_api::server_supports_cel(version.0, version.1) {
            "enforced by the server"
        } else {
            "not enforced by the server: left out of the CRDs"
        }
    );
    version
}

/// Installs the CRDs as `stackroute crd --kube-version MAJOR.MINOR` prints them; returns the
/// server's version.
async fn install_crds(client: &Client) -> (u32, u32) {
    let (major, minor) = server_version(client).await;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let apply = PatchParams::apply("stackroute-test").force();
    for crd in stackroute_api::crds_for_server(major, minor) {
        let name = crd.metadata.name.clone().expect("CRD name");
        crds.patch(&name, &apply, &Patch::Apply(&crd))
            .await
            .unwrap_or_else(|e| panic!("installing the CRD {name}: {e}"));
    }
    // Until the API server serves them.
    let routes: Api<StackRoute> = Api::all(client.clone());
    common::wait_for("the StackRoute API to be served", WAIT, || {
        let routes = routes.clone();
        async move { routes.list(&Default::default()).await.ok().map(drop) }
    })
    .await;
    (major, minor)
}

/// A namespace of the test's own, deleted when the guard drops.
async fn test_namespace(
    client: &Client,
    kubeconfig: &Path,
    prefix: &str,
) -> (String, NamespaceGuard) {
    let ns = format!("{prefix}-{}", std::process::id());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &object(serde_json::json!({"metadata": {"name": ns}})),
        )
        .await
        .expect("creating the test namespace");
    (
        ns.clone(),
        NamespaceGuard {
            kubeconfig: kubeconfig.to_path_buf(),
            namespace: ns,
        },
    )
}

/// Creates a pod (without a service-account token: no kubelet runs it). Right after its
/// namespace was made, the API server answers "retry" (500 ServerTimeout) until the namespace's
/// default ServiceAccount exists; so retry.
async fn create_pod(pods: &Api<Pod>, pod: serde_json::Value) -> Pod {
    let mut pod: Pod = object(pod);
    pod.spec
        .as_mut()
        .expect("a pod spec")
        .automount_service_account_token = Some(false);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match pods.create(&PostParams::default(), &pod).await {
            Ok(created) => return created,
            Err(kube::Error::Api(status))
                if status.reason == "ServerTimeout" && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(error) => panic!("creating the pod: {error}"),
        }
    }
}

/// The EndpointSlice version this server serves, as the controller picks it.
async fn endpoint_slice_version(client: &Client) -> EndpointSliceVersion {
    let group = kube::discovery::group(client, ENDPOINT_SLICE_GROUP)
        .await
        .expect("discovery of discovery.k8s.io");
    let served: Vec<&str> = group
        .versions()
        .filter(|v| {
            group
                .versioned_resources(v)
                .iter()
                .any(|(r, _)| r.kind == "EndpointSlice")
        })
        .collect();
    let version = choose_endpoint_slice_version(served.iter().copied())
        .unwrap_or_else(|| panic!("the server serves EndpointSlices (versions {served:?})"));
    println!(
        "EndpointSlices served as {served:?}: using {}",
        version.as_str()
    );
    version
}

async fn api_objects_reach_agents_and_policies_get_status(kubeconfig: &Path) {
    let client = client(kubeconfig).await;
    install_crds(&client).await;
    let (ns, cleanup) = test_namespace(&client, kubeconfig, "stackroute-test").await;
    let node = format!("{ns}-node");

    // A pod bound to a node no kubelet runs: the object is all the controller reads.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    create_pod(
        &pods,
        serde_json::json!({
            "metadata": {"name": "web-0", "labels": {"app": "web"}},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "none"}]}
        }),
    )
    .await;

    // A Service without a selector and an EndpointSlice of ours at the version the server
    // serves (v1beta1 only, on Kubernetes < 1.21): its ClusterIP must resolve to 10.99.0.5.
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let service = services
        .create(
            &PostParams::default(),
            &object(serde_json::json!({
                "metadata": {"name": "backends"},
                "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}
            })),
        )
        .await
        .expect("creating the Service");
    let cluster_ip = service
        .spec
        .and_then(|s| s.cluster_ip)
        .expect("a ClusterIP");
    let slice_resource = endpoint_slice_version(&client).await.api_resource();
    let slices: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &slice_resource);
    let mut slice = DynamicObject::new("backends-1", &slice_resource).within(&ns);
    slice.metadata.labels = Some(
        [
            ("kubernetes.io/service-name", "backends"),
            ("endpointslice.kubernetes.io/managed-by", "stackroute-test"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect(),
    );
    slice.data = serde_json::json!({
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.99.0.5"], "conditions": {"ready": true}}],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
    });
    slices
        .create(&PostParams::default(), &slice)
        .await
        .expect("creating the EndpointSlice");

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
                    "rules": [
                        {"name": "backends", "to": [{"networks": ["10.99.0.0/16"]}],
                         "transport": {"stack": "Kernel", "congestionControl": "BBR"}},
                        {"name": "all", "transport": {"stack": "Kernel", "congestionControl": "Cubic"}}
                    ]
                }
            })),
        )
        .await
        .expect("creating the StackRoute");

    let dir = tempfile::tempdir().expect("log dir");
    // Ready only once every kind has synced, EndpointSlice included (at whatever version).
    let controller =
        Controller::start_kubernetes(dir.path(), kubeconfig_str(kubeconfig), &ns).await;
    let mut grpc = controller.client().await;
    let mut stream = watch(&mut grpc, &node).await;
    let service_address = format!("{cluster_ip}:80");
    next_matching(
        &mut stream,
        WAIT,
        "the pod's node snapshot with the policy and the Service's backends",
        |u| {
            stackroute_snapshot::Snapshot::parse(&u.snapshot)
                .expect("decodes")
                .workload_by_name(&ns, "web-0")
                .is_some()
                && decide(u, &ns, "web-0", "8.8.8.8:443") == "Kernel/Cubic"
                && decide(u, &ns, "web-0", &service_address) == "Kernel/BBR"
        },
    )
    .await;

    // The elected writer sets Accepted=True with the generation it saw.
    let accepted = wait_for_accepted(&routes, "web", "True").await;
    assert_eq!(accepted.target_nodes, Some(1));
    let log = controller.log_text();
    let watching = format!("watching EndpointSlices at {}", slice_resource.api_version);
    assert!(
        log.contains(&watching),
        "the controller logs {watching:?}:\n{log}"
    );
    drop(cleanup);
}

/// The NetworkPolicy gate fed by the API server: a default-deny NetworkPolicy in the namespace
/// takes RDMA out of a StackRoute rule toward the namespace's pods, and the status writer says
/// so (`NetworkPolicyGated=True`); deleting the NetworkPolicy gives RDMA back.
async fn a_network_policy_in_the_api_server_takes_rdma_out(kubeconfig: &Path) {
    let client = client(kubeconfig).await;
    install_crds(&client).await;
    let (ns, cleanup) = test_namespace(&client, kubeconfig, "stackroute-netpol").await;
    let node = format!("{ns}-node");
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    // Addresses of their own (no kubelet runs for the node, so nothing overwrites the status):
    // the gate applies a NetworkPolicy to pods by address, as the kernel would.
    for (name, app, ip) in [
        ("client-0", "client", "10.77.0.2"),
        ("server-0", "server", "10.77.0.3"),
    ] {
        create_pod(
            &pods,
            serde_json::json!({
                "metadata": {"name": name, "labels": {"app": app}},
                "spec": {"nodeName": node, "containers": [{"name": "c", "image": "none"}]}
            }),
        )
        .await;
        pods.patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({
                "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
            })),
        )
        .await
        .expect("setting the pod's address");
    }
    let network_policies: Api<k8s_openapi::api::networking::v1::NetworkPolicy> =
        Api::namespaced(client.clone(), &ns);
    network_policies
        .create(
            &PostParams::default(),
            &object(serde_json::json!({
                "metadata": {"name": "default-deny-ingress"},
                "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}
            })),
        )
        .await
        .expect("creating the NetworkPolicy");
    let routes: Api<StackRoute> = Api::namespaced(client.clone(), &ns);
    routes
        .create(
            &PostParams::default(),
            &object(serde_json::json!({
                "apiVersion": "stackroute.dev/v1alpha1",
                "kind": "StackRoute",
                "metadata": {"name": "fabric"},
                "spec": {
                    "podSelector": {"matchLabels": {"app": "client"}},
                    "rules": [{"name": "servers",
                               "to": [{"pods": {"podSelector": {"matchLabels": {"app": "server"}}}}],
                               "transport": {"stack": "RDMA"}}]
                }
            })),
        )
        .await
        .expect("creating the StackRoute");

    let dir = tempfile::tempdir().expect("log dir");
    let _controller =
        Controller::start_kubernetes(dir.path(), kubeconfig_str(kubeconfig), &ns).await;
    let gated = wait_for_condition(&routes, "fabric", "NetworkPolicyGated", "True").await;
    let message = gated
        .conditions
        .iter()
        .find(|c| c.type_ == "NetworkPolicyGated")
        .map(|c| c.message.clone())
        .unwrap_or_default();
    assert!(message.contains("network-policy"), "{message}");

    network_policies
        .delete("default-deny-ingress", &DeleteParams::default())
        .await
        .expect("deleting the NetworkPolicy");
    wait_for_condition(&routes, "fabric", "NetworkPolicyGated", "False").await;
    drop(cleanup);
}

/// `examples/invalid/endport-below-port.yaml`: `endPort` below `port`, which only a CEL rule
/// catches.
fn backwards_port_range(namespace: &str) -> (StackRoute, &'static str) {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/invalid/endport-below-port.yaml");
    let text = std::fs::read_to_string(&path).expect("reading the example");
    let (mut documents, problems) =
        stackroute_policy::state::parse_documents(&path.display().to_string(), &text);
    assert!(problems.is_empty() && documents.len() == 1, "{problems:?}");
    let mut value = documents.remove(0).value;
    value["metadata"]["namespace"] = namespace.into();
    (
        object(value),
        "endPort requires port and must be greater than or equal to it",
    )
}

async fn a_policy_breaking_a_cel_rule_is_refused_or_reported(kubeconfig: &Path) {
    let client = client(kubeconfig).await;
    let (major, minor) = install_crds(&client).await;
    let (ns, cleanup) = test_namespace(&client, kubeconfig, "stackroute-cel-test").await;
    let routes: Api<StackRoute> = Api::namespaced(client.clone(), &ns);
    let (route, message) = backwards_port_range(&ns);
    let name = route.metadata.name.clone().expect("a name");
    let created = routes.create(&PostParams::default(), &route).await;

    if stackroute_api::server_supports_cel(major, minor) {
        // The API server runs the CRD's CEL rule and refuses the object with its message.
        let error = created.expect_err("a server with CEL refuses endPort < port");
        let kube::Error::Api(status) = &error else {
            panic!("an API error, not {error}");
        };
        assert_eq!(status.code, 422, "{status:?}");
        assert!(status.message.contains(message), "{status:?}");
        println!("refused by the API server: {}", status.message);
    } else {
        // Without CEL the server admits it; the controller checks the same rule and reports.
        created.expect("a server without CEL admits endPort < port");
        let dir = tempfile::tempdir().expect("log dir");
        let controller =
            Controller::start_kubernetes(dir.path(), kubeconfig_str(kubeconfig), &ns).await;
        let status = wait_for_accepted(&routes, &name, "False").await;
        let accepted = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Accepted")
            .expect("Accepted");
        assert_eq!(accepted.reason, "Invalid");
        // (Any other controller watching this cluster writes the same condition.)
        assert!(
            accepted
                .message
                .starts_with(&format!("StackRoute/{ns}/{name}"))
                && accepted
                    .message
                    .ends_with(&format!("spec.rules[0].ports[0]: {message}")),
            "{accepted:?}"
        );
        assert_eq!(status.target_nodes, Some(0), "{status:?}");
        println!(
            "admitted by the API server, reported by the controller: {}",
            accepted.message
        );
        let log = controller.log_text();
        assert!(
            log.contains("does not enforce the CRDs' CEL rules"),
            "the controller warns that the server does not enforce CEL:\n{log}"
        );
    }
    drop(cleanup);
}

/// Waits until the `Accepted` condition of StackRoute `name` has `status`; returns the status.
async fn wait_for_accepted(routes: &Api<StackRoute>, name: &str, status: &str) -> RouteStatus {
    wait_for_condition(routes, name, "Accepted", status).await
}

async fn wait_for_condition(
    routes: &Api<StackRoute>,
    name: &str,
    condition: &str,
    status: &str,
) -> RouteStatus {
    common::wait_for(
        &format!("{condition}={status} on StackRoute {name}"),
        WAIT,
        || {
            let routes = routes.clone();
            async move {
                let route = routes.get_status(name).await.ok()?;
                let found = route.status?;
                found
                    .conditions
                    .iter()
                    .any(|c| c.type_ == condition && c.status == status)
                    .then_some(found)
            }
        },
    )
    .await
}

/// Deletes the test namespace when dropped, also while unwinding.
struct NamespaceGuard {
    kubeconfig: PathBuf,
    namespace: String,
}

impl Drop for NamespaceGuard {
    fn drop(&mut self) {
        let (kubeconfig, namespace) = (self.kubeconfig.clone(), self.namespace.clone());
        // Best effort, on a thread and runtime of its own with a client of its own: the test's
        // client works only while the test's runtime runs, and that one waits here.
        let _ = std::thread::spawn(move || {
            testkit::block_on(async move {
                let namespaces: Api<Namespace> = Api::all(client(&kubeconfig).await);
                let deleted = tokio::time::timeout(
                    Duration::from_secs(20),
                    namespaces.delete(&namespace, &DeleteParams::default()),
                )
                .await;
                if !matches!(deleted, Ok(Ok(_))) {
                    eprintln!("could not delete the test namespace {namespace}: {deleted:?}");
                }
            });
        })
        .join();
    }
}
