//! Kubernetes mode: watchers feed the same index; one elected replica writes status.
//!
//! ```text
//! Namespace, Node, Pod, Service, EndpointSlice, NetworkPolicy, StackRoute, ClusterStackRoute
//!   ─► watcher (DynamicObject: never fails to deserialize) ─► FileEvent per object ─► index
//! discovery every minute: network policy kinds the engine cannot evaluate (Cilium, Calico,
//!   AdminNetworkPolicy, …) ─► list, then watch, each one served ─► FileEvent per object ─► index
//! Lease coordination.k8s.io/v1 ─► leader? ─► status writer ─► server-side apply of /status
//! ```
//!
//! Each object is one source named `Kind/namespace/name`, loaded by the same code as a state
//! file. An object the engine cannot read is reported and skipped — the watch never wedges —
//! and an invalid new version of a StackRoute keeps its last good version in force. Every
//! replica serves agents; only the Lease holder writes status.
//!
//! Older API servers, explicitly:
//! - EndpointSlices are watched at the version the server serves, found by discovery at start:
//!   `discovery.k8s.io/v1`, else `v1beta1` (Kubernetes < 1.21, logged as a warning), else not at
//!   all (warning; the kind counts as synced so readiness is not held up).
//! - Below Kubernetes 1.25 the API server does not enforce the CRDs' CEL rules (they are
//!   installed without them: `stackroute crd --kube-version`). Every object is still checked
//!   against the full schema, CEL included, when it is loaded, so one that breaks a rule gets
//!   `Accepted=False` with the rule's message and stays out of the snapshots (a warning at start
//!   says so).
//!
//! NetworkPolicy gates kernel-bypass stacks (policy crate, `netpol`): `networking.k8s.io/v1`
//! NetworkPolicies are watched like every other kind. Objects of network policy kinds the engine
//! cannot evaluate make every gated decision undecidable, so they are looked for too: every
//! [`FOREIGN_POLICY_DISCOVERY_PERIOD`] the groups in [`FOREIGN_POLICY_GROUPS`] are discovered,
//! and each kind named `…NetworkPolicy` they serve is listed (before the first compile, so the
//! gate fails closed from the start) and then watched. A kind that cannot be listed (RBAC) counts
//! as present until it can be.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams,
};
use kube::error::DiscoveryError;
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use stackroute_api::{ClusterStackRoute, RouteStatus, StackRoute};
use tokio::sync::watch;
use tokio_stream::StreamExt as _;

use crate::files::FileEvent;
use crate::index::{IndexHandle, PolicyReport};

/// Field manager of the status writer.
pub const FIELD_MANAGER: &str = "stackroute-controller";

/// The kinds watched at a fixed version. EndpointSlice is watched too, at the version the
/// server serves ([`EndpointSliceVersion`]).
pub fn resources() -> Vec<ApiResource> {
    vec![
        ApiResource::erase::<Namespace>(&()),
        ApiResource::erase::<Node>(&()),
        ApiResource::erase::<Pod>(&()),
        ApiResource::erase::<Service>(&()),
        ApiResource::erase::<NetworkPolicy>(&()),
        ApiResource::erase::<StackRoute>(&()),
        ApiResource::erase::<ClusterStackRoute>(&()),
    ]
}

/// The source names the index must see synced before its first compile: one per watched kind,
/// EndpointSlice included, and the first look for foreign network policies.
pub fn sources() -> Vec<String> {
    let mut sources: Vec<String> = resources().iter().map(source_of).collect();
    sources.push(endpoint_slice_source());
    sources.push(FOREIGN_POLICY_SOURCE.to_string());
    sources
}

/// The source name a watcher reports as synced.
pub fn source_of(resource: &ApiResource) -> String {
    format!("kubernetes {}", resource.kind)
}

fn endpoint_slice_source() -> String {
    format!("kubernetes {ENDPOINT_SLICE_KIND}")
}

// === EndpointSlice version ===

/// API group of EndpointSlices.
pub const ENDPOINT_SLICE_GROUP: &str = "discovery.k8s.io";
const ENDPOINT_SLICE_KIND: &str = "EndpointSlice";

/// The EndpointSlice API version the controller watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndpointSliceVersion {
    /// `discovery.k8s.io/v1` (Kubernetes 1.21 and later).
    V1,
    /// `discovery.k8s.io/v1beta1` (Kubernetes 1.17–1.24; the only one before 1.21). The policy
    /// loader reads it like v1.
    V1beta1,
}

impl EndpointSliceVersion {
    /// `v1` or `v1beta1`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V1 => "v1",
            Self::V1beta1 => "v1beta1",
        }
    }

    /// What the watcher lists and watches.
    pub fn api_resource(self) -> ApiResource {
        ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(ENDPOINT_SLICE_GROUP, self.as_str(), ENDPOINT_SLICE_KIND),
            "endpointslices",
        )
    }
}

/// Picks the EndpointSlice version to watch from the versions of `discovery.k8s.io` the server
/// serves EndpointSlice at: v1 when there, else v1beta1, else none (an empty list is a server
/// without the group).
pub fn choose_endpoint_slice_version<'a>(
    served: impl IntoIterator<Item = &'a str>,
) -> Option<EndpointSliceVersion> {
    let served: BTreeSet<&str> = served.into_iter().collect();
    [EndpointSliceVersion::V1, EndpointSliceVersion::V1beta1]
        .into_iter()
        .find(|version| served.contains(version.as_str()))
}

/// The versions of `discovery.k8s.io` that serve EndpointSlice (none when the server lacks the
/// group).
async fn served_endpoint_slice_versions(client: &Client) -> Result<Vec<String>, kube::Error> {
    match kube::discovery::group(client, ENDPOINT_SLICE_GROUP).await {
        Ok(group) => Ok(group
            .versions()
            .filter(|version| {
                group
                    .versioned_resources(version)
                    .iter()
                    .any(|(resource, _)| resource.kind == ENDPOINT_SLICE_KIND)
            })
            .map(str::to_string)
            .collect()),
        Err(kube::Error::Discovery(DiscoveryError::MissingApiGroup(_))) => Ok(Vec::new()),
        Err(error) => Err(error),
    }
}

/// Discovers the EndpointSlice version (retrying until the server answers), logs the choice,
/// then watches at that version; with none served, reports the kind synced and returns.
async fn watch_endpoint_slices(client: Client, index: IndexHandle) {
    let mut delay = Duration::from_secs(1);
    let served = loop {
        match served_endpoint_slice_versions(&client).await {
            Ok(served) => break served,
            Err(error) => {
                tracing::warn!(group = ENDPOINT_SLICE_GROUP, %error,
                    "API discovery failed; retrying with backoff");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    };
    let served_list = served.join(",");
    match choose_endpoint_slice_version(served.iter().map(String::as_str)) {
        Some(version @ EndpointSliceVersion::V1) => {
            tracing::info!(served = %served_list, "watching EndpointSlices at discovery.k8s.io/v1");
            watch_kind(client, version.api_resource(), index).await;
        }
        Some(version @ EndpointSliceVersion::V1beta1) => {
            tracing::warn!(served = %served_list,
                "the API server lacks discovery.k8s.io/v1 (Kubernetes < 1.21): \
                 watching EndpointSlices at discovery.k8s.io/v1beta1 instead");
            watch_kind(client, version.api_resource(), index).await;
        }
        None => {
            tracing::warn!(served = %served_list,
                "the API server serves no EndpointSlices (neither discovery.k8s.io/v1 nor \
                 v1beta1); not watching them: Service ClusterIPs resolve to no backends");
            let _ = index.file(FileEvent::Synced(endpoint_slice_source()));
        }
    }
}

/// The source name of one object: `Kind/namespace/name` or `Kind/name`.
pub fn object_source(kind: &str, object: &DynamicObject) -> String {
    let name = object.metadata.name.as_deref().unwrap_or_default();
    match object.metadata.namespace.as_deref() {
        Some(namespace) => format!("{kind}/{namespace}/{name}"),
        None => format!("{kind}/{name}"),
    }
}

/// The object as the loader reads it (list items carry no apiVersion/kind; add them).
pub fn object_text(resource: &ApiResource, object: &DynamicObject) -> String {
    let mut value = serde_json::to_value(object).unwrap_or_default();
    if let Some(map) = value.as_object_mut() {
        map.insert("apiVersion".into(), resource.api_version.clone().into());
        map.insert("kind".into(), resource.kind.clone().into());
    }
    value.to_string()
}

/// Starts one watcher per kind (EndpointSlice after discovering its version) and the look for
/// foreign network policies; returns the source names the index must see synced ([`sources`]).
pub fn spawn_watchers(client: &Client, index: &IndexHandle) -> Vec<String> {
    for resource in resources() {
        let client = client.clone();
        let index = index.clone();
        tokio::spawn(async move { watch_kind(client, resource, index).await });
    }
    tokio::spawn(watch_endpoint_slices(client.clone(), index.clone()));
    tokio::spawn(watch_foreign_policies(client.clone(), index.clone()));
    sources()
}

// === foreign network policies ===

/// API groups that serve network policy kinds the engine cannot evaluate: AdminNetworkPolicy,
/// BaselineAdminNetworkPolicy and ClusterNetworkPolicy; Cilium's; Calico's (as CRDs and through
/// its API server); Antrea's; MultiNetworkPolicy.
pub const FOREIGN_POLICY_GROUPS: [&str; 6] = [
    "policy.networking.k8s.io",
    "cilium.io",
    "crd.projectcalico.org",
    "projectcalico.org",
    "crd.antrea.io",
    "k8s.cni.cncf.io",
];

/// How often the groups are discovered again (a network plugin may be installed later).
pub const FOREIGN_POLICY_DISCOVERY_PERIOD: Duration = Duration::from_secs(60);

/// The source the first discovery round reports synced.
pub const FOREIGN_POLICY_SOURCE: &str = "kubernetes foreign network policies";

/// Of the kinds a group serves, the network policy kinds the engine cannot evaluate.
pub fn foreign_policy_resources(served: impl IntoIterator<Item = ApiResource>) -> Vec<ApiResource> {
    served
        .into_iter()
        .filter(|r| stackroute_policy::netpol::is_foreign_policy(&r.api_version, &r.kind))
        .collect()
}

/// The source standing for a kind that cannot be listed, and its text: one object of the kind,
/// so that the engine counts the kind as present (fail closed) until it can be listed.
pub fn unlistable_kind(resource: &ApiResource, why: &str) -> (String, String) {
    let source = format!("{} (cannot list)", resource.kind);
    let text = serde_json::json!({
        "apiVersion": resource.api_version,
        "kind": resource.kind,
        "metadata": {"name": format!("(any: cannot list {}: {why})", resource.plural)},
    })
    .to_string();
    (source, text)
}

/// Discovers the foreign network policy kinds the server serves (a missing group serves none).
async fn served_foreign_policies(client: &Client) -> Result<Vec<ApiResource>, kube::Error> {
    let mut found = Vec::new();
    for group in FOREIGN_POLICY_GROUPS {
        match kube::discovery::group(client, group).await {
            Ok(group) => found.extend(foreign_policy_resources(
                group.recommended_resources().into_iter().map(|(r, _)| r),
            )),
            Err(kube::Error::Discovery(DiscoveryError::MissingApiGroup(_))) => {}
            Err(error) => return Err(error),
        }
    }
    Ok(found)
}

/// Looks for foreign network policy kinds every [`FOREIGN_POLICY_DISCOVERY_PERIOD`]; lists each
/// new one (its objects reach the index before the first round reports synced) and then watches
/// it. A kind that cannot be listed stands as present ([`unlistable_kind`]) and is tried again
/// next round.
async fn watch_foreign_policies(client: Client, index: IndexHandle) {
    let mut watching: BTreeSet<(String, String)> = BTreeSet::new();
    let mut unlistable: BTreeSet<String> = BTreeSet::new();
    let mut synced = false;
    loop {
        match served_foreign_policies(&client).await {
            Ok(found) => {
                for resource in found {
                    let key = (resource.api_version.clone(), resource.kind.clone());
                    if watching.contains(&key) {
                        continue;
                    }
                    let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
                    let (placeholder, _) = unlistable_kind(&resource, "");
                    let delivered = match api.list(&ListParams::default()).await {
                        Ok(list) => {
                            tracing::warn!(kind = %resource.kind, api_version = %resource.api_version,
                                objects = list.items.len(),
                                "the cluster serves a network policy kind this controller cannot \
                                 evaluate: while any object of it exists, NetworkPolicy cannot \
                                 decide kernel-bypass flows and RDMA is left out of decisions");
                            let mut result = Ok(());
                            if unlistable.remove(&placeholder) {
                                result = index.file(FileEvent::Removed(placeholder));
                            }
                            for object in &list.items {
                                result = result.and(index.file(FileEvent::Changed(
                                    object_source(&resource.kind, object),
                                    object_text(&resource, object),
                                )));
                            }
                            watching.insert(key);
                            let (client, index, resource) =
                                (client.clone(), index.clone(), resource.clone());
                            tokio::spawn(async move { watch_kind(client, resource, index).await });
                            result
                        }
                        Err(error) => {
                            tracing::warn!(kind = %resource.kind, %error,
                                "cannot list a network policy kind this controller cannot \
                                 evaluate (RBAC?): counted as present, so RDMA is left out of \
                                 decisions; trying again");
                            let (_, text) = unlistable_kind(&resource, &error.to_string());
                            unlistable.insert(placeholder.clone());
                            index.file(FileEvent::Changed(placeholder, text))
                        }
                    };
                    if delivered.is_err() {
                        return; // the index is gone: shutting down
                    }
                }
                if !synced {
                    synced = true;
                    if index
                        .file(FileEvent::Synced(FOREIGN_POLICY_SOURCE.to_string()))
                        .is_err()
                    {
                        return;
                    }
                }
            }
            Err(error) => {
                tracing::warn!(%error, "discovery of foreign network policy kinds failed; retrying");
            }
        }
        tokio::time::sleep(FOREIGN_POLICY_DISCOVERY_PERIOD).await;
    }
}

/// Logs the API server's version and, below Kubernetes 1.25, that the server does not enforce
/// the CRDs' CEL rules and this controller reports objects that break one instead.
pub async fn report_server_version(client: Client) {
    let info = match client.apiserver_version().await {
        Ok(info) => info,
        Err(error) => {
            tracing::warn!(%error, "cannot read the API server's version");
            return;
        }
    };
    let version = stackroute_api::server_version(&info.major, &info.minor);
    tracing::info!(version = %info.git_version, "Kubernetes API server");
    if let Some(message) = version.and_then(|(major, minor)| cel_note(major, minor)) {
        tracing::warn!(version = %info.git_version, "{message}");
    }
}

/// What an API server of `major.minor` means for the CRDs' CEL rules, when it matters.
pub fn cel_note(major: u32, minor: u32) -> Option<String> {
    let (min_major, min_minor) = stackroute_api::CEL_MIN_SERVER_VERSION;
    let count = |crds: Vec<_>| -> usize {
        crds.into_iter()
            .map(|mut crd| stackroute_api::remove_cel_rules(&mut crd))
            .sum()
    };
    let missing =
        count(stackroute_api::crds()) - count(stackroute_api::crds_for_server(major, minor));
    let consequence = "objects that break one are admitted by the API server, and this controller \
                       reports them Accepted=False with the rule's message and leaves them out of \
                       the snapshots";
    if !stackroute_api::server_supports_cel(major, minor) {
        Some(format!(
            "Kubernetes {major}.{minor} does not enforce the CRDs' CEL rules (x-kubernetes-validations, \
             {min_major}.{min_minor} or newer does): {consequence}"
        ))
    } else if missing > 0 {
        Some(format!(
            "Kubernetes {major}.{minor} cannot compile {missing} of the CRDs' CEL rules (they call a CEL \
             library it lacks; the CRD chart and `stackroute crd --kube-version` leave them out): \
             {consequence}"
        ))
    } else {
        None
    }
}

async fn watch_kind(client: Client, resource: ApiResource, index: IndexHandle) {
    let api: Api<DynamicObject> = Api::all_with(client, &resource);
    let kind = resource.kind.clone();
    let mut stream =
        std::pin::pin!(watcher::watcher(api, watcher::Config::default()).default_backoff());
    let mut known: BTreeSet<String> = BTreeSet::new();
    let mut relisting: Option<BTreeSet<String>> = None;
    while let Some(event) = stream.next().await {
        let delivered = match event {
            Ok(Event::Init) => {
                relisting = Some(BTreeSet::new());
                Ok(())
            }
            Ok(Event::InitApply(object)) => {
                let source = object_source(&kind, &object);
                if let Some(seen) = relisting.as_mut() {
                    seen.insert(source.clone());
                }
                known.insert(source.clone());
                index.file(FileEvent::Changed(source, object_text(&resource, &object)))
            }
            Ok(Event::InitDone) => {
                // A relist is an atomic reset: objects deleted while we were away go now.
                let mut result = Ok(());
                if let Some(seen) = relisting.take() {
                    for gone in known.difference(&seen) {
                        result = result.and(index.file(FileEvent::Removed(gone.clone())));
                    }
                    known = seen;
                }
                result.and(index.file(FileEvent::Synced(source_of(&resource))))
            }
            Ok(Event::Apply(object)) => {
                let source = object_source(&kind, &object);
                known.insert(source.clone());
                index.file(FileEvent::Changed(source, object_text(&resource, &object)))
            }
            Ok(Event::Delete(object)) => {
                let source = object_source(&kind, &object);
                known.remove(&source);
                index.file(FileEvent::Removed(source))
            }
            Err(error) => {
                tracing::warn!(%kind, %error, "watch failed; retrying with backoff");
                Ok(())
            }
        };
        if delivered.is_err() {
            return; // the index is gone: shutting down
        }
    }
}

// === Lease ===

/// Where and as whom the status-writer Lease is held.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// This replica's identity (pod name).
    pub identity: String,
    /// How long a holder's claim lasts without renewal.
    pub duration: Duration,
}

/// What to do with the Lease as found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseAction {
    /// No Lease exists: create it, held by us.
    Create,
    /// We hold it: renew.
    Renew,
    /// Someone else held it but let it expire: take it over.
    TakeOver,
    /// Someone else holds it.
    Wait,
}

/// Decides what to do with `spec` (the Lease's spec, if the Lease exists) at `now`.
pub fn lease_action(spec: Option<&LeaseSpec>, identity: &str, now: Timestamp) -> LeaseAction {
    let Some(spec) = spec else {
        return LeaseAction::Create;
    };
    if spec.holder_identity.as_deref() == Some(identity) {
        return LeaseAction::Renew;
    }
    let duration = i64::from(spec.lease_duration_seconds.unwrap_or(15));
    let expired = match &spec.renew_time {
        Some(renewed) => renewed.0.as_second() + duration < now.as_second(),
        None => true,
    };
    if spec.holder_identity.as_deref().is_none_or(str::is_empty) || expired {
        LeaseAction::TakeOver
    } else {
        LeaseAction::Wait
    }
}

/// Keeps trying to hold the Lease; publishes whether we are the status writer.
pub async fn hold_lease(client: Client, config: LeaseConfig, leader: watch::Sender<bool>) {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let period = config.duration / 3;
    loop {
        let holding = match try_hold(&api, &config).await {
            Ok(holding) => holding,
            Err(error) => {
                tracing::warn!(error = format!("{error:#}"), lease = %config.name, "lease update failed");
                false
            }
        };
        if holding != *leader.borrow() {
            tracing::info!(holding, lease = %config.name, identity = %config.identity, "status writer lease");
        }
        leader.send_replace(holding);
        tokio::time::sleep(period).await;
    }
}

async fn try_hold(api: &Api<Lease>, config: &LeaseConfig) -> anyhow::Result<bool> {
    let now = Timestamp::now();
    let current = api.get_opt(&config.name).await?;
    let action = lease_action(
        current.as_ref().and_then(|l| l.spec.as_ref()),
        &config.identity,
        now,
    );
    let seconds = i32::try_from(config.duration.as_secs()).unwrap_or(15);
    match (action, current) {
        (LeaseAction::Create, _) => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(config.name.clone()),
                    namespace: Some(config.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(config.identity.clone()),
                    lease_duration_seconds: Some(seconds),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            api.create(&PostParams::default(), &lease).await?;
            Ok(true)
        }
        (LeaseAction::Renew | LeaseAction::TakeOver, Some(mut lease)) => {
            let spec = lease.spec.get_or_insert_with(Default::default);
            if action == LeaseAction::TakeOver {
                spec.holder_identity = Some(config.identity.clone());
                spec.acquire_time = Some(MicroTime(now));
                spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            }
            spec.lease_duration_seconds = Some(seconds);
            spec.renew_time = Some(MicroTime(now));
            // `replace` carries the resourceVersion we read: a concurrent writer gets a conflict.
            api.replace(&config.name, &PostParams::default(), &lease)
                .await?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

// === status ===

/// The status of one policy, keeping each condition's transition time while its status holds.
pub fn route_status(
    report: &PolicyReport,
    previous: Option<&RouteStatus>,
    now: Timestamp,
) -> RouteStatus {
    let status = &report.status;
    let generation = report.generation;
    let condition = |type_: &str, ok: bool, reason: &str, message: String| {
        let kept = previous
            .and_then(|p| p.conditions.iter().find(|c| c.type_ == type_))
            .filter(|c| (c.status == "True") == ok)
            .map(|c| c.last_transition_time.clone());
        Condition {
            type_: type_.to_string(),
            status: if ok { "True" } else { "False" }.to_string(),
            reason: reason.to_string(),
            message,
            observed_generation: generation,
            last_transition_time: kept.unwrap_or(Time(now)),
        }
    };
    let accepted = if status.accepted {
        condition("Accepted", true, "Accepted", "the policy is valid".into())
    } else {
        condition("Accepted", false, "Invalid", status.message.clone())
    };
    let programmed = condition(
        "Programmed",
        status.programmed,
        if status.programmed {
            "Programmed"
        } else {
            "Pending"
        },
        format!(
            "{} of {} target nodes acked a revision containing this generation",
            status.programmed_nodes, status.target_nodes
        ),
    );
    let shadowed = if status.shadowed_rules == 0 {
        // Never an empty message: a 1.20 API server turns "" into null in a server-side apply
        // of /status and rejects it ("must be of type string").
        condition(
            "Shadowed",
            false,
            "NoShadowing",
            "no rule is shadowed".into(),
        )
    } else {
        condition(
            "Shadowed",
            true,
            "RulesShadowed",
            format!(
                "{} rule(s) can never match: an earlier rule of this object covers them",
                status.shadowed_rules
            ),
        )
    };
    let gated = if status.network_policy_gated_rules == 0 {
        condition(
            "NetworkPolicyGated",
            false,
            "NotGated",
            "NetworkPolicy removes no transport of this object".into(),
        )
    } else {
        condition(
            "NetworkPolicyGated",
            true,
            "BypassRemoved",
            format!(
                "{} rule(s) lost a kernel-bypass transport: {}",
                status.network_policy_gated_rules, status.network_policy_message
            ),
        )
    };
    RouteStatus {
        observed_generation: generation,
        conditions: vec![accepted, programmed, shadowed, gated],
        selected_pods: None,
        target_nodes: Some(i64::from(status.target_nodes)),
        programmed_nodes: Some(i64::from(status.programmed_nodes)),
        shadowed_rules: Some(i64::from(status.shadowed_rules)),
    }
}

/// Writes status while `leader` is true: every few seconds, only what changed.
pub async fn write_statuses(client: Client, index: IndexHandle, mut leader: watch::Receiver<bool>) {
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let mut written: BTreeMap<(String, String, String), RouteStatus> = BTreeMap::new();
    loop {
        if !*leader.borrow_and_update() {
            written.clear(); // a new term starts from what is on the server
            if leader.changed().await.is_err() {
                return;
            }
            continue;
        }
        let Ok(reports) = index.policies().await else {
            return;
        };
        let now = Timestamp::now();
        // Forget what was written for objects that are gone: one recreated under the same name
        // starts without status and must be written even if its status equals the old one.
        let current: BTreeSet<(String, String, String)> = reports
            .iter()
            .map(|r| {
                (
                    r.status.kind.clone(),
                    r.status.namespace.clone(),
                    r.status.name.clone(),
                )
            })
            .collect();
        written.retain(|key, _| current.contains(key));
        for report in reports {
            let key = (
                report.status.kind.clone(),
                report.status.namespace.clone(),
                report.status.name.clone(),
            );
            let status = route_status(&report, written.get(&key), now);
            if written.get(&key) == Some(&status) {
                continue;
            }
            let (kind, namespace, name) = &key;
            let body = serde_json::json!({
                "apiVersion": "stackroute.dev/v1alpha1",
                "kind": kind,
                "status": status,
            });
            let result = match kind.as_str() {
                "StackRoute" => Api::<StackRoute>::namespaced(client.clone(), namespace)
                    .patch_status(name, &params, &Patch::Apply(&body))
                    .await
                    .map(drop),
                _ => Api::<ClusterStackRoute>::all(client.clone())
                    .patch_status(name, &params, &Patch::Apply(&body))
                    .await
                    .map(drop),
            };
            match result {
                Ok(()) => {
                    written.insert(key, status);
                }
                Err(error) => {
                    tracing::warn!(%kind, %namespace, %name, %error, "status update failed");
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = leader.changed() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use stackroute_proto::v1alpha1::PolicyStatus;

    use super::*;

    fn ts(second: i64) -> Timestamp {
        Timestamp::from_second(second).expect("valid timestamp")
    }

    fn spec(holder: &str, renewed: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(ts(renewed))),
            ..Default::default()
        }
    }

    #[test]
    fn the_lease_is_created_renewed_taken_over_or_respected() {
        assert_eq!(lease_action(None, "a", ts(100)), LeaseAction::Create);
        assert_eq!(
            lease_action(Some(&spec("a", 90)), "a", ts(100)),
            LeaseAction::Renew
        );
        assert_eq!(
            lease_action(Some(&spec("b", 90)), "a", ts(100)),
            LeaseAction::Wait
        );
        assert_eq!(
            lease_action(Some(&spec("b", 80)), "a", ts(100)),
            LeaseAction::TakeOver
        );
        assert_eq!(
            lease_action(Some(&spec("", 99)), "a", ts(100)),
            LeaseAction::TakeOver
        );
    }

    fn report(accepted: bool, programmed: bool) -> PolicyReport {
        PolicyReport {
            status: PolicyStatus {
                kind: "StackRoute".into(),
                namespace: "shop".into(),
                name: "web".into(),
                accepted,
                message: if accepted {
                    String::new()
                } else {
                    "StackRoute/shop/web: spec.rules[0].ports[0]: endPort requires port".into()
                },
                programmed,
                target_nodes: 3,
                programmed_nodes: if programmed { 3 } else { 1 },
                shadowed_rules: 0,
                ..Default::default()
            },
            generation: Some(4),
        }
    }

    #[test]
    fn status_conditions_carry_reasons_and_keep_transition_times() {
        let first = route_status(&report(true, false), None, ts(100));
        assert_eq!(first.observed_generation, Some(4));
        let types: Vec<(&str, &str, &str)> = first
            .conditions
            .iter()
            .map(|c| (c.type_.as_str(), c.status.as_str(), c.reason.as_str()))
            .collect();
        assert_eq!(
            types,
            vec![
                ("Accepted", "True", "Accepted"),
                ("Programmed", "False", "Pending"),
                ("Shadowed", "False", "NoShadowing"),
                ("NetworkPolicyGated", "False", "NotGated")
            ]
        );
        assert_eq!(
            first.conditions[1].message,
            "1 of 3 target nodes acked a revision containing this generation"
        );
        assert!(
            first
                .conditions
                .iter()
                .all(|c| c.observed_generation == Some(4))
        );

        // Programmed flips: its time moves, Accepted's stays.
        let second = route_status(&report(true, true), Some(&first), ts(200));
        assert_eq!(second.conditions[0].last_transition_time, Time(ts(100)));
        assert_eq!(second.conditions[1].last_transition_time, Time(ts(200)));
        assert_eq!(second.programmed_nodes, Some(3));
        // Nothing changes: equal status, so the writer skips the patch.
        assert_eq!(
            route_status(&report(true, true), Some(&second), ts(300)),
            second
        );

        let mut gating = report(true, true);
        gating.status.network_policy_gated_rules = 1;
        gating.status.network_policy_message = "rule fabric: Rdma removed (network-policy)".into();
        let gated = route_status(&gating, Some(&second), ts(320));
        assert_eq!(
            (
                gated.conditions[3].status.as_str(),
                gated.conditions[3].reason.as_str(),
                gated.conditions[3].message.as_str()
            ),
            (
                "True",
                "BypassRemoved",
                "1 rule(s) lost a kernel-bypass transport: rule fabric: Rdma removed (network-policy)"
            )
        );

        let mut shadowing = report(true, true);
        shadowing.status.shadowed_rules = 2;
        let shadowed = route_status(&shadowing, Some(&second), ts(350));
        assert_eq!(shadowed.shadowed_rules, Some(2));
        assert_eq!(
            (
                shadowed.conditions[2].status.as_str(),
                shadowed.conditions[2].reason.as_str()
            ),
            ("True", "RulesShadowed")
        );
        assert_eq!(shadowed.conditions[2].last_transition_time, Time(ts(350)));

        let rejected = route_status(&report(false, false), Some(&second), ts(400));
        assert_eq!(rejected.conditions[0].status, "False");
        assert_eq!(rejected.conditions[0].reason, "Invalid");
        assert!(rejected.conditions[0].message.contains("endPort"));
    }

    #[test]
    fn objects_become_loader_input_with_their_kind() {
        let resource = ApiResource::erase::<Pod>(&());
        let mut object = DynamicObject::new("web-0", &resource).within("shop");
        object.types = None; // as in a list response
        object.data = serde_json::json!({"spec": {"nodeName": "n1", "containers": []}});
        assert_eq!(object_source(&resource.kind, &object), "Pod/shop/web-0");
        let mut state = stackroute_policy::ClusterState::default();
        let problems = state.load_text("Pod/shop/web-0", &object_text(&resource, &object));
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(state.pods[0].node.as_deref(), Some("n1"));
        let routes = ApiResource::erase::<StackRoute>(&());
        assert_eq!(routes.api_version, "stackroute.dev/v1alpha1");
        assert_eq!(source_of(&routes), "kubernetes StackRoute");
    }

    #[test]
    fn endpoint_slices_prefer_v1_then_v1beta1_then_none() {
        use EndpointSliceVersion::{V1, V1beta1};
        // Kubernetes 1.21–1.24 serve both, 1.25+ only v1.
        assert_eq!(choose_endpoint_slice_version(["v1", "v1beta1"]), Some(V1));
        assert_eq!(choose_endpoint_slice_version(["v1beta1", "v1"]), Some(V1));
        assert_eq!(choose_endpoint_slice_version(["v1"]), Some(V1));
        // Kubernetes 1.17–1.20.
        assert_eq!(choose_endpoint_slice_version(["v1beta1"]), Some(V1beta1));
        // No group (before 1.17, or disabled), or only versions we do not read.
        assert_eq!(choose_endpoint_slice_version([]), None);
        assert_eq!(choose_endpoint_slice_version(["v1alpha1", "v2"]), None);

        let beta = V1beta1.api_resource();
        assert_eq!(
            (
                beta.api_version.as_str(),
                beta.plural.as_str(),
                beta.kind.as_str()
            ),
            (
                "discovery.k8s.io/v1beta1",
                "endpointslices",
                "EndpointSlice"
            )
        );
        let v1 = V1.api_resource();
        assert_eq!(
            v1,
            ApiResource::erase::<k8s_openapi::api::discovery::v1::EndpointSlice>(&())
        );
        // Either way the index waits for the same source.
        assert_eq!(source_of(&beta), source_of(&v1));
        assert!(sources().contains(&source_of(&beta)));
        assert_eq!(sources().len(), resources().len() + 2);
    }

    #[test]
    fn network_policies_and_foreign_policy_kinds_reach_the_loader() {
        let resource = ApiResource::erase::<NetworkPolicy>(&());
        assert!(resources().contains(&resource));
        assert!(sources().contains(&source_of(&resource)));
        assert!(sources().contains(&FOREIGN_POLICY_SOURCE.to_string()));
        let mut object = DynamicObject::new("deny", &resource).within("shop");
        object.types = None; // as in a list response
        object.data = serde_json::json!({"spec": {"podSelector": {}, "policyTypes": ["Ingress"]}});
        let mut state = stackroute_policy::ClusterState::default();
        let problems = state.load_text(
            &object_source(&resource.kind, &object),
            &object_text(&resource, &object),
        );
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(state.network_policies.len(), 1);
        assert_eq!(state.network_policies[0].namespace, "shop");

        // Of what the groups serve, only the policy kinds count.
        let gvk = |group: &str, version: &str, kind: &str, plural: &str| {
            ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
        };
        let cilium = gvk(
            "cilium.io",
            "v2",
            "CiliumNetworkPolicy",
            "ciliumnetworkpolicies",
        );
        let found = foreign_policy_resources([
            cilium.clone(),
            gvk("cilium.io", "v2", "CiliumEndpoint", "ciliumendpoints"),
            gvk(
                "policy.networking.k8s.io",
                "v1alpha1",
                "AdminNetworkPolicy",
                "adminnetworkpolicies",
            ),
        ]);
        let kinds: Vec<&str> = found.iter().map(|r| r.kind.as_str()).collect();
        assert_eq!(kinds, ["CiliumNetworkPolicy", "AdminNetworkPolicy"]);
        // A listed object and a kind that cannot be listed both count as present.
        let mut object = DynamicObject::new("l7", &cilium).within("ops");
        object.types = None;
        let (placeholder, text) = unlistable_kind(&cilium, "403 Forbidden");
        let mut state = stackroute_policy::ClusterState::default();
        assert!(
            state
                .load_text("CiliumNetworkPolicy/ops/l7", &object_text(&cilium, &object))
                .is_empty()
        );
        assert!(state.load_text(&placeholder, &text).is_empty());
        assert_eq!(
            state.foreign_policies.len(),
            2,
            "{:?}",
            state.foreign_policies
        );
        assert!(state.foreign_policies[1].contains("cannot list ciliumnetworkpolicies"));
    }

    #[test]
    fn a_v1beta1_endpoint_slice_reaches_the_loader() {
        let resource = EndpointSliceVersion::V1beta1.api_resource();
        let mut object = DynamicObject::new("web-abc12", &resource).within("shop");
        object.types = None; // as in a list response
        object.metadata.labels = Some(BTreeMap::from([(
            "kubernetes.io/service-name".to_string(),
            "web".to_string(),
        )]));
        object.data = serde_json::json!({
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.244.0.5"], "conditions": {"ready": true},
                           "topology": {"kubernetes.io/hostname": "n1"}}],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
        });
        let mut state = stackroute_policy::ClusterState::default();
        let problems = state.load_text(
            &object_source(&resource.kind, &object),
            &object_text(&resource, &object),
        );
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(state.endpoint_slices.len(), 1);
        assert_eq!(state.endpoint_slices[0].service, "web");
        assert_eq!(
            state.endpoint_slices[0].addresses,
            vec!["10.244.0.5".parse::<std::net::IpAddr>().unwrap()]
        );
    }

    #[test]
    fn old_servers_get_a_cel_note() {
        let note = cel_note(1, 20).expect("1.20 does not enforce CEL");
        assert!(note.contains("Kubernetes 1.20 does not enforce"), "{note}");
        assert!(note.contains("Accepted=False"), "{note}");
        assert!(cel_note(1, 24).is_some());
        // 1.25-1.30 enforce CEL but cannot compile the rules calling isCIDR.
        let note = cel_note(1, 28).expect("1.28 lacks the CIDR library");
        assert!(
            note.contains("cannot compile 2 of the CRDs' CEL rules"),
            "{note}"
        );
        assert_eq!(cel_note(1, 31), None);
        assert_eq!(cel_note(1, 33), None);
    }

    /// A StackRoute that breaks a CEL rule, as a server without CEL (Kubernetes < 1.25) admits
    /// and returns it: server-set metadata, no status yet.
    fn admitted_without_cel(name: &str, ports: serde_json::Value) -> (ApiResource, DynamicObject) {
        let resource = ApiResource::erase::<StackRoute>(&());
        let mut object = DynamicObject::new(name, &resource).within("shop");
        object.types = None; // as in a list response
        object.metadata.uid = Some("6b1f0c1e-0000-4000-8000-000000000001".into());
        object.metadata.generation = Some(1);
        object.metadata.resource_version = Some("4711".into());
        object.data = serde_json::json!({
            "spec": {
                "priority": 500,
                "podSelector": {"matchLabels": {"app": "web"}},
                "rules": [{"name": "range", "ports": ports,
                           "transport": {"stack": "Kernel", "congestionControl": "BBR"}}]
            }
        });
        (resource, object)
    }

    #[test]
    fn an_object_breaking_a_cel_rule_gets_accepted_false_with_the_rules_message() {
        let (ready, _ready_rx) = watch::channel(false);
        let mut index = crate::index::Index::new(
            stackroute_policy::Settings::default(),
            Duration::from_secs(5),
            std::sync::Arc::new(crate::metrics::Metrics::default()),
            ready,
        );
        let (resource, good) = admitted_without_cel(
            "good",
            serde_json::json!([{"port": 29500, "endPort": 29600}]),
        );
        let (_, bad) = admitted_without_cel(
            "bad",
            serde_json::json!([{"port": 29600, "endPort": 29500}]),
        );
        for object in [&good, &bad] {
            index.apply_file(FileEvent::Changed(
                object_source(&resource.kind, object),
                object_text(&resource, object),
            ));
        }
        // The invalid object is not in force.
        let state = index.merged_state();
        let names: Vec<_> = state
            .stack_routes
            .iter()
            .map(|r| r.metadata.name.as_deref().unwrap_or_default())
            .collect();
        assert_eq!(names, vec!["good"]);

        let reports = index.policy_reports(std::time::Instant::now());
        let report = reports
            .iter()
            .find(|r| r.status.name == "bad")
            .expect("a report for the invalid object");
        let status = route_status(report, None, ts(100));
        let accepted = &status.conditions[0];
        assert_eq!(
            (
                accepted.type_.as_str(),
                accepted.status.as_str(),
                accepted.reason.as_str()
            ),
            ("Accepted", "False", "Invalid")
        );
        assert_eq!(
            accepted.message,
            "StackRoute/shop/bad: spec.rules[0].ports[0]: \
             endPort requires port and must be greater than or equal to it"
        );
        assert_eq!(status.conditions[1].status, "False", "not programmed");
    }
}
