//! Command-line flags and the top-level task wiring.

use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use stackroute_local_api::published::SOCKET_FILE;
use tokio::net::UnixListener;
use tracing::{error, info};

use crate::handover::{self, HandedState, Stopped};
use crate::serving::Serving;
use crate::state::{Agent, Config};
use crate::{hooks, instances, local, metrics};

/// `stackroute-lrd`: the stackroute node agent.
#[derive(Debug, Parser)]
#[command(
    name = "stackroute-lrd",
    version,
    about = "The stackroute node agent (LRD)"
)]
pub struct Args {
    /// Controller addresses (HOST:PORT or http://HOST:PORT), comma-separated; tried in turn.
    #[arg(
        long,
        env = "STACKROUTE_CONTROLLER",
        value_delimiter = ',',
        required = true
    )]
    pub controller: Vec<String>,
    /// Directory of this node's credentials for the controller: `ca.crt` (trusts the
    /// controller's certificate) and either `tls.crt`/`tls.key` (a client certificate from
    /// `stackroute-controller credentials issue --node NODE`) or `token` (Kubernetes: the
    /// projected service-account token, re-read on every call).
    #[arg(
        long,
        env = "STACKROUTE_CREDENTIALS",
        required_unless_present = "insecure_plaintext"
    )]
    pub credentials: Option<PathBuf>,
    /// The name the controller's certificate carries, when the address is not that name (a
    /// ClusterIP, for instance).
    #[arg(long, env = "STACKROUTE_CONTROLLER_SERVER_NAME")]
    pub controller_server_name: Option<String>,
    /// Talk to a controller started with --insecure-plaintext (development only).
    #[arg(
        long,
        env = "STACKROUTE_INSECURE_PLAINTEXT",
        conflicts_with = "credentials"
    )]
    pub insecure_plaintext: bool,
    /// This node's name, as in the controller's Node objects.
    #[arg(long, env = "STACKROUTE_NODE")]
    pub node: String,
    /// Directory for the Unix socket and the published snapshot (mounted into workloads).
    #[arg(long, env = "STACKROUTE_SOCKET_DIR", default_value = "/run/stackroute")]
    pub socket_dir: PathBuf,
    /// Directory for the persisted snapshot.
    #[arg(
        long,
        env = "STACKROUTE_STATE_DIR",
        default_value = "/var/lib/stackroute"
    )]
    pub state_dir: PathBuf,
    /// Address for /metrics, /healthz and /readyz (not served when absent).
    #[arg(long, env = "STACKROUTE_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// How long to wait for a running agent on the same socket directory to hand it over
    /// before taking it over without it.
    #[arg(long, env = "STACKROUTE_HANDOVER_TIMEOUT_MS", default_value_t = 10_000)]
    pub handover_timeout_ms: u64,
    /// How long /healthz stays 200 once this agent has stopped serving (default 30 s; tests).
    #[arg(long, env = "STACKROUTE_HEALTHZ_STOPPED_GRACE_MS", hide = true)]
    pub healthz_stopped_grace_ms: Option<u64>,
    /// How long /healthz stays 200 while this agent is handing over (default 60 s; tests).
    #[arg(long, env = "STACKROUTE_HEALTHZ_HANDOVER_LIMIT_MS", hide = true)]
    pub healthz_handover_limit_ms: Option<u64>,
    /// Exit (status 0) once this agent has handed its socket directory over, instead of
    /// waiting for SIGTERM. Not for a DaemonSet: an exited container is restarted.
    #[arg(long, env = "STACKROUTE_EXIT_AFTER_HANDOVER")]
    pub exit_after_handover: bool,
    /// Where local callers' workload identity comes from: `standalone` (a workload registers
    /// itself, `stackroute run`) or `kubernetes` (the API server's pods, found by the caller's
    /// network namespace; local `registerWorkload` is refused).
    #[arg(long, env = "STACKROUTE_AGENT_MODE", value_enum, default_value_t = local::Mode::Standalone)]
    pub mode: local::Mode,
    /// Limits and quotas of the local socket.
    #[command(flatten)]
    pub local: local::LocalLimits,
    /// User-space stack instances.
    #[command(flatten)]
    pub instances: instances::InstanceFlags,
    /// Kernel hooks.
    #[command(flatten)]
    pub hooks: hooks::HookFlags,
}

impl Args {
    /// Runs the agent until it is killed or a task fails.
    pub async fn run(self) -> Result<()> {
        let controllers: Vec<String> = self
            .controller
            .iter()
            .map(|c| c.trim().to_string())
            .filter(|c| !c.is_empty())
            .collect();
        if controllers.is_empty() {
            bail!("--controller: at least one address is required");
        }
        if self.node.is_empty() {
            bail!("--node must not be empty");
        }
        // The socket first: it tells whether another agent already serves this directory,
        // before anything in it is touched.
        crate::files::ensure_dir(&self.socket_dir, 0o755)
            .with_context(|| format!("{}: cannot create", self.socket_dir.display()))?;
        handover::prepare(&self.socket_dir, &self.state_dir)?;
        let (listener, handed) = {
            let (dir, node) = (self.socket_dir.clone(), self.node.clone());
            let state_dir = self.state_dir.clone();
            let timeout = Duration::from_millis(self.handover_timeout_ms);
            let metrics_addr = self.metrics_addr;
            tokio::task::spawn_blocking(move || {
                acquire_socket(&dir, &state_dir, &node, timeout, metrics_addr)
            })
            .await??
        };
        listener.set_nonblocking(true)?;
        let listener = UnixListener::from_std(listener)?;
        let agent = Agent::start_with(
            Config {
                node: self.node,
                controllers,
                security: match self.credentials {
                    Some(dir) => stackroute_proto::client::Security::Tls {
                        dir,
                        server_name: self.controller_server_name,
                    },
                    None => stackroute_proto::client::Security::Plaintext,
                },
                socket_dir: self.socket_dir,
                state_dir: self.state_dir,
            },
            handed,
        )?;
        agent
            .set_socket_file()
            .context("cannot stat the agent socket")?;
        agent.set_local_policy(local::LocalPolicy {
            mode: self.mode,
            limits: self.local,
        });
        // Instances outlive agents: adopt those an earlier agent (or the one that handed
        // over) recorded, and reap for the life of this process (a stopped agent still reaps
        // its own children).
        let instances = instances::Instances::new(&agent, self.instances, self.mode);
        instances.adopt();
        info!(tag = instances.tag(), binary = %instances.binary().display(), flags = ?instances.flags(), "user-space stack instances");
        agent.set_instances(instances.clone());
        tokio::spawn(instances::reaper(instances));
        if self.hooks.max_kernel_hooks > 0 {
            let hooks = hooks::Hooks::new(self.hooks.clone());
            agent
                .metrics
                .hooks
                .available
                .set(i64::from(hooks.unavailable().is_none()));
            agent.set_hooks(hooks.clone());
            tokio::spawn(hooks::keeper(hooks, agent.clone()));
        }
        let handover_listener = handover::bind(&agent.config.state_dir)?;
        let max_connections = local::connection_limit(raise_fd_limit());
        info!(
            node = %agent.config.node,
            socket_dir = %agent.config.socket_dir.display(),
            state_dir = %agent.config.state_dir.display(),
            controllers = ?agent.config.controllers,
            max_connections,
            "agent started"
        );
        let serving = Serving::start(&agent, listener, max_connections);
        let health = metrics::HealthLimits::new(
            self.healthz_stopped_grace_ms,
            self.healthz_handover_limit_ms,
        );
        let metrics_task = self.metrics_addr.map(|addr| {
            let agent = agent.clone();
            tokio::spawn(async move {
                if let Err(error) = metrics::serve(addr, agent, health).await {
                    tracing::error!(%addr, error = %format!("{error:#}"), "metrics server failed");
                    std::process::exit(1);
                }
            })
        });
        let stopped = tokio::select! {
            stopped = handover::supervise(agent.clone(), serving, handover_listener, self.metrics_addr) => stopped?,
            signal = shutdown() => {
                signal?;
                info!("shutting down");
                agent.flush_registrations(Duration::from_secs(2));
                return Ok(());
            }
        };
        if stopped
            == (Stopped::HandedOver {
                release_metrics: true,
            })
            && let Some(task) = metrics_task
        {
            info!(
                "closing the metrics listener for the new agent (same network namespace and address)"
            );
            task.abort();
        }
        if self.exit_after_handover {
            info!("exiting: another agent serves the socket directory");
            return Ok(());
        }
        info!("another agent serves the socket directory; waiting for SIGTERM");
        shutdown().await?;
        info!("shutting down");
        Ok(())
    }
}

/// Raises the soft open-file limit to the hard one (every local client holds a descriptor) and
/// returns the limit in force.
fn raise_fd_limit() -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if let Some(maximum) = limit.maximum
        && limit.current.is_some_and(|current| current < maximum)
    {
        let raised = Rlimit {
            current: Some(maximum),
            maximum: Some(maximum),
        };
        if let Err(error) = setrlimit(Resource::Nofile, raised) {
            tracing::warn!(%error, "cannot raise the open-file limit");
        }
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

async fn shutdown() -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        result = tokio::signal::ctrl_c() => result?,
    }
    Ok(())
}

/// The agent socket: handed over by the agent serving `dir` if there is one and it does so
/// within `timeout` (asked through `state_dir`, see [`handover::request`]); otherwise bound
/// anew, replacing a socket file left by an earlier agent (but never another kind of file).
fn acquire_socket(
    dir: &Path,
    state_dir: &Path,
    node: &str,
    timeout: Duration,
    metrics_addr: Option<SocketAddr>,
) -> Result<(StdUnixListener, Option<HandedState>)> {
    let path = dir.join(SOCKET_FILE);
    match std::fs::symlink_metadata(&path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(&path).is_ok() {
                info!(dir = %dir.display(), "another agent serves this socket directory; asking it to hand over");
                let started = Instant::now();
                match handover::request(state_dir, node, timeout, metrics_addr) {
                    Ok((listener, state)) => {
                        info!(
                            generation = state.generation,
                            elapsed_ms = started.elapsed().as_millis() as u64,
                            "took the socket directory over from the running agent"
                        );
                        return Ok((listener, Some(state)));
                    }
                    Err(reason) => error!(
                        %reason,
                        "hand-over from the running agent failed; taking the socket directory over without it (the old agent stops serving once it notices)"
                    ),
                }
            }
            std::fs::remove_file(&path)
                .with_context(|| format!("{}: cannot remove the old socket", path.display()))?
        }
        Ok(_) => bail!("{}: exists and is not a socket", path.display()),
        Err(_) => {}
    }
    Ok((bind_socket(&path)?, None))
}

/// Binds the agent socket, readable and writable by every local user: callers are told apart
/// by their credentials, not by file permissions.
fn bind_socket(path: &Path) -> Result<StdUnixListener> {
    let listener =
        StdUnixListener::bind(path).with_context(|| format!("{}: cannot bind", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
        .with_context(|| format!("{}: cannot set permissions", path.display()))?;
    Ok(listener)
}
