//! The data-path ABI of RDMA verbs providers. A provider is a shared library
//! (`libstackroute_rdma.so` on rdma-core, `libstackroute_rdma_fault.so` for tests) loaded with
//! `dlopen` by the pod's stack instance, so that only processes that relay RDMA connections
//! load libibverbs, and a test build can stand in for the verbs where no device exists.
//!
//! The C functions ([`abi`]): open a queue pair (its endpoint goes into the upgrade exchange),
//! connect it to the peer's endpoint, then the [`QueuePair`](stackroute_rdma_relay::QueuePair)
//! operations and close. [`Library`] loads a provider and hands out queue pairs the relay
//! drives; [`export!`] implements the functions for a provider written in Rust on top of
//! [`Provider`].
#![deny(unsafe_code)]

pub mod abi;
mod export;
mod load;

pub use export::{Provider, Refusal};
pub use load::{Library, LoadedQueuePair, OpenedQueuePair};

#[doc(hidden)]
pub use export::raw as __export;
