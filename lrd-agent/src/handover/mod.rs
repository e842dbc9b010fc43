//! Hand-over of the socket directory from a running agent to a new one (a surge rolling update
//! of the DaemonSet): the new agent asks on `STATE_DIR/handover.sock`, the running one stops
//! accepting, drains its connections, stops publishing and passes its listening `agent.sock`
//! socket (`SCM_RIGHTS`) with its state; clients waiting in the socket's backlog are then
//! accepted by the new agent. [`protocol`] has the messages and checks, [`fdpass`] the
//! descriptor passing, [`key`] the state directory and the node's hand-over secret; this
//! module does the I/O of both sides.
//!
//! The hand-over socket is in the state directory, not in the socket directory: the socket
//! directory is mounted into every injected pod, and a process that can connect to the
//! hand-over socket and pass the checks receives the agent's listening socket and state. The
//! running agent hands over only to a caller of its own uid that presents the node's secret
//! (`STATE_DIR/handover.key`).

mod fdpass;
pub mod key;
pub mod protocol;

use std::io::{self, Write as _};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener as StdUnixListener, UnixStream as StdUnixStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use stackroute_local_api::published::SOCKET_FILE;
use tokio::net::UnixListener;
use tracing::{error, info, warn};

pub use protocol::{HANDOVER_SOCKET_FILE, HandedState, KEY_FILE, Key, VERSION};
use protocol::{HEADER_LEN, Message, Refusal};

use crate::serving::Serving;
use crate::state::{Agent, Role};

/// Time a caller of the hand-over socket has to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Time open connections get to finish their request before the socket is handed over
/// (a registration forwarded to the controller takes at most 3 s).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(4);
/// Time the new agent has to confirm, once it has the socket.
const TAKEN_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a serving agent checks that `agent.sock` is still its own.
const OWNERSHIP_CHECK: Duration = Duration::from_secs(1);

/// Why a serving agent stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum Stopped {
    /// It handed the directory over; `release_metrics`: the new agent runs in the same network
    /// namespace and wants the same metrics address, so this one must close it.
    HandedOver {
        /// Close the metrics listener.
        release_metrics: bool,
    },
    /// Another agent replaced `agent.sock` (it took the directory over without a hand-over).
    LostDirectory,
}

// === the new agent ===

/// Before the socket directory is touched: the state directory must be separate from the
/// socket directory (and not inside it), and is made private (0700); a `handover.sock` that an
/// agent of an earlier release left in the socket directory is removed.
pub fn prepare(socket_dir: &Path, state_dir: &Path) -> anyhow::Result<()> {
    key::check_separate(socket_dir, state_dir)?;
    key::secure_dir(state_dir)?;
    let legacy = socket_dir.join(HANDOVER_SOCKET_FILE);
    if std::fs::symlink_metadata(&legacy).is_ok_and(|meta| meta.file_type().is_socket()) {
        std::fs::remove_file(&legacy)
            .with_context(|| format!("{}: cannot remove", legacy.display()))?;
        info!(path = %legacy.display(), "removed the hand-over socket an agent of an earlier release left in the socket directory");
    }
    Ok(())
}

/// Asks the agent serving this node to hand its socket directory over, on
/// `STATE_DIR/handover.sock` with the node's secret from `STATE_DIR/handover.key`, within
/// `timeout`. On success: its listening socket and its state. Every failure is a message
/// saying what the running agent did.
pub fn request(
    state_dir: &Path,
    node: &str,
    timeout: Duration,
    metrics_addr: Option<std::net::SocketAddr>,
) -> Result<(StdUnixListener, HandedState), String> {
    let timeout = timeout.max(Duration::from_millis(1));
    let deadline = Instant::now() + timeout;
    let key = key::load_or_create(state_dir)
        .map_err(|e| format!("cannot read the node's hand-over key: {e:#}"))?;
    let path = state_dir.join(HANDOVER_SOCKET_FILE);
    let stream = StdUnixStream::connect(&path).map_err(|e| {
        format!(
            "cannot connect to {}: {e} (an agent of an earlier release, or one without hand-over support?)",
            path.display()
        )
    })?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let request = Message::Request {
        version: VERSION,
        node: node.to_string(),
        secret: Some(key.secret()),
        netns: own_netns(),
        metrics_addr: metrics_addr.map(|a| a.to_string()),
    };
    write_message(&stream, &request).map_err(|e| format!("cannot send the request: {e}"))?;
    let mut fds = Vec::new();
    let answer = read_message(&stream, deadline, &mut fds, "the running agent")?;
    let state = protocol::check_answer(answer, node)?;
    if fds.len() != 1 {
        return Err(format!(
            "expected the agent socket with the state, got {} descriptors",
            fds.len()
        ));
    }
    let listener = agent_listener(fds.remove(0))?;
    if let Err(e) = write_message(&stream, &Message::Taken) {
        // It passed everything; if it went away since, nobody else serves the socket.
        warn!(error = %e, "could not confirm the hand-over; the running agent went away");
    }
    Ok((listener, state))
}

/// The received descriptor as the agent's listener, if it is one: a listening Unix stream
/// socket bound to an `agent.sock`.
fn agent_listener(fd: OwnedFd) -> Result<StdUnixListener, String> {
    let listening = rustix::net::sockopt::socket_acceptconn(&fd).unwrap_or(false);
    let stream =
        rustix::net::sockopt::socket_type(&fd).ok() == Some(rustix::net::SocketType::STREAM);
    if !listening || !stream {
        return Err("the descriptor received is not a listening stream socket".into());
    }
    let listener = StdUnixListener::from(fd);
    let address = listener
        .local_addr()
        .map_err(|e| format!("the descriptor received is not a Unix socket: {e}"))?;
    let name = address
        .as_pathname()
        .and_then(Path::file_name)
        .and_then(|n| n.to_str());
    if name != Some(SOCKET_FILE) {
        return Err(format!(
            "the socket received is bound to {address:?}, not an {SOCKET_FILE}"
        ));
    }
    Ok(listener)
}

fn own_netns() -> u64 {
    std::fs::metadata("/proc/self/ns/net").map_or(0, |m| m.ino())
}

// === the running agent ===

/// The hand-over socket of a serving agent and the node's secret a successor must present.
#[derive(Debug)]
pub struct Listener {
    socket: UnixListener,
    key: Key,
}

/// Binds `STATE_DIR/handover.sock` (mode 0600, in a directory of mode 0700), replacing the one
/// of an earlier agent, and reads the node's secret (`STATE_DIR/handover.key`, created if
/// missing).
pub fn bind(state_dir: &Path) -> anyhow::Result<Listener> {
    let key = key::load_or_create(state_dir)?;
    let path = state_dir.join(HANDOVER_SOCKET_FILE);
    match std::fs::symlink_metadata(&path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(&path)
            .with_context(|| format!("{}: cannot remove the old socket", path.display()))?,
        Ok(_) => anyhow::bail!("{}: exists and is not a socket", path.display()),
        Err(_) => {}
    }
    let listener =
        StdUnixListener::bind(&path).with_context(|| format!("{}: cannot bind", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("{}: cannot set permissions", path.display()))?;
    listener.set_nonblocking(true)?;
    Ok(Listener {
        socket: UnixListener::from_std(listener)?,
        key,
    })
}

enum Event {
    TaskEnded,
    Check,
    Request(io::Result<tokio::net::UnixStream>),
}

/// Serves until the directory is handed over or taken over; refused or failed hand-overs
/// leave the agent serving. An error: one of its tasks ended.
pub async fn supervise(
    agent: Arc<Agent>,
    mut serving: Serving,
    handover: Listener,
    metrics_addr: Option<std::net::SocketAddr>,
) -> anyhow::Result<Stopped> {
    let mut check = tokio::time::interval(OWNERSHIP_CHECK);
    loop {
        let event = tokio::select! {
            _ = serving.ended() => Event::TaskEnded,
            _ = check.tick() => Event::Check,
            accepted = handover.socket.accept() => Event::Request(accepted.map(|(s, _)| s)),
        };
        match event {
            Event::TaskEnded => anyhow::bail!("an agent task ended unexpectedly"),
            Event::Check => {
                if !agent.owns_directory() {
                    lost_directory(&agent, serving).await;
                    return Ok(Stopped::LostDirectory);
                }
            }
            Event::Request(Err(error)) => {
                warn!(%error, "accept on the hand-over socket failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Event::Request(Ok(stream)) => {
                match answer(&agent, serving, stream, &handover.key, metrics_addr).await {
                    Answered::Serving(again) => serving = again,
                    Answered::Stopped(stopped) => return Ok(stopped),
                }
            }
        }
    }
}

async fn lost_directory(agent: &Arc<Agent>, serving: Serving) {
    error!(
        dir = %agent.config.socket_dir.display(),
        "another agent replaced agent.sock and took this socket directory over; this agent stops serving and publishing"
    );
    agent.set_role(Role::Stopped);
    drop(serving.stop(agent, Duration::ZERO).await);
}

enum Answered {
    Serving(Serving),
    Stopped(Stopped),
}

/// What the logs say about a caller of the hand-over socket. Neither is a proof of anything:
/// a process sets its own command name, and a new agent from a new image runs an executable
/// that is another file than this agent's (another container's file system), so the secret is
/// what authenticates a successor.
#[derive(Debug)]
struct PeerInfo {
    /// `/proc/PID/comm`.
    comm: Option<String>,
    /// Whether `/proc/PID/exe` is the same file (device and inode) as this agent's executable.
    same_executable: Option<bool>,
}

impl PeerInfo {
    fn of(pid: Option<i32>) -> Self {
        let Some(pid) = pid.filter(|pid| *pid > 0) else {
            return Self {
                comm: None,
                same_executable: None,
            };
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .ok()
            .map(|c| c.trim_end().to_string());
        let file = |path: &str| std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()));
        let same_executable = file(&format!("/proc/{pid}/exe"))
            .zip(file("/proc/self/exe"))
            .map(|(theirs, ours)| theirs == ours);
        Self {
            comm,
            same_executable,
        }
    }
}

/// One request on the hand-over socket: refused (and the agent keeps serving), handed over,
/// or failed half-way (and the agent serves again).
async fn answer(
    agent: &Arc<Agent>,
    serving: Serving,
    stream: tokio::net::UnixStream,
    key: &Key,
    metrics_addr: Option<std::net::SocketAddr>,
) -> Answered {
    let cred = stream.peer_cred().ok();
    let stream = match stream.into_std().and_then(|s| {
        s.set_nonblocking(false)?;
        s.set_write_timeout(Some(TAKEN_TIMEOUT))?;
        Ok(s)
    }) {
        Ok(stream) => stream,
        Err(error) => {
            warn!(%error, "hand-over connection unusable; ignored");
            return Answered::Serving(serving);
        }
    };
    let stream = Arc::new(stream);
    let request = {
        let stream = stream.clone();
        tokio::task::spawn_blocking(move || {
            let mut fds = Vec::new();
            read_message(
                &stream,
                Instant::now() + REQUEST_TIMEOUT,
                &mut fds,
                "the caller",
            )
        })
        .await
        .unwrap_or_else(|e| Err(format!("reading the request failed: {e}")))
    };
    let pid = cred.as_ref().and_then(|c| c.pid());
    let peer = PeerInfo::of(pid);
    let checked = request
        .map_err(|message| Refusal::new("malformed", message))
        .and_then(|request| {
            let own_uid = rustix::process::getuid().as_raw();
            let uid = cred.as_ref().map_or(u32::MAX, |c| c.uid());
            protocol::check_peer(uid, own_uid)?;
            protocol::check_request(&request, &agent.config.node, key)?;
            if !agent.owns_directory() {
                return Err(Refusal::new(
                    "not-serving",
                    "this agent no longer serves its socket directory",
                ));
            }
            Ok(request)
        });
    let request = match checked {
        Ok(request) => request,
        Err(refusal) => {
            agent.metrics.handover_refused(refusal.reason);
            warn!(
                ?pid,
                comm = ?peer.comm,
                same_executable = ?peer.same_executable,
                reason = refusal.reason,
                message = %refusal.message,
                "refused a hand-over request; still serving"
            );
            let _ = write_message(
                &stream,
                &Message::Refused {
                    message: refusal.message,
                },
            );
            return Answered::Serving(serving);
        }
    };
    let release_metrics = match &request {
        Message::Request {
            netns,
            metrics_addr: theirs,
            ..
        } => {
            *netns != 0
                && *netns == own_netns()
                && metrics_addr.is_some_and(|a| theirs.as_deref() == Some(&a.to_string()))
        }
        _ => false,
    };
    info!(
        ?pid,
        comm = ?peer.comm,
        same_executable = ?peer.same_executable,
        "hand-over requested by a caller with the node's secret: no longer accepting; draining connections"
    );
    let started = Instant::now();
    let max_connections = serving.max_connections();
    let (listener, busy) = serving.stop(agent, DRAIN_TIMEOUT).await;
    // After the controller session ended, so no update is refused (and acked as an error).
    agent.set_role(Role::HandingOver);
    if busy > 0 {
        warn!(
            busy,
            "connections still busy after the drain timeout; handing over without waiting for them"
        );
    }
    let state = agent.handed_state();
    let generation = state.generation;
    let sent = {
        let stream = stream.clone();
        tokio::task::spawn_blocking(move || {
            let result = send_state(&stream, state, &listener);
            (listener, result)
        })
        .await
    };
    let (listener, result) = match sent {
        Ok(sent) => sent,
        Err(error) => std::panic::resume_unwind(error.into_panic()),
    };
    match result {
        Ok(()) => {
            agent.set_role(Role::Stopped);
            drop(listener);
            info!(
                ?pid,
                generation,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "handed the socket directory over; no longer serving"
            );
            Answered::Stopped(Stopped::HandedOver { release_metrics })
        }
        Err(why) => {
            error!(reason = %why, "hand-over failed; serving again");
            agent.set_role(Role::Serving);
            Answered::Serving(Serving::start(agent, listener, max_connections))
        }
    }
}

/// Sends the state with the listening socket and waits for the new agent's confirmation.
fn send_state(
    stream: &StdUnixStream,
    state: HandedState,
    listener: &UnixListener,
) -> Result<(), String> {
    let bytes = protocol::encode(&Message::State(Box::new(state)))?;
    fdpass::send_with_fds(stream, &bytes, &[listener.as_fd()])
        .map_err(|e| format!("cannot send the socket to the new agent: {e}"))?;
    let mut fds = Vec::new();
    let confirmation = read_message(
        stream,
        Instant::now() + TAKEN_TIMEOUT,
        &mut fds,
        "the new agent",
    )?;
    protocol::check_taken(&confirmation)
}

// === framing over a blocking stream ===

fn write_message(stream: &StdUnixStream, message: &Message) -> Result<(), String> {
    let bytes = protocol::encode(message)?;
    let mut writer = stream;
    writer.write_all(&bytes).map_err(|e| e.to_string())
}

/// Reads one message by `deadline`, collecting any descriptors that come with it. `who` names
/// the peer in errors.
fn read_message(
    stream: &StdUnixStream,
    deadline: Instant,
    fds: &mut Vec<OwnedFd>,
    who: &str,
) -> Result<Message, String> {
    let mut header = [0; HEADER_LEN];
    let mut filled = 0;
    while filled < HEADER_LEN {
        let n = receive(stream, &mut header[filled..], deadline, fds, who)?;
        if n == 0 {
            return Err(if filled == 0 {
                format!("{who} closed the connection without answering")
            } else {
                format!("{who} closed the connection in the middle of a message")
            });
        }
        filled += n;
    }
    let len = protocol::body_len(header).map_err(|e| format!("{who} sent garbage: {e}"))?;
    let mut body = vec![0; len];
    let mut filled = 0;
    while filled < len {
        let n = receive(stream, &mut body[filled..], deadline, fds, who)?;
        if n == 0 {
            return Err(format!(
                "{who} closed the connection in the middle of a message"
            ));
        }
        filled += n;
    }
    protocol::decode(&body).map_err(|e| format!("{who} sent garbage: {e}"))
}

fn receive(
    stream: &StdUnixStream,
    buf: &mut [u8],
    deadline: Instant,
    fds: &mut Vec<OwnedFd>,
    who: &str,
) -> Result<usize, String> {
    let timed_out = || format!("{who} did not answer in time");
    let left = deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
        .ok_or_else(timed_out)?;
    stream
        .set_read_timeout(Some(left))
        .map_err(|e| e.to_string())?;
    match fdpass::recv_with_fds(stream, buf) {
        Ok((n, received, truncated)) => {
            fds.extend(received);
            if truncated {
                return Err(format!("{who} sent more descriptors than expected"));
            }
            Ok(n)
        }
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            Err(timed_out())
        }
        Err(e) => Err(format!("reading from {who} failed: {e}")),
    }
}
