//! Whether a pod is injected, and with which settings.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::{
    CONFIG_LIBC, CONFIG_LOG, CONFIG_WORKLOAD, Config, INJECT, INJECTED, SYSTEM_NAMESPACES,
};

/// A namespace's labels and annotations: all the opt-in rules read of it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamespaceMeta {
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
    /// `metadata.annotations`.
    pub annotations: BTreeMap<String, String>,
}

impl NamespaceMeta {
    /// The labels and annotations of an object's metadata.
    pub fn from_meta(meta: &ObjectMeta) -> Self {
        Self {
            labels: meta.labels.clone().unwrap_or_default(),
            annotations: meta.annotations.clone().unwrap_or_default(),
        }
    }
}

/// The value of `stackroute.dev/inject` on one object, label and annotation combined.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptIn {
    /// `enabled` (and no `disabled`).
    Enabled,
    /// `disabled` on the label or the annotation.
    Disabled,
    /// Neither, or a value that is neither.
    Unset,
}

fn opt_in(
    labels: Option<&BTreeMap<String, String>>,
    annotations: Option<&BTreeMap<String, String>>,
) -> OptIn {
    let values = [labels, annotations]
        .into_iter()
        .flatten()
        .filter_map(|map| map.get(INJECT))
        .map(|value| value.trim());
    let mut result = OptIn::Unset;
    for value in values {
        match value {
            "disabled" => return OptIn::Disabled,
            "enabled" => result = OptIn::Enabled,
            _ => {}
        }
    }
    result
}

/// The pod's own opt-in or opt-out (label or annotation; `disabled` wins).
pub fn pod_opt_in(meta: &ObjectMeta) -> OptIn {
    opt_in(meta.labels.as_ref(), meta.annotations.as_ref())
}

/// Why a pod is left alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Skip {
    /// The controller's own namespace or kube-system.
    ExcludedNamespace(String),
    /// `spec.hostNetwork: true`: the pod shares the node's network namespace.
    HostNetwork,
    /// `stackroute.dev/inject: disabled` on the pod, or on its namespace without a pod opt-in.
    OptedOut,
    /// No opt-in on the pod nor on its namespace.
    NotOptedIn,
    /// The pod does not decide by itself and its namespace could not be read.
    NamespaceUnknown,
}

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ExcludedNamespace(ns) => write!(f, "namespace {ns} is never injected"),
            Self::HostNetwork => f.write_str("hostNetwork pod"),
            Self::OptedOut => write!(f, "{INJECT}: disabled"),
            Self::NotOptedIn => write!(f, "no {INJECT}: enabled on the pod or its namespace"),
            Self::NamespaceUnknown => f.write_str("the pod's namespace could not be read"),
        }
    }
}

/// The shim build copied into the pod.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Libc {
    /// `/stackroute/lib/libnsocket.so` in the shim image.
    #[default]
    Glibc,
    /// `/stackroute/lib/musl/libnsocket.so` in the shim image.
    Musl,
}

impl Libc {
    /// `glibc` or `musl`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Glibc => "glibc",
            Self::Musl => "musl",
        }
    }

    /// The build's path inside the shim image.
    pub fn source(self) -> &'static str {
        match self {
            Self::Glibc => "/stackroute/lib/libnsocket.so",
            Self::Musl => "/stackroute/lib/musl/libnsocket.so",
        }
    }
}

/// Per-pod settings read from `config.stackroute.dev/*`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// Which build to copy.
    pub libc: Libc,
    /// `STACKROUTE_WORKLOAD` as a literal; `None`: the pod name by the downward API.
    pub workload: Option<String>,
    /// `STACKROUTE_LOG`; `None`: not set.
    pub log: Option<String>,
    /// Settings that were ignored, for the API client (AdmissionResponse warnings).
    pub warnings: Vec<String>,
}

/// The outcome for one pod.
pub type Decision = Result<Settings, Skip>;

fn is_name(value: &str) -> bool {
    !value.is_empty() && value.len() <= 253 && !value.chars().any(|c| c.is_whitespace() || c == '/')
}

fn is_log_filter(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 128
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "=,_.-:".contains(c))
}

/// Reads the `config.stackroute.dev/*` annotations; invalid values are ignored with a warning.
pub fn settings(meta: &ObjectMeta) -> Settings {
    let empty = BTreeMap::new();
    let annotations = meta.annotations.as_ref().unwrap_or(&empty);
    let mut settings = Settings::default();
    if let Some(value) = annotations.get(CONFIG_LIBC) {
        match value.trim() {
            "glibc" => settings.libc = Libc::Glibc,
            "musl" => settings.libc = Libc::Musl,
            other => settings.warnings.push(format!(
                "{CONFIG_LIBC}: {other:?} is neither glibc nor musl; the glibc build is used"
            )),
        }
    }
    if let Some(value) = annotations.get(CONFIG_WORKLOAD) {
        let value = value.trim();
        if is_name(value) {
            settings.workload = Some(value.to_string());
        } else {
            settings.warnings.push(format!(
                "{CONFIG_WORKLOAD}: {value:?} is not a name; the pod name is used"
            ));
        }
    }
    if let Some(value) = annotations.get(CONFIG_LOG) {
        let value = value.trim();
        if is_log_filter(value) {
            settings.log = Some(value.to_string());
        } else {
            settings.warnings.push(format!(
                "{CONFIG_LOG}: {value:?} is not a log filter; ignored"
            ));
        }
    }
    settings
}

/// True when the decision depends on the namespace (the pod neither opts in nor out, and is
/// not excluded for another reason): only then does the caller need to look it up.
pub fn needs_namespace(pod: &Pod, namespace: &str, config: &Config) -> bool {
    excluded(pod, namespace, config).is_none() && pod_opt_in(&pod.metadata) == OptIn::Unset
}

fn excluded(pod: &Pod, namespace: &str, config: &Config) -> Option<Skip> {
    if namespace == config.own_namespace || SYSTEM_NAMESPACES.contains(&namespace) {
        return Some(Skip::ExcludedNamespace(namespace.to_string()));
    }
    if pod
        .spec
        .as_ref()
        .and_then(|spec| spec.host_network)
        .unwrap_or(false)
    {
        return Some(Skip::HostNetwork);
    }
    None
}

/// Whether `pod` in `namespace` is injected. `ns` is the namespace's metadata when known;
/// `None` matters only when [`needs_namespace`] says so.
pub fn decide(pod: &Pod, namespace: &str, ns: Option<&NamespaceMeta>, config: &Config) -> Decision {
    if let Some(skip) = excluded(pod, namespace, config) {
        return Err(skip);
    }
    let opted_in = match pod_opt_in(&pod.metadata) {
        OptIn::Disabled => return Err(Skip::OptedOut),
        OptIn::Enabled => true,
        OptIn::Unset => {
            let Some(ns) = ns else {
                return Err(Skip::NamespaceUnknown);
            };
            match opt_in(Some(&ns.labels), Some(&ns.annotations)) {
                OptIn::Enabled => true,
                OptIn::Disabled => return Err(Skip::OptedOut),
                OptIn::Unset => false,
            }
        }
    };
    if !opted_in {
        return Err(Skip::NotOptedIn);
    }
    Ok(settings(&pod.metadata))
}

/// True for a running or pending pod that opted in but has no `stackroute.dev/injected`
/// annotation: the webhook was not called (outage with `failurePolicy: Ignore`, a pod created
/// before the webhook existed) or failed. Finished pods are not reported.
pub fn not_injected(
    pod: &Pod,
    namespace: &str,
    ns: Option<&NamespaceMeta>,
    config: &Config,
) -> bool {
    let finished = matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    );
    let injected = pod
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(INJECTED));
    !finished && !injected && pod.metadata.deletion_timestamp.is_none() && {
        decide(pod, namespace, ns, config).is_ok()
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

    fn mk_pod(labels: &[(&str, &str)], annotations: &[(&str, &str)]) -> Pod {
        let map = |kv: &[(&str, &str)]| {
            (!kv.is_empty()).then(|| {
                kv.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            })
        };
        Pod {
            metadata: ObjectMeta {
                name: Some("p".into()),
                labels: map(labels),
                annotations: map(annotations),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn mk_ns(labels: &[(&str, &str)], annotations: &[(&str, &str)]) -> NamespaceMeta {
        NamespaceMeta {
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            annotations: annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn opt_in_by_pod_annotation_or_label_and_namespace() {
        let config = mk_config();
        let none = NamespaceMeta::default();
        let on = [(INJECT, "enabled")];
        assert!(decide(&mk_pod(&[], &on), "app", Some(&none), &config).is_ok());
        assert!(decide(&mk_pod(&on, &[]), "app", Some(&none), &config).is_ok());
        assert!(decide(&mk_pod(&on, &[]), "app", None, &config).is_ok());
        assert_eq!(
            decide(&mk_pod(&[], &[]), "app", Some(&none), &config),
            Err(Skip::NotOptedIn)
        );
        assert!(decide(&mk_pod(&[], &[]), "app", Some(&mk_ns(&[], &on)), &config).is_ok());
        assert!(decide(&mk_pod(&[], &[]), "app", Some(&mk_ns(&on, &[])), &config).is_ok());
        assert_eq!(
            decide(&mk_pod(&[], &[]), "app", None, &config),
            Err(Skip::NamespaceUnknown)
        );
        assert!(needs_namespace(&mk_pod(&[], &[]), "app", &config));
        assert!(!needs_namespace(&mk_pod(&on, &[]), "app", &config));
    }

    #[test]
    fn pod_opt_out_wins() {
        let config = mk_config();
        let ns = mk_ns(&[(INJECT, "enabled")], &[(INJECT, "enabled")]);
        let off = [(INJECT, "disabled")];
        assert_eq!(
            decide(&mk_pod(&[], &off), "app", Some(&ns), &config),
            Err(Skip::OptedOut)
        );
        assert_eq!(
            decide(&mk_pod(&off, &[]), "app", Some(&ns), &config),
            Err(Skip::OptedOut)
        );
        // Label enabled, annotation disabled: disabled wins.
        assert_eq!(
            decide(
                &mk_pod(&[(INJECT, "enabled")], &off),
                "app",
                Some(&ns),
                &config
            ),
            Err(Skip::OptedOut)
        );
        // A pod opt-in beats a namespace opt-out.
        let ns_off = mk_ns(&[], &off);
        assert!(
            decide(
                &mk_pod(&[], &[(INJECT, "enabled")]),
                "app",
                Some(&ns_off),
                &config
            )
            .is_ok()
        );
    }

    #[test]
    fn exclusions() {
        let config = mk_config();
        let pod = mk_pod(&[(INJECT, "enabled")], &[]);
        for ns in ["stackroute-system", "kube-system"] {
            assert_eq!(
                decide(&pod, ns, None, &config),
                Err(Skip::ExcludedNamespace(ns.into()))
            );
            assert!(!needs_namespace(&pod, ns, &config));
        }
        let mut host = pod.clone();
        host.spec = Some(k8s_openapi::api::core::v1::PodSpec {
            host_network: Some(true),
            ..Default::default()
        });
        assert_eq!(decide(&host, "app", None, &config), Err(Skip::HostNetwork));
    }

    #[test]
    fn settings_and_warnings() {
        let pod = mk_pod(
            &[],
            &[
                (CONFIG_LIBC, "musl"),
                (CONFIG_WORKLOAD, "web"),
                (CONFIG_LOG, "debug"),
            ],
        );
        let s = settings(&pod.metadata);
        assert_eq!(s.libc, Libc::Musl);
        assert_eq!(s.workload.as_deref(), Some("web"));
        assert_eq!(s.log.as_deref(), Some("debug"));
        assert!(s.warnings.is_empty());

        let bad = mk_pod(
            &[],
            &[
                (CONFIG_LIBC, "uclibc"),
                (CONFIG_WORKLOAD, "a b"),
                (CONFIG_LOG, "$(rm -rf /)"),
            ],
        );
        let s = settings(&bad.metadata);
        assert_eq!(s.libc, Libc::Glibc);
        assert_eq!(s.workload, None);
        assert_eq!(s.log, None);
        assert_eq!(s.warnings.len(), 3, "{:?}", s.warnings);
    }

    #[test]
    fn not_injected_detection() {
        let config = mk_config();
        let ns = NamespaceMeta::default();
        let on = mk_pod(&[(INJECT, "enabled")], &[]);
        assert!(not_injected(&on, "app", Some(&ns), &config));
        let done = mk_pod(&[(INJECT, "enabled")], &[(INJECTED, "libc=glibc")]);
        assert!(!not_injected(&done, "app", Some(&ns), &config));
        assert!(!not_injected(&mk_pod(&[], &[]), "app", Some(&ns), &config));
        assert!(!not_injected(&on, "kube-system", Some(&ns), &config));
        let ns_on = mk_ns(&[(INJECT, "enabled")], &[]);
        assert!(not_injected(
            &mk_pod(&[], &[]),
            "app",
            Some(&ns_on),
            &config
        ));
        let mut finished = on.clone();
        finished.status = Some(k8s_openapi::api::core::v1::PodStatus {
            phase: Some("Succeeded".into()),
            ..Default::default()
        });
        assert!(!not_injected(&finished, "app", Some(&ns), &config));
    }
}
