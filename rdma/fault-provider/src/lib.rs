//! `libstackroute_rdma_fault.so`: a verbs provider for tests (`STACKROUTE_RDMA_PROVIDER`), with
//! the provider ABI of the shim (`nsocket-shim/src/sys/upgrade.rs`) and no verbs behind it. It
//! answers what `STACKROUTE_RDMA_FAULTS` names, read at each call:
//!
//! - `probe=ok|no-device|no-gid|memlock|rdma-error` — this side's capability (default
//!   `no-device`); `ok` answers a fixed link-local GID, the pid as queue pair, PSN 1;
//! - `connect=error|hang|ok` — the RDMA connect (default `error`): `rdma-error` at once; `hang`
//!   waits out the whole `timeout_ms` it is given, then `connect-timeout`; `ok` says connected,
//!   which the shim (having no data path) still declines as `stack-unavailable`.
//!
//! It exists to drive the shim's negotiation and fallback paths where no RDMA device exists;
//! nothing it does counts as RDMA working.

use std::time::Duration;

use stackroute_rdma_upgrade::Reason;

/// The fault named for `key` in `STACKROUTE_RDMA_FAULTS` (`key=value,…`).
fn fault(key: &str) -> Option<String> {
    std::env::var("STACKROUTE_RDMA_FAULTS")
        .ok()?
        .split(',')
        .find_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            (k.trim() == key).then(|| v.trim().to_string())
        })
}

/// The GID `probe=ok` answers: fe80::5352:4641:554c:5401 ("SRFAULT" in hex, roughly).
const GID: [u8; 16] = [
    0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0x53, 0x52, 0x46, 0x41, 0x55, 0x4c, 0x54, 0x01,
];

/// `stackroute_rdma_probe(gid[16], *qpn, *psn)`: 0 with the endpoint, or a reason code.
///
/// # Safety
///
/// `gid` must point to 16 writable bytes and `qpn`, `psn` to writable `u32`s (the provider ABI).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn stackroute_rdma_probe(gid: *mut u8, qpn: *mut u32, psn: *mut u32) -> u16 {
    let answer = fault("probe").unwrap_or_else(|| "no-device".into());
    if answer != "ok" {
        return Reason::from_name(&answer).unwrap_or(Reason::Other).code();
    }
    // SAFETY: the caller passes 16 writable bytes and two writable u32s (see above).
    unsafe {
        std::ptr::copy_nonoverlapping(GID.as_ptr(), gid, GID.len());
        *qpn = std::process::id();
        *psn = 1;
    }
    0
}

/// `stackroute_rdma_connect(gid[16], qpn, psn, timeout_ms)`: 0 when connected, or a reason
/// code; returns within `timeout_ms`.
///
/// # Safety
///
/// `gid` must point to 16 readable bytes (it is not read here).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn stackroute_rdma_connect(
    _gid: *const u8,
    _qpn: u32,
    _psn: u32,
    timeout_ms: u32,
) -> u16 {
    match fault("connect").as_deref() {
        Some("ok") => 0,
        Some("hang") => {
            std::thread::sleep(Duration::from_millis(u64::from(timeout_ms)));
            Reason::ConnectTimeout.code()
        }
        _ => Reason::RdmaError.code(),
    }
}
