//! Capability discovery end to end with real processes: the agent reports what it found on this
//! machine, the controller keeps it in node status, and `stackroute status` shows it.

mod common;

use std::path::Path;

use common::*;
use serde_json::Value;

/// `Max locked memory` (soft, hard) from `/proc/self/limits`, as JSON the CLI would print.
fn memlock_json() -> (Value, Value) {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let line = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max locked memory"))
        .unwrap();
    let value = |word: &str| match word {
        "unlimited" => Value::from("unlimited"),
        bytes => Value::from(bytes.parse::<u64>().unwrap()),
    };
    let words: Vec<&str> = line.split_whitespace().collect();
    (value(words[0]), value(words[1]))
}

#[test]
fn status_shows_the_rdma_the_agent_found() {
    let tmp = tempfile::tempdir().unwrap();
    let (controller, agent) = controller_and_agent(tmp.path());
    let url = format!("http://{}", controller.grpc);
    let node: Value = wait_for("n1's capabilities in status", WAIT, || {
        let status = status_json(&url);
        status["nodes"]
            .as_array()?
            .iter()
            .find(|n| n["node"] == "n1")
            .filter(|n| !n["rdma"].is_null())
            .cloned()
    });
    let rdma = &node["rdma"];
    // The agent inherits this process's limits.
    let (soft, hard) = memlock_json();
    assert_eq!((&rdma["memlockSoft"], &rdma["memlockHard"]), (&soft, &hard));
    assert_eq!(
        rdma["rdmaCm"],
        Path::new("/dev/infiniband/rdma_cm").exists(),
        "{rdma}"
    );
    let reason = rdma["unavailableReason"].as_str().unwrap();
    // The agent's own log line says the same.
    let log = agent.proc.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("node capabilities"))
        .unwrap_or_else(|| panic!("no capabilities line:\n{log}"));
    for field in [
        "rdma=",
        "rdma_cm=",
        "uverbs=",
        "memlock_soft=",
        "memlock_hard=",
        "dpdk_version=",
        "dpdk_unavailable_reason=",
    ] {
        assert!(line.contains(field), "{field} missing: {line}");
    }
    assert!(line.contains(reason), "{line}");
    let text = cli(&["status", "--controller", &url], &[]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("RDMA DEVICES"), "{text}");
    // DPDK as the agent found it (the controller took this machine's PMD list).
    let dpdk = &node["dpdk"];
    let version = dpdk["version"].as_str().unwrap();
    assert_eq!(dpdk["installed"], !version.is_empty(), "{dpdk}");
    if let Some(pkg_config) = std::process::Command::new("pkg-config")
        .args(["--modversion", "libdpdk"])
        .output()
        .ok()
        .filter(|out| out.status.success())
    {
        assert_eq!(version, String::from_utf8_lossy(&pkg_config.stdout).trim());
    }
    let dpdk_reason = dpdk["unavailableReason"].as_str().unwrap();
    assert!(version.is_empty() || line.contains(version), "{line}");
    assert!(line.contains(dpdk_reason), "{line}");
    assert!(text.contains("DPDK VERSION"), "{text}");
    assert!(text.contains(dpdk_reason), "{text}");
    if Path::new("/sys/class/infiniband").exists() {
        // A machine with the RDMA class: devices and reason are whatever it has, but a
        // reason is given exactly when nothing usable was found.
        let usable = rdma["devices"].as_array().unwrap().iter().any(|d| {
            d["ports"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["state"] == "active" && !p["gids"].as_array().unwrap().is_empty())
        }) && rdma["rdmaCm"] == true
            && !rdma["uverbs"].as_array().unwrap().is_empty();
        assert_eq!(reason.is_empty(), usable, "{rdma}");
    } else {
        assert_eq!(rdma["devices"], serde_json::json!([]), "{rdma}");
        assert!(
            reason.starts_with("no /sys/class/infiniband: ")
                && reason.contains("CONFIG_INFINIBAND"),
            "{rdma}"
        );
        assert!(text.contains(reason), "{text}");
    }
}
