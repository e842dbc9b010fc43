//! The agent's shared state: the snapshot it serves, the registrations it holds on behalf of
//! local processes, the controller connection in use, and its metrics.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};

use prometheus_client::registry::Registry;
use stackroute_proto::v1alpha1::Listener;
use stackroute_snapshot::Snapshot;
use tracing::{error, info, warn};

use stackroute_local_api::published::{self, SOCKET_FILE};

use crate::files::{self, Publisher};
use crate::handover::HandedState;
use crate::instances::Instances;
use crate::local::LocalPolicy;
use crate::metrics::Metrics;
use crate::registry::{ListenerRecord, Persist, Persister, Registrations};

/// Whether this agent serves its socket directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Role {
    /// Serving and publishing.
    Serving = 0,
    /// A hand-over is in progress: not accepting, not publishing; resumes if it fails.
    HandingOver = 1,
    /// Another agent serves the directory now (handed over, or took it over): this one never
    /// publishes again.
    Stopped = 2,
}

/// Where the agent lives and whom it talks to.
#[derive(Clone, Debug)]
pub struct Config {
    /// This node's name (as in the controller's Node objects).
    pub node: String,
    /// Controller URLs, tried in order.
    pub controllers: Vec<String>,
    /// How the controllers are reached (TLS with this node's credentials, or plaintext).
    pub security: stackroute_proto::client::Security,
    /// Directory of the Unix socket and the published files.
    pub socket_dir: PathBuf,
    /// Directory of the persisted snapshot.
    pub state_dir: PathBuf,
}

/// A validated snapshot, parsed once when it is applied: the local API decides on the view
/// without validating (and checksumming) the whole snapshot per request.
#[derive(yoke::Yokeable)]
pub struct View<'a>(pub Snapshot<'a>);

/// A snapshot's bytes and its validated view, owned together.
pub struct Parsed(yoke::Yoke<View<'static>, Vec<u8>>);

impl Parsed {
    /// Validates `bytes` (`Snapshot::parse`) and keeps them with their view.
    pub fn new(bytes: Vec<u8>) -> Result<Self, stackroute_snapshot::DecodeError> {
        yoke::Yoke::try_attach_to_cart(bytes, |bytes: &[u8]| Snapshot::parse(bytes).map(View))
            .map(Self)
    }

    /// The encoded snapshot.
    pub fn bytes(&self) -> &[u8] {
        self.0.backing_cart()
    }

    /// The validated view.
    pub fn snapshot(&self) -> Snapshot<'_> {
        self.0.get().0
    }
}

impl std::fmt::Debug for Parsed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parsed")
            .field("bytes", &self.bytes().len())
            .field("revision", &self.snapshot().revision())
            .finish()
    }
}

/// The snapshot being served.
#[derive(Debug)]
pub struct Current {
    /// The snapshot (validated) and its view.
    pub parsed: Parsed,
    /// Its revision.
    pub revision: u64,
    /// Loaded from disk and not yet confirmed by a controller.
    pub stale: bool,
    /// The generation it was published as.
    pub generation: u64,
}

/// Everything the agent's tasks share.
#[derive(Debug)]
pub struct Agent {
    /// Configuration.
    pub config: Config,
    /// Identifies this agent process to the controller.
    pub agent_id: String,
    /// Metrics (registered in `registry`).
    pub metrics: Metrics,
    /// The Prometheus registry.
    pub registry: Registry,
    current: RwLock<Option<Arc<Current>>>,
    publisher: Mutex<Publisher>,
    registrations: Mutex<Registrations>,
    /// Writes `registrations` to the state directory, off the async workers.
    persister: Persister,
    /// Who may do what on the local socket, and its limits (set once at start).
    local_policy: std::sync::OnceLock<LocalPolicy>,
    /// The user-space stack instances (set once at start; none: requests are refused).
    instances: std::sync::OnceLock<Arc<Instances>>,
    hooks: std::sync::OnceLock<Arc<crate::hooks::Hooks>>,
    client: Mutex<Option<stackroute_proto::client::Client>>,
    listeners: RwLock<Arc<Vec<Listener>>>,
    role: AtomicU8,
    /// When `role` last changed (or the agent started); changes are made holding this lock.
    role_changed: Mutex<Instant>,
    /// (device, inode) of the `agent.sock` this agent serves: if the path names another file,
    /// another agent took the directory over.
    socket_file: Mutex<Option<(u64, u64)>>,
}

/// Access to the held registrations; when dropped after a change, has them written to the
/// state directory (by the writer thread, never on the caller's).
#[derive(Debug)]
pub struct RegistrationsGuard<'a> {
    guard: MutexGuard<'a, Registrations>,
    persister: &'a Persister,
    changed: bool,
    /// False once another agent serves the directory: the shared state directory is its.
    persist: bool,
}

impl std::ops::Deref for RegistrationsGuard<'_> {
    type Target = Registrations;

    fn deref(&self) -> &Registrations {
        &self.guard
    }
}

impl std::ops::DerefMut for RegistrationsGuard<'_> {
    fn deref_mut(&mut self) -> &mut Registrations {
        self.changed = true;
        &mut self.guard
    }
}

impl Drop for RegistrationsGuard<'_> {
    fn drop(&mut self) {
        if self.changed && self.persist {
            self.persister.changed();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves consistent data (every critical
    // section is a single assignment or map operation), so poisoning is ignored.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Agent {
    /// Prepares the directories and publishes the persisted snapshot (marked stale) if one
    /// validates.
    pub fn start(config: Config) -> anyhow::Result<Arc<Self>> {
        Self::start_with(config, None)
    }

    /// Like [`Agent::start`], continuing from what a running agent handed over (if any): its
    /// registrations, its listener registry, and the snapshot it published — adopted as it is
    /// (same generation, nothing republished) when the published file is the one it
    /// announced.
    pub fn start_with(config: Config, handed: Option<HandedState>) -> anyhow::Result<Arc<Self>> {
        files::ensure_dir(&config.socket_dir, 0o755)
            .map_err(|e| anyhow::anyhow!("{}: cannot create: {e}", config.socket_dir.display()))?;
        files::ensure_dir(&config.state_dir, 0o700)
            .map_err(|e| anyhow::anyhow!("{}: cannot create: {e}", config.state_dir.display()))?;
        let mut publisher = Publisher::open(&config.socket_dir).map_err(|e| {
            anyhow::anyhow!(
                "{}: cannot open the generation file: {e}",
                config.socket_dir.display()
            )
        })?;
        let metrics = Metrics::default();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let registrations = match &handed {
            Some(handed) => {
                publisher.advance_to(handed.generation);
                // Written by the writer thread once it starts, below.
                Registrations::from_records(handed.registrations.clone())
            }
            None => Registrations::load(&config.state_dir),
        };
        let agent = Arc::new(Self {
            agent_id: format!(
                "{}-{}-{:08x}",
                config.node,
                std::process::id(),
                fastrand::u32(..)
            ),
            config,
            metrics,
            registry,
            current: RwLock::new(None),
            publisher: Mutex::new(publisher),
            registrations: Mutex::new(registrations),
            persister: Persister::default(),
            local_policy: std::sync::OnceLock::new(),
            instances: std::sync::OnceLock::new(),
            hooks: std::sync::OnceLock::new(),
            client: Mutex::new(None),
            listeners: RwLock::default(),
            role: AtomicU8::new(Role::Serving as u8),
            role_changed: Mutex::new(Instant::now()),
            socket_file: Mutex::new(None),
        });
        let weak = Arc::downgrade(&agent);
        agent
            .persister
            .start(agent.config.state_dir.clone(), move || {
                let Some(agent) = weak.upgrade() else {
                    return Persist::Never;
                };
                match agent.role() {
                    _ if !agent.owns_directory() => Persist::Never,
                    Role::Serving => Persist::Write(lock(&agent.registrations).records()),
                    Role::HandingOver => Persist::Later,
                    Role::Stopped => Persist::Never,
                }
            });
        if handed.is_some() {
            agent.persister.changed();
        }
        if let Some(handed) = handed {
            agent.set_listeners(
                handed
                    .cluster_listeners
                    .into_iter()
                    .map(|record| record.into_listener().0)
                    .collect(),
            );
            match agent.adopt_published(handed.generation) {
                Ok(()) => return Ok(agent),
                Err(why) => {
                    warn!(%why, "not adopting the handed-over published snapshot; starting from the persisted one")
                }
            }
        }
        if let Some(bytes) = files::load_persisted(&agent.config.state_dir, &agent.config.node) {
            // `load_persisted` validated it.
            let parsed = Parsed::new(bytes)
                .map_err(|e| anyhow::anyhow!("the persisted snapshot does not validate: {e}"))?;
            let revision = parsed.snapshot().revision();
            agent
                .publish(revision, true, parsed)
                .map_err(|e| anyhow::anyhow!("cannot publish the persisted snapshot: {e}"))?;
        } else if lock(&agent.publisher)
            .withdraw()
            .map_err(|e| anyhow::anyhow!("cannot remove the previous published snapshot: {e}"))?
        {
            warn!("removed the snapshot published by an earlier agent: nothing valid to serve yet");
        }
        Ok(agent)
    }

    /// The snapshot being served, if any.
    pub fn current(&self) -> Option<Arc<Current>> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Serves `DIR/snapshot` as published by the agent that handed over, if it is the
    /// generation it announced and validates for this node.
    fn adopt_published(&self, generation: u64) -> Result<(), String> {
        let path = self.config.socket_dir.join(published::SNAPSHOT_FILE);
        let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let view = published::parse(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
        if view.generation != generation {
            return Err(format!(
                "{} is generation {}, the hand-over announced {generation}",
                path.display(),
                view.generation
            ));
        }
        // Served as the controller sent it (the checksum it knows as a delta base): without
        // the Service verdicts that agent published with it.
        let sent = Snapshot::parse(view.snapshot)
            .map(|snapshot| snapshot.without_service_verdicts())
            .map_err(|e| e.to_string())?;
        let parsed = Parsed::new(sent).map_err(|e| e.to_string())?;
        if parsed.snapshot().node_name() != self.config.node {
            return Err(format!(
                "{} is for node {:?}",
                path.display(),
                parsed.snapshot().node_name()
            ));
        }
        let (revision, stale) = (view.revision, view.stale);
        self.metrics.revision.set(revision as i64);
        self.metrics.stale.set(i64::from(stale));
        self.metrics.generation.set(generation as i64);
        self.metrics.snapshot_bytes.set(parsed.bytes().len() as i64);
        info!(
            revision,
            stale, generation, "serving the snapshot handed over"
        );
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(Current {
            parsed,
            revision,
            stale,
            generation,
        }));
        Ok(())
    }

    /// This agent's role.
    pub fn role(&self) -> Role {
        match self.role.load(Ordering::Acquire) {
            0 => Role::Serving,
            1 => Role::HandingOver,
            _ => Role::Stopped,
        }
    }

    /// Changes the role. Publishing is refused unless serving; a stopped agent stays stopped.
    pub fn set_role(&self, role: Role) {
        // Taking the publisher lock orders the change after any publication in progress.
        let _publisher = lock(&self.publisher);
        let mut changed = lock(&self.role_changed);
        let current = self.role();
        if current != Role::Stopped && current != role {
            self.role.store(role as u8, Ordering::Release);
            *changed = Instant::now();
        }
    }

    /// This agent's role and for how long it has had it (`/healthz` fails for an agent stopped
    /// or handing over for too long).
    pub fn role_age(&self) -> (Role, Duration) {
        let changed = lock(&self.role_changed);
        (self.role(), changed.elapsed())
    }

    /// Records which `agent.sock` this agent serves.
    pub fn set_socket_file(&self) -> std::io::Result<()> {
        let meta = std::fs::symlink_metadata(self.config.socket_dir.join(SOCKET_FILE))?;
        *lock(&self.socket_file) = Some((meta.dev(), meta.ino()));
        Ok(())
    }

    /// Whether `DIR/agent.sock` is still the socket this agent serves (true before it is
    /// recorded). False means another agent replaced it.
    pub fn owns_directory(&self) -> bool {
        let Some(owned) = *lock(&self.socket_file) else {
            return true;
        };
        std::fs::symlink_metadata(self.config.socket_dir.join(SOCKET_FILE))
            .is_ok_and(|meta| (meta.dev(), meta.ino()) == owned)
    }

    /// What a new agent needs to continue: the last generation, the registrations, the
    /// listener registry. Taken while not publishing ([`Role::HandingOver`]).
    pub fn handed_state(&self) -> HandedState {
        let generation = lock(&self.publisher).generation();
        HandedState {
            version: crate::handover::VERSION,
            node: self.config.node.clone(),
            generation,
            registrations: self.registrations().records(),
            cluster_listeners: self
                .listeners()
                .iter()
                .filter_map(|l| ListenerRecord::of(l, Default::default()))
                .collect(),
        }
    }

    /// Publishes `parsed` for the shim with its Service verdicts (a connection to a ClusterIP
    /// then reads one record); `parsed` itself, as the controller sent it, stays the current
    /// snapshot and the base of its deltas.
    fn publish(&self, revision: u64, stale: bool, parsed: Parsed) -> std::io::Result<()> {
        let started = Instant::now();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let published = parsed
            .snapshot()
            .with_service_verdicts(cores, stackroute_snapshot::SERVICE_VERDICT_DECISIONS);
        let verdicts_ms = started.elapsed().as_millis() as u64;
        let mut publisher = lock(&self.publisher);
        if self.role() != Role::Serving {
            return Err(std::io::Error::other(
                "this agent is handing its socket directory over; not publishing",
            ));
        }
        if !self.owns_directory() {
            return Err(std::io::Error::other(
                "another agent took this socket directory over; not publishing",
            ));
        }
        let generation = publisher.publish(revision, stale, &published)?;
        self.metrics.revision.set(revision as i64);
        self.metrics.stale.set(i64::from(stale));
        self.metrics.generation.set(generation as i64);
        self.metrics.snapshot_bytes.set(parsed.bytes().len() as i64);
        info!(
            revision,
            stale,
            generation,
            bytes = parsed.bytes().len(),
            published_bytes = published.len(),
            verdicts_ms,
            "published snapshot"
        );
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(Current {
            parsed,
            revision,
            stale,
            generation,
        }));
        Ok(())
    }

    /// Applies a snapshot received from a controller: validates it, persists it, publishes it.
    /// On error nothing changes (the previous snapshot stays in force) and the message says
    /// why, for the controller's `Ack`.
    pub fn apply(&self, revision: u64, bytes: Vec<u8>) -> Result<(), String> {
        // Parsed once here; the view is kept with the bytes for the local API.
        let parsed = match Parsed::new(bytes) {
            Ok(parsed) => parsed,
            Err(error) => {
                self.metrics.rejected.inc();
                return Err(format!(
                    "snapshot of revision {revision} does not validate: {error}"
                ));
            }
        };
        let snapshot = parsed.snapshot();
        if snapshot.node_name() != self.config.node {
            self.metrics.rejected.inc();
            return Err(format!(
                "snapshot of revision {revision} is for node {:?}, not {:?}",
                snapshot.node_name(),
                self.config.node
            ));
        }
        if snapshot.revision() != revision {
            warn!(
                revision,
                snapshot_revision = snapshot.revision(),
                "update and snapshot revisions differ"
            );
        }
        if let Some(current) = self.current()
            && !current.stale
            && current.revision == revision
            && current.parsed.bytes() == parsed.bytes()
        {
            return Ok(());
        }
        // Neither persisted nor published while handing over or after: the state directory
        // and the published files are the next agent's.
        if self.role() != Role::Serving || !self.owns_directory() {
            return Err(format!(
                "revision {revision} not applied: this agent no longer serves its socket directory"
            ));
        }
        let persisted = files::persist(&self.config.state_dir, parsed.bytes());
        if let Err(error) = &persisted {
            error!(%error, dir = %self.config.state_dir.display(), "cannot persist the snapshot; serving it anyway");
        }
        self.publish(revision, false, parsed)
            .map_err(|e| format!("cannot publish revision {revision}: {e}"))?;
        persisted.map_err(|e| format!("published revision {revision} but cannot persist it: {e}"))
    }

    /// Rebuilds revision `revision` from the snapshot in force (which must be `base`) and a
    /// delta, then applies it as [`Agent::apply`] does: validated whole, published atomically.
    pub fn apply_delta(&self, revision: u64, base: u64, delta: &[u8]) -> Result<(), String> {
        let current = self.current().filter(|c| c.revision == base);
        let rebuilt = current
            .ok_or_else(|| format!("snapshot delta for revision {revision} starts from revision {base}, which this agent does not hold"))
            .and_then(|current| {
                stackroute_snapshot::delta::apply(current.parsed.bytes(), delta)
                    .map_err(|error| format!("revision {revision}: {error}"))
            });
        match rebuilt {
            Ok(bytes) => {
                self.metrics.delta("applied");
                self.apply(revision, bytes)
            }
            Err(error) => {
                self.metrics.delta("rejected");
                self.metrics.rejected.inc();
                Err(error)
            }
        }
    }

    /// The cluster's listener registry, as of the last snapshot applied.
    pub fn listeners(&self) -> Arc<Vec<Listener>> {
        self.listeners
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces the cluster's listener registry.
    pub fn set_listeners(&self, listeners: Vec<Listener>) {
        *self
            .listeners
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(listeners);
    }

    /// The registrations held for local processes; persisted when a guard that was used
    /// mutably drops.
    pub fn registrations(&self) -> RegistrationsGuard<'_> {
        RegistrationsGuard {
            guard: lock(&self.registrations),
            persister: &self.persister,
            changed: false,
            persist: self.role() != Role::Stopped,
        }
    }

    /// Writes changed registrations to the state directory now, waiting up to `timeout`
    /// (blocking: for shutdown and tests); false if they were not confirmed written in time.
    pub fn flush_registrations(&self, timeout: Duration) -> bool {
        self.persister.flush(timeout)
    }

    /// Sets who may do what on the local socket, and its limits; only the first call counts.
    pub fn set_local_policy(&self, policy: LocalPolicy) {
        info!(mode = policy.mode.as_str(), limits = ?policy.limits, "local API policy");
        if self.local_policy.set(policy).is_err() {
            warn!("the local API policy was already set; keeping the first");
        }
    }

    /// Who may do what on the local socket, and its limits.
    pub fn local_policy(&self) -> &LocalPolicy {
        self.local_policy.get_or_init(LocalPolicy::default)
    }

    /// Sets the user-space stack instances; only the first call counts.
    pub fn set_instances(&self, instances: Arc<Instances>) {
        if self.instances.set(instances).is_err() {
            warn!("the user-space stack instances were already set; keeping the first");
        }
    }

    /// Sets the kernel hooks (once, at start).
    pub fn set_hooks(&self, hooks: Arc<crate::hooks::Hooks>) {
        if self.hooks.set(hooks).is_err() {
            warn!("the kernel hooks were already set; keeping the first");
        }
    }

    /// The kernel hooks, once set.
    pub fn hooks(&self) -> Option<&Arc<crate::hooks::Hooks>> {
        self.hooks.get()
    }

    /// The user-space stack instances, once set.
    pub fn instances(&self) -> Option<&Arc<Instances>> {
        self.instances.get()
    }

    /// The controller client in use, if connected.
    pub fn client(&self) -> Option<stackroute_proto::client::Client> {
        lock(&self.client).clone()
    }

    /// Sets (or clears) the controller client in use.
    pub fn set_client(&self, client: Option<stackroute_proto::client::Client>) {
        self.metrics.connected.set(i64::from(client.is_some()));
        *lock(&self.client) = client;
    }
}

#[cfg(test)]
mod tests {
    use stackroute_local_api::published;

    use super::*;
    use crate::files::tests::example_snapshot;

    fn config(root: &std::path::Path) -> Config {
        Config {
            node: "node-a1".into(),
            controllers: vec!["127.0.0.1:1".into()],
            security: stackroute_proto::client::Security::Plaintext,
            socket_dir: root.join("run"),
            state_dir: root.join("state"),
        }
    }

    fn published_file(agent: &Agent) -> (u64, u64, bool) {
        let bytes = std::fs::read(agent.config.socket_dir.join(published::SNAPSHOT_FILE)).unwrap();
        let view = published::parse(&bytes).unwrap();
        (view.generation, view.revision, view.stale)
    }

    #[test]
    fn bad_snapshots_are_rejected_and_the_previous_one_stays() {
        let root = tempfile::tempdir().unwrap();
        let agent = Agent::start(config(root.path())).unwrap();
        assert!(agent.current().is_none());

        let mut corrupt = example_snapshot("node-a1", 4);
        let last = corrupt.len() - 1;
        corrupt[last] ^= 1;
        let error = agent.apply(4, corrupt).unwrap_err();
        assert!(error.contains("does not validate"), "{error}");
        assert!(agent.current().is_none());
        assert!(
            !agent
                .config
                .socket_dir
                .join(published::SNAPSHOT_FILE)
                .exists()
        );

        agent.apply(5, example_snapshot("node-a1", 5)).unwrap();
        assert_eq!(published_file(&agent), (1, 5, false));
        // Published with Service verdicts for the shim; kept (the delta base) as sent.
        let file = std::fs::read(agent.config.socket_dir.join(published::SNAPSHOT_FILE)).unwrap();
        let shim_reads = Snapshot::parse(published::parse(&file).unwrap().snapshot).unwrap();
        assert!(shim_reads.has_service_verdicts());
        assert_eq!(
            shim_reads.without_service_verdicts(),
            example_snapshot("node-a1", 5)
        );
        assert_eq!(
            agent.current().unwrap().parsed.bytes(),
            &example_snapshot("node-a1", 5)[..]
        );
        let error = agent.apply(6, example_snapshot("node-b1", 6)).unwrap_err();
        assert!(error.contains("is for node \"node-b1\""), "{error}");
        let error = agent.apply(7, b"short".to_vec()).unwrap_err();
        assert!(error.contains("does not validate"), "{error}");
        let current = agent.current().unwrap();
        assert_eq!(
            (current.revision, current.stale, current.generation),
            (5, false, 1)
        );
        assert_eq!(published_file(&agent), (1, 5, false));
        // The same revision again changes nothing.
        agent.apply(5, example_snapshot("node-a1", 5)).unwrap();
        assert_eq!(agent.current().unwrap().generation, 1);
        let mut metrics = String::new();
        prometheus_client::encoding::text::encode(&mut metrics, &agent.registry).unwrap();
        assert!(
            metrics.contains("stackroute_lrd_snapshots_rejected_total 3"),
            "{metrics}"
        );
    }

    #[test]
    fn a_restart_serves_the_persisted_snapshot_stale_until_a_fresh_one_arrives() {
        let root = tempfile::tempdir().unwrap();
        let agent = Agent::start(config(root.path())).unwrap();
        agent.apply(9, example_snapshot("node-a1", 9)).unwrap();
        drop(agent);

        let agent = Agent::start(config(root.path())).unwrap();
        let current = agent.current().unwrap();
        assert_eq!(
            (current.revision, current.stale, current.generation),
            (9, true, 2)
        );
        assert_eq!(published_file(&agent), (2, 9, true));
        // The controller confirms the same revision: republished fresh.
        agent.apply(9, example_snapshot("node-a1", 9)).unwrap();
        assert_eq!(published_file(&agent), (3, 9, false));
        drop(agent);

        // A corrupt persisted file: nothing is served.
        std::fs::write(root.path().join("state/snapshot"), b"\x89SRSNAP\ngarbage").unwrap();
        let agent = Agent::start(config(root.path())).unwrap();
        assert!(agent.current().is_none());
        // …and the file the previous agent published is withdrawn, with a new generation.
        assert!(
            !agent
                .config
                .socket_dir
                .join(published::SNAPSHOT_FILE)
                .exists()
        );
        let generation =
            std::fs::read(agent.config.socket_dir.join(published::GENERATION_FILE)).unwrap();
        assert_eq!(published::parse_generation(&generation), Some(4));
    }

    /// A restarted agent (killed mid-apply leaves the previous persisted snapshot: it is
    /// replaced by rename) applies the controller's delta onto the snapshot it restarted with;
    /// a delta from a revision it does not hold, or a corrupt one, changes nothing.
    #[test]
    fn a_restarted_agent_applies_a_delta_onto_its_persisted_snapshot() {
        use stackroute_snapshot::delta;
        let root = tempfile::tempdir().unwrap();
        let agent = Agent::start(config(root.path())).unwrap();
        let (nine, ten, eleven) = (
            example_snapshot("node-a1", 9),
            example_snapshot("node-a1", 10),
            example_snapshot("node-a1", 11),
        );
        agent.apply(9, nine.clone()).unwrap();
        drop(agent);

        let agent = Agent::start(config(root.path())).unwrap();
        assert_eq!(published_file(&agent), (2, 9, true));
        agent
            .apply_delta(10, 9, &delta::diff(&nine, &ten).unwrap())
            .unwrap();
        assert_eq!(published_file(&agent), (3, 10, false));
        assert_eq!(agent.current().unwrap().parsed.bytes(), &ten[..]);

        let error = agent
            .apply_delta(11, 9, &delta::diff(&nine, &eleven).unwrap())
            .unwrap_err();
        assert!(error.contains("does not hold"), "{error}");
        let mut corrupt = delta::diff(&ten, &eleven).unwrap();
        let last = corrupt.len() - 1;
        corrupt[last] ^= 1;
        let error = agent.apply_delta(11, 10, &corrupt).unwrap_err();
        assert!(error.contains("revision 11"), "{error}");
        assert_eq!(published_file(&agent), (3, 10, false));
        let mut metrics = String::new();
        prometheus_client::encoding::text::encode(&mut metrics, &agent.registry).unwrap();
        for line in [
            r#"stackroute_lrd_snapshot_deltas_total{outcome="applied"} 1"#,
            r#"stackroute_lrd_snapshot_deltas_total{outcome="rejected"} 2"#,
        ] {
            assert!(metrics.contains(line), "{metrics}");
        }
    }

    #[test]
    fn a_hand_over_adopts_the_published_snapshot_and_continues_above_its_generation() {
        let root = tempfile::tempdir().unwrap();
        let old = Agent::start(config(root.path())).unwrap();
        old.apply(5, example_snapshot("node-a1", 5)).unwrap();
        old.apply(6, example_snapshot("node-a1", 6)).unwrap();
        old.set_role(Role::HandingOver);
        assert!(
            old.apply(7, example_snapshot("node-a1", 7)).is_err(),
            "frozen"
        );
        let handed = old.handed_state();
        assert_eq!(handed.generation, 2);

        // The published file is the one announced: served as it is, nothing republished.
        let new = Agent::start_with(config(root.path()), Some(handed.clone())).unwrap();
        let current = new.current().unwrap();
        assert_eq!(
            (current.revision, current.stale, current.generation),
            (6, false, 2)
        );
        assert_eq!(published_file(&new), (2, 6, false));
        // Served as the controller sent it (the file adds Service verdicts).
        assert_eq!(current.parsed.bytes(), &example_snapshot("node-a1", 6)[..]);
        new.apply(7, example_snapshot("node-a1", 7)).unwrap();
        assert_eq!(published_file(&new), (3, 7, false));
        // The old agent, stopped, never publishes again.
        old.set_role(Role::Stopped);
        old.set_role(Role::Serving);
        assert_eq!(old.role(), Role::Stopped);
        // Staying stopped does not restart the clock `/healthz` reads.
        std::thread::sleep(Duration::from_millis(20));
        old.set_role(Role::Stopped);
        assert!(old.role_age().1 >= Duration::from_millis(20));
        assert!(old.apply(8, example_snapshot("node-a1", 8)).is_err());
        drop((old, new));

        // An announced generation that is not the file's: republished from the persisted
        // snapshot, above both.
        let stale_claim = HandedState {
            generation: 9,
            ..handed
        };
        let new = Agent::start_with(config(root.path()), Some(stale_claim)).unwrap();
        assert_eq!(published_file(&new), (10, 7, true));
    }
}
