//! RDMA upgrade attempts (issue 16) with real processes: a shim's `shimReport` carries them,
//! the agent keeps them stamped with the caller's workload, pid and time, answers
//! `upgradeAttempts` (root only; tests run as root), bounds what a report may carry, and
//! `stackroute connections` shows them.

mod common;

use std::io::{Read as _, Write as _};
use std::time::{SystemTime, UNIX_EPOCH};

use common::*;
use serde_json::Value;
use stackroute_local_api::frame;
use stackroute_local_api::message::{
    MAX_UPGRADE_REPORT, Request, Response, UpgradeAttempt, UpgradeRecord, UpgradeRole,
};

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn report(upgrades: Vec<UpgradeAttempt>) -> Request {
    Request::ShimReport {
        decisions: Vec::new(),
        fallbacks: Vec::new(),
        upgrades,
    }
}

fn attempts(agent: &Agent) -> Vec<UpgradeRecord> {
    match agent.call(&Request::UpgradeAttempts) {
        Response::Upgrades { attempts } => attempts,
        other => panic!("upgradeAttempts answered {other:?}"),
    }
}

fn declined() -> UpgradeAttempt {
    UpgradeAttempt {
        role: UpgradeRole::Client,
        local: "10.1.0.11:40000".into(),
        remote: "10.1.0.20:5432".into(),
        reason: "peer-declined".into(),
        peer_reason: Some("no-device".into()),
        elapsed_us: 1340,
    }
}

fn unavailable() -> UpgradeAttempt {
    UpgradeAttempt {
        role: UpgradeRole::Server,
        local: "10.1.0.11:7000".into(),
        remote: "10.1.0.12:51000".into(),
        reason: "stack-unavailable".into(),
        peer_reason: None,
        elapsed_us: 80,
    }
}

#[test]
fn upgrade_attempts_are_kept_bounded_and_shown_by_stackroute_connections() {
    let tmp = tempfile::tempdir().unwrap();
    let (_controller, agent) = controller_and_agent(tmp.path());
    // Standalone mode: this process's registration makes it shop/web-1.
    let registered = agent.call(&Request::RegisterWorkload {
        namespace: "shop".into(),
        name: "web-1".into(),
        labels: [("app".to_string(), "web".to_string())].into(),
        ips: Vec::new(),
    });
    assert!(matches!(registered, Response::Ok { .. }), "{registered:?}");

    let before = now_ms();
    let answer = agent.call(&report(vec![declined(), unavailable()]));
    assert!(matches!(answer, Response::Ok { .. }), "{answer:?}");
    let after = now_ms();
    let kept = attempts(&agent);
    assert_eq!(kept.len(), 2, "{kept:?}");
    assert_eq!(kept[0].attempt, declined());
    assert_eq!(kept[1].attempt, unavailable());
    for record in &kept {
        assert_eq!(record.workload.as_deref(), Some("shop/web-1"));
        assert_eq!(record.pid, Some(std::process::id() as i32));
        assert!(
            (before..=after).contains(&record.at_unix_ms),
            "{} not in {before}..={after}",
            record.at_unix_ms
        );
    }

    // Too many attempts, over-long strings, a control sequence: the newest 64 are kept, cut.
    let flood: Vec<UpgradeAttempt> = (0..MAX_UPGRADE_REPORT as u64 + 36)
        .map(|n| UpgradeAttempt {
            local: format!("{}:{n}", "é".repeat(100)),
            reason: format!("no-gid\x1b[2J{}", "z".repeat(300)),
            elapsed_us: n,
            ..unavailable()
        })
        .collect();
    let answer = agent.call(&report(flood));
    assert!(matches!(answer, Response::Ok { .. }), "{answer:?}");
    let kept = attempts(&agent);
    assert_eq!(kept.len(), 2 + MAX_UPGRADE_REPORT);
    let newest = &kept[2..];
    assert_eq!(newest[0].attempt.elapsed_us, 36);
    for record in newest {
        assert_eq!(
            record.attempt.local,
            "é".repeat(64),
            "cut on a char boundary"
        );
        assert!(record.attempt.reason.starts_with("no-gid?[2J"));
        assert_eq!(record.attempt.reason.len(), 128);
    }

    // Malformed reports: an error answer on a connection that stays usable, and an oversized
    // frame that only closes its own connection. The agent goes on serving.
    let mut stream = connect(&agent.socket_dir);
    let bad = br#"{"kind":"shimReport","upgrades":[{"role":"sideways"}]}"#;
    stream.write_all(&(bad.len() as u32).to_le_bytes()).unwrap();
    stream.write_all(bad).unwrap();
    let reply: Response = frame::decode(&frame::read_frame(&mut stream).unwrap()).unwrap();
    assert!(matches!(reply, Response::Error { .. }), "{reply:?}");
    let reply: Response = frame::call(&mut stream, &Request::UpgradeAttempts).unwrap();
    assert!(matches!(reply, Response::Upgrades { .. }), "{reply:?}");
    let mut stream = connect(&agent.socket_dir);
    stream
        .write_all(&(frame::MAX_FRAME as u32 + 1).to_le_bytes())
        .unwrap();
    let _ = frame::read_frame(&mut stream);
    assert_eq!(stream.read(&mut [0; 1]).unwrap_or(0), 0, "closed");
    assert_eq!(attempts(&agent).len(), 2 + MAX_UPGRADE_REPORT);

    let metrics = agent.metrics();
    for line in [
        r#"stackroute_lrd_rdma_upgrade_attempts_total{role="client",reason="peer-declined"} 1"#,
        r#"stackroute_lrd_rdma_upgrade_attempts_total{role="server",reason="stack-unavailable"} 1"#,
        // The cut reasons are no known name any more.
        r#"stackroute_lrd_rdma_upgrade_attempts_total{role="server",reason="other"} 64"#,
        "stackroute_lrd_rdma_upgrade_attempts_dropped_total 36",
        "stackroute_lrd_rdma_upgrade_strings_trimmed_total 128",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }

    // The CLI: JSON lines with path "rdma-upgrade", and the table's section.
    let dir = agent.socket_dir.to_str().unwrap();
    let output = cli(
        &["connections", "--socket-dir", dir, "--output", "json"],
        &[],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let lines: Vec<Value> = serde_json::from_slice(&output.stdout).expect("JSON");
    let upgrades: Vec<&Value> = lines
        .iter()
        .filter(|line| line["path"] == "rdma-upgrade")
        .collect();
    assert_eq!(upgrades.len(), 2 + MAX_UPGRADE_REPORT, "{lines:?}");
    let first = upgrades[0];
    assert_eq!(first["role"], "client");
    assert_eq!(first["local"], "10.1.0.11:40000");
    assert_eq!(first["remote"], "10.1.0.20:5432");
    assert_eq!(first["reason"], "peer-declined");
    assert_eq!(first["peerReason"], "no-device");
    assert_eq!(first["elapsedUs"], 1340);
    assert_eq!(first["workload"], "shop/web-1");
    assert_eq!(first["pid"], std::process::id());
    assert!(first["atUnixMs"].as_u64().is_some());

    let output = cli(&["connections", "--socket-dir", dir], &[]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let section = stdout
        .split("RDMA upgrade attempts")
        .nth(1)
        .unwrap_or_else(|| panic!("no upgrade section in\n{stdout}"));
    let row = section
        .lines()
        .find(|line| line.contains("10.1.0.11:40000"))
        .unwrap_or_else(|| panic!("no row for the declined attempt in\n{stdout}"));
    for column in [
        "ago",
        "shop/web-1",
        "client",
        "10.1.0.20:5432",
        "TCP (peer-declined; peer: no-device)",
    ] {
        assert!(row.contains(column), "{column} in {row:?}");
    }
    assert!(row.ends_with(" 1.3"), "time in ms in {row:?}");
    assert!(section.contains("TCP (stack-unavailable)"), "{stdout}");
}
