//! The gRPC contract between the stackroute controller and its node agents (LRD), generated
//! from `proto/stackroute/v1alpha1/distribution.proto` by tonic.
//!
//! Use [`v1alpha1::distribution_client::DistributionClient`] in agents and tools and
//! [`v1alpha1::distribution_server::DistributionServer`] in the controller.
#![forbid(unsafe_code)]

/// API version `v1alpha1`.
#[allow(
    missing_docs,
    unreachable_pub,
    unused_qualifications,
    clippy::all,
    clippy::pedantic
)]
pub mod v1alpha1 {
    tonic::include_proto!("stackroute.v1alpha1");
}

pub mod client;
pub mod identity;
pub mod validate;

/// Largest message an agent accepts from the controller: a snapshot of a large node plus the
/// listener registry.
pub const MAX_UPDATE_BYTES: usize = 64 * 1024 * 1024;

/// Largest message the controller accepts from anyone: every request (a registration, an ack,
/// a capability report) is a few KiB at most, so a caller cannot make it buffer more.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
