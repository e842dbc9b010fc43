//! `stackroute status`: nodes, their acked revisions and stale agents, what RDMA and DPDK each
//! node's agent found (or why none is usable), and per-policy Accepted/Programmed, from a
//! controller's `GetStatus`.

use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::{Value, json};
use stackroute_proto::client;
use stackroute_proto::v1alpha1::{NodeCapabilities, StatusRequest, StatusResponse};

/// Fetches the status from `controller` (HOST:PORT).
pub(crate) fn fetch(controller: &str, security: &client::Security) -> Result<StatusResponse> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let mut client = client::connect(controller, security)
            .await
            .with_context(|| format!("{controller}: cannot connect"))?;
        let status =
            tokio::time::timeout(Duration::from_secs(10), client.get_status(StatusRequest {}))
                .await
                .with_context(|| format!("{controller}: GetStatus timed out"))?
                .map_err(|status| {
                    anyhow::anyhow!("{controller}: GetStatus refused: {}", status.message())
                })?;
        Ok(status.into_inner())
    })
}

/// The status as JSON.
pub(crate) fn to_json(status: &StatusResponse) -> Value {
    json!({
        "revision": status.revision,
        "listeners": status.listeners,
        "workloads": status.workloads,
        "nodes": status.nodes.iter().map(|n| json!({
            "node": n.node,
            "agents": n.agents,
            "ackedRevision": n.acked_revision,
            "connected": n.connected,
            "stale": n.stale,
            "rdma": n.capabilities.as_ref().map(rdma_json),
            "dpdk": n.capabilities.as_ref().map(dpdk_json),
        })).collect::<Vec<_>>(),
        "policies": status.policies.iter().map(|p| json!({
            "kind": p.kind,
            "namespace": p.namespace,
            "name": p.name,
            "accepted": p.accepted,
            "message": p.message,
            "programmed": p.programmed,
            "targetNodes": p.target_nodes,
            "programmedNodes": p.programmed_nodes,
            "shadowedRules": p.shadowed_rules,
        })).collect::<Vec<_>>(),
        "sourceErrors": status.source_errors,
    })
}

/// A node's RDMA report as JSON (`null` until its agent reports capabilities).
fn rdma_json(caps: &NodeCapabilities) -> Value {
    let limit = |bytes: u64| {
        if bytes == u64::MAX {
            json!("unlimited")
        } else {
            json!(bytes)
        }
    };
    json!({
        "devices": caps.rdma_devices.iter().map(|d| json!({
            "name": d.name,
            "roceVersions": d.roce_versions,
            "ports": d.ports.iter().map(|p| json!({
                "number": p.number,
                "state": p.state,
                "physState": p.phys_state,
                "linkLayer": p.link_layer,
                "activeMtu": p.active_mtu,
                "gids": p.gids.iter().map(|g| json!({
                    "index": g.index,
                    "gid": g.gid,
                    "type": g.r#type,
                    "netdev": g.netdev,
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "rdmaCm": caps.rdma_cm_device,
        "uverbs": caps.uverbs_devices,
        "memlockSoft": limit(caps.memlock_soft),
        "memlockHard": limit(caps.memlock_hard),
        "unavailableReason": caps.rdma_unavailable_reason,
    })
}

/// A node's DPDK report as JSON (`null` until its agent reports capabilities). An agent that
/// predates the detail gives only `installed`, with `version` etc. empty.
fn dpdk_json(caps: &NodeCapabilities) -> Value {
    let detail = caps.dpdk_detail.clone().unwrap_or_default();
    json!({
        "installed": caps.dpdk,
        "version": detail.version,
        "pmds": detail.pmds,
        "boundDevices": detail.bound_devices.iter().map(|d| json!({
            "pciAddress": d.pci_address,
            "driver": d.driver,
        })).collect::<Vec<_>>(),
        "vfio": detail.vfio,
        "hugepagesTotal": caps.hugepages_total,
        "hugepagesFree": caps.hugepages_free,
        "hugepageSizeKib": detail.hugepage_size_kib,
        "unavailableReason": detail.unavailable_reason,
    })
}

/// A memlock limit for people: "unlimited", or bytes in KiB/MiB/GiB when exact.
fn limit_text(bytes: u64) -> String {
    if bytes == u64::MAX {
        return "unlimited".into();
    }
    for (unit, size) in [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if bytes >= size && bytes.is_multiple_of(size) {
            return format!("{}{unit}", bytes / size);
        }
    }
    format!("{bytes}B")
}

/// One row of the RDMA table: devices with their active ports, RoCE versions, memlock, reason.
fn rdma_row(node: &str, caps: &NodeCapabilities) -> Vec<String> {
    let devices: Vec<String> = caps
        .rdma_devices
        .iter()
        .map(|d| {
            let active = d.ports.iter().filter(|p| p.state == "active").count();
            format!("{}({active}/{} active)", d.name, d.ports.len())
        })
        .collect();
    let mut roce: Vec<u32> = caps
        .rdma_devices
        .iter()
        .flat_map(|d| d.roce_versions.iter().copied())
        .collect();
    roce.sort_unstable();
    roce.dedup();
    let or_dash = |text: String| if text.is_empty() { "-".into() } else { text };
    // An agent that predates these fields reports neither a memlock nor a reason.
    let memlock = if caps.memlock_soft == 0 && caps.memlock_hard == 0 {
        "-".into()
    } else {
        format!(
            "{}/{}",
            limit_text(caps.memlock_soft),
            limit_text(caps.memlock_hard)
        )
    };
    let reason = if caps.rdma_unavailable_reason.is_empty() && !caps.rdma_devices.is_empty() {
        "usable".into()
    } else {
        or_dash(caps.rdma_unavailable_reason.clone())
    };
    vec![
        node.to_string(),
        or_dash(devices.join(",")),
        or_dash(
            roce.iter()
                .map(|v| format!("v{v}"))
                .collect::<Vec<_>>()
                .join(","),
        ),
        memlock,
        reason,
    ]
}

/// One row of the DPDK table: version, hugepages free/total (and their size), bound devices,
/// VFIO, the reason or `usable`.
fn dpdk_row(node: &str, caps: &NodeCapabilities) -> Vec<String> {
    let or_dash = |text: String| if text.is_empty() { "-".into() } else { text };
    let mut hugepages = format!("{}/{}", caps.hugepages_free, caps.hugepages_total);
    let Some(detail) = &caps.dpdk_detail else {
        // An agent that predates the detail says only whether the library is there.
        let installed = if caps.dpdk { "installed" } else { "-" };
        return vec![
            node.to_string(),
            installed.into(),
            hugepages,
            "-".into(),
            "-".into(),
            "-".into(),
        ];
    };
    if detail.hugepage_size_kib > 0 {
        let size = limit_text(detail.hugepage_size_kib.saturating_mul(1024));
        hugepages.push_str(&format!(" x {size}"));
    }
    let devices: Vec<String> = detail
        .bound_devices
        .iter()
        .map(|d| format!("{}({})", d.pci_address, d.driver))
        .collect();
    let reason = if detail.unavailable_reason.is_empty() && !detail.version.is_empty() {
        "usable".into()
    } else {
        or_dash(detail.unavailable_reason.clone())
    };
    vec![
        node.to_string(),
        or_dash(detail.version.clone()),
        hugepages,
        or_dash(devices.join(",")),
        yes_no(detail.vfio),
        reason,
    ]
}

fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(c, cell)| format!("{cell:<width$}", width = widths[c]))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn yes_no(value: bool) -> String {
    if value { "True" } else { "False" }.to_string()
}

/// The status as tables.
pub(crate) fn to_text(status: &StatusResponse) -> String {
    let mut out = format!(
        "revision {}, {} listener(s), {} workload(s)\n\n",
        status.revision, status.listeners, status.workloads
    );
    let mut nodes = vec![vec![
        "NODE".to_string(),
        "ACKED".into(),
        "CONNECTED".into(),
        "STALE".into(),
        "AGENTS".into(),
    ]];
    for node in &status.nodes {
        nodes.push(vec![
            node.node.clone(),
            node.acked_revision.to_string(),
            yes_no(node.connected),
            yes_no(node.stale),
            node.agents.join(","),
        ]);
    }
    out.push_str(&table(&nodes));
    out.push('\n');
    let mut rdma = vec![vec![
        "NODE".to_string(),
        "RDMA DEVICES".into(),
        "ROCE".into(),
        "MEMLOCK (SOFT/HARD)".into(),
        "RDMA".into(),
    ]];
    for node in &status.nodes {
        if let Some(caps) = &node.capabilities {
            rdma.push(rdma_row(&node.node, caps));
        }
    }
    if rdma.len() > 1 {
        out.push_str(&table(&rdma));
        out.push('\n');
    }
    let mut dpdk = vec![vec![
        "NODE".to_string(),
        "DPDK VERSION".into(),
        "HUGEPAGES (FREE/TOTAL)".into(),
        "BOUND DEVICES".into(),
        "VFIO".into(),
        "DPDK".into(),
    ]];
    for node in &status.nodes {
        if let Some(caps) = &node.capabilities {
            dpdk.push(dpdk_row(&node.node, caps));
        }
    }
    if dpdk.len() > 1 {
        out.push_str(&table(&dpdk));
        out.push('\n');
    }
    let mut policies = vec![vec![
        "KIND".to_string(),
        "NAME".into(),
        "ACCEPTED".into(),
        "PROGRAMMED".into(),
        "NODES".into(),
        "SHADOWED".into(),
        "MESSAGE".into(),
    ]];
    for policy in &status.policies {
        let name = if policy.namespace.is_empty() {
            policy.name.clone()
        } else {
            format!("{}/{}", policy.namespace, policy.name)
        };
        policies.push(vec![
            policy.kind.clone(),
            name,
            yes_no(policy.accepted),
            yes_no(policy.programmed),
            format!("{}/{}", policy.programmed_nodes, policy.target_nodes),
            policy.shadowed_rules.to_string(),
            policy.message.clone(),
        ]);
    }
    out.push_str(&table(&policies));
    for error in &status.source_errors {
        out.push_str(&format!("source error: {error}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use stackroute_proto::v1alpha1::{
        DpdkCapability, DpdkDevice, NodeStatus, RdmaDevice, RdmaGid, RdmaPort,
    };

    use super::*;

    fn status(capabilities: Vec<(&str, NodeCapabilities)>) -> StatusResponse {
        StatusResponse {
            nodes: capabilities
                .into_iter()
                .map(|(node, caps)| NodeStatus {
                    node: node.into(),
                    connected: true,
                    capabilities: Some(caps),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn rdma_capabilities_show_devices_roce_memlock_and_reason() {
        let usable = NodeCapabilities {
            rdma_devices: vec![RdmaDevice {
                name: "rxe0".into(),
                ports: vec![RdmaPort {
                    number: 1,
                    state: "active".into(),
                    phys_state: "linkup".into(),
                    link_layer: "Ethernet".into(),
                    active_mtu: 1024,
                    gids: vec![RdmaGid {
                        index: 1,
                        gid: "0000:0000:0000:0000:0000:ffff:0a00:0001".into(),
                        r#type: "RoCE v2".into(),
                        netdev: "eth0".into(),
                    }],
                }],
                roce_versions: vec![2],
                ..Default::default()
            }],
            rdma_cm_device: true,
            uverbs_devices: vec!["uverbs0".into()],
            memlock_soft: 8 << 20,
            memlock_hard: u64::MAX,
            ..Default::default()
        };
        let without = NodeCapabilities {
            memlock_soft: 65536,
            memlock_hard: 65536,
            rdma_unavailable_reason: "no /sys/class/infiniband: the kernel has no RDMA subsystem"
                .into(),
            ..Default::default()
        };
        let status = status(vec![("n1", usable), ("n2", without)]);
        let text = to_text(&status);
        assert!(
            text.contains("NODE  RDMA DEVICES      ROCE  MEMLOCK (SOFT/HARD)  RDMA\n"),
            "{text}"
        );
        assert!(
            text.contains("n1    rxe0(1/1 active)  v2    8MiB/unlimited       usable\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "n2    -                 -     64KiB/64KiB          no /sys/class/infiniband: \
                 the kernel has no RDMA subsystem\n"
            ),
            "{text}"
        );
        let json = to_json(&status);
        let n1 = &json["nodes"][0]["rdma"];
        assert_eq!(n1["memlockSoft"], 8 << 20);
        assert_eq!(n1["memlockHard"], "unlimited");
        assert_eq!(n1["devices"][0]["roceVersions"], json!([2]));
        assert_eq!(n1["devices"][0]["ports"][0]["gids"][0]["type"], "RoCE v2");
        assert_eq!(n1["devices"][0]["ports"][0]["gids"][0]["netdev"], "eth0");
        assert_eq!(
            json["nodes"][1]["rdma"]["unavailableReason"],
            "no /sys/class/infiniband: the kernel has no RDMA subsystem"
        );
    }

    #[test]
    fn dpdk_capabilities_show_version_hugepages_devices_and_reason() {
        let bound = NodeCapabilities {
            dpdk: true,
            hugepages_total: 64,
            hugepages_free: 60,
            dpdk_detail: Some(DpdkCapability {
                version: "22.11.11".into(),
                pmds: vec!["net_af_packet".into(), "net_memif".into()],
                bound_devices: vec![DpdkDevice {
                    pci_address: "0000:03:00.0".into(),
                    driver: "vfio-pci".into(),
                }],
                vfio: true,
                unavailable_reason: String::new(),
                hugepage_size_kib: 2048,
            }),
            ..Default::default()
        };
        let vdevs = NodeCapabilities {
            dpdk: true,
            dpdk_detail: Some(DpdkCapability {
                version: "22.11.11".into(),
                unavailable_reason: "no hugepages and no device bound to vfio-pci/uio: virtual \
                                     devices only (--no-huge)"
                    .into(),
                hugepage_size_kib: 1 << 20,
                ..Default::default()
            }),
            ..Default::default()
        };
        let missing = NodeCapabilities {
            dpdk_detail: Some(DpdkCapability {
                unavailable_reason: "no DPDK library (install libdpdk-dev dpdk)".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        // An agent that predates the detail.
        let older = NodeCapabilities {
            dpdk: true,
            hugepages_total: 8,
            hugepages_free: 8,
            ..Default::default()
        };
        let status = status(vec![
            ("n1", bound),
            ("n2", vdevs),
            ("n3", missing),
            ("n4", older),
        ]);
        let text = to_text(&status);
        for line in [
            "NODE  DPDK VERSION  HUGEPAGES (FREE/TOTAL)  BOUND DEVICES           VFIO   DPDK\n",
            "n1    22.11.11      60/64 x 2MiB            0000:03:00.0(vfio-pci)  True   usable\n",
            "n2    22.11.11      0/0 x 1GiB              -                       False  no \
             hugepages and no device bound to vfio-pci/uio: virtual devices only (--no-huge)\n",
            "n3    -             0/0                     -                       False  no DPDK \
             library (install libdpdk-dev dpdk)\n",
            "n4    installed     8/8                     -                       -      -\n",
        ] {
            assert!(text.contains(line), "{line:?} missing from:\n{text}");
        }
        let json = to_json(&status);
        let n1 = &json["nodes"][0]["dpdk"];
        assert_eq!(n1["installed"], true);
        assert_eq!(n1["version"], "22.11.11");
        assert_eq!(n1["pmds"], json!(["net_af_packet", "net_memif"]));
        assert_eq!(
            n1["boundDevices"],
            json!([{"pciAddress": "0000:03:00.0", "driver": "vfio-pci"}])
        );
        assert_eq!(n1["vfio"], true);
        assert_eq!(
            (&n1["hugepagesFree"], &n1["hugepagesTotal"]),
            (&json!(60), &json!(64))
        );
        assert_eq!(n1["hugepageSizeKib"], 2048);
        assert_eq!(n1["unavailableReason"], "");
        assert_eq!(
            json["nodes"][2]["dpdk"]["unavailableReason"],
            "no DPDK library (install libdpdk-dev dpdk)"
        );
        assert_eq!(json["nodes"][3]["dpdk"]["installed"], true);
        assert_eq!(json["nodes"][3]["dpdk"]["version"], "");
    }

    #[test]
    fn nodes_without_a_report_show_no_rdma_or_dpdk_table() {
        let status = StatusResponse {
            nodes: vec![NodeStatus {
                node: "n1".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert!(!to_text(&status).contains("RDMA DEVICES"));
        assert!(!to_text(&status).contains("DPDK VERSION"));
        assert_eq!(to_json(&status)["nodes"][0]["rdma"], Value::Null);
        assert_eq!(to_json(&status)["nodes"][0]["dpdk"], Value::Null);
    }
}
