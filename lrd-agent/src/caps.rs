//! Node capability discovery: congestion controls (BBR available / allowed), AF_XDP, DPDK
//! (library version, PMDs, devices bound for user space, VFIO, hugepage size, why it is not
//! fully usable), RDMA (devices, ports, typed GIDs, /dev/infiniband nodes, why it is unusable:
//! read by [`stackroute_rdma_discover`], which the shim shares; here made report messages within
//! the controller's bounds), the memlock limit, hugepages. Each probe reads files or tries a
//! socket and reports "absent" on any error; none can fail the agent.

use std::path::{Path, PathBuf};

use stackroute_proto::v1alpha1::{
    DpdkCapability, DpdkDevice, NodeCapabilities, RdmaDevice, RdmaGid, RdmaPort,
};
use stackroute_proto::validate::{MAX_DPDK_LIST, MAX_NAME};
use stackroute_rdma_discover::{self as rdma_discover, Discovery};
use tracing::{info, warn};

/// `AF_XDP` (linux/socket.h).
const AF_XDP: i32 = 44;

/// Discovers this node's capabilities.
pub fn discover(node: &str) -> NodeCapabilities {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let (hugepages_total, hugepages_free) = parse_hugepages(&read("/proc/meminfo"));
    let rdma = rdma(Path::new("/"));
    let dpdk = dpdk_capability(Path::new("/"));
    let (memlock_soft, memlock_hard) = memlock();
    if rdma.devices_left_out > 0 {
        warn!(
            left_out = rdma.devices_left_out,
            "RDMA devices left out of the capability report (too many entries)"
        );
    }
    let capabilities = NodeCapabilities {
        node: node.to_string(),
        available_congestion_control: parse_words(&read(
            "/proc/sys/net/ipv4/tcp_available_congestion_control",
        )),
        allowed_congestion_control: parse_words(&read(
            "/proc/sys/net/ipv4/tcp_allowed_congestion_control",
        )),
        af_xdp: af_xdp(),
        dpdk: !dpdk.version.is_empty(),
        rdma_devices: rdma.devices,
        hugepages_total,
        hugepages_free,
        memlock_soft,
        memlock_hard,
        rdma_cm_device: rdma.rdma_cm_device,
        uverbs_devices: rdma.uverbs_devices,
        rdma_unavailable_reason: rdma.unavailable_reason,
        dpdk_detail: Some(dpdk.clone()),
    };
    info!(
        available_cc = ?capabilities.available_congestion_control,
        allowed_cc = ?capabilities.allowed_congestion_control,
        af_xdp = capabilities.af_xdp,
        dpdk = capabilities.dpdk,
        dpdk_version = %dpdk.version,
        dpdk_pmds = dpdk.pmds.len(),
        dpdk_devices = %dpdk_devices_text(&dpdk.bound_devices),
        vfio = dpdk.vfio,
        dpdk_unavailable_reason = %dpdk.unavailable_reason,
        rdma_devices = capabilities.rdma_devices.len(),
        rdma = %rdma_summary(&capabilities.rdma_devices),
        rdma_cm = capabilities.rdma_cm_device,
        uverbs = ?capabilities.uverbs_devices,
        rdma_unavailable_reason = %capabilities.rdma_unavailable_reason,
        memlock_soft = %limit_text(memlock_soft),
        memlock_hard = %limit_text(memlock_hard),
        hugepages_total,
        hugepages_free,
        hugepage_size_kib = dpdk.hugepage_size_kib,
        "node capabilities"
    );
    capabilities
}

/// A limit for logs: bytes, or "unlimited" for `u64::MAX`.
fn limit_text(bytes: u64) -> String {
    if bytes == u64::MAX {
        "unlimited".into()
    } else {
        bytes.to_string()
    }
}

/// Whether `list` (a capability list) contains BBR.
pub fn has_bbr(list: &[String]) -> bool {
    list.iter().any(|cc| cc == "bbr")
}

/// A whitespace-separated list, as in `tcp_*_congestion_control`.
pub fn parse_words(text: &str) -> Vec<String> {
    text.split_whitespace().map(str::to_string).collect()
}

/// `HugePages_Total` and `HugePages_Free` from `/proc/meminfo` (0 when missing).
pub fn parse_hugepages(meminfo: &str) -> (u64, u64) {
    (
        meminfo_field(meminfo, "HugePages_Total"),
        meminfo_field(meminfo, "HugePages_Free"),
    )
}

/// The number of a `/proc/meminfo` line (`Hugepagesize:       2048 kB` → 2048), 0 when missing.
fn meminfo_field(meminfo: &str, name: &str) -> u64 {
    meminfo
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|value| value.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Whether the kernel lets us create an AF_XDP socket (the socket is closed at once).
pub fn af_xdp() -> bool {
    socket2::Socket::new(socket2::Domain::from(AF_XDP), socket2::Type::RAW, None).is_ok()
}

/// Library directories DPDK is looked for in, relative to the root, in this order.
const DPDK_LIB_DIRS: &[&str] = &[
    "usr/lib/x86_64-linux-gnu",
    "usr/lib/aarch64-linux-gnu",
    "usr/lib64",
    "usr/lib",
    "usr/local/lib",
    "usr/local/lib64",
    "usr/local/lib/x86_64-linux-gnu",
];

/// The drivers a PCI device is bound to for DPDK's PCI PMDs to drive it from user space.
const DPDK_DEVICE_DRIVERS: &[&str] = &["vfio-pci", "uio_pci_generic", "igb_uio"];

/// `unavailable_reason` of a node without a DPDK library.
pub const DPDK_MISSING: &str = "no DPDK library (install libdpdk-dev dpdk)";
/// `unavailable_reason` of a node with DPDK but neither hugepages nor a bound device: the engine
/// still runs, on virtual devices (memif, af_packet, ...) with `--no-huge`.
pub const DPDK_VDEVS_ONLY: &str =
    "no hugepages and no device bound to vfio-pci/uio: virtual devices only (--no-huge)";

/// Whether DPDK is installed on this node: `librte_eal.so*` or `pkgconfig/libdpdk.pc` in a
/// library directory (as `NodeCapabilities.dpdk` reports it).
pub fn dpdk() -> bool {
    dpdk_install(Path::new("/")).is_some()
}

/// A DPDK installation: the library directory holding it, and its version.
struct DpdkInstall {
    lib_dir: PathBuf,
    version: String,
}

/// The first library directory under `root` with `librte_eal.so*` or `pkgconfig/libdpdk.pc`.
/// Its version is the `.pc` file's `Version:`, else the EAL's ABI from its file name
/// (`librte_eal.so.23` → "ABI 23"), else "unknown".
fn dpdk_install(root: &Path) -> Option<DpdkInstall> {
    DPDK_LIB_DIRS.iter().find_map(|dir| {
        let lib_dir = root.join(dir);
        let pc = lib_dir.join("pkgconfig/libdpdk.pc");
        let eal: Vec<String> = file_names(&lib_dir)
            .into_iter()
            .filter(|name| name.starts_with("librte_eal.so"))
            .collect();
        if eal.is_empty() && !pc.is_file() {
            return None;
        }
        let from_pc = std::fs::read_to_string(&pc).ok().and_then(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix("Version:"))
                .map(str::trim)
                .filter(|version| !version.is_empty() && version.len() <= MAX_NAME)
                .map(str::to_string)
        });
        let abi = || {
            eal.iter()
                .filter_map(|name| {
                    name.strip_prefix("librte_eal.so.")?
                        .split('.')
                        .next()?
                        .parse::<u32>()
                        .ok()
                })
                .max()
                .map(|abi| format!("ABI {abi}"))
        };
        let version = from_pc.or_else(abi).unwrap_or_else(|| "unknown".into());
        Some(DpdkInstall { lib_dir, version })
    })
}

/// DPDK on the node whose filesystem is at `root` (`/` on a node): the installed library
/// ([`dpdk_install`]), the PMDs it ships as plugins, PCI devices bound to a user-space I/O
/// driver, `/dev/vfio/vfio`, the hugepage size, and why it is not (fully) usable. Files only:
/// nothing is loaded.
pub fn dpdk_capability(root: &Path) -> DpdkCapability {
    let install = dpdk_install(root);
    let meminfo = std::fs::read_to_string(root.join("proc/meminfo")).unwrap_or_default();
    let bound_devices = dpdk_bound_devices(root);
    let unavailable_reason = if install.is_none() {
        DPDK_MISSING
    } else if meminfo_field(&meminfo, "HugePages_Total") == 0 && bound_devices.is_empty() {
        DPDK_VDEVS_ONLY
    } else {
        ""
    };
    DpdkCapability {
        pmds: install
            .as_ref()
            .map(|install| dpdk_pmds(&install.lib_dir))
            .unwrap_or_default(),
        version: install.map(|install| install.version).unwrap_or_default(),
        bound_devices,
        vfio: root.join("dev/vfio/vfio").exists(),
        unavailable_reason: unavailable_reason.into(),
        hugepage_size_kib: meminfo_field(&meminfo, "Hugepagesize"),
    }
}

/// PMD names of the plugins in `LIB_DIR/dpdk/pmds-*/` (`librte_net_memif.so.23.0` →
/// `net_memif`), sorted, without duplicates, at most [`MAX_DPDK_LIST`].
fn dpdk_pmds(lib_dir: &Path) -> Vec<String> {
    let plugins = lib_dir.join("dpdk");
    let mut pmds: Vec<String> = file_names(&plugins)
        .into_iter()
        .filter(|dir| dir.starts_with("pmds-"))
        .flat_map(|dir| file_names(&plugins.join(dir)))
        .filter_map(|file| {
            let (name, version) = file.strip_prefix("librte_")?.split_once(".so")?;
            let library = version.is_empty() || version.starts_with('.');
            (library && !name.is_empty() && name.len() <= MAX_NAME).then(|| name.to_string())
        })
        .collect();
    pmds.sort_unstable();
    pmds.dedup();
    pmds.truncate(MAX_DPDK_LIST);
    pmds
}

/// PCI devices in `sys/bus/pci/drivers/{vfio-pci,uio_pci_generic,igb_uio}/`, by address, at
/// most [`MAX_DPDK_LIST`] (the drivers' other entries, `bind`, `new_id`, ..., are not devices).
fn dpdk_bound_devices(root: &Path) -> Vec<DpdkDevice> {
    let drivers = root.join("sys/bus/pci/drivers");
    let mut devices: Vec<DpdkDevice> = DPDK_DEVICE_DRIVERS
        .iter()
        .flat_map(|driver| {
            file_names(&drivers.join(driver))
                .into_iter()
                .filter(|name| is_pci_address(name))
                .map(|pci_address| DpdkDevice {
                    pci_address,
                    driver: driver.to_string(),
                })
        })
        .collect();
    devices.sort_by(|a, b| a.pci_address.cmp(&b.pci_address));
    devices.truncate(MAX_DPDK_LIST);
    devices
}

/// Whether `name` is a PCI address as sysfs writes it: `DOMAIN:BUS:DEVICE.FUNCTION` in hex
/// (`0000:03:00.0`; the domain may be longer than 4 digits).
fn is_pci_address(name: &str) -> bool {
    let hex = |text: &str, digits: std::ops::RangeInclusive<usize>| {
        digits.contains(&text.len()) && text.bytes().all(|b| b.is_ascii_hexdigit())
    };
    let Some((slot, function)) = name.rsplit_once('.') else {
        return false;
    };
    let parts: Vec<&str> = slot.split(':').collect();
    matches!(parts.as_slice(), [domain, bus, device]
        if hex(domain, 4..=8) && hex(bus, 2..=2) && hex(device, 2..=2))
        && matches!(function.as_bytes(), [b'0'..=b'7'])
}

/// Bound devices for logs: `0000:03:00.0=vfio-pci 0000:04:00.0=igb_uio`.
pub fn dpdk_devices_text(devices: &[DpdkDevice]) -> String {
    devices
        .iter()
        .map(|d| format!("{}={}", d.pci_address, d.driver))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The UTF-8 names in `dir` (none when it cannot be read).
fn file_names(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

pub use stackroute_proto::validate::{MAX_RDMA_ENTRIES, rdma_entries};

/// `/dev/infiniband/uverbsN` names reported (one per RDMA device, so rarely more than a few).
pub const MAX_UVERBS_DEVICES: usize = 64;

/// What the agent can tell about RDMA on this node.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rdma {
    pub devices: Vec<RdmaDevice>,
    pub rdma_cm_device: bool,
    pub uverbs_devices: Vec<String>,
    /// Empty when RDMA is usable ([`stackroute_rdma_discover::unavailable_reason`]).
    pub unavailable_reason: String,
    /// Devices left out to stay within [`MAX_RDMA_ENTRIES`].
    pub devices_left_out: usize,
}

/// RDMA discovery ([`stackroute_rdma_discover`]) over a filesystem root (`/` on a node), as the
/// agent reports it.
pub fn rdma(root: &Path) -> Rdma {
    let discovery = rdma_discover::discover(root);
    // Judged on every device found, not only those that fit in the report.
    let reason = rdma_discover::unavailable_reason(&discovery, root);
    rdma_report(&discovery, reason.unwrap_or_default())
}

/// `discovery` as report messages, within [`MAX_RDMA_ENTRIES`] and [`MAX_UVERBS_DEVICES`].
pub fn rdma_report(discovery: &Discovery, unavailable_reason: String) -> Rdma {
    let mut uverbs_devices = discovery.uverbs.clone();
    uverbs_devices.truncate(MAX_UVERBS_DEVICES);
    let mut budget = MAX_RDMA_ENTRIES.saturating_sub(uverbs_devices.len());
    let mut devices = Vec::new();
    for device in &discovery.devices {
        let device = rdma_device(device);
        let entries = rdma_entries(&device);
        if entries > budget {
            break;
        }
        budget -= entries;
        devices.push(device);
    }
    Rdma {
        devices_left_out: discovery.devices.len() - devices.len(),
        devices,
        rdma_cm_device: discovery.rdma_cm,
        uverbs_devices,
        unavailable_reason,
    }
}

/// One discovered device as a report message: its ports with their typed GIDs, and for the
/// device as a whole the first port's state, every port's GIDs and the RoCE versions present.
pub fn rdma_device(device: &rdma_discover::Device) -> RdmaDevice {
    let ports: Vec<RdmaPort> = device
        .ports
        .iter()
        .map(|port| RdmaPort {
            number: port.number,
            state: port.state.clone(),
            phys_state: port.phys_state.clone(),
            link_layer: port.link_layer.clone(),
            active_mtu: port.active_mtu,
            gids: port
                .gids
                .iter()
                .map(|gid| RdmaGid {
                    index: gid.index,
                    gid: gid.gid.clone(),
                    r#type: gid.kind.clone(),
                    netdev: gid.netdev.clone(),
                })
                .collect(),
        })
        .collect();
    let mut roce_versions: Vec<u32> = device
        .ports
        .iter()
        .flat_map(|port| {
            port.gids
                .iter()
                .filter_map(|gid| rdma_discover::roce_version(&port.link_layer, &gid.kind))
        })
        .collect();
    roce_versions.sort_unstable();
    roce_versions.dedup();
    RdmaDevice {
        name: device.name.clone(),
        gids: ports
            .iter()
            .flat_map(|port| port.gids.iter().map(|g| g.gid.clone()))
            .collect(),
        state: ports.first().map(|p| p.state.clone()).unwrap_or_default(),
        ports,
        roce_versions,
    }
}

/// The agent's `RLIMIT_MEMLOCK` (soft, hard) in bytes, `u64::MAX` for unlimited. Processes the
/// agent starts inherit it, and RDMA pins every registered buffer against it.
pub fn memlock() -> (u64, u64) {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Memlock);
    (
        limit.current.unwrap_or(u64::MAX),
        limit.maximum.unwrap_or(u64::MAX),
    )
}

/// One line per node for logs: `rxe0[1:active/linkup Ethernet mtu=1024 gids=2 RoCEv2]`.
pub fn rdma_summary(devices: &[RdmaDevice]) -> String {
    let mut parts = Vec::new();
    for device in devices {
        let ports: Vec<String> = device
            .ports
            .iter()
            .map(|p| {
                format!(
                    "{}:{}/{} {} mtu={} gids={}",
                    p.number,
                    p.state,
                    p.phys_state,
                    p.link_layer,
                    p.active_mtu,
                    p.gids.len()
                )
            })
            .collect();
        let roce: Vec<String> = device
            .roce_versions
            .iter()
            .map(|v| format!(" RoCEv{v}"))
            .collect();
        parts.push(format!(
            "{}[{}{}]",
            device.name,
            ports.join(", "),
            roce.concat()
        ));
    }
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn congestion_control_lists_parse() {
        let available = parse_words("reno cubic bbr\n");
        assert_eq!(available, ["reno", "cubic", "bbr"]);
        assert!(has_bbr(&available));
        assert!(!has_bbr(&parse_words("reno cubic\n")));
        assert!(parse_words("").is_empty());
    }

    #[test]
    fn hugepages_parse_from_meminfo() {
        let meminfo = "MemTotal:       16318372 kB\nHugePages_Total:      64\nHugePages_Free:       60\nHugePages_Rsvd:        0\nHugepagesize:       2048 kB\n";
        assert_eq!(parse_hugepages(meminfo), (64, 60));
        assert_eq!(parse_hugepages("MemTotal: 1 kB\n"), (0, 0));
        assert_eq!(parse_hugepages("HugePages_Total: lots\n"), (0, 0));
    }

    /// Writes `text` to `path` under `root`, creating its directories.
    fn write(root: &Path, path: &str, text: &str) {
        let path = root.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    const LIB: &str = "usr/lib/x86_64-linux-gnu";
    /// No hugepages of 2 MiB.
    const MEMINFO_2M_NONE: &str = "MemTotal:       16318372 kB\nHugePages_Total:       0\n\
                                   HugePages_Free:        0\nHugepagesize:       2048 kB\n";

    #[test]
    fn dpdk_capability_from_a_fake_root() {
        let root = tempfile::tempdir().unwrap();
        let root = root.path();
        write(
            root,
            &format!("{LIB}/pkgconfig/libdpdk.pc"),
            "prefix=/usr\nName: DPDK\nDescription: The Data Plane Development Kit\n\
             Version: 22.11.11\nLibs: -lrte_eal\n",
        );
        write(root, &format!("{LIB}/librte_eal.so.23"), "");
        for pmd in [
            "librte_net_af_packet.so",
            "librte_net_af_packet.so.23",
            "librte_net_memif.so.23.0",
            // Not PMD libraries.
            "README",
            "librte_.so.23",
            "librte_net_tap.sonic",
        ] {
            write(root, &format!("{LIB}/dpdk/pmds-23.0/{pmd}"), "");
        }
        let vfio_pci = "sys/bus/pci/drivers/vfio-pci";
        for entry in [
            "0000:03:00.0",
            "bind",
            "unbind",
            "new_id",
            "remove_id",
            "uevent",
        ] {
            write(root, &format!("{vfio_pci}/{entry}"), "");
        }
        std::fs::create_dir_all(root.join(vfio_pci).join("module")).unwrap();
        write(root, "sys/bus/pci/drivers/igb_uio/0000:00:1f.6", "");
        // Not a user-space I/O driver.
        write(root, "sys/bus/pci/drivers/virtio-pci/0000:00:04.0", "");
        write(root, "dev/vfio/vfio", "");
        write(root, "proc/meminfo", MEMINFO_2M_NONE);

        let dpdk = dpdk_capability(root);
        assert_eq!(dpdk.version, "22.11.11");
        assert_eq!(dpdk.pmds, ["net_af_packet", "net_memif"]);
        let devices: Vec<_> = dpdk
            .bound_devices
            .iter()
            .map(|d| (d.pci_address.as_str(), d.driver.as_str()))
            .collect();
        assert_eq!(
            devices,
            [("0000:00:1f.6", "igb_uio"), ("0000:03:00.0", "vfio-pci")]
        );
        assert!(dpdk.vfio);
        assert_eq!(dpdk.hugepage_size_kib, 2048);
        // No hugepages, but bound devices: usable.
        assert_eq!(dpdk.unavailable_reason, "");
        assert_eq!(
            dpdk_devices_text(&dpdk.bound_devices),
            "0000:00:1f.6=igb_uio 0000:03:00.0=vfio-pci"
        );
    }

    #[test]
    fn dpdk_reasons_and_version_fallbacks() {
        let root = tempfile::tempdir().unwrap();
        let root = root.path();
        // Only the EAL: its ABI from the file name.
        write(root, &format!("{LIB}/librte_eal.so.23.0"), "");
        write(root, "proc/meminfo", MEMINFO_2M_NONE);
        let vdevs = dpdk_capability(root);
        assert_eq!(vdevs.version, "ABI 23");
        assert!(vdevs.pmds.is_empty() && vdevs.bound_devices.is_empty() && !vdevs.vfio);
        assert_eq!(vdevs.unavailable_reason, DPDK_VDEVS_ONLY);
        assert!(vdevs.unavailable_reason.contains("virtual devices only"));
        // Hugepages without a bound device: usable with virtual devices.
        write(
            root,
            "proc/meminfo",
            "HugePages_Total:      64\nHugePages_Free:       60\nHugepagesize:    1048576 kB\n",
        );
        let hugepages = dpdk_capability(root);
        assert_eq!(hugepages.unavailable_reason, "");
        assert_eq!(hugepages.hugepage_size_kib, 1 << 20);
        // A .pc without a version, in a later directory, and an unversioned EAL: installed.
        let other = tempfile::tempdir().unwrap();
        write(
            other.path(),
            "usr/local/lib/pkgconfig/libdpdk.pc",
            "Name: DPDK\n",
        );
        assert_eq!(dpdk_capability(other.path()).version, "unknown");
        write(other.path(), "usr/lib64/librte_eal.so", "");
        assert_eq!(dpdk_capability(other.path()).version, "unknown");
    }

    #[test]
    fn dpdk_capability_over_an_empty_root_names_the_missing_library() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(
            dpdk_capability(root.path()),
            DpdkCapability {
                unavailable_reason: DPDK_MISSING.into(),
                ..Default::default()
            }
        );
        assert!(DPDK_MISSING.contains("no DPDK library") && DPDK_MISSING.contains("libdpdk-dev"));
    }

    #[test]
    fn pci_addresses_are_recognized() {
        for name in ["0000:03:00.0", "0000:00:1f.6", "10000:e1:00.7"] {
            assert!(is_pci_address(name), "{name}");
        }
        for name in [
            "bind",
            "new_id",
            "module",
            "0000:03:00",
            "0000:03:00.8",
            "000:03:00.0",
            "0000:3:00.0",
            "0000:03:00.00",
            "0000:0g:00.0",
            "0000:03:00:00.0",
        ] {
            assert!(!is_pci_address(name), "{name}");
        }
    }

    #[test]
    fn dpdk_lists_are_bounded() {
        let root = tempfile::tempdir().unwrap();
        let root = root.path();
        for n in 0..MAX_DPDK_LIST + 5 {
            write(
                root,
                &format!("{LIB}/dpdk/pmds-23.0/librte_net_x{n:04}.so.23"),
                "",
            );
            write(
                root,
                &format!(
                    "sys/bus/pci/drivers/vfio-pci/0000:{:02x}:{:02x}.0",
                    n / 256,
                    n % 256
                ),
                "",
            );
        }
        write(root, &format!("{LIB}/librte_eal.so.23"), "");
        let dpdk = dpdk_capability(root);
        assert_eq!(dpdk.pmds.len(), MAX_DPDK_LIST);
        assert_eq!(dpdk.pmds[0], "net_x0000");
        assert_eq!(dpdk.bound_devices.len(), MAX_DPDK_LIST);
        assert_eq!(dpdk.bound_devices[0].pci_address, "0000:00:00.0");
    }

    #[test]
    fn dpdk_capability_on_this_machine() {
        let found = dpdk_capability(Path::new("/"));
        assert_eq!(dpdk(), !found.version.is_empty());
        let pkg_config = std::process::Command::new("pkg-config")
            .args(["--modversion", "libdpdk"])
            .output()
            .ok()
            .filter(|out| out.status.success());
        match pkg_config {
            Some(out) => {
                let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
                assert_eq!(found.version, version, "{found:?}");
            }
            None if found.version.is_empty() => {
                assert_eq!(found.unavailable_reason, DPDK_MISSING, "{found:?}")
            }
            // A library without a .pc pkg-config finds: its reason follows the node's state.
            None => {}
        }
        if !found.version.is_empty() {
            let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
            let (hugepages, _) = parse_hugepages(&meminfo);
            assert_eq!(
                found.unavailable_reason.is_empty(),
                hugepages > 0 || !found.bound_devices.is_empty(),
                "{found:?}"
            );
            assert_eq!(
                found.hugepage_size_kib,
                meminfo_field(&meminfo, "Hugepagesize")
            );
        }
        assert_eq!(found.vfio, Path::new("/dev/vfio/vfio").exists());
    }

    const LINK_LOCAL: &str = "fe80:0000:0000:0000:5054:00ff:fe12:3456";
    const V4_MAPPED: &str = "0000:0000:0000:0000:0000:ffff:0a00:0001";

    fn gid(index: u32, gid: &str, kind: &str, netdev: &str) -> rdma_discover::Gid {
        rdma_discover::Gid {
            index,
            gid: gid.into(),
            kind: kind.into(),
            netdev: netdev.into(),
        }
    }

    fn port(
        number: u32,
        state: &str,
        link_layer: &str,
        active_mtu: u32,
        gids: Vec<rdma_discover::Gid>,
    ) -> rdma_discover::Port {
        rdma_discover::Port {
            number,
            state: state.into(),
            phys_state: if state == "active" {
                "linkup"
            } else {
                "disabled"
            }
            .into(),
            link_layer: link_layer.into(),
            active_mtu,
            gids,
        }
    }

    fn device(name: &str, ports: Vec<rdma_discover::Port>) -> rdma_discover::Device {
        rdma_discover::Device {
            name: name.into(),
            ports,
        }
    }

    /// A device with one active Ethernet port holding two RoCE v2 GIDs on eth0.
    fn roce_v2_device(name: &str) -> rdma_discover::Device {
        device(
            name,
            vec![port(
                1,
                "active",
                "Ethernet",
                1024,
                vec![
                    gid(0, LINK_LOCAL, "RoCE v2", "eth0"),
                    gid(1, V4_MAPPED, "RoCE v2", "eth0"),
                ],
            )],
        )
    }

    fn with_nodes(devices: Vec<rdma_discover::Device>) -> Discovery {
        Discovery {
            devices,
            rdma_cm: true,
            uverbs: vec!["uverbs0".into()],
        }
    }

    #[test]
    fn discovered_devices_become_report_messages() {
        let discovery = with_nodes(vec![
            // mlx5 lists each address twice, once per GID type.
            device(
                "mlx5_0",
                vec![
                    port(
                        1,
                        "active",
                        "Ethernet",
                        4096,
                        vec![
                            gid(0, LINK_LOCAL, "IB/RoCE v1", "ens1f0"),
                            gid(1, LINK_LOCAL, "RoCE v2", "ens1f0"),
                        ],
                    ),
                    port(2, "down", "Ethernet", 0, vec![]),
                ],
            ),
            // On InfiniBand "IB/RoCE v1" is a native GID, not RoCE.
            device(
                "mlx5_1",
                vec![port(
                    1,
                    "active",
                    "InfiniBand",
                    0,
                    vec![gid(0, LINK_LOCAL, "IB/RoCE v1", "")],
                )],
            ),
            roce_v2_device("rxe0"),
        ]);
        let rdma = rdma_report(&discovery, String::new());
        assert_eq!(rdma.devices_left_out, 0);
        assert!(rdma.rdma_cm_device);
        assert_eq!(rdma.uverbs_devices, ["uverbs0"]);
        assert_eq!(rdma.unavailable_reason, "");

        let mlx5_0 = &rdma.devices[0];
        assert_eq!(mlx5_0.name, "mlx5_0");
        assert_eq!(mlx5_0.state, "active", "the first port's");
        assert_eq!(mlx5_0.roce_versions, [1, 2]);
        assert_eq!(mlx5_0.gids, [LINK_LOCAL, LINK_LOCAL]);
        assert_eq!(mlx5_0.ports.len(), 2);
        assert!(rdma.devices[1].roce_versions.is_empty());
        assert_eq!(rdma.devices[1].ports[0].gids[0].r#type, "IB/RoCE v1");

        let rxe0 = &rdma.devices[2];
        assert_eq!(rxe0.roce_versions, [2]);
        assert_eq!(rxe0.gids, [LINK_LOCAL, V4_MAPPED]);
        let port = &rxe0.ports[0];
        assert_eq!(
            (
                port.number,
                port.state.as_str(),
                port.phys_state.as_str(),
                port.link_layer.as_str(),
                port.active_mtu
            ),
            (1, "active", "linkup", "Ethernet", 1024)
        );
        let gids: Vec<_> = port
            .gids
            .iter()
            .map(|g| {
                (
                    g.index,
                    g.gid.as_str(),
                    g.r#type.as_str(),
                    g.netdev.as_str(),
                )
            })
            .collect();
        assert_eq!(
            gids,
            [
                (0, LINK_LOCAL, "RoCE v2", "eth0"),
                (1, V4_MAPPED, "RoCE v2", "eth0")
            ]
        );
        assert_eq!(
            rdma_summary(&rdma.devices),
            "mlx5_0[1:active/linkup Ethernet mtu=4096 gids=2, 2:down/disabled Ethernet mtu=0 \
             gids=0 RoCEv1 RoCEv2] mlx5_1[1:active/linkup InfiniBand mtu=0 gids=1] \
             rxe0[1:active/linkup Ethernet mtu=1024 gids=2 RoCEv2]"
        );
    }

    #[test]
    fn devices_past_the_entry_bound_are_left_out() {
        // Each device: itself, one port, 2 GIDs twice (port list and the flat list), RoCE v2.
        let per_device = 1 + 1 + 2 + 2 + 1;
        let count = MAX_RDMA_ENTRIES / per_device + 3;
        let discovery = with_nodes(
            (0..count)
                .map(|n| roce_v2_device(&format!("rxe{n:04}")))
                .collect(),
        );
        let rdma = rdma_report(&discovery, String::new());
        assert_eq!(rdma_entries(&rdma.devices[0]), per_device);
        // The one uverbs device counts too.
        let kept = (MAX_RDMA_ENTRIES - 1) / per_device;
        assert_eq!(rdma.devices.len(), kept);
        assert_eq!(rdma.devices_left_out, count - kept);
        assert_eq!(
            rdma.devices.last().unwrap().name,
            format!("rxe{:04}", kept - 1)
        );
    }

    #[test]
    fn uverbs_devices_are_bounded() {
        let discovery = Discovery {
            uverbs: (0..MAX_UVERBS_DEVICES + 10)
                .map(|n| format!("uverbs{n:03}"))
                .collect(),
            ..Discovery::default()
        };
        let rdma = rdma_report(&discovery, "why".into());
        assert_eq!(rdma.uverbs_devices.len(), MAX_UVERBS_DEVICES);
        assert_eq!(rdma.unavailable_reason, "why");
    }

    #[test]
    fn the_reason_is_judged_on_the_root_read() {
        let root = tempfile::tempdir().unwrap();
        let none = rdma(root.path());
        assert!(
            none.unavailable_reason
                .starts_with("no /sys/class/infiniband: "),
            "{none:?}"
        );
        std::fs::create_dir_all(root.path().join("sys/class/infiniband")).unwrap();
        let empty = rdma(root.path());
        assert!(empty.devices.is_empty() && !empty.rdma_cm_device);
        assert!(
            empty
                .unavailable_reason
                .starts_with("/sys/class/infiniband is empty: "),
            "{empty:?}"
        );
    }

    #[test]
    fn memlock_matches_proc_self_limits() {
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
        let line = limits
            .lines()
            .find(|l| l.starts_with("Max locked memory"))
            .unwrap();
        let parse = |word: &str| {
            if word == "unlimited" {
                u64::MAX
            } else {
                word.parse().unwrap()
            }
        };
        let words: Vec<&str> = line["Max locked memory".len()..]
            .split_whitespace()
            .collect();
        assert_eq!(memlock(), (parse(words[0]), parse(words[1])), "{line}");
    }

    #[test]
    fn discovery_on_this_machine_does_not_fail() {
        let caps = discover("n1");
        assert_eq!(caps.node, "n1");
        // Every Linux kernel has at least one congestion control.
        assert!(!caps.available_congestion_control.is_empty());
        assert!(caps.hugepages_free <= caps.hugepages_total);
        assert!(caps.memlock_soft <= caps.memlock_hard);
        let dpdk = caps
            .dpdk_detail
            .expect("the agent always reports DPDK in detail");
        assert_eq!(caps.dpdk, !dpdk.version.is_empty());
    }

    #[test]
    fn rdma_discovery_on_this_machine_explains_itself() {
        let caps = discover("n1");
        if !Path::new("/sys/class/infiniband").exists() {
            assert!(caps.rdma_devices.is_empty(), "{:?}", caps.rdma_devices);
            assert!(
                caps.rdma_unavailable_reason
                    .contains("/sys/class/infiniband")
                    && caps.rdma_unavailable_reason.contains("CONFIG_INFINIBAND"),
                "{:?}",
                caps.rdma_unavailable_reason
            );
            return;
        }
        // A node with the RDMA class: the reason is empty exactly when the report shows an
        // active port with a GID and both device nodes.
        let usable = caps
            .rdma_devices
            .iter()
            .flat_map(|d| &d.ports)
            .any(|p| p.state == "active" && !p.gids.is_empty())
            && caps.rdma_cm_device
            && !caps.uverbs_devices.is_empty();
        assert_eq!(
            caps.rdma_unavailable_reason.is_empty(),
            usable,
            "{:?}",
            caps.rdma_unavailable_reason
        );
        assert_eq!(
            caps.rdma_cm_device,
            Path::new("/dev/infiniband/rdma_cm").exists()
        );
    }
}
