//! `stackroute connections`: `ss` for the user-space stack. The agent names its running
//! instances; each answers for its connections on its abstract control socket, which exists
//! only inside the network namespace it serves, so each is asked from a thread that entered
//! that namespace (root, like `ip netns exec`). Then the agent's kernel hooks: the workloads
//! whose connections the kernel decides (programs the shim cannot reach), with their counts.
//! Then the RDMA upgrade attempts the node's shims reported (SMC-R's `smcss`): each
//! connection, which end it was, and why it stayed on TCP (with the peer's own reason).

use std::fs::File;
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketAddrUnix, SocketFlags, SocketType};
use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};
use serde::Serialize;
use stackroute_local_api::message::{
    HookInfo, InstanceInfo, Request, Response, UpgradeRecord, UpgradeRole,
};
use stackroute_local_api::relay::{
    ConnectionInfo, MAX_MESSAGE, RelayRequest, RelayResponse, from_packet, to_packet,
};

use crate::agent::call_agent;

#[derive(clap::Args)]
pub(crate) struct ConnectionsArgs {
    /// The node agent's socket directory.
    #[arg(long, default_value = "/run/stackroute")]
    socket_dir: PathBuf,
    /// `table` or `json`.
    #[arg(long, value_enum, default_value = "table")]
    output: Output,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Output {
    Table,
    Json,
}

/// One line of the JSON output: a connection of the user-space stack, a kernel hook (the
/// kernel decides each connection of its workload; they are counted, not listed), or an RDMA
/// upgrade attempt.
#[derive(Serialize)]
#[serde(tag = "path", rename_all = "kebab-case")]
enum Line<'a> {
    Userspace(&'a Row),
    /// A connection upgraded to RDMA, relayed by the same instance.
    Rdma(&'a Row),
    KernelHook(&'a HookInfo),
    RdmaUpgrade(&'a UpgradeRecord),
}

/// One connection with the instance that holds it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Row {
    /// `namespace/name` of the pod or workload the instance serves.
    workload: Option<String>,
    /// The instance's pid.
    instance_pid: i32,
    #[serde(flatten)]
    connection: ConnectionInfo,
}

pub(crate) fn run(args: &ConnectionsArgs) -> Result<()> {
    let instances = match call_agent(&args.socket_dir, &Request::UserspaceInstances)? {
        Response::Instances { instances } => instances,
        Response::Error { message } => bail!("the agent refused: {message}"),
        other => bail!("unexpected answer from the agent: {other:?}"),
    };
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    for instance in &instances {
        match connections_of(instance) {
            Ok(connections) => rows.extend(connections.into_iter().map(|connection| Row {
                workload: instance.workload.clone(),
                instance_pid: instance.pid,
                connection,
            })),
            Err(error) => failures.push(format!("instance pid {}: {error:#}", instance.pid)),
        }
    }
    let hooks = match call_agent(&args.socket_dir, &Request::KernelHooks) {
        Ok(Response::Hooks { hooks }) => hooks,
        Ok(other) => {
            failures.push(format!("kernel hooks: unexpected answer {other:?}"));
            Vec::new()
        }
        Err(error) => {
            failures.push(format!("kernel hooks: {error:#}"));
            Vec::new()
        }
    };
    let upgrades = match call_agent(&args.socket_dir, &Request::UpgradeAttempts) {
        Ok(Response::Upgrades { attempts }) => attempts,
        // An agent older than the request does not know it: nothing to show.
        Ok(Response::Error { message }) if message.contains("unknown variant") => Vec::new(),
        Ok(other) => {
            failures.push(format!(
                "RDMA upgrade attempts: unexpected answer {other:?}"
            ));
            Vec::new()
        }
        Err(error) => {
            failures.push(format!("RDMA upgrade attempts: {error:#}"));
            Vec::new()
        }
    };
    match args.output {
        Output::Json => {
            let lines: Vec<Line<'_>> = rows
                .iter()
                .map(|row| match row.connection.transport.as_deref() {
                    Some("RDMA") => Line::Rdma(row),
                    _ => Line::Userspace(row),
                })
                .chain(hooks.iter().map(Line::KernelHook))
                .chain(upgrades.iter().map(Line::RdmaUpgrade))
                .collect();
            println!("{}", serde_json::to_string_pretty(&lines)?);
        }
        Output::Table => {
            print_table(&rows);
            print_rdma_paths(&rows);
            print_hooks(&hooks);
            print_upgrades(&upgrades, now_unix_ms());
        }
    }
    for failure in &failures {
        eprintln!("stackroute: {failure}");
    }
    if !failures.is_empty() {
        bail!(
            "{} of {} sources did not answer",
            failures.len(),
            instances.len() + 2
        );
    }
    Ok(())
}

/// Every connection of one instance, page by page, asked from inside its namespace.
fn connections_of(instance: &InstanceInfo) -> Result<Vec<ConnectionInfo>> {
    let namespace = Path::new("/proc")
        .join(instance.pid.to_string())
        .join("ns/net");
    let namespace =
        File::open(&namespace).with_context(|| format!("opening {}", namespace.display()))?;
    let socket = instance.socket.clone();
    // A thread of its own: entering a network namespace changes only the calling thread.
    std::thread::spawn(move || -> Result<Vec<ConnectionInfo>> {
        move_into_link_name_space(namespace.as_fd(), Some(LinkNameSpaceType::Network))
            .context("entering the instance's network namespace (needs root)")?;
        let mut all = Vec::new();
        let mut after = 0;
        loop {
            let request = RelayRequest::Connections { after, limit: 100 };
            match ask(&socket, &request)? {
                RelayResponse::Connections { connections, more } => {
                    let last = connections.last().map(|c| c.id);
                    all.extend(connections);
                    match (more, last) {
                        (true, Some(last)) => after = last,
                        _ => return Ok(all),
                    }
                }
                RelayResponse::Error { message, .. } => bail!("{message}"),
                other => bail!("unexpected answer: {other:?}"),
            }
        }
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the query thread panicked"))?
}

/// One request on the instance's abstract control socket.
fn ask(socket: &str, request: &RelayRequest) -> Result<RelayResponse> {
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?;
    let address = SocketAddrUnix::new_abstract_name(socket.as_bytes())?;
    rustix::net::connect(&fd, &address)
        .with_context(|| format!("connecting to @{socket} (is the instance running?)"))?;
    let packet = to_packet(request).context("request too large")?;
    rustix::net::send(&fd, &packet, SendFlags::empty())?;
    let mut buffer = vec![0u8; MAX_MESSAGE];
    let (len, _) = rustix::net::recv(&fd, &mut buffer[..], RecvFlags::empty())?;
    from_packet(&buffer[..len]).map_err(|e| anyhow::anyhow!("malformed answer: {e}"))
}

fn print_table(rows: &[Row]) {
    println!(
        "{:<24} {:>7} {:<21} {:<21} {:<12} {:<5} {:>12} {:>12} {:>7} {:>9} {:>9} {:>10}",
        "WORKLOAD",
        "PID",
        "LOCAL",
        "REMOTE",
        "STATE",
        "CC",
        "SENT",
        "RECEIVED",
        "RETRANS",
        "SRTT-MS",
        "MINRTT-MS",
        "RATE-MBIT"
    );
    for row in rows {
        let c = &row.connection;
        println!(
            "{:<24} {:>7} {:<21} {:<21} {:<12} {:<5} {:>12} {:>12} {:>7} {:>9.3} {:>9.3} {:>10.2}",
            row.workload.as_deref().unwrap_or("-"),
            row.instance_pid,
            c.local.to_string(),
            c.original.unwrap_or(c.remote).to_string(),
            c.tcp_state,
            // An RDMA connection has no congestion control of ours: the column names it.
            c.transport.as_deref().unwrap_or(&c.congestion_control),
            c.bytes_sent,
            c.bytes_received,
            c.retransmits,
            c.smoothed_rtt_us as f64 / 1000.0,
            c.min_rtt_us as f64 / 1000.0,
            c.delivery_rate_bps as f64 / 1e6,
        );
    }
}

/// Where RDMA connections run: the GIDs' addresses (on a secondary RoCE network they are not
/// the TCP addresses above).
fn print_rdma_paths(rows: &[Row]) {
    let paths: Vec<_> = rows
        .iter()
        .filter_map(|row| Some((row, row.connection.rdma?)))
        .collect();
    if paths.is_empty() {
        return;
    }
    println!();
    println!("RDMA connections (queue pairs' GIDs as addresses):");
    println!(
        "{:<24} {:<21} {:<21} {:<39} {:<39}",
        "WORKLOAD", "LOCAL", "REMOTE", "RDMA-LOCAL", "RDMA-REMOTE"
    );
    for (row, path) in paths {
        let c = &row.connection;
        println!(
            "{:<24} {:<21} {:<21} {:<39} {:<39}",
            row.workload.as_deref().unwrap_or("-"),
            c.local.to_string(),
            c.original.unwrap_or(c.remote).to_string(),
            path.local.to_string(),
            path.remote.to_string(),
        );
    }
}

fn print_hooks(hooks: &[HookInfo]) {
    if hooks.is_empty() {
        return;
    }
    println!();
    println!("kernel hooks (the kernel decides each connection of these workloads):");
    println!(
        "{:<24} {:<40} {:>14} {:>7} {:>9} {:>9} {:>12} {:>14} {:>16}",
        "WORKLOAD",
        "CGROUP",
        "REVISION",
        "ENTRIES",
        "CONNECTS",
        "APPLIED",
        "LEFT-DEFAULT",
        "OWN-CHOICE",
        "NOT-INTERPOSABLE"
    );
    for hook in hooks {
        println!(
            "{:<24} {:<40} {:>14} {:>7} {:>9} {:>9} {:>12} {:>14} {:>16}",
            hook.workload,
            hook.cgroup,
            hook.revision,
            hook.entries,
            hook.connects,
            hook.applied,
            hook.left_default,
            hook.chosen_by_process,
            hook.not_interposable
        );
    }
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
        })
}

fn print_upgrades(upgrades: &[UpgradeRecord], now_ms: u64) {
    if upgrades.is_empty() {
        return;
    }
    println!();
    println!("RDMA upgrade attempts (newest last):");
    println!(
        "{:<9} {:<24} {:<6} {:<21} {:<21} {:<40} {:>9}",
        "WHEN", "WORKLOAD", "ROLE", "LOCAL", "REMOTE", "RESULT", "TIME-MS"
    );
    for record in upgrades {
        let attempt = &record.attempt;
        println!(
            "{:<9} {:<24} {:<6} {:<21} {:<21} {:<40} {:>9.1}",
            age(now_ms, record.at_unix_ms),
            record.workload.as_deref().unwrap_or("-"),
            match attempt.role {
                UpgradeRole::Client => "client",
                UpgradeRole::Server => "server",
            },
            attempt.local,
            attempt.remote,
            result(record),
            attempt.elapsed_us as f64 / 1000.0,
        );
    }
}

/// `3s ago`, `4m ago`, `2h ago`, `5d ago` (a record stamped ahead of this clock reads `0s ago`).
fn age(now_ms: u64, at_ms: u64) -> String {
    let seconds = now_ms.saturating_sub(at_ms) / 1000;
    match seconds {
        0..60 => format!("{seconds}s ago"),
        60..3600 => format!("{}m ago", seconds / 60),
        3600..86400 => format!("{}h ago", seconds / 3600),
        _ => format!("{}d ago", seconds / 86400),
    }
}

/// What the connection ended up on and why.
fn result(record: &UpgradeRecord) -> String {
    let attempt = &record.attempt;
    if attempt.reason == stackroute_rdma_upgrade::UPGRADED {
        return "RDMA".into();
    }
    match &attempt.peer_reason {
        Some(peer) => format!("TCP ({}; peer: {peer})", attempt.reason),
        None => format!("TCP ({})", attempt.reason),
    }
}

#[cfg(test)]
mod tests {
    use stackroute_local_api::message::UpgradeAttempt;

    use super::*;

    fn record(peer_reason: Option<&str>) -> UpgradeRecord {
        UpgradeRecord {
            attempt: UpgradeAttempt {
                role: UpgradeRole::Client,
                local: "10.0.0.1:40000".into(),
                remote: "10.0.0.2:7000".into(),
                reason: "peer-declined".into(),
                peer_reason: peer_reason.map(Into::into),
                elapsed_us: 1234,
            },
            workload: Some("shop/web".into()),
            pid: Some(42),
            at_unix_ms: 1_700_000_000_000,
        }
    }

    #[test]
    fn upgrade_attempts_read_as_age_and_result() {
        let at = 1_700_000_000_000;
        assert_eq!(age(at + 3_400, at), "3s ago");
        assert_eq!(age(at - 5_000, at), "0s ago");
        assert_eq!(age(at + 125_000, at), "2m ago");
        assert_eq!(age(at + 7_200_000, at), "2h ago");
        assert_eq!(age(at + 3 * 86_400_000, at), "3d ago");
        assert_eq!(
            result(&record(Some("no-device"))),
            "TCP (peer-declined; peer: no-device)"
        );
        assert_eq!(result(&record(None)), "TCP (peer-declined)");
        let mut upgraded = record(None);
        upgraded.attempt.reason = "upgraded".into();
        assert_eq!(result(&upgraded), "RDMA");
    }

    #[test]
    fn upgrade_attempts_are_json_lines_with_their_path() {
        let record = record(Some("no-device"));
        let line = serde_json::to_value(Line::RdmaUpgrade(&record)).unwrap();
        assert_eq!(
            line,
            serde_json::json!({
                "path": "rdma-upgrade",
                "role": "client",
                "local": "10.0.0.1:40000",
                "remote": "10.0.0.2:7000",
                "reason": "peer-declined",
                "peerReason": "no-device",
                "elapsedUs": 1234,
                "workload": "shop/web",
                "pid": 42,
                "atUnixMs": 1_700_000_000_000u64,
            })
        );
    }
}
