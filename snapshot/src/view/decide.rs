//! Deciding a connection: the chain walk, Service frontends and their backends.
//!
//! Two walks of a source's chain: the shim's fast path ([`Snapshot::walk`]: skips whole
//! policies and rules by their filters and decides up to [`WALK_WIDTH`] destinations in one
//! pass, so a Service costs about one walk, not one per group of backends) and the rule-by-rule
//! walk that `explain` traces ([`Snapshot::walk_traced`]). Property tests hold them equal.

use std::net::IpAddr;

use super::{
    Decision, DestinationClass, Mismatch, RuleRef, Snapshot, Trace, Verdict, Via, WorkloadId,
    cidr_contains, service_key,
};
use crate::encode::ip_key;
use crate::format::{
    self, AddressChecks, FilterProbe, OnlyThis, SameAddresses, SectionId, backend, chain,
    chain_index, chain_policy, cidr, identity_set, index_identity, index_interval, index_posting,
    peer, policy_filter, port, rule, rule_filter, service, workload,
};
use crate::{Action, Entity, Isolation, Location, LocationMatch, NO_IDENTITY, NO_ZONE, Protocol};

/// How many destinations one fast walk decides at once (a Service's backend groups; a mask of
/// this many bits says which are still in the running). Services with more groups take more
/// walks.
const WALK_WIDTH: usize = 16;

/// Backend records of a Service, as stored.
type BackendRecord = [u8; backend::LEN];

/// What a fast walk found for its destinations.
enum Walked<'a> {
    /// They all got this decision (the same rule, or all the default).
    Same(Decision<'a>),
    /// A rule other than Pass matched some and not others: they differ.
    Differ,
    /// Each must be walked on its own: a Pass rule matched some and not others, or the chain is
    /// indexed (an indexed walk follows one destination's rules).
    EachAlone,
}

/// Backends of one Service run (same identity and port) at one location: only their addresses
/// can set them apart. Indices into `run`; `excluded` is a subrange of `range` that belongs to
/// a nearer group.
#[derive(Clone, Copy)]
struct BackendGroup<'a> {
    run: &'a [BackendRecord],
    range: (usize, usize),
    excluded: (usize, usize),
}

impl<'a> BackendGroup<'a> {
    fn members(self) -> impl Iterator<Item = &'a BackendRecord> {
        let (start, end) = self.range;
        let (skip_start, skip_end) = self.excluded;
        (start..end)
            .filter(move |i| !(skip_start..skip_end).contains(i))
            .map(move |i| &self.run[i])
    }
}

impl<'a> Snapshot<'a> {
    /// Decides the transport for a connection from `workload` to `ip:port` over `protocol`.
    ///
    /// A Service frontend is resolved to its ready backends; when they all get the same
    /// outcome that is the decision, otherwise the installation default (the kernel picks the
    /// backend after `connect()`, so nothing else is safe). Allocation-free.
    pub fn decide<T: Trace>(
        &self,
        workload: WorkloadId,
        ip: IpAddr,
        port: u16,
        protocol: Protocol,
        trace: &mut T,
    ) -> Decision<'a> {
        let ip = ip.to_canonical();
        let Some(service) = self.service_at(ip, port, protocol) else {
            trace.backend(None);
            let (class, location) = self.classify(ip);
            let destination = Destination {
                class,
                location,
                ip,
                port,
                protocol,
            };
            return if trace.detailed() {
                self.walk_traced(workload, destination, trace)
            } else {
                self.walk_one(workload, destination, &mut OnlyThis)
            };
        };
        if !trace.detailed()
            && let Some(decision) = self.service_verdict(workload, service)
        {
            return decision;
        }
        self.decide_service(workload, service, ip, protocol, trace)
    }

    /// The decision for a connection to the Service frontend record `service` (at `ip`): its
    /// backends decided one by one (with a detailed `trace`) or in groups.
    pub(super) fn decide_service<T: Trace>(
        &self,
        workload: WorkloadId,
        service: usize,
        ip: IpAddr,
        protocol: Protocol,
        trace: &mut T,
    ) -> Decision<'a> {
        let backends = self.range(self.record(SectionId::Services, service), service::BACKENDS);
        let count = (backends.len() / backend::LEN) as u32;
        let (records, _) = backends.as_chunks::<{ backend::LEN }>();
        let agreed = if trace.detailed() {
            self.decide_each_backend(workload, records, protocol, trace)
        } else {
            self.decide_backends(workload, records, protocol)
        };
        match agreed {
            // Reported as the rule-by-rule walk does: where the first backend is.
            Some(decision) => Decision {
                via: Via::ServiceUnanimous { backends: count },
                location: self.classify_backend(backends).1,
                ..decision
            },
            None => self.default_decision(
                self.classify(ip).1,
                Via::ServiceAmbiguous { backends: count },
            ),
        }
    }

    /// The Service frontend record at `ip:port`, if there is one. ClusterIPs come from one
    /// service range: most destinations fall outside the first and last frontend, and skip the
    /// search.
    pub(super) fn service_at(&self, ip: IpAddr, port: u16, protocol: Protocol) -> Option<usize> {
        let (family, key) = ip_key(ip);
        let services = self.count(SectionId::Services);
        let outside = |index: usize, ordering| {
            let r = self.record(SectionId::Services, index);
            (family, key).cmp(&(service::FAMILY.get(r), service::IP.get(r))) == ordering
        };
        if services == 0
            || outside(0, std::cmp::Ordering::Less)
            || outside(services - 1, std::cmp::Ordering::Greater)
        {
            return None;
        }
        self.search(SectionId::Services, |r| {
            service_key(r).cmp(&(family, key, port, protocol as u8))
        })
    }

    /// `explain`'s decision for a Service's backends: every backend walked rule by rule and
    /// reported; `Some` when they all get the same outcome.
    fn decide_each_backend<T: Trace>(
        &self,
        workload: WorkloadId,
        records: &'a [BackendRecord],
        protocol: Protocol,
        trace: &mut T,
    ) -> Option<Decision<'a>> {
        let mut agreed: Option<Decision<'a>> = None;
        let mut unanimous = !records.is_empty();
        for record in records {
            let backend_ip = self.backend_address(record);
            let backend_port = backend::PORT.get(record);
            trace.backend(Some((backend_ip, backend_port)));
            let (class, location) = self.classify(backend_ip);
            let destination = Destination {
                class,
                location,
                ip: backend_ip,
                port: backend_port,
                protocol,
            };
            unanimous &= agree(&mut agreed, self.walk_traced(workload, destination, trace));
        }
        agreed.filter(|_| unanimous)
    }

    /// The fast path's decision for a Service's backends: `Some` when they all get the same
    /// outcome. Backends are sorted so that pod backends of one identity and port form a run,
    /// ordered by zone and node inside it; within a run only the location and the address can
    /// change a decision. So each location present (own node, own zone, elsewhere: at most
    /// three groups per run) is decided for one backend — all groups in one walk of the chain
    /// (see [`Snapshot::walk`]) — and the rest of a group shares its decision if its address is
    /// on the same side of every CIDR that decision checked; else it is decided on its own.
    fn decide_backends(
        &self,
        workload: WorkloadId,
        records: &'a [BackendRecord],
        protocol: Protocol,
    ) -> Option<Decision<'a>> {
        let mut agreed: Option<Decision<'a>> = None;
        let mut batch: [Option<BackendGroup<'a>>; WALK_WIDTH] = [None; WALK_WIDTH];
        let mut len = 0;
        for group in self.backend_groups(records) {
            batch[len] = Some(group);
            len += 1;
            if len == WALK_WIDTH {
                self.decide_groups(workload, &batch, protocol, &mut agreed)?;
                batch = [None; WALK_WIDTH];
                len = 0;
            }
        }
        if len > 0 {
            self.decide_groups(workload, &batch, protocol, &mut agreed)?;
        }
        agreed
    }

    /// The groups of [`Snapshot::decide_backends`], nearest first within each run; none empty.
    fn backend_groups(
        &self,
        records: &'a [BackendRecord],
    ) -> impl Iterator<Item = BackendGroup<'a>> + 'a {
        use backend::{IDENTITY, NODE, PORT, ZONE};
        let own = self.header_own_node();
        let own_zone = self.zone_of(own);
        let mut start = 0;
        let runs = std::iter::from_fn(move || {
            let first = records.get(start)?;
            let (identity, port) = (IDENTITY.get(first), PORT.get(first));
            let run_len = if identity == NO_IDENTITY {
                1 // not a pod: nothing to share with other backends
            } else {
                records[start..]
                    .partition_point(|b| (IDENTITY.get(b), PORT.get(b)) == (identity, port))
            };
            let run = &records[start..start + run_len];
            start += run_len;
            Some(run)
        });
        runs.flat_map(move |run| {
            let zone = run.partition_point(|b| ZONE.get(b) < own_zone)
                ..run.partition_point(|b| ZONE.get(b) <= own_zone);
            let in_zone = &run[zone.clone()];
            let node = (
                zone.start + in_zone.partition_point(|b| NODE.get(b) < own),
                zone.start + in_zone.partition_point(|b| NODE.get(b) <= own),
            );
            let zone = (zone.start, zone.end);
            // Without a zone of our own, "same zone" is empty and "elsewhere" is all but the node.
            let (same_zone, elsewhere) = if own_zone == NO_ZONE {
                ((0, 0), node)
            } else {
                (zone, zone)
            };
            [
                (node, (0, 0)),
                (same_zone, node),
                ((0, run.len()), elsewhere),
            ]
            .into_iter()
            .map(move |(range, excluded)| BackendGroup {
                run,
                range,
                excluded,
            })
            .filter(|group| group.members().next().is_some())
        })
    }

    /// Decides a batch of backend groups (the `Some`s of `batch`) into `agreed`; `None` as soon
    /// as two backends differ.
    fn decide_groups(
        &self,
        workload: WorkloadId,
        batch: &[Option<BackendGroup<'a>>; WALK_WIDTH],
        protocol: Protocol,
        agreed: &mut Option<Decision<'a>>,
    ) -> Option<()> {
        let groups = batch.iter().map_while(|g| *g);
        let len = groups.clone().count();
        let representative = |group: BackendGroup<'a>| {
            let first = group.members().next().expect("groups are not empty");
            self.backend_destination(first, protocol)
        };
        let first = batch[0].expect("a batch is not empty");
        let mut destinations = [representative(first); WALK_WIDTH];
        for (slot, group) in destinations.iter_mut().zip(groups.clone()) {
            *slot = representative(group);
        }
        let mut same = [SameAddresses::default(); WALK_WIDTH];
        match self.walk::<WALK_WIDTH, _>(workload, &destinations[..len], &mut same[..len]) {
            Walked::Differ => return None,
            Walked::Same(decision) => agree(agreed, decision).then_some(())?,
            Walked::EachAlone => {
                for (destination, same) in destinations[..len].iter().zip(&mut same) {
                    *same = SameAddresses::default();
                    agree(agreed, self.walk_one(workload, *destination, same)).then_some(())?;
                }
            }
        }
        // A decision that checked no address holds for every member: their records are not
        // even read (a Service's hundred backends are fifty cache lines).
        for (group, same) in groups.zip(same).filter(|(_, same)| !same.covers_all()) {
            for record in group.members().skip(1) {
                if same.contains(self.backend_address(record)) {
                    continue;
                }
                let destination = self.backend_destination(record, protocol);
                let decision = self.walk_one(workload, destination, &mut OnlyThis);
                agree(agreed, decision).then_some(())?;
            }
        }
        Some(())
    }

    /// Where a Service backend is, from its own record: a pod backend carries its identity,
    /// node and zone (validated to be the address book's), so the address book's hash table — a
    /// cache miss per backend group — is only probed for the others.
    fn classify_backend(&self, record: &[u8]) -> (DestinationClass, Location) {
        let node = backend::NODE.get(record);
        if node == format::NO_NODE {
            return self.classify(self.backend_address(record));
        }
        let own = self.header_own_node();
        let own_zone = self.zone_of(own);
        let location = if node == own {
            Location::SameNode
        } else if own_zone != NO_ZONE && backend::ZONE.get(record) == own_zone {
            Location::SameZone
        } else {
            Location::SameCluster
        };
        let identity = backend::IDENTITY.get(record);
        (DestinationClass::Pod { identity, node }, location)
    }

    /// A Service backend as the rules see it, classified by [`Snapshot::classify_backend`].
    fn backend_destination(&self, record: &[u8], protocol: Protocol) -> Destination {
        let (class, location) = self.classify_backend(record);
        Destination {
            class,
            location,
            ip: self.backend_address(record),
            port: backend::PORT.get(record),
            protocol,
        }
    }

    /// The fast walk for one destination; `same` is narrowed to the addresses whose networks
    /// checks would come out the same (with the same identity and location, they get the same
    /// decision).
    fn walk_one<S: AddressChecks>(
        &self,
        workload: WorkloadId,
        destination: Destination,
        same: &mut S,
    ) -> Decision<'a> {
        match self.walk::<1, _>(workload, &[destination], std::slice::from_mut(same)) {
            Walked::Same(decision) => decision,
            // One destination cannot be split from itself.
            Walked::Differ | Walked::EachAlone => unreachable!("a walk of one destination"),
        }
    }

    /// The shim's walk of `workload`'s chain for up to [`WALK_WIDTH`] destinations at once:
    /// whole policies and rules are skipped by their filters when no destination still in the
    /// running can match them, and the walk ends at the first rule that matches any of them.
    /// Each destination's `same` is narrowed by the checks made for it, exactly as a walk of
    /// that destination alone would (when they all match one rule, each was checked against
    /// the same rules).
    ///
    /// `WIDTH` is the most destinations the call can pass: a constant, so that the loops over
    /// them compile to straight code for one.
    fn walk<const WIDTH: usize, S: AddressChecks>(
        &self,
        workload: WorkloadId,
        destinations: &[Destination],
        same: &mut [S],
    ) -> Walked<'a> {
        debug_assert!((1..=WIDTH.min(WALK_WIDTH)).contains(&destinations.len()));
        debug_assert_eq!(destinations.len(), same.len());
        let len = destinations.len().min(WIDTH);
        let everyone: u32 = (1 << len) - 1;
        let mut probes = [probe_of(&destinations[0]); WIDTH];
        for (probe, destination) in probes.iter_mut().zip(destinations) {
            *probe = probe_of(destination);
        }
        if let Some(index) = self.chain_index(workload) {
            match destinations[0].ip {
                _ if len > 1 => return Walked::EachAlone,
                IpAddr::V4(v4) => {
                    let decision = self.walk_indexed(
                        workload,
                        index,
                        &destinations[0],
                        u32::from(v4),
                        &mut same[0],
                    );
                    return Walked::Same(decision);
                }
                IpAddr::V6(_) => {} // no IPv6 intervals: rule by rule
            }
        }
        let mut passed_tier: Option<u8> = None;
        for (policy_index, policy) in self.chain_policies(workload) {
            // A Pass ends its own tier only.
            let tier = policy_filter::TIER.get(policy);
            if passed_tier == Some(tier) {
                continue;
            }
            let mut admitted = 0u32;
            for (d, probe) in probes[..len].iter().enumerate() {
                admitted |= u32::from(probe.admits_policy(policy)) << d;
            }
            if admitted == 0 {
                continue;
            }
            let (first_rule, rule_count) = policy_filter::RULES.get(policy);
            let records = self.slice(SectionId::Rules, first_rule, rule_count);
            let (filters, _) = self
                .slice(SectionId::RuleFilters, first_rule, rule_count)
                .as_chunks::<{ rule_filter::LEN }>();
            for ((rule, record), filter) in (0..rule_count)
                .zip(records.chunks_exact(rule::LEN))
                .zip(filters)
            {
                let mut matched = 0u32;
                for d in 0..len {
                    if admitted & 1 << d != 0
                        && probes[d].admits(filter, &mut same[d])
                        && self
                            .rule_matches(record, &destinations[d], &mut same[d])
                            .is_ok()
                    {
                        matched |= 1 << d;
                    }
                }
                if matched == 0 {
                    continue;
                }
                let pass = rule::ACTION.get(record) == Action::Pass as u8;
                if matched != everyone {
                    return if pass {
                        Walked::EachAlone
                    } else {
                        Walked::Differ
                    };
                }
                if pass {
                    passed_tier = Some(tier);
                    break;
                }
                let matched = RuleRef {
                    policy: policy_index,
                    rule,
                };
                return Walked::Same(self.matched_decision(
                    matched,
                    record,
                    destinations[0].location,
                ));
            }
        }
        Walked::Same(self.default_decision(destinations[0].location, Via::Direct))
    }

    /// The index record of `workload`'s chain, when the chain is indexed.
    fn chain_index(&self, workload: WorkloadId) -> Option<&'a [u8]> {
        let indexes = self.section(SectionId::ChainIndexes);
        if indexes.is_empty() {
            return None;
        }
        let source = self.record(SectionId::Workloads, workload.0 as usize);
        let record = self.record(
            SectionId::ChainIndexes,
            workload::CHAIN.get(source) as usize,
        );
        (chain_index::INDEXED.get(record) == 1).then_some(record)
    }

    /// The fast walk of an indexed chain for one IPv4 destination: only the rules the index
    /// names for its identity, for the interval holding its address, and for every destination
    /// — merged in chain order, each checked in full. The interval narrows `same`: any address
    /// in it is named by the same networks rules.
    fn walk_indexed<S: AddressChecks>(
        &self,
        workload: WorkloadId,
        index: &'a [u8],
        destination: &Destination,
        v4: u32,
        same: &mut S,
    ) -> Decision<'a> {
        let probe = probe_of(destination);
        let identity_rules = match destination.class {
            DestinationClass::Pod { identity, .. } if identity != NO_IDENTITY => {
                let identities = self.range(index, chain_index::IDENTITIES);
                let (entries, _) = identities.as_chunks::<{ index_identity::LEN }>();
                entries
                    .binary_search_by(|e| index_identity::IDENTITY.get(e).cmp(&identity))
                    .map_or(&[][..], |found| {
                        self.range(&entries[found], index_identity::RULES)
                    })
            }
            _ => &[],
        };
        let intervals = self.range(index, chain_index::INTERVALS);
        let (intervals, _) = intervals.as_chunks::<{ index_interval::LEN }>();
        // Validated: the first interval starts at 0.
        let at = intervals
            .partition_point(|i| index_interval::FIRST.get(i) <= v4)
            .saturating_sub(1);
        let last = intervals
            .get(at + 1)
            .map_or(u32::MAX, |next| index_interval::FIRST.get(next) - 1);
        let (first, network_rules) = intervals.get(at).map_or((0, &[][..]), |i| {
            (
                index_interval::FIRST.get(i),
                self.range(i, index_interval::RULES),
            )
        });
        same.narrow(v4, first, last);
        let lists = [
            self.range(index, chain_index::ALWAYS),
            identity_rules,
            network_rules,
        ]
        .map(|list| list.as_chunks::<{ index_posting::LEN }>().0);

        let source = self.record(SectionId::Workloads, workload.0 as usize);
        let chain = self.record(SectionId::Chains, workload::CHAIN.get(source) as usize);
        let entries = self.range(chain, chain::POLICIES);
        let (entries, _) = entries.as_chunks::<{ chain_policy::LEN }>();
        let (policy_filters, _) = self
            .section(SectionId::PolicyFilters)
            .as_chunks::<{ policy_filter::LEN }>();
        let (rule_filters, _) = self
            .section(SectionId::RuleFilters)
            .as_chunks::<{ rule_filter::LEN }>();
        let mut passed_tier: Option<u8> = None;
        for position in merged(lists) {
            // Validated (rebuilt): every position names a rule of the chain.
            let Some(entry) = entries.get((position >> 16) as usize) else {
                continue;
            };
            let policy_index = chain_policy::POLICY.get(entry);
            let Some(policy) = policy_filters.get(policy_index as usize) else {
                continue;
            };
            let tier = policy_filter::TIER.get(policy);
            if passed_tier == Some(tier) {
                continue;
            }
            let rule = position & 0xffff;
            let (first_rule, _) = policy_filter::RULES.get(policy);
            let number = (first_rule + rule) as usize;
            let (Some(filter), record) = (
                rule_filters.get(number),
                self.record(SectionId::Rules, number),
            ) else {
                continue;
            };
            if !probe.admits(filter, same) || self.rule_matches(record, destination, same).is_err()
            {
                continue;
            }
            if rule::ACTION.get(record) == Action::Pass as u8 {
                passed_tier = Some(tier);
                continue;
            }
            let matched = RuleRef {
                policy: policy_index,
                rule,
            };
            return self.matched_decision(matched, record, destination.location);
        }
        self.default_decision(destination.location, Via::Direct)
    }

    /// The decision of a rule that matched a destination at `location`.
    pub(super) fn matched_decision(
        &self,
        rule: RuleRef,
        record: &'a [u8],
        location: Location,
    ) -> Decision<'a> {
        Decision {
            location,
            matched: Some(rule),
            isolation: rule::ISOLATION.decode_or(record, Isolation::from_byte, Isolation::None),
            via: Via::Direct,
            transports: self.range(record, rule::TRANSPORTS),
        }
    }

    /// The policies of `workload`'s chain in evaluation order: number and filter record.
    fn chain_policies(
        &self,
        workload: WorkloadId,
    ) -> impl Iterator<Item = (u32, &'a [u8; policy_filter::LEN])> + 'a {
        let source = self.record(SectionId::Workloads, workload.0 as usize);
        let chain = self.record(SectionId::Chains, workload::CHAIN.get(source) as usize);
        let (policy_filters, _) = self
            .section(SectionId::PolicyFilters)
            .as_chunks::<{ policy_filter::LEN }>();
        self.range(chain, chain::POLICIES)
            .chunks_exact(chain_policy::LEN)
            .map(|c| chain_policy::POLICY.get(c))
            // Validated: every chain entry names a policy.
            .filter_map(move |index| Some((index, policy_filters.get(index as usize)?)))
    }

    /// The walk `explain` traces: every rule of the chain in order, each with its own first
    /// reason, no filters.
    fn walk_traced<T: Trace>(
        &self,
        workload: WorkloadId,
        destination: Destination,
        trace: &mut T,
    ) -> Decision<'a> {
        let mut passed_tier: Option<u8> = None;
        for (policy_index, policy) in self.chain_policies(workload) {
            let tier = policy_filter::TIER.get(policy);
            let (first_rule, rule_count) = policy_filter::RULES.get(policy);
            let reference = |rule| RuleRef {
                policy: policy_index,
                rule,
            };
            if passed_tier == Some(tier) {
                for rule in 0..rule_count {
                    trace.rule(reference(rule), Verdict::SkippedByPass);
                }
                continue;
            }
            let records = self.slice(SectionId::Rules, first_rule, rule_count);
            for (rule, record) in (0..rule_count).zip(records.chunks_exact(rule::LEN)) {
                match self.rule_matches(record, &destination, &mut OnlyThis) {
                    Err(mismatch) => trace.rule(reference(rule), Verdict::NoMatch(mismatch)),
                    Ok(()) if rule::ACTION.get(record) == Action::Pass as u8 => {
                        trace.rule(reference(rule), Verdict::Passed);
                        passed_tier = Some(tier);
                        for skipped in rule + 1..rule_count {
                            trace.rule(reference(skipped), Verdict::SkippedByPass);
                        }
                        break;
                    }
                    Ok(()) => {
                        trace.rule(reference(rule), Verdict::Matched);
                        return self.matched_decision(
                            reference(rule),
                            record,
                            destination.location,
                        );
                    }
                }
            }
        }
        self.default_decision(destination.location, Via::Direct)
    }

    fn rule_matches<S: AddressChecks>(
        &self,
        record: &[u8],
        to: &Destination,
        same: &mut S,
    ) -> Result<(), Mismatch> {
        let Destination {
            class,
            location,
            ip,
            port,
            protocol,
        } = *to;
        let flags = rule::FLAGS.get(record);
        if flags & format::RULE_HAS_PORTS != 0 {
            if rule::PROTOCOLS.get(record) & crate::encode::protocol_bit(protocol) == 0
                || port < rule::FIRST_PORT.get(record)
                || port > rule::LAST_PORT.get(record)
            {
                return Err(Mismatch::Port);
            }
            // With one port entry the span (validated against it) is the entry: done.
            let ports = self.range(record, rule::PORTS);
            let hit = rule::PORTS.get(record).1 == 1
                || ports.chunks_exact(port::LEN).any(|p| {
                    port::PROTOCOL.get(p) == protocol as u8
                        && (port::FIRST.get(p)..=port::LAST.get(p)).contains(&port)
                });
            if !hit {
                return Err(Mismatch::Port);
            }
        }
        let required =
            rule::LOCATION.decode_or(record, LocationMatch::from_byte, LocationMatch::Any);
        if !required.admits(location) {
            return Err(Mismatch::Location {
                required,
                actual: location,
            });
        }
        if flags & format::RULE_HAS_PEERS != 0 {
            let peers = self.range(record, rule::PEERS);
            let hit = peers
                .chunks_exact(peer::LEN)
                .any(|p| match peer::KIND.get(p) {
                    format::PEER_PODS => match class {
                        DestinationClass::Pod { identity, .. } if identity != NO_IDENTITY => {
                            contains_sorted(self.identity_set(peer::IDENTITY_SET.get(p)), identity)
                        }
                        _ => false,
                    },
                    format::PEER_NETWORKS => self
                        .range(p, peer::NETWORKS)
                        .chunks_exact(cidr::LEN)
                        .any(|cidr| match (format::cidr4_span(cidr), ip) {
                            (Some((first, last)), IpAddr::V4(v4)) => {
                                same.narrow(u32::from(v4), first, last)
                            }
                            (None, IpAddr::V6(_)) => {
                                same.only_this();
                                cidr_contains(cidr, ip)
                            }
                            _ => false, // the other family: false for every address of this one
                        }),
                    format::PEER_ENTITY => {
                        Entity::from_byte(peer::ENTITY.get(p)).is_some_and(|e| e.admits(location))
                    }
                    _ => false,
                });
            if !hit {
                return Err(Mismatch::Peer);
            }
        }
        Ok(())
    }
}

/// Whether a sorted identity set holds `identity`.
fn contains_sorted(set: &[u8], identity: u32) -> bool {
    let (entries, _) = set.as_chunks::<{ identity_set::LEN }>();
    entries
        .binary_search_by(|entry| identity_set::IDENTITY.get(entry).cmp(&identity))
        .is_ok()
}

/// A connection's destination as the rules see it.
#[derive(Clone, Copy, Debug)]
struct Destination {
    class: DestinationClass,
    location: Location,
    ip: IpAddr,
    port: u16,
    protocol: Protocol,
}

/// Keeps the first decision and says whether `decision` has the same outcome.
fn agree<'a>(agreed: &mut Option<Decision<'a>>, decision: Decision<'a>) -> bool {
    match agreed {
        None => {
            *agreed = Some(decision);
            true
        }
        Some(first) => first.same_outcome(&decision),
    }
}

/// The positions of three ascending lists, merged in order, each once.
fn merged<'l>(lists: [&'l [[u8; index_posting::LEN]]; 3]) -> impl Iterator<Item = u32> + 'l {
    let mut heads = lists.map(|list| {
        list.iter()
            .map(|p| index_posting::POSITION.get(p))
            .peekable()
    });
    std::iter::from_fn(move || {
        let next = heads.iter_mut().filter_map(|h| h.peek().copied()).min()?;
        for head in &mut heads {
            head.next_if_eq(&next);
        }
        Some(next)
    })
}

/// What the filters are tested against for `destination`.
fn probe_of(destination: &Destination) -> FilterProbe {
    let identity = match destination.class {
        DestinationClass::Pod { identity, .. } if identity != NO_IDENTITY => Some(identity),
        _ => None,
    };
    FilterProbe {
        port: destination.port,
        protocol_bit: crate::encode::protocol_bit(destination.protocol),
        location_bit: 1 << (destination.location as u8),
        identity_mask: identity.map_or(0, format::rule_bloom_mask),
        policy_identity_mask: identity.map_or(0, format::policy_bloom_mask),
        v4: match destination.ip {
            IpAddr::V4(v4) => Some(u32::from(v4)),
            IpAddr::V6(_) => None,
        },
    }
}
