//! Kernel hooks for programs the shim cannot reach. Standalone, `stackroute run` of a static or
//! set-user-ID binary asks for one: the agent moves the caller into a cgroup of its own, under
//! the one it is in, and attaches the `sock_ops` hook (`stackroute-kernel-hook`) there with the
//! caller's workload's table. In Kubernetes mode the agent finds the pods itself: a pod with an
//! injected process (`LD_PRELOAD` naming the shim) that has not mapped the shim (a static or Go
//! program) gets the hook on its pod cgroup (`--kernel-hook-pods unreachable`, the default), or
//! every injected pod does (`injected`). A keeper recompiles every table when a new snapshot is
//! published and detaches a hook once no process is left in its cgroup (removing the cgroup
//! when the agent made it).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use stackroute_kernel_hook::{Counters, KernelHook};
use stackroute_local_api::message::{FallbackReason, HookInfo, Response};
use stackroute_snapshot::CongestionControl;
use stackroute_snapshot::kernel_table::kernel_table;
use tracing::{info, warn};

use crate::local::identity::{self, Identity};
use crate::peer::Peer;
use crate::state::{Agent, Current};

/// How often tables are refreshed and empty cgroups reaped.
const KEEP_EVERY: Duration = Duration::from_millis(500);

/// Flags of `stackroute-lrd` for kernel hooks.
#[derive(Clone, Debug, PartialEq, Eq, clap::Args)]
pub struct HookFlags {
    /// Most kernel hooks attached at once (0: none; `stackroute run` then runs programs the
    /// shim cannot reach on the kernel default, as before).
    #[arg(long, env = "STACKROUTE_MAX_KERNEL_HOOKS", default_value_t = 256)]
    pub max_kernel_hooks: usize,
    /// Kubernetes mode: which pods the agent hooks by itself — `unreachable` (a pod with an
    /// injected process the shim did not load into), `injected` (every pod with an injected
    /// process), or `off` (only on request).
    #[arg(
        long,
        env = "STACKROUTE_KERNEL_HOOK_PODS",
        default_value = "unreachable",
        value_parser = ["unreachable", "injected", "off"]
    )]
    pub kernel_hook_pods: String,
}

impl Default for HookFlags {
    fn default() -> Self {
        Self {
            max_kernel_hooks: 256,
            kernel_hook_pods: "unreachable".into(),
        }
    }
}

/// One attached hook.
struct Attached {
    namespace: String,
    workload: String,
    /// As `/proc/PID/cgroup` names it.
    cgroup: String,
    /// Where the agent sees it.
    directory: PathBuf,
    revision: u64,
    entries: usize,
    /// The agent made the cgroup (standalone) and removes it; a pod's cgroup is kubelet's.
    owned: bool,
    hook: KernelHook,
}

/// The node's kernel hooks.
pub struct Hooks {
    flags: HookFlags,
    /// Why this node cannot attach hooks, if it cannot (found at start).
    unavailable: Option<String>,
    attached: Mutex<Vec<Attached>>,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks")
            .field("flags", &self.flags)
            .field("attached", &self.lock().len())
            .finish()
    }
}

impl Hooks {
    /// No hooks yet. Checks once whether this node can attach them (a cgroup v2 hierarchy, a
    /// kernel that loads the programs, the capabilities): if not, every request is answered
    /// with why, and the agent says it at start.
    pub fn new(flags: HookFlags) -> Arc<Self> {
        let unavailable = match (
            crate::instances::cgroup_v2_root(),
            stackroute_kernel_hook::probe(),
        ) {
            (None, _) => Some("no cgroup v2 hierarchy is mounted".to_string()),
            (Some(_), Err(error)) => Some(format!("the kernel does not take the hook: {error}")),
            (Some(_), Ok(())) => None,
        };
        match &unavailable {
            None => info!(max = flags.max_kernel_hooks, "kernel hooks available"),
            Some(why) => {
                warn!(%why, "kernel hooks unavailable: programs the shim cannot reach run on the kernel default")
            }
        }
        Arc::new(Self {
            flags,
            unavailable,
            attached: Mutex::new(Vec::new()),
        })
    }

    /// Why this node cannot attach hooks, if it cannot.
    pub fn unavailable(&self) -> Option<&str> {
        self.unavailable.as_deref()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Attached>> {
        self.attached.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `Request::KernelHook` from `peer` for `namespace/workload`.
    pub fn request(
        &self,
        agent: &Agent,
        peer: &Peer,
        namespace: &str,
        workload: &str,
    ) -> (Response, &'static str) {
        let unavailable = |message: String| {
            (
                Response::Unavailable {
                    reason: FallbackReason::NoCapability,
                    message,
                },
                "unavailable",
            )
        };
        let identity = identity::resolve(agent, peer);
        if let Identity::Known(_) = &identity
            && !identity.is(namespace, workload)
        {
            return (
                Response::Error {
                    message: format!(
                        "denied: the caller is {}; it may hook only its own workload, not \
                         {namespace}/{workload}",
                        identity.describe()
                    ),
                },
                "denied",
            );
        }
        if let Some(why) = &self.unavailable {
            return unavailable(why.clone());
        }
        let (Some(pid), Some(cgroup)) = (peer.pid, peer.cgroup.as_deref()) else {
            return unavailable("the caller's pid or cgroup is not visible to the agent".into());
        };
        if self.lock().len() >= self.flags.max_kernel_hooks {
            return unavailable(format!(
                "the node's maximum of {} kernel hooks is reached",
                self.flags.max_kernel_hooks
            ));
        }
        let Some(current) = agent.current() else {
            return unavailable("no snapshot is published yet".into());
        };
        let Some(root) = crate::instances::cgroup_v2_root() else {
            return unavailable("no cgroup v2 hierarchy is mounted".into());
        };
        // A child of the caller's cgroup: its accounting and limits still apply.
        let child = format!("{}/stackroute-hook-{pid}", cgroup.trim_end_matches('/'));
        let directory = root.join(child.trim_start_matches('/'));
        let table = match compile(&current, namespace, workload) {
            Ok(table) => table,
            Err(why) => return unavailable(why),
        };
        let entries = table.entries.len();
        let attached = std::fs::create_dir_all(&directory)
            .map_err(|e| format!("cannot create the cgroup {}: {e}", directory.display()))
            .and_then(|()| KernelHook::attach(&directory, &table).map_err(|e| e.to_string()))
            .and_then(|hook| {
                // The caller moves last: its connections never run before the hook.
                std::fs::write(directory.join("cgroup.procs"), pid.to_string())
                    .map(|()| hook)
                    .map_err(|e| format!("cannot move process {pid} into {child}: {e}"))
            });
        let hook = match attached {
            Ok(hook) => hook,
            Err(why) => {
                let _ = std::fs::remove_dir(&directory);
                agent.metrics.kernel_hook_attach("failed");
                return unavailable(why);
            }
        };
        info!(
            workload = %format!("{namespace}/{workload}"),
            pid,
            cgroup = %child,
            revision = current.revision,
            entries,
            "kernel hook attached"
        );
        agent.metrics.kernel_hook_attach("ok");
        self.lock().push(Attached {
            namespace: namespace.to_string(),
            workload: workload.to_string(),
            cgroup: child,
            directory,
            revision: current.revision,
            entries,
            owned: true,
            hook,
        });
        (
            Response::Ok {
                revision: Some(current.revision),
                queued: false,
            },
            "ok",
        )
    }

    /// The attached hooks with their counters.
    pub fn list(&self) -> Vec<HookInfo> {
        self.lock()
            .iter()
            .map(|a| {
                let counters = a.hook.counters().unwrap_or_default();
                HookInfo {
                    workload: format!("{}/{}", a.namespace, a.workload),
                    cgroup: a.cgroup.clone(),
                    revision: a.revision,
                    entries: a.entries as u64,
                    connects: counters.connects,
                    applied: counters.applied,
                    left_default: counters.left_default,
                    chosen_by_process: counters.chosen_by_process,
                    not_interposable: counters.not_interposable,
                }
            })
            .collect()
    }

    /// Recompiles tables older than the published snapshot, and detaches hooks whose cgroup
    /// has no process left (removing the cgroup). Returns the counters of the hooks detached,
    /// the sum over the attached ones, and how many are attached.
    fn keep(&self, agent: &Agent) -> (Counters, Counters, usize) {
        let current = agent.current();
        let mut attached = self.lock();
        let mut retired = Counters::default();
        let (gone, kept): (Vec<Attached>, Vec<Attached>) = std::mem::take(&mut *attached)
            .into_iter()
            .partition(|a| !populated(&a.directory));
        *attached = kept;
        for a in gone {
            add(&mut retired, a.hook.counters().unwrap_or_default());
            info!(workload = %format!("{}/{}", a.namespace, a.workload), cgroup = %a.cgroup, "kernel hook detached: no process left");
            let (directory, owned) = (a.directory.clone(), a.owned);
            // Dropping the hook detaches it; an empty cgroup the agent made can go then.
            drop(a);
            if owned {
                let _ = std::fs::remove_dir(&directory);
            }
        }
        for a in attached.iter_mut() {
            let Some(current) = current.as_ref().filter(|c| c.revision != a.revision) else {
                continue;
            };
            match compile(current, &a.namespace, &a.workload).and_then(|table| {
                a.hook.update(&table).map_err(|e| e.to_string())?;
                Ok(table.entries.len())
            }) {
                Ok(entries) => {
                    a.revision = current.revision;
                    a.entries = entries;
                }
                Err(why) => {
                    // The previous table stays in force.
                    warn!(workload = %format!("{}/{}", a.namespace, a.workload), revision = current.revision, %why, "cannot update a kernel hook's table");
                }
            }
        }
        let mut total = Counters::default();
        for a in attached.iter() {
            add(&mut total, a.hook.counters().unwrap_or_default());
        }
        (retired, total, attached.len())
    }
}

impl Hooks {
    /// Kubernetes mode: hooks the pods that need it and are not hooked yet.
    fn discover(&self, agent: &Agent) {
        let pods = self.flags.kernel_hook_pods.as_str();
        if pods == "off" || self.unavailable.is_some() {
            return;
        }
        let (Some(root), Some(current)) = (crate::instances::cgroup_v2_root(), agent.current())
        else {
            return;
        };
        let hooked: Vec<String> = self.lock().iter().map(|a| a.cgroup.clone()).collect();
        for (pod_cgroup, pid) in pods_to_hook(Path::new("/proc"), pods == "unreachable") {
            if hooked.contains(&pod_cgroup) || self.lock().len() >= self.flags.max_kernel_hooks {
                continue;
            }
            let peer = Peer::from_proc(Path::new("/proc"), Some(pid), 0, 0);
            let Identity::Known(known) = identity::resolve(agent, &peer) else {
                continue;
            };
            let Some((namespace, workload)) = known.workloads.iter().next().cloned() else {
                continue;
            };
            let directory = root.join(pod_cgroup.trim_start_matches('/'));
            let attached = compile(&current, &namespace, &workload).and_then(|table| {
                let entries = table.entries.len();
                KernelHook::attach(&directory, &table)
                    .map(|hook| (hook, entries))
                    .map_err(|e| e.to_string())
            });
            match attached {
                Ok((hook, entries)) => {
                    agent.metrics.kernel_hook_attach("ok");
                    info!(workload = %format!("{namespace}/{workload}"), cgroup = %pod_cgroup, pid, revision = current.revision, entries, "kernel hook attached to a pod the shim cannot reach");
                    self.lock().push(Attached {
                        namespace,
                        workload,
                        cgroup: pod_cgroup,
                        directory,
                        revision: current.revision,
                        entries,
                        owned: false,
                        hook,
                    });
                }
                Err(why) => {
                    agent.metrics.kernel_hook_attach("failed");
                    warn!(workload = %format!("{namespace}/{workload}"), cgroup = %pod_cgroup, %why, "cannot attach a kernel hook to a pod");
                }
            }
        }
    }
}

/// The pod cgroups (v2 paths, up to the `pod<uid>` component) that hold an injected process —
/// `LD_PRELOAD` naming the shim — which, when `unreachable_only`, has not mapped the shim (a
/// static or Go program, or one that cleared it); with one such process's pid each.
fn pods_to_hook(proc_root: &Path, unreachable_only: bool) -> Vec<(String, i32)> {
    let mut found: Vec<(String, i32)> = Vec::new();
    for (pid, dir) in crate::peer::processes(proc_root) {
        let Some(pod_cgroup) =
            crate::peer::cgroup(proc_root, pid).and_then(|cgroup| pod_cgroup(&cgroup))
        else {
            continue;
        };
        if found.iter().any(|(cgroup, _)| *cgroup == pod_cgroup) {
            continue;
        }
        let injected = std::fs::read(dir.join("environ")).is_ok_and(|environ| {
            environ.split(|b| *b == 0).any(|var| {
                var.starts_with(b"LD_PRELOAD=")
                    && String::from_utf8_lossy(var).contains(SHIM_LIBRARY)
            })
        });
        if !injected {
            continue;
        }
        let reached = unreachable_only
            && std::fs::read_to_string(dir.join("maps"))
                .is_ok_and(|maps| maps.contains(SHIM_LIBRARY));
        if !reached {
            found.push((pod_cgroup, pid));
        }
    }
    found
}

/// The shim's file name, as `LD_PRELOAD` and `/proc/PID/maps` show it.
const SHIM_LIBRARY: &str = "libnsocket.so";

/// A kubelet cgroup path cut after its `pod<uid>` component
/// (`/kubepods/besteffort/pod…/CONTAINER` → `/kubepods/besteffort/pod…`).
fn pod_cgroup(cgroup: &str) -> Option<String> {
    let mut path = String::new();
    for component in cgroup.split('/').filter(|c| !c.is_empty()) {
        path.push('/');
        path.push_str(component);
        if crate::peer::pod_uid(component).is_some() {
            return Some(path);
        }
    }
    None
}

/// `namespace/workload`'s table in `current`, with the congestion controls this node allows
/// unprivileged programs.
fn compile(
    current: &Current,
    namespace: &str,
    workload: &str,
) -> Result<stackroute_snapshot::kernel_table::KernelTable, String> {
    let snapshot = current.parsed.snapshot();
    let id = snapshot
        .workload_by_name(namespace, workload)
        .ok_or_else(|| {
            format!(
                "workload {namespace}/{workload} is not on node {} in revision {}",
                snapshot.node_name(),
                current.revision
            )
        })?;
    let allowed: Vec<CongestionControl> =
        std::fs::read_to_string("/proc/sys/net/ipv4/tcp_allowed_congestion_control")
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(CongestionControl::from_kernel_name)
            .collect();
    Ok(kernel_table(&snapshot, id, |cc| allowed.contains(&cc)))
}

/// Whether the cgroup at `directory` still has a process (`cgroup.events`); a cgroup that is
/// gone has none.
fn populated(directory: &Path) -> bool {
    match std::fs::read_to_string(directory.join("cgroup.events")) {
        Ok(events) => events.lines().any(|line| line == "populated 1"),
        Err(_) => false,
    }
}

fn add(sum: &mut Counters, more: Counters) {
    sum.connects += more.connects;
    sum.applied += more.applied;
    sum.left_default += more.left_default;
    sum.chosen_by_process += more.chosen_by_process;
    sum.not_interposable += more.not_interposable;
    sum.no_capability += more.no_capability;
    sum.isolation_forbids += more.isolation_forbids;
    sum.set_failed += more.set_failed;
    sum.no_entry += more.no_entry;
}

/// Keeps the hooks for the life of the agent.
pub async fn keeper(hooks: Arc<Hooks>, agent: Arc<Agent>) {
    let mut ticker = tokio::time::interval(KEEP_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut retired = Counters::default();
    loop {
        ticker.tick().await;
        let (hooks, agent_for_work) = (hooks.clone(), agent.clone());
        let kubernetes = agent.local_policy().mode == crate::local::Mode::Kubernetes;
        match tokio::task::spawn_blocking(move || {
            if kubernetes {
                hooks.discover(&agent_for_work);
            }
            hooks.keep(&agent_for_work)
        })
        .await
        {
            Ok((detached, attached, count)) => {
                add(&mut retired, detached);
                let mut all = retired;
                add(&mut all, attached);
                agent.metrics.kernel_hook_counters(&all, count);
            }
            Err(error) => warn!(%error, "the kernel hook keeper failed; going on"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_cgroups_end_at_the_pod_component() {
        assert_eq!(
            pod_cgroup("/kubepods/besteffort/pod0f1e2d3c-4b5a-6978-8899-aabbccddeeff/abc123"),
            Some("/kubepods/besteffort/pod0f1e2d3c-4b5a-6978-8899-aabbccddeeff".into())
        );
        assert_eq!(
            pod_cgroup(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0f1e2d3c_4b5a_6978_8899_aabbccddeeff.slice/cri-containerd-1.scope"
            ),
            Some(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0f1e2d3c_4b5a_6978_8899_aabbccddeeff.slice"
                    .into()
            )
        );
        assert_eq!(pod_cgroup("/user.slice/session-1.scope"), None);
    }
}
