//! The `stackroute.dev/v1alpha1` API.
//!
//! [`StackRoute`] and [`ClusterStackRoute`] are defined once, here, with kube's
//! `CustomResource` derive. The CRD printed by `stackroute crd`, the API server's structural
//! schema and CEL rules, and the offline checks of `stackroute validate` ([`validate`]) all come
//! from these types, so the CLI and the API server cannot disagree.
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

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// Both CRDs, in the order they are installed.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![StackRoute::crd(), ClusterStackRoute::crd()]
}

/// The CRDs as one multi-document YAML stream, as `stackroute crd` prints them.
pub fn crds_yaml() -> String {
    let mut out = String::new();
    for crd in crds() {
        out.push_str("---\n");
        // A derived CRD is plain data; serializing it cannot fail.
        out.push_str(&yaml_serde::to_string(&crd).expect("CRD serializes to YAML"));
    }
    out
}
