//! Offline validation of StackRoute and ClusterStackRoute objects against the CRD's own
//! structural schema and CEL rules — the checks the API server runs at admission.
//!
//! The schema is taken from the derived CRD (never a hand-written copy); the structural part
//! (types, required fields, enums, bounds, unknown fields) is walked here, and the
//! `x-kubernetes-validations` rules are evaluated by kube's CEL validator (`kube-cel`).

use std::cell::OnceCell;
use std::sync::OnceLock;

use kube::CustomResourceExt;
use kube::core::cel::{CompiledSchema, ValidationErrors, Validator, compile_schema};
use serde_json::Value;

use crate::{ClusterStackRoute, StackRoute};

/// One thing wrong with an object, located by a field path such as `spec.rules[0].ports[0].port`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Path of the offending field, from the object's root.
    pub path: String,
    /// What is wrong, in words a user understands.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Which of the two stackroute kinds an object is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RouteKind {
    /// Namespaced `StackRoute`.
    StackRoute,
    /// Cluster-scoped `ClusterStackRoute`.
    ClusterStackRoute,
}

impl RouteKind {
    /// The kind as written in `kind:`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::StackRoute => "StackRoute",
            Self::ClusterStackRoute => "ClusterStackRoute",
        }
    }

    /// Recognises `apiVersion`/`kind`; `None` for objects of other APIs.
    pub fn of(api_version: &str, kind: &str) -> Option<Self> {
        if api_version != format!("{}/{}", crate::GROUP, crate::VERSION) {
            return None;
        }
        match kind {
            "StackRoute" => Some(Self::StackRoute),
            "ClusterStackRoute" => Some(Self::ClusterStackRoute),
            _ => None,
        }
    }

    fn schema(self) -> &'static Value {
        static STACK_ROUTE: OnceLock<Value> = OnceLock::new();
        static CLUSTER_STACK_ROUTE: OnceLock<Value> = OnceLock::new();
        match self {
            Self::StackRoute => STACK_ROUTE.get_or_init(|| open_api_schema(StackRoute::crd())),
            Self::ClusterStackRoute => {
                CLUSTER_STACK_ROUTE.get_or_init(|| open_api_schema(ClusterStackRoute::crd()))
            }
        }
    }
}

fn open_api_schema(
    crd: k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
) -> Value {
    let schema = crd.spec.versions[0]
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .expect("a derived CRD always carries an openAPIV3Schema");
    serde_json::to_value(schema).expect("a JSON schema serializes to JSON")
}

/// Checks one object (already parsed from YAML or JSON) as the API server would: first the
/// structural schema, then — only if that holds, since CEL over ill-typed data says little —
/// the CEL rules. Returns every problem found; empty means valid.
pub fn validate_object(kind: RouteKind, object: &Value) -> Vec<Problem> {
    let mut problems = Vec::new();
    check_metadata(kind, object, &mut problems);
    let schema = kind.schema();
    walk(schema, object, &mut String::new(), &mut problems, true);
    if problems.is_empty()
        && let Err(errors) = validate_cel(kind, schema, object)
    {
        for error in errors.iter() {
            problems.push(Problem {
                path: if error.field_path.is_empty() {
                    "(object)".into()
                } else {
                    error.field_path.clone()
                },
                message: error.message.clone(),
            });
        }
    }
    problems
}

thread_local! {
    // Compiling the CEL rules costs far more than evaluating them, so each thread compiles each
    // kind's schema once. (Thread-local: the compiled programs are not `Sync`.)
    static CEL: (Validator, [OnceCell<CompiledSchema>; 2]) =
        (Validator::new(), [OnceCell::new(), OnceCell::new()]);
}

fn validate_cel(kind: RouteKind, schema: &Value, object: &Value) -> Result<(), ValidationErrors> {
    CEL.with(|(validator, compiled)| {
        let slot = match kind {
            RouteKind::StackRoute => &compiled[0],
            RouteKind::ClusterStackRoute => &compiled[1],
        };
        validator.validate_compiled(slot.get_or_init(|| compile_schema(schema)), object, None)
    })
}

fn check_metadata(kind: RouteKind, object: &Value, problems: &mut Vec<Problem>) {
    let name = object.pointer("/metadata/name").and_then(Value::as_str);
    match name {
        None => problems.push(Problem { path: "metadata.name".into(), message: "Required value".into() }),
        Some(name) if !is_dns_subdomain(name) => problems.push(Problem {
            path: "metadata.name".into(),
            message: format!(
                "Invalid value {name:?}: must be a lowercase RFC 1123 subdomain (letters, digits, '-' and '.', at most 253 characters)"
            ),
        }),
        Some(_) => {}
    }
    if kind == RouteKind::ClusterStackRoute && object.pointer("/metadata/namespace").is_some() {
        problems.push(Problem {
            path: "metadata.namespace".into(),
            message: "a ClusterStackRoute is cluster-scoped and takes no namespace".into(),
        });
    }
}

fn is_dns_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Walks `value` against an OpenAPI v3 structural schema as the API server does.
fn walk(schema: &Value, value: &Value, path: &mut String, problems: &mut Vec<Problem>, root: bool) {
    let here = |path: &String| {
        if path.is_empty() {
            "(object)".to_string()
        } else {
            path.clone()
        }
    };
    if value.is_null() {
        if !schema
            .get("nullable")
            .and_then(Value::as_bool)
            .unwrap_or(false)
        {
            problems.push(Problem {
                path: here(path),
                message: "must not be null".into(),
            });
        }
        return;
    }
    let Some(expected) = schema.get("type").and_then(Value::as_str) else {
        return; // x-kubernetes-preserve-unknown-fields or int-or-string: nothing structural to check
    };
    let type_ok = match expected {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "integer" => value.as_i64().is_some() || value.as_u64().is_some(),
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        _ => true,
    };
    if !type_ok {
        problems.push(Problem {
            path: here(path),
            message: format!("Invalid value {}: must be of type {expected}", short(value)),
        });
        return;
    }
    match value {
        Value::Object(map) => {
            let properties = schema.get("properties").and_then(Value::as_object);
            if let Some(required) = schema.get("required").and_then(Value::as_array) {
                for field in required.iter().filter_map(Value::as_str) {
                    if !map.contains_key(field) {
                        problems.push(Problem {
                            path: join(path, field),
                            message: "Required value".into(),
                        });
                    }
                }
            }
            for (key, item) in map {
                // apiVersion, kind and status are the API machinery's; metadata is checked above.
                if root && matches!(key.as_str(), "apiVersion" | "kind" | "metadata" | "status") {
                    continue;
                }
                let sub = properties
                    .and_then(|p| p.get(key))
                    .or_else(|| schema.get("additionalProperties").filter(|a| a.is_object()));
                match sub {
                    Some(sub) => {
                        let len = path.len();
                        push_field(path, key);
                        walk(sub, item, path, problems, false);
                        path.truncate(len);
                    }
                    None if properties.is_some() => problems.push(Problem {
                        path: join(path, key),
                        message: format!(
                            "unknown field; expected one of: {}",
                            properties
                                .map(|p| p.keys().cloned().collect::<Vec<_>>().join(", "))
                                .unwrap_or_default()
                        ),
                    }),
                    None => {}
                }
            }
        }
        Value::Array(items) => {
            if let Some(min) = schema.get("minItems").and_then(Value::as_u64)
                && (items.len() as u64) < min
            {
                problems.push(Problem {
                    path: here(path),
                    message: format!("must have at least {min} item(s)"),
                });
            }
            if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
                && items.len() as u64 > max
            {
                problems.push(Problem {
                    path: here(path),
                    message: format!("must have at most {max} items (has {})", items.len()),
                });
            }
            if let Some(item_schema) = schema.get("items") {
                for (index, item) in items.iter().enumerate() {
                    let len = path.len();
                    path.push_str(&format!("[{index}]"));
                    walk(item_schema, item, path, problems, false);
                    path.truncate(len);
                }
            }
        }
        Value::String(text) => {
            if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
                && !allowed.iter().any(|a| a.as_str() == Some(text))
            {
                let list: Vec<String> = allowed.iter().map(|a| a.to_string()).collect();
                problems.push(Problem {
                    path: here(path),
                    message: format!(
                        "Unsupported value {text:?}: supported values: {}",
                        list.join(", ")
                    ),
                });
            }
            let chars = text.chars().count() as u64;
            if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
                && chars < min
            {
                problems.push(Problem {
                    path: here(path),
                    message: format!("must be at least {min} character(s) long"),
                });
            }
            if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
                && chars > max
            {
                problems.push(Problem {
                    path: here(path),
                    message: format!("must be at most {max} characters long"),
                });
            }
            if let Some(pattern) = schema.get("pattern").and_then(Value::as_str)
                && let Ok(re) = regex::Regex::new(pattern)
                && !re.is_match(text)
            {
                problems.push(Problem {
                            path: here(path),
                            message: format!("Invalid value {text:?}: must match {pattern} (lowercase letters, digits and '-')"),
                        });
            }
        }
        Value::Number(number) => {
            if let Some(n) = number.as_f64() {
                if let Some(min) = schema.get("minimum").and_then(Value::as_f64)
                    && n < min
                {
                    problems.push(Problem {
                        path: here(path),
                        message: format!("Invalid value {number}: must be at least {min}"),
                    });
                }
                if let Some(max) = schema.get("maximum").and_then(Value::as_f64)
                    && n > max
                {
                    problems.push(Problem {
                        path: here(path),
                        message: format!("Invalid value {number}: must be at most {max}"),
                    });
                }
            }
        }
        _ => {}
    }
}

fn push_field(path: &mut String, key: &str) {
    if !path.is_empty() {
        path.push('.');
    }
    path.push_str(key);
}

fn join(path: &str, key: &str) -> String {
    let mut joined = path.to_string();
    push_field(&mut joined, key);
    joined
}

fn short(value: &Value) -> String {
    let text = value.to_string();
    if text.len() > 40 {
        format!("{}…", &text[..text.floor_char_boundary(40)])
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sr(spec: Value) -> Value {
        json!({"apiVersion": "stackroute.dev/v1alpha1", "kind": "StackRoute",
               "metadata": {"name": "r", "namespace": "ns"}, "spec": spec})
    }

    fn rule(extra: Value) -> Value {
        let mut base = json!({"name": "a", "transport": {"stack": "Kernel"}});
        for (k, v) in extra.as_object().unwrap() {
            base[k] = v.clone();
        }
        base
    }

    fn problems(object: Value) -> Vec<String> {
        let kind = RouteKind::of(
            object["apiVersion"].as_str().unwrap(),
            object["kind"].as_str().unwrap(),
        )
        .unwrap();
        validate_object(kind, &object)
            .into_iter()
            .map(|p| p.to_string())
            .collect()
    }

    #[track_caller]
    fn assert_single(object: Value, expected: &str) {
        let found = problems(object);
        assert_eq!(
            found.len(),
            1,
            "expected one problem containing {expected:?}, got {found:?}"
        );
        assert!(
            found[0].contains(expected),
            "expected {expected:?} in {found:?}"
        );
    }

    #[test]
    fn valid_minimal_stack_route() {
        assert_eq!(
            problems(sr(json!({"podSelector": {}, "rules": [rule(json!({}))]}))),
            Vec::<String>::new()
        );
    }

    #[test]
    fn structural_errors_name_their_field() {
        let cases = [
            (
                json!({"podSelector": {}, "rules": []}),
                "spec.rules: must have at least 1",
            ),
            (
                json!({"rules": [rule(json!({}))]}),
                "spec.podSelector: Required value",
            ),
            (
                json!({"podSelector": {}, "priority": 1001, "rules": [rule(json!({}))]}),
                "spec.priority: Invalid value 1001: must be at most 1000",
            ),
            (
                json!({"podSelector": {}, "rules": [rule(json!({"ports": [{"port": 70000}]}))]}),
                "spec.rules[0].ports[0].port: Invalid value 70000",
            ),
            (
                json!({"podSelector": {}, "rules": [rule(json!({"transport": {"stack": "Quic"}}))]}),
                "spec.rules[0].transport.stack: Unsupported value \"Quic\"",
            ),
            (
                json!({"podSelector": {}, "rules": [rule(json!({"locaton": "Any"}))]}),
                "spec.rules[0].locaton: unknown field",
            ),
            (
                json!({"podSelector": {}, "rules": [rule(json!({"name": "Bad_Name"}))]}),
                "spec.rules[0].name: Invalid value \"Bad_Name\"",
            ),
        ];
        for (spec, expected) in cases {
            assert_single(sr(spec), expected);
        }
    }

    #[test]
    fn cel_rules_report_clear_messages() {
        let cases = [
            (
                json!([rule(json!({"ports": [{"port": 90, "endPort": 80}]}))]),
                "endPort requires port and must be greater than or equal to it",
            ),
            (
                json!([rule(
                    json!({"to": [{"networks": ["10.0.0.0/8"], "entity": "World"}]})
                )]),
                "exactly one of pods, networks or entity",
            ),
            (
                json!([rule(json!({"to": [{}]}))]),
                "exactly one of pods, networks or entity",
            ),
            (
                json!([rule(json!({})), rule(json!({}))]),
                "rule names must be unique",
            ),
            (
                json!([rule(
                    json!({"isolation": "KernelEnforced", "transport": {"stack": "Kernel", "fallback": [{"stack": "Userspace"}]}})
                )]),
                "KernelEnforced allows only the Kernel stack",
            ),
            (
                json!([rule(
                    json!({"isolation": "Dedicated", "transport": {"stack": "Userspace", "fallback": [{"stack": "Kernel"}]}})
                )]),
                "Dedicated forbids the Kernel stack",
            ),
            (
                json!([rule(
                    json!({"transport": {"stack": "RDMA", "congestionControl": "BBR"}})
                )]),
                "RDMA takes no congestionControl",
            ),
            (
                json!([rule(
                    json!({"location": "External", "to": [{"entity": "World"}], "transport": {"stack": "RDMA"}})
                )]),
                "RDMA cannot reach External",
            ),
            (
                json!([rule(
                    json!({"location": "SameZone", "to": [{"networks": ["10.0.0.0/8"]}]})
                )]),
                "requires every peer in 'to' to be a pods peer",
            ),
            (
                json!([rule(json!({"location": "SameNode"}))]),
                "requires every peer in 'to' to be a pods peer",
            ),
            (
                json!([rule(json!({"to": [{"networks": ["10.0.0.0/33"]}]}))]),
                "networks must be CIDRs",
            ),
            (
                json!([rule(json!({"action": "Pass"}))]),
                "Pass is only allowed in a ClusterStackRoute",
            ),
        ];
        for (rules, expected) in cases {
            let found = problems(sr(json!({"podSelector": {}, "rules": rules})));
            assert!(
                found.iter().any(|p| p.contains(expected)),
                "expected {expected:?} in {found:?}"
            );
        }
    }

    #[test]
    fn cluster_stack_route_pass_and_subject() {
        let csr = |subject: Value, rules: Value| {
            json!({"apiVersion": "stackroute.dev/v1alpha1", "kind": "ClusterStackRoute",
                   "metadata": {"name": "c"}, "spec": {"tier": "Admin", "subject": subject, "rules": rules}})
        };
        let pass = json!([{"name": "skip", "action": "Pass", "to": [{"networks": ["fd00::/8"]}]}]);
        assert_eq!(
            problems(csr(json!({"namespaces": {}}), pass.clone())),
            Vec::<String>::new()
        );
        assert_single(
            csr(json!({}), pass.clone()),
            "subject must set exactly one of namespaces or pods",
        );
        assert_single(
            csr(
                json!({"namespaces": {}}),
                json!([{"name": "skip", "action": "Pass", "transport": {"stack": "Kernel"}}]),
            ),
            "transport is required on a Route rule and not allowed on a Pass rule",
        );
        assert_single(
            csr(json!({"namespaces": {}}), json!([{"name": "r"}])),
            "transport is required",
        );
    }

    #[test]
    fn metadata_is_checked() {
        let mut object = sr(json!({"podSelector": {}, "rules": [rule(json!({}))]}));
        object["metadata"]["name"] = json!("Not Valid");
        assert_single(object, "metadata.name: Invalid value");
    }
}
