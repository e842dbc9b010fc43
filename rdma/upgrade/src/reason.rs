//! Why an upgrade did not happen: one code on the wire (a decline's reason) and one name in
//! counters, `stackroute connections` and the shim's debug log.

/// Why a connection stays on TCP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// This end's policy does not put the connection on RDMA.
    Policy,
    /// No RDMA device here (no RDMA subsystem, no device in the pod, `/dev/infiniband` absent).
    NoDevice,
    /// A device, but no active port with a usable GID.
    NoGid,
    /// The locked-memory limit is too low to register the connection's buffers.
    Memlock,
    /// The exchange or the RDMA connect missed the deadline.
    ConnectTimeout,
    /// The RDMA connect or a verbs call failed.
    RdmaError,
    /// The peer declined (its reason travels separately).
    PeerDeclined,
    /// The peer speaks another version of the exchange.
    VersionMismatch,
    /// The server's application wrote before the proposal arrived: answering would put bytes
    /// after its data.
    SpokeFirst,
    /// This build has no RDMA data path (negotiation only).
    StackUnavailable,
    /// Anything else (an unknown code from a newer peer reads as this).
    Other,
}

impl Reason {
    /// Every reason.
    pub const ALL: [Self; 11] = [
        Self::Policy,
        Self::NoDevice,
        Self::NoGid,
        Self::Memlock,
        Self::ConnectTimeout,
        Self::RdmaError,
        Self::PeerDeclined,
        Self::VersionMismatch,
        Self::SpokeFirst,
        Self::StackUnavailable,
        Self::Other,
    ];

    /// Its code in a decline.
    pub fn code(self) -> u16 {
        match self {
            Self::Policy => 1,
            Self::NoDevice => 2,
            Self::NoGid => 3,
            Self::Memlock => 4,
            Self::ConnectTimeout => 5,
            Self::RdmaError => 6,
            Self::PeerDeclined => 7,
            Self::VersionMismatch => 8,
            Self::SpokeFirst => 9,
            Self::StackUnavailable => 10,
            Self::Other => 0xffff,
        }
    }

    /// The reason a code names (`Other` for one this build does not know).
    pub fn from_code(code: u16) -> Self {
        Self::ALL
            .into_iter()
            .find(|reason| reason.code() == code)
            .unwrap_or(Self::Other)
    }

    /// Its name (kebab-case, as counters and the CLI show it).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Policy => "policy",
            Self::NoDevice => "no-device",
            Self::NoGid => "no-gid",
            Self::Memlock => "memlock",
            Self::ConnectTimeout => "connect-timeout",
            Self::RdmaError => "rdma-error",
            Self::PeerDeclined => "peer-declined",
            Self::VersionMismatch => "version-mismatch",
            Self::SpokeFirst => "spoke-first",
            Self::StackUnavailable => "stack-unavailable",
            Self::Other => "other",
        }
    }

    /// The reason a name names.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|reason| reason.as_str() == name)
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_names_are_distinct_and_round_trip() {
        for reason in Reason::ALL {
            assert_eq!(Reason::from_code(reason.code()), reason);
            assert_eq!(Reason::from_name(reason.as_str()), Some(reason));
        }
        let codes: std::collections::HashSet<_> = Reason::ALL.iter().map(|r| r.code()).collect();
        assert_eq!(codes.len(), Reason::ALL.len());
        assert_eq!(Reason::from_code(0), Reason::Other);
    }
}
