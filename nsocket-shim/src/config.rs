//! What the shim reads from its environment, once, when the library is loaded.
#![deny(unsafe_code)]

use std::ffi::CString;
use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use stackroute_local_api::published;

/// Default socket directory of the node agent.
pub(crate) const DEFAULT_SOCKET_DIR: &str = "/run/stackroute";

/// The shim's configuration.
#[derive(Debug)]
pub(crate) struct Config {
    /// `STACKROUTE_NAMESPACE`.
    pub(crate) namespace: Option<String>,
    /// `STACKROUTE_WORKLOAD`.
    pub(crate) workload: Option<String>,
    /// `DIR/generation`.
    pub(crate) generation_path: CString,
    /// `DIR/snapshot`.
    pub(crate) snapshot_path: CString,
    /// `DIR/agent.sock`.
    pub(crate) socket_path: CString,
    /// `STACKROUTE_LOG` asks for debug output.
    pub(crate) debug: bool,
    /// `STACKROUTE_SHIM_DISABLE=1`: every hook passes through (for side-by-side measurements).
    pub(crate) disabled: bool,
    /// `STACKROUTE_TEST_LOAD_DELAY_MS`: a test hook that slows every snapshot load, so races at
    /// a process's first load are reproducible (0 unless set).
    pub(crate) load_delay: Duration,
    /// `STACKROUTE_RDMA_DEADLINE_MS`: the longest an RDMA upgrade may hold up a `connect` (the
    /// TCP handshake, the peer's answer and the RDMA connect together); 50 ms unless set.
    pub(crate) rdma_deadline_ms: u32,
    /// `STACKROUTE_RDMA_PROVIDER`: the verbs provider library (see `sys::upgrade::Provider`).
    pub(crate) rdma_provider: Option<CString>,
    /// `STACKROUTE_TEST_PROPOSAL_DELAY_MS`: a test hook that holds the client's RDMA proposal
    /// back this long after the TCP handshake (within the deadline), so that a server that
    /// speaks first is reproducible (0 unless set).
    pub(crate) proposal_delay_ms: u32,
}

/// The RDMA upgrade's deadline unless `STACKROUTE_RDMA_DEADLINE_MS` says otherwise.
pub(crate) const RDMA_DEADLINE_MS: u32 = 50;

impl Config {
    /// Builds the configuration from an environment lookup.
    pub(crate) fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Self {
        let dir = get("STACKROUTE_SOCKET_DIR")
            .filter(|d| !d.is_empty())
            .unwrap_or_else(|| DEFAULT_SOCKET_DIR.into());
        let path = |file: &str| {
            CString::new(
                Path::new(&dir)
                    .join(file)
                    .into_os_string()
                    .into_encoded_bytes(),
            )
            .unwrap_or_default()
        };
        let log = get("STACKROUTE_LOG").unwrap_or_default();
        Self {
            namespace: get("STACKROUTE_NAMESPACE").filter(|s| !s.is_empty()),
            workload: get("STACKROUTE_WORKLOAD").filter(|s| !s.is_empty()),
            generation_path: path(published::GENERATION_FILE),
            snapshot_path: path(published::SNAPSHOT_FILE),
            socket_path: path(published::SOCKET_FILE),
            debug: wants_debug(&log),
            disabled: get("STACKROUTE_SHIM_DISABLE").is_some_and(|v| v == "1"),
            load_delay: Duration::from_millis(
                get("STACKROUTE_TEST_LOAD_DELAY_MS")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0)
                    .min(10_000),
            ),
            rdma_deadline_ms: get("STACKROUTE_RDMA_DEADLINE_MS")
                .and_then(|v| v.parse().ok())
                .unwrap_or(RDMA_DEADLINE_MS)
                .clamp(1, 10_000),
            rdma_provider: get("STACKROUTE_RDMA_PROVIDER")
                .filter(|p| !p.is_empty())
                .and_then(|p| CString::new(p).ok()),
            proposal_delay_ms: get("STACKROUTE_TEST_PROPOSAL_DELAY_MS")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
                .min(10_000),
        }
    }
}

/// `debug`/`trace`, or a directive for the shim (`nsocket=debug`) in a tracing-style filter.
fn wants_debug(filter: &str) -> bool {
    filter.split(',').any(|directive| {
        let directive = directive.trim();
        matches!(directive, "debug" | "trace")
            || directive == "nsocket=debug"
            || directive == "nsocket=trace"
    })
}

static CONFIG: OnceLock<Config> = OnceLock::new();

/// The configuration, read from the process environment on first use (the library's
/// constructor makes that first use happen at load time).
pub(crate) fn get() -> &'static Config {
    CONFIG.get_or_init(|| Config::from_lookup(|key| std::env::var(key).ok()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_names_paths_and_log_filter() {
        let env = |key: &str| match key {
            "STACKROUTE_SOCKET_DIR" => Some("/tmp/sr".to_string()),
            "STACKROUTE_NAMESPACE" => Some("shop".into()),
            "STACKROUTE_WORKLOAD" => Some(String::new()),
            "STACKROUTE_LOG" => Some("info,nsocket=debug".into()),
            _ => None,
        };
        let config = Config::from_lookup(env);
        assert_eq!(config.namespace.as_deref(), Some("shop"));
        assert_eq!(config.workload, None);
        assert_eq!(
            config.generation_path.to_str().unwrap(),
            "/tmp/sr/generation"
        );
        assert_eq!(config.socket_path.to_str().unwrap(), "/tmp/sr/agent.sock");
        assert!(config.debug);
        assert!(!config.disabled);
        let defaults = Config::from_lookup(|_| None);
        assert_eq!(
            defaults.snapshot_path.to_str().unwrap(),
            "/run/stackroute/snapshot"
        );
        assert!(!defaults.debug);
        assert_eq!(defaults.rdma_deadline_ms, RDMA_DEADLINE_MS);
        assert_eq!(defaults.rdma_provider, None);
        let rdma = Config::from_lookup(|key| match key {
            "STACKROUTE_RDMA_DEADLINE_MS" => Some("0".into()),
            "STACKROUTE_RDMA_PROVIDER" => Some("/x/libp.so".into()),
            _ => None,
        });
        assert_eq!(rdma.rdma_deadline_ms, 1);
        assert_eq!(rdma.rdma_provider.as_deref(), Some(c"/x/libp.so"));
        assert!(!wants_debug("info,stackroute_lrd=debug"));
        assert!(wants_debug("debug"));
    }
}
