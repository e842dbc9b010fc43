//! Who may speak to the controller, as named in client certificates (SPIFFE-style URI SANs)
//! and in the audience of the agents' Kubernetes service-account tokens.

/// The audience of the token an agent presents in Kubernetes: a token for the API server (or
/// any other audience) is refused.
pub const AGENT_AUDIENCE: &str = "stackroute.dev/agent";

/// The URI prefix of a node's identity; the node name follows.
pub const NODE_URI_PREFIX: &str = "spiffe://stackroute.dev/node/";

/// The URI of an administrator (`stackroute status`, operators' tools): may read status, may
/// not act for a node.
pub const ADMIN_URI: &str = "spiffe://stackroute.dev/admin";

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Caller {
    /// The agent of one node: may watch, ack, report and register only as that node.
    Node(String),
    /// An administrator: may read status.
    Admin,
}

impl Caller {
    /// The URI naming this caller in a certificate.
    pub fn uri(&self) -> String {
        match self {
            Self::Node(node) => format!("{NODE_URI_PREFIX}{node}"),
            Self::Admin => ADMIN_URI.to_string(),
        }
    }

    /// The caller a certificate URI names, if it is one of ours.
    pub fn from_uri(uri: &str) -> Option<Self> {
        if uri == ADMIN_URI {
            return Some(Self::Admin);
        }
        let node = uri.strip_prefix(NODE_URI_PREFIX)?;
        crate::validate::check_name("node", node).ok()?;
        Some(Self::Node(node.to_string()))
    }
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Node(node) => write!(f, "node {node}"),
            Self::Admin => f.write_str("admin"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_round_trip_and_foreign_ones_are_not_callers() {
        for caller in [Caller::Node("node-a1".into()), Caller::Admin] {
            assert_eq!(Caller::from_uri(&caller.uri()), Some(caller));
        }
        for uri in [
            "spiffe://stackroute.dev/node/",
            "spiffe://stackroute.dev/node/a/b",
            "spiffe://other.dev/node/a",
            "spiffe://stackroute.dev/admin/x",
        ] {
            assert_eq!(Caller::from_uri(uri), None, "{uri}");
        }
    }
}
