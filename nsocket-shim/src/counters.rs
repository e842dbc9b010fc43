//! Per-process counters of decisions (by the transport used) and fallbacks (by reason), and
//! their report to the agent: at exit, and from a decision at most once a second. The shim
//! starts no thread of its own.
#![deny(unsafe_code)]

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use stackroute_local_api::message::{
    self, DecisionCount, FallbackCount, FallbackReason, MAX_UPGRADE_REPORT, UpgradeAttempt,
};
use stackroute_snapshot::{CongestionControl, Stack};

const STACKS: [Stack; 3] = [Stack::Kernel, Stack::Userspace, Stack::Rdma];
const CCS: [CongestionControl; 4] = [
    CongestionControl::Default,
    CongestionControl::Cubic,
    CongestionControl::Bbr,
    CongestionControl::Reno,
];
const REASONS: usize = FallbackReason::ALL.len();

static DECISIONS: [AtomicU64; 12] = [const { AtomicU64::new(0) }; 12];
static FALLBACKS: [AtomicU64; REASONS] = [const { AtomicU64::new(0) }; REASONS];
/// Coarse monotonic second of the last report (0: none yet).
static LAST_REPORT: AtomicU64 = AtomicU64::new(0);
/// RDMA upgrade attempts not reported yet (at most [`MAX_UPGRADE_REPORT`]; more are dropped,
/// their reasons still counted).
static UPGRADES: Mutex<Vec<UpgradeAttempt>> = Mutex::new(Vec::new());

/// Keeps an RDMA upgrade attempt for the next report. Off every data path (an attempt costs
/// round trips); `try_lock`, so a hook that interrupted another never waits for it.
pub(crate) fn upgrade_attempt(attempt: UpgradeAttempt) {
    if let Ok(mut kept) = UPGRADES.try_lock()
        && kept.len() < MAX_UPGRADE_REPORT
    {
        kept.push(attempt);
    }
}

fn decision_slot(stack: Stack, cc: CongestionControl) -> usize {
    stack as usize * CCS.len() + cc as usize
}

/// Counts a connection decided onto `stack`/`cc`.
pub(crate) fn decided(stack: Stack, cc: CongestionControl) {
    DECISIONS[decision_slot(stack, cc)].fetch_add(1, Ordering::Relaxed);
}

/// Counts a fallback.
pub(crate) fn fell_back(reason: FallbackReason) {
    let index = FallbackReason::ALL
        .iter()
        .position(|r| *r == reason)
        .unwrap_or(REASONS - 1);
    FALLBACKS[index].fetch_add(1, Ordering::Relaxed);
}

fn api_stack(stack: Stack) -> message::Stack {
    match stack {
        Stack::Kernel => message::Stack::Kernel,
        Stack::Userspace => message::Stack::Userspace,
        Stack::Rdma => message::Stack::Rdma,
    }
}

/// Takes every non-zero counter (resetting it) as a report, or `None` when all are zero.
pub(crate) fn take() -> Option<message::Request> {
    let mut decisions = Vec::new();
    for stack in STACKS {
        for cc in CCS {
            let count = DECISIONS[decision_slot(stack, cc)].swap(0, Ordering::Relaxed);
            if count > 0 {
                decisions.push(DecisionCount {
                    stack: api_stack(stack),
                    congestion_control: cc.as_str().into(),
                    count,
                });
            }
        }
    }
    let mut fallbacks = Vec::new();
    for (reason, counter) in FallbackReason::ALL.iter().zip(&FALLBACKS) {
        let count = counter.swap(0, Ordering::Relaxed);
        if count > 0 {
            fallbacks.push(FallbackCount {
                reason: *reason,
                count,
            });
        }
    }
    let upgrades = UPGRADES
        .try_lock()
        .map(|mut kept| std::mem::take(&mut *kept))
        .unwrap_or_default();
    (!decisions.is_empty() || !fallbacks.is_empty() || !upgrades.is_empty()).then_some(
        message::Request::ShimReport {
            decisions,
            fallbacks,
            upgrades,
        },
    )
}

/// Puts back the counts of a report that could not be delivered.
pub(crate) fn restore(report: &message::Request) {
    let message::Request::ShimReport {
        decisions,
        fallbacks,
        upgrades,
    } = report
    else {
        return;
    };
    for attempt in upgrades {
        upgrade_attempt(attempt.clone());
    }
    for d in decisions {
        let stack = STACKS
            .into_iter()
            .find(|s| api_stack(*s) == d.stack)
            .unwrap_or(Stack::Kernel);
        let cc = CCS
            .into_iter()
            .find(|c| c.as_str() == d.congestion_control)
            .unwrap_or(CongestionControl::Default);
        DECISIONS[decision_slot(stack, cc)].fetch_add(d.count, Ordering::Relaxed);
    }
    for f in fallbacks {
        fell_back_by(f.reason, f.count);
    }
}

fn fell_back_by(reason: FallbackReason, count: u64) {
    if let Some(index) = FallbackReason::ALL.iter().position(|r| *r == reason) {
        FALLBACKS[index].fetch_add(count, Ordering::Relaxed);
    }
}

/// Whether a report is due at coarse second `now` (at most one a second); claims it if so.
pub(crate) fn report_due(now: u64) -> bool {
    let last = LAST_REPORT.load(Ordering::Relaxed);
    if last == 0 {
        // The first decision only starts the clock: short-lived processes report at exit.
        let _ = LAST_REPORT.compare_exchange(0, now.max(1), Ordering::Relaxed, Ordering::Relaxed);
        return false;
    }
    now > last
        && LAST_REPORT
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
}

/// In a child after `fork`: the parent reports what it counted, the child starts at zero.
pub(crate) fn reset() {
    for counter in DECISIONS.iter().chain(&FALLBACKS) {
        counter.store(0, Ordering::Relaxed);
    }
    LAST_REPORT.store(0, Ordering::Relaxed);
    if let Ok(mut kept) = UPGRADES.try_lock() {
        kept.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_take_restore_and_pace() {
        decided(Stack::Kernel, CongestionControl::Bbr);
        decided(Stack::Kernel, CongestionControl::Bbr);
        fell_back(FallbackReason::StackUnavailable);
        upgrade_attempt(UpgradeAttempt {
            role: message::UpgradeRole::Client,
            local: "10.0.0.1:40000".into(),
            remote: "10.0.0.2:9000".into(),
            reason: "peer-declined".into(),
            peer_reason: Some("no-device".into()),
            elapsed_us: 120,
        });
        let report = take().expect("a report");
        let text = serde_json::to_string(&report).unwrap();
        assert!(text.contains(r#"{"stack":"Kernel","congestionControl":"BBR","count":2}"#));
        assert!(text.contains(r#"{"reason":"stack-unavailable","count":1}"#));
        assert!(text.contains(r#""peerReason":"no-device""#), "{text}");
        assert!(take().is_none());
        restore(&report);
        assert_eq!(take(), Some(report));
        assert!(!report_due(100), "the first decision starts the clock");
        assert!(!report_due(100));
        assert!(report_due(101));
        assert!(!report_due(101));
    }
}
