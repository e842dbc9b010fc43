//! `libnsocket.so`: the `LD_PRELOAD` shim. It interposes the socket calls where a connection's
//! transport is decided (`connect`, the first `sendto`/`sendmsg`/`sendmmsg` of an unconnected
//! UDP socket, `listen`) and the calls that create, copy and close descriptors (so a decision
//! stays pinned to its socket), looks each connection up in the node agent's memory-mapped
//! snapshot, and applies the transport: today the kernel, with the rule's TCP congestion
//! control. See README.md for what is and is not intercepted.
//!
//! Layout: `hooks` (the exported C ABI, one list) and `sys` (every system call and raw
//! pointer) hold all the unsafe code; `logic`, `relay`, `epollreg`, `reader`, `fdtable`,
//! `counters`, `agent` and `config` are safe. `src/entry.c` holds what stable Rust cannot define: the variadic
//! `fcntl`/`fcntl64` and the load/exit hooks.
#![cfg_attr(test, allow(dead_code))]

mod agent;
mod config;
mod counters;
mod epollreg;
mod fdtable;
#[cfg(not(test))]
mod hooks;
mod logic;
mod reader;
mod relay;
mod sys;
mod upgrade;
