//! RDMA discovery: what `/sys/class/infiniband` (devices, ports, typed GIDs), `/sys/class/net`
//! (netdev MTUs) and `/dev/infiniband` (`rdma_cm`, `uverbsN`) say about this machine, why RDMA
//! is unusable ([`unavailable_reason`]), and what a user of it needs ([`usable`]).
//!
//! The node agent reports it to the controller; the `LD_PRELOAD` shim asks it locally whether
//! this process can use RDMA. Every read is of plain files below a root (`/` in production, a
//! temporary tree in tests) and any error reads as "absent": nothing here can fail.
#![forbid(unsafe_code)]

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::path::{Path, PathBuf};

/// The environment variable naming the addresses a queue pair's GID should carry, in order of
/// preference (comma-separated): the agent sets it for a pod's stack instance to the addresses
/// of the pod's network namespace, secondary networks' (Multus attachments: where RoCE usually
/// runs) before the pod's cluster IPs.
pub const ADDRESSES_VAR: &str = "STACKROUTE_RDMA_ADDRESSES";

/// Non-zero GIDs kept per port; a port with more IP addresses than that keeps its lowest
/// indexes (the kernel's tables are 16..256 entries, one or two per address).
pub const MAX_GIDS_PER_PORT: usize = 32;

/// What this machine has for RDMA.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Discovery {
    /// Sorted by name.
    pub devices: Vec<Device>,
    /// `/dev/infiniband/rdma_cm` exists (`rdma_ucm` loaded and the node visible).
    pub rdma_cm: bool,
    /// `uverbsN` names in `/dev/infiniband`, sorted.
    pub uverbs: Vec<String>,
}

/// One RDMA device (`/sys/class/infiniband/NAME`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Device {
    pub name: String,
    /// Sorted by number.
    pub ports: Vec<Port>,
}

/// One port of a device (`ports/N`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Port {
    pub number: u32,
    /// Lower case, without the number: `"4: ACTIVE"` reads `"active"`.
    pub state: String,
    /// Lower case, without the number: `"5: LinkUp"` reads `"linkup"`.
    pub phys_state: String,
    /// `"Ethernet"` (RoCE) or `"InfiniBand"`, as sysfs spells it.
    pub link_layer: String,
    /// RoCE path MTU derived from the netdev's MTU ([`roce_active_mtu`]); 0 when unknown
    /// (InfiniBand, or no netdev).
    pub active_mtu: u32,
    /// Non-zero GIDs by index, at most [`MAX_GIDS_PER_PORT`].
    pub gids: Vec<Gid>,
}

/// One populated GID table entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Gid {
    pub index: u32,
    /// As sysfs shows it: `fe80:0000:0000:0000:0202:c9ff:fe00:0001` ([`parse_gid`]).
    pub gid: String,
    /// `gid_attrs/types`: `"RoCE v2"`, `"IB/RoCE v1"`; empty when unreadable.
    pub kind: String,
    /// `gid_attrs/ndevs`: the netdev the GID comes from; empty when none.
    pub netdev: String,
}

/// Reads `ROOT/sys/class/infiniband`, `ROOT/sys/class/net`, `ROOT/dev/infiniband` (ROOT = "/"
/// in production).
pub fn discover(root: &Path) -> Discovery {
    let devices = devices(
        &root.join("sys/class/infiniband"),
        &root.join("sys/class/net"),
    );
    let dev = root.join("dev/infiniband");
    let mut uverbs: Vec<String> = std::fs::read_dir(&dev)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .filter(|name| name.starts_with("uverbs"))
                .collect()
        })
        .unwrap_or_default();
    uverbs.sort();
    Discovery {
        devices,
        rdma_cm: dev.join("rdma_cm").exists(),
        uverbs,
    }
}

/// The devices under `class`, sorted by name; `net` gives the netdev MTUs. No directory: none.
fn devices(class: &Path, net: &Path) -> Vec<Device> {
    let Ok(entries) = std::fs::read_dir(class) else {
        return Vec::new();
    };
    let mut devices: Vec<Device> = entries
        .flatten()
        .filter_map(|device| {
            let name = device.file_name().to_str()?.to_string();
            let mut ports: Vec<Port> = std::fs::read_dir(device.path().join("ports"))
                .map(|e| e.flatten().filter_map(|p| port(&p.path(), net)).collect())
                .unwrap_or_default();
            ports.sort_by_key(|port| port.number);
            Some(Device { name, ports })
        })
        .collect();
    devices.sort_by(|a, b| a.name.cmp(&b.name));
    devices
}

/// One `ports/N` directory; `None` unless its name is a port number.
fn port(dir: &Path, net: &Path) -> Option<Port> {
    let number = dir.file_name()?.to_str()?.parse().ok()?;
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
    let link_layer = read("link_layer").trim().to_string();
    let mut files: Vec<(u32, PathBuf)> = std::fs::read_dir(dir.join("gids"))
        .map(|e| {
            e.flatten()
                .filter_map(|f| Some((f.file_name().to_str()?.parse().ok()?, f.path())))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    let gids: Vec<Gid> = files
        .iter()
        .filter_map(|(index, file)| {
            let gid = std::fs::read_to_string(file).ok()?.trim().to_string();
            // Unused table entries read as zeros, and their gid_attrs fail to read.
            is_real_gid(&gid).then(|| Gid {
                index: *index,
                gid,
                kind: read(&format!("gid_attrs/types/{index}")).trim().to_string(),
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
    Some(Port {
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

/// A GID worth keeping: one [`parse_gid`] reads, not all zeros (an unused table entry).
fn is_real_gid(gid: &str) -> bool {
    parse_gid(gid).is_some_and(|bytes| bytes != [0; 16])
}

/// A GID as sysfs shows it, eight groups of (up to) four hex digits
/// (`fe80:0000:0000:0000:0202:c9ff:fe00:0001`), as its 16 bytes in network order.
pub fn parse_gid(text: &str) -> Option<[u8; 16]> {
    let mut bytes = [0; 16];
    let mut groups = text.trim().split(':');
    for pair in bytes.chunks_exact_mut(2) {
        let group = groups.next()?;
        if group.is_empty() || group.len() > 4 || !group.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        pair.copy_from_slice(&u16::from_str_radix(group, 16).ok()?.to_be_bytes());
    }
    groups.next().is_none().then_some(bytes)
}

/// The GID a RoCE port gives `ip`: an IPv4 address mapped (`::ffff:a.b.c.d`), an IPv6 one as
/// it is.
pub fn address_gid(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The address a GID stands for, for people: an IPv4-mapped GID as the IPv4 address, any other
/// as IPv6 (a link-local `fe80::…` GID is a RoCE v1 / InfiniBand port GID, not an address
/// a peer routes to).
pub fn gid_address(gid: [u8; 16]) -> IpAddr {
    Ipv6Addr::from(gid).to_canonical()
}

/// A GID as sysfs writes it, eight groups of four hex digits ([`parse_gid`]'s inverse).
pub fn format_gid(gid: [u8; 16]) -> String {
    gid.chunks_exact(2)
        .map(|pair| format!("{:02x}{:02x}", pair[0], pair[1]))
        .collect::<Vec<_>>()
        .join(":")
}

/// The addresses in this process's [`ADDRESSES_VAR`] (none when it is not set).
pub fn preferred_addresses() -> Result<Vec<IpAddr>, String> {
    std::env::var(ADDRESSES_VAR).map_or(Ok(Vec::new()), |text| parse_addresses(&text))
}

/// [`ADDRESSES_VAR`]'s value: addresses separated by commas (blanks ignored).
pub fn parse_addresses(text: &str) -> Result<Vec<IpAddr>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|part| !part.is_empty())
        .map(|part| {
            part.parse()
                .map_err(|_| format!("{ADDRESSES_VAR}: {part:?} is not an IP address"))
        })
        .collect()
}

/// `"4: ACTIVE"` → `"active"`.
pub fn parse_port_state(text: &str) -> String {
    let text = text.trim();
    text.split_once(':')
        .map_or(text, |(_, state)| state.trim())
        .to_ascii_lowercase()
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

/// Why RDMA is unusable, first missing thing first; `None` when usable. Some device needs an
/// ACTIVE port with a GID, and `/dev/infiniband/rdma_cm` and a `uverbs` device must be there
/// (rsocket opens both). The first problem on that path is named, with the ports concerned.
/// `root` is the one `discovery` was read from (it tells "no RDMA class" from "no device").
pub fn unavailable_reason(discovery: &Discovery, root: &Path) -> Option<String> {
    const SHOWN: usize = 4;
    let devices = &discovery.devices;
    if devices.is_empty() {
        if !root.join("sys/class/infiniband").is_dir() {
            return Some(
                "no /sys/class/infiniband: the kernel has no RDMA subsystem (CONFIG_INFINIBAND) \
                 or no RDMA driver is loaded"
                    .into(),
            );
        }
        return Some(
            "/sys/class/infiniband is empty: no RDMA device (load the NIC's RDMA driver, \
             e.g. mlx5_ib, or add soft RoCE: rdma link add rxe0 type rxe netdev IFACE)"
                .into(),
        );
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
    let active: Vec<_> = ports().filter(|(_, p)| is_active(p)).collect();
    if active.is_empty() {
        let all: Vec<_> = ports().collect();
        if all.is_empty() {
            return Some(format!(
                "devices present but none has a port ({})",
                devices
                    .iter()
                    .map(|d| d.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        let known = |state: &str| {
            if state.is_empty() {
                "unknown".to_string()
            } else {
                state.to_string()
            }
        };
        let shown = all
            .iter()
            .take(SHOWN)
            .map(|(d, p)| {
                format!(
                    "{} port {}: {}/{}",
                    d.name,
                    p.number,
                    known(&p.state),
                    known(&p.phys_state)
                )
            })
            .collect();
        return Some(format!(
            "devices present but no port is ACTIVE ({}): check the link and the netdev is up",
            describe(shown, all.len())
        ));
    }
    if !active.iter().any(|(_, p)| has_gid(p)) {
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
        return Some(format!(
            "no RoCE GID on any active port ({}): {hint}",
            describe(shown, active.len())
        ));
    }
    let mut missing = Vec::new();
    if !discovery.rdma_cm {
        missing.push("/dev/infiniband/rdma_cm missing: rdma_ucm module not loaded");
    }
    if discovery.uverbs.is_empty() {
        missing.push("/dev/infiniband/uverbs* missing: ib_uverbs module not loaded");
    }
    if missing.is_empty() {
        return None;
    }
    Some(format!(
        "{} (or /dev/infiniband is not visible to the agent)",
        missing.join("; ")
    ))
}

fn is_active(port: &Port) -> bool {
    port.state == "active"
}

/// Whether `port` has a GID [`usable`] would take (discovery keeps no other kind).
fn has_gid(port: &Port) -> bool {
    port.gids.iter().any(|g| is_real_gid(&g.gid))
}

/// What a user of RDMA needs: the device, port and GID to bind to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Usable {
    pub device: String,
    pub port: u32,
    pub gid_index: u32,
    /// The GID's bytes, network order.
    pub gid: [u8; 16],
    /// 2 for a "RoCE v2" GID, 1 for "IB/RoCE v1" on Ethernet, `None` on InfiniBand or unknown.
    pub roce_version: Option<u32>,
}

/// Why [`usable`] found nothing ([`unavailable_reason`] says it in words).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unavailable {
    /// No RDMA class directory, an empty one, or `/dev/infiniband/rdma_cm` or every
    /// `uverbsN` missing.
    NoDevice,
    /// Devices, but no port is ACTIVE.
    NoActivePort,
    /// ACTIVE ports, none with a non-zero GID.
    NoGid,
}

impl Unavailable {
    /// A stable short name for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoDevice => "no_device",
            Self::NoActivePort => "no_active_port",
            Self::NoGid => "no_gid",
        }
    }
}

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NoDevice => "no usable RDMA device",
            Self::NoActivePort => "no ACTIVE RDMA port",
            Self::NoGid => "no GID on an ACTIVE RDMA port",
        })
    }
}

impl std::error::Error for Unavailable {}

/// What a user of RDMA needs: the first ACTIVE port (devices by name, ports by number) with a
/// non-zero GID, preferring a RoCE v2 GID on any such port, then the lowest index; with the
/// device nodes present. Problems are judged in [`unavailable_reason`]'s order (devices, an
/// ACTIVE port, a GID, then the device nodes), so `usable` is `Err` exactly when it is `Some`.
pub fn usable(discovery: &Discovery) -> Result<Usable, Unavailable> {
    usable_for(discovery, &[])
}

/// [`usable`], choosing first the RoCE v2 GID that carries one of `preferred` (earlier
/// addresses first), then a RoCE v1 one that does: the GID of the address the peer reaches
/// this side at (a RoCE GID table holds the addresses of the RDMA netdevs, so only this
/// pod's secondary-network address can match, not another pod's on a shared device). Without
/// such a GID, [`usable`]'s choice.
pub fn usable_for(discovery: &Discovery, preferred: &[IpAddr]) -> Result<Usable, Unavailable> {
    if discovery.devices.is_empty() {
        return Err(Unavailable::NoDevice);
    }
    let active = || {
        discovery
            .devices
            .iter()
            .flat_map(|d| d.ports.iter().map(move |p| (d, p)))
            .filter(|(_, p)| is_active(p))
    };
    if active().next().is_none() {
        return Err(Unavailable::NoActivePort);
    }
    let candidates = || {
        active().flat_map(|(d, p)| {
            p.gids.iter().filter_map(move |g| {
                let bytes = parse_gid(&g.gid).filter(|bytes| *bytes != [0; 16])?;
                Some(Usable {
                    device: d.name.clone(),
                    port: p.number,
                    gid_index: g.index,
                    gid: bytes,
                    roce_version: roce_version(&p.link_layer, &g.kind),
                })
            })
        })
    };
    let carrying = |version| {
        preferred.iter().find_map(|ip| {
            let gid = address_gid(*ip);
            candidates().find(|u| u.gid == gid && u.roce_version == Some(version))
        })
    };
    let found = carrying(2)
        .or_else(|| carrying(1))
        .or_else(|| candidates().find(|u| u.roce_version == Some(2)))
        .or_else(|| candidates().next())
        .ok_or(Unavailable::NoGid)?;
    if !discovery.rdma_cm || discovery.uverbs.is_empty() {
        return Err(Unavailable::NoDevice);
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

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

        fn discover(&self) -> (Discovery, Option<String>) {
            let discovery = discover(self.path());
            let reason = unavailable_reason(&discovery, self.path());
            (discovery, reason)
        }
    }

    const ZERO_GID: &str = "0000:0000:0000:0000:0000:0000:0000:0000";
    const LINK_LOCAL: &str = "fe80:0000:0000:0000:5054:00ff:fe12:3456";
    const LINK_LOCAL_BYTES: [u8; 16] = [
        0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0x50, 0x54, 0x00, 0xff, 0xfe, 0x12, 0x34, 0x56,
    ];
    const V4_MAPPED: &str = "0000:0000:0000:0000:0000:ffff:0a00:0001";
    const V4_MAPPED_BYTES: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 1];

    fn gid(index: u32, gid: &str, kind: &str, netdev: &str) -> Gid {
        Gid {
            index,
            gid: gid.into(),
            kind: kind.into(),
            netdev: netdev.into(),
        }
    }

    #[test]
    fn active_roce_v2_port_reads_typed_gids_netdev_and_mtu() {
        let root = FakeRoot::new();
        root.port("rxe0", 1, "4: ACTIVE", "5: LinkUp", "Ethernet");
        root.gid("rxe0", 1, 0, LINK_LOCAL, Some(("RoCE v2", "eth0")));
        root.gid("rxe0", 1, 1, V4_MAPPED, Some(("RoCE v2", "eth0")));
        root.gid("rxe0", 1, 2, ZERO_GID, None);
        root.write("sys/class/net/eth0/mtu", "1500\n");
        root.dev_nodes();

        let (discovery, reason) = root.discover();
        assert_eq!(reason, None, "{discovery:?}");
        assert_eq!(
            discovery,
            Discovery {
                devices: vec![Device {
                    name: "rxe0".into(),
                    ports: vec![Port {
                        number: 1,
                        state: "active".into(),
                        phys_state: "linkup".into(),
                        link_layer: "Ethernet".into(),
                        // 1500 - 96 bytes of RoCE headers = 1404: the largest IB MTU below is 1024.
                        active_mtu: 1024,
                        gids: vec![
                            gid(0, LINK_LOCAL, "RoCE v2", "eth0"),
                            gid(1, V4_MAPPED, "RoCE v2", "eth0"),
                        ],
                    }],
                }],
                rdma_cm: true,
                uverbs: vec!["uverbs0".into()],
            }
        );
        assert_eq!(
            usable(&discovery),
            Ok(Usable {
                device: "rxe0".into(),
                port: 1,
                gid_index: 0,
                gid: LINK_LOCAL_BYTES,
                roce_version: Some(2),
            })
        );
    }

    #[test]
    fn gid_types_and_link_layers_give_roce_versions_and_mtus() {
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

        let (discovery, reason) = root.discover();
        assert_eq!(reason, None);
        let eth = &discovery.devices[0].ports[0];
        assert_eq!(eth.active_mtu, 4096);
        let versions: Vec<_> = eth
            .gids
            .iter()
            .map(|g| roce_version(&eth.link_layer, &g.kind))
            .collect();
        assert_eq!(versions, [Some(1), Some(2)]);
        let ib = &discovery.devices[1].ports[0];
        assert_eq!(ib.active_mtu, 0, "unknown on InfiniBand");
        assert_eq!(ib.gids[0].kind, "IB/RoCE v1");
        assert_eq!(roce_version(&ib.link_layer, &ib.gids[0].kind), None);
        // RoCE v2 is preferred over the v1 entry of the same address.
        let found = usable(&discovery).unwrap();
        assert_eq!(
            (found.device.as_str(), found.gid_index, found.roce_version),
            ("mlx5_0", 1, Some(2))
        );
    }

    #[test]
    fn the_gid_carrying_a_preferred_address_wins() {
        let root = FakeRoot::new();
        root.port("mlx5_0", 1, "4: ACTIVE", "5: LinkUp", "Ethernet");
        // A shared device: the host's address and two pods' secondary-network addresses,
        // each as RoCE v1 and v2 entries.
        let entries = [
            (0, LINK_LOCAL, "IB/RoCE v1"),
            (1, LINK_LOCAL, "RoCE v2"),
            (2, "0000:0000:0000:0000:0000:ffff:0a00:0001", "IB/RoCE v1"),
            (3, "0000:0000:0000:0000:0000:ffff:0a00:0001", "RoCE v2"),
            (4, "0000:0000:0000:0000:0000:ffff:c0a8:6407", "IB/RoCE v1"),
            (5, "0000:0000:0000:0000:0000:ffff:c0a8:6407", "RoCE v2"),
            (6, "0000:0000:0000:0000:0000:ffff:c0a8:6408", "RoCE v2"),
        ];
        for (index, gid, kind) in entries {
            root.gid("mlx5_0", 1, index, gid, Some((kind, "ens1f0")));
        }
        root.dev_nodes();
        let (discovery, _) = root.discover();
        let pod: IpAddr = "192.168.100.7".parse().unwrap();
        let cluster: IpAddr = "10.244.1.5".parse().unwrap();
        let found = usable_for(&discovery, &[pod, cluster]).unwrap();
        assert_eq!((found.gid_index, found.roce_version), (5, Some(2)));
        assert_eq!(gid_address(found.gid), pod);
        // Order is preference: the first address with a GID.
        let other: IpAddr = "192.168.100.8".parse().unwrap();
        assert_eq!(
            usable_for(&discovery, &[cluster, other, pod])
                .unwrap()
                .gid_index,
            6
        );
        // No preferred address on the device: the first RoCE v2 GID, as `usable`.
        let found = usable_for(&discovery, &[cluster]).unwrap();
        assert_eq!(found, usable(&discovery).unwrap());
        assert_eq!(found.gid_index, 1);
        // IPv6 addresses are their own GIDs; link-local GIDs read as IPv6.
        let v6: IpAddr = "fd00::7".parse().unwrap();
        assert_eq!(
            address_gid(v6),
            "fd00::7".parse::<Ipv6Addr>().unwrap().octets()
        );
        assert_eq!(gid_address(address_gid(v6)), v6);
        assert_eq!(
            gid_address(parse_gid(LINK_LOCAL).unwrap()),
            "fe80::5054:ff:fe12:3456".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn address_lists_parse_or_name_the_bad_entry() {
        assert_eq!(
            parse_addresses(" 192.168.100.7, fd00::7,,").unwrap(),
            [
                "192.168.100.7".parse::<IpAddr>().unwrap(),
                "fd00::7".parse().unwrap()
            ]
        );
        assert_eq!(parse_addresses("").unwrap(), Vec::<IpAddr>::new());
        for text in [LINK_LOCAL, V4_MAPPED] {
            assert_eq!(format_gid(parse_gid(text).unwrap()), text);
        }
        let error = parse_addresses("10.0.0.1,eth0").unwrap_err();
        assert!(
            error.contains("\"eth0\"") && error.contains(ADDRESSES_VAR),
            "{error}"
        );
    }

    #[test]
    fn gid_table_is_bounded_per_port() {
        let root = FakeRoot::new();
        root.port("rxe0", 1, "4: ACTIVE", "5: LinkUp", "Ethernet");
        for index in 0..MAX_GIDS_PER_PORT as u32 + 5 {
            let gid = format!("fe80:0000:0000:0000:0000:0000:0000:{:04x}", index + 1);
            root.gid("rxe0", 1, index, &gid, Some(("RoCE v2", "eth0")));
        }
        let (discovery, _) = root.discover();
        let gids = &discovery.devices[0].ports[0].gids;
        assert_eq!(gids.len(), MAX_GIDS_PER_PORT);
        assert_eq!(gids.last().unwrap().index, MAX_GIDS_PER_PORT as u32 - 1);
    }

    #[test]
    fn down_ports_are_the_reason() {
        let root = FakeRoot::new();
        root.port("mlx5_0", 1, "1: DOWN", "3: Disabled", "Ethernet");
        root.gid("mlx5_0", 1, 0, LINK_LOCAL, Some(("RoCE v2", "ens1f0")));
        root.port("mlx5_0", 2, "2: INIT", "2: Polling", "Ethernet");
        root.dev_nodes();

        let (discovery, reason) = root.discover();
        assert_eq!(discovery.devices.len(), 1, "a down device is still read");
        assert_eq!(discovery.devices[0].ports.len(), 2);
        assert_eq!(discovery.devices[0].ports[0].state, "down");
        assert_eq!(
            reason.as_deref(),
            Some(
                "devices present but no port is ACTIVE (mlx5_0 port 1: down/disabled, mlx5_0 \
                 port 2: init/polling): check the link and the netdev is up"
            )
        );
        assert_eq!(usable(&discovery), Err(Unavailable::NoActivePort));
    }

    #[test]
    fn an_active_port_without_gids_is_the_reason() {
        let root = FakeRoot::new();
        root.port("rxe0", 1, "4: ACTIVE", "5: LinkUp", "Ethernet");
        root.gid("rxe0", 1, 0, ZERO_GID, None);
        root.port("rxe1", 1, "1: DOWN", "3: Disabled", "Ethernet");
        root.gid("rxe1", 1, 0, LINK_LOCAL, Some(("RoCE v2", "eth1")));
        root.dev_nodes();

        let (discovery, reason) = root.discover();
        assert!(discovery.devices[0].ports[0].gids.is_empty());
        assert_eq!(
            reason.as_deref(),
            Some(
                "no RoCE GID on any active port (rxe0 port 1): RoCE GIDs come from the IP \
                 addresses of the port's netdev, which has none"
            )
        );
        assert_eq!(usable(&discovery), Err(Unavailable::NoGid));
    }

    #[test]
    fn missing_device_nodes_are_the_reason() {
        let root = FakeRoot::new();
        root.port("rxe0", 1, "4: ACTIVE", "5: LinkUp", "Ethernet");
        root.gid("rxe0", 1, 0, LINK_LOCAL, Some(("RoCE v2", "eth0")));
        let (discovery, reason) = root.discover();
        assert!(!discovery.rdma_cm && discovery.uverbs.is_empty());
        assert_eq!(
            reason.as_deref(),
            Some(
                "/dev/infiniband/rdma_cm missing: rdma_ucm module not loaded; \
                 /dev/infiniband/uverbs* missing: ib_uverbs module not loaded \
                 (or /dev/infiniband is not visible to the agent)"
            )
        );
        assert_eq!(usable(&discovery), Err(Unavailable::NoDevice));

        root.write("dev/infiniband/uverbs0", "");
        let (discovery, reason) = root.discover();
        assert_eq!(discovery.uverbs, ["uverbs0"]);
        assert_eq!(
            reason.as_deref(),
            Some(
                "/dev/infiniband/rdma_cm missing: rdma_ucm module not loaded \
                 (or /dev/infiniband is not visible to the agent)"
            )
        );
        assert_eq!(usable(&discovery), Err(Unavailable::NoDevice));

        root.write("dev/infiniband/rdma_cm", "");
        assert!(root.discover().1.is_none());
        assert!(usable(&root.discover().0).is_ok());
    }

    #[test]
    fn no_rdma_class_or_an_empty_one_is_the_reason() {
        let root = FakeRoot::new();
        let (none, reason) = root.discover();
        assert!(none.devices.is_empty());
        assert!(
            reason
                .as_deref()
                .is_some_and(|r| r.starts_with("no /sys/class/infiniband: ")),
            "{reason:?}"
        );
        assert_eq!(usable(&none), Err(Unavailable::NoDevice));

        std::fs::create_dir_all(root.path().join("sys/class/infiniband")).unwrap();
        let (empty, reason) = root.discover();
        assert!(empty.devices.is_empty());
        assert!(
            reason
                .as_deref()
                .is_some_and(|r| r.starts_with("/sys/class/infiniband is empty: ")),
            "{reason:?}"
        );
        assert_eq!(usable(&empty), Err(Unavailable::NoDevice));
    }

    #[test]
    fn a_device_without_ports_is_the_reason() {
        let root = FakeRoot::new();
        std::fs::create_dir_all(root.path().join("sys/class/infiniband/rxe0/ports")).unwrap();
        root.dev_nodes();
        let (discovery, reason) = root.discover();
        assert_eq!(
            reason.as_deref(),
            Some("devices present but none has a port (rxe0)")
        );
        assert_eq!(usable(&discovery), Err(Unavailable::NoActivePort));
    }

    /// A port as discovery reads it, for the in-memory `usable` cases.
    fn port(number: u32, state: &str, link_layer: &str, gids: Vec<Gid>) -> Port {
        Port {
            number,
            state: state.into(),
            phys_state: "linkup".into(),
            link_layer: link_layer.into(),
            active_mtu: 1024,
            gids,
        }
    }

    fn with_nodes(devices: Vec<Device>) -> Discovery {
        Discovery {
            devices,
            rdma_cm: true,
            uverbs: vec!["uverbs0".into()],
        }
    }

    #[test]
    fn usable_takes_an_active_roce_v2_port() {
        let discovery = with_nodes(vec![Device {
            name: "rxe0".into(),
            ports: vec![port(
                1,
                "active",
                "Ethernet",
                vec![gid(3, V4_MAPPED, "RoCE v2", "eth0")],
            )],
        }]);
        assert_eq!(
            usable(&discovery),
            Ok(Usable {
                device: "rxe0".into(),
                port: 1,
                gid_index: 3,
                gid: V4_MAPPED_BYTES,
                roce_version: Some(2),
            })
        );
        assert_eq!(
            unavailable_reason(&discovery, Path::new("/nonexistent")),
            None
        );
    }

    #[test]
    fn usable_skips_down_ports_and_prefers_roce_v2() {
        let discovery = with_nodes(vec![
            Device {
                name: "mlx5_0".into(),
                ports: vec![
                    port(
                        1,
                        "down",
                        "Ethernet",
                        vec![gid(0, LINK_LOCAL, "RoCE v2", "a")],
                    ),
                    port(
                        2,
                        "active",
                        "Ethernet",
                        vec![gid(0, LINK_LOCAL, "IB/RoCE v1", "b")],
                    ),
                ],
            },
            Device {
                name: "mlx5_1".into(),
                ports: vec![port(
                    1,
                    "active",
                    "Ethernet",
                    vec![
                        gid(0, LINK_LOCAL, "IB/RoCE v1", "c"),
                        gid(1, V4_MAPPED, "RoCE v2", "c"),
                    ],
                )],
            },
        ]);
        let found = usable(&discovery).unwrap();
        assert_eq!(
            (
                found.device.as_str(),
                found.port,
                found.gid_index,
                found.gid
            ),
            ("mlx5_1", 1, 1, V4_MAPPED_BYTES)
        );

        // Without any RoCE v2 GID: the first GID of the first active port.
        let v1_only = with_nodes(vec![discovery.devices[0].clone()]);
        assert_eq!(
            usable(&v1_only),
            Ok(Usable {
                device: "mlx5_0".into(),
                port: 2,
                gid_index: 0,
                gid: LINK_LOCAL_BYTES,
                roce_version: Some(1),
            })
        );

        // InfiniBand: no RoCE version.
        let ib = with_nodes(vec![Device {
            name: "mlx5_2".into(),
            ports: vec![port(
                1,
                "active",
                "InfiniBand",
                vec![gid(0, LINK_LOCAL, "IB/RoCE v1", "")],
            )],
        }]);
        assert_eq!(usable(&ib).unwrap().roce_version, None);
    }

    #[test]
    fn usable_says_what_is_missing() {
        let device = |ports| Device {
            name: "rxe0".into(),
            ports,
        };
        let down = with_nodes(vec![device(vec![port(
            1,
            "down",
            "Ethernet",
            vec![gid(0, LINK_LOCAL, "RoCE v2", "eth0")],
        )])]);
        assert_eq!(usable(&down), Err(Unavailable::NoActivePort));

        let no_gids = with_nodes(vec![device(vec![port(1, "active", "Ethernet", vec![])])]);
        assert_eq!(usable(&no_gids), Err(Unavailable::NoGid));

        let good = vec![device(vec![port(
            1,
            "active",
            "Ethernet",
            vec![gid(0, LINK_LOCAL, "RoCE v2", "eth0")],
        )])];
        let no_rdma_cm = Discovery {
            rdma_cm: false,
            ..with_nodes(good.clone())
        };
        assert_eq!(usable(&no_rdma_cm), Err(Unavailable::NoDevice));
        let no_uverbs = Discovery {
            uverbs: vec![],
            ..with_nodes(good.clone())
        };
        assert_eq!(usable(&no_uverbs), Err(Unavailable::NoDevice));
        assert_eq!(usable(&Discovery::default()), Err(Unavailable::NoDevice));
        assert!(usable(&with_nodes(good)).is_ok());
    }

    #[test]
    fn gids_parse_to_bytes() {
        assert_eq!(parse_gid(LINK_LOCAL), Some(LINK_LOCAL_BYTES));
        assert_eq!(parse_gid(&format!("{V4_MAPPED}\n")), Some(V4_MAPPED_BYTES));
        assert_eq!(
            parse_gid("fe80:0000:0000:0000:0202:c9ff:fe00:0001"),
            Some([
                0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0x02, 0x02, 0xc9, 0xff, 0xfe, 0x00, 0x00, 0x01
            ])
        );
        assert_eq!(parse_gid("FE80:0:0:0:0:0:0:1").map(|b| b[15]), Some(1));
        assert_eq!(parse_gid(ZERO_GID), Some([0; 16]));
        for bad in [
            "",
            "fe80:0000:0000:0000:0202:c9ff:fe00",
            "fe80:0000:0000:0000:0202:c9ff:fe00:0001:0000",
            "fe80::1",
            "fe80:0000:0000:0000:0202:c9ff:fe00:00001",
            "fe80:0000:0000:0000:0202:c9ff:fe00:+001",
            "fe80:0000:0000:0000:0202:c9ff:fe00:000g",
        ] {
            assert_eq!(parse_gid(bad), None, "{bad:?}");
        }
        assert!(!is_real_gid(ZERO_GID));
        assert!(!is_real_gid("garbage"));
        assert!(is_real_gid(LINK_LOCAL));
    }

    #[test]
    fn port_states_parse() {
        assert_eq!(parse_port_state("4: ACTIVE\n"), "active");
        assert_eq!(parse_port_state("5: LinkUp"), "linkup");
        assert_eq!(parse_port_state("DOWN"), "down");
        assert_eq!(parse_port_state(""), "");
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
    fn this_machine_explains_itself() {
        let root = Path::new("/");
        let discovery = discover(root);
        let reason = unavailable_reason(&discovery, root);
        assert_eq!(reason.is_none(), usable(&discovery).is_ok(), "{reason:?}");
        assert_eq!(
            discovery.rdma_cm,
            Path::new("/dev/infiniband/rdma_cm").exists()
        );
        if !Path::new("/sys/class/infiniband").exists() {
            assert!(discovery.devices.is_empty(), "{discovery:?}");
            assert!(
                reason.as_deref().is_some_and(
                    |r| r.contains("/sys/class/infiniband") && r.contains("CONFIG_INFINIBAND")
                ),
                "{reason:?}"
            );
            assert_eq!(usable(&discovery), Err(Unavailable::NoDevice));
        }
    }
}
