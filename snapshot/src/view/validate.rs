//! `Snapshot::parse`'s full check of the sections, one function per section group, in the
//! order the sections depend on each other (nodes before the address book that names them,
//! the address book before the backends it must agree with, ranges before the summaries that
//! follow them). After it, no lookup can index out of bounds or meet an unknown enum byte.

use std::collections::HashMap;

use super::{DecodeError, DestinationClass, Snapshot, name_of, service_key, transport_choice};
use crate::format::{
    self, SectionId, address4, address6, backend, chain, chain_index, chain_policy, cidr,
    endpoint_address, header, identity_set, identity_set_range, node, peer, policy, port, rule,
    service, service_verdict, service_verdict_row, workload, workload_address, zone,
};
use crate::{
    Action, Entity, Isolation, Location, LocationMatch, NO_IDENTITY, NO_ZONE, PolicyKind, Protocol,
    Tier,
};

/// The error for record `index` of `section`.
fn bad(section: SectionId, index: usize, problem: &'static str) -> DecodeError {
    DecodeError::BadRecord {
        section: name_of(section),
        index,
        problem,
    }
}

/// What a rule's summaries are built from: its port span, location, whether every peer is a
/// pods peer, and the policy Bloom filter of its pods peers.
type RuleSummary = ((u16, u16, u8), LocationMatch, bool, u128);

impl Snapshot<'_> {
    pub(super) fn validate(&self) -> Result<(), DecodeError> {
        self.validate_header_and_nodes()?;
        self.validate_networks()?;
        self.validate_addresses()?;
        self.validate_services()?;
        self.validate_peers_and_ports()?;
        self.validate_rules()?;
        self.validate_summaries()?;
        self.validate_policies_and_chains()?;
        self.validate_chain_indexes()?;
        self.validate_workloads()?;
        self.validate_service_verdicts()
    }

    /// That the range `field` of record `index` of `from` lies inside its target section.
    fn check_range(
        &self,
        from: SectionId,
        index: usize,
        record: &[u8],
        field: format::Range,
    ) -> Result<(), DecodeError> {
        self.check_span(from, index, field.target, field.get(record))
    }

    /// That `offset..offset + len` records lie inside section `to`.
    fn check_span(
        &self,
        from: SectionId,
        index: usize,
        to: SectionId,
        (offset, len): (u32, u32),
    ) -> Result<(), DecodeError> {
        if u64::from(offset) + u64::from(len) > self.count(to) as u64 {
            return Err(bad(from, index, "range points past its target section"));
        }
        Ok(())
    }

    /// That the string `field` of record `index` of `from` is in bounds and UTF-8.
    fn check_str(
        &self,
        from: SectionId,
        index: usize,
        record: &[u8],
        field: format::Str,
    ) -> Result<(), DecodeError> {
        let (offset, len) = field.get(record);
        self.check_span(from, index, field.table, (offset, len))?;
        std::str::from_utf8(self.slice(field.table, offset, len))
            .map(|_| ())
            .map_err(|_| bad(from, index, "string is not UTF-8"))
    }

    fn validate_header_and_nodes(&self) -> Result<(), DecodeError> {
        if self.header_own_node() as usize >= self.count(SectionId::Nodes) {
            return Err(DecodeError::BadSection("own node index out of range"));
        }
        if transport_choice(header::DEFAULT_TRANSPORT.slice(self.bytes)).is_none() {
            return Err(DecodeError::BadSection(
                "default transport holds an unknown value",
            ));
        }
        for (i, r) in self.records(SectionId::Zones).enumerate() {
            self.check_str(SectionId::Zones, i, r, zone::NAME)?;
        }
        let zones = self.count(SectionId::Zones) as u32;
        for (i, r) in self.records(SectionId::Nodes).enumerate() {
            self.check_str(SectionId::Nodes, i, r, node::NAME)?;
            let zone = node::ZONE.get(r);
            if zone != NO_ZONE && zone >= zones {
                return Err(bad(SectionId::Nodes, i, "zone out of range"));
            }
        }
        Ok(())
    }

    fn validate_networks(&self) -> Result<(), DecodeError> {
        for id in [SectionId::ClusterNetworks, SectionId::Networks] {
            for (i, r) in self.records(id).enumerate() {
                let ok = match cidr::FAMILY.get(r) {
                    4 => cidr::PREFIX.get(r) <= 32,
                    6 => cidr::PREFIX.get(r) <= 128,
                    _ => false,
                };
                if !ok {
                    return Err(bad(id, i, "bad CIDR family or prefix"));
                }
            }
        }
        Ok(())
    }

    fn validate_addresses(&self) -> Result<(), DecodeError> {
        let nodes = self.count(SectionId::Nodes) as u32;
        let mut free = 0usize;
        for (i, r) in self.records(SectionId::Addresses4).enumerate() {
            let kind = address4::KIND.get(r);
            if kind == format::EMPTY_SLOT {
                free += 1;
                continue;
            }
            check_address(kind, address4::NODE.get(r), nodes)
                .map_err(|p| bad(SectionId::Addresses4, i, p))?;
            // Reachable by its own probe sequence, and the first slot holding its address:
            // a lookup finds exactly this record.
            if self.address4(address4::IP.get(r)) != Some(i) {
                return Err(bad(
                    SectionId::Addresses4,
                    i,
                    "address not in its probe sequence",
                ));
            }
        }
        if free == 0 {
            return Err(DecodeError::BadSection("addresses4 has no free slot"));
        }
        let mut previous: Option<[u8; 16]> = None;
        for (i, r) in self.records(SectionId::Addresses6).enumerate() {
            let ip = address6::IP.get(r);
            if previous.is_some_and(|p| p >= ip) {
                return Err(bad(SectionId::Addresses6, i, "not sorted"));
            }
            previous = Some(ip);
            check_address(address6::KIND.get(r), address6::NODE.get(r), nodes)
                .map_err(|p| bad(SectionId::Addresses6, i, p))?;
        }
        Ok(())
    }

    fn validate_services(&self) -> Result<(), DecodeError> {
        let mut previous = None;
        for (i, r) in self.records(SectionId::Services).enumerate() {
            let key = service_key(r);
            let (family, _, _, protocol) = key;
            if !matches!(family, 4 | 6) || Protocol::from_byte(protocol).is_none() {
                return Err(bad(SectionId::Services, i, "bad family or protocol"));
            }
            if previous.is_some_and(|p| p >= key) {
                return Err(bad(SectionId::Services, i, "not sorted"));
            }
            previous = Some(key);
            self.check_range(SectionId::Services, i, r, service::BACKENDS)?;
        }
        let mut previous = None;
        for (i, r) in self.records(SectionId::EndpointAddresses).enumerate() {
            let key = (endpoint_address::FAMILY.get(r), endpoint_address::IP.get(r));
            if !matches!(key.0, 4 | 6) {
                return Err(bad(SectionId::EndpointAddresses, i, "bad family"));
            }
            if previous.is_some_and(|p| p >= key) {
                return Err(bad(SectionId::EndpointAddresses, i, "not sorted"));
            }
            previous = Some(key);
        }
        for (i, r) in self.records(SectionId::Backends).enumerate() {
            let at = backend::ADDRESS.get(r) as usize;
            let named = match backend::SOURCE.get(r) {
                backend::IN_ADDRESSES4 => self
                    .section(SectionId::Addresses4)
                    .chunks_exact(address4::LEN)
                    .nth(at)
                    .is_some_and(|slot| address4::KIND.get(slot) != format::EMPTY_SLOT),
                backend::IN_ADDRESSES6 => at < self.count(SectionId::Addresses6),
                backend::IN_ENDPOINTS => at < self.count(SectionId::EndpointAddresses),
                _ => return Err(bad(SectionId::Backends, i, "unknown address source")),
            };
            if !named {
                return Err(bad(SectionId::Backends, i, "names no address"));
            }
            // An address the book holds is named there, so that its entry is the one lookups
            // find (and each address has one record).
            let class = self.classify(self.backend_address(r)).0;
            let in_book = !matches!(class, DestinationClass::Unknown);
            if in_book == (backend::SOURCE.get(r) == backend::IN_ENDPOINTS) {
                return Err(bad(
                    SectionId::Backends,
                    i,
                    "address named outside the address book that holds it",
                ));
            }
            // What a lookup groups backends by must be what the address book says.
            let (identity, node) = match class {
                DestinationClass::Pod { identity, node } => (identity, node),
                _ => (NO_IDENTITY, format::NO_NODE),
            };
            let zone = if node == format::NO_NODE {
                NO_ZONE
            } else {
                self.zone_of(node)
            };
            let stored = (
                backend::IDENTITY.get(r),
                backend::NODE.get(r),
                backend::ZONE.get(r),
            );
            if stored != (identity, node, zone) {
                return Err(bad(
                    SectionId::Backends,
                    i,
                    "identity, node or zone differs from the address book",
                ));
            }
        }
        for (i, r) in self.records(SectionId::Services).enumerate() {
            let backends = self.range(r, service::BACKENDS);
            if !backends
                .chunks_exact(backend::LEN)
                .map(|b| self.backend_key(b))
                .is_sorted()
            {
                return Err(bad(SectionId::Services, i, "backends not sorted"));
            }
        }
        Ok(())
    }

    fn validate_peers_and_ports(&self) -> Result<(), DecodeError> {
        let sets = self.count(SectionId::IdentitySetRanges);
        for (i, r) in self.records(SectionId::IdentitySetRanges).enumerate() {
            self.check_range(
                SectionId::IdentitySetRanges,
                i,
                r,
                identity_set_range::MEMBERS,
            )?;
            let members = self.range(r, identity_set_range::MEMBERS);
            let identities = members.chunks_exact(identity_set::LEN);
            if !identities
                .map(|e| identity_set::IDENTITY.get(e))
                .is_sorted()
            {
                return Err(bad(
                    SectionId::IdentitySetRanges,
                    i,
                    "identity set not sorted",
                ));
            }
        }
        for (i, r) in self.records(SectionId::Peers).enumerate() {
            match peer::KIND.get(r) {
                format::PEER_PODS => {
                    if peer::IDENTITY_SET.get(r) as usize >= sets {
                        return Err(bad(
                            SectionId::Peers,
                            i,
                            "names an identity set that does not exist",
                        ));
                    }
                }
                format::PEER_NETWORKS => {
                    self.check_range(SectionId::Peers, i, r, peer::NETWORKS)?;
                }
                format::PEER_ENTITY => {
                    if Entity::from_byte(peer::ENTITY.get(r)).is_none() {
                        return Err(bad(SectionId::Peers, i, "unknown entity"));
                    }
                }
                _ => return Err(bad(SectionId::Peers, i, "unknown peer kind")),
            }
        }
        for (i, r) in self.records(SectionId::Ports).enumerate() {
            if Protocol::from_byte(port::PROTOCOL.get(r)).is_none()
                || port::FIRST.get(r) > port::LAST.get(r)
            {
                return Err(bad(SectionId::Ports, i, "bad protocol or range"));
            }
        }
        for (i, r) in self.records(SectionId::Transports).enumerate() {
            if transport_choice(r).is_none() {
                return Err(bad(
                    SectionId::Transports,
                    i,
                    "unknown stack or congestion control",
                ));
            }
        }
        Ok(())
    }

    fn validate_rules(&self) -> Result<(), DecodeError> {
        for (i, r) in self.records(SectionId::Rules).enumerate() {
            self.check_str(SectionId::Rules, i, r, rule::NAME)?;
            if Action::from_byte(rule::ACTION.get(r)).is_none()
                || LocationMatch::from_byte(rule::LOCATION.get(r)).is_none()
                || Isolation::from_byte(rule::ISOLATION.get(r)).is_none()
            {
                return Err(bad(
                    SectionId::Rules,
                    i,
                    "unknown action, location or isolation",
                ));
            }
            for field in [rule::PEERS, rule::PORTS, rule::TRANSPORTS] {
                self.check_range(SectionId::Rules, i, r, field)?;
            }
        }
        Ok(())
    }

    /// Recomputes every rule's port span and filter and every policy's summary from the rules
    /// they describe: lookups skip rules and policies on their word, so a wrong one would
    /// silently change decisions. Runs after every range has been checked.
    fn validate_summaries(&self) -> Result<(), DecodeError> {
        let rules = self.validate_rule_filters()?;
        self.validate_policy_filters(&rules)
    }

    /// Checks each rule's port span and filter; returns what the policy summaries need.
    fn validate_rule_filters(&self) -> Result<Vec<RuleSummary>, DecodeError> {
        if self.count(SectionId::RuleFilters) != self.count(SectionId::Rules) {
            return Err(DecodeError::BadSection(
                "rule-filters does not hold one record per rule",
            ));
        }
        // Blooms per identity set range: rules share sets, and sets can be long.
        let mut set_blooms: HashMap<u32, (u128, u64)> = HashMap::new();
        let mut summaries = Vec::with_capacity(self.count(SectionId::Rules));
        let rules = self.records(SectionId::Rules);
        for (i, (r, stored)) in rules.zip(self.records(SectionId::RuleFilters)).enumerate() {
            let span = self.port_span(r);
            let stored_span = (
                rule::FIRST_PORT.get(r),
                rule::LAST_PORT.get(r),
                rule::PROTOCOLS.get(r),
            );
            if stored_span != span {
                return Err(bad(
                    SectionId::Rules,
                    i,
                    "port span differs from the rule's ports",
                ));
            }
            let location =
                rule::LOCATION.decode_or(r, LocationMatch::from_byte, LocationMatch::Any);
            let has_peers = rule::FLAGS.get(r) & format::RULE_HAS_PEERS != 0;
            let mut filter = format::RuleFilter::new(span, location, has_peers);
            let mut pods_only = has_peers;
            let mut policy_bloom = 0u128;
            for p in self.range(r, rule::PEERS).chunks_exact(peer::LEN) {
                match peer::KIND.get(p) {
                    format::PEER_PODS => {
                        let set = peer::IDENTITY_SET.get(p);
                        let (bloom, rule_bloom) = *set_blooms.entry(set).or_insert_with(|| {
                            let ids = self.identity_set(set).chunks_exact(identity_set::LEN);
                            format::identity_set_blooms(ids.map(|e| identity_set::IDENTITY.get(e)))
                        });
                        filter.add_pods(rule_bloom);
                        policy_bloom |= bloom;
                    }
                    format::PEER_NETWORKS => {
                        pods_only = false;
                        let cidrs = self.range(p, peer::NETWORKS);
                        for cidr in cidrs.chunks_exact(cidr::LEN) {
                            filter.add_cidr(cidr);
                        }
                    }
                    _ => {
                        pods_only = false;
                        filter.add_entity(peer::ENTITY.decode_or(
                            p,
                            Entity::from_byte,
                            Entity::World,
                        ));
                    }
                }
            }
            if stored != filter.to_bytes() {
                return Err(bad(
                    SectionId::Rules,
                    i,
                    "rule filter differs from the rule",
                ));
            }
            summaries.push((span, location, pods_only, policy_bloom));
        }
        Ok(summaries)
    }

    /// `(first, last, protocol mask)` covering a rule's port entries; everything without.
    fn port_span(&self, r: &[u8]) -> (u16, u16, u8) {
        let everything = (0, u16::MAX, 0xff);
        if rule::FLAGS.get(r) & format::RULE_HAS_PORTS == 0 {
            return everything;
        }
        let ports = self.range(r, rule::PORTS);
        let start = if ports.is_empty() {
            everything
        } else {
            (u16::MAX, 0, 0)
        };
        ports
            .chunks_exact(port::LEN)
            .fold(start, |(first, last, mask), p| {
                let protocol = port::PROTOCOL.decode_or(p, Protocol::from_byte, Protocol::Tcp);
                (
                    first.min(port::FIRST.get(p)),
                    last.max(port::LAST.get(p)),
                    mask | crate::encode::protocol_bit(protocol),
                )
            })
    }

    /// Checks each policy's summary against its rules' (from [`Self::validate_rule_filters`]).
    fn validate_policy_filters(&self, rules: &[RuleSummary]) -> Result<(), DecodeError> {
        if self.count(SectionId::PolicyFilters) != self.count(SectionId::Policies) {
            return Err(DecodeError::BadSection(
                "policy-filters does not hold one record per policy",
            ));
        }
        let policies = self.records(SectionId::Policies);
        for (i, (r, stored)) in policies
            .zip(self.records(SectionId::PolicyFilters))
            .enumerate()
        {
            let (first, count) = policy::RULES.get(r);
            let mut summary = format::PolicySummary::new(first, count, policy::TIER.get(r));
            let own = rules.iter().skip(first as usize).take(count as usize);
            for (span, location, pods_only, bloom) in own {
                summary.add_rule(*span, *location, *pods_only);
                summary.add_pods(*bloom);
            }
            if stored != summary.to_bytes() {
                return Err(bad(
                    SectionId::PolicyFilters,
                    i,
                    "summary differs from the policy's rules",
                ));
            }
        }
        Ok(())
    }

    fn validate_policies_and_chains(&self) -> Result<(), DecodeError> {
        for (i, r) in self.records(SectionId::Policies).enumerate() {
            if PolicyKind::from_byte(policy::KIND.get(r)).is_none()
                || Tier::from_byte(policy::TIER.get(r)).is_none()
            {
                return Err(bad(SectionId::Policies, i, "unknown kind or tier"));
            }
            self.check_str(SectionId::Policies, i, r, policy::NAMESPACE)?;
            self.check_str(SectionId::Policies, i, r, policy::NAME)?;
            self.check_range(SectionId::Policies, i, r, policy::RULES)?;
        }
        for (i, r) in self.records(SectionId::Chains).enumerate() {
            self.check_range(SectionId::Chains, i, r, chain::POLICIES)?;
        }
        let policies = self.count(SectionId::Policies) as u32;
        for (i, r) in self.records(SectionId::ChainPolicies).enumerate() {
            if chain_policy::POLICY.get(r) >= policies {
                return Err(bad(
                    SectionId::ChainPolicies,
                    i,
                    "policy index out of range",
                ));
            }
        }
        Ok(())
    }

    /// The chain indexes must be exactly what the encoder builds from the rules for the chains
    /// marked indexed: rebuilt and compared, so a lookup can trust every position and interval.
    fn validate_chain_indexes(&self) -> Result<(), DecodeError> {
        let indexes = self.section(SectionId::ChainIndexes);
        let index_sections = [
            SectionId::IndexIdentities,
            SectionId::IndexIntervals,
            SectionId::IndexPostings,
        ];
        if indexes.is_empty() {
            return match index_sections
                .into_iter()
                .find(|id| !self.section(*id).is_empty())
            {
                Some(id) => Err(bad(id, 0, "index records without chain indexes")),
                None => Ok(()),
            };
        }
        if self.count(SectionId::ChainIndexes) != self.count(SectionId::Chains) {
            return Err(bad(SectionId::ChainIndexes, 0, "not one record per chain"));
        }
        let marks: Vec<u32> = self
            .records(SectionId::ChainIndexes)
            .map(|r| chain_index::INDEXED.get(r))
            .collect();
        if let Some(i) = marks.iter().position(|mark| *mark > 1) {
            return Err(bad(
                SectionId::ChainIndexes,
                i,
                "indexed is neither 0 nor 1",
            ));
        }
        let rebuilt = crate::chain_index::build(
            &crate::chain_index::RuleSections {
                chains: self.section(SectionId::Chains),
                chain_policies: self.section(SectionId::ChainPolicies),
                policy_filters: self.section(SectionId::PolicyFilters),
                rules: self.section(SectionId::Rules),
                peers: self.section(SectionId::Peers),
                networks: self.section(SectionId::Networks),
                identity_sets: self.section(SectionId::IdentitySets),
                identity_set_ranges: self.section(SectionId::IdentitySetRanges),
            },
            |chain, _| marks[chain] == 1,
        );
        let stored = [
            (SectionId::ChainIndexes, &rebuilt.chain_indexes),
            (SectionId::IndexIdentities, &rebuilt.identities),
            (SectionId::IndexIntervals, &rebuilt.intervals),
            (SectionId::IndexPostings, &rebuilt.postings),
        ];
        for (id, expected) in stored {
            if self.section(id) != expected.as_slice() {
                return Err(bad(id, 0, "differs from the index of the rules it names"));
            }
        }
        Ok(())
    }

    /// Service verdicts, when present: whole rows (one record per frontend), a row for every
    /// chain, each record naming a location and, for a rule, a rule that exists (not whether it
    /// is the right one: see `verdicts`).
    fn validate_service_verdicts(&self) -> Result<(), DecodeError> {
        use service_verdict::{LOCATION, OUTCOME, OUTCOME_AMBIGUOUS, OUTCOME_RULE, POLICY, RULE};
        let (verdicts, rows) = (
            self.count(SectionId::ServiceVerdicts),
            self.count(SectionId::ServiceVerdictRows),
        );
        if rows == 0 && verdicts == 0 {
            return Ok(());
        }
        let services = self.count(SectionId::Services);
        if rows != self.count(SectionId::Chains)
            || (services == 0 && verdicts != 0)
            || (services != 0 && !verdicts.is_multiple_of(services))
        {
            return Err(DecodeError::BadSection(
                "service verdicts are not a row of every Service for every chain",
            ));
        }
        let distinct = verdicts.checked_div(services).unwrap_or(0);
        for (i, r) in self.records(SectionId::ServiceVerdictRows).enumerate() {
            let row = service_verdict_row::ROW.get(r);
            if row != service_verdict_row::NONE && row as usize >= distinct.max(1) {
                return Err(bad(SectionId::ServiceVerdictRows, i, "row out of range"));
            }
        }
        let policies = self.count(SectionId::Policies);
        for (i, r) in self.records(SectionId::ServiceVerdicts).enumerate() {
            let here = |problem| bad(SectionId::ServiceVerdicts, i, problem);
            if OUTCOME.get(r) > OUTCOME_AMBIGUOUS {
                return Err(here("unknown outcome"));
            }
            if Location::from_byte(LOCATION.get(r)).is_none() {
                return Err(here("unknown location"));
            }
            if OUTCOME.get(r) == OUTCOME_RULE {
                let policy = POLICY.get(r) as usize;
                if policy >= policies {
                    return Err(here("policy out of range"));
                }
                let rules = policy::RULES
                    .get(self.record(SectionId::Policies, policy))
                    .1;
                if RULE.get(r) >= rules {
                    return Err(here("rule out of range"));
                }
            }
        }
        Ok(())
    }

    fn validate_workloads(&self) -> Result<(), DecodeError> {
        let chains = self.count(SectionId::Chains) as u32;
        let mut previous: Option<(&str, &str)> = None;
        for (i, r) in self.records(SectionId::Workloads).enumerate() {
            self.check_str(SectionId::Workloads, i, r, workload::NAMESPACE)?;
            self.check_str(SectionId::Workloads, i, r, workload::NAME)?;
            if workload::CHAIN.get(r) >= chains {
                return Err(bad(SectionId::Workloads, i, "chain index out of range"));
            }
            let key = (
                self.string(r, workload::NAMESPACE),
                self.string(r, workload::NAME),
            );
            if previous.is_some_and(|p| p >= key) {
                return Err(bad(SectionId::Workloads, i, "not sorted"));
            }
            previous = Some(key);
        }
        let workloads = self.count(SectionId::Workloads) as u32;
        let mut previous: Option<(u8, [u8; 16])> = None;
        for (i, r) in self.records(SectionId::WorkloadAddresses).enumerate() {
            let key = (workload_address::FAMILY.get(r), workload_address::IP.get(r));
            if !matches!(key.0, 4 | 6) || workload_address::WORKLOAD.get(r) >= workloads {
                return Err(bad(
                    SectionId::WorkloadAddresses,
                    i,
                    "bad family or workload index",
                ));
            }
            if previous.is_some_and(|p| p >= key) {
                return Err(bad(SectionId::WorkloadAddresses, i, "not sorted"));
            }
            previous = Some(key);
        }
        Ok(())
    }
}

/// The kind and node of an address book entry.
fn check_address(kind: u8, node: u32, nodes: u32) -> Result<(), &'static str> {
    if !matches!(kind, format::ADDRESS_POD | format::ADDRESS_NODE) {
        return Err("unknown address kind");
    }
    if node >= nodes {
        return Err("node out of range");
    }
    Ok(())
}
