//! What the DPDK engine is asked to open, and the EAL command line built from it. Pure: the
//! facts of the machine (CPUs, hugepages, PID) come in as [`MachineFacts`], so every rule is
//! unit-tested without DPDK.

// Only a build with DPDK starts EAL; the command-line rules are tested in every build.
#![cfg_attr(not(feature = "dpdk"), allow(dead_code))]

use std::fmt;

/// Whether EAL memory comes from hugepages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Hugepages {
    /// Hugepages when enough are free (`--in-memory`: memfd-backed, nothing left on disk),
    /// otherwise ordinary memory (`--no-huge`).
    #[default]
    Auto,
    /// Hugepages or an error.
    On,
    /// Ordinary memory (`--no-huge`): works everywhere, for virtual devices and tests.
    Off,
}

/// How to open the DPDK engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DpdkConfig {
    /// EAL arguments given by the user (`--vdev=net_af_packet0,iface=eth1`, `-a 0000:03:00.0`).
    /// The engine adds its defaults for what they leave out (see [`DpdkConfig::eal_argv`]).
    pub eal_args: Vec<String>,
    /// The ethdev port by name (`net_memif0`, `0000:03:00.0`); `None`: EAL must probe exactly
    /// one.
    pub port: Option<String>,
    /// Mbufs in the pool for both directions. 8191 by default: the `net_af_xdp` PMD fills its
    /// UMEM from the pool and fails with 1023 (`Failed to get enough buffers for fq`).
    pub mbufs: u32,
    /// RX and TX descriptors (the driver may adjust them to its limits).
    pub descriptors: u16,
    /// Frames per RX/TX burst.
    pub burst: usize,
    /// Hugepages or not.
    pub hugepages: Hugepages,
    /// Use the port's checksum offloads (RX verification) when it offers them.
    pub offloads: bool,
}

impl Default for DpdkConfig {
    fn default() -> Self {
        Self {
            eal_args: Vec::new(),
            port: None,
            mbufs: 8191,
            descriptors: 1024,
            burst: 32,
            hugepages: Hugepages::Auto,
            offloads: true,
        }
    }
}

/// Bytes of packet data an mbuf holds, headroom (128) included: one 1500-byte-MTU frame.
pub(crate) const MBUF_DATA_ROOM: u16 = 2048 + 128;
/// The room of the mbufs for frames the port cuts into segments (TSO): the most an mbuf holds.
pub(crate) const TSO_DATA_ROOM: u16 = u16::MAX;
/// How many of them: enough for a few bursts in flight (each frame up to 44 segments).
pub(crate) const TSO_MBUFS: u32 = 255;

/// What the EAL command line depends on besides the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct MachineFacts {
    /// The CPUs this process may run on, in `/proc/self/status` `Cpus_allowed_list` form
    /// ("0-1", "0,2-3").
    pub(crate) cpus: String,
    /// Free hugepages, in KiB.
    pub(crate) hugepages_free_kib: u64,
    /// The file prefix for EAL's runtime directory.
    pub(crate) file_prefix: String,
}

/// Where EAL memory comes from, for reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Memory {
    /// `--no-huge`: ordinary pages.
    NoHuge { megabytes: u64 },
    /// `--in-memory` on hugepages.
    Hugepages { megabytes: u64 },
    /// The user chose (`--no-huge`, `--in-memory`, `-m` or `--socket-mem` among the arguments).
    User,
}

impl fmt::Display for Memory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoHuge { megabytes } => write!(f, "no-huge {megabytes} MB"),
            Self::Hugepages { megabytes } => write!(f, "hugepages in-memory {megabytes} MB"),
            Self::User => f.write_str("as the EAL arguments say"),
        }
    }
}

/// The EAL command line and what it chose.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct EalCommand {
    /// argv, `argv[0]` first.
    pub(crate) argv: Vec<String>,
    pub(crate) memory: Memory,
    /// The runtime directory prefix (ours or the user's `--file-prefix`).
    pub(crate) file_prefix: String,
}

fn has(args: &[String], names: &[&str]) -> bool {
    args.iter().any(|arg| {
        names
            .iter()
            .any(|name| arg == name || arg.strip_prefix(name).is_some_and(|r| r.starts_with('=')))
    })
}

fn value_of<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter().enumerate().find_map(|(i, arg)| {
        if arg == name {
            args.get(i + 1).map(String::as_str)
        } else {
            arg.strip_prefix(name)?.strip_prefix('=')
        }
    })
}

impl DpdkConfig {
    /// Splits `--dpdk-args` text into EAL arguments (shell quoting rules).
    pub fn parse_eal_args(text: &str) -> Result<Vec<String>, String> {
        shlex::split(text).ok_or_else(|| format!("--dpdk-args {text:?}: unbalanced quotes"))
    }

    /// EAL memory in MB for the pools (the packet pool, and with offloads the TSO pool a port
    /// may want): each mbuf costs its data room plus about 256 bytes of headers (rte_mbuf,
    /// mempool object header), twice over for EAL's own tables and the drivers' rings, plus
    /// 64 MB.
    pub(crate) fn memory_megabytes(&self) -> u64 {
        let mbuf = |count: u32, room: u16| u64::from(count) * (u64::from(room) + 256);
        let mut pools = mbuf(self.mbufs, MBUF_DATA_ROOM);
        if self.offloads {
            pools += mbuf(TSO_MBUFS, TSO_DATA_ROOM);
        }
        (pools * 2).div_ceil(1 << 20) + 64
    }

    /// The EAL command line: the user's arguments, then a default for each thing they leave
    /// out — a per-process `--file-prefix` (runtime files are ours to remove), `--no-shconf`
    /// (no multi-process files), `--no-telemetry`, `--no-pci` (vdevs unless PCI devices are
    /// allowed), `--lcores 0@(the CPUs we may run on)` (EAL otherwise pins the calling thread to
    /// one CPU), and the memory mode.
    pub(crate) fn eal_argv(&self, facts: &MachineFacts) -> Result<EalCommand, String> {
        let user = &self.eal_args;
        if has(user, &["--in-memory"]) && has(user, &["--no-huge"]) {
            return Err(
                "--dpdk-args: --in-memory and --no-huge cannot be combined (DPDK 22.11 \
                 refuses --in-memory with the legacy memory --no-huge implies); drop one"
                    .into(),
            );
        }
        let mut argv = vec!["stackroute".to_string()];
        argv.extend(user.iter().cloned());
        let file_prefix = match value_of(user, "--file-prefix") {
            Some(prefix) => prefix.to_string(),
            None => {
                argv.extend(["--file-prefix".into(), facts.file_prefix.clone()]);
                facts.file_prefix.clone()
            }
        };
        if !has(user, &["--no-shconf", "--in-memory", "--proc-type"]) {
            argv.push("--no-shconf".into());
        }
        if !has(user, &["--no-telemetry", "--telemetry"]) {
            argv.push("--no-telemetry".into());
        }
        if !has(user, &["--no-pci", "-a", "--allow", "-b", "--block"]) {
            argv.push("--no-pci".into());
        }
        if !has(user, &["-l", "-c", "--lcores"]) {
            argv.extend(["--lcores".into(), format!("0@({})", facts.cpus)]);
        }
        let megabytes = self.memory_megabytes();
        let memory = if has(user, &["--no-huge", "--in-memory", "-m", "--socket-mem"]) {
            Memory::User
        } else {
            let enough = facts.hugepages_free_kib >= megabytes * 1024;
            match (self.hugepages, enough) {
                (Hugepages::On, false) => {
                    return Err(format!(
                        "hugepages required but only {} MB free, {megabytes} MB needed \
                         (raise /proc/sys/vm/nr_hugepages or use --dpdk-hugepages off)",
                        facts.hugepages_free_kib / 1024
                    ));
                }
                (Hugepages::On | Hugepages::Auto, true) => Memory::Hugepages { megabytes },
                _ => Memory::NoHuge { megabytes },
            }
        };
        match memory {
            Memory::Hugepages { megabytes } => {
                argv.extend(["--in-memory".into(), "-m".into(), megabytes.to_string()]);
            }
            Memory::NoHuge { megabytes } => {
                argv.extend(["--no-huge".into(), "-m".into(), megabytes.to_string()]);
            }
            Memory::User => {}
        }
        Ok(EalCommand {
            argv,
            memory,
            file_prefix,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(hugepages_free_kib: u64) -> MachineFacts {
        MachineFacts {
            cpus: "0-1".into(),
            hugepages_free_kib,
            file_prefix: "stackroute-42-0".into(),
        }
    }

    fn config(args: &str) -> DpdkConfig {
        DpdkConfig {
            eal_args: DpdkConfig::parse_eal_args(args).unwrap(),
            ..DpdkConfig::default()
        }
    }

    #[test]
    fn defaults_fill_in_what_the_user_leaves_out() {
        let command = config("--vdev=net_memif0,role=server")
            .eal_argv(&facts(0))
            .unwrap();
        let megabytes = config("").memory_megabytes();
        assert_eq!(
            command.argv.join(" "),
            format!(
                "stackroute --vdev=net_memif0,role=server --file-prefix stackroute-42-0 \
                 --no-shconf --no-telemetry --no-pci --lcores 0@(0-1) --no-huge -m {megabytes}"
            )
        );
        assert_eq!(command.memory, Memory::NoHuge { megabytes });
        assert_eq!(command.file_prefix, "stackroute-42-0");
        // 8191 mbufs of 2176 + 256 bytes and 255 of 65535 + 256, doubled, plus 64 MB.
        assert_eq!(megabytes, 134);
        let without_offloads = DpdkConfig {
            offloads: false,
            ..config("")
        };
        assert_eq!(without_offloads.memory_megabytes(), 102);
    }

    #[test]
    fn user_arguments_win() {
        let command = config("-l 1 -a 0000:03:00.0 --file-prefix=mine -m 512 --telemetry")
            .eal_argv(&facts(1 << 30))
            .unwrap();
        assert_eq!(
            command.argv.join(" "),
            "stackroute -l 1 -a 0000:03:00.0 --file-prefix=mine -m 512 --telemetry --no-shconf"
        );
        assert_eq!(command.memory, Memory::User);
        assert_eq!(command.file_prefix, "mine");
        let spaced = config("--file-prefix mine2").eal_argv(&facts(0)).unwrap();
        assert_eq!(spaced.file_prefix, "mine2");
    }

    #[test]
    fn hugepages_when_enough_are_free() {
        let megabytes = config("").memory_megabytes();
        let enough = facts(megabytes * 1024);
        let command = config("").eal_argv(&enough).unwrap();
        assert!(command.argv.ends_with(&[
            "--in-memory".into(),
            "-m".into(),
            megabytes.to_string()
        ]));
        assert_eq!(
            command.memory.to_string(),
            format!("hugepages in-memory {megabytes} MB")
        );
        let off = DpdkConfig {
            hugepages: Hugepages::Off,
            ..config("")
        };
        assert_eq!(
            off.eal_argv(&enough).unwrap().memory,
            Memory::NoHuge { megabytes }
        );
        let on = DpdkConfig {
            hugepages: Hugepages::On,
            ..config("")
        };
        let error = on.eal_argv(&facts(2048)).unwrap_err();
        assert!(
            error.contains("hugepages required but only 2 MB free"),
            "{error}"
        );
    }

    #[test]
    fn in_memory_with_no_huge_is_refused_with_the_reason() {
        let error = config("--no-huge --in-memory")
            .eal_argv(&facts(0))
            .unwrap_err();
        assert!(error.contains("cannot be combined"), "{error}");
    }

    #[test]
    fn quoting_follows_the_shell() {
        assert_eq!(
            DpdkConfig::parse_eal_args("--vdev 'net_af_packet0,iface=a b' -l 0").unwrap(),
            ["--vdev", "net_af_packet0,iface=a b", "-l", "0"]
        );
        assert!(DpdkConfig::parse_eal_args("--vdev 'x").is_err());
    }
}
