//! Hosts as Linux network namespaces joined by veth pairs, with loss and rate limits.
//!
//! Every namespace is named `sre2e-<pid>-<n>-<host>`, so runs in parallel never collide, and a
//! namespace whose creating process is gone (a run that was SIGKILLed before its drop ran) is
//! removed by the next run. Veths are created inside namespaces (never in the host's), so
//! deleting the namespaces removes every interface, address, route, qdisc and iptables rule
//! this module made.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use rustix::process::{Pid, Signal, kill_process};

use crate::proc::run;

const PREFIX: &str = "sre2e-";
const NETNS_DIR: &str = "/run/netns";
const TIMEOUT: Duration = Duration::from_secs(20);

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Runs `ip ARGS…`.
pub fn ip(args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(args), TIMEOUT)
}

/// A set of network namespaces owned by this process; dropping it kills every process left in
/// them (by PID) and deletes them.
pub struct Net {
    prefix: String,
    namespaces: Vec<String>,
}

/// Packet loss and a rate limit on the egress of one interface.
#[derive(Clone, Copy, Debug, Default)]
pub struct Impairment {
    /// Probability (0–1) that a packet leaving the interface is dropped (iptables `statistic`).
    pub loss: f64,
    /// Token-bucket rate limit in Mbit/s (`tc qdisc … tbf`).
    pub rate_mbit: Option<u32>,
}

impl Net {
    /// A new, empty set. Removes namespaces left by runs whose process no longer exists.
    pub fn new() -> Result<Self> {
        remove_leftovers();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        Ok(Self {
            prefix: format!("{PREFIX}{}-{n}-", std::process::id()),
            namespaces: Vec::new(),
        })
    }

    /// The full namespace name of `host`.
    pub fn ns(&self, host: &str) -> String {
        format!("{}{host}", self.prefix)
    }

    /// Creates the namespace for `host` with `lo` up and `default_cc` as its default congestion
    /// control; returns its full name.
    pub fn add_host(&mut self, host: &str, default_cc: &str) -> Result<String> {
        let ns = self.ns(host);
        ip(&["netns", "add", &ns])?;
        self.namespaces.push(ns.clone());
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        self.sysctl(host, "net.ipv4.tcp_congestion_control", default_cc)?;
        Ok(ns)
    }

    /// `sysctl -w KEY=VALUE` inside `host`.
    pub fn sysctl(&self, host: &str, key: &str, value: &str) -> Result<()> {
        self.exec(host, &["sysctl", "-qw", &format!("{key}={value}")])?;
        Ok(())
    }

    /// Runs a command inside `host` to completion and returns its stdout.
    pub fn exec(&self, host: &str, args: &[&str]) -> Result<String> {
        run(&mut self.command(host, args), TIMEOUT)
    }

    /// `ip netns exec NS ARGS…` as a command to spawn (it execs, so the pid is the program's).
    pub fn command(&self, host: &str, args: &[&str]) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.ns(host)]).args(args);
        command
    }

    /// A veth pair between `a` (interface `a_if`) and `b` (`b_if`), both up, with segmentation
    /// offloads off so that loss and rate limits act on wire-sized packets.
    pub fn veth(&self, a: &str, a_if: &str, b: &str, b_if: &str) -> Result<()> {
        let (na, nb) = (self.ns(a), self.ns(b));
        ip(&[
            "-n", &na, "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", &nb,
        ])?;
        for (ns, dev) in [(&na, a_if), (&nb, b_if)] {
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            run(
                Command::new("ip").args([
                    "netns", "exec", ns, "ethtool", "-K", dev, "tso", "off", "gso", "off", "gro",
                    "off",
                ]),
                TIMEOUT,
            )
            .context("ethtool -K (is ethtool installed?)")?;
        }
        Ok(())
    }

    /// A bridge `name` in `host`, up.
    pub fn bridge(&self, host: &str, name: &str) -> Result<()> {
        let ns = self.ns(host);
        ip(&["-n", &ns, "link", "add", name, "type", "bridge"])?;
        ip(&["-n", &ns, "link", "set", name, "up"])?;
        Ok(())
    }

    /// Enslaves `dev` to `bridge` in `host`.
    pub fn attach(&self, host: &str, dev: &str, bridge: &str) -> Result<()> {
        ip(&["-n", &self.ns(host), "link", "set", dev, "master", bridge])?;
        Ok(())
    }

    /// Adds `cidr` to `dev` in `host`.
    pub fn addr(&self, host: &str, dev: &str, cidr: &str) -> Result<()> {
        ip(&["-n", &self.ns(host), "addr", "add", cidr, "dev", dev])?;
        Ok(())
    }

    /// A route to `dst` via `gateway` in `host` (`dst` may be `default`).
    pub fn route(&self, host: &str, dst: &str, gateway: &str) -> Result<()> {
        ip(&["-n", &self.ns(host), "route", "add", dst, "via", gateway])?;
        Ok(())
    }

    /// Loss and a rate limit on packets leaving `dev` in `host` (forwarded or local). Replaces an
    /// earlier impairment of the same interface.
    pub fn impair(&self, host: &str, dev: &str, impairment: Impairment) -> Result<()> {
        let ns = self.ns(host);
        // One chain per interface, jumped to from FORWARD and OUTPUT: re-impairing an
        // interface flushes only its own rule.
        let chain = format!("sr-loss-{dev}");
        if self.exec(host, &["iptables", "-N", &chain]).is_ok() {
            for hook in ["FORWARD", "OUTPUT"] {
                self.exec(host, &["iptables", "-A", hook, "-o", dev, "-j", &chain])
                    .context("iptables (is it installed?)")?;
            }
        }
        self.exec(host, &["iptables", "-F", &chain])?;
        if impairment.loss > 0.0 {
            let probability = format!("{:.4}", impairment.loss);
            self.exec(
                host,
                &[
                    "iptables",
                    "-A",
                    &chain,
                    "-m",
                    "statistic",
                    "--mode",
                    "random",
                    "--probability",
                    &probability,
                    "-j",
                    "DROP",
                ],
            )
            .context("iptables statistic match")?;
        }

        let _ = run(
            Command::new("ip").args([
                "netns", "exec", &ns, "tc", "qdisc", "del", "dev", dev, "root",
            ]),
            TIMEOUT,
        );
        if let Some(rate) = impairment.rate_mbit {
            let rate = format!("{rate}mbit");
            self.exec(
                host,
                &[
                    "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", &rate, "burst",
                    "32kb", "latency", "50ms",
                ],
            )
            .context("tc tbf")?;
        }
        Ok(())
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            remove_namespace(ns);
        }
    }
}

/// Kills every process in `ns` by PID, then deletes it.
fn remove_namespace(ns: &str) {
    for _ in 0..3 {
        let pids = ip(&["netns", "pids", ns]).unwrap_or_default();
        let pids: Vec<Pid> = pids
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
            .filter_map(Pid::from_raw)
            .collect();
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            let _ = kill_process(pid, Signal::KILL);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if let Err(error) = ip(&["netns", "del", ns]) {
        eprintln!("e2e: cannot delete network namespace {ns}: {error:#}");
    }
}

/// Deletes `sre2e-<pid>-…` namespaces whose creating process does not exist any more.
fn remove_leftovers() {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("e2e: removing leftover namespace {name} (its run, pid {pid}, is gone)");
            remove_namespace(&name);
        }
    }
}
