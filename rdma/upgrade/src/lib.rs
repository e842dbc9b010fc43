//! The in-band RDMA upgrade between two stackroute shims, as SMC-R does it with its CLC
//! messages (`net/smc/smc_clc.h`): a connection that policy puts on RDMA starts as kernel TCP;
//! the client proposes on that connection, the server accepts or declines with a reason, the
//! client confirms or declines; on anything but a confirmed upgrade the same socket carries on
//! as TCP.
//!
//! Only these bytes ever precede the application's data, and only on a connection whose
//! server registered itself as a stackroute RDMA endpoint, so a program that is not under the
//! shim never sees them. Every message is [`MESSAGE_LEN`] bytes and starts with [`MAGIC`],
//! whose first byte (0xF5) never starts UTF-8 text, TLS, HTTP/2 or a Redis command.
//!
//! The exchange, and what each side strips from its stream:
//!
//! ```text
//! client                                  server
//!   PROPOSAL ───────────────────────────▶   (strips it; answers unless it already wrote)
//!            ◀─────────────── ACCEPT | DECLINE(reason)
//!   CONFIRM | DECLINE(reason) ──────────▶   (after an ACCEPT, no answer in time, or the
//!                                            server's bytes first; never after a DECLINE)
//! ```
//!
//! After its answer the server strips a final message if one comes first and takes anything
//! else for the application's bytes (none of those start with the magic); the client strips
//! an answer that arrives after it stopped waiting.
//!
//! No I/O, no clock: the shim peeks, reads and waits; this crate says what the bytes are and
//! what comes next.
#![forbid(unsafe_code)]

mod message;
mod reason;
mod side;

pub use message::{
    DecodeError, Endpoint, Kind, MAGIC, MESSAGE_LEN, Message, Prefix, VERSION, classify,
};
pub use reason::Reason;
pub use side::{ClientNext, Outcome, client_next, server_answer};

/// What an attempt that ended on RDMA is recorded as, beside the [`Reason`]s of those that
/// did not.
pub const UPGRADED: &str = "upgraded";
