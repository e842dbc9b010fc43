//! `libstackroute_rdma.so`: the shim's verbs provider on rdma-core. The shim `dlopen`s it
//! (`STACKROUTE_RDMA_PROVIDER`, which the injection webhook sets for RDMA pods) for its
//! capability probe (`stackroute_rdma_probe`, `nsocket-shim/src/sys/upgrade.rs`, answering
//! reason codes of `stackroute-rdma-upgrade`), and the pod's stack instance for the data path;
//! programs without RDMA never load libibverbs.
//!
//! - **Probe** (this build): the verbs devices (`ibv_get_device_list`), an active port with a
//!   non-zero GID (`ibv_query_port`, `ibv_query_gid`; RoCE v2 GIDs are addresses), and that a
//!   connection's buffers can be registered (`ibv_reg_mr` of [`PROBE_REGISTRATION`] bytes:
//!   `ENOMEM` is the locked-memory limit). Without the kernel's RDMA subsystem libibverbs
//!   answers `ENOSYS` and the probe says `no-device` with that reason.
//! - **Queue pair** ([`Prepared`], [`VerbsQueuePair`]): the data path's reliable-connected
//!   queue pair on the probed device and port. One registered region holds `window` receive
//!   and `window` send buffers of `buffer` bytes (the stream's [`Config`]); every message is a
//!   signaled SEND with immediate data into one of the peer's posted receive buffers;
//!   completions come through a non-blocking completion channel whose fd tells when to poll.
//!   [`Prepared::new`] creates it (INIT, receives posted), the two sides exchange
//!   [`Prepared::local`] endpoints, [`Prepared::connect`] brings it to RTS; it implements
//!   `stackroute_rdma_relay::QueuePair`, so a `Relay` carries a byte stream over it.
//! - **Data-path ABI** (`stackroute-rdma-provider`, in `provider.rs`): the pod's stack
//!   instance (`stackroute-stackd --rdma-provider`) opens, connects and drives queue pairs
//!   through this library.
#![deny(unsafe_code)]

mod provider;
mod queue_pair;
mod sys;

pub use queue_pair::{Prepared, VerbsQueuePair};
pub use stackroute_rdma_relay::Config;
use stackroute_rdma_upgrade::Reason;

/// Bytes registered by the probe: one connection's buffers. Registration pins memory against
/// `RLIMIT_MEMLOCK` (unless `CAP_IPC_LOCK`), the usual reason RDMA fails inside containers.
pub const PROBE_REGISTRATION: usize = 4 << 20;

/// What the probe found: the device, port and GID a connection would use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    /// The device's name (`mlx5_0`, `rxe0`, …).
    pub device: String,
    /// The port number.
    pub port: u8,
    /// The GID index.
    pub gid_index: i32,
    /// The GID.
    pub gid: [u8; 16],
}

/// Why the probe found nothing usable: the reason code and what exactly was missing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotUsable {
    /// The reason sent in a decline.
    pub reason: Reason,
    /// For people: which call said what.
    pub detail: String,
}

impl NotUsable {
    fn new(reason: Reason, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
        }
    }
}

/// The device, port and GID `stackroute-rdma-discover` chooses from sysfs: a RoCE v2 GID
/// carrying one of the addresses in `STACKROUTE_RDMA_ADDRESSES` (the pod's, set by the agent),
/// else the first RoCE v2 GID. `None` where sysfs says nothing usable (verbs decides then).
fn sysfs_choice() -> Result<Option<stackroute_rdma_discover::Usable>, NotUsable> {
    use stackroute_rdma_discover as discover;
    let preferred = discover::preferred_addresses()
        .map_err(|message| NotUsable::new(Reason::Other, message))?;
    Ok(discover::usable_for(&discover::discover(std::path::Path::new("/")), &preferred).ok())
}

/// `found` if its device lets a connection's buffers be registered.
fn registered(device: &sys::Device, found: Found) -> Result<Found, NotUsable> {
    match device.can_register(PROBE_REGISTRATION) {
        Ok(()) => Ok(found),
        Err(errno) if errno == libc::ENOMEM || errno == libc::EPERM => Err(NotUsable::new(
            Reason::Memlock,
            format!(
                "ibv_reg_mr of {PROBE_REGISTRATION} bytes on {}: errno {errno} (raise RLIMIT_MEMLOCK, e.g. LimitMEMLOCK=infinity for the container runtime, or run as root with IPC_LOCK)",
                found.device
            ),
        )),
        Err(errno) => Err(NotUsable::new(
            Reason::RdmaError,
            format!("ibv_alloc_pd/ibv_reg_mr on {}: errno {errno}", found.device),
        )),
    }
}

/// sysfs's `choice`, if verbs confirms it (the device opens, the port is active, the GID at
/// that index is the same): the device and what it found.
fn confirmed(
    devices: &sys::DeviceList,
    choice: &stackroute_rdma_discover::Usable,
) -> Option<(sys::Device, Found)> {
    let index = (0..devices.len()).find(|&i| devices.name(i) == choice.device)?;
    let device = devices.open(index).ok()?;
    let port = u8::try_from(choice.port).ok()?;
    let gid_index = i32::try_from(choice.gid_index).ok()?;
    device.active_port_gids(port)?;
    (device.gid(port, gid_index)? == choice.gid).then_some(())?;
    let found = Found {
        device: choice.device.clone(),
        port,
        gid_index,
        gid: choice.gid,
    };
    Some((device, found))
}

/// Looks for a usable device: [`sysfs_choice`]'s port and GID where verbs confirms it, else the
/// first active port with a non-zero GID; its device must let a connection's buffers be
/// registered.
pub fn probe() -> Result<Found, NotUsable> {
    let devices = sys::DeviceList::get().map_err(|errno| {
        NotUsable::new(
            Reason::NoDevice,
            format!(
                "ibv_get_device_list: {}{}",
                std::io::Error::from_raw_os_error(errno),
                if errno == libc::ENOSYS {
                    ": the kernel has no RDMA subsystem (CONFIG_INFINIBAND) or no RDMA driver is loaded"
                } else {
                    ""
                }
            ),
        )
    })?;
    if devices.is_empty() {
        return Err(NotUsable::new(
            Reason::NoDevice,
            "ibv_get_device_list: no RDMA devices (none visible to this process: a pod needs the RDMA device resource)",
        ));
    }
    if let Some((device, found)) = sysfs_choice()?.and_then(|c| confirmed(&devices, &c)) {
        return registered(&device, found);
    }
    let mut last = NotUsable::new(Reason::NoGid, "no device has an active port");
    for index in 0..devices.len() {
        let name = devices.name(index);
        let device = match devices.open(index) {
            Ok(device) => device,
            Err(errno) => {
                last = NotUsable::new(
                    Reason::NoDevice,
                    format!("ibv_open_device {name}: errno {errno}"),
                );
                continue;
            }
        };
        for port in 1..=device.port_count() {
            let Some(gid_count) = device.active_port_gids(port) else {
                continue;
            };
            let Some((gid_index, gid)) = (0..gid_count).find_map(|i| {
                device
                    .gid(port, i)
                    .filter(|g| *g != [0; 16])
                    .map(|g| (i, g))
            }) else {
                last = NotUsable::new(Reason::NoGid, format!("{name} port {port}: active, no GID"));
                continue;
            };
            let found = Found {
                device: name,
                port,
                gid_index,
                gid,
            };
            return registered(&device, found);
        }
    }
    Err(last)
}

/// The provider ABI's probe: 0 with this side's endpoint (the GID; QPN and PSN are 0: the
/// queue pair is created per connection, which the ABI's connect does not do yet), or a
/// reason code.
///
/// # Safety
///
/// `gid` must point to 16 writable bytes and `qpn`, `psn` to writable `u32`s.
#[unsafe(no_mangle)]
#[allow(unsafe_code)]
pub unsafe extern "C" fn stackroute_rdma_probe(gid: *mut u8, qpn: *mut u32, psn: *mut u32) -> u16 {
    match probe() {
        Ok(found) => {
            // SAFETY: the caller passes 16 writable bytes and two writable u32s (see above).
            unsafe {
                std::ptr::copy_nonoverlapping(found.gid.as_ptr(), gid, 16);
                *qpn = 0;
                *psn = 0;
            }
            0
        }
        Err(not_usable) => not_usable.reason.code(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a machine without the RDMA subsystem (this project's CI) the probe links, runs and
    /// says why; where devices exist it must find one or name what is missing.
    #[test]
    fn the_probe_explains_itself() {
        let class = std::path::Path::new("/sys/class/infiniband");
        let has_devices = std::fs::read_dir(class).is_ok_and(|mut d| d.next().is_some());
        match probe() {
            Ok(found) => {
                assert!(has_devices, "found {found:?} without /sys/class/infiniband");
                assert_ne!(found.gid, [0; 16]);
            }
            Err(not_usable) if !has_devices => {
                assert_eq!(not_usable.reason, Reason::NoDevice, "{not_usable:?}");
                assert!(
                    not_usable.detail.starts_with("ibv_get_device_list: "),
                    "{not_usable:?}"
                );
            }
            Err(not_usable) => assert!(!not_usable.detail.is_empty()),
        }
    }
}
