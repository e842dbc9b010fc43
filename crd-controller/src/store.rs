//! Where the listener and workload registries and the revision counter live.
//!
//! - [`MemoryStore`] (the default): the index itself holds the registries; revisions start at
//!   the current Unix time in milliseconds, so a restarted controller never hands out a smaller
//!   revision than before (compiles are debounced, so the counter advances far slower than the
//!   clock).
//! - [`EtcdStore`] (`--etcd-endpoints`): registrations are written to etcd before they are
//!   acknowledged, every replica watches the registry prefix and feeds what it sees into its
//!   index, and revisions are etcd's own store revision, which is monotonic across replicas
//!   and restarts.
//!
//! Keys under the prefix (default `/stackroute/`):
//! `listeners/{node}/{ip}/{port}/{TCP|UDP}` and `workloads/{node}/{namespace}/{name}` hold the
//! protobuf-encoded `Listener` / `Workload`; `revision` is bumped once per compile;
//! `acks/{node}` holds the latest revision a node's agent acked at any replica and the policy
//! versions its snapshot contained (see [`encode_ack`]), so the replica that writes status
//! sees acks of agents connected to the others.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KeyValue, Txn, TxnOp,
    TxnOpResponse, WatchOptions,
};
use prost::Message as _;
use stackroute_proto::v1alpha1::{Listener, ListenerKey, Protocol, Workload, WorkloadKey};

use crate::index::{AckRecord, IndexHandle, RegistryChange};

/// A boxed, sendable future (object-safe async methods).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The registries and the revision counter.
pub trait Store: Send + Sync + 'static {
    /// `"memory"` or `"etcd"`, for logs.
    fn kind(&self) -> &'static str;
    /// Feeds the index: the whole registry once ([`RegistryChange::Reset`]), then every change
    /// made by any replica. Runs until the process ends; reconnects and resyncs on errors.
    fn run(&self, index: IndexHandle) -> BoxFuture<'_, ()>;
    /// Persists a listener (before the index applies it).
    fn put_listener(&self, listener: &Listener) -> BoxFuture<'_, anyhow::Result<()>>;
    /// Removes a listener by its registry key.
    fn remove_listener(&self, key: &str) -> BoxFuture<'_, anyhow::Result<()>>;
    /// Persists a workload.
    fn put_workload(&self, workload: &Workload) -> BoxFuture<'_, anyhow::Result<()>>;
    /// Removes a workload by its registry key.
    fn remove_workload(&self, key: &str) -> BoxFuture<'_, anyhow::Result<()>>;
    /// A revision greater than every revision handed out before, and at least `floor`.
    fn next_revision(&self, floor: u64) -> BoxFuture<'_, anyhow::Result<u64>>;
    /// Whether other replicas share this store, so acks are worth [`Store::put_ack`]ing.
    fn shares_acks(&self) -> bool {
        false
    }
    /// Tells the other replicas that `node`'s agent is connected to this one at `unix_ms`
    /// (they see it through [`Store::run`] as [`RegistryChange::Alive`]).
    fn put_alive(&self, _node: &str, _unix_ms: u64) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async { Ok(()) })
    }
    /// Shares a node's ack with the other replicas (they see it through [`Store::run`]). Never
    /// replaces a later or equal revision of the node.
    fn put_ack(&self, _ack: &AckRecord) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async { Ok(()) })
    }
}

/// The registry key of a listener: `{node}/{ip}/{port}/{protocol}` (the IP in canonical form).
pub fn listener_key(key: &ListenerKey) -> String {
    let ip = key
        .ip
        .parse::<std::net::IpAddr>()
        .map_or_else(|_| key.ip.clone(), |ip| ip.to_string());
    let protocol = match Protocol::try_from(key.protocol) {
        Ok(Protocol::Udp) => "UDP",
        Ok(Protocol::Tcp) => "TCP",
        _ => "UNSPECIFIED",
    };
    format!("{}/{ip}/{}/{protocol}", key.node, key.port)
}

/// The registry key of a workload: `{node}/{namespace}/{name}`.
pub fn workload_key(key: &WorkloadKey) -> String {
    format!("{}/{}/{}", key.node, key.namespace, key.name)
}

/// Digits of a revision in an ack value: `u64::MAX` has 20.
const REVISION_DIGITS: usize = 20;

/// The stored form of an ack (the value of `acks/{node}`): the revision as 20 decimal digits,
/// zero-padded, then one ` {version:016x}` per contained policy version, e.g.
/// `00000000000000001234 0c5a3e0d9b0f7a11`.
///
/// Zero-padded so that etcd's byte-wise comparison of values orders them by revision: the
/// write is a transaction that puts only over a value less than the padded new revision, so a
/// node's ack never moves backwards whichever replica writes, in whatever order. ASCII, so
/// `etcdctl get --prefix /stackroute/acks/` is readable.
pub fn encode_ack(ack: &AckRecord) -> String {
    use std::fmt::Write as _;
    let mut value = format!("{:0width$}", ack.revision, width = REVISION_DIGITS);
    for version in &ack.contained {
        let _ = write!(value, " {version:016x}");
    }
    value
}

/// Reads an ack back from its node (the key after `acks/`) and stored value; rejects what
/// [`encode_ack`] would not have written and node names agents could not have sent.
pub fn decode_ack(node: &str, value: &[u8]) -> Result<AckRecord, String> {
    stackroute_proto::validate::check_name("node", node)?;
    let text = std::str::from_utf8(value).map_err(|_| "the value is not UTF-8".to_string())?;
    let mut parts = text.split(' ');
    let digits = parts.next().unwrap_or_default();
    if digits.len() != REVISION_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "the revision {digits:?} is not {REVISION_DIGITS} decimal digits"
        ));
    }
    let revision = digits
        .parse::<u64>()
        .map_err(|_| format!("the revision {digits} is out of range"))?;
    let mut contained = Vec::new();
    for part in parts {
        if part.len() != 16 || !part.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(format!(
                "the policy version {part:?} is not 16 lowercase hex digits"
            ));
        }
        contained.push(u64::from_str_radix(part, 16).map_err(|e| e.to_string())?);
    }
    contained.sort_unstable();
    contained.dedup();
    Ok(AckRecord {
        node: node.to_string(),
        revision,
        contained,
    })
}

// === impl MemoryStore ===

/// The embedded store: nothing leaves the process.
#[derive(Debug)]
pub struct MemoryStore {
    counter: AtomicU64,
}

impl Default for MemoryStore {
    fn default() -> Self {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX / 2));
        Self {
            counter: AtomicU64::new(now_ms),
        }
    }
}

impl Store for MemoryStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn run(&self, index: IndexHandle) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            index.registry(RegistryChange::Reset {
                listeners: Vec::new(),
                workloads: Vec::new(),
                acks: Vec::new(),
            });
        })
    }

    fn put_listener(&self, _listener: &Listener) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async { Ok(()) })
    }

    fn remove_listener(&self, _key: &str) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async { Ok(()) })
    }

    fn put_workload(&self, _workload: &Workload) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async { Ok(()) })
    }

    fn remove_workload(&self, _key: &str) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async { Ok(()) })
    }

    fn next_revision(&self, floor: u64) -> BoxFuture<'_, anyhow::Result<u64>> {
        let previous = self
            .counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| {
                Some(c.saturating_add(1).max(floor))
            })
            .unwrap_or_else(|c| c);
        let next = previous.saturating_add(1).max(floor);
        Box::pin(async move { Ok(next) })
    }
}

// === impl EtcdStore ===

/// Registries and revisions in etcd, shared by every replica.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    prefix: String,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

const LISTENERS: &str = "listeners/";
const WORKLOADS: &str = "workloads/";
const ACKS: &str = "acks/";
const ALIVE: &str = "alive/";
const REVISION: &str = "revision";

/// Keys per page of the registries' initial read.
const READ_PAGE_KEYS: i64 = 200;
/// The etcd client's limit on one response: a page of the largest values (a registration is
/// at most one request, [`stackroute_proto::MAX_REQUEST_BYTES`]) fits, with room to spare.
const READ_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
const _: () = assert!(
    READ_PAGE_KEYS as usize * (stackroute_proto::MAX_REQUEST_BYTES + 1024) < READ_MESSAGE_BYTES
);

/// The first key after every key that starts with `prefix` (etcd's range end for a prefix).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0] // every key: etcd's "\0" range end
}

impl EtcdStore {
    /// Connects to etcd, over TLS with the client certificate in `tls` (`ca.crt`, `tls.crt`,
    /// `tls.key`) when given. Fails if no endpoint answers within a few seconds.
    pub async fn connect(
        endpoints: &[String],
        prefix: &str,
        tls: Option<&std::path::Path>,
    ) -> anyhow::Result<Self> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(5));
        if let Some(dir) = tls {
            let read = |file: &str| {
                let path = dir.join(file);
                std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
            };
            options = options.with_tls(
                etcd_client::TlsOptions::new()
                    .ca_certificate(etcd_client::Certificate::from_pem(read("ca.crt")?))
                    .identity(etcd_client::Identity::from_pem(
                        read("tls.crt")?,
                        read("tls.key")?,
                    )),
            );
        }
        let mut client = Client::connect(endpoints, Some(options))
            .await
            .with_context(|| format!("connecting to etcd at {}", endpoints.join(",")))?;
        let status = client
            .status()
            .await
            .with_context(|| format!("etcd at {} does not answer", endpoints.join(",")))?;
        tracing::info!(version = status.version(), prefix, "connected to etcd");
        Ok(Self {
            client,
            prefix: prefix.to_string(),
        })
    }

    fn key(&self, section: &str, rest: &str) -> String {
        format!("{}{section}{rest}", self.prefix)
    }

    /// Every key under the prefix, read in pages at one revision: `(revision, kvs)`. A page
    /// holds at most [`READ_PAGE_KEYS`] keys, so even at the largest value a registration can
    /// have it stays below the client's message limit ([`READ_MESSAGE_BYTES`]) — one range read
    /// of a big cluster's registries would not.
    async fn read_all(&self) -> anyhow::Result<(i64, Vec<KeyValue>)> {
        let mut kv = self
            .client
            .kv_client()
            .max_decoding_message_size(READ_MESSAGE_BYTES);
        let end = prefix_end(self.prefix.as_bytes());
        let mut from = self.prefix.as_bytes().to_vec();
        let mut revision = 0;
        let mut kvs = Vec::new();
        loop {
            let mut options = GetOptions::new()
                .with_range(end.clone())
                .with_limit(READ_PAGE_KEYS);
            if revision > 0 {
                // The first page's revision: the pages are one consistent read.
                options = options.with_revision(revision);
            }
            let mut response = kv
                .get(from.clone(), Some(options))
                .await
                .context("reading the registries")?;
            if revision == 0 {
                revision = response.header().map_or(0, |h| h.revision());
            }
            let more = response.more();
            let page = response.take_kvs();
            let Some(last) = page.last() else { break };
            from = last.key().to_vec();
            from.push(0); // the next key after the last one read
            kvs.extend(page);
            if !more {
                break;
            }
        }
        Ok((revision, kvs))
    }

    /// One full read then a watch from the revision after it; returns on any error.
    async fn sync_once(&self, index: &IndexHandle) -> anyhow::Result<()> {
        let (revision, kvs) = self.read_all().await?;
        let mut listeners = Vec::new();
        let mut workloads = Vec::new();
        let mut acks = Vec::new();
        let mut alive = Vec::new();
        for kv in &kvs {
            match self.decode(kv.key(), kv.value()) {
                Some(RegistryChange::PutListener(l)) => listeners.push(l),
                Some(RegistryChange::PutWorkload(w)) => workloads.push(w),
                Some(RegistryChange::Ack(a)) => acks.push(a),
                Some(change @ RegistryChange::Alive { .. }) => alive.push(change),
                _ => {}
            }
        }
        tracing::info!(
            listeners = listeners.len(),
            workloads = workloads.len(),
            acks = acks.len(),
            revision,
            "read the registries from etcd"
        );
        index.registry(RegistryChange::Reset {
            listeners,
            workloads,
            acks,
        });
        for change in alive {
            index.registry(change);
        }
        let mut stream = self
            .client
            .watch_client()
            .max_decoding_message_size(READ_MESSAGE_BYTES)
            .watch(
                self.prefix.as_str(),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(revision + 1),
                ),
            )
            .await
            .context("watching the registries")?;
        while let Some(response) = stream.message().await.context("registry watch")? {
            if response.canceled() {
                anyhow::bail!(
                    "registry watch canceled (compacted at {}): {}",
                    response.compact_revision(),
                    response.cancel_reason()
                );
            }
            for event in response.events() {
                let Some(kv) = event.kv() else { continue };
                let change = match event.event_type() {
                    EventType::Put => self.decode(kv.key(), kv.value()),
                    EventType::Delete => self.decode_removal(kv.key()),
                };
                if let Some(change) = change {
                    index.registry(change);
                }
            }
        }
        anyhow::bail!("registry watch ended")
    }

    fn section<'k>(&self, key: &'k [u8]) -> Option<(&'static str, &'k str)> {
        let key = std::str::from_utf8(key).ok()?.strip_prefix(&self.prefix)?;
        [LISTENERS, WORKLOADS, ACKS, ALIVE]
            .into_iter()
            .find_map(|section| key.strip_prefix(section).map(|rest| (section, rest)))
    }

    fn decode(&self, key: &[u8], value: &[u8]) -> Option<RegistryChange> {
        let (section, rest) = self.section(key)?;
        let decoded = match section {
            LISTENERS => Listener::decode(value).map(RegistryChange::PutListener),
            WORKLOADS => Workload::decode(value).map(RegistryChange::PutWorkload),
            ALIVE => {
                return std::str::from_utf8(value)
                    .ok()
                    .and_then(|text| text.parse().ok())
                    .map(|unix_ms| RegistryChange::Alive {
                        node: rest.to_string(),
                        unix_ms,
                    });
            }
            _ => {
                return match decode_ack(rest, value) {
                    Ok(ack) => Some(RegistryChange::Ack(ack)),
                    Err(error) => {
                        tracing::warn!(key = %format!("{ACKS}{rest}"), %error,
                            "skipping a malformed ack in etcd");
                        None
                    }
                };
            }
        };
        match decoded {
            Ok(change) => Some(change),
            Err(error) => {
                tracing::warn!(key = rest, %error, "skipping an undecodable registry entry");
                None
            }
        }
    }

    fn decode_removal(&self, key: &[u8]) -> Option<RegistryChange> {
        let (section, rest) = self.section(key)?;
        Some(match section {
            LISTENERS => RegistryChange::RemoveListener(rest.to_string()),
            WORKLOADS => RegistryChange::RemoveWorkload(rest.to_string()),
            // Acks only move forward; a deleted one (by hand) is simply no longer shared.
            _ => return None,
        })
    }
}

impl Store for EtcdStore {
    fn kind(&self) -> &'static str {
        "etcd"
    }

    fn run(&self, index: IndexHandle) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            loop {
                if let Err(error) = self.sync_once(&index).await {
                    if index.is_closed() {
                        return;
                    }
                    tracing::warn!(
                        error = format!("{error:#}"),
                        "etcd registry sync failed; retrying"
                    );
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    }

    fn put_listener(&self, listener: &Listener) -> BoxFuture<'_, anyhow::Result<()>> {
        let key = self.key(
            LISTENERS,
            &listener_key(&listener.key.clone().unwrap_or_default()),
        );
        let value = listener.encode_to_vec();
        let mut client = self.client.clone();
        Box::pin(async move {
            client.put(key, value, None).await.context("etcd put")?;
            Ok(())
        })
    }

    fn remove_listener(&self, key: &str) -> BoxFuture<'_, anyhow::Result<()>> {
        let key = self.key(LISTENERS, key);
        let mut client = self.client.clone();
        Box::pin(async move {
            client.delete(key, None).await.context("etcd delete")?;
            Ok(())
        })
    }

    fn put_workload(&self, workload: &Workload) -> BoxFuture<'_, anyhow::Result<()>> {
        let key = self.key(
            WORKLOADS,
            &workload_key(&workload.key.clone().unwrap_or_default()),
        );
        let value = workload.encode_to_vec();
        let mut client = self.client.clone();
        Box::pin(async move {
            client.put(key, value, None).await.context("etcd put")?;
            Ok(())
        })
    }

    fn remove_workload(&self, key: &str) -> BoxFuture<'_, anyhow::Result<()>> {
        let key = self.key(WORKLOADS, key);
        let mut client = self.client.clone();
        Box::pin(async move {
            client.delete(key, None).await.context("etcd delete")?;
            Ok(())
        })
    }

    fn next_revision(&self, floor: u64) -> BoxFuture<'_, anyhow::Result<u64>> {
        let key = format!("{}{REVISION}", self.prefix);
        let mut client = self.client.clone();
        Box::pin(async move {
            // The store revision of this write: greater than every earlier write's, whoever
            // made it, and it survives restarts with the data directory.
            let response = client
                .put(key, Vec::<u8>::new(), None)
                .await
                .context("bumping the revision in etcd")?;
            let revision = response
                .header()
                .map(|h| u64::try_from(h.revision()).unwrap_or(0))
                .context("etcd answered without a header")?;
            Ok(revision.max(floor))
        })
    }

    fn shares_acks(&self) -> bool {
        true
    }

    fn put_alive(&self, node: &str, unix_ms: u64) -> BoxFuture<'_, anyhow::Result<()>> {
        let key = self.key(ALIVE, node);
        Box::pin(async move {
            self.client
                .clone()
                .put(key, unix_ms.to_string(), None)
                .await
                .context("writing a liveness mark")?;
            Ok(())
        })
    }

    fn put_ack(&self, ack: &AckRecord) -> BoxFuture<'_, anyhow::Result<()>> {
        let key = self.key(ACKS, &ack.node);
        let value = encode_ack(ack);
        let revision = ack.revision;
        let node = ack.node.clone();
        let mut client = self.client.clone();
        Box::pin(async move {
            let padded = format!("{revision:0width$}", width = REVISION_DIGITS);
            for _ in 0..3 {
                // Over an earlier revision only (same-width decimals: byte order is numeric
                // order). A value compare fails on a missing key, hence the read-back.
                let txn = Txn::new()
                    .when([Compare::value(
                        key.as_str(),
                        CompareOp::Less,
                        padded.as_str(),
                    )])
                    .and_then([TxnOp::put(key.as_str(), value.as_str(), None)])
                    .or_else([TxnOp::get(key.as_str(), None)]);
                let response = client.txn(txn).await.context("etcd txn (ack)")?;
                if response.succeeded() {
                    return Ok(());
                }
                let stored = response.op_responses().into_iter().find_map(|r| match r {
                    TxnOpResponse::Get(get) => Some(get.kvs().first().cloned()),
                    _ => None,
                });
                let guard = match stored.flatten() {
                    None => Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
                    Some(kv) => {
                        match decode_ack(&node, kv.value()) {
                            // This revision or a later one is there already.
                            Ok(stored) if stored.revision >= revision => return Ok(()),
                            Ok(_) => {}
                            Err(error) => tracing::warn!(%key, %error,
                                "replacing a malformed ack in etcd"),
                        }
                        // Replace it, unless it changed meanwhile.
                        Compare::mod_revision(key.as_str(), CompareOp::Equal, kv.mod_revision())
                    }
                };
                let txn = Txn::new().when([guard]).and_then([TxnOp::put(
                    key.as_str(),
                    value.as_str(),
                    None,
                )]);
                if client.txn(txn).await.context("etcd txn (ack)")?.succeeded() {
                    return Ok(());
                }
            }
            anyhow::bail!("the stored ack at {key} kept changing")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_ends_at_its_last_byte_plus_one() {
        assert_eq!(prefix_end(b"/stackroute/"), b"/stackroute0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }

    #[tokio::test]
    async fn memory_revisions_increase_and_respect_the_floor() {
        let store = MemoryStore::default();
        let a = store.next_revision(0).await.expect("revision");
        let b = store.next_revision(0).await.expect("revision");
        assert!(b > a, "{a} {b}");
        let c = store.next_revision(b + 1000).await.expect("revision");
        assert_eq!(c, b + 1000);
        let d = store.next_revision(0).await.expect("revision");
        assert!(d > c, "{c} {d}");
        // Seeded from the clock: a restarted controller starts above an earlier run.
        let later = MemoryStore::default();
        assert!(later.next_revision(0).await.expect("revision") >= a);
    }

    #[test]
    fn acks_round_trip_and_order_by_revision_as_bytes() {
        let ack = AckRecord {
            node: "n1".into(),
            revision: 1234,
            contained: vec![0x0c5a_3e0d_9b0f_7a11, u64::MAX],
        };
        let value = encode_ack(&ack);
        assert_eq!(
            value,
            "00000000000000001234 0c5a3e0d9b0f7a11 ffffffffffffffff"
        );
        assert_eq!(decode_ack("n1", value.as_bytes()), Ok(ack));
        let max = AckRecord {
            node: "n1".into(),
            revision: u64::MAX,
            contained: vec![],
        };
        assert_eq!(decode_ack("n1", encode_ack(&max).as_bytes()), Ok(max));
        // What the etcd transaction relies on: a value sorts below the padded revision exactly
        // when its revision is smaller, whatever versions follow.
        let padded = |r: u64| format!("{r:020}");
        for (stored, new) in [(9, 10), (99, 100), (1234, 1235), (1, u64::MAX)] {
            let stored = encode_ack(&AckRecord {
                node: "n".into(),
                revision: stored,
                contained: vec![u64::MAX],
            });
            assert!(stored < padded(new), "{stored} < {new}");
        }
        assert!(value.as_str() >= padded(1234).as_str());
        assert!(value.as_str() > padded(1233).as_str());
    }

    #[test]
    fn malformed_acks_are_refused() {
        let good = "00000000000000000007";
        for (node, value, why) in [
            ("", good, "node must not be empty"),
            ("a b", good, "contains ' '"),
            (&*"n".repeat(254), good, "longer than 253"),
            ("n1", "7", "not 20 decimal digits"),
            ("n1", "0000000000000000000x", "not 20 decimal digits"),
            ("n1", "99999999999999999999", "out of range"),
            ("n1", "00000000000000000007 12", "not 16 lowercase hex"),
            (
                "n1",
                "00000000000000000007 0C5A3E0D9B0F7A11",
                "not 16 lowercase hex",
            ),
            ("n1", "00000000000000000007  ", "not 16 lowercase hex"),
        ] {
            let error = decode_ack(node, value.as_bytes()).expect_err(value);
            assert!(error.contains(why), "{node:?} {value:?}: {error}");
        }
        assert!(decode_ack("n1", &[0xff, 0xfe]).is_err());
        // The node comes from the key: `acks/a/b` is not a node's ack.
        assert!(decode_ack("a/b", good.as_bytes()).is_err());
    }

    #[test]
    fn registry_keys_are_canonical() {
        let key = ListenerKey {
            node: "n1".into(),
            ip: "fd00:0::1".into(),
            port: 80,
            protocol: Protocol::Tcp as i32,
        };
        assert_eq!(listener_key(&key), "n1/fd00::1/80/TCP");
        let key = WorkloadKey {
            node: "n1".into(),
            namespace: "ns".into(),
            name: "w".into(),
        };
        assert_eq!(workload_key(&key), "n1/ns/w");
    }
}
