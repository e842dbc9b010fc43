//! Command-line flags and the top-level task wiring.

use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Parser;
use stackroute_local_api::published::SOCKET_FILE;
use tokio::net::UnixListener;
use tracing::info;

use crate::state::{Agent, Config};
use crate::{controller, local, metrics};

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
        let listener = bind_socket(&self.socket_dir.join(SOCKET_FILE))?;
        let agent = Agent::start(Config {
            node: self.node,
            controllers,
            socket_dir: self.socket_dir,
            state_dir: self.state_dir,
        })?;
        let max_connections = local::connection_limit(raise_fd_limit());
        info!(
            node = %agent.config.node,
            socket_dir = %agent.config.socket_dir.display(),
            state_dir = %agent.config.state_dir.display(),
            controllers = ?agent.config.controllers,
            max_connections,
            "agent started"
        );
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(controller::run(agent.clone()));
        tasks.spawn(local::serve(agent.clone(), listener, max_connections));
        tasks.spawn(local::sweep(agent.clone()));
        if let Some(addr) = self.metrics_addr {
            let agent = agent.clone();
            tasks.spawn(async move {
                if let Err(error) = metrics::serve(addr, agent).await {
                    tracing::error!(%addr, error = %format!("{error:#}"), "metrics server failed");
                    std::process::exit(1);
                }
            });
        }
        tokio::select! {
            _ = tasks.join_next() => bail!("an agent task ended unexpectedly"),
            signal = shutdown() => {
                signal?;
                info!("shutting down");
                Ok(())
            }
        }
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

/// Binds the agent socket, replacing a socket file left by an earlier agent (but never another
/// kind of file), readable and writable by every local user: callers are told apart by their
/// credentials, not by file permissions.
fn bind_socket(path: &Path) -> Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                bail!(
                    "{}: another agent is serving this socket directory",
                    path.display()
                );
            }
            std::fs::remove_file(path)
                .with_context(|| format!("{}: cannot remove the old socket", path.display()))?
        }
        Ok(_) => bail!("{}: exists and is not a socket", path.display()),
        Err(_) => {}
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("{}: cannot bind", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
        .with_context(|| format!("{}: cannot set permissions", path.display()))?;
    Ok(listener)
}
