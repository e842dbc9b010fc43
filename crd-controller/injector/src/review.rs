//! AdmissionReview v1: reading a request, writing a response.

use base64::Engine as _;
use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};

/// `apiVersion` of the only AdmissionReview version served.
pub const API_VERSION: &str = "admission.k8s.io/v1";
/// `kind` of an AdmissionReview.
pub const KIND: &str = "AdmissionReview";

/// The parts of an AdmissionRequest the webhook uses.
#[derive(Clone, Debug)]
pub struct Request {
    /// `request.uid`, echoed in the response.
    pub uid: String,
    /// `request.operation` (`CREATE`, `UPDATE`, …).
    pub operation: String,
    /// `request.subResource`, if any.
    pub sub_resource: Option<String>,
    /// The pod's namespace (`request.namespace`, else `object.metadata.namespace`).
    pub namespace: String,
    /// `request.object`, parsed for `CREATE`.
    pub pod: Option<Pod>,
    /// `request.dryRun`.
    pub dry_run: bool,
}

/// Why a body is not an answerable pod review.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Invalid {
    /// No `request.uid` to answer to: HTTP 400.
    NoUid(String),
    /// A review with a UID but unusable content: an AdmissionReview error response.
    Review {
        /// `request.uid`.
        uid: String,
        /// What is wrong.
        message: String,
    },
}

impl Invalid {
    /// The message.
    pub fn message(&self) -> &str {
        match self {
            Self::NoUid(message) | Self::Review { message, .. } => message,
        }
    }
}

/// Parses an AdmissionReview v1 of a Pod.
pub fn parse(body: &[u8]) -> Result<Request, Invalid> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| Invalid::NoUid(format!("malformed JSON: {e}")))?;
    let Some(review) = value.as_object() else {
        return Err(Invalid::NoUid("the body is not a JSON object".into()));
    };
    let request = review.get("request").and_then(Value::as_object);
    let uid = request
        .and_then(|r| r.get("uid"))
        .and_then(Value::as_str)
        .filter(|uid| !uid.is_empty())
        .ok_or_else(|| Invalid::NoUid("no request.uid".into()))?
        .to_string();
    let request = request.expect("a uid implies a request");
    let invalid = |message: String| Invalid::Review {
        uid: uid.clone(),
        message,
    };

    let api_version = review.get("apiVersion").and_then(Value::as_str);
    let kind = review.get("kind").and_then(Value::as_str);
    if api_version != Some(API_VERSION) || kind != Some(KIND) {
        return Err(invalid(format!(
            "expected apiVersion {API_VERSION} kind {KIND}, got {} {}",
            api_version.unwrap_or("(none)"),
            kind.unwrap_or("(none)")
        )));
    }
    let gvk = request.get("kind");
    let field = |name: &str| gvk.and_then(|k| k.get(name)).and_then(Value::as_str);
    if field("group") != Some("") || field("version") != Some("v1") || field("kind") != Some("Pod")
    {
        return Err(invalid(format!(
            "only core/v1 Pods are injected, got {}",
            gvk.map_or_else(|| "no request.kind".to_string(), Value::to_string)
        )));
    }
    let operation = request
        .get("operation")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("no request.operation".into()))?
        .to_string();
    let sub_resource = request
        .get("subResource")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_string);
    let dry_run = request
        .get("dryRun")
        .and_then(Value::as_bool)
        .unwrap_or(false);

    let pod = if operation == "CREATE" && sub_resource.is_none() {
        let object = request
            .get("object")
            .filter(|o| !o.is_null())
            .ok_or_else(|| invalid("CREATE without request.object".into()))?;
        if object
            .get("kind")
            .and_then(Value::as_str)
            .is_some_and(|k| k != "Pod")
        {
            return Err(invalid("request.object is not a Pod".into()));
        }
        let pod: Pod = serde_json::from_value(object.clone())
            .map_err(|e| invalid(format!("request.object is not a valid Pod: {e}")))?;
        Some(pod)
    } else {
        None
    };
    let namespace = request
        .get("namespace")
        .and_then(Value::as_str)
        .filter(|ns| !ns.is_empty())
        .map(str::to_string)
        .or_else(|| pod.as_ref().and_then(|p| p.metadata.namespace.clone()))
        .unwrap_or_default();
    if pod.is_some() && namespace.is_empty() {
        return Err(invalid("no request.namespace".into()));
    }
    Ok(Request {
        uid,
        operation,
        sub_resource,
        namespace,
        pod,
        dry_run,
    })
}

fn review(response: Value) -> Value {
    json!({"apiVersion": API_VERSION, "kind": KIND, "response": response})
}

/// An allowing response, with the JSONPatch when `ops` is not empty.
pub fn allow(uid: &str, ops: &[Value], warnings: &[String]) -> Value {
    let mut response = json!({"uid": uid, "allowed": true});
    if !ops.is_empty() {
        let bytes = serde_json::to_vec(ops).expect("patch operations serialize");
        response["patch"] = base64::engine::general_purpose::STANDARD
            .encode(bytes)
            .into();
        response["patchType"] = "JSONPatch".into();
    }
    if !warnings.is_empty() {
        response["warnings"] = json!(warnings);
    }
    review(response)
}

/// A refusing response for a review that cannot be handled (`status.code` 400).
pub fn reject(uid: &str, message: &str) -> Value {
    review(json!({
        "uid": uid,
        "allowed": false,
        "status": {
            "status": "Failure",
            "code": 400,
            "reason": "BadRequest",
            "message": format!("stackroute injector: {message}"),
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mk_review(object: Value) -> Value {
        json!({
            "apiVersion": API_VERSION, "kind": KIND,
            "request": {
                "uid": "u-1",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": "app", "operation": "CREATE",
                "userInfo": {"username": "x"},
                "object": object
            }
        })
    }

    #[test]
    fn parses_a_pod_review() {
        let body = mk_review(
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"generateName": "w-"}, "spec": {"containers": [{"name": "c"}]}}),
        );
        let request = parse(body.to_string().as_bytes()).unwrap();
        assert_eq!(request.uid, "u-1");
        assert_eq!(request.namespace, "app");
        assert!(request.pod.is_some());
    }

    #[test]
    fn rejects_garbage() {
        assert!(matches!(parse(b"{"), Err(Invalid::NoUid(_))));
        assert!(matches!(parse(b"[]"), Err(Invalid::NoUid(_))));
        assert!(matches!(parse(b"{\"request\":{}}"), Err(Invalid::NoUid(_))));
        let mut v1beta1 = mk_review(json!({}));
        v1beta1["apiVersion"] = "admission.k8s.io/v1beta1".into();
        assert!(matches!(
            parse(v1beta1.to_string().as_bytes()),
            Err(Invalid::Review { .. })
        ));
        let mut service = mk_review(json!({"kind": "Service"}));
        service["request"]["kind"]["kind"] = "Service".into();
        assert!(matches!(
            parse(service.to_string().as_bytes()),
            Err(Invalid::Review { .. })
        ));
        let bad_pod = mk_review(json!({"spec": {"containers": "no"}}));
        assert!(matches!(
            parse(bad_pod.to_string().as_bytes()),
            Err(Invalid::Review { .. })
        ));
    }

    #[test]
    fn responses() {
        let ok = allow("u", &[json!({"op": "add", "path": "/a", "value": 1})], &[]);
        assert_eq!(ok["response"]["patchType"], "JSONPatch");
        assert!(ok["response"]["patch"].is_string());
        let none = allow("u", &[], &["w".into()]);
        assert!(none["response"].get("patch").is_none());
        assert_eq!(none["response"]["warnings"][0], "w");
        let no = reject("u", "bad");
        assert_eq!(no["response"]["allowed"], false);
        assert_eq!(no["response"]["status"]["code"], 400);
    }
}
