//! Indexes of long chains: which rules can match an IPv4 destination at all.
//!
//! The filters let a walk reject a rule in about 2 ns, but a chain of 10,000 rules still costs
//! tens of microseconds. For a chain of at least [`MIN_RULES`] rules the encoder writes, once
//! per revision, the rules that can match each identity (through pods peers), each interval of
//! the IPv4 space (through networks peers: the space is cut where the chain's CIDRs begin and
//! end) and any destination (no `to`, or an entity peer); a lookup merges the three lists that
//! concern its destination and checks only those rules, in chain order. IPv6 destinations
//! walk the chain rule by rule (no IPv6 intervals are kept).
//!
//! The same `build` runs in the encoder and in the reader's validation, which rebuilds the
//! index of every chain the snapshot marks as indexed and refuses one that differs: a lookup
//! may trust it as it trusts the filters.

use std::collections::BTreeMap;

use crate::format::{
    self, chain, chain_index, chain_policy, cidr, identity_set, identity_set_range, index_identity,
    index_interval, index_posting, peer, policy_filter, rule,
};

/// Chains with fewer rules are walked rule by rule: their walk is short enough (a few µs), and
/// an index costs every revision that changes an identity its postings — a new identity in a
/// chain of 1,000 rules moved 74 KB per node instead of 33 KB in the controller's fan-out bench,
/// and building it for 5,000 nodes cost the compile seconds.
pub const MIN_RULES: usize = 2048;

/// At most this many postings per rule of a chain; a chain whose index would be larger (many
/// nested CIDRs, huge identity sets) is not indexed.
const POSTINGS_PER_RULE: usize = 64;

/// The encoded sections an index is built from.
pub(crate) struct RuleSections<'s> {
    pub(crate) chains: &'s [u8],
    pub(crate) chain_policies: &'s [u8],
    pub(crate) policy_filters: &'s [u8],
    pub(crate) rules: &'s [u8],
    pub(crate) peers: &'s [u8],
    pub(crate) networks: &'s [u8],
    pub(crate) identity_sets: &'s [u8],
    pub(crate) identity_set_ranges: &'s [u8],
}

/// The four index sections, encoded.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct IndexSections {
    pub(crate) chain_indexes: Vec<u8>,
    pub(crate) identities: Vec<u8>,
    pub(crate) intervals: Vec<u8>,
    pub(crate) postings: Vec<u8>,
}

/// The records of `section` in `range` (empty where it runs past the end).
fn records(section: &[u8], len: usize, (first, count): (u32, u32)) -> &[u8] {
    let start = first as usize * len;
    section
        .get(start..start + count as usize * len)
        .unwrap_or_default()
}

/// One chain's lists before encoding.
struct ChainLists {
    always: Vec<u32>,
    identities: BTreeMap<u32, Vec<u32>>,
    /// `(first address, rules)` of each interval, ascending, the first at 0.
    intervals: Vec<(u32, Vec<u32>)>,
}

/// Builds the index sections for `sections`' chains, indexing chain `c` when `wanted(c, rule
/// count)` says so and its index fits the budget.
pub(crate) fn build(
    sections: &RuleSections<'_>,
    wanted: impl Fn(usize, usize) -> bool,
) -> IndexSections {
    let mut out = IndexSections::default();
    for (index, record) in sections.chains.chunks_exact(chain::LEN).enumerate() {
        let start = out.chain_indexes.len();
        out.chain_indexes.resize(start + chain_index::LEN, 0);
        let entries = chain_entries(sections, record);
        let rules: usize = entries
            .iter()
            .map(|(_, rules)| rules.len() / rule::LEN)
            .sum();
        if !wanted(index, rules) {
            continue;
        }
        let Some(lists) = chain_lists(sections, &entries) else {
            continue;
        };
        let mut put = |list: &[u32]| {
            let first = out.postings.len() / index_posting::LEN;
            for position in list {
                out.postings.extend_from_slice(&position.to_le_bytes());
            }
            (first, list.len())
        };
        let always = put(&lists.always);
        let mut identities = Vec::with_capacity(lists.identities.len() * index_identity::LEN);
        for (identity, list) in &lists.identities {
            let (first, count) = put(list);
            let r = push(&mut identities, index_identity::LEN);
            index_identity::IDENTITY.put(r, *identity);
            index_identity::RULES.put(r, first, count);
        }
        let mut intervals = Vec::with_capacity(lists.intervals.len() * index_interval::LEN);
        for (first_address, list) in &lists.intervals {
            let (first, count) = put(list);
            let r = push(&mut intervals, index_interval::LEN);
            index_interval::FIRST.put(r, *first_address);
            index_interval::RULES.put(r, first, count);
        }
        let r = &mut out.chain_indexes[start..];
        chain_index::INDEXED.put(r, 1);
        chain_index::ALWAYS.put(r, always.0, always.1);
        chain_index::IDENTITIES.put(
            r,
            out.identities.len() / index_identity::LEN,
            lists.identities.len(),
        );
        chain_index::INTERVALS.put(
            r,
            out.intervals.len() / index_interval::LEN,
            lists.intervals.len(),
        );
        out.identities.extend_from_slice(&identities);
        out.intervals.extend_from_slice(&intervals);
    }
    if out.postings.is_empty() && out.intervals.is_empty() {
        // No chain indexed: the sections stay empty rather than a record per chain saying so.
        out.chain_indexes.clear();
    }
    out
}

fn push(out: &mut Vec<u8>, len: usize) -> &mut [u8] {
    let start = out.len();
    out.resize(start + len, 0);
    &mut out[start..]
}

/// Each policy of a chain with its rule records, in evaluation order.
fn chain_entries<'s>(sections: &RuleSections<'s>, chain: &[u8]) -> Vec<(u32, &'s [u8])> {
    records(
        sections.chain_policies,
        chain_policy::LEN,
        chain::POLICIES.get(chain),
    )
    .chunks_exact(chain_policy::LEN)
    .map(|entry| {
        let policy = chain_policy::POLICY.get(entry);
        let filter = records(sections.policy_filters, policy_filter::LEN, (policy, 1));
        let rules = records(sections.rules, rule::LEN, policy_filter::RULES.get(filter));
        (policy, rules)
    })
    .collect()
}

/// The lists of one chain, or `None` when positions do not fit 16 + 16 bits or the budget.
fn chain_lists(sections: &RuleSections<'_>, entries: &[(u32, &[u8])]) -> Option<ChainLists> {
    if entries.len() > 1 << 16 {
        return None;
    }
    if postings_at_least(sections, entries) > budget(entries) {
        return None; // known before building anything: chains that miss the budget miss it far
    }
    let mut always = Vec::new();
    // (identity, position) of every identity of a pods peer.
    let mut by_identity: Vec<(u32, u32)> = Vec::new();
    // (first, last, position) of every IPv4 CIDR of a networks peer.
    let mut spans: Vec<(u32, u32, u32)> = Vec::new();
    for (entry, (_, rules)) in entries.iter().enumerate() {
        let rules = rules.chunks_exact(rule::LEN);
        if rules.len() > 1 << 16 {
            return None;
        }
        for (number, record) in rules.enumerate() {
            let position = (entry as u32) << 16 | number as u32;
            if rule::FLAGS.get(record) & format::RULE_HAS_PEERS == 0 {
                always.push(position);
                continue;
            }
            let peers = records(sections.peers, peer::LEN, rule::PEERS.get(record));
            for p in peers.chunks_exact(peer::LEN) {
                match peer::KIND.get(p) {
                    format::PEER_PODS => {
                        let set = records(
                            sections.identity_set_ranges,
                            identity_set_range::LEN,
                            (peer::IDENTITY_SET.get(p), 1),
                        );
                        let members = records(
                            sections.identity_sets,
                            identity_set::LEN,
                            identity_set_range::MEMBERS.get(set),
                        );
                        by_identity.extend(
                            members
                                .chunks_exact(identity_set::LEN)
                                .map(|member| (identity_set::IDENTITY.get(member), position)),
                        );
                    }
                    format::PEER_NETWORKS => {
                        let cidrs = records(sections.networks, cidr::LEN, peer::NETWORKS.get(p));
                        spans.extend(
                            cidrs
                                .chunks_exact(cidr::LEN)
                                .filter_map(format::cidr4_span)
                                .map(|(first, last)| (first, last, position)),
                        );
                    }
                    // An entity peer, or a kind a validated snapshot does not hold: checked
                    // for every destination.
                    _ => always.push(position),
                }
            }
        }
    }
    // A rule with two peers of one kind is named twice in a row.
    always.dedup();
    by_identity.sort_unstable();
    by_identity.dedup();
    let mut identities: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for (identity, position) in by_identity {
        identities.entry(identity).or_default().push(position);
    }
    let budget = budget(entries);
    let mut used = always.len() + identities.values().map(Vec::len).sum::<usize>();
    let intervals = intervals(spans, budget.checked_sub(used)?)?;
    used += intervals.iter().map(|(_, list)| list.len()).sum::<usize>();
    (used <= budget).then_some(ChainLists {
        always,
        identities,
        intervals,
    })
}

/// The most postings the index of a chain with these entries may hold.
fn budget(entries: &[(u32, &[u8])]) -> usize {
    let rules: usize = entries
        .iter()
        .map(|(_, rules)| rules.len() / rule::LEN)
        .sum();
    POSTINGS_PER_RULE * rules.max(1)
}

/// The postings of a chain's index, estimated without building it: every identity of every
/// pods peer (peers of one rule that overlap count twice), every rule without `to`, one per
/// networks or entity peer.
fn postings_at_least(sections: &RuleSections<'_>, entries: &[(u32, &[u8])]) -> usize {
    let mut count = 0usize;
    for record in entries
        .iter()
        .flat_map(|(_, rules)| rules.chunks_exact(rule::LEN))
    {
        if rule::FLAGS.get(record) & format::RULE_HAS_PEERS == 0 {
            count += 1;
            continue;
        }
        let peers = records(sections.peers, peer::LEN, rule::PEERS.get(record));
        for p in peers.chunks_exact(peer::LEN) {
            count += match peer::KIND.get(p) {
                format::PEER_PODS => {
                    let set = records(
                        sections.identity_set_ranges,
                        identity_set_range::LEN,
                        (peer::IDENTITY_SET.get(p), 1),
                    );
                    identity_set_range::MEMBERS.get(set).1 as usize
                }
                _ => 1,
            };
        }
    }
    count
}

/// Cuts the IPv4 space where `spans` begin and end and lists, for each piece, the positions
/// whose spans cover it (ascending, each once); neighbouring pieces with the same list are
/// one. `None` when the lists would hold more than `budget` postings.
fn intervals(spans: Vec<(u32, u32, u32)>, budget: usize) -> Option<Vec<(u32, Vec<u32>)>> {
    // (address, +1 / -1, position): a span starts at its first address and ends after its last.
    let mut events: Vec<(u64, i32, u32)> = Vec::with_capacity(spans.len() * 2);
    for (first, last, position) in spans {
        events.push((u64::from(first), 1, position));
        events.push((u64::from(last) + 1, -1, position));
    }
    events.sort_unstable();
    let mut active: BTreeMap<u32, u32> = BTreeMap::new();
    let mut out: Vec<(u32, Vec<u32>)> = vec![(0, Vec::new())];
    let mut used = 0usize;
    let mut at = 0;
    while at < events.len() {
        let address = events[at].0;
        while let Some(&(same_address, change, position)) = events.get(at) {
            if same_address != address {
                break;
            }
            let count = active.entry(position).or_insert(0);
            *count = count.checked_add_signed(change).unwrap_or(0);
            if *count == 0 {
                active.remove(&position);
            }
            at += 1;
        }
        let Ok(first) = u32::try_from(address) else {
            break; // the end of the address space: nothing starts there
        };
        let list: Vec<u32> = active.keys().copied().collect();
        if out.last().is_some_and(|(_, previous)| *previous == list) {
            continue;
        }
        used += list.len();
        if used > budget {
            return None;
        }
        if out.last().is_some_and(|(start, _)| *start == first) {
            out.pop(); // an interval that starts where this one does is empty
        }
        out.push((first, list));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_cut_where_spans_begin_and_end() {
        let spans = vec![(10, 19, 1), (15, 29, 2), (40, u32::MAX, 3)];
        let cut = intervals(spans, 100).expect("within budget");
        assert_eq!(
            cut,
            vec![
                (0, vec![]),
                (10, vec![1]),
                (15, vec![1, 2]),
                (20, vec![2]),
                (30, vec![]),
                (40, vec![3]),
            ]
        );
    }

    #[test]
    fn neighbours_with_the_same_rules_are_one_interval() {
        // Two rules' CIDRs that touch: the rule list changes at 20, a span of one rule that
        // is split by another's boundary is not.
        let spans = vec![(0, 9, 1), (10, 19, 1), (5, 14, 2)];
        let cut = intervals(spans, 100).expect("within budget");
        assert_eq!(
            cut,
            vec![(0, vec![1]), (5, vec![1, 2]), (15, vec![1]), (20, vec![])]
        );
    }

    #[test]
    fn an_index_over_budget_is_not_built() {
        // 100 nested spans: the innermost interval names all 100.
        let spans = (0..100).map(|i| (i, 1000 - i, i)).collect();
        assert!(intervals(spans, 1000).is_none());
    }
}
