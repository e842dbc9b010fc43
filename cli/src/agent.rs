//! Commands that talk to the local node agent: `stackroute run` and `stackroute explain
//! --agent`.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use stackroute_local_api::frame;
use stackroute_local_api::message::{FallbackReason, Request, Response};
use stackroute_local_api::published::{self, SNAPSHOT_FILE, SOCKET_FILE};
use stackroute_policy::explain::{AddressNamer, Explanation};
use stackroute_snapshot::{DestinationClass, Protocol, Snapshot};

/// How long `run` waits for the agent before starting the command anyway.
const AGENT_TIMEOUT: Duration = Duration::from_secs(2);

/// `stackroute run`'s arguments.
#[derive(clap::Args)]
pub(crate) struct RunArgs {
    /// The workload's namespace.
    #[arg(long, env = "STACKROUTE_NAMESPACE", default_value = "default")]
    namespace: String,
    /// The workload's name (default: the command's file name).
    #[arg(long, env = "STACKROUTE_WORKLOAD")]
    name: Option<String>,
    /// Labels as k=v,k=v.
    #[arg(long, env = "STACKROUTE_LABELS", value_delimiter = ',')]
    labels: Vec<String>,
    /// The agent's socket directory.
    #[arg(long, env = "STACKROUTE_SOCKET_DIR", default_value = "/run/stackroute")]
    socket_dir: PathBuf,
    /// The command and its arguments.
    #[arg(required = true, last = true)]
    command: Vec<OsString>,
}

fn parse_labels(labels: &[String]) -> Result<BTreeMap<String, String>> {
    labels
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|label| {
            let (key, value) = label
                .split_once('=')
                .filter(|(k, _)| !k.trim().is_empty())
                .with_context(|| format!("--labels: {label:?} is not KEY=VALUE"))?;
            Ok((key.trim().to_string(), value.trim().to_string()))
        })
        .collect()
}

/// One request to the agent over its socket in `socket_dir`.
pub(crate) fn call_agent(socket_dir: &Path, request: &Request) -> Result<Response> {
    let path = socket_dir.join(SOCKET_FILE);
    let mut stream = UnixStream::connect(&path)
        .with_context(|| format!("{}: cannot connect", path.display()))?;
    stream.set_read_timeout(Some(AGENT_TIMEOUT))?;
    stream.set_write_timeout(Some(AGENT_TIMEOUT))?;
    frame::call(&mut stream, request).with_context(|| format!("{}", path.display()))
}

/// Registers the workload with the agent (warning only on failure: fail open), then replaces
/// this process with the command, so the registration's pid is the workload's.
pub(crate) fn run(args: RunArgs) -> Result<ExitCode> {
    let labels = parse_labels(&args.labels)?;
    let (program, rest) = args.command.split_first().context("no command given")?;
    let name = match &args.name {
        Some(name) => name.clone(),
        None => Path::new(program)
            .file_name()
            .and_then(|n| n.to_str())
            .context("--name is required when the command has no file name")?
            .to_string(),
    };
    let request = Request::RegisterWorkload {
        namespace: args.namespace.clone(),
        name: name.clone(),
        labels,
        ips: Vec::new(),
    };
    match call_agent(&args.socket_dir, &request) {
        Ok(Response::Ok {
            queued: false,
            revision,
        }) => {
            // Start the program once the agent publishes the revision that includes it, so its
            // first connections are decided by its own policies, not the default.
            if let Some(revision) = revision
                && !wait_for_revision(&args.socket_dir, revision)
            {
                eprintln!(
                    "stackroute: warning: the agent has not published revision {revision} with {}/{name} yet; starting anyway",
                    args.namespace
                );
            }
        }
        Ok(Response::Ok { queued: true, .. }) => eprintln!(
            "stackroute: warning: the agent has no controller; registration of {}/{name} is queued",
            args.namespace
        ),
        Ok(Response::Error { message }) => {
            eprintln!("stackroute: warning: the agent refused the registration: {message}")
        }
        Ok(other) => eprintln!("stackroute: warning: unexpected reply from the agent: {other:?}"),
        Err(error) => eprintln!(
            "stackroute: warning: no agent ({error:#}); running {}/{name} unmanaged",
            args.namespace
        ),
    }
    let unreachable = crate::reach::resolve(Path::new(program))
        .and_then(|path| crate::reach::unreachable_reason(&path).ok().flatten());
    if let Some(reason) = unreachable {
        // The shim cannot reach it; the agent's kernel hook can still apply the policy's kernel
        // transports to its connections (this process joins the hook's cgroup, then execs it).
        let hook = Request::KernelHook {
            namespace: args.namespace.clone(),
            workload: name.clone(),
        };
        match call_agent(&args.socket_dir, &hook) {
            Ok(Response::Ok { revision, .. }) => eprintln!(
                "stackroute: {} is not reachable by the shim ({reason}); the kernel hook applies \
                 {}/{name}'s kernel transports to its connections (revision {})",
                Path::new(program).display(),
                args.namespace,
                revision.map_or_else(|| "?".into(), |r| r.to_string())
            ),
            answer => {
                let why = match answer {
                    Ok(Response::Unavailable { message, .. } | Response::Error { message }) => {
                        message
                    }
                    Ok(other) => format!("unexpected reply {other:?}"),
                    Err(error) => format!("{error:#}"),
                };
                eprintln!(
                    "stackroute: warning: {} is not accelerated ({reason}; no kernel hook: \
                     {why}); it runs on the kernel default",
                    Path::new(program).display()
                );
                let report = Request::FallbackReport {
                    reason: FallbackReason::Unaccelerated,
                    count: 1,
                };
                if let Err(error) = call_agent(&args.socket_dir, &report) {
                    eprintln!("stackroute: warning: could not report it to the agent: {error:#}");
                }
            }
        }
    }
    let mut command = std::process::Command::new(program);
    command
        .args(rest)
        .env("STACKROUTE_SOCKET_DIR", &args.socket_dir)
        .env("STACKROUTE_NAMESPACE", &args.namespace)
        .env("STACKROUTE_WORKLOAD", &name);
    if let Some(shim) = find_shim() {
        let preload = match std::env::var_os("LD_PRELOAD").filter(|p| !p.is_empty()) {
            Some(existing) => {
                let mut joined = shim;
                joined.push(":");
                joined.push(existing);
                joined
            }
            None => shim,
        };
        command.env("LD_PRELOAD", preload);
    } else {
        eprintln!(
            "stackroute: warning: libnsocket.so not found ($STACKROUTE_SHIM, next to stackroute, {}); running {}/{name} without the shim",
            SHIM_INSTALL_PATHS.join(", "),
            args.namespace
        );
    }
    let error = command.exec();
    bail!("{}: cannot execute: {error}", Path::new(program).display())
}

/// Waits up to [`AGENT_TIMEOUT`] until `DIR/snapshot` holds `revision` or a later one.
fn wait_for_revision(socket_dir: &Path, revision: u64) -> bool {
    let deadline = std::time::Instant::now() + AGENT_TIMEOUT;
    loop {
        let published = std::fs::File::open(socket_dir.join(SNAPSHOT_FILE))
            .ok()
            .and_then(|file| {
                use std::io::Read as _;
                let mut header = [0u8; published::HEADER_LEN];
                file.take(header.len() as u64)
                    .read_exact(&mut header)
                    .ok()
                    .filter(|()| header[..8] == published::MAGIC)
                    .map(|()| u64::from_le_bytes(header[16..24].try_into().unwrap_or_default()))
            });
        if published.is_some_and(|p| p >= revision) {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Where `stackroute run` looks for the shim after `$STACKROUTE_SHIM` and the directory of the
/// `stackroute` binary.
const SHIM_INSTALL_PATHS: [&str; 2] = [
    "/usr/local/lib/stackroute/libnsocket.so",
    "/usr/lib/stackroute/libnsocket.so",
];

/// The shim to preload: `$STACKROUTE_SHIM` if it names a file, else `libnsocket.so` next to this
/// binary (a cargo target directory), else the install paths.
fn find_shim() -> Option<OsString> {
    if let Some(shim) = std::env::var_os("STACKROUTE_SHIM") {
        if Path::new(&shim).is_file() {
            return Some(shim);
        }
        eprintln!(
            "stackroute: warning: STACKROUTE_SHIM={} is not a file; looking elsewhere",
            Path::new(&shim).display()
        );
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join("libnsocket.so")));
    beside
        .into_iter()
        .chain(SHIM_INSTALL_PATHS.iter().map(PathBuf::from))
        .find(|path| path.is_file())
        .map(PathBuf::into_os_string)
}

/// Explains a connection from the agent's published snapshot in `socket_dir`.
pub(crate) fn explain(
    socket_dir: &Path,
    namespace: &str,
    pod: &str,
    to: std::net::SocketAddr,
    protocol: Protocol,
) -> Result<Explanation> {
    let path = socket_dir.join(SNAPSHOT_FILE);
    let bytes = std::fs::read(&path).with_context(|| format!("{}: cannot read", path.display()))?;
    let view = published::parse(&bytes).with_context(|| format!("{}", path.display()))?;
    let snapshot = Snapshot::parse(view.snapshot)
        .map_err(|e| anyhow::anyhow!("{}: the snapshot does not validate: {e}", path.display()))?;
    if view.stale {
        eprintln!(
            "warning: the agent serves revision {} from disk: not yet confirmed by a controller",
            view.revision
        );
    }
    stackroute_policy::explain_in_snapshot(
        &snapshot,
        namespace,
        pod,
        to.ip(),
        to.port(),
        protocol,
        &SnapshotNames(snapshot),
    )
    .map_err(|e| anyhow::anyhow!("{e}"))
}

/// What the agent's kernel hook does for `namespace/pod`'s connections to `to` (programs the
/// shim cannot reach): whether one is attached, and the congestion control it applies. One
/// line for `explain --agent`; `None` when the snapshot or the agent cannot say.
pub(crate) fn kernel_hook_line(
    socket_dir: &Path,
    namespace: &str,
    pod: &str,
    to: std::net::SocketAddr,
) -> Option<String> {
    let bytes = std::fs::read(socket_dir.join(SNAPSHOT_FILE)).ok()?;
    let view = published::parse(&bytes).ok()?;
    let snapshot = Snapshot::parse(view.snapshot).ok()?;
    let workload = snapshot.workload_by_name(namespace, pod)?;
    let decision = snapshot.decide(
        workload,
        to.ip(),
        to.port(),
        Protocol::Tcp,
        &mut stackroute_snapshot::NoTrace,
    );
    let allowed: Vec<stackroute_snapshot::CongestionControl> =
        std::fs::read_to_string("/proc/sys/net/ipv4/tcp_allowed_congestion_control")
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(stackroute_snapshot::CongestionControl::from_kernel_name)
            .collect();
    let outcome = stackroute_snapshot::kernel_table::kernel_outcome(
        decision.transports(),
        decision.isolation,
        |cc| allowed.contains(&cc),
    );
    let applies = match outcome.congestion_control {
        Some(cc) => format!("Kernel/{cc}"),
        None => "the namespace's default congestion control".into(),
    };
    let mut skipped = Vec::new();
    if outcome.skipped_not_interposable {
        skipped.push("not-interposable");
    }
    if outcome.skipped_no_capability {
        skipped.push("no-capability");
    }
    if outcome.isolation_forbids {
        skipped.push("isolation-forbids");
    }
    let skipped = if skipped.is_empty() {
        String::new()
    } else {
        format!(" (fell back: {})", skipped.join(", "))
    };
    let hooks = match call_agent(socket_dir, &Request::KernelHooks) {
        Ok(Response::Hooks { hooks }) => hooks,
        _ => Vec::new(),
    };
    let workload_name = format!("{namespace}/{pod}");
    Some(match hooks.iter().find(|h| h.workload == workload_name) {
        Some(hook) => format!(
            "path: the shim decides for programs it reaches; the kernel hook attached to cgroup {} \
             (revision {}) gives programs it cannot reach {applies}{skipped}",
            hook.cgroup, hook.revision
        ),
        None => format!(
            "path: the shim decides; no kernel hook is attached for {workload_name} (`stackroute \
             run` attaches one for a program the shim cannot reach, which would get \
             {applies}{skipped})"
        ),
    })
}

/// Names addresses from what a node's snapshot knows: its own workloads by name, nodes by
/// name, and pods elsewhere by the node they run on (their names are not in the snapshot).
struct SnapshotNames<'a>(Snapshot<'a>);

impl AddressNamer for SnapshotNames<'_> {
    fn name(&self, ip: std::net::IpAddr) -> Option<String> {
        if let Some(workload) = self.0.workload_by_ip(ip) {
            let (namespace, name) = self.0.workload(workload);
            return Some(format!("pod {namespace}/{name}"));
        }
        match self.0.classify(ip).0 {
            DestinationClass::Node { node } => Some(format!("node {}", self.0.node(node).0)),
            DestinationClass::Pod { node, .. } => {
                Some(format!("pod on node {}", self.0.node(node).0))
            }
            DestinationClass::Unknown => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_parse() {
        let labels = parse_labels(&["app=web".into(), " tier = gold ".into(), "".into()]).unwrap();
        assert_eq!(labels.get("app").map(String::as_str), Some("web"));
        assert_eq!(labels.get("tier").map(String::as_str), Some("gold"));
        assert!(parse_labels(&["novalue".into()]).is_err());
        assert!(parse_labels(&["=x".into()]).is_err());
    }
}
