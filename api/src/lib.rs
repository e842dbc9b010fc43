//! The `stackroute.dev/v1alpha1` API.
//!
//! [`StackRoute`] and [`ClusterStackRoute`] are defined once, here, with kube's
//! `CustomResource` derive. The CRD printed by `stackroute crd`, the API server's structural
//! schema and CEL rules, and the offline checks of `stackroute validate` ([`validate`]) all come
//! from these types, so the CLI and the API server cannot disagree.
//!
//! Older API servers cannot take the CEL rules (`x-kubernetes-validations`): [`crds_for_server`]
//! gives the CRDs for a server version, without the rules below Kubernetes
//! [`CEL_MIN_SERVER_VERSION`] and without those calling a CEL library the server lacks (IP/CIDR
//! before 1.31). The offline validator keeps the full schema either way, so an
//! object such a server admits is still checked against every rule (the controller reports it
//! as `Accepted=False`).
//!
//! No I/O happens here: callers hand in text or values.
#![forbid(unsafe_code)]
// The KubeSchema derive emits private shadow copies of each public struct, which trips this lint.
#![allow(unreachable_pub)]
// printcolumn(...) repeats `type_ = "string"` by design; clippy reads that as a duplicated attribute.
#![allow(clippy::duplicated_attributes)]

pub mod types;
pub mod validate;

pub use types::*;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
    JSONSchemaPropsOrStringArray,
};
use kube::CustomResourceExt;

/// The first Kubernetes version whose API server takes CRD CEL rules
/// (`x-kubernetes-validations`) by default: 1.25, where `CustomResourceValidationExpressions`
/// went beta. Older servers reject them (1.20 with server-side apply: "field not declared in
/// schema") or drop them silently, so [`crds_for_server`] leaves them out there.
pub const CEL_MIN_SERVER_VERSION: (u32, u32) = (1, 25);

/// Both CRDs, in the order they are installed.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![StackRoute::crd(), ClusterStackRoute::crd()]
}

/// Whether an API server of version `major.minor` enforces CRD CEL rules by default.
pub fn server_supports_cel(major: u32, minor: u32) -> bool {
    (major, minor) >= CEL_MIN_SERVER_VERSION
}

/// Kubernetes' own CEL libraries arrived after CEL itself: a rule that calls one does not
/// compile on an older server, which then refuses the whole CRD. (pattern in the rule, first
/// version that has the library). `scripts/charts.py` gates the CRD chart's blocks the same way
/// and checks its renders against [`crds_for_server`].
const CEL_LIBRARIES: [(&[&str], (u32, u32)); 3] = [
    (&["isIP(", "ip(", "isCIDR(", "cidr("], (1, 31)),
    (&["isQuantity(", "quantity("], (1, 29)),
    (&["isSemver(", "semver("], (1, 34)),
];

/// The first server version that compiles `rule`: 1.25, or later for a library it calls.
pub fn cel_rule_min_server_version(rule: &str) -> (u32, u32) {
    // A call of `name`: not the tail of a longer identifier (`self.skip(` calls no `ip(`).
    let calls = |name: &str| {
        rule.match_indices(name).any(|(at, _)| {
            !rule[..at]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        })
    };
    CEL_LIBRARIES
        .iter()
        .filter(|(names, _)| names.iter().any(|name| calls(name)))
        .map(|(_, since)| *since)
        .fold(CEL_MIN_SERVER_VERSION, std::cmp::max)
}

/// Both CRDs as an API server of version `major.minor` can take them: unchanged where it
/// compiles every rule; otherwise each `x-kubernetes-validations` list holding a rule it cannot
/// compile is left out whole — all of them below 1.25 ([`CEL_MIN_SERVER_VERSION`]), the lists
/// calling the IP/CIDR library below 1.31. The rest of the structural schema (types, enums,
/// bounds, required fields) stays.
pub fn crds_for_server(major: u32, minor: u32) -> Vec<CustomResourceDefinition> {
    let mut crds = crds();
    for crd in &mut crds {
        remove_cel_rules_where(crd, |rule| {
            cel_rule_min_server_version(rule) > (major, minor)
        });
    }
    crds
}

/// Removes every `x-kubernetes-validations` from a CRD's schemas; returns how many rules went.
pub fn remove_cel_rules(crd: &mut CustomResourceDefinition) -> usize {
    remove_cel_rules_where(crd, |_| true)
}

/// Removes each `x-kubernetes-validations` list that holds a rule for which `unsupported` is
/// true; returns how many rules went.
fn remove_cel_rules_where(
    crd: &mut CustomResourceDefinition,
    unsupported: impl Fn(&str) -> bool,
) -> usize {
    let mut removed = 0;
    for version in &mut crd.spec.versions {
        if let Some(schema) = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        {
            removed += remove_schema_rules(schema, &unsupported);
        }
    }
    removed
}

fn remove_schema_rules(schema: &mut JSONSchemaProps, unsupported: &dyn Fn(&str) -> bool) -> usize {
    let mut removed = 0;
    if schema
        .x_kubernetes_validations
        .as_ref()
        .is_some_and(|rules| rules.iter().any(|r| unsupported(&r.rule)))
    {
        removed = schema
            .x_kubernetes_validations
            .take()
            .map_or(0, |r| r.len());
    }
    let mut visit = |s: &mut JSONSchemaProps| removed += remove_schema_rules(s, unsupported);
    for map in [
        &mut schema.properties,
        &mut schema.pattern_properties,
        &mut schema.definitions,
    ]
    .into_iter()
    .flatten()
    {
        map.values_mut().for_each(&mut visit);
    }
    for list in [&mut schema.all_of, &mut schema.any_of, &mut schema.one_of]
        .into_iter()
        .flatten()
    {
        list.iter_mut().for_each(&mut visit);
    }
    match &mut schema.items {
        Some(JSONSchemaPropsOrArray::Schema(item)) => visit(item),
        Some(JSONSchemaPropsOrArray::Schemas(items)) => items.iter_mut().for_each(&mut visit),
        None => {}
    }
    for nested in [
        &mut schema.additional_properties,
        &mut schema.additional_items,
    ] {
        if let Some(JSONSchemaPropsOrBool::Schema(s)) = nested {
            visit(s);
        }
    }
    for dependency in schema.dependencies.iter_mut().flat_map(|d| d.values_mut()) {
        if let JSONSchemaPropsOrStringArray::Schema(s) = dependency {
            visit(s);
        }
    }
    if let Some(not) = &mut schema.not {
        visit(not);
    }
    removed
}

/// The CRDs as one multi-document YAML stream, as `stackroute crd` prints them.
pub fn crds_yaml() -> String {
    to_yaml(crds())
}

/// [`crds_for_server`] as one multi-document YAML stream (`stackroute crd --kube-version`).
pub fn crds_yaml_for_server(major: u32, minor: u32) -> String {
    to_yaml(crds_for_server(major, minor))
}

fn to_yaml(crds: Vec<CustomResourceDefinition>) -> String {
    let mut out = String::new();
    for crd in crds {
        out.push_str("---\n");
        // A derived CRD is plain data; serializing it cannot fail.
        out.push_str(&yaml_serde::to_string(&crd).expect("CRD serializes to YAML"));
    }
    out
}

/// Parses a Kubernetes version as people and API servers write it — `1.20`, `v1.20.2`,
/// `1.20.2-gke.1`, or the `/version` endpoint's `minor` with a vendor suffix such as `20+` —
/// into `(major, minor)`.
pub fn parse_kube_version(text: &str) -> Option<(u32, u32)> {
    let text = text.trim();
    let text = text.strip_prefix('v').unwrap_or(text);
    let mut parts = text.splitn(3, '.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?;
    let digits = minor
        .find(|c: char| !c.is_ascii_digit())
        .map_or(minor, |end| &minor[..end]);
    Some((major, digits.parse().ok()?))
}

/// `(major, minor)` from the `major` and `minor` fields of an API server's `/version`
/// (`"1"`, `"20"`; some vendors write `"20+"`).
pub fn server_version(major: &str, minor: &str) -> Option<(u32, u32)> {
    parse_kube_version(&format!("{}.{}", major.trim(), minor.trim()))
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    /// (number of `x-kubernetes-validations` lists, number of rules in them).
    fn count_rules(crds: &[CustomResourceDefinition]) -> (usize, usize) {
        fn walk(value: &Value, counts: &mut (usize, usize)) {
            match value {
                Value::Object(map) => {
                    for (key, value) in map {
                        if key == "x-kubernetes-validations" {
                            counts.0 += 1;
                            counts.1 += value.as_array().map_or(0, Vec::len);
                        }
                        walk(value, counts);
                    }
                }
                Value::Array(items) => items.iter().for_each(|v| walk(v, counts)),
                _ => {}
            }
        }
        let mut counts = (0, 0);
        for crd in crds {
            walk(&serde_json::to_value(crd).unwrap(), &mut counts);
        }
        counts
    }

    #[test]
    fn current_servers_get_every_cel_rule() {
        // 15 `x-kubernetes-validations` lists (7 in StackRoute, 8 in ClusterStackRoute) holding
        // 24 rules, as in manifests/crds/stackroute.dev.yaml.
        assert_eq!(count_rules(&crds()), (15, 24));
        for (major, minor) in [(1, 31), (1, 33), (2, 0)] {
            assert_eq!(crds_for_server(major, minor), crds(), "{major}.{minor}");
        }
        assert_eq!(crds_yaml_for_server(1, 33), crds_yaml());
    }

    #[test]
    fn old_servers_get_no_cel_rule_and_the_rest_unchanged() {
        for (major, minor) in [(1, 20), (1, 24), (0, 99)] {
            let old = crds_for_server(major, minor);
            assert_eq!(count_rules(&old), (0, 0), "{major}.{minor}");
            assert!(!crds_yaml_for_server(major, minor).contains("x-kubernetes-validations"));
            // Nothing else changed: removing the rules from the full CRDs gives the same.
            let mut full = crds();
            let removed: usize = full.iter_mut().map(remove_cel_rules).sum();
            assert_eq!(removed, 24);
            assert_eq!(old, full);
        }
        let old = serde_json::to_value(&crds_for_server(1, 20)[0]).unwrap();
        let spec = &old["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        assert_eq!(spec["properties"]["priority"]["maximum"], 1000.0);
        assert_eq!(spec["properties"]["rules"]["maxItems"], 25);
    }

    #[test]
    fn rules_calling_the_cidr_library_wait_for_1_31() {
        assert_eq!(
            cel_rule_min_server_version("self.all(c, isCIDR(c))"),
            (1, 31)
        );
        assert_eq!(
            cel_rule_min_server_version("cidr(self).prefixLength() < 8"),
            (1, 31)
        );
        assert_eq!(
            cel_rule_min_server_version("self.endPort >= self.port"),
            (1, 25)
        );
        // a field that merely ends in "ip(" is no library call
        assert_eq!(cel_rule_min_server_version("self.skip(1)"), (1, 25));
        // 1.25-1.30: 13 lists, without the 2 that call isCIDR; from 1.31 all 15.
        for minor in [25, 28, 30] {
            let crds = crds_for_server(1, minor);
            assert_eq!(count_rules(&crds).0, 13, "1.{minor}");
            assert!(!serde_json::to_string(&crds).unwrap().contains("isCIDR"));
        }
        assert_eq!(count_rules(&crds_for_server(1, 31)).0, 15);
    }

    #[test]
    fn versions_parse_as_written() {
        assert_eq!(parse_kube_version("1.20"), Some((1, 20)));
        assert_eq!(parse_kube_version("v1.20.2"), Some((1, 20)));
        assert_eq!(parse_kube_version("1.33.4-gke.100"), Some((1, 33)));
        assert_eq!(parse_kube_version(" 1.25 "), Some((1, 25)));
        assert_eq!(parse_kube_version("1"), None);
        assert_eq!(parse_kube_version("one.two"), None);
        assert_eq!(parse_kube_version("1.x"), None);
        assert_eq!(server_version("1", "20"), Some((1, 20)));
        assert_eq!(server_version("1", "20+"), Some((1, 20)));
        assert!(!server_supports_cel(1, 24) && server_supports_cel(1, 25));
    }
}
