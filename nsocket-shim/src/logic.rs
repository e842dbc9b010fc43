//! What each hook does, as safe functions over plain values. A hook calls `before` (which may
//! refuse the call with an errno), then the real function, then `after` with its result.
#![deny(unsafe_code)]

use std::io::Write as _;
use std::net::SocketAddr;

use stackroute_local_api::message::FallbackReason;
use stackroute_snapshot::{CongestionControl, Isolation, NoTrace, Protocol, Stack};

use crate::config::{self, Config};
use crate::fdtable::{self, Entry, Kind};
use crate::reader::{self, Unavailable};
use crate::{agent, counters, sys};

/// What a hook does before the real call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pre {
    /// Make the real call.
    Forward,
    /// Fail with this errno, without the real call.
    Fail(i32),
}

/// The errno of a connection the policy forbids: a rule with `isolation: Dedicated` whose
/// transports this node cannot run (the kernel is never a fallback for it).
pub(crate) const ISOLATION_ERRNO: i32 = libc::EACCES;

/// The kernel's name of a congestion control (`None`: leave the socket's default).
pub(crate) fn kernel_name(cc: CongestionControl) -> Option<&'static [u8]> {
    match cc {
        CongestionControl::Default => None,
        CongestionControl::Cubic => Some(b"cubic"),
        CongestionControl::Bbr => Some(b"bbr"),
        CongestionControl::Reno => Some(b"reno"),
    }
}

/// Up to this many transports of a decision are considered.
const MAX_TRANSPORTS: usize = 8;

/// A decision copied out of the snapshot: what the walk down the transport list needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Plan {
    /// The transports in order.
    pub(crate) transports: [(Stack, CongestionControl); MAX_TRANSPORTS],
    /// How many are used.
    pub(crate) len: usize,
    /// The rule's isolation.
    pub(crate) isolation: Isolation,
}

/// The outcome of walking a plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Walked {
    /// The transport used, or `None` when the policy forbids every one this node can run.
    pub(crate) used: Option<(Stack, CongestionControl)>,
    /// The reason of the last step down the list, if any.
    pub(crate) fallback: Option<FallbackReason>,
}

/// Walks `plan` for a socket of `kind`: the first transport this build and node can run.
/// `set_cc` applies a congestion control and says whether the kernel took it. Every step down
/// the list is counted with its reason.
pub(crate) fn walk(
    plan: &Plan,
    kind: Kind,
    mut set_cc: impl FnMut(&'static [u8]) -> bool,
    mut count: impl FnMut(FallbackReason),
) -> Walked {
    let mut fallback = None;
    let mut step = |reason, fallback: &mut Option<FallbackReason>| {
        count(reason);
        *fallback = Some(reason);
    };
    for &(stack, cc) in &plan.transports[..plan.len] {
        match stack {
            Stack::Userspace | Stack::Rdma => step(FallbackReason::StackUnavailable, &mut fallback),
            Stack::Kernel if plan.isolation == Isolation::Dedicated => {
                step(FallbackReason::IsolationForbids, &mut fallback)
            }
            Stack::Kernel => match (kind, kernel_name(cc)) {
                (Kind::Tcp, Some(name)) => {
                    if set_cc(name) {
                        return Walked {
                            used: Some((stack, cc)),
                            fallback,
                        };
                    }
                    step(FallbackReason::NoCapability, &mut fallback);
                }
                // UDP, or the default congestion control: nothing to apply.
                _ => {
                    return Walked {
                        used: Some((stack, cc)),
                        fallback,
                    };
                }
            },
        }
    }
    if plan.isolation == Isolation::Dedicated {
        if fallback != Some(FallbackReason::IsolationForbids) {
            step(FallbackReason::IsolationForbids, &mut fallback);
        }
        return Walked {
            used: None,
            fallback,
        };
    }
    // The list is exhausted (or empty): the kernel with its default, as without the shim.
    Walked {
        used: Some((Stack::Kernel, CongestionControl::Default)),
        fallback,
    }
}

/// The socket's kind: from the table, else asked of the kernel once and remembered.
fn kind_of(fd: i32, entry: Entry) -> Kind {
    if entry.kind() != Kind::Unknown {
        return entry.kind();
    }
    let kind = match (
        sys::socket_option(fd, libc::SO_DOMAIN),
        sys::socket_option(fd, libc::SO_PROTOCOL),
    ) {
        (Some(libc::AF_INET | libc::AF_INET6), Some(libc::IPPROTO_TCP)) => Kind::Tcp,
        (Some(libc::AF_INET | libc::AF_INET6), Some(libc::IPPROTO_UDP)) => Kind::Udp,
        (Some(_), Some(_)) => Kind::Other,
        _ => return Kind::Unknown,
    };
    fdtable::set(fd, entry.with_kind(kind));
    kind
}

/// `socket()` returned `fd`: a fresh entry (the fd number may have been closed behind the
/// shim's back, e.g. by `fclose`).
pub(crate) fn after_socket(domain: i32, kind: i32, protocol: i32, fd: i32) {
    if fd < 0 {
        return;
    }
    let inet = matches!(domain, libc::AF_INET | libc::AF_INET6);
    let kind = match (inet, kind & 0xf, protocol) {
        (true, libc::SOCK_STREAM, 0 | libc::IPPROTO_TCP) => Kind::Tcp,
        (true, libc::SOCK_DGRAM, 0 | libc::IPPROTO_UDP) => Kind::Udp,
        _ => Kind::Other,
    };
    fdtable::set(fd, Entry::new(kind));
}

/// `accept()` returned `fd`: decided by its peer; nothing is pinned here.
pub(crate) fn after_accept(fd: i32) {
    if fd >= 0 {
        fdtable::set(fd, Entry::new(Kind::Other));
    }
}

/// `connect()`: decides (once per socket) before the real call.
pub(crate) fn connect(fd: i32, destination: Option<SocketAddr>) -> Pre {
    decide_fd(fd, destination, Kind::Unknown)
}

/// `sendto()`/`sendmsg()`/`sendmmsg()` with a destination: the first one on an unconnected UDP
/// socket decides; `MSG_FASTOPEN` on TCP is a connect.
pub(crate) fn send_to(fd: i32, destination: Option<SocketAddr>, flags: i32) -> Pre {
    let Some(destination) = destination else {
        return Pre::Forward;
    };
    let entry = fdtable::get(fd);
    if entry.decided() || entry.kind() == Kind::Other {
        return Pre::Forward;
    }
    match kind_of(fd, entry) {
        Kind::Udp => decide_fd(fd, Some(destination), Kind::Udp),
        Kind::Tcp if flags & libc::MSG_FASTOPEN != 0 => decide_fd(fd, Some(destination), Kind::Tcp),
        _ => Pre::Forward,
    }
}

fn decide_fd(fd: i32, destination: Option<SocketAddr>, known: Kind) -> Pre {
    let entry = fdtable::get(fd);
    if entry.decided() || entry.kind() == Kind::Other {
        return Pre::Forward;
    }
    let Some(destination) = destination else {
        return Pre::Forward;
    };
    let config = config::get();
    if config.disabled {
        return Pre::Forward;
    }
    let kind = if known == Kind::Unknown {
        kind_of(fd, entry)
    } else {
        known
    };
    let protocol = match kind {
        Kind::Tcp => Protocol::Tcp,
        Kind::Udp => Protocol::Udp,
        Kind::Other | Kind::Unknown => return Pre::Forward,
    };
    let mut rule = RuleName::default();
    let looked_up = lookup(config, destination, protocol, &mut rule);
    let (walked, revision_note) = match looked_up {
        Ok(plan) => (
            walk(
                &plan,
                kind,
                |name| sys::set_congestion_control(fd, name).is_ok(),
                counters::fell_back,
            ),
            "",
        ),
        Err(reason) => {
            counters::fell_back(reason);
            (
                Walked {
                    used: Some((Stack::Kernel, CongestionControl::Default)),
                    fallback: Some(reason),
                },
                " (no table)",
            )
        }
    };
    let verdict = match walked.used {
        Some((stack, cc)) => {
            fdtable::set(
                fd,
                fdtable::get(fd).with_kind(kind).with_decision(stack, cc),
            );
            counters::decided(stack, cc);
            Pre::Forward
        }
        None => Pre::Fail(ISOLATION_ERRNO),
    };
    if config.debug {
        log_decision(fd, destination, protocol, &rule, walked, revision_note);
    }
    if counters::report_due(sys::coarse_seconds()) {
        agent::report(config);
    }
    verdict
}

/// Looks the connection up in the agent's snapshot: the plan to walk, or why there is none.
fn lookup(
    config: &Config,
    destination: SocketAddr,
    protocol: Protocol,
    rule: &mut RuleName,
) -> Result<Plan, FallbackReason> {
    reader::with_snapshot(config, |snapshot| {
        let loaded = snapshot.map_err(|e| match e {
            Unavailable::NoAgent => FallbackReason::NoAgent,
            Unavailable::Corrupt => FallbackReason::Other,
        })?;
        let (Some(namespace), Some(workload)) = (&config.namespace, &config.workload) else {
            return Err(FallbackReason::UnknownWorkload);
        };
        let id = loaded
            .snapshot
            .workload_by_name(namespace, workload)
            .ok_or(FallbackReason::UnknownWorkload)?;
        let decision = loaded.snapshot.decide(
            id,
            destination.ip(),
            destination.port(),
            protocol,
            &mut NoTrace,
        );
        let mut plan = Plan {
            transports: [(Stack::Kernel, CongestionControl::Default); MAX_TRANSPORTS],
            len: 0,
            isolation: decision.isolation,
        };
        for (slot, choice) in plan.transports.iter_mut().zip(decision.transports()) {
            *slot = (choice.stack, choice.congestion_control);
            plan.len += 1;
        }
        if config.debug {
            rule.set(loaded, decision.matched);
        }
        Ok(plan)
    })
}

/// The lookup part of a decision without a socket (for the benchmark): the first transport of
/// the plan as `stack * 8 + congestion control`, or `-1 - reason index` when there is none.
pub(crate) fn probe(destination: SocketAddr, tcp: bool) -> i32 {
    let protocol = if tcp { Protocol::Tcp } else { Protocol::Udp };
    match lookup(
        config::get(),
        destination,
        protocol,
        &mut RuleName::default(),
    ) {
        Ok(plan) if plan.len > 0 => plan.transports[0].0 as i32 * 8 + plan.transports[0].1 as i32,
        Ok(_) => 0,
        Err(reason) => {
            -1 - FallbackReason::ALL
                .iter()
                .position(|r| *r == reason)
                .unwrap_or(0) as i32
        }
    }
}

/// The deciding rule's name, for the debug log, in a fixed buffer.
struct RuleName {
    bytes: [u8; 160],
    len: usize,
}

impl Default for RuleName {
    fn default() -> Self {
        Self {
            bytes: [0; 160],
            len: 0,
        }
    }
}

impl RuleName {
    fn set(&mut self, loaded: &sys::Loaded, matched: Option<stackroute_snapshot::RuleRef>) {
        let mut cursor = std::io::Cursor::new(&mut self.bytes[..]);
        let _ = match matched {
            Some(rule) => {
                let policy = loaded.snapshot.policy(rule.policy);
                let name = loaded.snapshot.rule(rule).name;
                write!(
                    cursor,
                    "{}/{}{}{}#{name} (revision {}{})",
                    policy.kind,
                    policy.namespace,
                    if policy.namespace.is_empty() { "" } else { "/" },
                    policy.name,
                    loaded.revision,
                    if loaded.stale { ", stale" } else { "" }
                )
            }
            None => write!(
                cursor,
                "default (revision {}{})",
                loaded.revision,
                if loaded.stale { ", stale" } else { "" }
            ),
        };
        self.len = cursor.position() as usize;
    }

    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..self.len]).unwrap_or("?")
    }
}

fn log_decision(
    fd: i32,
    destination: SocketAddr,
    protocol: Protocol,
    rule: &RuleName,
    walked: Walked,
    note: &str,
) {
    let mut line = [0u8; 512];
    let mut cursor = std::io::Cursor::new(&mut line[..]);
    let transport = match walked.used {
        Some((stack, cc)) => (stack.as_str(), cc.as_str()),
        None => ("refused", "EACCES"),
    };
    let _ = writeln!(
        cursor,
        "nsocket[{}]: fd={fd} dst={destination}/{protocol} rule={}{note} transport={}/{} fallback={}",
        std::process::id(),
        if rule.len == 0 { "-" } else { rule.as_str() },
        transport.0,
        transport.1,
        walked.fallback.map_or("-", FallbackReason::as_str),
    );
    let len = cursor.position() as usize;
    sys::write_stderr(&line[..len]);
}

/// `listen()` succeeded on `fd`: register the listener with the agent (once per socket).
pub(crate) fn after_listen(fd: i32, result: i32) {
    if result != 0 {
        return;
    }
    let entry = fdtable::get(fd);
    if entry.listener() || kind_of(fd, entry) != Kind::Tcp {
        return;
    }
    let config = config::get();
    if config.disabled {
        return;
    }
    let Some(address) = sys::local_address(fd) else {
        return;
    };
    let registered = agent::register_listener(config, address);
    if config.debug {
        debug_line(format_args!(
            "listen fd={fd} on {address}: {}",
            if registered {
                "registered with the agent"
            } else {
                "not registered (no agent or refused)"
            }
        ));
    }
    if registered {
        fdtable::set(fd, fdtable::get(fd).with_listener(true));
    } else {
        counters::fell_back(FallbackReason::NoAgent);
    }
}

fn debug_line(args: std::fmt::Arguments<'_>) {
    let mut line = [0u8; 256];
    let mut cursor = std::io::Cursor::new(&mut line[..]);
    let _ = writeln!(cursor, "nsocket[{}]: {args}", std::process::id());
    let len = cursor.position() as usize;
    sys::write_stderr(&line[..len]);
}

/// Before `close(fd)`: forget the fd; a listener this process registered is looked up now
/// (its address) and withdrawn after the close.
pub(crate) fn before_close(fd: i32) -> Option<SocketAddr> {
    let entry = fdtable::take(fd);
    entry.listener().then(|| sys::local_address(fd)).flatten()
}

/// After `close`: withdraw the listener found before it.
pub(crate) fn after_close(listener: Option<SocketAddr>, result: i32) {
    if let (Some(address), 0) = (listener, result) {
        agent::remove_listener(config::get(), address);
    }
}

/// Most listeners withdrawn per `close_range`/`closefrom` (the agent withdraws the rest when
/// the process exits).
const RANGE_LISTENERS: usize = 8;

/// Listeners found before a range close.
#[derive(Default)]
pub(crate) struct RangeListeners {
    addresses: [Option<SocketAddr>; RANGE_LISTENERS],
}

/// Before `close_range(first, last, flags)` / `closefrom(first)`.
pub(crate) fn before_close_range(first: u32, last: u32, flags: i32) -> RangeListeners {
    let mut found = RangeListeners::default();
    if flags & libc::CLOSE_RANGE_CLOEXEC as i32 != 0 {
        return found;
    }
    let mut next = 0;
    fdtable::take_range(first, last, |fd, entry| {
        if entry.listener() && next < RANGE_LISTENERS {
            found.addresses[next] = sys::local_address(fd);
            next += 1;
        }
    });
    found
}

/// After a range close.
pub(crate) fn after_close_range(found: RangeListeners, result: i32) {
    for address in found.addresses.into_iter().flatten() {
        after_close(Some(address), result);
    }
}

/// After `dup`/`dup2`/`dup3`/`F_DUPFD*` made `new` a copy of `old`: the copy shares the
/// decision (not the listener registration, which the original owns).
pub(crate) fn after_dup(old: i32, new: i32) {
    if new < 0 || new == old {
        return;
    }
    fdtable::set(new, fdtable::get(old).with_listener(false));
}

/// Before `dup2`/`dup3` onto `new`: it is closed implicitly.
pub(crate) fn before_dup_onto(old: i32, new: i32) -> Option<SocketAddr> {
    if old == new {
        return None;
    }
    before_close(new)
}

/// The library was loaded: read the environment now, and prepare for `fork`.
pub(crate) fn load() {
    let _ = config::get();
    sys::at_fork_child(after_fork_child);
}

extern "C" fn after_fork_child() {
    reader::reset_after_fork();
    counters::reset();
    // Listener registrations belong to the process that listened: a child closing its
    // inherited copy must not withdraw them.
    fdtable::take_range(0, u32::MAX, |fd, entry| {
        fdtable::set(fd, entry.with_listener(false));
    });
}

/// `exit()`: report the counters.
/// Before `exec*`: report what this process counted, since the new image starts from zero.
pub(crate) fn before_exec() -> (Pre, ()) {
    unload();
    (Pre::Forward, ())
}

pub(crate) fn unload() {
    let config = config::get();
    if !config.disabled {
        agent::report(config);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(transports: &[(Stack, CongestionControl)], isolation: Isolation) -> Plan {
        let mut plan = Plan {
            transports: [(Stack::Kernel, CongestionControl::Default); MAX_TRANSPORTS],
            len: transports.len(),
            isolation,
        };
        plan.transports[..transports.len()].copy_from_slice(transports);
        plan
    }

    fn run(plan: &Plan, kind: Kind, allowed: &[&[u8]]) -> (Walked, Vec<FallbackReason>) {
        let mut reasons = Vec::new();
        let walked = walk(plan, kind, |n| allowed.contains(&n), |r| reasons.push(r));
        (walked, reasons)
    }

    #[test]
    fn kernel_congestion_control_falls_down_the_list() {
        let p = plan(
            &[
                (Stack::Rdma, CongestionControl::Default),
                (Stack::Kernel, CongestionControl::Bbr),
                (Stack::Kernel, CongestionControl::Cubic),
            ],
            Isolation::None,
        );
        let (walked, reasons) = run(&p, Kind::Tcp, &[b"cubic"]);
        assert_eq!(walked.used, Some((Stack::Kernel, CongestionControl::Cubic)));
        assert_eq!(walked.fallback, Some(FallbackReason::NoCapability));
        assert_eq!(
            reasons,
            [
                FallbackReason::StackUnavailable,
                FallbackReason::NoCapability
            ]
        );
        let (walked, reasons) = run(&p, Kind::Tcp, &[b"bbr"]);
        assert_eq!(walked.used, Some((Stack::Kernel, CongestionControl::Bbr)));
        assert_eq!(reasons, [FallbackReason::StackUnavailable]);
        // Nothing allowed: the kernel default, as without the shim.
        let (walked, _) = run(&p, Kind::Tcp, &[]);
        assert_eq!(
            walked.used,
            Some((Stack::Kernel, CongestionControl::Default))
        );
        // UDP takes the kernel entry without applying anything.
        let (walked, _) = run(&p, Kind::Udp, &[]);
        assert_eq!(walked.used, Some((Stack::Kernel, CongestionControl::Bbr)));
        let (walked, reasons) = run(&plan(&[], Isolation::None), Kind::Tcp, &[]);
        assert_eq!(
            walked.used,
            Some((Stack::Kernel, CongestionControl::Default))
        );
        assert!(reasons.is_empty());
    }

    #[test]
    fn dedicated_isolation_never_falls_back_to_the_kernel() {
        let p = plan(
            &[
                (Stack::Rdma, CongestionControl::Default),
                (Stack::Kernel, CongestionControl::Default),
            ],
            Isolation::Dedicated,
        );
        let (walked, reasons) = run(&p, Kind::Tcp, &[b"cubic"]);
        assert_eq!(walked.used, None);
        assert_eq!(
            reasons,
            [
                FallbackReason::StackUnavailable,
                FallbackReason::IsolationForbids
            ]
        );
        let (walked, reasons) = run(
            &plan(
                &[(Stack::Userspace, CongestionControl::Bbr)],
                Isolation::Dedicated,
            ),
            Kind::Udp,
            &[],
        );
        assert_eq!(walked.used, None);
        assert_eq!(
            reasons,
            [
                FallbackReason::StackUnavailable,
                FallbackReason::IsolationForbids
            ]
        );
    }

    #[test]
    fn socket_kinds() {
        after_socket(
            libc::AF_INET6,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK,
            0,
            800_001,
        );
        assert_eq!(fdtable::get(800_001).kind(), Kind::Tcp);
        after_socket(libc::AF_INET, libc::SOCK_DGRAM, libc::IPPROTO_UDP, 800_002);
        assert_eq!(fdtable::get(800_002).kind(), Kind::Udp);
        after_socket(libc::AF_UNIX, libc::SOCK_STREAM, 0, 800_003);
        assert_eq!(fdtable::get(800_003).kind(), Kind::Other);
        fdtable::set(
            800_001,
            fdtable::get(800_001)
                .with_decision(Stack::Kernel, CongestionControl::Bbr)
                .with_listener(true),
        );
        after_dup(800_001, 800_004);
        assert_eq!(
            fdtable::get(800_004).transport(),
            Some((Stack::Kernel, CongestionControl::Bbr))
        );
        assert!(!fdtable::get(800_004).listener());
        // An AF_UNIX or already-decided socket is never looked up.
        assert_eq!(connect(800_003, "127.0.0.1:1".parse().ok()), Pre::Forward);
        assert_eq!(connect(800_004, "127.0.0.1:1".parse().ok()), Pre::Forward);
    }
}
