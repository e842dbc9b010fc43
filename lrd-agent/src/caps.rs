//! Node capability discovery: congestion controls (BBR available / allowed), AF_XDP, DPDK,
//! RDMA devices with their GIDs, hugepages. Each probe reads files or tries a socket and
//! reports "absent" on any error; none can fail the agent.

use std::path::Path;

use stackroute_proto::v1alpha1::{NodeCapabilities, RdmaDevice};
use tracing::info;

/// `AF_XDP` (linux/socket.h).
const AF_XDP: i32 = 44;

/// Discovers this node's capabilities.
pub fn discover(node: &str) -> NodeCapabilities {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let (hugepages_total, hugepages_free) = parse_hugepages(&read("/proc/meminfo"));
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
        rdma_devices: rdma_devices(Path::new("/sys/class/infiniband")),
        hugepages_total,
        hugepages_free,
    };
    info!(
        available_cc = ?capabilities.available_congestion_control,
        allowed_cc = ?capabilities.allowed_congestion_control,
        af_xdp = capabilities.af_xdp,
        dpdk = capabilities.dpdk,
        rdma_devices = capabilities.rdma_devices.len(),
        hugepages_total,
        hugepages_free,
        "node capabilities"
    );
    capabilities
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

/// RDMA devices under `root` (normally `/sys/class/infiniband`): per device, the non-zero GIDs
/// of every port and the first port's state (`active`, `down`, …). No directory: no devices.
pub fn rdma_devices(root: &Path) -> Vec<RdmaDevice> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut devices: Vec<RdmaDevice> = entries
        .flatten()
        .filter_map(|device| {
            let name = device.file_name().to_str()?.to_string();
            let mut ports: Vec<_> = std::fs::read_dir(device.path().join("ports"))
                .map(|e| e.flatten().map(|p| p.path()).collect())
                .unwrap_or_default();
            ports.sort();
            let state = ports
                .first()
                .and_then(|port| std::fs::read_to_string(port.join("state")).ok())
                .map(|text| parse_port_state(&text))
                .unwrap_or_default();
            let mut gids = Vec::new();
            for port in &ports {
                let mut files: Vec<_> = std::fs::read_dir(port.join("gids"))
                    .map(|e| e.flatten().map(|f| f.path()).collect())
                    .unwrap_or_default();
                files.sort_by_key(|f| {
                    f.file_name()
                        .and_then(|n| n.to_str()?.parse::<u32>().ok())
                        .unwrap_or(u32::MAX)
                });
                gids.extend(
                    files
                        .iter()
                        .filter_map(|f| std::fs::read_to_string(f).ok())
                        .map(|gid| gid.trim().to_string())
                        .filter(|gid| is_real_gid(gid)),
                );
            }
            Some(RdmaDevice { name, gids, state })
        })
        .collect();
    devices.sort_by(|a, b| a.name.cmp(&b.name));
    devices
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

    #[test]
    fn rdma_devices_are_read_from_sysfs_layout() {
        let root = tempfile::tempdir().unwrap();
        let port = root.path().join("rxe0/ports/1");
        std::fs::create_dir_all(port.join("gids")).unwrap();
        std::fs::write(port.join("state"), "4: ACTIVE\n").unwrap();
        std::fs::write(
            port.join("gids/0"),
            "fe80:0000:0000:0000:5054:00ff:fe12:3456\n",
        )
        .unwrap();
        std::fs::write(
            port.join("gids/1"),
            "0000:0000:0000:0000:0000:ffff:0a00:0001\n",
        )
        .unwrap();
        std::fs::write(
            port.join("gids/2"),
            "0000:0000:0000:0000:0000:0000:0000:0000\n",
        )
        .unwrap();
        std::fs::create_dir_all(root.path().join("mlx5_1/ports/1")).unwrap();
        std::fs::write(root.path().join("mlx5_1/ports/1/state"), "1: DOWN\n").unwrap();
        let devices = rdma_devices(root.path());
        assert_eq!(devices.len(), 2);
        assert_eq!(devices[0].name, "mlx5_1");
        assert_eq!(devices[0].state, "down");
        assert!(devices[0].gids.is_empty());
        assert_eq!(devices[1].name, "rxe0");
        assert_eq!(devices[1].state, "active");
        assert_eq!(
            devices[1].gids,
            [
                "fe80:0000:0000:0000:5054:00ff:fe12:3456",
                "0000:0000:0000:0000:0000:ffff:0a00:0001"
            ]
        );
        assert!(rdma_devices(&root.path().join("missing")).is_empty());
    }

    #[test]
    fn discovery_on_this_machine_does_not_fail() {
        let caps = discover("n1");
        assert_eq!(caps.node, "n1");
        // Every Linux kernel has at least one congestion control.
        assert!(!caps.available_congestion_control.is_empty());
        assert!(caps.hugepages_free <= caps.hugepages_total);
    }
}
