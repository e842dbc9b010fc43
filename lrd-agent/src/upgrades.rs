//! The RDMA upgrade attempts shims report (`shimReport`'s `upgrades`), kept for `stackroute
//! connections` the way SMC-R's `smcss` shows why a connection stayed on TCP.
//!
//! Any local process may report, so what is kept is bounded three ways: a report keeps at most
//! [`MAX_UPGRADE_REPORT`] attempts (its newest), every string at most [`MAX_STRING`] bytes
//! with control characters replaced (they end up on an administrator's terminal), and the log
//! at most [`CAPACITY`] records, the oldest dropped first. An answer holds the newest records
//! that fit in one frame.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};

use stackroute_local_api::frame::MAX_FRAME;
use stackroute_local_api::message::{MAX_UPGRADE_REPORT, UpgradeAttempt, UpgradeRecord};
use stackroute_rdma_upgrade::Reason;

/// Records kept per agent.
pub const CAPACITY: usize = 512;
/// Longest string kept (addresses, reasons), in bytes.
pub const MAX_STRING: usize = 128;
/// Room left in a frame for `{"kind":"upgrades","attempts":[…]}` around the records.
const ENVELOPE: usize = 64;

/// `reason` if it names a reason of `stackroute-rdma-upgrade`, else `other`: only those are
/// metric labels, so a shim cannot grow the label set.
pub fn reason_label(reason: &str) -> &'static str {
    if reason == stackroute_rdma_upgrade::UPGRADED {
        return stackroute_rdma_upgrade::UPGRADED;
    }
    Reason::from_name(reason).unwrap_or(Reason::Other).as_str()
}

/// What [`sanitize`] cut from a report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Trimmed {
    /// Attempts beyond [`MAX_UPGRADE_REPORT`], dropped (the oldest of the report).
    pub attempts: usize,
    /// Strings cut to [`MAX_STRING`] bytes or with control characters replaced.
    pub strings: usize,
}

/// Bounds a report: its newest [`MAX_UPGRADE_REPORT`] attempts, every string bounded.
pub fn sanitize(mut attempts: Vec<UpgradeAttempt>) -> (Vec<UpgradeAttempt>, Trimmed) {
    let mut trimmed = Trimmed::default();
    if attempts.len() > MAX_UPGRADE_REPORT {
        trimmed.attempts = attempts.len() - MAX_UPGRADE_REPORT;
        attempts.drain(..trimmed.attempts);
    }
    for attempt in &mut attempts {
        for text in [&mut attempt.local, &mut attempt.remote, &mut attempt.reason]
            .into_iter()
            .chain(attempt.peer_reason.as_mut())
        {
            if bound(text) {
                trimmed.strings += 1;
            }
        }
    }
    (attempts, trimmed)
}

/// Cuts `text` to [`MAX_STRING`] bytes (on a character boundary) and replaces control
/// characters with `?`; whether it changed anything.
fn bound(text: &mut String) -> bool {
    let mut changed = false;
    if text.len() > MAX_STRING {
        let mut end = MAX_STRING;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        changed = true;
    }
    if text.chars().any(char::is_control) {
        *text = text
            .chars()
            .map(|c| if c.is_control() { '?' } else { c })
            .collect();
        changed = true;
    }
    changed
}

/// The newest records, oldest first, at most `capacity`.
#[derive(Debug)]
pub struct UpgradeLog {
    records: Mutex<VecDeque<UpgradeRecord>>,
    capacity: usize,
}

impl Default for UpgradeLog {
    fn default() -> Self {
        Self::with_capacity(CAPACITY)
    }
}

impl UpgradeLog {
    /// A log of at most `capacity` records (at least one).
    pub fn with_capacity(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            records: Mutex::new(VecDeque::with_capacity(capacity.min(CAPACITY))),
            capacity,
        }
    }

    /// Appends `records`, dropping the oldest beyond the capacity; how many were dropped.
    pub fn extend(&self, records: impl IntoIterator<Item = UpgradeRecord>) -> usize {
        // Every critical section leaves a consistent deque, so poisoning is ignored.
        let mut kept = self.records.lock().unwrap_or_else(PoisonError::into_inner);
        let mut dropped = 0;
        for record in records {
            if kept.len() == self.capacity {
                kept.pop_front();
                dropped += 1;
            }
            kept.push_back(record);
        }
        dropped
    }

    /// Every record kept, oldest first.
    pub fn all(&self) -> Vec<UpgradeRecord> {
        let kept = self.records.lock().unwrap_or_else(PoisonError::into_inner);
        kept.iter().cloned().collect()
    }

    /// The newest records whose JSON fits in one reply frame, oldest first: 512 records of
    /// bounded strings can exceed [`MAX_FRAME`], and a reply that does not encode would lose
    /// them all.
    pub fn answer(&self) -> Vec<UpgradeRecord> {
        let kept = self.records.lock().unwrap_or_else(PoisonError::into_inner);
        let mut budget = MAX_FRAME - ENVELOPE;
        let mut newest = Vec::new();
        for record in kept.iter().rev() {
            // +1 for the separating comma.
            let size = serde_json::to_vec(record).map_or(usize::MAX, |json| json.len() + 1);
            if size > budget {
                break;
            }
            budget -= size;
            newest.push(record.clone());
        }
        newest.reverse();
        newest
    }
}

#[cfg(test)]
mod tests {
    use stackroute_local_api::message::{Response, UpgradeRole};

    use super::*;

    fn attempt(n: u64) -> UpgradeAttempt {
        UpgradeAttempt {
            role: UpgradeRole::Client,
            local: format!("10.0.0.1:{n}"),
            remote: "10.0.0.2:7000".into(),
            reason: "peer-declined".into(),
            peer_reason: Some("no-device".into()),
            elapsed_us: n,
        }
    }

    fn record(n: u64) -> UpgradeRecord {
        UpgradeRecord {
            attempt: attempt(n),
            workload: Some("shop/web".into()),
            pid: Some(42),
            at_unix_ms: 1_700_000_000_000 + n,
        }
    }

    fn elapsed(records: &[UpgradeRecord]) -> Vec<u64> {
        records.iter().map(|r| r.attempt.elapsed_us).collect()
    }

    #[test]
    fn the_log_keeps_the_newest_in_order_and_drops_the_oldest() {
        let log = UpgradeLog::with_capacity(3);
        assert!(log.all().is_empty());
        assert_eq!(log.extend([record(1), record(2)]), 0);
        assert_eq!(elapsed(&log.all()), [1, 2]);
        assert_eq!(log.extend([record(3), record(4)]), 1);
        assert_eq!(elapsed(&log.all()), [2, 3, 4]);
        assert_eq!(log.extend((5..=9).map(record)), 5);
        assert_eq!(elapsed(&log.all()), [7, 8, 9]);
        assert_eq!(elapsed(&log.answer()), [7, 8, 9]);
    }

    #[test]
    fn the_default_log_is_bounded_at_its_capacity() {
        let log = UpgradeLog::default();
        let total = CAPACITY as u64 + 100;
        assert_eq!(log.extend((0..total).map(record)), 100);
        let all = log.all();
        assert_eq!(all.len(), CAPACITY);
        assert_eq!(all.first().unwrap().attempt.elapsed_us, 100);
        assert_eq!(all.last().unwrap().attempt.elapsed_us, total - 1);
    }

    #[test]
    fn an_answer_holds_the_newest_records_that_fit_in_a_frame() {
        let log = UpgradeLog::default();
        let big = |n: u64| {
            let mut r = record(n);
            r.attempt.local = "l".repeat(MAX_STRING);
            r.attempt.remote = "r".repeat(MAX_STRING);
            r.attempt.reason = "x".repeat(MAX_STRING);
            r.attempt.peer_reason = Some("y".repeat(MAX_STRING));
            r
        };
        log.extend((0..CAPACITY as u64).map(big));
        let answer = log.answer();
        assert!(!answer.is_empty() && answer.len() < CAPACITY);
        assert_eq!(
            answer.last().unwrap().attempt.elapsed_us,
            CAPACITY as u64 - 1
        );
        let reply = Response::Upgrades { attempts: answer };
        stackroute_local_api::frame::encode(&reply).expect("the answer fits in a frame");
    }

    #[test]
    fn a_report_is_cut_to_its_newest_attempts_and_bounded_strings() {
        let (kept, trimmed) = sanitize((0..MAX_UPGRADE_REPORT as u64 + 10).map(attempt).collect());
        assert_eq!(kept.len(), MAX_UPGRADE_REPORT);
        assert_eq!(kept[0].elapsed_us, 10);
        assert_eq!(
            trimmed,
            Trimmed {
                attempts: 10,
                strings: 0
            }
        );

        let mut long = attempt(1);
        // A multi-byte character across the limit is cut before it, not in half.
        long.local = format!("{}é{}", "a".repeat(MAX_STRING - 1), "b".repeat(1000));
        long.reason = "no-device\x1b[2J".into();
        long.peer_reason = Some("p".repeat(MAX_STRING + 1));
        let (kept, trimmed) = sanitize(vec![long, attempt(2)]);
        assert_eq!(kept[0].local, "a".repeat(MAX_STRING - 1));
        assert_eq!(kept[0].reason, "no-device?[2J");
        assert_eq!(
            kept[0].peer_reason.as_deref(),
            Some(&*"p".repeat(MAX_STRING))
        );
        assert_eq!(kept[1], attempt(2));
        assert_eq!(
            trimmed,
            Trimmed {
                attempts: 0,
                strings: 3
            }
        );
    }

    #[test]
    fn only_known_reasons_are_labels() {
        assert_eq!(reason_label("peer-declined"), "peer-declined");
        assert_eq!(reason_label("stack-unavailable"), "stack-unavailable");
        assert_eq!(reason_label("made-up"), "other");
        assert_eq!(reason_label("upgraded"), "upgraded");
        assert_eq!(reason_label(""), "other");
    }
}
