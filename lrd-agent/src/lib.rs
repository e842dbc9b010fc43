//! `stackroute-lrd`, the node agent: receives this node's snapshots from a controller,
//! validates, persists and publishes them for local processes, and serves those processes on a
//! Unix socket.
//!
//! Layers:
//! - [`controller`]: the gRPC session (watch, apply, ack, reconnect with backoff).
//! - [`state`]: what the tasks share — the snapshot served, held registrations, metrics.
//! - [`files`]: atomic persistence in the state directory and publication in the socket
//!   directory (file layout in `stackroute_local_api::published`).
//! - [`local`]: the Unix socket (`stackroute_local_api::message`), with [`peer`] for caller
//!   identity and address ownership.
//! - [`registry`]: registrations held for local processes, persisted, withdrawn when their
//!   process exits.
//! - [`handover`]: passing the socket directory from a running agent to a new one;
//!   [`serving`]: the tasks it stops and restarts.
//! - [`instances`]: the user-space stack instances the agent starts per network namespace.
//! - [`caps`]: node capability discovery. [`metrics`]: `/metrics`, `/healthz`, `/readyz`.
//!
//! The only unsafe code is the shared mapping of the generation counter (`genmap`) and what an
//! instance's child process does before `exec` (`instances::sys`).

pub mod args;
pub mod caps;
pub mod controller;
pub mod files;
mod genmap;
pub mod handover;
pub mod hooks;
pub mod instances;
pub mod local;
pub mod metrics;
pub mod peer;
pub mod registry;
pub mod serving;
pub mod state;
pub mod upgrades;

pub use args::Args;
