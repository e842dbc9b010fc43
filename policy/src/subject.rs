//! Who a policy applies to — its subject — parsed once, with the error paths every consumer
//! reports.
//!
//! - A `StackRoute` selects pods of its own namespace by `spec.podSelector`.
//! - A `ClusterStackRoute` selects by `spec.subject`: every pod of the namespaces matching
//!   `namespaces`, or the pods matching `pods.podSelector` (in the namespaces matching
//!   `pods.namespaceSelector` when set, in every namespace otherwise). When both are set,
//!   `namespaces` is used; when neither is, the subject is an error.
//!
//! The compiler ([`crate::compile`]) evaluates these selectors through its label index; callers
//! that ask about one pod at a time use [`SubjectSelector::selects`].

use std::borrow::Borrow;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use stackroute_api::{ClusterStackRoute, ClusterStackRouteSpec, StackRoute, StackRouteSpec};

use crate::selector::{Labels, Selector};

/// Why a subject could not be parsed: the field's path (`spec.podSelector`, …) and a message.
pub type SubjectError = (String, String);

/// A policy's parsed subject.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SubjectSelector {
    /// A `StackRoute`: the pods of `namespace` that `pods` selects.
    Namespace {
        /// The policy's own namespace.
        namespace: String,
        /// `spec.podSelector`.
        pods: Selector,
    },
    /// A `ClusterStackRoute` with `spec.subject.namespaces`: every pod of the namespaces it
    /// selects.
    Namespaces(Selector),
    /// A `ClusterStackRoute` with `spec.subject.pods`.
    Pods {
        /// `spec.subject.pods.podSelector`.
        pods: Selector,
        /// `spec.subject.pods.namespaceSelector`; `None`: every namespace.
        namespaces: Option<Selector>,
    },
}

fn parse(selector: &LabelSelector, path: &str) -> Result<Selector, SubjectError> {
    Selector::parse(selector).map_err(|message| (path.to_string(), message))
}

impl SubjectSelector {
    /// The subject of `route`. A route without a namespace is in `default`, as
    /// [`crate::ClusterState`] reads it (the API server always sets one).
    pub fn for_stack_route(route: &StackRoute) -> Result<Self, SubjectError> {
        Self::of_stack_route(
            route.metadata.namespace.as_deref().unwrap_or("default"),
            &route.spec,
        )
    }

    /// The subject of a `StackRoute` of `namespace` with `spec`.
    pub fn of_stack_route(namespace: &str, spec: &StackRouteSpec) -> Result<Self, SubjectError> {
        Ok(Self::Namespace {
            namespace: namespace.to_string(),
            pods: parse(&spec.pod_selector, "spec.podSelector")?,
        })
    }

    /// The subject of `route`.
    pub fn for_cluster(route: &ClusterStackRoute) -> Result<Self, SubjectError> {
        Self::of_cluster(&route.spec)
    }

    /// The subject of a `ClusterStackRoute` with `spec`.
    pub fn of_cluster(spec: &ClusterStackRouteSpec) -> Result<Self, SubjectError> {
        match (&spec.subject.namespaces, &spec.subject.pods) {
            (Some(namespaces), _) => Ok(Self::Namespaces(parse(
                namespaces,
                "spec.subject.namespaces",
            )?)),
            (None, Some(pods)) => {
                let pod_selector = parse(&pods.pod_selector, "spec.subject.pods.podSelector")?;
                let namespaces = match &pods.namespace_selector {
                    Some(selector) => Some(parse(selector, "spec.subject.pods.namespaceSelector")?),
                    None => None,
                };
                Ok(Self::Pods {
                    pods: pod_selector,
                    namespaces,
                })
            }
            (None, None) => Err((
                "spec.subject".into(),
                "must set exactly one of namespaces or pods".into(),
            )),
        }
    }

    /// Whether the subject selects a pod of `namespace` with `pod_labels`. `namespace_labels`
    /// gives the namespace's labels; it is called at most once, and only when a namespace
    /// selector has to be checked.
    pub fn selects<L: Borrow<Labels>>(
        &self,
        namespace: &str,
        namespace_labels: impl FnOnce() -> L,
        pod_labels: &Labels,
    ) -> bool {
        match self {
            Self::Namespace {
                namespace: own,
                pods,
            } => own == namespace && pods.matches(pod_labels),
            Self::Namespaces(namespaces) => namespaces.matches(namespace_labels().borrow()),
            Self::Pods { pods, namespaces } => {
                pods.matches(pod_labels)
                    && namespaces
                        .as_ref()
                        .is_none_or(|s| s.matches(namespace_labels().borrow()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    use super::*;
    use crate::ClusterState;
    use crate::selector::tests::labels;

    fn state(yaml: &str) -> ClusterState {
        let mut state = ClusterState::default();
        let problems = state.load_text("test.yaml", yaml);
        assert!(problems.is_empty(), "{problems:?}");
        state
    }

    fn cluster_spec(subject: &str) -> ClusterStackRouteSpec {
        let route = state(&format!(
            "apiVersion: stackroute.dev/v1alpha1\n\
             kind: ClusterStackRoute\n\
             metadata: {{name: c}}\n\
             spec:\n  tier: Admin\n  subject: {subject}\n\
             \x20 rules: [{{name: r, transport: {{stack: Kernel}}}}]\n"
        ))
        .cluster_stack_routes
        .remove(0);
        route.spec
    }

    /// Namespace labels that must not be read.
    fn unread() -> Labels {
        panic!("the namespace's labels were read")
    }

    #[test]
    fn a_stack_route_selects_in_its_own_namespace_only() {
        let state = state(
            "apiVersion: stackroute.dev/v1alpha1\n\
             kind: StackRoute\n\
             metadata: {name: web, namespace: shop}\n\
             spec: {podSelector: {matchLabels: {app: web}},\
             \x20      rules: [{name: r, transport: {stack: Kernel}}]}\n",
        );
        let subject = SubjectSelector::for_stack_route(&state.stack_routes[0]).unwrap();
        let web = labels(&[("app", "web")]);
        assert!(subject.selects("shop", unread, &web));
        assert!(!subject.selects("other", unread, &web));
        assert!(!subject.selects("shop", unread, &labels(&[("app", "db")])));
        // Without a namespace, a route is in `default`.
        let mut route = state.stack_routes[0].clone();
        route.metadata.namespace = None;
        let subject = SubjectSelector::for_stack_route(&route).unwrap();
        assert!(subject.selects("default", unread, &web));
        assert!(!subject.selects("", unread, &web));
    }

    #[test]
    fn a_namespaces_subject_selects_every_pod_of_matching_namespaces() {
        let subject =
            SubjectSelector::of_cluster(&cluster_spec("{namespaces: {matchLabels: {team: ml}}}"))
                .unwrap();
        let ml = labels(&[("team", "ml")]);
        assert!(subject.selects("a", || &ml, &Labels::new()));
        assert!(subject.selects("b", || ml.clone(), &labels(&[("app", "x")])));
        assert!(!subject.selects("a", || labels(&[("team", "web")]), &Labels::new()));
    }

    #[test]
    fn a_pods_subject_checks_the_namespace_only_when_it_has_a_selector() {
        let anywhere = SubjectSelector::of_cluster(&cluster_spec(
            "{pods: {podSelector: {matchLabels: {gpu: \"true\"}}}}",
        ))
        .unwrap();
        let gpu = labels(&[("gpu", "true")]);
        assert!(anywhere.selects("any", unread, &gpu));
        assert!(!anywhere.selects("any", unread, &Labels::new()));

        let in_batch = SubjectSelector::of_cluster(&cluster_spec(
            "{pods: {podSelector: {matchLabels: {gpu: \"true\"}}, \
             namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: batch}}}}",
        ))
        .unwrap();
        let batch = labels(&[("kubernetes.io/metadata.name", "batch")]);
        let other = labels(&[("kubernetes.io/metadata.name", "other")]);
        assert!(in_batch.selects("batch", || &batch, &gpu));
        assert!(!in_batch.selects("other", || &other, &gpu));
        // The pod selector fails first: the namespace's labels are not needed.
        assert!(!in_batch.selects("batch", unread, &Labels::new()));
    }

    #[test]
    fn a_subject_with_neither_namespaces_nor_pods_is_an_error() {
        let mut spec = cluster_spec("{namespaces: {}}");
        spec.subject.namespaces = None;
        assert_eq!(
            SubjectSelector::of_cluster(&spec),
            Err((
                "spec.subject".to_string(),
                "must set exactly one of namespaces or pods".to_string()
            ))
        );
    }

    #[test]
    fn an_invalid_selector_is_an_error_at_its_path() {
        let invalid = LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "k".into(),
                operator: "In".into(),
                values: None,
            }]),
        };
        let message = Selector::parse(&invalid).unwrap_err();
        let error = |path: &str| Err((path.to_string(), message.clone()));

        let spec = StackRouteSpec {
            pod_selector: invalid.clone(),
            ..stack_route_spec()
        };
        assert_eq!(
            SubjectSelector::of_stack_route("shop", &spec),
            error("spec.podSelector")
        );

        let mut spec = cluster_spec("{namespaces: {}}");
        spec.subject.namespaces = Some(invalid.clone());
        assert_eq!(
            SubjectSelector::of_cluster(&spec),
            error("spec.subject.namespaces")
        );

        let mut spec = cluster_spec("{pods: {podSelector: {}, namespaceSelector: {}}}");
        let pods = spec.subject.pods.as_mut().unwrap();
        pods.namespace_selector = Some(invalid.clone());
        assert_eq!(
            SubjectSelector::of_cluster(&spec),
            error("spec.subject.pods.namespaceSelector")
        );
        // The pod selector is checked first.
        spec.subject.pods.as_mut().unwrap().pod_selector = invalid.clone();
        assert_eq!(
            SubjectSelector::of_cluster(&spec),
            error("spec.subject.pods.podSelector")
        );
        // `namespaces` wins when both are set.
        spec.subject.namespaces = Some(LabelSelector {
            match_labels: Some(BTreeMap::from([("team".into(), "ml".into())])),
            match_expressions: None,
        });
        assert!(matches!(
            SubjectSelector::of_cluster(&spec),
            Ok(SubjectSelector::Namespaces(_))
        ));
    }

    fn stack_route_spec() -> StackRouteSpec {
        state(
            "apiVersion: stackroute.dev/v1alpha1\n\
             kind: StackRoute\n\
             metadata: {name: web, namespace: shop}\n\
             spec: {podSelector: {}, rules: [{name: r, transport: {stack: Kernel}}]}\n",
        )
        .stack_routes
        .remove(0)
        .spec
    }
}
