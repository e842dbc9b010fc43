//! Node capability discovery: congestion controls (BBR available / allowed), AF_XDP, DPDK,
//! RDMA (devices, ports, typed GIDs, /dev/infiniband nodes, why it is unusable), the memlock
//! limit, hugepages. Each probe reads files or tries a socket and reports "absent" on any error;
//! none can fail the agent.

use std::path::Path;

use stackroute_proto::v1alpha1::{NodeCapabilities, RdmaDevice, RdmaGid, RdmaPort};
use tracing::{info, warn};

/// `AF_XDP` (linux/socket.h).
const AF_XDP: i32 = 44;

/// Discovers this node's capabilities.
pub fn discover(node: &str) -> NodeCapabilities {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let (hugepages_total, hugepages_free) = parse_hugepages(&read("/proc/meminfo"));
    let rdma = rdma(Path::new("/"));
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
        dpdk: dpdk(),
        rdma_devices: rdma.devices,
        hugepages_total,
        hugepages_free,
        memlock_soft,
        memlock_hard,
        rdma_cm_device: rdma.rdma_cm_device,
        uverbs_devices: rdma.uverbs_devices,
        rdma_unavailable_reason: rdma.unavailable_reason,
    };
    info!(
        available_cc = ?capabilities.available_congestion_control,
        allowed_cc = ?capabilities.allowed_congestion_control,
        af_xdp = capabilities.af_xdp,
        dpdk = capabilities.dpdk,
        rdma_devices = capabilities.rdma_devices.len(),
        rdma = %rdma_summary(&capabilities.rdma_devices),
        rdma_cm = capabilities.rdma_cm_device,
        uverbs = ?capabilities.uverbs_devices,
        rdma_unavailable_reason = %capabilities.rdma_unavailable_reason,
        memlock_soft = %limit_text(memlock_soft),
        memlock_hard = %limit_text(memlock_hard),
        hugepages_total,
        hugepages_free,
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
    let field = |name: &str| {
        meminfo
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|value| value.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("HugePages_Total"), field("HugePages_Free"))
}

/// Whether the kernel lets us create an AF_XDP socket (the socket is closed at once).
pub fn af_xdp() -> bool {
    socket2::Socket::new(socket2::Domain::from(AF_XDP), socket2::Type::RAW, None).is_ok()
}

/// Whether DPDK is installed: `librte_eal.so*` in a library directory, or a `libdpdk.pc`.
pub fn dpdk() -> bool {
    const LIB_DIRS: &[&str] = &[
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib64",
        "/usr/lib",
        "/usr/local/lib",
        "/usr/local/lib64",
        "/usr/local/lib/x86_64-linux-gnu",
    ];
    LIB_DIRS.iter().any(|dir| {
        let dir = Path::new(dir);
        has_file(dir, |name| name.starts_with("librte_eal.so"))
            || dir.join("pkgconfig/libdpdk.pc").is_file()
    })
}

fn has_file(dir: &Path, wanted: impl Fn(&str) -> bool) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries
            .flatten()
            .any(|e| e.file_name().to_str().is_some_and(&wanted))
    })
}

/// Bound on the RDMA part of a report, counted as the controller counts it (`check_capabilities`
/// in crd-controller/src/grpc.rs): devices, ports, GIDs (both lists), RoCE versions and uverbs
/// devices. Devices past it are left out rather than having the whole report rejected.
pub const MAX_RDMA_ENTRIES: usize = 1024;

/// Non-zero GIDs reported per port; a port with more IPs than that keeps its lowest indexes.
pub const MAX_GIDS_PER_PORT: usize = 32;

/// `/dev/infiniband/uverbsN` names reported (one per RDMA device, so rarely more than a few).
pub const MAX_UVERBS_DEVICES: usize = 64;

/// What the agent can tell about RDMA on this node.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rdma {
    pub devices: Vec<RdmaDevice>,
    pub rdma_cm_device: bool,
    pub uverbs_devices: Vec<String>,
    /// Empty when RDMA is usable (see [`rdma_unavailable_reason`]).
    pub unavailable_reason: String,
    /// Devices left out to stay within [`MAX_RDMA_ENTRIES`].
    pub devices_left_out: usize,
}

/// RDMA discovery over a filesystem root (`/` on a node, a temp tree in tests): reads
/// `sys/class/infiniband`, `sys/class/net` (netdev MTUs) and `dev/infiniband` below it.
pub fn rdma(root: &Path) -> Rdma {
    let class = root.join("sys/class/infiniband");
    let class_exists = class.is_dir();
    let mut devices = rdma_devices(&class, &root.join("sys/class/net"));
    let dev = root.join("dev/infiniband");
    let rdma_cm_device = dev.join("rdma_cm").exists();
    let mut uverbs_devices: Vec<String> = std::fs::read_dir(&dev)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .filter(|name| name.starts_with("uverbs"))
                .collect()
        })
        .unwrap_or_default();
    uverbs_devices.sort();
    uverbs_devices.truncate(MAX_UVERBS_DEVICES);
    let mut budget = MAX_RDMA_ENTRIES.saturating_sub(uverbs_devices.len());
    let mut kept = 0;
    for device in &devices {
        let entries = rdma_entries(device);
        if entries > budget {
            break;
        }
        budget -= entries;
        kept += 1;
    }
    let devices_left_out = devices.len() - kept;
    // Judged on every device found, not only those that fit in the report.
    let unavailable_reason =
        rdma_unavailable_reason(class_exists, &devices, rdma_cm_device, &uverbs_devices);
    devices.truncate(kept);
    Rdma {
        devices,
        rdma_cm_device,
        uverbs_devices,
        unavailable_reason,
        devices_left_out,
    }
}

/// Entries `device` adds to a report, as [`MAX_RDMA_ENTRIES`] counts them.
pub fn rdma_entries(device: &RdmaDevice) -> usize {
    1 + device.gids.len()
        + device.roce_versions.len()
        + device
            .ports
            .iter()
            .map(|port| 1 + port.gids.len())
            .sum::<usize>()
}

/// RDMA devices under `class` (normally `/sys/class/infiniband`), sorted by name: every port
/// with its state, physical state, link layer, MTU and non-zero GIDs (type and netdev from
/// `gid_attrs`); `net` (normally `/sys/class/net`) gives the netdev MTUs. No directory: none.
pub fn rdma_devices(class: &Path, net: &Path) -> Vec<RdmaDevice> {
    let Ok(entries) = std::fs::read_dir(class) else {
        return Vec::new();
    };
    let mut devices: Vec<RdmaDevice> = entries
        .flatten()
        .filter_map(|device| {
            let name = device.file_name().to_str()?.to_string();
            let mut ports: Vec<RdmaPort> = std::fs::read_dir(device.path().join("ports"))
                .map(|e| {
                    e.flatten()
                        .filter_map(|p| rdma_port(&p.path(), net))
                        .collect()
                })
                .unwrap_or_default();
            ports.sort_by_key(|port| port.number);
            let state = ports.first().map(|p| p.state.clone()).unwrap_or_default();
            let gids = ports
                .iter()
                .flat_map(|port| port.gids.iter().map(|g| g.gid.clone()))
                .collect();
            let mut roce_versions: Vec<u32> = ports
                .iter()
                .flat_map(|port| {
                    port.gids
                        .iter()
                        .filter_map(|gid| roce_version(&port.link_layer, &gid.r#type))
                })
                .collect();
            roce_versions.sort_unstable();
            roce_versions.dedup();
            Some(RdmaDevice {
                name,
                gids,
                state,
                ports,
                roce_versions,
            })
        })
        .collect();
    devices.sort_by(|a, b| a.name.cmp(&b.name));
    devices
}

/// One `ports/N` directory; `None` unless its name is a port number.
fn rdma_port(dir: &Path, net: &Path) -> Option<RdmaPort> {
    let number = dir.file_name()?.to_str()?.parse().ok()?;
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
    let link_layer = read("link_layer").trim().to_string();
    let mut files: Vec<(u32, std::path::PathBuf)> = std::fs::read_dir(dir.join("gids"))
        .map(|e| {
            e.flatten()
                .filter_map(|f| Some((f.file_name().to_str()?.parse().ok()?, f.path())))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    let gids: Vec<RdmaGid> = files
        .iter()
        .filter_map(|(index, file)| {
            let gid = std::fs::read_to_string(file).ok()?.trim().to_string();
            // Unused table entries read as zeros, and their gid_attrs fail to read.
            is_real_gid(&gid).then(|| RdmaGid {
                index: *index,
                gid,
                r#type: read(&format!("gid_attrs/types/{index}")).trim().to_string(),
                netdev: read(&format!("gid_attrs/ndevs/{index}")).trim().to_string(),
            })
        })
        .take(MAX_GIDS_PER_PORT)
        .collect();
    // sysfs has no active MTU; on Ethernet the kernel derives it from the netdev's MTU.
    let active_mtu = if link_layer.eq_ignore_ascii_case("ethernet") {
        gids.iter()
            .map(|g| g.netdev.as_str())
            .find(|netdev| is_netdev_name(netdev))
            .and_then(|netdev| std::fs::read_to_string(net.join(netdev).join("mtu")).ok())
            .and_then(|mtu| mtu.trim().parse().ok())
            .map_or(0, roce_active_mtu)
    } else {
        0
    };
    Some(RdmaPort {
        number,
        state: parse_port_state(&read("state")),
        phys_state: parse_port_state(&read("phys_state")),
        link_layer,
        active_mtu,
        gids,
    })
}

/// A netdev name as `gid_attrs/ndevs` gives it; guards the path it is joined to.
fn is_netdev_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/')
}

/// The RoCE path MTU for a netdev MTU: the largest IB MTU (256..4096) that fits once the RoCE
/// v2 headers are taken off (GRH 40 + UDP 8 + BTH 12 + XRC 4 + AtomicETH 28 + ICRC 4), as the
/// kernel's `iboe_get_mtu` computes it. 0 when even 256 does not fit.
pub fn roce_active_mtu(netdev_mtu: u32) -> u32 {
    let payload = netdev_mtu.saturating_sub(40 + 8 + 12 + 4 + 28 + 4);
    [4096, 2048, 1024, 512, 256]
        .into_iter()
        .find(|&mtu| payload >= mtu)
        .unwrap_or(0)
}

/// The RoCE version of a GID of `gid_type` (gid_attrs/types) on a port of `link_layer`: "RoCE v2"
/// is v2 anywhere; "IB/RoCE v1" is v1 only on Ethernet (on InfiniBand it is a native IB GID).
pub fn roce_version(link_layer: &str, gid_type: &str) -> Option<u32> {
    let gid_type = gid_type.trim();
    if gid_type.eq_ignore_ascii_case("RoCE v2") {
        Some(2)
    } else if gid_type.eq_ignore_ascii_case("IB/RoCE v1")
        && link_layer.eq_ignore_ascii_case("ethernet")
    {
        Some(1)
    } else {
        None
    }
}

/// Why RDMA is not usable, or empty when it is: some device needs an ACTIVE port with a GID,
/// and the agent must see `/dev/infiniband/rdma_cm` and a `uverbs` device (rsocket opens both).
/// The first problem on that path is named, with the ports concerned.
pub fn rdma_unavailable_reason(
    class_exists: bool,
    devices: &[RdmaDevice],
    rdma_cm_device: bool,
    uverbs_devices: &[String],
) -> String {
    const SHOWN: usize = 4;
    if !class_exists {
        return "no /sys/class/infiniband: the kernel has no RDMA subsystem (CONFIG_INFINIBAND) \
                or no RDMA driver is loaded"
            .into();
    }
    if devices.is_empty() {
        return "/sys/class/infiniband is empty: no RDMA device (load the NIC's RDMA driver, \
                e.g. mlx5_ib, or add soft RoCE: rdma link add rxe0 type rxe netdev IFACE)"
            .into();
    }
    let ports = || {
        devices
            .iter()
            .flat_map(|d| d.ports.iter().map(move |p| (d, p)))
    };
    let describe = |list: Vec<String>, total: usize| {
        let more = total.saturating_sub(list.len());
        let mut text = list.join(", ");
        if more > 0 {
            text.push_str(&format!(", {more} more"));
        }
        text
    };
    let active: Vec<_> = ports().filter(|(_, p)| p.state == "active").collect();
    if active.is_empty() {
        let all: Vec<_> = ports().collect();
        if all.is_empty() {
            return format!(
                "devices present but none has a port ({})",
                devices
                    .iter()
                    .map(|d| d.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        let shown = all
            .iter()
            .take(SHOWN)
            .map(|(d, p)| {
                let state = if p.state.is_empty() {
                    "unknown"
                } else {
                    &p.state
                };
                let phys = if p.phys_state.is_empty() {
                    "unknown"
                } else {
                    &p.phys_state
                };
                format!("{} port {}: {state}/{phys}", d.name, p.number)
            })
            .collect();
        return format!(
            "devices present but no port is ACTIVE ({}): check the link and the netdev is up",
            describe(shown, all.len())
        );
    }
    if active.iter().all(|(_, p)| p.gids.is_empty()) {
        let shown = active
            .iter()
            .take(SHOWN)
            .map(|(d, p)| format!("{} port {}", d.name, p.number))
            .collect();
        let ethernet = active
            .iter()
            .any(|(_, p)| p.link_layer.eq_ignore_ascii_case("ethernet"));
        let hint = if ethernet {
            "RoCE GIDs come from the IP addresses of the port's netdev, which has none"
        } else {
            "the port's GID table is empty"
        };
        return format!(
            "no RoCE GID on any active port ({}): {hint}",
            describe(shown, active.len())
        );
    }
    let mut missing = Vec::new();
    if !rdma_cm_device {
        missing.push("/dev/infiniband/rdma_cm missing: rdma_ucm module not loaded");
    }
    if uverbs_devices.is_empty() {
        missing.push("/dev/infiniband/uverbs* missing: ib_uverbs module not loaded");
    }
    if missing.is_empty() {
        return String::new();
    }
    format!(
        "{} (or /dev/infiniband is not visible to the agent)",
        missing.join("; ")
    )
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

/// `"4: ACTIVE"` → `"active"`.
pub fn parse_port_state(text: &str) -> String {
    let text = text.trim();
    text.split_once(':')
        .map_or(text, |(_, state)| state.trim())
        .to_ascii_lowercase()
}

fn is_real_gid(gid: &str) -> bool {
    !gid.is_empty() && gid.chars().any(|c| c.is_ascii_hexdigit() && c != '0')
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

    /// A fake filesystem root with the sysfs and /dev layout RDMA discovery reads.
    struct FakeRoot(tempfile::TempDir);

    impl FakeRoot {
        fn new() -> Self {
            Self(tempfile::tempdir().unwrap())
        }

        fn path(&self) -> &Path {
            self.0.path()
        }

        fn write(&self, path: &str, text: &str) {
            let path = self.path().join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }

        fn port(&self, device: &str, port: u32, state: &str, phys: &str, link_layer: &str) {
            let dir = format!("sys/class/infiniband/{device}/ports/{port}");
            self.write(&format!("{dir}/state"), &format!("{state}\n"));
            self.write(&format!("{dir}/phys_state"), &format!("{phys}\n"));
            self.write(&format!("{dir}/link_layer"), &format!("{link_layer}\n"));
            std::fs::create_dir_all(self.path().join(format!("{dir}/gids"))).unwrap();
        }

        /// A GID table entry; `attrs` = (type, netdev) for a populated one. The kernel fails
        /// reads of an unused entry's attributes, so the files are absent then.
        fn gid(&self, device: &str, port: u32, index: u32, gid: &str, attrs: Option<(&str, &str)>) {
            let dir = format!("sys/class/infiniband/{device}/ports/{port}");
            self.write(&format!("{dir}/gids/{index}"), &format!("{gid}\n"));
            if let Some((kind, netdev)) = attrs {
                self.write(
                    &format!("{dir}/gid_attrs/types/{index}"),
                    &format!("{kind}\n"),
                );
                self.write(
                    &format!("{dir}/gid_attrs/ndevs/{index}"),
                    &format!("{netdev}\n"),
                );
            }
        }

        fn dev_nodes(&self) {
            self.write("dev/infiniband/rdma_cm", "");
            self.write("dev/infiniband/uverbs0", "");
        }
    }

    const ZERO_GID: &str = "0000:0000:0000:0000:0000:0000:0000:0000";
    const LINK_LOCAL: &str = "fe80:0000:0000:0000:5054:00ff:fe12:3456";
    const V4_MAPPED: &str = "0000:0000:0000:0000:0000:ffff:0a00:0001";

    #[test]
    fn active_roce_v2_port_reports_typed_gids_netdev_and_mtu() {
        let root = FakeRoot::new();
        root.port("rxe0", 1, "4: ACTIVE", "5: LinkUp", "Ethernet");
        root.gid("rxe0", 1, 0, LINK_LOCAL, Some(("RoCE v2", "eth0")));
        root.gid("rxe0", 1, 1, V4_MAPPED, Some(("RoCE v2", "eth0")));
        root.gid("rxe0", 1, 2, ZERO_GID, None);
        root.write("sys/class/net/eth0/mtu", "1500\n");
        root.dev_nodes();

        let rdma = rdma(root.path());
        assert_eq!(rdma.unavailable_reason, "", "{rdma:?}");
        assert!(rdma.rdma_cm_device);
        assert_eq!(rdma.uverbs_devices, ["uverbs0"]);
        assert_eq!(rdma.devices.len(), 1);
        let device = &rdma.devices[0];
        assert_eq!(device.name, "rxe0");
        assert_eq!(device.state, "active");
        assert_eq!(device.roce_versions, [2]);
        assert_eq!(device.gids, [LINK_LOCAL, V4_MAPPED]);
        let port = &device.ports[0];
        assert_eq!(
            (port.number, port.state.as_str(), port.phys_state.as_str()),
            (1, "active", "linkup")
        );
        assert_eq!(port.link_layer, "Ethernet");
        // 1500 - 96 bytes of RoCE headers = 1404: the largest IB MTU below is 1024.
        assert_eq!(port.active_mtu, 1024);
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
            "rxe0[1:active/linkup Ethernet mtu=1024 gids=2 RoCEv2]"
        );
    }

    #[test]
    fn roce_versions_come_from_gid_types_and_link_layer() {
        let root = FakeRoot::new();
        // mlx5 lists each address twice, once per GID type.
        root.port("mlx5_0", 1, "4: ACTIVE", "5: LinkUp", "Ethernet");
        root.gid("mlx5_0", 1, 0, LINK_LOCAL, Some(("IB/RoCE v1", "ens1f0")));
        root.gid("mlx5_0", 1, 1, LINK_LOCAL, Some(("RoCE v2", "ens1f0")));
        root.write("sys/class/net/ens1f0/mtu", "9000\n");
        // On InfiniBand "IB/RoCE v1" is a native GID, not RoCE.
        root.port("mlx5_1", 1, "4: ACTIVE", "5: LinkUp", "InfiniBand");
        root.gid("mlx5_1", 1, 0, LINK_LOCAL, Some(("IB/RoCE v1", "")));
        root.dev_nodes();

        let rdma = rdma(root.path());
        assert_eq!(rdma.unavailable_reason, "");
        assert_eq!(rdma.devices[0].roce_versions, [1, 2]);
        assert_eq!(rdma.devices[0].ports[0].active_mtu, 4096);
        assert!(rdma.devices[1].roce_versions.is_empty());
        assert_eq!(
            rdma.devices[1].ports[0].active_mtu, 0,
            "unknown on InfiniBand"
        );
        assert_eq!(rdma.devices[1].ports[0].gids[0].r#type, "IB/RoCE v1");
    }

    #[test]
    fn down_ports_are_the_reason() {
        let root = FakeRoot::new();
        root.port("mlx5_0", 1, "1: DOWN", "3: Disabled", "Ethernet");
        root.gid("mlx5_0", 1, 0, LINK_LOCAL, Some(("RoCE v2", "ens1f0")));
        root.port("mlx5_0", 2, "2: INIT", "2: Polling", "Ethernet");
        root.dev_nodes();

        let rdma = rdma(root.path());
        assert_eq!(rdma.devices.len(), 1, "a down device is still reported");
        assert_eq!(rdma.devices[0].state, "down");
        assert_eq!(rdma.devices[0].ports.len(), 2);
        assert_eq!(
            rdma.unavailable_reason,
            "devices present but no port is ACTIVE (mlx5_0 port 1: down/disabled, mlx5_0 port 2: \
             init/polling): check the link and the netdev is up"
        );
    }

    #[test]
    fn an_active_port_without_gids_is_the_reason() {
        let root = FakeRoot::new();
        root.port("rxe0", 1, "4: ACTIVE", "5: LinkUp", "Ethernet");
        root.gid("rxe0", 1, 0, ZERO_GID, None);
        root.port("rxe1", 1, "1: DOWN", "3: Disabled", "Ethernet");
        root.gid("rxe1", 1, 0, LINK_LOCAL, Some(("RoCE v2", "eth1")));
        root.dev_nodes();

        let rdma = rdma(root.path());
        assert!(rdma.devices[0].ports[0].gids.is_empty());
        assert_eq!(
            rdma.unavailable_reason,
            "no RoCE GID on any active port (rxe0 port 1): RoCE GIDs come from the IP addresses \
             of the port's netdev, which has none"
        );
    }

    #[test]
    fn missing_device_nodes_are_the_reason() {
        let root = FakeRoot::new();
        root.port("rxe0", 1, "4: ACTIVE", "5: LinkUp", "Ethernet");
        root.gid("rxe0", 1, 0, LINK_LOCAL, Some(("RoCE v2", "eth0")));
        let rdma_ = rdma(root.path());
        assert!(!rdma_.rdma_cm_device && rdma_.uverbs_devices.is_empty());
        assert_eq!(
            rdma_.unavailable_reason,
            "/dev/infiniband/rdma_cm missing: rdma_ucm module not loaded; \
             /dev/infiniband/uverbs* missing: ib_uverbs module not loaded \
             (or /dev/infiniband is not visible to the agent)"
        );
        root.write("dev/infiniband/uverbs0", "");
        assert_eq!(
            rdma(root.path()).unavailable_reason,
            "/dev/infiniband/rdma_cm missing: rdma_ucm module not loaded \
             (or /dev/infiniband is not visible to the agent)"
        );
    }

    #[test]
    fn no_rdma_class_or_an_empty_one_is_the_reason() {
        let root = FakeRoot::new();
        let none = rdma(root.path());
        assert!(none.devices.is_empty());
        assert!(
            none.unavailable_reason
                .starts_with("no /sys/class/infiniband: "),
            "{none:?}"
        );
        std::fs::create_dir_all(root.path().join("sys/class/infiniband")).unwrap();
        let empty = rdma(root.path());
        assert!(empty.devices.is_empty());
        assert!(
            empty
                .unavailable_reason
                .starts_with("/sys/class/infiniband is empty: "),
            "{empty:?}"
        );
    }

    #[test]
    fn devices_past_the_entry_bound_are_left_out() {
        let root = FakeRoot::new();
        // Each device: itself, one port, 2 GIDs twice (port list and the flat list), RoCE v2.
        let per_device = 1 + 1 + 2 + 2 + 1;
        let count = MAX_RDMA_ENTRIES / per_device + 3;
        for n in 0..count {
            let device = format!("rxe{n:04}");
            root.port(&device, 1, "4: ACTIVE", "5: LinkUp", "Ethernet");
            root.gid(&device, 1, 0, LINK_LOCAL, Some(("RoCE v2", "eth0")));
            root.gid(&device, 1, 1, V4_MAPPED, Some(("RoCE v2", "eth0")));
        }
        root.dev_nodes();
        let rdma = rdma(root.path());
        assert_eq!(rdma_entries(&rdma.devices[0]), per_device);
        let kept = (MAX_RDMA_ENTRIES - 1) / per_device;
        assert_eq!(rdma.devices.len(), kept);
        assert_eq!(rdma.devices_left_out, count - kept);
        assert_eq!(rdma.unavailable_reason, "");
    }

    #[test]
    fn roce_mtu_follows_the_kernel() {
        assert_eq!(roce_active_mtu(1500), 1024);
        assert_eq!(roce_active_mtu(9000), 4096);
        assert_eq!(roce_active_mtu(4192), 4096);
        assert_eq!(roce_active_mtu(4191), 2048);
        assert_eq!(roce_active_mtu(352), 256);
        assert_eq!(roce_active_mtu(351), 0);
        assert_eq!(roce_active_mtu(0), 0);
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
