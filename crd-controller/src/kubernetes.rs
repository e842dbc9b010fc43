//! Kubernetes mode: watchers feed the same index; one elected replica writes status.
//!
//! ```text
//! Namespace, Node, Pod, Service, EndpointSlice, StackRoute, ClusterStackRoute
//!   ─► watcher (DynamicObject: never fails to deserialize) ─► FileEvent per object ─► index
//! Lease coordination.k8s.io/v1 ─► leader? ─► status writer ─► server-side apply of /status
//! ```
//!
//! Each object is one source named `Kind/namespace/name`, loaded by the same code as a state
//! file. An object the engine cannot read is reported and skipped — the watch never wedges —
//! and an invalid new version of a StackRoute keeps its last good version in force. Every
//! replica serves agents; only the Lease holder writes status.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use stackroute_api::{ClusterStackRoute, RouteStatus, StackRoute};
use tokio::sync::watch;
use tokio_stream::StreamExt as _;

use crate::files::FileEvent;
use crate::index::{IndexHandle, PolicyReport};

/// Field manager of the status writer.
pub const FIELD_MANAGER: &str = "stackroute-controller";

/// The watched kinds.
pub fn resources() -> Vec<ApiResource> {
    vec![
        ApiResource::erase::<Namespace>(&()),
        ApiResource::erase::<Node>(&()),
        ApiResource::erase::<Pod>(&()),
        ApiResource::erase::<Service>(&()),
        ApiResource::erase::<EndpointSlice>(&()),
        ApiResource::erase::<StackRoute>(&()),
        ApiResource::erase::<ClusterStackRoute>(&()),
    ]
}

/// The source name a watcher reports as synced.
pub fn source_of(resource: &ApiResource) -> String {
    format!("kubernetes {}", resource.kind)
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

/// Starts one watcher per kind; returns the source names the index must see synced.
pub fn spawn_watchers(client: &Client, index: &IndexHandle) -> Vec<String> {
    let mut sources = Vec::new();
    for resource in resources() {
        sources.push(source_of(&resource));
        let client = client.clone();
        let index = index.clone();
        tokio::spawn(async move { watch_kind(client, resource, index).await });
    }
    sources
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
        condition("Shadowed", false, "NoShadowing", String::new())
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
    RouteStatus {
        observed_generation: generation,
        conditions: vec![accepted, programmed, shadowed],
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
                ("Shadowed", "False", "NoShadowing")
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
}
