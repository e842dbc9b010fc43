//! The RDMA data path's driver: [`Relay`] moves an application's bytes between its socket end
//! (one end of an `AF_UNIX` stream socketpair, as for the user-space stack, so epoll, `fork`
//! and `exec` see an ordinary socket) and a connected RC [`QueuePair`], through the credit
//! protocol of `stackroute-rdma-stream`.
//!
//! The queue pair is a trait: `stackroute-rdma-verbs` implements it on rdma-core (registered
//! rings, completion channel); [`emulated`] implements it over a socketpair, with faults, for
//! tests where no RDMA device exists — it never counts as RDMA working.
#![deny(unsafe_code)]

pub mod emulated;
mod queue_pair;
mod relay;
#[cfg(feature = "testing")]
pub mod testing;

pub use queue_pair::{QueuePair, QueuePairError, Received};
pub use relay::{CONTROL_GRACE, Counters, End, PROTOCOL_V1, Relay};
pub use stackroute_rdma_stream::Config;
