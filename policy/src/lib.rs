//! The policy engine: cluster state in, per-node snapshots and explanations out.
//!
//! - [`state`] loads Kubernetes YAML (Namespaces, Nodes, Pods, Services, EndpointSlices —
//!   `discovery.k8s.io/v1`, or `v1beta1` as Kubernetes < 1.21 serves them —, StackRoutes,
//!   ClusterStackRoutes, NetworkPolicies) into a [`ClusterState`], reporting bad objects with
//!   file and line and keeping the rest.
//! - [`compile`] orders policies deterministically, evaluates selectors through a label index,
//!   gates kernel-bypass stacks by NetworkPolicy ([`netpol`]), and encodes per-node snapshots
//!   ([`stackroute_snapshot`]).
//! - [`explain`] runs the snapshot's own lookup with a trace, so an explanation can never
//!   disagree with what the shim does.
//!
//! No I/O and no clock reads: callers pass text in and get bytes and values out.
#![forbid(unsafe_code)]

pub mod compile;
pub mod explain;
pub mod netpol;
pub mod selector;
pub mod shadow;
pub mod state;
pub mod subject;

pub use compile::{Compiled, PolicyProblem, Settings, map_on_all_cores};
pub use explain::{Explanation, explain, explain_in_snapshot};
pub use state::{ClusterState, LoadProblem};
pub use subject::SubjectSelector;
