//! The verbs probe on a real RDMA device (RoCE NIC, or `rdma link add rxe0 type rxe netdev
//! eth0` on a kernel with `rdma_rxe`). Without one the trial shows as ignored with what the
//! probe said, and fails under `STACKROUTE_REQUIRE_RDMA=1`.

use stackroute_rdma::{Found, probe};
use stackroute_rdma_upgrade::Reason;
use testkit::{Ignored, Trial};

const REQUIRE: &str = "STACKROUTE_REQUIRE_RDMA";

fn device() -> Result<Found, Ignored> {
    match probe() {
        Ok(found) => Ok(found),
        Err(not_usable) if std::env::var(REQUIRE).is_ok_and(|v| v == "1") => {
            panic!(
                "{REQUIRE}=1 but no usable RDMA device: {}",
                not_usable.detail
            )
        }
        Err(not_usable) => Err(Ignored::new(format!(
            "no usable RDMA device ({}: {})",
            not_usable.reason, not_usable.detail
        ))),
    }
}

fn main() -> std::process::ExitCode {
    testkit::run(vec![Trial::gated(
        "the_probe_finds_the_port_and_gid_sysfs_shows",
        device,
        |found| {
            // The verbs answer agrees with the kernel's sysfs view (the agent's discovery).
            let discovery = stackroute_rdma_discover::discover(std::path::Path::new("/"));
            let port = discovery
                .devices
                .iter()
                .find(|d| d.name == found.device)
                .and_then(|d| d.ports.iter().find(|p| p.number == u32::from(found.port)))
                .unwrap_or_else(|| panic!("{found:?} is not in sysfs: {discovery:?}"));
            assert!(port.state.contains("ACTIVE"), "{port:?}");
            let gid = port
                .gids
                .iter()
                .find(|g| g.index == found.gid_index as u32)
                .unwrap_or_else(|| panic!("GID {} of {port:?}", found.gid_index));
            assert_eq!(
                stackroute_rdma_discover::parse_gid(&gid.gid),
                Some(found.gid)
            );
            // The provider ABI answers the same GID, and no connect in this build.
            let (mut raw, mut qpn, mut psn) = ([0u8; 16], 1u32, 1u32);
            // SAFETY: 16 writable bytes and two writable u32s, as the ABI requires.
            let code = unsafe {
                stackroute_rdma::stackroute_rdma_probe(raw.as_mut_ptr(), &raw mut qpn, &raw mut psn)
            };
            assert_eq!((code, raw), (0, found.gid));
            // SAFETY: 16 readable bytes.
            let code = unsafe { stackroute_rdma::stackroute_rdma_connect(raw.as_ptr(), 0, 0, 10) };
            assert_eq!(code, Reason::StackUnavailable.code());
        },
    )])
}
