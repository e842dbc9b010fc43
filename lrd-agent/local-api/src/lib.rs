//! The node agent's local API: what local processes (the `LD_PRELOAD` shim, `stackroute run`,
//! `stackroute explain --agent`) exchange with `stackroute-lrd` on one node.
//!
//! - [`message`]: the requests and replies on the agent's Unix socket (`DIR/agent.sock`).
//! - [`frame`]: their framing — a little-endian `u32` length, then that many bytes of JSON, at
//!   most [`frame::MAX_FRAME`] bytes — with blocking helpers over `std::io`.
//! - [`relay`]: the user-space stack instance's control socket (connections relayed for the
//!   shim, their status, `stackroute connections`).
//! - [`published`]: the layout of the files the agent publishes in its socket directory (the
//!   memory-mappable snapshot with its header, and the generation counter), and the names of
//!   those files.
//!
//! This crate is linked into the shim, which runs inside arbitrary processes: it uses only `std`,
//! `serde` and `serde_json`, starts no threads, holds no global state and does no I/O of its own
//! beyond the stream a caller hands it. No async runtime, no unsafe code.
//!
//! ```
//! use stackroute_local_api::frame::{decode, encode};
//! use stackroute_local_api::message::{Request, FallbackReason};
//!
//! let request = Request::FallbackReport { reason: FallbackReason::NoCapability, count: 2 };
//! let bytes = encode(&request).unwrap();
//! assert_eq!(u32::from_le_bytes(bytes[..4].try_into().unwrap()) as usize, bytes.len() - 4);
//! let back: Request = decode(&bytes[4..]).unwrap();
//! assert_eq!(back, request);
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod frame;
pub mod message;
pub mod published;
pub mod relay;

pub use frame::{FrameError, MAX_FRAME};
pub use message::{Request, Response};
