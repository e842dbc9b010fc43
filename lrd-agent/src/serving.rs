//! The tasks of an agent that serves its socket directory — the controller session, the local
//! socket, the sweep of exited callers — started together and stopped together for a
//! hand-over.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::task::JoinHandle;

use crate::controller;
use crate::local::{self, LocalServer};
use crate::state::Agent;

/// The serving tasks.
#[derive(Debug)]
pub struct Serving {
    local: LocalServer,
    controller: JoinHandle<()>,
    sweep: JoinHandle<()>,
    max_connections: usize,
}

impl Serving {
    /// Starts serving on `listener`.
    pub fn start(agent: &Arc<Agent>, listener: UnixListener, max_connections: usize) -> Self {
        Self {
            local: LocalServer::start(agent.clone(), listener, max_connections),
            controller: tokio::spawn(controller::run(agent.clone())),
            sweep: tokio::spawn(local::sweep(agent.clone())),
            max_connections,
        }
    }

    /// The connection limit it was started with.
    pub fn max_connections(&self) -> usize {
        self.max_connections
    }

    /// Resolves when the controller session or the sweep ended (neither ever should).
    pub async fn ended(&mut self) {
        tokio::select! {
            _ = &mut self.controller => {}
            _ = &mut self.sweep => {}
        }
    }

    /// Stops accepting, drains connections for up to `drain_timeout` (they may still forward
    /// registrations to the controller), then ends the controller session and the sweep.
    /// Returns the listening socket and how many connections were still busy.
    pub async fn stop(self, agent: &Agent, drain_timeout: Duration) -> (UnixListener, usize) {
        let stopped = self.local.stop(drain_timeout).await;
        self.controller.abort();
        self.sweep.abort();
        let _ = self.controller.await;
        let _ = self.sweep.await;
        agent.set_client(None);
        stopped
    }
}
