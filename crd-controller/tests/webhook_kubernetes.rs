//! The webhook's Kubernetes-mode parts against a real API server named by
//! `STACKROUTE_TEST_KUBECONFIG`: the controller-owned CA Secret, the serving certificate
//! written to the certificate directory, `caBundle` of a MutatingWebhookConfiguration, the
//! namespace lookup, and the not-injected report (metric and Event). A `harness = false`
//! binary on the testkit harness: without an API server the trial shows as ignored, with the
//! reason; with `STACKROUTE_REQUIRE_KUBERNETES=1` it fails instead.
//!
//! The MutatingWebhookConfiguration it creates selects no namespace (a selector on a label
//! nothing carries) and fails open, so it cannot affect the cluster; it and the test namespace
//! are deleted at the end.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::json;
use stackroute_controller::certs;
use stackroute_controller::metrics::Metrics;
use stackroute_controller::tls::CertFiles;
use stackroute_controller::webhook::Namespaces as _;
use stackroute_controller::webhook::kubernetes::{
    CA_CERT_KEY, CertificateManager, KubeNamespaces, ServingTarget, ensure_ca, patch_ca_bundle,
    report_not_injected,
};
use testkit::Trial;

fn main() -> ExitCode {
    testkit::run(vec![Trial::gated(
        "ca_secret_ca_bundle_namespace_lookup_and_not_injected_report",
        testkit::kubernetes,
        |kubeconfig| {
            testkit::block_on(
                ca_secret_ca_bundle_namespace_lookup_and_not_injected_report(&kubeconfig),
            )
        },
    )])
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

async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn ca_secret_ca_bundle_namespace_lookup_and_not_injected_report(kubeconfig: &Path) {
    let client = client(kubeconfig).await;
    let ns = format!("stackroute-webhook-test-{}", std::process::id());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &object(json!({"metadata": {"name": ns}})),
        )
        .await
        .expect("creating the test namespace");

    // A pod created before its namespace opts in to injection, so that no injection webhook
    // (also not a stackroute installed in this cluster) can have injected it. No
    // service-account token (no kubelet runs it). Until the namespace's default ServiceAccount
    // exists the API server answers "retry" (500 ServerTimeout); so retry.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let missed: Pod = object(json!({
        "metadata": {"name": "missed"},
        "spec": {"nodeName": format!("{ns}-node"), "automountServiceAccountToken": false,
                 "containers": [{"name": "c", "image": "none"}]}
    }));
    eventually("the pod is created", || {
        let (pods, missed) = (pods.clone(), missed.clone());
        async move {
            match pods.create(&PostParams::default(), &missed).await {
                Ok(_) => true,
                Err(kube::Error::Api(status)) if status.reason == "ServerTimeout" => false,
                Err(error) => panic!("creating the pod: {error}"),
            }
        }
    })
    .await;
    namespaces
        .patch(
            &ns,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"annotations": {"stackroute.dev/inject": "enabled"}}}),
            ),
        )
        .await
        .expect("opting the namespace in");
    let config_name = format!("{ns}-injector");
    let configs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    configs
        .create(
            &PostParams::default(),
            &object(json!({
                "metadata": {"name": config_name},
                "webhooks": [
                    {"name": "pods.stackroute.dev", "admissionReviewVersions": ["v1"], "sideEffects": "None",
                     "failurePolicy": "Ignore", "timeoutSeconds": 5, "reinvocationPolicy": "IfNeeded",
                     "namespaceSelector": {"matchLabels": {"stackroute-test-selects-nothing": ns}},
                     "clientConfig": {"service": {"namespace": ns, "name": "injector", "path": "/inject"}},
                     "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}]},
                    {"name": "pods-by-label.stackroute.dev", "admissionReviewVersions": ["v1"], "sideEffects": "None",
                     "failurePolicy": "Ignore", "timeoutSeconds": 5,
                     "namespaceSelector": {"matchLabels": {"stackroute-test-selects-nothing": ns}},
                     "clientConfig": {"service": {"namespace": ns, "name": "injector", "path": "/inject"}},
                     "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}]}
                ]
            })),
        )
        .await
        .expect("creating the MutatingWebhookConfiguration");
    let _cleanup = Cleanup {
        kubeconfig: kubeconfig.to_path_buf(),
        ns: ns.clone(),
        config: config_name.clone(),
    };

    // The CA Secret: created once, then read back unchanged.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let ca = ensure_ca(&secrets, "stackroute-webhook-ca", &ns)
        .await
        .expect("creating the CA");
    let again = ensure_ca(&secrets, "stackroute-webhook-ca", &ns)
        .await
        .expect("reading the CA");
    assert_eq!(ca, again, "the stored CA is reused");
    let stored = secrets.get("stackroute-webhook-ca").await.unwrap();
    assert_eq!(stored.data.unwrap()[CA_CERT_KEY].0, ca.cert_pem.as_bytes());

    // caBundle of every webhook, and idempotent.
    assert_eq!(
        patch_ca_bundle(&configs, &config_name, &ca.cert_pem)
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        patch_ca_bundle(&configs, &config_name, &ca.cert_pem)
            .await
            .unwrap(),
        0
    );

    // The manager: writes a serving certificate for the Service that chains to the CA.
    let dir = tempfile::tempdir().unwrap();
    let files = CertFiles::new(dir.path());
    let manager = tokio::spawn(
        CertificateManager {
            client: client.clone(),
            namespace: ns.clone(),
            secret: "stackroute-webhook-ca".into(),
            targets: vec![ServingTarget {
                service: "injector".into(),
                files: files.clone(),
                with_ca: false,
            }],
            webhook_config: Some(config_name.clone()),
            ca_config_map: None,
        }
        .run(),
    );
    eventually("the serving certificate is written and loaded", || {
        let files = files.clone();
        async move { files.loaded() }
    })
    .await;
    manager.abort();
    let leaf = std::fs::read_to_string(dir.path().join("tls.crt")).unwrap();
    certs::verify(
        &ca.cert_pem,
        &leaf,
        &format!("injector.{ns}.svc"),
        SystemTime::now(),
    )
    .expect("the serving certificate names the Service and chains to the CA");

    // The namespace lookup the webhook uses.
    let lookup = KubeNamespaces::new(client.clone());
    let meta = lookup
        .get(&ns)
        .await
        .unwrap()
        .expect("the namespace exists");
    assert_eq!(meta.annotations["stackroute.dev/inject"], "enabled");
    assert!(
        lookup
            .get("no-such-namespace-here")
            .await
            .unwrap()
            .is_none()
    );

    // The pod the webhook never saw: reported by the metric and an Event below.
    let metrics = Arc::new(Metrics::default());
    let (_leader_tx, leader_rx) = tokio::sync::watch::channel(true);
    let reporter = tokio::spawn(report_not_injected(
        client.clone(),
        stackroute_injector::Config {
            shim_image: "shim:test".into(),
            socket_dir: "/run/stackroute".into(),
            own_namespace: "stackroute-system".into(),
        },
        metrics.clone(),
        leader_rx,
        "test".into(),
    ));
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    eventually("a NotInjected event on the pod", || {
        let events = events.clone();
        async move {
            events
                .list(&ListParams::default())
                .await
                .map(|list| {
                    list.items.iter().any(|e| {
                        e.reason.as_deref() == Some("NotInjected")
                            && e.regarding.as_ref().and_then(|r| r.name.as_deref())
                                == Some("missed")
                    })
                })
                .unwrap_or(false)
        }
    })
    .await;
    reporter.abort();
    assert!(metrics.pods_not_injected.get() >= 1);
}

/// Deletes the MutatingWebhookConfiguration and the test namespace when dropped, also while
/// unwinding.
struct Cleanup {
    kubeconfig: PathBuf,
    ns: String,
    config: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let kubeconfig = self.kubeconfig.clone();
        let (ns, config) = (self.ns.clone(), self.config.clone());
        // Best effort, on a thread and runtime of its own with a client of its own: the test's
        // client works only while the test's runtime runs, and that one waits here.
        let _ = std::thread::spawn(move || {
            testkit::block_on(async move {
                let client = client(&kubeconfig).await;
                let configs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
                let namespaces: Api<Namespace> = Api::all(client);
                let wait = Duration::from_secs(20);
                let deleted = tokio::time::timeout(wait, async {
                    (
                        configs
                            .delete(&config, &DeleteParams::default())
                            .await
                            .is_ok(),
                        namespaces
                            .delete(&ns, &DeleteParams::default())
                            .await
                            .is_ok(),
                    )
                })
                .await;
                if deleted != Ok((true, true)) {
                    eprintln!("could not delete {config} and namespace {ns}: {deleted:?}");
                }
            });
        })
        .join();
    }
}
