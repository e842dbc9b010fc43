//! Whether a pod's policies can pick RDMA, decided at admission: the pod has no IP and no node
//! yet, so only what selectors read counts (its namespace, the namespace's labels, its labels).
//!
//! A policy "can pick RDMA" when one of its rules lists RDMA as the transport or a fallback and
//! its subject selects the pod as a source: the same test as
//! `stackroute_policy::Compiled::policies_may_use_rdma`, which decides which nodes get listener
//! registrations. Rule order, tiers and destinations are not weighed: a pod that might open an
//! RDMA connection gets the device, one that never can does not.

use std::cell::OnceCell;

use stackroute_api::{RouteRule, Stack};
use stackroute_policy::selector::Labels;
use stackroute_policy::state::NAMESPACE_NAME_LABEL;
use stackroute_policy::{ClusterState, SubjectSelector};

use super::BoxFuture;
use crate::index::IndexHandle;

/// Where the webhook asks whether a policy that can pick RDMA selects a pod: the controller's
/// index in the binary, a fixed state in tests.
pub trait RdmaPolicies: Send + Sync {
    /// Whether one selects a pod of `namespace` with `labels` as a source.
    fn selects<'a>(
        &'a self,
        namespace: &'a str,
        labels: &'a Labels,
    ) -> BoxFuture<'a, anyhow::Result<bool>>;
}

/// A fixed state (tests).
#[derive(Clone, Debug, Default)]
pub struct StaticPolicies(pub ClusterState);

impl RdmaPolicies for StaticPolicies {
    fn selects<'a>(
        &'a self,
        namespace: &'a str,
        labels: &'a Labels,
    ) -> BoxFuture<'a, anyhow::Result<bool>> {
        Box::pin(async move { Ok(selects([&self.0], namespace, labels)) })
    }
}

impl RdmaPolicies for IndexHandle {
    fn selects<'a>(
        &'a self,
        namespace: &'a str,
        labels: &'a Labels,
    ) -> BoxFuture<'a, anyhow::Result<bool>> {
        Box::pin(async move {
            self.rdma_policy_selects(namespace.to_string(), labels.clone())
                .await?
                .ok_or_else(|| {
                    anyhow::anyhow!("the controller has not read every policy source yet")
                })
        })
    }
}

/// Whether a rule lists RDMA, as the transport or as a fallback.
pub fn rule_may_use_rdma(rule: &RouteRule) -> bool {
    rule.transport.as_ref().is_some_and(|t| {
        t.stack == Stack::RDMA || t.fallback.iter().flatten().any(|f| f.stack == Stack::RDMA)
    })
}

/// Whether a policy of `states` (the sources' states, as the index holds them) that can pick
/// RDMA selects a pod of `namespace` with `labels`. One pass: RDMA policies are few, so they
/// are set aside and matched once the namespace's labels are known.
pub fn selects<'s>(
    states: impl IntoIterator<Item = &'s ClusterState>,
    namespace: &str,
    labels: &Labels,
) -> bool {
    let mut listed: Option<&Labels> = None;
    let mut subjects: Vec<SubjectSelector> = Vec::new();
    for state in states {
        if let Some(found) = state.namespaces.get(namespace) {
            listed = Some(found);
        }
        // An invalid selector selects nothing: the compile leaves such a policy out too.
        subjects.extend(
            state
                .stack_routes
                .iter()
                .filter(|r| r.spec.rules.iter().any(rule_may_use_rdma))
                .filter_map(|r| SubjectSelector::for_stack_route(r).ok()),
        );
        subjects.extend(
            state
                .cluster_stack_routes
                .iter()
                .filter(|r| r.spec.rules.iter().any(rule_may_use_rdma))
                .filter_map(|r| SubjectSelector::for_cluster(r).ok()),
        );
    }
    // A namespace not (yet) known still has its name label, as `ClusterState::namespace_labels`;
    // built at most once, and only when a namespace selector is checked.
    let fallback = OnceCell::new();
    let namespace_labels = || {
        listed.unwrap_or_else(|| {
            fallback.get_or_init(|| {
                Labels::from([(NAMESPACE_NAME_LABEL.to_string(), namespace.to_string())])
            })
        })
    };
    subjects
        .iter()
        .any(|subject| subject.selects(namespace, namespace_labels, labels))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(yaml: &str) -> ClusterState {
        let mut state = ClusterState::default();
        let problems = state.load_text("test.yaml", yaml);
        assert!(problems.is_empty(), "{problems:?}");
        state
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const POLICIES: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: ml, labels: {fabric: roce}}
---
apiVersion: stackroute.dev/v1alpha1
kind: StackRoute
metadata: {name: trainers, namespace: train}
spec:
  podSelector: {matchLabels: {app: trainer}}
  rules:
    - name: to-ps
      transport: {stack: Kernel, fallback: [{stack: RDMA}]}
---
apiVersion: stackroute.dev/v1alpha1
kind: StackRoute
metadata: {name: web, namespace: ml}
spec:
  podSelector: {matchLabels: {app: web}}
  rules:
    - name: bbr
      transport: {stack: Kernel, congestionControl: BBR}
---
apiVersion: stackroute.dev/v1alpha1
kind: ClusterStackRoute
metadata: {name: roce-namespaces}
spec:
  tier: Baseline
  subject: {namespaces: {matchLabels: {fabric: roce}}}
  rules:
    - name: rdma
      transport: {stack: RDMA, fallback: [{stack: Kernel}]}
---
apiVersion: stackroute.dev/v1alpha1
kind: ClusterStackRoute
metadata: {name: gpu-pods}
spec:
  tier: Admin
  subject:
    pods:
      podSelector: {matchLabels: {gpu: "true"}}
      namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: batch}}
  rules:
    - name: rdma
      transport: {stack: RDMA}
"#;

    #[test]
    fn rdma_policies_select_by_namespace_and_labels() {
        let state = state(POLICIES);
        let trainer = labels(&[("app", "trainer")]);
        let web = labels(&[("app", "web")]);
        let gpu = labels(&[("gpu", "true")]);
        // A StackRoute with RDMA as a fallback selects its namespace's trainers only.
        assert!(selects([&state], "train", &trainer));
        assert!(!selects([&state], "train", &web));
        assert!(!selects([&state], "shop", &trainer));
        // Namespace `ml` has `fabric: roce`: the Baseline policy selects every pod there.
        assert!(selects([&state], "ml", &web));
        assert!(selects([&state], "ml", &trainer));
        // Pod and namespace selector; `batch` is not listed but has its name label.
        assert!(selects([&state], "batch", &gpu));
        assert!(!selects([&state], "batch", &web));
        assert!(!selects([&state], "other", &gpu));
        assert!(!selects([&state], "other", &Labels::new()));
    }

    #[test]
    fn only_policies_listing_rdma_count() {
        let kernel_only = state(
            r#"
apiVersion: stackroute.dev/v1alpha1
kind: StackRoute
metadata: {name: web, namespace: shop}
spec:
  podSelector: {}
  rules:
    - name: bbr
      transport: {stack: Userspace, congestionControl: BBR, fallback: [{stack: Kernel}]}
"#,
        );
        assert!(!selects([&kernel_only], "shop", &Labels::new()));
        // Policies spread over several sources (the index's files) are all read.
        let rdma = state(POLICIES);
        let trainer = labels(&[("app", "trainer")]);
        assert!(selects([&kernel_only, &rdma], "train", &trainer));
        assert!(!selects([&kernel_only, &rdma], "shop", &trainer));
    }
}
