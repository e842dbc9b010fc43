//! What each side does with what it received.

use crate::{DecodeError, Endpoint, Kind, Message, Prefix, Reason};

/// How an exchange ended for one side, as it is recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// This side's reason (`PeerDeclined` when the peer said no).
    pub reason: Reason,
    /// The peer's own reason, when it sent one.
    pub peer: Option<Reason>,
}

impl Outcome {
    /// A reason of this side's own.
    pub fn local(reason: Reason) -> Self {
        Self { reason, peer: None }
    }
}

/// The server's answer to a proposal: accept with its endpoint when it can (`local`), else
/// decline with why not.
pub fn server_answer(proposal: &Message, local: Result<Endpoint, Reason>) -> Message {
    if proposal.kind != Kind::Proposal {
        return Message::decline(proposal.nonce, Reason::Other);
    }
    match local {
        Ok(endpoint) => Message::new(Kind::Accept, proposal.nonce).with_endpoint(endpoint),
        Err(reason) => Message::decline(proposal.nonce, reason),
    }
}

/// What the server's answer leads the client to, for the bytes now at the front of its stream
/// (peeked, up to a message's length).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientNext {
    /// Nothing, or half a message: wait (until the deadline).
    Wait,
    /// Accepted: connect to the server's endpoint, then confirm (or decline with why not).
    /// The answer's bytes are consumed.
    Connect(Endpoint),
    /// No upgrade. `consume`: whether the front of the stream is the answer (read it away) or
    /// the server's application data (leave it). Unless the server declined, tell it with a
    /// decline for `outcome.reason`.
    Fallback { outcome: Outcome, consume: bool },
}

/// The client's next step in exchange `nonce`, given the front of its stream.
pub fn client_next(nonce: u64, front: &[u8]) -> ClientNext {
    match crate::classify(front) {
        Prefix::Empty | Prefix::Partial => ClientNext::Wait,
        // The server's application spoke first: the server will never answer.
        Prefix::NotOurs => ClientNext::Fallback {
            outcome: Outcome {
                reason: Reason::PeerDeclined,
                peer: Some(Reason::SpokeFirst),
            },
            consume: false,
        },
        Prefix::Complete => {
            let fallback = |reason, peer| ClientNext::Fallback {
                outcome: Outcome { reason, peer },
                consume: true,
            };
            match Message::decode(front) {
                Ok(answer) if answer.nonce != nonce => fallback(Reason::Other, None),
                Ok(Message {
                    kind: Kind::Accept,
                    endpoint,
                    ..
                }) => ClientNext::Connect(endpoint),
                Ok(Message {
                    kind: Kind::Decline,
                    reason,
                    ..
                }) => fallback(Reason::PeerDeclined, reason),
                Ok(_) => fallback(Reason::Other, None),
                Err(DecodeError::Version(_)) => fallback(Reason::VersionMismatch, None),
                Err(_) => fallback(Reason::Other, None),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MESSAGE_LEN;

    fn endpoint() -> Endpoint {
        Endpoint {
            gid: [9; 16],
            qpn: 17,
            psn: 99,
        }
    }

    #[test]
    fn the_server_accepts_only_when_it_can() {
        let proposal = Message::new(Kind::Proposal, 5).with_endpoint(endpoint());
        let accept = server_answer(&proposal, Ok(endpoint()));
        assert_eq!(
            (accept.kind, accept.nonce, accept.endpoint),
            (Kind::Accept, 5, endpoint())
        );
        for reason in [Reason::NoDevice, Reason::NoGid, Reason::Memlock] {
            let decline = server_answer(&proposal, Err(reason));
            assert_eq!(
                (decline.kind, decline.reason),
                (Kind::Decline, Some(reason))
            );
        }
        let confirm = Message::new(Kind::Confirm, 5);
        assert_eq!(server_answer(&confirm, Ok(endpoint())).kind, Kind::Decline);
    }

    #[test]
    fn the_client_reads_every_answer() {
        let nonce = 77;
        let accept = Message::new(Kind::Accept, nonce)
            .with_endpoint(endpoint())
            .encode();
        assert_eq!(client_next(nonce, &accept), ClientNext::Connect(endpoint()));
        assert_eq!(client_next(nonce, &accept[..20]), ClientNext::Wait);
        assert_eq!(client_next(nonce, &[]), ClientNext::Wait);
        let decline = Message::decline(nonce, Reason::Memlock).encode();
        assert_eq!(
            client_next(nonce, &decline),
            ClientNext::Fallback {
                outcome: Outcome {
                    reason: Reason::PeerDeclined,
                    peer: Some(Reason::Memlock)
                },
                consume: true
            }
        );
        // Another exchange's answer, or a future version's: consumed, not trusted.
        assert!(matches!(
            client_next(nonce + 1, &accept),
            ClientNext::Fallback {
                outcome: Outcome {
                    reason: Reason::Other,
                    ..
                },
                consume: true
            }
        ));
        let mut newer = accept;
        newer[8] = 2;
        assert!(matches!(
            client_next(nonce, &newer),
            ClientNext::Fallback {
                outcome: Outcome {
                    reason: Reason::VersionMismatch,
                    ..
                },
                consume: true
            }
        ));
        // The server's application data: left in the stream.
        let data = [b'x'; MESSAGE_LEN];
        assert_eq!(
            client_next(nonce, &data),
            ClientNext::Fallback {
                outcome: Outcome {
                    reason: Reason::PeerDeclined,
                    peer: Some(Reason::SpokeFirst)
                },
                consume: false
            }
        );
    }
}
