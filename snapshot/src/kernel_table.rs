//! One workload's decisions flattened for a kernel hook (a `sock_ops` BPF program), which cannot
//! run the rule walk: a longest-prefix table keyed by (destination port class, destination
//! address) whose answer is the congestion control to set.
//!
//! For a fixed source workload [`Snapshot::decide`] depends on the destination address only
//! through which address book entries, cluster networks, rule networks and Service frontends it
//! is or falls in, and on the port only through rule port ranges and Service ports. So the
//! table holds one prefix per such address or network (and `0.0.0.0/0`, `::/0`), splits ports
//! into classes at every range boundary, and asks `decide` once per (prefix, class) at an
//! address of the prefix that no more specific prefix covers. An entry equal to what the next
//! shorter prefix answers is left out. [`KernelTable::lookup`] is the hook's lookup, in Rust,
//! so tests compare it with `decide` directly.
//!
//! The walk down the transport list is the shim's for a program it cannot reach: the
//! user-space stack and RDMA are skipped (the program's sockets are the kernel's), a kernel
//! entry with a congestion control the node does not allow is skipped, and an exhausted list
//! leaves the kernel default.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::format::{EMPTY_SLOT, SectionId, address4, address6, cidr, port, service};
use crate::view::{Snapshot, WorkloadId};
use crate::{CongestionControl, Isolation, NoTrace, Protocol, Stack};

/// What the hook does with a new connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KernelOutcome {
    /// The congestion control to set; `None` leaves the namespace's default.
    pub congestion_control: Option<CongestionControl>,
    /// A user-space or RDMA entry was skipped: the program's sockets are the kernel's.
    pub skipped_not_interposable: bool,
    /// A kernel entry was skipped because the node does not allow its congestion control.
    pub skipped_no_capability: bool,
    /// The rule's isolation forbids the kernel; the hook cannot refuse a connection, so it
    /// leaves the default (and counts it).
    pub isolation_forbids: bool,
}

/// One entry: connections to an address in `network/prefix` on a port of class `class`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelEntry {
    /// The network (host bits zero).
    pub network: IpAddr,
    /// Its prefix length.
    pub prefix: u8,
    /// The port class (an index into [`KernelTable::port_bounds`]).
    pub class: u16,
    /// The answer.
    pub outcome: KernelOutcome,
}

/// A workload's table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelTable {
    /// Ascending first ports of the classes; class `i` is `port_bounds[i]..port_bounds[i + 1]`
    /// (the last runs to 65535). The first is 0.
    pub port_bounds: Vec<u16>,
    /// The entries, shorter prefixes first.
    pub entries: Vec<KernelEntry>,
}

impl KernelTable {
    /// The class of `port`.
    pub fn class_of(&self, port: u16) -> u16 {
        (self.port_bounds.partition_point(|&b| b <= port).max(1) - 1) as u16
    }

    /// What the hook answers for a connection to `ip:port` (longest prefix of its class).
    pub fn lookup(&self, ip: IpAddr, port: u16) -> Option<KernelOutcome> {
        let ip = ip.to_canonical();
        let class = self.class_of(port);
        let (width, value) = bits(ip);
        self.entries
            .iter()
            .filter(|e| {
                e.class == class
                    && bits(e.network).0 == width
                    && mask(value, e.prefix, width) == bits(e.network).1
            })
            .max_by_key(|e| e.prefix)
            .map(|e| e.outcome)
    }
}

/// The walk for a program the shim cannot reach; `allowed` says whether the node lets an
/// unprivileged program set a congestion control.
pub fn kernel_outcome(
    transports: impl Iterator<Item = crate::TransportChoice>,
    isolation: Isolation,
    allowed: impl Fn(CongestionControl) -> bool,
) -> KernelOutcome {
    let mut outcome = KernelOutcome {
        congestion_control: None,
        skipped_not_interposable: false,
        skipped_no_capability: false,
        isolation_forbids: false,
    };
    for choice in transports {
        match choice.stack {
            Stack::Userspace | Stack::Rdma => outcome.skipped_not_interposable = true,
            Stack::Kernel if isolation == Isolation::Dedicated => outcome.isolation_forbids = true,
            Stack::Kernel => match choice.congestion_control {
                CongestionControl::Default => return outcome,
                cc if allowed(cc) => {
                    outcome.congestion_control = Some(cc);
                    return outcome;
                }
                _ => outcome.skipped_no_capability = true,
            },
        }
    }
    if isolation == Isolation::Dedicated {
        outcome.isolation_forbids = true;
    }
    outcome
}

/// Builds `workload`'s table from `snapshot`.
pub fn kernel_table(
    snapshot: &Snapshot<'_>,
    workload: WorkloadId,
    allowed: impl Fn(CongestionControl) -> bool,
) -> KernelTable {
    let port_bounds = port_bounds(snapshot);
    let mut entries = Vec::new();
    for width in [32u8, 128] {
        let prefixes = prefixes(snapshot, width);
        // The answer each kept prefix gives, per class, for its descendants to compare with.
        let mut answers: BTreeMap<(u128, u8), Vec<KernelOutcome>> = BTreeMap::new();
        let mut sorted: Vec<(u128, u8)> = prefixes.iter().copied().collect();
        sorted.sort_unstable();
        let mut by_length: Vec<&(u128, u8)> = sorted.iter().collect();
        by_length.sort_by_key(|&&(network, prefix)| (prefix, network));
        for &(network, prefix) in by_length {
            let Some(at) = uncovered(&prefixes, &sorted, network, prefix, width) else {
                continue;
            };
            let ip = to_ip(at, width);
            let parent = (0..prefix)
                .rev()
                .map(|len| (mask(network, len, width), len))
                .find(|key| answers.contains_key(key));
            let mut own = Vec::with_capacity(port_bounds.len());
            for (class, &port) in port_bounds.iter().enumerate() {
                let decision = snapshot.decide(workload, ip, port, Protocol::Tcp, &mut NoTrace);
                let outcome = kernel_outcome(decision.transports(), decision.isolation, &allowed);
                let inherited = parent.map(|key| answers[&key][class]);
                if inherited != Some(outcome) {
                    entries.push(KernelEntry {
                        network: to_ip(network, width),
                        prefix,
                        class: class as u16,
                        outcome,
                    });
                }
                own.push(outcome);
            }
            answers.insert((network, prefix), own);
        }
    }
    KernelTable {
        port_bounds,
        entries,
    }
}

/// Every port where a rule's port range or a Service port begins or ends.
fn port_bounds(snapshot: &Snapshot<'_>) -> Vec<u16> {
    let mut bounds = BTreeSet::from([0u16]);
    let mut range = |first: u16, last: u16| {
        bounds.insert(first);
        if let Some(after) = last.checked_add(1) {
            bounds.insert(after);
        }
    };
    for record in snapshot.records(SectionId::Ports) {
        range(port::FIRST.get(record), port::LAST.get(record));
    }
    for record in snapshot.records(SectionId::Services) {
        let port = service::PORT.get(record);
        range(port, port);
    }
    bounds.into_iter().collect()
}

/// The prefixes of one address width the decision can depend on.
fn prefixes(snapshot: &Snapshot<'_>, width: u8) -> HashSet<(u128, u8)> {
    let mut out = HashSet::from([(0u128, 0u8)]);
    let family = if width == 32 { 4 } else { 6 };
    for id in [SectionId::ClusterNetworks, SectionId::Networks] {
        for record in snapshot.records(id).filter(|r| r.len() == cidr::LEN) {
            if cidr::FAMILY.get(record) == family {
                let prefix = cidr::PREFIX.get(record).min(width);
                let network = address(&cidr::IP.get(record), width);
                out.insert((mask(network, prefix, width), prefix));
            }
        }
    }
    if width == 32 {
        for record in snapshot.records(SectionId::Addresses4) {
            if address4::KIND.get(record) != EMPTY_SLOT {
                out.insert((u128::from(address4::IP.get(record)), 32));
            }
        }
    } else {
        for record in snapshot.records(SectionId::Addresses6) {
            out.insert((address(&address6::IP.get(record), 128), 128));
        }
    }
    for record in snapshot.records(SectionId::Services) {
        if service::FAMILY.get(record) == family {
            out.insert((address(&service::IP.get(record), width), width));
        }
    }
    out
}

/// An address of `network/prefix` in no longer prefix of the set, if there is one.
fn uncovered(
    set: &HashSet<(u128, u8)>,
    sorted: &[(u128, u8)],
    network: u128,
    prefix: u8,
    width: u8,
) -> Option<u128> {
    // Blocks to look at, each inside `network/prefix` and not covered by a set prefix longer
    // than `prefix` that contains it.
    let mut blocks = vec![(network, prefix)];
    while let Some((start, len)) = blocks.pop() {
        let covered = (prefix + 1..=len).any(|l| set.contains(&(mask(start, l, width), l)));
        if covered {
            continue;
        }
        let end = start | host_bits(len, width);
        let from = sorted.partition_point(|&(s, _)| s < start);
        let inside = sorted[from..]
            .iter()
            .take_while(|&&(s, _)| s <= end)
            .any(|&(_, l)| l > len);
        if !inside {
            return Some(start);
        }
        if len < width {
            let half = 1u128 << (width - len - 1);
            blocks.push((start | half, len + 1));
            blocks.push((start, len + 1));
        }
    }
    None
}

fn host_bits(prefix: u8, width: u8) -> u128 {
    if prefix >= width {
        0
    } else {
        (u128::MAX >> (128 - u32::from(width))) >> prefix
    }
}

fn mask(value: u128, prefix: u8, width: u8) -> u128 {
    value & !host_bits(prefix, width) & (u128::MAX >> (128 - u32::from(width)))
}

fn bits(ip: IpAddr) -> (u8, u128) {
    match ip {
        IpAddr::V4(v4) => (32, u128::from(u32::from(v4))),
        IpAddr::V6(v6) => (128, u128::from(v6)),
    }
}

fn to_ip(value: u128, width: u8) -> IpAddr {
    if width == 32 {
        IpAddr::V4(Ipv4Addr::from(value as u32))
    } else {
        IpAddr::V6(Ipv6Addr::from(value))
    }
}

/// A big-endian address of `width` bits from the first bytes of `bytes`.
fn address(bytes: &[u8], width: u8) -> u128 {
    let len = usize::from(width / 8);
    bytes[..len]
        .iter()
        .fold(0u128, |acc, &b| (acc << 8) | u128::from(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_split_at_every_bound() {
        let table = KernelTable {
            port_bounds: vec![0, 80, 81, 1000],
            entries: vec![],
        };
        assert_eq!(table.class_of(0), 0);
        assert_eq!(table.class_of(79), 0);
        assert_eq!(table.class_of(80), 1);
        assert_eq!(table.class_of(81), 2);
        assert_eq!(table.class_of(65535), 3);
    }

    #[test]
    fn an_uncovered_address_avoids_longer_prefixes() {
        let set: HashSet<(u128, u8)> = [(0, 0), (0x0a00_0000, 31), (0x0a00_0002, 32)].into();
        let mut sorted: Vec<_> = set.iter().copied().collect();
        sorted.sort_unstable();
        // 10.0.0.0/30 minus 10.0.0.0/31 and 10.0.0.2/32: 10.0.0.3.
        let mut with = set.clone();
        with.insert((0x0a00_0000, 30));
        let mut sorted_with: Vec<_> = with.iter().copied().collect();
        sorted_with.sort_unstable();
        assert_eq!(
            uncovered(&with, &sorted_with, 0x0a00_0000, 30, 32),
            Some(0x0a00_0003)
        );
        // A /31 made of two /32s has none of its own.
        let full: HashSet<(u128, u8)> = [(4, 31), (4, 32), (5, 32)].into();
        let mut sorted_full: Vec<_> = full.iter().copied().collect();
        sorted_full.sort_unstable();
        assert_eq!(uncovered(&full, &sorted_full, 4, 31, 32), None);
        assert_eq!(uncovered(&set, &sorted, 0, 0, 32), Some(0));
    }

    #[test]
    fn the_walk_skips_what_the_kernel_cannot_run() {
        use crate::TransportChoice;
        let choice = |stack, congestion_control| TransportChoice {
            stack,
            congestion_control,
        };
        let list = [
            choice(Stack::Userspace, CongestionControl::Bbr),
            choice(Stack::Kernel, CongestionControl::Cubic),
            choice(Stack::Kernel, CongestionControl::Bbr),
        ];
        let only_bbr = |cc| cc == CongestionControl::Bbr;
        let outcome = kernel_outcome(list.into_iter(), Isolation::None, only_bbr);
        assert_eq!(outcome.congestion_control, Some(CongestionControl::Bbr));
        assert!(outcome.skipped_not_interposable && outcome.skipped_no_capability);
        let dedicated = kernel_outcome(list.into_iter(), Isolation::Dedicated, only_bbr);
        assert_eq!(dedicated.congestion_control, None);
        assert!(dedicated.isolation_forbids);
    }
}
