//! The controller connection: connect to one of the controllers (rotating on failure), report
//! capabilities, re-send held registrations, watch the node's snapshots, apply and ack each.
//! Reconnects with capped exponential backoff and jitter; the last snapshot stays published
//! while no controller is reachable.

use std::sync::Arc;
use std::time::{Duration, Instant};

use stackroute_proto::client;
use stackroute_proto::v1alpha1::{
    AckRequest, ApiVersion, Listener, SnapshotUpdate, WatchRequest, Workload,
};
use tracing::{debug, info, warn};

use crate::caps;
use crate::registry::Removal;
use crate::state::Agent;

/// First reconnect delay.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest reconnect delay.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A session that lasted this long resets the backoff.
const HEALTHY_SESSION: Duration = Duration::from_secs(10);

/// Largest whole snapshot the agent reassembles from parts.
const MAX_REASSEMBLED_BYTES: u64 = 1 << 30;

/// A whole snapshot arriving in parts (`SnapshotUpdate.snapshot_offset`, `snapshot_len`).
#[derive(Default)]
struct Reassembly {
    /// The first part, its snapshot grown by each later one.
    partial: Option<SnapshotUpdate>,
}

impl Reassembly {
    /// The complete update once `update` completes one (a message that is no part passes
    /// through); `None` while parts are missing. Parts out of order, of another revision or
    /// past the declared length are an error: the stream is broken, the session reconnects.
    fn add(&mut self, update: SnapshotUpdate) -> anyhow::Result<Option<SnapshotUpdate>> {
        if update.snapshot_len == 0 {
            anyhow::ensure!(
                self.partial.is_none(),
                "revision {} came before the rest of revision {}'s parts",
                update.revision,
                self.partial.as_ref().map_or(0, |p| p.revision)
            );
            return Ok(Some(update));
        }
        let (offset, total) = (update.snapshot_offset, update.snapshot_len);
        anyhow::ensure!(
            total <= MAX_REASSEMBLED_BYTES,
            "a snapshot of {total} bytes in parts is more than this agent takes"
        );
        let partial = match self.partial.take() {
            None if offset == 0 => update,
            Some(mut partial)
                if partial.revision == update.revision
                    && partial.snapshot_len == total
                    && partial.snapshot.len() as u64 == offset =>
            {
                partial.snapshot.extend_from_slice(&update.snapshot);
                partial
            }
            _ => anyhow::bail!(
                "part at {offset} of revision {}'s snapshot does not follow what came before",
                update.revision
            ),
        };
        let held = partial.snapshot.len() as u64;
        anyhow::ensure!(
            held <= total,
            "revision {}'s parts run past its {total} bytes",
            partial.revision
        );
        if held < total {
            self.partial = Some(partial);
            return Ok(None);
        }
        Ok(Some(SnapshotUpdate {
            snapshot_offset: 0,
            snapshot_len: 0,
            ..partial
        }))
    }
}

/// The delay after `failures` consecutive failures: exponential, capped, with ±50 % jitter.
pub fn backoff(failures: u32) -> Duration {
    let base = BACKOFF_MIN
        .saturating_mul(1 << failures.min(16))
        .min(BACKOFF_MAX);
    base.mul_f64(0.5 + fastrand::f64())
}

/// Runs forever.
pub async fn run(agent: Arc<Agent>) {
    let controllers = agent.config.controllers.clone();
    let mut failures = 0u32;
    // After a delta that did not apply, the next session asks for the whole snapshot.
    let mut need_full = false;
    for (attempt, url) in controllers.iter().cycle().enumerate() {
        if attempt > 0 {
            agent.metrics.reconnects.inc();
        }
        let started = Instant::now();
        match session(&agent, url, &mut need_full).await {
            Ok(()) => info!(controller = %url, "the controller ended the watch"),
            Err(error) => {
                warn!(controller = %url, error = %format!("{error:#}"), "controller session failed")
            }
        }
        agent.set_client(None);
        if started.elapsed() >= HEALTHY_SESSION {
            failures = 0;
        }
        let delay = backoff(failures);
        failures = failures.saturating_add(1);
        debug!(?delay, "reconnecting after a delay");
        tokio::time::sleep(delay).await;
    }
}

async fn session(agent: &Arc<Agent>, url: &str, need_full: &mut bool) -> anyhow::Result<()> {
    let mut client = client::connect(url, &agent.config.security)
        .await
        .map_err(|error| anyhow::anyhow!("connecting to {url}: {error}"))?;
    info!(controller = %url, agent_id = %agent.agent_id, "connected");

    let capabilities = caps::discover(&agent.config.node);
    if let Err(status) = client.report_capabilities(capabilities).await {
        warn!(%status, "ReportCapabilities failed");
    }
    resend_registrations(agent, &mut client).await?;

    let known_revision = match agent.current() {
        Some(current) if !*need_full => current.revision,
        _ => 0,
    };
    let mut stream = client
        .watch_snapshots(WatchRequest {
            node: agent.config.node.clone(),
            agent_id: agent.agent_id.clone(),
            known_revision,
            api_version: ApiVersion::V1alpha1 as i32,
            accepts_delta: true,
            accepts_chunks: true,
            accepts_listener_deltas: true,
        })
        .await?
        .into_inner();
    *need_full = false;
    agent.set_client(Some(client.clone()));
    let mut reassembly = Reassembly::default();
    // The listener list as this stream sent it (its changes apply to it), and whether it has
    // changed since the agent last took it: it is taken with the next snapshot that applies.
    let mut listeners = Vec::new();
    let mut listeners_pending = false;
    while let Some(mut message) = stream.message().await? {
        listeners_pending |= take_listeners(&mut listeners, &mut message);
        let Some(update) = reassembly.add(message)? else {
            continue;
        };
        let revision = update.revision;
        let is_delta = !update.delta.is_empty();
        // Rebuilding, validation, fsync and rename block: off the async workers.
        let applier = agent.clone();
        let result = tokio::task::spawn_blocking(move || {
            if is_delta {
                applier.apply_delta(revision, update.base_revision, &update.delta)
            } else {
                applier.apply(revision, update.snapshot)
            }
        })
        .await
        .unwrap_or_else(|e| Err(format!("applying revision {revision} panicked: {e}")));
        if result.is_ok() && std::mem::take(&mut listeners_pending) {
            agent.set_listeners(listeners.clone());
        }
        if let Err(error) = &result {
            warn!(revision, %error, "rejected snapshot; the previous one stays in force");
            // The stream's next delta would start from a revision this agent does not hold.
            *need_full |= is_delta;
        }
        let ack = AckRequest {
            node: agent.config.node.clone(),
            agent_id: agent.agent_id.clone(),
            revision,
            error: result.err().unwrap_or_default(),
        };
        if let Err(status) = client.ack(ack).await {
            warn!(revision, %status, "Ack failed");
        }
        if *need_full {
            anyhow::bail!("a snapshot delta did not apply; reconnecting for the whole snapshot");
        }
    }
    Ok(())
}

/// Updates `listeners` (the list as this stream sent it) from `message`, taking its listener
/// fields out; whether the list changed.
fn take_listeners(listeners: &mut Vec<Listener>, message: &mut SnapshotUpdate) -> bool {
    if message.listeners_unchanged {
        return false;
    }
    if !message.listeners_delta {
        *listeners = std::mem::take(&mut message.listeners);
        return true;
    }
    // Listeners are identified by their key; its encoding is a map key (prost derives no Hash).
    let key = |listener: &Listener| listener.key.as_ref().map(prost::Message::encode_to_vec);
    let gone: std::collections::HashSet<Vec<u8>> = message
        .listeners_removed
        .iter()
        .map(prost::Message::encode_to_vec)
        .collect();
    listeners.retain(|listener| key(listener).is_none_or(|key| !gone.contains(&key)));
    let mut at: std::collections::HashMap<Option<Vec<u8>>, usize> = listeners
        .iter()
        .enumerate()
        .map(|(index, listener)| (key(listener), index))
        .collect();
    for listener in std::mem::take(&mut message.listeners_put) {
        match at.get(&key(&listener)) {
            Some(&index) => listeners[index] = listener,
            None => {
                at.insert(key(&listener), listeners.len());
                listeners.push(listener);
            }
        }
    }
    true
}

/// Whether a failed call may succeed later (connection trouble, overload) rather than being a
/// final answer about the request.
pub fn transient(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Cancelled
            | tonic::Code::Unknown
            | tonic::Code::ResourceExhausted
            | tonic::Code::Aborted
            | tonic::Code::Internal
    )
}

/// Sends every held registration again: the controller may have restarted without a store.
async fn resend_registrations(agent: &Agent, client: &mut client::Client) -> anyhow::Result<()> {
    let (removals, listeners, workloads) = {
        let mut held = agent.registrations();
        (
            std::mem::take(&mut held.removals),
            held.listeners
                .values()
                .map(|h| h.value.clone())
                .collect::<Vec<_>>(),
            held.workloads
                .values()
                .map(|h| h.value.clone())
                .collect::<Vec<_>>(),
        )
    };
    for (sent, removal) in removals.iter().enumerate() {
        let result = match removal.clone() {
            Removal::Listener(key) => client.remove_listener(key).await,
            Removal::Workload(key) => client.remove_workload(key).await,
        };
        match result {
            Ok(_) => {}
            Err(status) if transient(status.code()) => {
                // Keep what was not delivered for the next connection.
                agent
                    .registrations()
                    .removals
                    .extend(removals[sent..].iter().cloned());
                return Err(status.into());
            }
            Err(status) => warn!(?removal, %status, "the controller refused a removal; dropped"),
        }
    }
    for workload in workloads {
        if let Err(status) = client.register_workload(workload.clone()).await {
            refused_on_resend(agent, status, Held::Workload(workload))?;
        }
    }
    for listener in listeners {
        if let Err(status) = client.register_listener(listener.clone()).await {
            refused_on_resend(agent, status, Held::Listener(listener))?;
        }
    }
    Ok(())
}

/// A held registration that failed to re-send.
#[derive(Debug)]
enum Held {
    Listener(Listener),
    Workload(Workload),
}

/// A transient failure ends the session (everything is re-sent on the next one); a final
/// answer (the controller refuses this registration) drops it, so one bad entry can never keep
/// the node from its snapshots.
fn refused_on_resend(
    agent: &Agent,
    status: tonic::Status,
    held: Held,
) -> Result<(), tonic::Status> {
    // A quota refusal is an answer about this registration (the controller counts it against
    // the node), not about the connection: dropped like any other refusal.
    if transient(status.code()) && status.code() != tonic::Code::ResourceExhausted {
        return Err(status);
    }
    warn!(registration = ?held, %status, "the controller refused a held registration; dropped");
    agent.metrics.dropped_registrations.inc();
    let mut registrations = agent.registrations();
    match held {
        Held::Listener(listener) => {
            if let Some(key) = listener.key {
                registrations
                    .listeners
                    .remove(&(key.ip, key.port, key.protocol));
            }
        }
        Held::Workload(workload) => {
            if let Some(key) = workload.key {
                registrations.workloads.remove(&(key.namespace, key.name));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use stackroute_proto::v1alpha1::ListenerKey;

    fn listener(port: u32, workload: &str) -> Listener {
        Listener {
            key: Some(ListenerKey {
                node: "n1".into(),
                port,
                ..Default::default()
            }),
            workload: workload.into(),
            ..Default::default()
        }
    }

    /// The listener list a stream sent: whole, unchanged, or changed by key.
    #[test]
    fn listener_updates_apply_to_the_list_the_stream_sent() {
        let mut held = Vec::new();
        let mut whole = SnapshotUpdate {
            listeners: vec![listener(80, "a"), listener(443, "b"), listener(9000, "c")],
            ..Default::default()
        };
        assert!(take_listeners(&mut held, &mut whole));
        assert_eq!(held.len(), 3);
        let mut unchanged = SnapshotUpdate {
            listeners_unchanged: true,
            ..Default::default()
        };
        assert!(!take_listeners(&mut held, &mut unchanged));
        let mut changes = SnapshotUpdate {
            listeners_delta: true,
            listeners_put: vec![listener(9000, "moved"), listener(8080, "d")],
            listeners_removed: vec![listener(443, "").key.unwrap()],
            ..Default::default()
        };
        assert!(take_listeners(&mut held, &mut changes));
        assert_eq!(
            held,
            [
                listener(80, "a"),
                listener(9000, "moved"),
                listener(8080, "d")
            ]
        );
        // A whole list replaces everything, also what changes added.
        let mut whole = SnapshotUpdate {
            listeners: vec![listener(22, "e")],
            ..Default::default()
        };
        assert!(take_listeners(&mut held, &mut whole));
        assert_eq!(held, [listener(22, "e")]);
    }

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        for failures in 0..40 {
            let delay = backoff(failures);
            let base = BACKOFF_MIN
                .saturating_mul(1 << failures.min(16))
                .min(BACKOFF_MAX);
            assert!(
                delay >= base / 2 && delay <= base * 3 / 2,
                "{failures}: {delay:?}"
            );
            assert!(delay <= BACKOFF_MAX * 3 / 2);
        }
        let samples: std::collections::HashSet<_> = (0..20).map(|_| backoff(3)).collect();
        assert!(samples.len() > 1, "no jitter");
    }

    fn part(revision: u64, offset: u64, bytes: &[u8], total: u64) -> SnapshotUpdate {
        SnapshotUpdate {
            revision,
            snapshot: bytes.to_vec(),
            snapshot_offset: offset,
            snapshot_len: total,
            listeners: if offset == 0 {
                vec![Listener::default()]
            } else {
                Vec::new()
            },
            listeners_unchanged: offset != 0,
            ..Default::default()
        }
    }

    #[test]
    fn parts_are_reassembled_in_order_and_anything_else_is_refused() {
        let mut reassembly = Reassembly::default();
        assert!(reassembly.add(part(7, 0, b"abc", 8)).unwrap().is_none());
        assert!(reassembly.add(part(7, 3, b"def", 8)).unwrap().is_none());
        let whole = reassembly.add(part(7, 6, b"gh", 8)).unwrap().unwrap();
        assert_eq!(whole.snapshot, b"abcdefgh");
        // The first part's listeners, and nothing left of the parts.
        assert_eq!(
            (whole.listeners.len(), whole.listeners_unchanged),
            (1, false)
        );
        assert_eq!((whole.snapshot_offset, whole.snapshot_len), (0, 0));
        // A message that is no part passes through.
        let plain = SnapshotUpdate {
            revision: 8,
            snapshot: b"x".to_vec(),
            ..Default::default()
        };
        assert_eq!(reassembly.add(plain.clone()).unwrap(), Some(plain.clone()));

        let broken = [
            vec![part(9, 3, b"def", 8)],                           // no first part
            vec![part(9, 0, b"abc", 8), part(9, 4, b"ef", 8)],     // a gap
            vec![part(9, 0, b"abc", 8), part(10, 3, b"def", 8)],   // another revision
            vec![part(9, 0, b"abc", 8), part(9, 3, b"defghi", 8)], // past the end
            vec![part(9, 0, b"abc", 8), plain],                    // interrupted
            vec![part(9, 0, b"a", MAX_REASSEMBLED_BYTES + 1)],     // too large
        ];
        for messages in broken {
            let mut reassembly = Reassembly::default();
            let results: Vec<_> = messages.into_iter().map(|m| reassembly.add(m)).collect();
            assert!(results.last().unwrap().is_err(), "{results:?}");
        }
    }
}
