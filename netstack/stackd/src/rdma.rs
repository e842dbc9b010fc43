//! Connections upgraded to RDMA: the instance opens a queue pair with its verbs provider (the
//! library `--rdma-provider` names, loaded on first use) for the endpoint the shim puts in its
//! upgrade message, then connects it to the peer's and relays the application's socket end
//! over it (`stackroute_rdma_relay::Relay`), one thread per connection: RDMA connections are
//! few and long, and a relay blocks only on its own descriptors. The shim's view is the same
//! as for the user-space stack's connections (a relayed socket, `Status`, `Connections`).

use std::collections::{BTreeMap, HashMap};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::io::Errno;
use stackroute_local_api::relay::{
    ConnectionInfo, RdmaEndpoint, RdmaPath, RelayResponse, RelayState,
};
use stackroute_rdma_discover::gid_address;
use stackroute_rdma_provider::{Library, OpenedQueuePair, Refusal};
use stackroute_rdma_relay::{Counters, End, PROTOCOL_V1, Relay};
use stackroute_rdma_upgrade::{Endpoint, Reason};
use tracing::{debug, info};

/// How long an opened queue pair waits for its `RdmaRelay` (an exchange lasts tens of
/// milliseconds; one that never finishes must not pin registered memory).
const OPENED_FOR: Duration = Duration::from_secs(10);
/// Finished connections' status is kept this many at most.
const FINISHED_KEPT: usize = 1024;

/// One RDMA connection, shared with its relay thread.
#[derive(Debug)]
struct Connection {
    local: SocketAddr,
    remote: SocketAddr,
    /// The two queue pairs' GIDs: this side's, the peer's.
    gids: ([u8; 16], [u8; 16]),
    counters: Arc<Counters>,
    end: Mutex<Option<End>>,
}

impl Connection {
    fn state(&self) -> (RelayState, Option<i32>) {
        match &*self.end.lock().unwrap_or_else(|e| e.into_inner()) {
            None => (RelayState::Established, None),
            Some(End::Closed) => (RelayState::Closed, None),
            Some(End::Failed(_)) => (RelayState::Reset, Some(Errno::CONNRESET.raw_os_error())),
        }
    }

    fn info(&self, id: u64) -> ConnectionInfo {
        let (state, _) = self.state();
        ConnectionInfo {
            id,
            local: self.local,
            remote: self.remote,
            original: None,
            tcp_state: match state {
                RelayState::Established => "ESTABLISHED",
                _ => "CLOSED",
            }
            .into(),
            state,
            congestion_control: "none".into(),
            bytes_sent: self.counters.sent.load(Ordering::Relaxed),
            bytes_received: self.counters.received.load(Ordering::Relaxed),
            retransmits: 0,
            smoothed_rtt_us: 0,
            min_rtt_us: 0,
            delivery_rate_bps: 0,
            cwnd_bytes: 0,
            transport: Some("RDMA".into()),
            rdma: Some(RdmaPath {
                local: gid_address(self.gids.0),
                remote: gid_address(self.gids.1),
            }),
        }
    }
}

/// The instance's RDMA side.
#[derive(Debug)]
pub(crate) struct Rdma {
    provider: Option<PathBuf>,
    library: Option<Result<Arc<Library>, String>>,
    /// Queue pairs opened for an exchange: with this side's GID and when.
    opened: HashMap<u64, (OpenedQueuePair, [u8; 16], Instant)>,
    next_token: u64,
    connections: BTreeMap<u64, Arc<Connection>>,
}

fn refused(reason: Reason, detail: impl Into<String>) -> RelayResponse {
    RelayResponse::RdmaRefused {
        reason: reason.as_str().into(),
        detail: detail.into(),
    }
}

impl Rdma {
    /// RDMA through the provider at `provider`, or none.
    pub(crate) fn new(provider: Option<PathBuf>) -> Self {
        Self {
            provider,
            library: None,
            opened: HashMap::new(),
            next_token: 1,
            connections: BTreeMap::new(),
        }
    }

    fn library(&mut self) -> Result<Arc<Library>, Refusal> {
        let Some(path) = &self.provider else {
            return Err(Refusal::new(
                Reason::StackUnavailable,
                "this instance has no verbs provider (the agent's --rdma-provider)",
            ));
        };
        let loaded = self.library.get_or_insert_with(|| {
            let loaded = Library::load(path);
            match &loaded {
                Ok(_) => info!(provider = %path.display(), "verbs provider loaded"),
                Err(why) => info!(provider = %path.display(), "verbs provider unusable: {why}"),
            }
            loaded
        });
        loaded
            .clone()
            .map_err(|why| Refusal::new(Reason::StackUnavailable, why))
    }

    /// `RdmaOpen`.
    pub(crate) fn open(&mut self) -> RelayResponse {
        self.opened
            .retain(|_, (_, _, at)| at.elapsed() < OPENED_FOR);
        match self
            .library()
            .and_then(|library| library.open(&PROTOCOL_V1))
        {
            Ok((opened, endpoint)) => {
                let token = self.next_token;
                self.next_token += 1;
                self.opened
                    .insert(token, (opened, endpoint.gid, Instant::now()));
                RelayResponse::RdmaOpened {
                    token,
                    endpoint: RdmaEndpoint {
                        gid: endpoint.gid,
                        qpn: endpoint.qpn,
                        psn: endpoint.psn,
                    },
                }
            }
            Err(Refusal { reason, detail }) => {
                debug!(%reason, "opening a queue pair: {detail}");
                refused(reason, detail)
            }
        }
    }

    /// `RdmaRelay` as connection `id`: connects the queue pair (at most `timeout`, on this
    /// thread: a verbs connect only moves the queue pair's state) and starts its relay.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn relay(
        &mut self,
        id: u64,
        token: u64,
        peer: RdmaEndpoint,
        local: SocketAddr,
        remote: SocketAddr,
        timeout: Duration,
        app: OwnedFd,
        control: OwnedFd,
    ) -> RelayResponse {
        let Some((opened, local_gid, _)) = self.opened.remove(&token) else {
            return refused(
                Reason::RdmaError,
                format!("no open queue pair {token} (expired after {OPENED_FOR:?}?)"),
            );
        };
        let peer = Endpoint {
            gid: peer.gid,
            qpn: peer.qpn,
            psn: peer.psn,
        };
        let qp = match opened.connect(&peer, timeout) {
            Ok(qp) => qp,
            Err(Refusal { reason, detail }) => {
                debug!(%reason, %remote, "connecting a queue pair: {detail}");
                return refused(reason, detail);
            }
        };
        let connection = Arc::new(Connection {
            local,
            remote,
            gids: (local_gid, peer.gid),
            counters: Arc::new(Counters::default()),
            end: Mutex::new(None),
        });
        let relay = Relay::new(UnixStream::from(app), qp, PROTOCOL_V1)
            .with_control(TcpStream::from(control))
            .with_counters(Arc::clone(&connection.counters));
        let shared = Arc::clone(&connection);
        let spawned = std::thread::Builder::new()
            .name(format!("rdma-{id}"))
            .spawn(move || {
                let end = relay.run();
                match &end {
                    End::Closed => debug!(id, %remote, "RDMA connection closed"),
                    End::Failed(why) => info!(id, %remote, "RDMA connection failed: {why}"),
                }
                *shared.end.lock().unwrap_or_else(|e| e.into_inner()) = Some(end);
            });
        if let Err(why) = spawned {
            return refused(Reason::Other, format!("cannot start a relay thread: {why}"));
        }
        debug!(id, %remote, qpn = peer.qpn, "RDMA connection relayed");
        self.connections.insert(id, connection);
        self.forget_old();
        RelayResponse::Connecting { id, local }
    }

    fn forget_old(&mut self) {
        let mut finished = self
            .connections
            .iter()
            .filter(|(_, c)| c.state().0 != RelayState::Established)
            .map(|(&id, _)| id)
            .collect::<Vec<_>>();
        if finished.len() > FINISHED_KEPT {
            finished.truncate(finished.len() - FINISHED_KEPT);
            for id in finished {
                self.connections.remove(&id);
            }
        }
    }

    /// `Status` of connection `id`, if it is an RDMA one.
    pub(crate) fn status(&self, id: u64) -> Option<RelayResponse> {
        let connection = self.connections.get(&id)?;
        let (state, error) = connection.state();
        Some(RelayResponse::Status {
            id,
            state,
            error,
            info: Some(connection.info(id)),
        })
    }

    /// The connections after `after`, by id.
    pub(crate) fn infos(&self, after: u64) -> impl Iterator<Item = (u64, ConnectionInfo)> + '_ {
        self.connections
            .range(after.saturating_add(1)..)
            .map(|(&id, connection)| (id, connection.info(id)))
    }
}
