//! Kubernetes-mode parts of the webhook: namespace lookups, the controller-owned CA Secret, the
//! serving certificate written where the webhook serves from, `caBundle` of the
//! MutatingWebhookConfiguration, and the report of pods that opted in but were not injected.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use base64::Engine as _;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::core::PartialObjectMeta;
use kube::runtime::WatchStreamExt as _;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, Resource as _};
use serde_json::{Value, json};
use stackroute_injector::{Config, NamespaceMeta};
use tokio::sync::watch;
use tokio_stream::StreamExt as _;

use super::{BoxFuture, Namespaces};
use crate::certs::{self, Ca};
use crate::metrics::Metrics;
use crate::tls::CertFiles;

/// Key of the CA certificate in the Secret.
pub const CA_CERT_KEY: &str = "ca.crt";
/// Key of the CA private key in the Secret.
pub const CA_KEY_KEY: &str = "ca.key";
/// How often `caBundle` is checked (and the serving certificate's age).
pub const RECONCILE_INTERVAL: Duration = Duration::from_secs(30);
/// How often pods are listed for the not-injected report.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(60);

/// Namespaces from a metadata-only watch (a reflector), with a GET for a namespace the cache
/// does not hold yet (before the first list, or just created).
pub struct KubeNamespaces {
    api: Api<Namespace>,
    cache: Store<PartialObjectMeta<Namespace>>,
}

impl KubeNamespaces {
    /// Starts the watch that fills the cache (it runs until the process ends).
    pub fn new(client: Client) -> Self {
        let metadata: Api<PartialObjectMeta<Namespace>> = Api::all(client.clone());
        let (cache, writer) = reflector::store();
        let stream = reflector::reflector(
            writer,
            watcher(metadata, watcher::Config::default()).default_backoff(),
        );
        let api: Api<Namespace> = Api::all(client);
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(event) = stream.next().await {
                if let Err(error) = event {
                    tracing::debug!(%error, "namespace cache watch error (retrying)");
                }
            }
        });
        Self { api, cache }
    }
}

impl Namespaces for KubeNamespaces {
    fn get<'a>(&'a self, name: &'a str) -> BoxFuture<'a, anyhow::Result<Option<NamespaceMeta>>> {
        Box::pin(async move {
            if let Some(cached) = self.cache.get(&ObjectRef::new(name)) {
                return Ok(Some(NamespaceMeta::from_meta(&cached.metadata)));
            }
            let namespace = self
                .api
                .get_metadata_opt(name)
                .await
                .context("reading the namespace")?;
            Ok(namespace.map(|ns| NamespaceMeta::from_meta(&ns.metadata)))
        })
    }
}

// === CA Secret ===

/// The CA held by a Secret, when it has both keys and they form a usable CA.
pub fn ca_from_secret(secret: &Secret, now: SystemTime) -> Option<Ca> {
    let data = secret.data.as_ref()?;
    let text = |key: &str| {
        data.get(key)
            .and_then(|bytes| String::from_utf8(bytes.0.clone()).ok())
    };
    let ca = Ca {
        cert_pem: text(CA_CERT_KEY)?,
        key_pem: text(CA_KEY_KEY)?,
    };
    certs::ca_usable(&ca, now).then_some(ca)
}

fn ca_secret(name: &str, namespace: &str, ca: &Ca, resource_version: Option<String>) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            resource_version,
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_string(),
                "stackroute-controller".to_string(),
            )])),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([
            (
                CA_CERT_KEY.to_string(),
                ByteString(ca.cert_pem.clone().into_bytes()),
            ),
            (
                CA_KEY_KEY.to_string(),
                ByteString(ca.key_pem.clone().into_bytes()),
            ),
        ])),
        ..Default::default()
    }
}

/// Reads the CA from Secret `name`, creating it (or replacing an unusable one) when needed.
/// Replicas racing on the Secret converge on whichever write the API server accepted first.
pub async fn ensure_ca(secrets: &Api<Secret>, name: &str, namespace: &str) -> anyhow::Result<Ca> {
    for _ in 0..5 {
        let now = SystemTime::now();
        match secrets
            .get_opt(name)
            .await
            .context("reading the CA Secret")?
        {
            Some(secret) => {
                if let Some(ca) = ca_from_secret(&secret, now) {
                    return Ok(ca);
                }
                tracing::warn!(
                    secret = name,
                    "the CA Secret holds no usable CA; replacing it"
                );
                let ca = certs::new_ca(now)?;
                let replacement = ca_secret(
                    name,
                    namespace,
                    &ca,
                    secret.metadata.resource_version.clone(),
                );
                match secrets
                    .replace(name, &PostParams::default(), &replacement)
                    .await
                {
                    Ok(_) => return Ok(ca),
                    Err(kube::Error::Api(status)) if status.code == 409 => continue,
                    Err(error) => return Err(error).context("replacing the CA Secret"),
                }
            }
            None => {
                let ca = certs::new_ca(now)?;
                match secrets
                    .create(
                        &PostParams::default(),
                        &ca_secret(name, namespace, &ca, None),
                    )
                    .await
                {
                    Ok(_) => {
                        tracing::info!(secret = name, "created the webhook CA");
                        return Ok(ca);
                    }
                    Err(kube::Error::Api(status)) if status.code == 409 => continue,
                    Err(error) => return Err(error).context("creating the CA Secret"),
                }
            }
        }
    }
    anyhow::bail!("the CA Secret {namespace}/{name} kept changing under us")
}

// === caBundle ===

/// JSONPatch operations setting `caBundle` of every webhook of `config` that does not already
/// hold `ca_pem` (each guarded by a `test` of the webhook's name); empty when all do.
pub fn ca_bundle_ops(config: &MutatingWebhookConfiguration, ca_pem: &str) -> Vec<Value> {
    let wanted = ByteString(ca_pem.as_bytes().to_vec());
    let encoded = base64::engine::general_purpose::STANDARD.encode(ca_pem.as_bytes());
    let mut ops = Vec::new();
    for (i, webhook) in config.webhooks.iter().flatten().enumerate() {
        if webhook.client_config.ca_bundle.as_ref() == Some(&wanted) {
            continue;
        }
        ops.push(
            json!({"op": "test", "path": format!("/webhooks/{i}/name"), "value": webhook.name}),
        );
        ops.push(json!({"op": "add", "path": format!("/webhooks/{i}/clientConfig/caBundle"), "value": encoded}));
    }
    ops
}

/// Sets `caBundle` of every webhook of MutatingWebhookConfiguration `name`; returns how many
/// webhooks changed.
pub async fn patch_ca_bundle(
    api: &Api<MutatingWebhookConfiguration>,
    name: &str,
    ca_pem: &str,
) -> anyhow::Result<usize> {
    let config = api
        .get(name)
        .await
        .with_context(|| format!("reading MutatingWebhookConfiguration {name}"))?;
    let ops = ca_bundle_ops(&config, ca_pem);
    if ops.is_empty() {
        return Ok(0);
    }
    let patch: json_patch::Patch =
        serde_json::from_value(Value::Array(ops.clone())).context("building the patch")?;
    api.patch(name, &PatchParams::default(), &Patch::Json::<()>(patch))
        .await
        .with_context(|| format!("patching caBundle of {name}"))?;
    Ok(ops.len() / 2)
}

// === Serving certificate ===

/// Writes a serving certificate into `dir` (see [`crate::tls::write_pair`]).
pub fn write_serving(dir: &Path, serving: &certs::Serving) -> anyhow::Result<()> {
    crate::tls::write_pair(dir, serving, None)
}

/// A serving certificate the certificate manager keeps issued.
#[derive(Clone, Debug)]
pub struct ServingTarget {
    /// The Service the certificate names (`NAME.NAMESPACE.svc` and its short forms).
    pub service: String,
    /// Where it is written and served from.
    pub files: Arc<CertFiles>,
    /// Also write the CA certificate (`ca.crt`) there: the gRPC service verifies client
    /// certificates against it.
    pub with_ca: bool,
}

/// What the certificate manager works with.
pub struct CertificateManager {
    /// The API client.
    pub client: Client,
    /// The controller's namespace (the CA Secret's and the Services').
    pub namespace: String,
    /// `--webhook-ca-secret`.
    pub secret: String,
    /// The serving certificates to issue.
    pub targets: Vec<ServingTarget>,
    /// `--webhook-config-name`: whose webhooks get the CA as caBundle.
    pub webhook_config: Option<String>,
    /// `--ca-config-map`: where the CA certificate is published for the agents.
    pub ca_config_map: Option<String>,
}

impl CertificateManager {
    /// Ensures the CA, issues each serving certificate, keeps `caBundle` and the CA ConfigMap
    /// in place and renews the certificates after two thirds of their life; retries every
    /// [`RECONCILE_INTERVAL`] on error.
    pub async fn run(self) {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
        let configs: Api<MutatingWebhookConfiguration> = Api::all(self.client.clone());
        let config_maps: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.namespace);
        let mut issued: Option<(String, SystemTime)> = None; // (CA PEM, when)
        loop {
            let step = async {
                let ca = ensure_ca(&secrets, &self.secret, &self.namespace).await?;
                let now = SystemTime::now();
                let renew = match &issued {
                    Some((ca_pem, at)) => {
                        *ca_pem != ca.cert_pem
                            || now.duration_since(*at).unwrap_or_default()
                                > certs::SERVING_VALIDITY * 2 / 3
                    }
                    None => true,
                };
                if renew {
                    for target in &self.targets {
                        let names = certs::service_names(&target.service, &self.namespace);
                        let serving =
                            certs::issue_serving(&ca, &names, now, certs::SERVING_VALIDITY)?;
                        crate::tls::write_pair(
                            target.files.dir(),
                            &serving,
                            target.with_ca.then_some(ca.cert_pem.as_str()),
                        )?;
                        target.files.reload()?;
                        tracing::info!(names = ?names, dir = %target.files.dir().display(),
                            "issued a serving certificate");
                    }
                    issued = Some((ca.cert_pem.clone(), now));
                }
                if let Some(name) = &self.webhook_config {
                    let changed = patch_ca_bundle(&configs, name, &ca.cert_pem).await?;
                    if changed > 0 {
                        tracing::info!(config = %name, webhooks = changed, "patched caBundle");
                    }
                }
                if let Some(name) = &self.ca_config_map {
                    publish_ca(&config_maps, name, &ca.cert_pem).await?;
                }
                anyhow::Ok(())
            };
            if let Err(error) = step.await {
                tracing::warn!(error = %format!("{error:#}"), "certificate reconcile failed; retrying");
            }
            tokio::time::sleep(RECONCILE_INTERVAL).await;
        }
    }
}

/// Creates or updates ConfigMap `name` so that its `ca.crt` is `ca_pem` (what agents mount to
/// trust the controller; the CA key stays in the Secret).
pub async fn publish_ca(api: &Api<ConfigMap>, name: &str, ca_pem: &str) -> anyhow::Result<()> {
    let wanted = BTreeMap::from([(crate::tls::CA_FILE.to_string(), ca_pem.to_string())]);
    match api
        .get_opt(name)
        .await
        .context("reading the CA ConfigMap")?
    {
        Some(existing) if existing.data.as_ref() == Some(&wanted) => Ok(()),
        Some(mut existing) => {
            existing.data = Some(wanted);
            api.replace(name, &PostParams::default(), &existing)
                .await
                .context("updating the CA ConfigMap")?;
            tracing::info!(config_map = name, "published the CA certificate");
            Ok(())
        }
        None => {
            let config_map = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(name.into()),
                    labels: Some(BTreeMap::from([(
                        "app.kubernetes.io/managed-by".to_string(),
                        "stackroute-controller".to_string(),
                    )])),
                    ..Default::default()
                },
                data: Some(wanted),
                ..Default::default()
            };
            match api.create(&PostParams::default(), &config_map).await {
                Ok(_) => {
                    tracing::info!(config_map = name, "published the CA certificate");
                    Ok(())
                }
                // Another replica created it; the next round compares.
                Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
                Err(error) => Err(error).context("creating the CA ConfigMap"),
            }
        }
    }
}

// === Pods that opted in but were not injected ===

/// The pods among `pods` that opted in but carry no `stackroute.dev/injected`.
pub fn select_not_injected<'a>(
    pods: &'a [Pod],
    namespaces: &BTreeMap<String, NamespaceMeta>,
    config: &Config,
) -> Vec<&'a Pod> {
    pods.iter()
        .filter(|pod| {
            let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
            stackroute_injector::not_injected(pod, ns, namespaces.get(ns), config)
        })
        .collect()
}

async fn list_all<K>(api: &Api<K>) -> anyhow::Result<Vec<K>>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut items = Vec::new();
    let mut params = ListParams::default().limit(500);
    loop {
        let page = api.list(&params).await?;
        items.extend(page.items);
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => params = params.continue_token(&token),
            _ => return Ok(items),
        }
    }
}

/// Every [`REPORT_INTERVAL`], on the replica holding the status Lease only (one list of all
/// pods per interval, not one per replica): lists namespaces and pods, sets
/// `stackroute_controller_pods_not_injected` and records a Warning Event `NotInjected` on each
/// such pod once. Other replicas report 0, so the sum (or max) over replicas is the count.
pub async fn report_not_injected(
    client: Client,
    config: Config,
    metrics: Arc<Metrics>,
    leader: watch::Receiver<bool>,
    identity: String,
) {
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "stackroute-controller".into(),
            instance: Some(identity),
        },
    );
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let pods: Api<Pod> = Api::all(client);
    let mut reported: BTreeSet<String> = BTreeSet::new();
    loop {
        if !*leader.borrow() {
            metrics.pods_not_injected.set(0);
            reported.clear();
            tokio::time::sleep(REPORT_INTERVAL.min(Duration::from_secs(5))).await;
            continue;
        }
        let round = async {
            let ns_meta: BTreeMap<String, NamespaceMeta> = list_all(&namespaces)
                .await
                .context("listing namespaces")?
                .iter()
                .filter_map(|ns| {
                    Some((
                        ns.metadata.name.clone()?,
                        NamespaceMeta::from_meta(&ns.metadata),
                    ))
                })
                .collect();
            let all = list_all(&pods).await.context("listing pods")?;
            let found = select_not_injected(&all, &ns_meta, &config);
            metrics.pods_not_injected.set(found.len() as i64);
            let uids: BTreeSet<String> = found
                .iter()
                .filter_map(|p| p.metadata.uid.clone())
                .collect();
            for pod in &found {
                let Some(uid) = pod.metadata.uid.clone() else {
                    continue;
                };
                if reported.contains(&uid) {
                    continue;
                }
                let event = Event {
                    type_: EventType::Warning,
                    reason: "NotInjected".into(),
                    note: Some(format!(
                        "opted in to stackroute ({}) but has no {} annotation: the injection webhook was not called or failed when the pod was created; recreate the pod to inject it",
                        stackroute_injector::INJECT,
                        stackroute_injector::INJECTED
                    )),
                    action: "CheckInjection".into(),
                    secondary: None,
                };
                match recorder.publish(&event, &pod.object_ref(&())).await {
                    Ok(()) => {
                        reported.insert(uid);
                    }
                    Err(error) => {
                        tracing::warn!(%error, pod = ?pod.metadata.name, "recording a NotInjected event failed");
                    }
                }
            }
            reported.retain(|uid| uids.contains(uid));
            if !found.is_empty() {
                tracing::warn!(
                    count = found.len(),
                    "pods opted in to injection but were not injected"
                );
            }
            anyhow::Ok(())
        };
        if let Err(error) = round.await {
            tracing::warn!(error = %format!("{error:#}"), "not-injected report failed");
        }
        tokio::time::sleep(REPORT_INTERVAL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mk_config() -> Config {
        Config {
            shim_image: "shim:1".into(),
            socket_dir: "/run/stackroute".into(),
            own_namespace: "stackroute-system".into(),
        }
    }

    fn mk_pod(ns: &str, name: &str, labels: Value, annotations: Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"namespace": ns, "name": name, "uid": name, "labels": labels, "annotations": annotations},
            "spec": {"containers": [{"name": "c"}]}
        }))
        .unwrap()
    }

    #[test]
    fn not_injected_selection() {
        let config = mk_config();
        let namespaces = BTreeMap::from([
            (
                "shop".to_string(),
                NamespaceMeta {
                    annotations: BTreeMap::from([(
                        "stackroute.dev/inject".to_string(),
                        "enabled".to_string(),
                    )]),
                    ..Default::default()
                },
            ),
            ("other".to_string(), NamespaceMeta::default()),
        ]);
        let pods = vec![
            mk_pod("shop", "a", json!({}), json!({})), // namespace opt-in, missing: reported
            mk_pod(
                "shop",
                "b",
                json!({}),
                json!({"stackroute.dev/injected": "x"}),
            ),
            mk_pod(
                "shop",
                "c",
                json!({}),
                json!({"stackroute.dev/inject": "disabled"}),
            ),
            mk_pod(
                "other",
                "d",
                json!({"stackroute.dev/inject": "enabled"}),
                json!({}),
            ), // reported
            mk_pod("other", "e", json!({}), json!({})),
            mk_pod(
                "stackroute-system",
                "f",
                json!({"stackroute.dev/inject": "enabled"}),
                json!({}),
            ),
        ];
        let found: Vec<_> = select_not_injected(&pods, &namespaces, &config)
            .iter()
            .map(|p| p.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(found, ["a", "d"]);
    }

    #[test]
    fn ca_bundle_ops_touch_only_stale_webhooks() {
        let ca = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let config: MutatingWebhookConfiguration = serde_json::from_value(json!({
            "metadata": {"name": "stackroute"},
            "webhooks": [
                {"name": "a.stackroute.dev", "clientConfig": {}, "admissionReviewVersions": ["v1"], "sideEffects": "None"},
                {"name": "b.stackroute.dev", "clientConfig": {"caBundle": base64::engine::general_purpose::STANDARD.encode(ca)},
                 "admissionReviewVersions": ["v1"], "sideEffects": "None"},
                {"name": "c.stackroute.dev", "clientConfig": {"caBundle": "b2xk"}, "admissionReviewVersions": ["v1"], "sideEffects": "None"},
            ]
        }))
        .unwrap();
        let ops = ca_bundle_ops(&config, ca);
        assert_eq!(ops.len(), 4, "{ops:?}");
        let mut doc = serde_json::to_value(&config).unwrap();
        let patch: json_patch::Patch = serde_json::from_value(Value::Array(ops)).unwrap();
        json_patch::patch(&mut doc, &patch).unwrap();
        let patched: MutatingWebhookConfiguration = serde_json::from_value(doc).unwrap();
        for webhook in patched.webhooks.as_ref().unwrap() {
            assert_eq!(
                webhook.client_config.ca_bundle.as_ref().unwrap().0,
                ca.as_bytes()
            );
        }
        assert!(ca_bundle_ops(&patched, ca).is_empty());
    }

    #[test]
    fn ca_secret_round_trip() {
        let now = SystemTime::now();
        let ca = certs::new_ca(now).unwrap();
        let secret = ca_secret("ca", "stackroute-system", &ca, None);
        assert_eq!(ca_from_secret(&secret, now), Some(ca.clone()));
        let mut broken = secret.clone();
        broken
            .data
            .as_mut()
            .unwrap()
            .insert(CA_KEY_KEY.into(), ByteString(b"junk".to_vec()));
        assert_eq!(ca_from_secret(&broken, now), None);
        assert_eq!(ca_from_secret(&Secret::default(), now), None);
    }

    #[test]
    fn serving_files_are_written_and_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let ca = certs::new_ca(now).unwrap();
        let serving = certs::issue_serving(
            &ca,
            &certs::service_names("wh", "ns"),
            now,
            certs::SERVING_VALIDITY,
        )
        .unwrap();
        let files = CertFiles::new(dir.path());
        assert!(files.reload().is_err(), "no files yet");
        write_serving(dir.path(), &serving).unwrap();
        assert!(files.reload().unwrap());
        assert!(!files.reload().unwrap(), "unchanged");
        assert!(files.loaded());
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.path().join(crate::tls::KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
