//! The compiled per-node policy snapshot: a compact, versioned, checksummed binary table that
//! the controller builds, the node agent stores and memory-maps, and the shim searches in place
//! on every `connect()` — without allocating and without a syscall.
//!
//! Layers, top down:
//! - [`Snapshot`] ([`view`]): validates a byte slice once (magic, version, checksum, every
//!   offset and enum byte, and every derived table recomputed from the data it summarises) and
//!   then answers [`Snapshot::decide`]: a hash probe finds the destination in the address book,
//!   and a forward walk of the source workload's ordered chain skips policies and rules on
//!   small filter records (32 bytes per policy, 24 per rule) before checking what is left in
//!   full; a long chain is not walked but looked up in its index ([`chain_index`]: the rules
//!   that can match an identity, an IPv4 interval, any destination), and a Service's backend
//!   groups are decided in one walk. Corrupt or truncated input is an error, never a panic.
//! - [`encode`]: turns plain owned tables ([`SharedInput`], [`NodeInput`]) into bytes. Tables
//!   common to every node (address book, services, identity sets) are encoded once into
//!   [`SharedTables`] and copied into each node's snapshot.
//! - [`format`]: the byte layout, in one place.
//!
//! One matching implementation serves everyone: the shim's hot path calls `decide` with
//! [`NoTrace`], and `stackroute explain` calls it with a [`Trace`] that records why each rule
//! did or did not match. No I/O, no clock reads.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod chain_index;
pub mod delta;
pub mod encode;
pub mod format;
pub mod kernel_table;
pub mod view;

pub use encode::{
    AddressEntry, AddressKind, NodeEntry, NodeInput, NodeTables, PeerEntry, PolicyEntry, PortEntry,
    RuleEntry, RuleGate, SectionInterner, ServiceEntry, SharedInput, SharedTables, SnapshotParts,
    WorkloadEntry, assemble, encode, encode_node_tables,
};
pub use view::{
    Decision, DecodeError, DestinationClass, Mismatch, NoTrace, PolicyView, RuleRef, RuleView,
    SERVICE_VERDICT_DECISIONS, Snapshot, Trace, Verdict, Via, WorkloadId,
};

use std::net::IpAddr;

macro_rules! byte_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $value:literal => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[repr(u8)]
        pub enum $name { $($(#[$vmeta])* $variant = $value),+ }

        impl $name {
            /// Decodes the byte stored in a snapshot.
            pub fn from_byte(byte: u8) -> Option<Self> {
                match byte { $($value => Some(Self::$variant),)+ _ => None }
            }

            /// The name used in the API and in `explain` output.
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text),+ }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

byte_enum!(
    /// A network stack a connection can run on.
    Stack { /** Linux kernel TCP/IP. */ Kernel = 0 => "Kernel", /** stackroute's user-space TCP/IP. */ Userspace = 1 => "Userspace", /** RDMA (RoCE). */ Rdma = 2 => "RDMA" }
);
byte_enum!(
    /// TCP congestion control.
    CongestionControl { /** The stack's default. */ Default = 0 => "Default", /** CUBIC. */ Cubic = 1 => "Cubic", /** BBR. */ Bbr = 2 => "BBR", /** Reno/NewReno. */ Reno = 3 => "Reno" }
);
byte_enum!(
    /// Where a destination is, seen from the source.
    Location { /** Same node. */ SameNode = 0 => "SameNode", /** Same zone, other node. */ SameZone = 1 => "SameZone", /** In the cluster, other zone. */ SameCluster = 2 => "SameCluster", /** Outside the cluster. */ External = 3 => "External" }
);
byte_enum!(
    /// A rule's location constraint; nested, `SameNode` ⊂ `SameZone` ⊂ `SameCluster`.
    LocationMatch { /** Only `SameNode`. */ SameNode = 0 => "SameNode", /** `SameNode` or `SameZone`. */ SameZone = 1 => "SameZone", /** Anything but `External`. */ SameCluster = 2 => "SameCluster", /** Only `External`. */ External = 3 => "External", /** Everything. */ Any = 4 => "Any" }
);
byte_enum!(
    /// The guarantee a rule's connections need from their stack.
    Isolation { /** Any stack. */ None = 0 => "None", /** Kernel stacks only. */ KernelEnforced = 1 => "KernelEnforced", /** Device-backed or per-pod stack, no kernel fallback. */ Dedicated = 2 => "Dedicated" }
);
byte_enum!(
    /// Transport protocol.
    Protocol { /** TCP. */ Tcp = 6 => "TCP", /** UDP. */ Udp = 17 => "UDP" }
);
byte_enum!(
    /// What a matching rule does.
    Action { /** Decide the transport. */ Route = 0 => "Route", /** End the tier. */ Pass = 1 => "Pass" }
);
byte_enum!(
    /// Label-less destination classes.
    Entity { /** Outside the cluster. */ World = 0 => "World", /** Inside the cluster. */ Cluster = 1 => "Cluster" }
);
byte_enum!(
    /// Evaluation tier of a policy; tiers are evaluated in this order.
    Tier { /** ClusterStackRoute tier Admin. */ Admin = 0 => "Admin", /** StackRoutes of the source's namespace. */ Namespace = 1 => "Namespace", /** ClusterStackRoute tier Baseline. */ Baseline = 2 => "Baseline" }
);
byte_enum!(
    /// Which resource a policy came from.
    PolicyKind { /** Namespaced StackRoute. */ StackRoute = 0 => "StackRoute", /** ClusterStackRoute. */ ClusterStackRoute = 1 => "ClusterStackRoute" }
);

impl CongestionControl {
    /// The Linux kernel's name for it (`TCP_CONGESTION`); `None` for the default, which
    /// leaves a socket as it is.
    pub fn kernel_name(self) -> Option<&'static str> {
        match self {
            Self::Default => None,
            Self::Cubic => Some("cubic"),
            Self::Bbr => Some("bbr"),
            Self::Reno => Some("reno"),
        }
    }

    /// The congestion control the kernel calls `name`.
    pub fn from_kernel_name(name: &str) -> Option<Self> {
        [Self::Cubic, Self::Bbr, Self::Reno]
            .into_iter()
            .find(|cc| cc.kernel_name() == Some(name))
    }
}

impl LocationMatch {
    /// Whether a destination at `location` satisfies this constraint.
    pub fn admits(self, location: Location) -> bool {
        match self {
            Self::SameNode => location == Location::SameNode,
            Self::SameZone => matches!(location, Location::SameNode | Location::SameZone),
            Self::SameCluster => location != Location::External,
            Self::External => location == Location::External,
            Self::Any => true,
        }
    }
}

impl Entity {
    /// Whether a destination at `location` belongs to this entity.
    pub fn admits(self, location: Location) -> bool {
        match self {
            Self::World => location == Location::External,
            Self::Cluster => location != Location::External,
        }
    }
}

/// A stack and its congestion control: one entry of a decision's ordered transport list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TransportChoice {
    /// The stack.
    pub stack: Stack,
    /// Its congestion control.
    pub congestion_control: CongestionControl,
}

impl TransportChoice {
    /// Plain kernel TCP with the node's default congestion control: the last resort.
    pub const KERNEL_DEFAULT: Self = Self {
        stack: Stack::Kernel,
        congestion_control: CongestionControl::Default,
    };
}

impl std::fmt::Display for TransportChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.stack, self.congestion_control)
    }
}

/// An IPv4 or IPv6 network.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    /// Network address (host bits may be set; they are ignored when matching).
    pub address: IpAddr,
    /// Prefix length: at most 32 for IPv4, 128 for IPv6.
    pub prefix: u8,
}

impl Cidr {
    /// Whether `ip` lies in this network. IPv4 never matches an IPv6 network or the reverse.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.address, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix.min(32)))
                    .unwrap_or(0);
                (u32::from(net) ^ u32::from(ip)) & mask == 0
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix.min(128)))
                    .unwrap_or(0);
                (u128::from(net) ^ u128::from(ip)) & mask == 0
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (address, prefix) = text
            .split_once('/')
            .ok_or_else(|| format!("{text:?} is not a CIDR: expected ADDRESS/PREFIX"))?;
        let address: IpAddr = address
            .parse()
            .map_err(|_| format!("{text:?} is not a CIDR: bad address"))?;
        let max = if address.is_ipv4() { 32 } else { 128 };
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("{text:?} is not a CIDR: prefix must be 0..={max}"))?;
        Ok(Self { address, prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix)
    }
}

/// Identity id meaning "not a pod" (node addresses).
pub const NO_IDENTITY: u32 = u32::MAX;
/// Zone id meaning "the node has no zone label".
pub const NO_ZONE: u32 = u32::MAX;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_contains_respects_prefix_and_family() {
        let net: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(net.contains("10.1.255.3".parse().unwrap()));
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        assert!(!net.contains("::ffff:10.1.0.1".parse().unwrap()));
        let odd: Cidr = "192.168.0.0/23".parse().unwrap();
        assert!(odd.contains("192.168.1.9".parse().unwrap()));
        assert!(!odd.contains("192.168.2.9".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!(!v6.contains("fe80::1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("10.0.0.0".parse::<Cidr>().is_err());
    }

    #[test]
    fn location_constraints_nest() {
        use Location::*;
        let all = [SameNode, SameZone, SameCluster, External];
        let admitted = |m: LocationMatch| all.iter().filter(|l| m.admits(**l)).count();
        assert_eq!(admitted(LocationMatch::SameNode), 1);
        assert_eq!(admitted(LocationMatch::SameZone), 2);
        assert_eq!(admitted(LocationMatch::SameCluster), 3);
        assert_eq!(admitted(LocationMatch::Any), 4);
        assert!(
            LocationMatch::External.admits(External) && !LocationMatch::External.admits(SameNode)
        );
    }
}
