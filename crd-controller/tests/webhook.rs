//! The injection webhook over real HTTPS with real AdmissionReview v1 requests: the returned
//! JSONPatch is applied to the pod and the result validated as a Kubernetes Pod.
//!
//! The server runs in process (so the tests supply the namespaces); its certificate comes from a
//! test CA made with rcgen, and the client trusts only that CA. One test runs the binary with
//! the flags the Helm chart uses.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::body::Bytes;
use base64::Engine as _;
use http_body_util::{BodyExt as _, Full};
use k8s_openapi::api::core::v1::{Container, Pod};
use serde_json::{Value, json};
use stackroute_controller::certs::{self, Ca};
use stackroute_controller::metrics::Metrics;
use stackroute_controller::tls::CertFiles;
use stackroute_controller::webhook::kubernetes::write_serving;
use stackroute_controller::webhook::rdma::{RdmaPolicies, StaticPolicies};
use stackroute_controller::webhook::{
    self, BoxFuture, Namespaces, RdmaInjection, StaticNamespaces, Webhook,
};
use stackroute_injector::{
    Config, INJECTED, NamespaceMeta, RDMA_PROVIDER_ENV, RDMA_PROVIDER_PATH, RDMA_STATUS, Rdma,
    SHIM_NAME,
};
use stackroute_policy::ClusterState;
use stackroute_policy::selector::Labels;

const SHIM_IMAGE: &str = "registry.example/stackroute-shim:0.1.0";
const OWN_NAMESPACE: &str = "stackroute-system";
const ENV: [&str; 4] = [
    "LD_PRELOAD",
    "STACKROUTE_SOCKET_DIR",
    "STACKROUTE_NAMESPACE",
    "STACKROUTE_WORKLOAD",
];

// === the server and the client ===

struct Server {
    addr: SocketAddr,
    ca: Ca,
    dir: tempfile::TempDir,
    metrics: Arc<Metrics>,
}

fn mk_config() -> Config {
    Config {
        shim_image: SHIM_IMAGE.into(),
        socket_dir: "/run/stackroute".into(),
        own_namespace: OWN_NAMESPACE.into(),
    }
}

fn write_cert(dir: &Path, ca: &Ca) {
    let serving = certs::issue_serving(
        ca,
        &["localhost".to_string()],
        SystemTime::now(),
        Duration::from_secs(3600),
    )
    .expect("issuing a test serving certificate");
    write_serving(dir, &serving).expect("writing the certificate");
}

async fn start_with(namespaces: Arc<dyn Namespaces>) -> Server {
    start_with_rdma(namespaces, None).await
}

async fn start_with_rdma(namespaces: Arc<dyn Namespaces>, rdma: Option<RdmaInjection>) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let ca = certs::new_ca(SystemTime::now()).unwrap();
    write_cert(dir.path(), &ca);
    let files = CertFiles::new(dir.path());
    assert!(files.reload().unwrap());
    tokio::spawn(files.clone().watch(Duration::from_millis(100)));
    let metrics = Arc::new(Metrics::default());
    let app = webhook::router(Arc::new(Webhook {
        config: mk_config(),
        namespaces,
        metrics: metrics.clone(),
        rdma,
    }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(webhook::serve(
        listener,
        files.server_config().unwrap(),
        app,
    ));
    Server {
        addr,
        ca,
        dir,
        metrics,
    }
}

fn namespaces() -> StaticNamespaces {
    let on = |key: &str| NamespaceMeta {
        labels: BTreeMap::new(),
        annotations: BTreeMap::from([(key.to_string(), "enabled".to_string())]),
    };
    StaticNamespaces(BTreeMap::from([
        ("plain".to_string(), NamespaceMeta::default()),
        ("annotated".to_string(), on("stackroute.dev/inject")),
        (
            "labelled".to_string(),
            NamespaceMeta {
                labels: BTreeMap::from([(
                    "stackroute.dev/inject".to_string(),
                    "enabled".to_string(),
                )]),
                annotations: BTreeMap::new(),
            },
        ),
    ]))
}

async fn start() -> Server {
    start_with(Arc::new(namespaces())).await
}

/// One HTTPS request on a new connection, trusting only `ca_pem`.
async fn request(
    addr: SocketAddr,
    ca_pem: &str,
    method: &str,
    path: &str,
    body: Vec<u8>,
) -> anyhow::Result<(u16, Vec<u8>)> {
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let tls = connector
        .connect(rustls::pki_types::ServerName::try_from("localhost")?, tcp)
        .await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
    tokio::spawn(connection);
    let request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))?;
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes().to_vec();
    Ok((status, body))
}

fn review(namespace: &str, pod: Value) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod,
            "oldObject": null,
            "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}
        }
    })
}

impl Server {
    /// Posts a review; returns the AdmissionReview response.
    async fn review(&self, body: &Value) -> Value {
        let (status, bytes) = request(
            self.addr,
            &self.ca.cert_pem,
            "POST",
            "/inject",
            body.to_string().into_bytes(),
        )
        .await
        .expect("an HTTPS answer");
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&bytes));
        let value: Value = serde_json::from_slice(&bytes).expect("a JSON answer");
        assert_eq!(value["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(value["kind"], "AdmissionReview");
        assert_eq!(
            value["response"]["uid"], body["request"]["uid"],
            "uid echoed"
        );
        value
    }

    /// Reviews `pod` in `namespace`; returns the pod with the patch applied and whether there
    /// was a patch.
    async fn admit(&self, namespace: &str, pod: &Value) -> (Value, bool) {
        let answer = self.review(&review(namespace, pod.clone())).await;
        let response = &answer["response"];
        assert_eq!(response["allowed"], true, "{answer}");
        let Some(patch) = response["patch"].as_str() else {
            assert!(response.get("patchType").is_none());
            return (pod.clone(), false);
        };
        assert_eq!(response["patchType"], "JSONPatch");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(patch)
            .expect("base64 patch");
        let patch: json_patch::Patch = serde_json::from_slice(&bytes).expect("an RFC 6902 patch");
        let mut doc = pod.clone();
        json_patch::patch(&mut doc, &patch).expect("the patch applies");
        (doc, true)
    }
}

// === validation of an injected pod ===

fn containers(pod: &Pod) -> Vec<&Container> {
    let spec = pod.spec.as_ref().unwrap();
    spec.init_containers
        .iter()
        .flatten()
        .filter(|c| c.name != SHIM_NAME)
        .chain(spec.containers.iter())
        .collect()
}

/// Checks everything an injected pod must have; returns it typed.
#[track_caller]
fn assert_injected(before: &Value, after: &Value) -> Pod {
    let pod: Pod = serde_json::from_value(after.clone()).expect("the result is a valid Pod");
    let original: Pod = serde_json::from_value(before.clone()).unwrap();
    let spec = pod.spec.as_ref().unwrap();

    // The init container: first, from the shim image, copying into the emptyDir.
    let init = &spec.init_containers.as_ref().expect("init containers")[0];
    assert_eq!(init.name, SHIM_NAME);
    assert_eq!(init.image.as_deref(), Some(SHIM_IMAGE));
    let script = init.command.as_ref().unwrap().join(" ");
    assert!(script.contains("cp /stackroute/lib/"), "{script}");
    assert!(
        init.resources.is_none(),
        "no resources on the init container"
    );
    assert_eq!(
        spec.init_containers
            .iter()
            .flatten()
            .filter(|c| c.name == SHIM_NAME)
            .count(),
        1
    );

    // Volumes: unique names, ours present with the right sources.
    let volumes = spec.volumes.as_ref().expect("volumes");
    let mut names: Vec<_> = volumes.iter().map(|v| v.name.as_str()).collect();
    names.sort_unstable();
    let before_dedup = names.len();
    names.dedup();
    assert_eq!(names.len(), before_dedup, "volume names are unique");
    let shim = volumes.iter().find(|v| v.name == SHIM_NAME).unwrap();
    assert!(shim.empty_dir.is_some());
    let sockets = volumes
        .iter()
        .find(|v| v.name == "stackroute-sockets")
        .unwrap();
    let host = sockets.host_path.as_ref().expect("a hostPath");
    assert_eq!(host.path, "/run/stackroute");
    assert_eq!(host.type_.as_deref(), Some("Directory"));

    // Every container (init containers included): the environment and both mounts.
    for container in containers(&pod) {
        let env = container.env.as_ref().expect("env");
        for name in ENV {
            assert_eq!(
                env.iter().filter(|e| e.name == name).count(),
                1,
                "{name} once in {}",
                container.name
            );
        }
        let get = |name: &str| env.iter().find(|e| e.name == name).unwrap();
        assert!(
            get("LD_PRELOAD")
                .value
                .as_deref()
                .unwrap()
                .starts_with("/stackroute/libnsocket.so"),
            "{}",
            container.name
        );
        assert_eq!(
            get("STACKROUTE_SOCKET_DIR").value.as_deref(),
            Some("/run/stackroute")
        );
        let ns_field = get("STACKROUTE_NAMESPACE")
            .value_from
            .as_ref()
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str());
        assert_eq!(ns_field, Some("metadata.namespace"));
        let mounts = container.volume_mounts.as_ref().expect("mounts");
        let shim = mounts.iter().find(|m| m.name == SHIM_NAME).unwrap();
        assert_eq!(shim.mount_path, "/stackroute");
        let sockets = mounts
            .iter()
            .find(|m| m.name == "stackroute-sockets")
            .unwrap();
        assert_eq!(sockets.mount_path, "/run/stackroute");
        assert_eq!(sockets.read_only, Some(true));
    }

    // Nothing else changed: images, the containers' order, and resources (no device
    // resources) unless the webhook says it added RDMA's (the RDMA tests check those).
    let rdma = pod
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(RDMA_STATUS));
    let parts = |pod: &Pod| -> Vec<_> {
        containers(pod)
            .iter()
            .map(|c| {
                let resources = if rdma { None } else { c.resources.clone() };
                (c.name.clone(), c.image.clone(), resources)
            })
            .collect()
    };
    assert_eq!(parts(&original), parts(&pod));
    if !rdma && !before.to_string().contains("rdma/") {
        assert!(!after.to_string().contains("rdma/"), "no device resources");
    }

    assert!(
        pod.metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(INJECTED))
    );
    pod
}

fn mk_pod(labels: Value, annotations: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "web-7d9c-", "labels": labels, "annotations": annotations},
        "spec": {"containers": [{"name": "app", "image": "nginx:1.27", "resources": {"limits": {"cpu": "1"}}}]}
    })
}

// === tests ===

#[tokio::test]
async fn annotated_pod_with_several_containers_is_injected_and_validates() {
    let server = start().await;
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web-0", "namespace": "plain",
                     "annotations": {"stackroute.dev/inject": "enabled", "other": "x"}},
        "spec": {
            "initContainers": [{"name": "migrate", "image": "busybox", "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
            "containers": [
                {"name": "app", "image": "nginx", "env": [{"name": "A", "value": "1"}],
                 "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}},
                {"name": "sidecar", "image": "envoy"}
            ],
            "volumes": [{"name": "data", "emptyDir": {}}]
        }
    });
    let (after, patched) = server.admit("plain", &pod).await;
    assert!(patched);
    let typed = assert_injected(&pod, &after);
    let spec = typed.spec.unwrap();
    assert_eq!(spec.init_containers.as_ref().unwrap().len(), 2);
    assert_eq!(spec.init_containers.as_ref().unwrap()[1].name, "migrate");
    assert_eq!(spec.volumes.as_ref().unwrap().len(), 3);
    // Existing env and mounts are kept.
    assert!(
        spec.containers[0]
            .env
            .as_ref()
            .unwrap()
            .iter()
            .any(|e| e.name == "A")
    );
    assert_eq!(
        spec.init_containers.as_ref().unwrap()[1]
            .volume_mounts
            .as_ref()
            .unwrap()
            .len(),
        3
    );
    let status = &typed.metadata.annotations.as_ref().unwrap()[INJECTED];
    assert!(status.contains("libc=glibc"), "{status}");
    assert!(status.contains(SHIM_IMAGE), "{status}");
}

#[tokio::test]
async fn labelled_pod_is_injected_and_unlabelled_one_is_not() {
    let server = start().await;
    let labelled = mk_pod(json!({"stackroute.dev/inject": "enabled"}), json!({}));
    let (after, patched) = server.admit("plain", &labelled).await;
    assert!(patched);
    assert_injected(&labelled, &after);

    let plain = mk_pod(json!({"app": "web"}), json!({"note": "x"}));
    let (after, patched) = server.admit("plain", &plain).await;
    assert!(!patched);
    assert_eq!(after, plain);
    // A namespace the lookup does not know is "not opted in" too.
    let (_, patched) = server.admit("unknown-ns", &plain).await;
    assert!(!patched);
}

#[tokio::test]
async fn namespace_opt_in_by_annotation_or_label_and_pod_opt_out_wins() {
    let server = start().await;
    let plain = mk_pod(json!({}), json!({}));
    for ns in ["annotated", "labelled"] {
        let (after, patched) = server.admit(ns, &plain).await;
        assert!(patched, "{ns}");
        assert_injected(&plain, &after);
    }
    let opted_out = mk_pod(json!({}), json!({"stackroute.dev/inject": "disabled"}));
    let (_, patched) = server.admit("annotated", &opted_out).await;
    assert!(!patched);
    let opted_out_label = mk_pod(json!({"stackroute.dev/inject": "disabled"}), json!({}));
    let (_, patched) = server.admit("labelled", &opted_out_label).await;
    assert!(!patched);
}

#[tokio::test]
async fn host_network_and_excluded_namespaces_are_skipped() {
    let server = start().await;
    let mut host = mk_pod(json!({"stackroute.dev/inject": "enabled"}), json!({}));
    host["spec"]["hostNetwork"] = true.into();
    let (_, patched) = server.admit("annotated", &host).await;
    assert!(!patched, "hostNetwork");
    let opted_in = mk_pod(json!({"stackroute.dev/inject": "enabled"}), json!({}));
    for ns in [OWN_NAMESPACE, "kube-system"] {
        let (_, patched) = server.admit(ns, &opted_in).await;
        assert!(!patched, "{ns}");
    }
}

#[tokio::test]
async fn existing_ld_preload_is_preserved_after_ours() {
    let server = start().await;
    let pod = json!({
        "metadata": {"name": "p", "annotations": {"stackroute.dev/inject": "enabled"}},
        "spec": {"containers": [{"name": "app", "image": "x",
            "env": [{"name": "LD_PRELOAD", "value": "/usr/lib/libjemalloc.so"}]}]}
    });
    let (after, _) = server.admit("plain", &pod).await;
    let typed = assert_injected(&pod, &after);
    let env = typed.spec.unwrap().containers[0].env.clone().unwrap();
    let preload = env.iter().find(|e| e.name == "LD_PRELOAD").unwrap();
    assert_eq!(
        preload.value.as_deref(),
        Some("/stackroute/libnsocket.so:/usr/lib/libjemalloc.so")
    );
}

#[tokio::test]
async fn second_review_adds_nothing_and_later_containers_get_the_env() {
    let server = start().await;
    let pod = mk_pod(json!({"stackroute.dev/inject": "enabled"}), json!({}));
    let (once, _) = server.admit("plain", &pod).await;
    assert_injected(&pod, &once);
    // Reinvocation of the already injected pod: no patch.
    let (twice, patched) = server.admit("plain", &once).await;
    assert!(!patched, "idempotent");
    assert_eq!(twice, once);
    assert_eq!(
        server
            .metrics
            .render()
            .lines()
            .find(|l| l.contains("result=\"unchanged\"")),
        Some("stackroute_controller_webhook_requests_total{result=\"unchanged\"} 1")
    );

    // A later webhook added an init container and a sidecar: only they get env and mounts.
    let mut grown = once.clone();
    grown["spec"]["initContainers"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "vault-init", "image": "vault"}));
    grown["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "proxy", "image": "envoy", "env": [{"name": "X", "value": "y"}]}));
    let answer = server.review(&review("plain", grown.clone())).await;
    let ops: Vec<Value> = serde_json::from_slice(
        &base64::engine::general_purpose::STANDARD
            .decode(answer["response"]["patch"].as_str().unwrap())
            .unwrap(),
    )
    .unwrap();
    for op in &ops {
        let path = op["path"].as_str().unwrap();
        assert!(
            path.starts_with("/spec/initContainers/1/") || path.starts_with("/spec/containers/1/"),
            "only the new containers are touched: {path}"
        );
    }
    let (after, _) = server.admit("plain", &grown).await;
    assert_injected(&grown, &after);
    let (_, patched) = server.admit("plain", &after).await;
    assert!(!patched);
}

#[tokio::test]
async fn config_annotations_choose_build_workload_and_log() {
    let server = start().await;
    let pod = mk_pod(
        json!({}),
        json!({
            "stackroute.dev/inject": "enabled",
            "config.stackroute.dev/libc": "musl",
            "config.stackroute.dev/workload": "checkout",
            "config.stackroute.dev/log": "debug",
        }),
    );
    let (after, _) = server.admit("plain", &pod).await;
    let typed = assert_injected(&pod, &after);
    let spec = typed.spec.as_ref().unwrap();
    let script = spec.init_containers.as_ref().unwrap()[0]
        .command
        .as_ref()
        .unwrap()
        .join(" ");
    assert!(
        script.contains("cp /stackroute/lib/musl/libnsocket.so /stackroute-install/libnsocket.so"),
        "{script}"
    );
    let env = spec.containers[0].env.as_ref().unwrap();
    let value = |name: &str| {
        env.iter()
            .find(|e| e.name == name)
            .and_then(|e| e.value.clone())
    };
    assert_eq!(value("STACKROUTE_WORKLOAD").as_deref(), Some("checkout"));
    assert_eq!(value("STACKROUTE_LOG").as_deref(), Some("debug"));
    let status = &typed.metadata.annotations.as_ref().unwrap()[INJECTED];
    assert!(
        status.contains("libc=musl") && status.contains("workload=checkout"),
        "{status}"
    );

    // An invalid setting is reported as a warning and ignored.
    let bad = mk_pod(
        json!({}),
        json!({"stackroute.dev/inject": "enabled", "config.stackroute.dev/libc": "bionic"}),
    );
    let answer = server.review(&review("plain", bad)).await;
    let warnings = answer["response"]["warnings"].as_array().unwrap();
    assert!(warnings[0].as_str().unwrap().contains("bionic"));
}

#[tokio::test]
async fn bad_requests_get_errors_and_the_server_keeps_serving() {
    let server = start().await;
    let post = |body: Vec<u8>| request(server.addr, &server.ca.cert_pem, "POST", "/inject", body);

    // No UID to answer: HTTP 400.
    for body in [&b"{not json"[..], b"", b"[1,2]", b"{\"request\": {}}"] {
        let (status, text) = post(body.to_vec()).await.unwrap();
        assert_eq!(status, 400, "{}", String::from_utf8_lossy(&text));
    }

    // A UID but a wrong review: an AdmissionReview refusal with status 400.
    let pod = mk_pod(json!({"stackroute.dev/inject": "enabled"}), json!({}));
    let mut v1beta1 = review("plain", pod.clone());
    v1beta1["apiVersion"] = "admission.k8s.io/v1beta1".into();
    let mut service = review(
        "plain",
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}}),
    );
    service["request"]["kind"]["kind"] = "Service".into();
    let mut not_a_pod = review("plain", json!({"apiVersion": "v1", "kind": "ConfigMap"}));
    not_a_pod["request"]["object"]["data"] = json!({"a": "b"});
    let broken_pod = review("plain", json!({"spec": {"containers": {"not": "a list"}}}));
    let mut no_object = review("plain", pod.clone());
    no_object["request"]["object"] = Value::Null;
    for body in [v1beta1, service, not_a_pod, broken_pod, no_object] {
        let answer = server.review(&body).await;
        let response = &answer["response"];
        assert_eq!(response["allowed"], false, "{answer}");
        assert_eq!(response["status"]["code"], 400, "{answer}");
        assert!(response["status"]["message"].as_str().unwrap().len() > 10);
        assert!(response.get("patch").is_none());
    }

    // Too large: 413 before parsing.
    let huge = vec![b' '; webhook::MAX_BODY_BYTES + 1];
    let (status, _) = post(huge).await.unwrap();
    assert_eq!(status, 413);

    // Wrong method.
    let (status, _) = request(server.addr, &server.ca.cert_pem, "GET", "/inject", vec![])
        .await
        .unwrap();
    assert_eq!(status, 405);

    // Still serving, and counted.
    let (status, body) = request(server.addr, &server.ca.cert_pem, "GET", "/healthz", vec![])
        .await
        .unwrap();
    assert_eq!((status, body.as_slice()), (200, &b"ok\n"[..]));
    let (after, patched) = server.admit("plain", &pod).await;
    assert!(patched);
    assert_injected(&pod, &after);
    let metrics = server.metrics.render();
    assert!(
        metrics.contains("stackroute_controller_webhook_requests_total{result=\"invalid\"} 10"),
        "{metrics}"
    );
    assert!(
        metrics.contains("stackroute_controller_webhook_requests_total{result=\"injected\"} 1"),
        "{metrics}"
    );
}

/// A namespace source that always fails.
struct Broken;

impl Namespaces for Broken {
    fn get<'a>(&'a self, _: &'a str) -> BoxFuture<'a, anyhow::Result<Option<NamespaceMeta>>> {
        Box::pin(async { anyhow::bail!("API server unreachable") })
    }
}

#[tokio::test]
async fn failed_namespace_lookup_admits_uninjected_but_pod_opt_in_needs_no_lookup() {
    let server = start_with(Arc::new(Broken)).await;
    let plain = mk_pod(json!({}), json!({}));
    let answer = server.review(&review("annotated", plain)).await;
    assert_eq!(answer["response"]["allowed"], true);
    assert!(answer["response"].get("patch").is_none());
    assert!(
        answer["response"]["warnings"][0]
            .as_str()
            .unwrap()
            .contains("not injected")
    );
    let opted_in = mk_pod(json!({"stackroute.dev/inject": "enabled"}), json!({}));
    let (after, patched) = server.admit("annotated", &opted_in).await;
    assert!(patched);
    assert_injected(&opted_in, &after);
    assert!(
        server
            .metrics
            .render()
            .contains("stackroute_controller_webhook_requests_total{result=\"namespace_error\"} 1")
    );
}

#[tokio::test]
async fn replaced_certificate_files_are_served_to_new_connections() {
    let server = start().await;
    let get = |ca: String| async move {
        request(server.addr, &ca, "GET", "/healthz", vec![])
            .await
            .map(|(status, _)| status)
    };
    assert_eq!(get(server.ca.cert_pem.clone()).await.unwrap(), 200);

    // New CA, new certificate, written in place.
    let next = certs::new_ca(SystemTime::now()).unwrap();
    assert!(
        get(next.cert_pem.clone()).await.is_err(),
        "the new CA is not trusted yet"
    );
    write_cert(server.dir.path(), &next);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if get(next.cert_pem.clone()).await.is_ok() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new certificate was not served within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        get(server.ca.cert_pem.clone()).await.is_err(),
        "the old certificate is no longer served"
    );

    // A broken update keeps the certificate in force.
    std::fs::write(server.dir.path().join("tls.crt"), "garbage").unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(get(next.cert_pem.clone()).await.unwrap(), 200);
}

#[tokio::test]
async fn binary_serves_the_webhook_with_the_chart_flags() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let certs_dir = dir.path().join("certs");
    let ca = certs::new_ca(SystemTime::now()).unwrap();
    write_cert(&certs_dir, &ca);
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .to_string()
    };
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_stackroute-controller"))
        .args([
            "--state",
            state.to_str().unwrap(),
            "--insecure-plaintext",
            "--grpc-addr",
            &free(),
            "--metrics-addr",
            &free(),
        ])
        .env("STACKROUTE_CONTROLLER_WEBHOOK_ADDR", addr.to_string())
        .env("STACKROUTE_CONTROLLER_WEBHOOK_CERT_DIR", &certs_dir)
        .env("STACKROUTE_CONTROLLER_SHIM_IMAGE", SHIM_IMAGE)
        .env("STACKROUTE_CONTROLLER_SOCKET_DIR", "/var/run/sr")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let answer = loop {
        let pod = mk_pod(json!({"stackroute.dev/inject": "enabled"}), json!({}));
        if let Ok((200, body)) = request(
            addr,
            &ca.cert_pem,
            "POST",
            "/inject",
            review("default", pod).to_string().into_bytes(),
        )
        .await
        {
            break serde_json::from_slice::<Value>(&body).unwrap();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the binary's webhook never answered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let _ = child.kill();
    let _ = child.wait();
    let patch = base64::engine::general_purpose::STANDARD
        .decode(answer["response"]["patch"].as_str().unwrap())
        .unwrap();
    let text = String::from_utf8(patch).unwrap();
    assert!(
        text.contains("/var/run/sr"),
        "--socket-dir from the env: {text}"
    );
    assert!(text.contains(SHIM_IMAGE));

    // Without --shim-image the flags are refused.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_stackroute-controller"))
        .args([
            "--state",
            state.to_str().unwrap(),
            "--webhook-addr",
            "127.0.0.1:1",
        ])
        .arg("--webhook-cert-dir")
        .arg(&certs_dir)
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--shim-image"));

    // An image that is not an image reference (it ends up in a shell script) is refused.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_stackroute-controller"))
        .args([
            "--state",
            state.to_str().unwrap(),
            "--webhook-addr",
            "127.0.0.1:0",
        ])
        .args(["--shim-image", "shim:1\"; reboot"])
        .arg("--webhook-cert-dir")
        .arg(&certs_dir)
        .args([
            "--insecure-plaintext",
            "--grpc-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("not an image reference"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

// === RDMA resources ===

const RDMA_RESOURCE: &str = "rdma/hca_shared_devices_a";

/// A StackRoute in `plain` whose trainers may use RDMA (as a fallback), and one for web pods
/// that never does.
const RDMA_POLICIES: &str = r#"
apiVersion: stackroute.dev/v1alpha1
kind: StackRoute
metadata: {name: trainers, namespace: plain}
spec:
  podSelector: {matchLabels: {app: trainer}}
  rules:
    - name: roce
      transport: {stack: Kernel, fallback: [{stack: RDMA}]}
---
apiVersion: stackroute.dev/v1alpha1
kind: StackRoute
metadata: {name: web, namespace: plain}
spec:
  podSelector: {matchLabels: {app: web}}
  rules:
    - name: bbr
      transport: {stack: Kernel, congestionControl: BBR}
"#;

fn mk_rdma(policies: Arc<dyn RdmaPolicies>) -> RdmaInjection {
    RdmaInjection {
        config: Rdma {
            resource_name: RDMA_RESOURCE.into(),
            resource_count: 1,
            ipc_lock: true,
        },
        policies,
    }
}

fn rdma_policies() -> Arc<dyn RdmaPolicies> {
    let mut state = ClusterState::default();
    assert!(state.load_text("policies.yaml", RDMA_POLICIES).is_empty());
    Arc::new(StaticPolicies(state))
}

/// An application container's RDMA resource limit and request, and its added capabilities.
type RdmaContainer = (Option<String>, Option<String>, Vec<String>);

/// Each application container's [`RdmaContainer`], and the pod's `stackroute.dev/rdma`.
fn rdma_parts(pod: &Pod) -> (Vec<RdmaContainer>, Option<String>) {
    let containers = pod
        .spec
        .as_ref()
        .unwrap()
        .containers
        .iter()
        .map(|c| {
            let get = |limits: bool| {
                let resources = c.resources.as_ref()?;
                let map = if limits {
                    resources.limits.as_ref()
                } else {
                    resources.requests.as_ref()
                }?;
                Some(map.get(RDMA_RESOURCE)?.0.clone())
            };
            let caps = c
                .security_context
                .as_ref()
                .and_then(|s| s.capabilities.as_ref())
                .and_then(|c| c.add.clone())
                .unwrap_or_default();
            (get(true), get(false), caps)
        })
        .collect();
    let status = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(RDMA_STATUS).cloned());
    (containers, status)
}

/// The verbs provider in a pod: each application container's `STACKROUTE_RDMA_PROVIDER`,
/// whether an init container has one, and whether the shim's init container copies it.
/// The trainer pod's verbs provider: with `given`, named in its application container and
/// copied by the init container; either way the author's own value kept in the other
/// container, and none in an init container.
fn assert_provider(pod: &Pod, given: bool) {
    let own = given.then(|| RDMA_PROVIDER_PATH.to_string());
    assert_eq!(
        provider_parts(pod),
        (
            vec![own, Some("/opt/exporter/verbs.so".into())],
            false,
            given
        )
    );
}

fn provider_parts(pod: &Pod) -> (Vec<Option<String>>, bool, bool) {
    let spec = pod.spec.as_ref().unwrap();
    let provider = |c: &Container| {
        c.env
            .iter()
            .flatten()
            .rfind(|e| e.name == RDMA_PROVIDER_ENV)
            .map(|e| e.value.clone().unwrap_or_default())
    };
    let inits = spec.init_containers.as_deref().unwrap_or_default();
    let copies = inits
        .iter()
        .filter(|c| c.name == SHIM_NAME)
        .flat_map(|c| c.command.iter().flatten())
        .any(|arg| {
            arg.contains(
                "cp /stackroute/lib/libstackroute_rdma.so /stackroute-install/libstackroute_rdma.so",
            )
        });
    (
        spec.containers.iter().map(provider).collect(),
        inits.iter().any(|c| provider(c).is_some()),
        copies,
    )
}

fn trainer_pod() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"generateName": "trainer-", "labels": {"app": "trainer", "stackroute.dev/inject": "enabled"}},
        "spec": {
            "initContainers": [{"name": "fetch", "image": "busybox"}],
            "containers": [
                {"name": "train", "image": "pytorch", "resources": {"limits": {"cpu": "4"}}},
                {"name": "metrics", "image": "exporter",
                 "resources": {"limits": {RDMA_RESOURCE: "2"}},
                 "securityContext": {"capabilities": {"add": ["NET_RAW"], "drop": ["ALL"]}},
                 "env": [{"name": "STACKROUTE_RDMA_PROVIDER", "value": "/opt/exporter/verbs.so"}]}
            ]
        }
    })
}

#[tokio::test]
async fn pods_whose_policies_pick_rdma_get_the_resource_and_ipc_lock() {
    let server = start_with_rdma(Arc::new(namespaces()), Some(mk_rdma(rdma_policies()))).await;
    let pod = trainer_pod();
    let (after, patched) = server.admit("plain", &pod).await;
    assert!(patched);
    let typed = assert_injected(&pod, &after);
    let (containers, status) = rdma_parts(&typed);
    let some = |v: &str| Some(v.to_string());
    let caps = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(
        containers,
        [
            (some("1"), some("1"), caps(&["IPC_LOCK"])),
            // The author's count stays; its request follows it.
            (some("2"), some("2"), caps(&["NET_RAW", "IPC_LOCK"])),
        ]
    );
    assert_eq!(
        status.as_deref(),
        Some(
            "requested resource=rdma/hca_shared_devices_a count=1 ipcLock=true \
             provider=/stackroute/libstackroute_rdma.so"
        )
    );
    // The verbs provider: copied by the init container, named in the application containers
    // (the author's own value stays), in no init container.
    assert_provider(&typed, true);
    let spec = typed.spec.as_ref().unwrap();
    assert_eq!(
        spec.containers[0]
            .resources
            .as_ref()
            .unwrap()
            .limits
            .as_ref()
            .unwrap()["cpu"]
            .0,
        "4"
    );
    for init in spec.init_containers.iter().flatten() {
        assert!(
            init.resources.as_ref().is_none_or(|r| r
                .limits
                .iter()
                .flatten()
                .all(|(k, _)| k != RDMA_RESOURCE)),
            "{}",
            init.name
        );
    }
    // A second review (reinvocation) adds nothing.
    let (again, patched) = server.admit("plain", &after).await;
    assert!(!patched, "{again}");

    // The web pod's policy never picks RDMA; a pod no policy selects neither.
    for labels in [
        json!({"app": "web", "stackroute.dev/inject": "enabled"}),
        json!({"app": "batch", "stackroute.dev/inject": "enabled"}),
    ] {
        let pod = mk_pod(labels, json!({}));
        let (after, patched) = server.admit("plain", &pod).await;
        assert!(patched);
        let typed = assert_injected(&pod, &after);
        assert_eq!(rdma_parts(&typed), (vec![(None, None, vec![])], None));
        assert_eq!(provider_parts(&typed), (vec![None], false, false));
    }
    // Not opted in: no patch at all, RDMA policy or not.
    let mut plain = trainer_pod();
    plain["metadata"]["labels"] = json!({"app": "trainer"});
    let (_, patched) = server.admit("plain", &plain).await;
    assert!(!patched);
    // A trainer in another namespace is not selected by `plain`'s StackRoute.
    let (after, _) = server.admit("labelled", &trainer_pod()).await;
    let typed: Pod = serde_json::from_value(after).unwrap();
    assert_eq!(rdma_parts(&typed).1, None);
    assert_provider(&typed, false);
}

#[tokio::test]
async fn rdma_off_or_unreadable_policies_add_no_rdma() {
    // The chart's RDMA off: the same trainer gets the shim only.
    let server = start().await;
    let pod = trainer_pod();
    let (after, patched) = server.admit("plain", &pod).await;
    assert!(patched);
    let typed = assert_injected(&pod, &after);
    let (containers, status) = rdma_parts(&typed);
    assert_eq!(status, None);
    assert_eq!(containers[0], (None, None, vec![]));
    assert_eq!(
        containers[1],
        (Some("2".into()), None, vec!["NET_RAW".to_string()]),
        "the author's own values only"
    );
    assert_provider(&typed, false);

    // The policies cannot be read: injected without RDMA, with a warning.
    struct Failing;
    impl RdmaPolicies for Failing {
        fn selects<'a>(&'a self, _: &'a str, _: &'a Labels) -> BoxFuture<'a, anyhow::Result<bool>> {
            Box::pin(async { anyhow::bail!("index stopped") })
        }
    }
    let server = start_with_rdma(Arc::new(namespaces()), Some(mk_rdma(Arc::new(Failing)))).await;
    let answer = server.review(&review("plain", pod.clone())).await;
    let warnings = answer["response"]["warnings"].to_string();
    assert!(warnings.contains("RDMA resources not added"), "{warnings}");
    let (after, patched) = server.admit("plain", &pod).await;
    assert!(patched);
    let typed = assert_injected(&pod, &after);
    assert_eq!(rdma_parts(&typed).1, None);
    assert!(!provider_parts(&typed).2, "no provider copied");
}

/// The binary with the chart's RDMA flags: the webhook asks the controller's index, which
/// reads the policies from the state directory.
#[tokio::test]
async fn binary_adds_rdma_resources_from_the_index_policies() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::write(
        state.join("policies.yaml"),
        RDMA_POLICIES.replace("namespace: plain", "namespace: default"),
    )
    .unwrap();
    let certs_dir = dir.path().join("certs");
    let ca = certs::new_ca(SystemTime::now()).unwrap();
    write_cert(&certs_dir, &ca);
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .to_string()
    };
    let addr: SocketAddr = free().parse().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_stackroute-controller"))
        .args(["--state", state.to_str().unwrap(), "--insecure-plaintext"])
        .args(["--grpc-addr", &free(), "--metrics-addr", &free()])
        .args(["--webhook-addr", &addr.to_string()])
        .arg("--webhook-cert-dir")
        .arg(&certs_dir)
        .args(["--shim-image", SHIM_IMAGE])
        .args(["--rdma-resource", RDMA_RESOURCE, "--rdma-resource-count=2"])
        .arg("--rdma-ipc-lock=false")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let admit = |pod: Value| {
        let ca = ca.cert_pem.clone();
        async move {
            let body = review("default", pod.clone()).to_string().into_bytes();
            let (200, bytes) = request(addr, &ca, "POST", "/inject", body).await.ok()? else {
                return None;
            };
            let answer: Value = serde_json::from_slice(&bytes).ok()?;
            let patch = base64::engine::general_purpose::STANDARD
                .decode(answer["response"]["patch"].as_str()?)
                .ok()?;
            let patch: json_patch::Patch = serde_json::from_slice(&patch).ok()?;
            let mut doc = pod;
            json_patch::patch(&mut doc, &patch).ok()?;
            serde_json::from_value::<Pod>(doc).ok()
        }
    };
    // Until the webhook answers and the poller has loaded the policies.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let trainer = loop {
        if let Some(pod) = admit(trainer_pod()).await
            && rdma_parts(&pod).1.is_some()
        {
            break pod;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the binary's webhook never added RDMA resources"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let web = admit(mk_pod(
        json!({"app": "web", "stackroute.dev/inject": "enabled"}),
        json!({}),
    ))
    .await;
    let _ = child.kill();
    let _ = child.wait();
    let (containers, status) = rdma_parts(&trainer);
    assert_eq!(
        status.as_deref(),
        Some(
            "requested resource=rdma/hca_shared_devices_a count=2 ipcLock=false \
             provider=/stackroute/libstackroute_rdma.so"
        )
    );
    assert_provider(&trainer, true);
    assert_eq!(
        containers,
        [
            (Some("2".into()), Some("2".into()), vec![]),
            (
                Some("2".into()),
                Some("2".into()),
                vec!["NET_RAW".to_string()]
            ),
        ]
    );
    let web = web.expect("the web pod is injected");
    assert_eq!(rdma_parts(&web), (vec![(None, None, vec![])], None));
    assert_eq!(provider_parts(&web), (vec![None], false, false));

    // A resource name that is not an extended resource is refused at start.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_stackroute-controller"))
        .args(["--state", state.to_str().unwrap(), "--insecure-plaintext"])
        .args([
            "--grpc-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .args(["--webhook-addr", "127.0.0.1:0"])
        .arg("--webhook-cert-dir")
        .arg(&certs_dir)
        .args(["--shim-image", SHIM_IMAGE, "--rdma-resource", "hca"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("--rdma-resource"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
