//! The network-namespace end-to-end harness: hosts as network namespaces joined by veth pairs,
//! the standalone controller and one agent per node, real applications under the shim, and
//! what the kernel says about their connections. See `e2e/README.md`.

pub mod cluster;
pub mod net;
pub mod proc;
pub mod ss;
pub mod tools;
pub mod tun;
