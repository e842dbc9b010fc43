//! `stackroute status`: nodes, their acked revisions and stale agents, and per-policy
//! Accepted/Programmed, from a controller's `GetStatus`.

use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::{Value, json};
use stackroute_proto::client;
use stackroute_proto::v1alpha1::{StatusRequest, StatusResponse};

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
