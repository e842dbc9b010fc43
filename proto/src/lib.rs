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

/// Largest message either side accepts: a snapshot of a large node plus the listener registry.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
