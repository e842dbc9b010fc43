//! Node capability discovery: congestion controls (BBR available / allowed), AF_XDP, DPDK,
//! RDMA (devices, ports, typed GIDs, /dev/infiniband nodes, why it is unusable: read by
//! [`stackroute_rdma_discover`], which the shim shares; here made report messages within the
//! controller's bounds), the memlock limit, hugepages. Each probe reads files or tries a socket
//! and reports "absent" on any error; none can fail the agent.

use std::path::Path;

use stackroute_proto::v1alpha1::{NodeCapabilities, RdmaDevice, RdmaGid, RdmaPort};
use stackroute_rdma_discover::{self as rdma_discover, Discovery};
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
