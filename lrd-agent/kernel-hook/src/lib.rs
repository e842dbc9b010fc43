//! The kernel hook: policy's kernel transports for programs the shim cannot reach (Go and other
//! raw-syscall programs, static and set-user-ID binaries, io_uring connects). A `sock_ops` BPF
//! program (`bpf/sockops.c`) attached to a workload's cgroup v2 directory sets the congestion
//! control of each new TCP connection before its SYN leaves, from a table the agent compiles
//! from the node's snapshot ([`stackroute_snapshot::kernel_table`]); a `cgroup/setsockopt`
//! program marks sockets whose process chose a congestion control itself (the shim does, on
//! the connections it decides), which the hook then leaves alone.
//!
//! Loading and attaching needs `CAP_BPF` and `CAP_NET_ADMIN` (or `CAP_SYS_ADMIN`); updating
//! the table needs only the loaded object. Dropping a [`KernelHook`] detaches both programs and
//! frees the maps.

use std::fs::File;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, MapData, PerCpuArray};
use aya::programs::{CgroupAttachMode, CgroupSockopt, SockOps};
use aya::{Ebpf, EbpfLoader};
use stackroute_snapshot::kernel_table::{KernelEntry, KernelOutcome, KernelTable};

/// The compiled programs (ELF), aligned as aya's parser needs.
static PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sockops.o"));

/// Port classes per generation (`MAX_CLASSES` in `bpf/sockops.c`).
pub const MAX_PORT_CLASSES: usize = 256;
/// Entries per address family and generation: the trie (`MAX_ENTRIES`, 65536) holds the
/// current and the next generation during an update.
pub const MAX_ENTRIES: usize = 32_768;

/// `struct outcome`'s `action`.
const SET_CONGESTION_CONTROL: u8 = 1;
/// `struct outcome`'s `skipped` bits.
const SKIPPED_NOT_INTERPOSABLE: u8 = 1;
const SKIPPED_NO_CAPABILITY: u8 = 2;
const ISOLATION_FORBIDS: u8 = 4;

/// Why the hook cannot be loaded, attached or updated.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// The cgroup directory cannot be opened.
    #[error("cannot open the cgroup {path}: {source}")]
    Cgroup {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The kernel refused to load or attach (no BPF, no cgroup v2, no capability).
    #[error("{what}: {message}")]
    Kernel {
        /// What was being done.
        what: &'static str,
        /// The loader's error.
        message: String,
    },
    /// The table does not fit the program's maps.
    #[error("the table does not fit the kernel hook: {0}")]
    TooLarge(String),
}

fn kernel(what: &'static str) -> impl FnOnce(&dyn std::error::Error) -> HookError {
    move |error| {
        // aya's errors keep the errno in their sources.
        let mut message = error.to_string();
        let mut source = error.source();
        while let Some(cause) = source {
            message = format!("{message}: {cause}");
            source = cause.source();
        }
        HookError::Kernel { what, message }
    }
}

/// What the hook counted, summed over CPUs (`enum counter` in `bpf/sockops.c`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// New connections seen.
    pub connects: u64,
    /// Connections given the table's congestion control.
    pub applied: u64,
    /// Connections the table left on the namespace's default.
    pub left_default: u64,
    /// Connections whose process set its congestion control itself (the shim decided).
    pub chosen_by_process: u64,
    /// Answers that skipped a user-space or RDMA entry (`not-interposable`).
    pub not_interposable: u64,
    /// Answers that skipped a congestion control the node does not allow (`no-capability`).
    pub no_capability: u64,
    /// Answers whose rule's isolation forbids the kernel (the hook cannot refuse; counted).
    pub isolation_forbids: u64,
    /// Connections whose congestion control the kernel refused to set.
    pub set_failed: u64,
    /// Connections with no table entry (no table yet).
    pub no_entry: u64,
}

/// Whether this kernel takes the hook: loads both programs (the verifier checks them) and its
/// maps, attaches nothing, and unloads them. The error says what is missing (BPF, BTF,
/// socket-local storage, a capability).
pub fn probe() -> Result<(), HookError> {
    let mut ebpf = EbpfLoader::new()
        .allow_unsupported_maps()
        .load(PROGRAM)
        .map_err(|e| kernel("loading bpf/sockops.c")(&e))?;
    let sockops: &mut SockOps = program(&mut ebpf, "stackroute_sockops")?;
    sockops
        .load()
        .map_err(|e| kernel("loading the sock_ops program")(&e))?;
    let setsockopt: &mut CgroupSockopt = program(&mut ebpf, "stackroute_setsockopt")?;
    setsockopt
        .load()
        .map_err(|e| kernel("loading the setsockopt program")(&e))?;
    Ok(())
}

/// The hook attached to one cgroup.
pub struct KernelHook {
    ebpf: Ebpf,
    cgroup: PathBuf,
    generation: u8,
    /// The keys of the current generation, removed after the next swap.
    keys4: Vec<Key<[u8; 8]>>,
    keys6: Vec<Key<[u8; 20]>>,
    classes: [u32; 2],
}

impl std::fmt::Debug for KernelHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelHook")
            .field("cgroup", &self.cgroup)
            .field("generation", &self.generation)
            .field("entries", &(self.keys4.len() + self.keys6.len()))
            .finish_non_exhaustive()
    }
}

impl KernelHook {
    /// Loads the programs, installs `table`, and attaches them to the cgroup v2 directory
    /// `cgroup` (its processes' and its descendants' new sockets).
    pub fn attach(cgroup: &Path, table: &KernelTable) -> Result<Self, HookError> {
        let directory = File::open(cgroup).map_err(|source| HookError::Cgroup {
            path: cgroup.to_path_buf(),
            source,
        })?;
        // `chosen` is socket-local storage, which aya creates but has no type for.
        let ebpf = EbpfLoader::new()
            .allow_unsupported_maps()
            .load(PROGRAM)
            .map_err(|e| kernel("loading bpf/sockops.c")(&e))?;
        let mut hook = Self {
            ebpf,
            cgroup: cgroup.to_path_buf(),
            generation: 1,
            keys4: Vec::new(),
            keys6: Vec::new(),
            classes: [0; 2],
        };
        // The table is in place before the first connection can reach the program.
        hook.update(table)?;
        let sockops: &mut SockOps = program(&mut hook.ebpf, "stackroute_sockops")?;
        sockops
            .load()
            .map_err(|e| kernel("loading the sock_ops program")(&e))?;
        // Through a BPF link (aya uses one from Linux 5.7), which always lets other programs
        // share the cgroup; the kernel refuses any attach flag on a link (EINVAL).
        sockops
            .attach(&directory, CgroupAttachMode::Single)
            .map_err(|e| kernel("attaching the sock_ops program to the cgroup")(&e))?;
        let setsockopt: &mut CgroupSockopt = program(&mut hook.ebpf, "stackroute_setsockopt")?;
        setsockopt
            .load()
            .map_err(|e| kernel("loading the setsockopt program")(&e))?;
        setsockopt
            .attach(&directory, CgroupAttachMode::Single)
            .map_err(|e| kernel("attaching the setsockopt program to the cgroup")(&e))?;
        Ok(hook)
    }

    /// The cgroup it is attached to.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// Replaces the table as a whole: the next generation's port bounds and entries are
    /// written, then the generation flips (a connection sees one table or the other, never a
    /// mix), then the old entries go.
    pub fn update(&mut self, table: &KernelTable) -> Result<(), HookError> {
        if table.port_bounds.len() > MAX_PORT_CLASSES {
            return Err(HookError::TooLarge(format!(
                "{} port classes (at most {MAX_PORT_CLASSES})",
                table.port_bounds.len()
            )));
        }
        let (v4, v6): (Vec<&KernelEntry>, Vec<&KernelEntry>) =
            table.entries.iter().partition(|e| e.network.is_ipv4());
        if v4.len().max(v6.len()) > MAX_ENTRIES {
            return Err(HookError::TooLarge(format!(
                "{} IPv4 and {} IPv6 entries (at most {MAX_ENTRIES} each)",
                v4.len(),
                v6.len()
            )));
        }
        let next = 1 - self.generation;
        let mut bounds: Array<&mut MapData, u16> = map(&mut self.ebpf, "port_bounds")?;
        for (index, &bound) in table.port_bounds.iter().enumerate() {
            let slot = u32::from(next) * MAX_PORT_CLASSES as u32 + index as u32;
            bounds
                .set(slot, bound, 0)
                .map_err(|e| kernel("writing the port classes")(&e))?;
        }
        let mut keys4 = Vec::with_capacity(v4.len());
        let mut table4: LpmTrie<&mut MapData, [u8; 8], [u8; 20]> = map(&mut self.ebpf, "table4")?;
        for entry in &v4 {
            let key = key(next, entry.class, entry.network, entry.prefix);
            table4
                .insert(&key, outcome_value(entry.outcome), 0)
                .map_err(|e| kernel("writing the IPv4 table")(&e))?;
            keys4.push(key);
        }
        let mut keys6 = Vec::with_capacity(v6.len());
        let mut table6: LpmTrie<&mut MapData, [u8; 20], [u8; 20]> = map(&mut self.ebpf, "table6")?;
        for entry in &v6 {
            let key = key(next, entry.class, entry.network, entry.prefix);
            table6
                .insert(&key, outcome_value(entry.outcome), 0)
                .map_err(|e| kernel("writing the IPv6 table")(&e))?;
            keys6.push(key);
        }
        let mut classes = self.classes;
        classes[usize::from(next)] = table.port_bounds.len() as u32;
        let mut state: Array<&mut MapData, [u32; 3]> = map(&mut self.ebpf, "state")?;
        state
            .set(0, [u32::from(next), classes[0], classes[1]], 0)
            .map_err(|e| kernel("switching to the new table")(&e))?;
        // The old generation is unreachable now; a connection that read it a moment ago finds
        // the entries gone only if it is still looking up, and then gets no answer (counted).
        let mut table4: LpmTrie<&mut MapData, [u8; 8], [u8; 20]> = map(&mut self.ebpf, "table4")?;
        for old in std::mem::replace(&mut self.keys4, keys4) {
            let _ = table4.remove(&old);
        }
        let mut table6: LpmTrie<&mut MapData, [u8; 20], [u8; 20]> = map(&mut self.ebpf, "table6")?;
        for old in std::mem::replace(&mut self.keys6, keys6) {
            let _ = table6.remove(&old);
        }
        self.generation = next;
        self.classes = classes;
        Ok(())
    }

    /// The counters, summed over CPUs.
    pub fn counters(&self) -> Result<Counters, HookError> {
        let data = self
            .ebpf
            .map("counters")
            .ok_or_else(|| missing("counters"))?;
        let counters: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(data).map_err(|e| kernel("the counters map")(&e))?;
        let read = |index: u32| -> Result<u64, HookError> {
            Ok(counters
                .get(&index, 0)
                .map_err(|e| kernel("reading the counters")(&e))?
                .iter()
                .sum())
        };
        Ok(Counters {
            connects: read(0)?,
            applied: read(1)?,
            left_default: read(2)?,
            chosen_by_process: read(3)?,
            not_interposable: read(4)?,
            no_capability: read(5)?,
            isolation_forbids: read(6)?,
            set_failed: read(7)?,
            no_entry: read(8)?,
        })
    }
}

fn missing(name: &str) -> HookError {
    HookError::Kernel {
        what: "bpf/sockops.c",
        message: format!("has no `{name}`"),
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, HookError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program>,
    <&'a mut T as TryFrom<&'a mut aya::programs::Program>>::Error: std::fmt::Display,
{
    let program = ebpf.program_mut(name).ok_or_else(|| missing(name))?;
    program.try_into().map_err(|e| HookError::Kernel {
        what: "bpf/sockops.c",
        message: format!("`{name}`: {e}"),
    })
}

fn map<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<T, HookError>
where
    T: TryFrom<&'a mut aya::maps::Map>,
    <T as TryFrom<&'a mut aya::maps::Map>>::Error: std::fmt::Display,
{
    let data = ebpf.map_mut(name).ok_or_else(|| missing(name))?;
    T::try_from(data).map_err(|e| HookError::Kernel {
        what: "bpf/sockops.c",
        message: format!("`{name}`: {e}"),
    })
}

/// `struct key4`/`struct key6`: generation, class (big-endian), address, padding; the prefix
/// covers generation and class (24 bits) and the network's prefix.
fn key<const N: usize>(generation: u8, class: u16, network: IpAddr, prefix: u8) -> Key<[u8; N]> {
    let mut data = [0u8; N];
    data[0] = generation;
    data[1..3].copy_from_slice(&class.to_be_bytes());
    match network {
        IpAddr::V4(v4) => data[3..7].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => data[3..19].copy_from_slice(&v6.octets()),
    }
    Key::new(24 + u32::from(prefix), data)
}

/// `struct outcome`: the congestion control's kernel name (NUL-padded), action, skipped bits.
fn outcome_value(outcome: KernelOutcome) -> [u8; 20] {
    let mut value = [0u8; 20];
    if let Some(name) = outcome.congestion_control.and_then(|cc| cc.kernel_name()) {
        value[..name.len()].copy_from_slice(name.as_bytes());
        value[16] = SET_CONGESTION_CONTROL;
    }
    for (set, bit) in [
        (outcome.skipped_not_interposable, SKIPPED_NOT_INTERPOSABLE),
        (outcome.skipped_no_capability, SKIPPED_NO_CAPABILITY),
        (outcome.isolation_forbids, ISOLATION_FORBIDS),
    ] {
        if set {
            value[17] |= bit;
        }
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;
    use stackroute_snapshot::CongestionControl;

    #[test]
    fn keys_put_generation_and_class_before_the_address() {
        let v4: Key<[u8; 8]> = key(1, 0x0102, "10.77.0.2".parse().unwrap(), 32);
        assert_eq!(v4.prefix_len(), 56);
        assert_eq!(v4.data(), [1, 1, 2, 10, 77, 0, 2, 0]);
        let v6: Key<[u8; 20]> = key(0, 3, "fd00::1".parse().unwrap(), 8);
        assert_eq!(v6.prefix_len(), 32);
        assert_eq!(&v6.data()[..4], &[0, 0, 3, 0xfd]);
    }

    #[test]
    fn outcomes_name_the_kernel_congestion_control() {
        let value = outcome_value(KernelOutcome {
            congestion_control: Some(CongestionControl::Bbr),
            skipped_not_interposable: true,
            skipped_no_capability: false,
            isolation_forbids: true,
        });
        assert_eq!(&value[..4], b"bbr\0");
        assert_eq!(value[16], SET_CONGESTION_CONTROL);
        assert_eq!(value[17], SKIPPED_NOT_INTERPOSABLE | ISOLATION_FORBIDS);
        let default = outcome_value(KernelOutcome {
            congestion_control: None,
            skipped_not_interposable: false,
            skipped_no_capability: false,
            isolation_forbids: false,
        });
        assert_eq!(default, [0; 20]);
    }
}
