//! What each hook does, as safe functions over plain values. A hook calls `before` (which may
//! refuse the call with an errno), then the real function, then `after` with its result.
#![deny(unsafe_code)]

use std::io::Write as _;
use std::net::SocketAddr;

use stackroute_local_api::message::{FallbackReason, UpgradeRole};
use stackroute_rdma_upgrade::Endpoint;
use stackroute_snapshot::{CongestionControl, Isolation, NoTrace, Protocol, Stack};

use crate::config::{self, Config};
use crate::fdtable::{self, Entry, Kind};
use crate::reader::{self, Unavailable};
use crate::relay::{self, Connected};
use crate::upgrade::{self, At};
use crate::{agent, counters, epollreg, sys};

/// What a hook does before the real call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pre {
    /// Make the real call.
    Forward,
    /// Fail with this errno, without the real call.
    Fail(i32),
    /// Succeed (return 0) without the real call: the shim did what it asks.
    Done,
}

impl Pre {
    /// This, or `next` when this forwards.
    pub(crate) fn or(self, next: Self) -> Self {
        match self {
            Self::Forward => next,
            decided => decided,
        }
    }
}

/// The errno of a connection the policy forbids: a rule with `isolation: Dedicated` whose
/// transports this node cannot run (the kernel is never a fallback for it).
pub(crate) const ISOLATION_ERRNO: i32 = libc::EACCES;

/// The kernel's name of a congestion control (`None`: leave the socket's default).
pub(crate) fn kernel_name(cc: CongestionControl) -> Option<&'static [u8]> {
    cc.kernel_name().map(str::as_bytes)
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
    /// How the connect went when the user-space stack was used.
    pub(crate) relayed: Option<Connected>,
    /// An RDMA entry this end can take and the server is registered for: the connection runs
    /// on `used` (kernel TCP) and tries the upgrade from this endpoint right after connecting.
    pub(crate) upgrade: Option<Endpoint>,
}

/// Walks `plan` for a socket of `kind`: the first transport this build and node can run.
/// `set_cc` applies a congestion control and says whether the kernel took it; `userspace`
/// connects on the user-space stack (or says why it cannot); `rdma` says whether an RDMA
/// upgrade may be tried (this end's endpoint) or why not. An RDMA entry that may be tried is
/// remembered and the walk goes on to the transport that carries the connection until the
/// upgrade (and after a failed one). Every step down the list is counted with its reason.
pub(crate) fn walk(
    plan: &Plan,
    kind: Kind,
    mut set_cc: impl FnMut(&'static [u8]) -> bool,
    mut userspace: impl FnMut(CongestionControl) -> Result<Connected, FallbackReason>,
    mut rdma: impl FnMut() -> Result<Endpoint, FallbackReason>,
    mut count: impl FnMut(FallbackReason),
) -> Walked {
    let mut fallback = None;
    let mut upgrade = None;
    let mut step = |reason, fallback: &mut Option<FallbackReason>| {
        count(reason);
        *fallback = Some(reason);
    };
    for &(stack, cc) in &plan.transports[..plan.len] {
        match stack {
            Stack::Rdma if kind != Kind::Tcp => {
                step(FallbackReason::UnsupportedProtocol, &mut fallback)
            }
            // The upgrade runs over a TCP connection, which a dedicated rule forbids.
            Stack::Rdma if plan.isolation == Isolation::Dedicated => {
                step(FallbackReason::StackUnavailable, &mut fallback)
            }
            Stack::Rdma if upgrade.is_some() => {}
            Stack::Rdma => match rdma() {
                Ok(endpoint) => upgrade = Some(endpoint),
                Err(reason) => step(reason, &mut fallback),
            },
            Stack::Userspace if kind != Kind::Tcp => {
                step(FallbackReason::UnsupportedProtocol, &mut fallback)
            }
            // Its packets leave without passing the pod's netfilter, which enforces this rule.
            Stack::Userspace if plan.isolation == Isolation::KernelEnforced => {
                step(FallbackReason::IsolationForbids, &mut fallback)
            }
            Stack::Userspace => match userspace(cc) {
                Ok(connected) => {
                    return Walked {
                        used: Some((stack, cc)),
                        fallback,
                        relayed: Some(connected),
                        upgrade: None,
                    };
                }
                Err(reason) => step(reason, &mut fallback),
            },
            Stack::Kernel if plan.isolation == Isolation::Dedicated => {
                step(FallbackReason::IsolationForbids, &mut fallback)
            }
            Stack::Kernel => match (kind, kernel_name(cc)) {
                (Kind::Tcp, Some(name)) => {
                    if set_cc(name) {
                        return Walked {
                            used: Some((stack, cc)),
                            fallback,
                            relayed: None,
                            upgrade,
                        };
                    }
                    step(FallbackReason::NoCapability, &mut fallback);
                }
                // UDP, or the default congestion control: nothing to apply.
                _ => {
                    return Walked {
                        used: Some((stack, cc)),
                        fallback,
                        relayed: None,
                        upgrade,
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
            relayed: None,
            upgrade: None,
        };
    }
    // The list is exhausted (or empty): the kernel with its default, as without the shim.
    Walked {
        used: Some((Stack::Kernel, CongestionControl::Default)),
        fallback,
        relayed: None,
        upgrade,
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
    // The number may have been closed behind the shim's back with registrations recorded.
    let stale = fdtable::replace(fd, Entry::new(kind));
    if stale.epoll_recorded() {
        epollreg::forget(fd);
    }
    upgrade::forgotten(stale);
}

/// `accept()` on `listener` returned `fd`: decided by its peer; nothing is pinned here. From a
/// dual listener, a connection whose peer is in this namespace may be a user-space peer's that
/// the instance delivered: its real address (from the instance) goes to `report_peer`, which
/// writes it into the caller's address buffer.
pub(crate) fn after_accept(listener: i32, fd: i32, report_peer: impl FnOnce(SocketAddr)) {
    if fd < 0 {
        return;
    }
    let mut entry = Entry::new(Kind::Other);
    if fdtable::get(listener).dual_listen()
        && let Some(peer) = sys::peer_address(fd)
        && from_this_namespace(fd, peer)
        && let Some((remote, _)) = relay::peer_of(config::get(), peer)
    {
        report_peer(remote);
        entry = entry.with_delivered_by_instance();
    }
    upgrade::forgotten(fdtable::replace(fd, entry));
    if fdtable::get(listener).upgrade_listener() && !entry.delivered_by_instance() {
        // Its client may be a stackroute shim that proposes an RDMA upgrade first: usually
        // the proposal has arrived by now, and is answered at once.
        upgrade::watch(fd);
        let _ = upgrade::front(config::get(), fd, At::Accept);
    }
}

/// Whether an accepted connection's peer is in this network namespace (loopback, or the
/// socket's own address): the only connections the instance can have delivered.
fn from_this_namespace(fd: i32, peer: SocketAddr) -> bool {
    let peer = peer.ip().to_canonical();
    peer.is_loopback()
        || sys::local_address(fd).is_some_and(|local| local.ip().to_canonical() == peer)
}

/// Whether the node's snapshot routes anything to `stack`: a listener is then ready for peers
/// on it (the user-space stack: dual listen; RDMA: registered as an upgrade endpoint). Clients
/// choose the stack, and their rules live in their own nodes' snapshots, so this is an
/// approximation: where a stack is in use, listeners are ready for it.
fn stack_in_use(config: &Config, wanted: Stack) -> bool {
    reader::with_snapshot(config, |snapshot| {
        let Ok(loaded) = snapshot else {
            return false;
        };
        let snapshot = &loaded.snapshot;
        let (policies, _, _) = snapshot.counts();
        (0..policies as u32).any(|policy| {
            (0..snapshot.policy(policy).rule_count).any(|rule| {
                snapshot
                    .rule(stackroute_snapshot::RuleRef { policy, rule })
                    .transports()
                    .any(|t| t.stack == wanted)
            })
        })
    })
}

/// An RDMA upgrade to try once the real `connect` returns.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PendingUpgrade {
    destination: SocketAddr,
}

/// `connect()`: decides (once per socket) before the real call; a `Userspace` decision
/// connects here, on the user-space stack, and the real call is not made. A connection that
/// may be upgraded to RDMA says so for [`after_connect`].
pub(crate) fn connect(fd: i32, destination: Option<SocketAddr>) -> (Pre, Option<PendingUpgrade>) {
    let entry = fdtable::get(fd);
    if let Some((Stack::Userspace | Stack::Rdma, _)) = entry.transport() {
        let pre = match relay::connect_again(fd) {
            // Linux: the first `connect` after a non-blocking one completed returns 0; only
            // later ones say `EISCONN`.
            libc::EISCONN if !entry.connected() => {
                fdtable::set(fd, fdtable::get(fd).with_connected());
                Pre::Done
            }
            errno => Pre::Fail(errno),
        };
        return (pre, None);
    }
    let (pre, upgrade) = decide(fd, destination, Kind::Unknown, true);
    // The endpoint of this process's own probe says only that it can: the queue pair the
    // proposal names is the instance's.
    let pending = upgrade
        .zip(destination)
        .map(|(_, destination)| PendingUpgrade { destination });
    (pre, pending)
}

/// After the real `connect` of a connection that may be upgraded: the client's exchange,
/// within the deadline; what `connect` returns is left as it is.
pub(crate) fn after_connect(pending: Option<PendingUpgrade>, fd: i32, result: i32, errno: i32) {
    let Some(pending) = pending else {
        return;
    };
    let config = config::get();
    let started_us = sys::upgrade::monotonic_us();
    let connect_errno = if result == 0 { 0 } else { errno };
    let result = upgrade::client(config, fd, connect_errno);
    if let Some(Err(outcome)) = result {
        upgrade::remember_decline(pending.destination, outcome);
        upgrade::ended(
            config,
            fd,
            UpgradeRole::Client,
            Some(pending.destination),
            outcome,
            started_us,
        );
    }
    if let Some(Ok(())) = result {
        upgrade::upgraded(
            config,
            fd,
            UpgradeRole::Client,
            Some(pending.destination),
            started_us,
        );
    } else {
        // Registrations kept for a relay socket that did not come: the kernel socket stays.
        upgrade::keep_registrations(fd);
    }
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
        Kind::Udp => decide(fd, Some(destination), Kind::Udp, false).0,
        // TCP Fast Open connects inside `sendto`, which neither the relay nor the RDMA
        // upgrade (whose bytes must come first) carries.
        Kind::Tcp if flags & libc::MSG_FASTOPEN != 0 => {
            decide(fd, Some(destination), Kind::Tcp, false).0
        }
        _ => Pre::Forward,
    }
}

/// Decides `fd`'s transport; the user-space stack and the RDMA upgrade only from a `connect`
/// (`from_connect`). Also answers the endpoint of an upgrade to try after the connect.
fn decide(
    fd: i32,
    destination: Option<SocketAddr>,
    known: Kind,
    from_connect: bool,
) -> (Pre, Option<Endpoint>) {
    let entry = fdtable::get(fd);
    if entry.decided() || entry.kind() == Kind::Other {
        return (Pre::Forward, None);
    }
    let Some(destination) = destination else {
        return (Pre::Forward, None);
    };
    let config = config::get();
    if config.disabled {
        return (Pre::Forward, None);
    }
    let kind = if known == Kind::Unknown {
        kind_of(fd, entry)
    } else {
        known
    };
    let protocol = match kind {
        Kind::Tcp => Protocol::Tcp,
        Kind::Udp => Protocol::Udp,
        Kind::Other | Kind::Unknown => return (Pre::Forward, None),
    };
    let mut rule = RuleName::default();
    let looked_up = lookup(config, destination, protocol, &mut rule);
    let (walked, revision_note) = match looked_up {
        Ok(plan) => (
            walk(
                &plan,
                kind,
                |name| sys::set_congestion_control(fd, name).is_ok(),
                |cc| {
                    // A registration that did not fit the record could not be carried over
                    // to the relay socket.
                    if from_connect && !fdtable::get(fd).epoll_overflow() {
                        relay::connect(config, fd, destination, cc)
                    } else {
                        Err(FallbackReason::Unsupported)
                    }
                },
                || {
                    if !from_connect {
                        return Err(FallbackReason::Unsupported);
                    }
                    // This end first (no round trip when it cannot), then a server that
                    // declined lately for a lasting reason, then the server's registration:
                    // only a registered upgrade endpoint gets a proposal.
                    let endpoint = upgrade::capability(config).map_err(upgrade::fallback_reason)?;
                    if let Some(reason) = upgrade::refused_locally() {
                        return Err(upgrade::fallback_reason(reason));
                    }
                    if upgrade::declined_lately(destination) {
                        return Err(FallbackReason::PeerDeclined);
                    }
                    agent::rdma_listener(config, destination)?;
                    Ok(endpoint)
                },
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
                    relayed: None,
                    upgrade: None,
                },
                " (no table)",
            )
        }
    };
    let verdict = match walked.used {
        Some((stack, cc)) => {
            let mut entry = fdtable::get(fd).with_kind(kind).with_decision(stack, cc);
            if entry.epoll_recorded() && walked.upgrade.is_none() {
                // Still the kernel socket (a relay replayed them already): they stay valid.
                epollreg::replay(fd, |_, _, _| {});
                entry = entry.with_epoll_recorded(false);
            }
            if walked.relayed == Some(Connected::Established) {
                entry = entry.with_connected();
            }
            fdtable::set(fd, entry);
            counters::decided(stack, cc);
            match walked.relayed {
                None => Pre::Forward,
                Some(Connected::Established) => Pre::Done,
                Some(Connected::InProgress) => Pre::Fail(libc::EINPROGRESS),
                Some(Connected::Failed(errno)) => Pre::Fail(errno),
            }
        }
        None => Pre::Fail(ISOLATION_ERRNO),
    };
    if config.debug {
        log_decision(fd, destination, protocol, &rule, walked, revision_note);
    }
    if counters::report_due(sys::coarse_seconds()) {
        agent::report(config);
    }
    // Nothing to upgrade when the connection was refused or relayed.
    let upgrade = walked.upgrade.filter(|_| verdict == Pre::Forward);
    (verdict, upgrade)
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
    let mut entry = fdtable::get(fd);
    if !entry.passive() {
        // A listener is never relayed: its epoll registrations need no record.
        if entry.epoll_recorded() {
            epollreg::forget(fd);
        }
        entry = entry.with_passive().with_epoll_recorded(false);
        fdtable::set(fd, entry);
    }
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
    // An upgrade endpoint where a verbs provider is configured (an RDMA pod), whatever its
    // check says: a client then hears why not (`no-memlock`, …) from this side. Elsewhere no
    // client proposes, and accepted connections cost nothing.
    let rdma = upgrade::endpoint_configured(config);
    let rdma_endpoint = rdma
        .then(|| upgrade::capability(config).ok())
        .flatten()
        .map(|endpoint| std::net::Ipv6Addr::from(endpoint.gid).to_string());
    let registered = agent::register_listener(config, address, rdma, rdma_endpoint);
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
        let entry = fdtable::get(fd).with_listener(true);
        fdtable::set(
            fd,
            if rdma {
                entry.with_upgrade_listener()
            } else {
                entry
            },
        );
    } else {
        counters::fell_back(FallbackReason::NoAgent);
    }
    if stack_in_use(config, Stack::Userspace) && relay::listen(config, address) {
        fdtable::set(fd, fdtable::get(fd).with_dual_listen());
        if config.debug {
            debug_line(format_args!(
                "listen fd={fd} on {address}: the instance takes user-space peers too"
            ));
        }
    }
}

pub(crate) fn debug_line(args: std::fmt::Arguments<'_>) {
    let mut line = [0u8; 256];
    let mut cursor = std::io::Cursor::new(&mut line[..]);
    let _ = writeln!(cursor, "nsocket[{}]: {args}", std::process::id());
    let len = cursor.position() as usize;
    sys::write_stderr(&line[..len]);
}

/// Before `close(fd)`: forget the fd; a listener this process registered is looked up now
/// (its address) and withdrawn after the close.
pub(crate) fn before_close(fd: i32) -> Option<SocketAddr> {
    // A dual listener's close needs no word to the instance: it follows the namespace's
    // kernel listeners, so a forked child closing its copy cannot stop it for the parent.
    let entry = fdtable::take(fd);
    if entry.epoll_recorded() {
        epollreg::forget(fd);
    }
    upgrade::forgotten(entry);
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
        if entry.epoll_recorded() {
            epollreg::forget(fd);
        }
        upgrade::forgotten(entry);
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
    let copy = fdtable::get(old).with_listener(false);
    upgrade::forgotten(fdtable::replace(new, copy));
    upgrade::copied(copy);
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
    epollreg::reset_after_fork();
    relay::reset_after_fork();
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

/// Whether `fd` is the application end of a relayed connection (user-space stack, or RDMA
/// after an upgrade). A socket this process did not see created (inherited across `exec`,
/// received over `SCM_RIGHTS`) is recognised once by its abstract name.
pub(crate) fn relayed(fd: i32) -> bool {
    let entry = fdtable::get(fd);
    match entry.transport() {
        Some((stack, _)) => matches!(stack, Stack::Userspace | Stack::Rdma),
        None if entry.kind() == Kind::Unknown => {
            if relay::name_of(fd).is_some() {
                fdtable::set(
                    fd,
                    entry
                        .with_kind(Kind::Tcp)
                        .with_decision(Stack::Userspace, CongestionControl::Default),
                );
                true
            } else {
                kind_of(fd, entry);
                false
            }
        }
        None => false,
    }
}

/// Which address of a socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Side {
    /// `getsockname`.
    Local,
    /// `getpeername`.
    Peer,
}

/// `getsockname`/`getpeername` of a relayed socket: the TCP addresses, not the socketpair's.
pub(crate) fn relay_address(fd: i32, side: Side) -> Option<SocketAddr> {
    let entry = fdtable::get(fd);
    if entry.delivered_by_instance() {
        // A user-space peer's connection delivered over loopback: the instance knows both
        // ends on the wire.
        let config = config::get();
        let (remote, id) = relay::peer_of(config, sys::peer_address(fd)?)?;
        return match side {
            Side::Peer => Some(remote),
            Side::Local => relay::local_of(config, id),
        };
    }
    if !relayed(fd) {
        return None;
    }
    let name = relay::name_of(fd)?;
    Some(match side {
        Side::Local => name.local,
        Side::Peer => name.remote,
    })
}

/// `getsockopt` of a relayed socket: what a TCP socket answers, given to `answer`; other
/// sockets and socket-level options that the relay socket answers itself forward.
pub(crate) fn get_option(fd: i32, level: i32, name: i32, answer: impl FnOnce(&[u8])) -> Pre {
    if !relayed(fd) {
        return Pre::Forward;
    }
    let int = |value: i32| value.to_ne_bytes().to_vec();
    let value = match (level, name) {
        (libc::SOL_SOCKET, libc::SO_ERROR) => int(reported_error(fd, relay::error)),
        (libc::SOL_SOCKET, libc::SO_DOMAIN) => int(match relay::name_of(fd) {
            Some(n) if n.remote.is_ipv6() => libc::AF_INET6,
            _ => libc::AF_INET,
        }),
        (libc::SOL_SOCKET, libc::SO_PROTOCOL) => int(libc::IPPROTO_TCP),
        (libc::IPPROTO_TCP, libc::TCP_NODELAY) => int(fdtable::get(fd).nodelay() as i32),
        (libc::IPPROTO_TCP, libc::TCP_INFO) => {
            relay::tcp_info_bytes(relay::tcp_info(fd).as_ref()).to_vec()
        }
        (libc::IPPROTO_TCP, libc::TCP_CONGESTION) => {
            let mut buffer = vec![0u8; 16];
            let name = relay::tcp_info(fd)
                .map(|info| info.congestion_control.to_ascii_lowercase())
                .unwrap_or_else(|| "bbr".into());
            let len = name.len().min(buffer.len() - 1);
            buffer[..len].copy_from_slice(&name.as_bytes()[..len]);
            buffer
        }
        (libc::IPPROTO_TCP, libc::TCP_MAXSEG) => int(relay::MSS as i32),
        (libc::IPPROTO_TCP | libc::IPPROTO_IP | libc::IPPROTO_IPV6, _) => int(0),
        _ => return Pre::Forward,
    };
    answer(&value);
    Pre::Done
}

/// `setsockopt` of a relayed socket: TCP options go to the instance's connection; socket-level
/// ones the relay socket also keeps (so `getsockopt` reads them back) forward as well.
pub(crate) fn set_option(fd: i32, level: i32, name: i32, value: &[u8]) -> Pre {
    use stackroute_local_api::relay::RelayOption;
    if !relayed(fd) {
        return Pre::Forward;
    }
    let int = value
        .get(..4)
        .and_then(|bytes| bytes.try_into().ok())
        .map(i32::from_ne_bytes);
    match (level, name, int) {
        (libc::IPPROTO_TCP, libc::TCP_NODELAY, Some(on)) => {
            relay::set_option(fd, RelayOption::NoDelay(on != 0));
            fdtable::set(fd, fdtable::get(fd).with_nodelay(on != 0));
            Pre::Done
        }
        (libc::IPPROTO_TCP, libc::TCP_CONGESTION, _) => {
            let name = value.split(|b| *b == 0).next().unwrap_or_default();
            let name = String::from_utf8_lossy(name).into_owned();
            if relay::set_option(fd, RelayOption::CongestionControl(name)) {
                Pre::Done
            } else {
                Pre::Fail(libc::ENOENT)
            }
        }
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE, Some(on)) => {
            relay::set_option(fd, RelayOption::Keepalive(on != 0));
            Pre::Forward
        }
        (libc::SOL_SOCKET, libc::SO_LINGER, _) if value.len() >= 8 => {
            let on = i32::from_ne_bytes([value[0], value[1], value[2], value[3]]);
            let seconds = i32::from_ne_bytes([value[4], value[5], value[6], value[7]]);
            relay::set_option(fd, RelayOption::ResetOnClose(on != 0 && seconds == 0));
            Pre::Forward
        }
        (libc::SOL_SOCKET, libc::SO_SNDBUF, Some(bytes)) => {
            relay::set_option(fd, RelayOption::SendBuffer(bytes.max(0) as u32));
            Pre::Forward
        }
        (libc::SOL_SOCKET, libc::SO_RCVBUF, Some(bytes)) => {
            relay::set_option(fd, RelayOption::ReceiveBuffer(bytes.max(0) as u32));
            Pre::Forward
        }
        (libc::IPPROTO_TCP | libc::IPPROTO_IP | libc::IPPROTO_IPV6, _, None) => {
            Pre::Fail(libc::EINVAL)
        }
        // Accepted without effect (`TCP_KEEPIDLE`, `TCP_QUICKACK`, `IP_TOS`, …).
        (libc::IPPROTO_TCP | libc::IPPROTO_IP | libc::IPPROTO_IPV6, _, Some(_)) => Pre::Done,
        _ => Pre::Forward,
    }
}

/// A read on `fd` returned end of file: the errno to report instead when the relayed
/// connection was reset (a truncated transfer must not look complete).
pub(crate) fn end_of_file(fd: i32) -> Option<i32> {
    if !relayed(fd) {
        return None;
    }
    Some(reported_error(fd, relay::end_of_file)).filter(|e| *e != 0)
}

/// A write on `fd` failed with `EPIPE`: the errno Linux TCP gives instead when the relayed
/// connection was reset and that was not reported yet (`ECONNRESET`, once).
pub(crate) fn broken_pipe(fd: i32) -> Option<i32> {
    if !relayed(fd) {
        return None;
    }
    Some(reported_error(fd, relay::end_of_file)).filter(|e| *e != 0)
}

/// A relayed socket's pending error (0: none), reported once as Linux reports `sk_err`
/// (`SO_ERROR` and a read consume it; later reads see end of file, `SO_ERROR` 0).
fn reported_error(fd: i32, ask: impl FnOnce(i32) -> Option<i32>) -> i32 {
    let entry = fdtable::get(fd);
    if entry.error_reported() {
        return 0;
    }
    let error = ask(fd).unwrap_or(0);
    if error != 0 {
        fdtable::set(fd, fdtable::get(fd).with_error_reported());
    }
    error
}

/// `epoll_ctl(epoll, op, fd, …)` returned `result`: a registration of an undecided TCP socket
/// is recorded (its `event` read only then), so that a relay placed on `fd` later gets it too.
/// Any other fd costs one table load.
pub(crate) fn after_epoll_ctl(
    epoll: i32,
    op: i32,
    fd: i32,
    result: i32,
    event: impl FnOnce() -> Option<(u32, u64)>,
) {
    if result != 0 {
        return;
    }
    let entry = fdtable::get(fd);
    // Undecided sockets, and those whose RDMA upgrade is pending: a relay socket may take
    // their fd number.
    let may_be_replaced =
        !entry.decided() && !entry.passive() || entry.upgrade() != fdtable::Upgrade::None;
    if entry.kind() != Kind::Tcp || !may_be_replaced {
        return;
    }
    match (op, event()) {
        (libc::EPOLL_CTL_ADD, Some((events, data))) => {
            if epollreg::add(epoll, fd, events, data) {
                fdtable::set(fd, fdtable::get(fd).with_epoll_recorded(true));
                fdtable::set(epoll, fdtable::get(epoll).with_epoll_recorded(true));
            } else {
                fdtable::set(fd, fdtable::get(fd).with_epoll_overflow());
            }
        }
        (libc::EPOLL_CTL_MOD, Some((events, data))) if entry.epoll_recorded() => {
            epollreg::modify(epoll, fd, events, data);
        }
        (libc::EPOLL_CTL_DEL, _) if entry.epoll_recorded() => epollreg::remove(epoll, fd),
        _ => {}
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
        run_rdma(plan, kind, allowed, Err(FallbackReason::StackUnavailable))
    }

    fn run_rdma(
        plan: &Plan,
        kind: Kind,
        allowed: &[&[u8]],
        rdma: Result<Endpoint, FallbackReason>,
    ) -> (Walked, Vec<FallbackReason>) {
        let mut reasons = Vec::new();
        let walked = walk(
            plan,
            kind,
            |n| allowed.contains(&n),
            |_| Err(FallbackReason::StackUnavailable),
            || rdma,
            |r| reasons.push(r),
        );
        (walked, reasons)
    }

    #[test]
    fn rdma_is_an_upgrade_of_the_next_kernel_transport() {
        let endpoint = Endpoint {
            gid: [1; 16],
            qpn: 2,
            psn: 3,
        };
        let p = plan(
            &[
                (Stack::Rdma, CongestionControl::Default),
                (Stack::Kernel, CongestionControl::Bbr),
            ],
            Isolation::None,
        );
        // Possible: carried by the next transport until the upgrade; nothing counted yet.
        let (walked, reasons) = run_rdma(&p, Kind::Tcp, &[b"bbr"], Ok(endpoint));
        assert_eq!(walked.used, Some((Stack::Kernel, CongestionControl::Bbr)));
        assert_eq!(walked.upgrade, Some(endpoint));
        assert!(reasons.is_empty());
        // Not possible: down the list with the reason, no upgrade.
        let (walked, reasons) = run_rdma(
            &p,
            Kind::Tcp,
            &[b"bbr"],
            Err(FallbackReason::PeerNotRegistered),
        );
        assert_eq!(walked.used, Some((Stack::Kernel, CongestionControl::Bbr)));
        assert_eq!(walked.upgrade, None);
        assert_eq!(reasons, [FallbackReason::PeerNotRegistered]);
        // UDP never; the last entry falls to the kernel default, upgrade kept.
        let (walked, reasons) = run_rdma(&p, Kind::Udp, &[], Ok(endpoint));
        assert_eq!(walked.upgrade, None);
        assert_eq!(reasons, [FallbackReason::UnsupportedProtocol]);
        let only = plan(
            &[(Stack::Rdma, CongestionControl::Default)],
            Isolation::None,
        );
        let (walked, _) = run_rdma(&only, Kind::Tcp, &[], Ok(endpoint));
        assert_eq!(
            (walked.used, walked.upgrade),
            (
                Some((Stack::Kernel, CongestionControl::Default)),
                Some(endpoint)
            )
        );
        // Dedicated: the upgrade would need a TCP connection the rule forbids.
        let dedicated = plan(
            &[(Stack::Rdma, CongestionControl::Default)],
            Isolation::Dedicated,
        );
        let (walked, _) = run_rdma(&dedicated, Kind::Tcp, &[], Ok(endpoint));
        assert_eq!((walked.used, walked.upgrade), (None, None));
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
                FallbackReason::UnsupportedProtocol,
                FallbackReason::IsolationForbids
            ]
        );
    }

    #[test]
    fn userspace_is_tried_for_tcp_outside_kernel_enforced_isolation() {
        let list = [
            (Stack::Userspace, CongestionControl::Bbr),
            (Stack::Kernel, CongestionControl::Cubic),
        ];
        let walk_with = |isolation, kind, outcome: Result<Connected, FallbackReason>| {
            let mut reasons = Vec::new();
            let mut tried = Vec::new();
            let walked = walk(
                &plan(&list, isolation),
                kind,
                |_| true,
                |cc| {
                    tried.push(cc);
                    outcome
                },
                || Err(FallbackReason::StackUnavailable),
                |r| reasons.push(r),
            );
            (walked, reasons, tried)
        };
        let (walked, reasons, tried) =
            walk_with(Isolation::None, Kind::Tcp, Ok(Connected::InProgress));
        assert_eq!(
            walked.used,
            Some((Stack::Userspace, CongestionControl::Bbr))
        );
        assert_eq!(walked.relayed, Some(Connected::InProgress));
        assert!(reasons.is_empty());
        assert_eq!(tried, [CongestionControl::Bbr]);
        // The instance cannot be had: down the list, with the agent's reason.
        let (walked, reasons, _) = walk_with(
            Isolation::None,
            Kind::Tcp,
            Err(FallbackReason::StackUnavailable),
        );
        assert_eq!(walked.used, Some((Stack::Kernel, CongestionControl::Cubic)));
        assert_eq!(walked.relayed, None);
        assert_eq!(reasons, [FallbackReason::StackUnavailable]);
        // Never tried under kernel-enforced isolation, nor for UDP.
        let (walked, reasons, tried) = walk_with(
            Isolation::KernelEnforced,
            Kind::Tcp,
            Ok(Connected::Established),
        );
        assert_eq!(walked.used, Some((Stack::Kernel, CongestionControl::Cubic)));
        assert_eq!(reasons, [FallbackReason::IsolationForbids]);
        assert!(tried.is_empty());
        let (walked, reasons, tried) =
            walk_with(Isolation::None, Kind::Udp, Ok(Connected::Established));
        assert_eq!(walked.used, Some((Stack::Kernel, CongestionControl::Cubic)));
        assert_eq!(reasons, [FallbackReason::UnsupportedProtocol]);
        assert!(tried.is_empty());
        // Dedicated isolation takes the user-space stack (it is not the kernel).
        let (walked, _, _) = walk_with(Isolation::Dedicated, Kind::Tcp, Ok(Connected::Established));
        assert_eq!(
            walked.used,
            Some((Stack::Userspace, CongestionControl::Bbr))
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
        assert_eq!(connect(800_003, "127.0.0.1:1".parse().ok()).0, Pre::Forward);
        assert_eq!(connect(800_004, "127.0.0.1:1".parse().ok()).0, Pre::Forward);
    }
}
