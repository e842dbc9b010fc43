//! DPDK's Environment Abstraction Layer, once per process. `rte_eal_init` may run only once
//! (a second call fails, also after a failed one or after `rte_eal_cleanup`), so the process
//! keeps one state: the live EAL is shared by every port opened with the same arguments and
//! cleaned up when the last one closes; anything else is a clear error, and the caller moves on
//! to its next engine. EAL leaves its runtime directory (`/var/run/dpdk/<prefix>`) behind even
//! after cleanup: the engine removes its own, and sweeps those of dead processes it once made.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use super::config::{DpdkConfig, EalCommand, MachineFacts, Memory};
use crate::sys::dpdk as sys;

/// The prefix of the runtime directories this engine names.
const PREFIX: &str = "stackroute-";

enum State {
    Never,
    Live { argv: Vec<String>, eal: Weak<Eal> },
    Failed(String),
    Finished,
}

static STATE: Mutex<State> = Mutex::new(State::Never);

/// The live EAL; cleaned up when the last holder drops it.
#[derive(Debug)]
pub(crate) struct Eal {
    pub(crate) runtime_dir: PathBuf,
    /// How long `rte_eal_init` took.
    pub(crate) init_time: Duration,
    /// Where its memory comes from.
    pub(crate) memory: Memory,
}

/// EAL's runtime directory base, as EAL picks it: `/var/run/dpdk` for root, otherwise
/// `$XDG_RUNTIME_DIR/dpdk` or `/tmp/dpdk`.
pub(crate) fn runtime_base() -> PathBuf {
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    if root {
        return PathBuf::from("/var/run/dpdk");
    }
    std::env::var_os("XDG_RUNTIME_DIR")
        .map_or_else(|| PathBuf::from("/tmp"), PathBuf::from)
        .join("dpdk")
}

fn machine_facts() -> MachineFacts {
    static SEQUENCE: AtomicU32 = AtomicU32::new(0);
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let cpus = status
        .lines()
        .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))
        .map_or_else(|| "0".to_string(), |list| list.trim().to_string());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| -> u64 {
        meminfo
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    MachineFacts {
        cpus,
        hugepages_free_kib: field("HugePages_Free:") * field("Hugepagesize:"),
        file_prefix: format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            SEQUENCE.fetch_add(1, Ordering::Relaxed)
        ),
    }
}

/// Removes the runtime directories of stackroute processes that no longer run (a killed
/// process cannot remove its own).
pub(crate) fn sweep_stale(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

impl Eal {
    /// The process's EAL for `config`: started now, or the live one if it was started with
    /// the same arguments.
    pub(crate) fn acquire(config: &DpdkConfig) -> io::Result<Arc<Self>> {
        let mut state = STATE
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let invalid = |message: String| io::Error::new(io::ErrorKind::InvalidInput, message);
        let facts = machine_facts();
        let EalCommand {
            argv,
            memory,
            file_prefix,
        } = config.eal_argv(&facts).map_err(invalid)?;
        match &*state {
            State::Live { argv: live, eal } => {
                // Our own file prefix differs per call; compare what the user asked for. (No
                // upgraded Arc may drop here: its drop takes this lock.)
                if same_request(live, &argv)
                    && let Some(eal) = eal.upgrade()
                {
                    return Ok(eal);
                }
                return Err(once_per_process("is running with other arguments"));
            }
            State::Failed(reason) => {
                return Err(once_per_process(&format!("failed earlier: {reason}")));
            }
            State::Finished => return Err(once_per_process("was already cleaned up")),
            State::Never => {}
        }
        let base = runtime_base();
        sweep_stale(&base);
        let runtime_dir = base.join(&file_prefix);
        let started = Instant::now();
        if let Err(reason) = sys::eal_init(&argv) {
            let _ = std::fs::remove_dir_all(&runtime_dir);
            let message = format!(
                "rte_eal_init: {reason} (EAL arguments: {})",
                argv[1..].join(" ")
            );
            *state = State::Failed(message.clone());
            return Err(io::Error::other(message));
        }
        let eal = Arc::new(Self {
            runtime_dir,
            init_time: started.elapsed(),
            memory,
        });
        *state = State::Live {
            argv,
            eal: Arc::downgrade(&eal),
        };
        Ok(eal)
    }
}

fn same_request(live: &[String], asked: &[String]) -> bool {
    let without_prefix = |argv: &[String]| -> Vec<String> {
        argv.iter()
            .filter(|arg| !arg.starts_with(PREFIX))
            .cloned()
            .collect()
    };
    without_prefix(live) == without_prefix(asked)
}

fn once_per_process(what: &str) -> io::Error {
    io::Error::other(format!(
        "DPDK's EAL runs once per process and {what}; use another engine or process"
    ))
}

impl Drop for Eal {
    fn drop(&mut self) {
        let mut state = STATE
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        sys::eal_cleanup();
        let _ = std::fs::remove_dir_all(&self.runtime_dir);
        *state = State::Finished;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweep_removes_only_dead_stackroute_directories() {
        let base = std::env::temp_dir().join(format!("sr-sweep-{}", std::process::id()));
        let ours_alive = base.join(format!("{PREFIX}{}-0", std::process::id()));
        // PID 0x7ffffffe is above pid_max on Linux: never a live process.
        let ours_dead = base.join(format!("{PREFIX}2147483646-3"));
        let foreign = base.join("rte");
        for dir in [&ours_alive, &ours_dead, &foreign] {
            std::fs::create_dir_all(dir).unwrap();
        }
        sweep_stale(&base);
        assert!(ours_alive.exists());
        assert!(!ours_dead.exists());
        assert!(foreign.exists());
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn a_second_request_must_ask_for_the_same() {
        let a = ["x", "--vdev=a", "--file-prefix", "stackroute-1-0"].map(String::from);
        let b = ["x", "--vdev=a", "--file-prefix", "stackroute-1-1"].map(String::from);
        let c = ["x", "--vdev=c", "--file-prefix", "stackroute-1-2"].map(String::from);
        assert!(same_request(&a, &b));
        assert!(!same_request(&a, &c));
    }
}
