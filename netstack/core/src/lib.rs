//! stackroute-netstack: a sans-IO user-space TCP/IP stack with BBR, CUBIC and NewReno.
//!
//! Layers, top down:
//! - [`Stack`] — the socket API (listen/accept/connect/read/write/shutdown/close, options,
//!   readiness events) plus Ethernet, ARP, IPv4 and ICMP; driven by [`Stack::poll`] with the
//!   current time and a [`Device`].
//! - `tcp` — one RFC 9293 connection: options, SACK, RACK-TLP, RFC 6298 timers, pacing.
//! - [`congestion`] — the [`congestion::Controller`] trait and its three algorithms.
//! - wire formats come from smoltcp's `wire` module (parse/emit of validated `Repr`s).
//!
//! Nothing here reads a clock, opens a socket or spawns a thread: the host loop (see the
//! `stackroute-netperf` crate) owns time and packet I/O. There is no `unsafe` code.
//!
//! ```
//! use stackroute_netstack::{Instant, Stack, StackConfig};
//! let config = StackConfig::new([2, 0, 0, 0, 0, 1], "10.0.0.1".parse().unwrap(), 24, [7; 16]);
//! let mut stack = Stack::new(config);
//! let listener = stack.listen(8080, 16).unwrap();
//! assert!(stack.accept(listener).is_err()); // nothing to accept yet
//! let _ = Instant::ZERO;
//! ```

#![forbid(unsafe_code)]

pub mod congestion;
#[doc(hidden)]
pub mod fuzzing;
mod isn;
mod phy;
mod seq;
pub mod sim;
mod stack;
pub mod tcp;
mod time;

pub use isn::IsnGenerator;
pub use phy::{Device, DeviceCapabilities, RxMeta};
pub use seq::Seq;
pub use stack::{
    Event, EventKind, Ipv6Config, ListenError, Readiness, SocketError, SocketHandle, SocketOption,
    Stack, StackConfig, StackStats,
};
pub use tcp::{ConnectionStats, Keepalive, State as TcpState, TcpConfig, TcpError};
pub use time::Instant;

/// Wire formats (re-exported from smoltcp) for engines and tests.
pub mod wire {
    pub use smoltcp::wire::*;
}
