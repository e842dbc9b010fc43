//! Service verdicts: what each chain's workloads get for each Service frontend, decided once
//! per snapshot so that a connection to a ClusterIP reads one record instead of deciding the
//! frontend's backends (a Service with backends in several zones costs a walk per group of
//! them, microseconds at the tail).
//!
//! The decision depends on the source only through its chain, and on the destination only
//! through the frontend record (the kernel picks the backend after `connect()`), so a matrix of
//! chains × frontends holds every answer; chains whose rows are equal share one (the 624 chains
//! of the engine bench's busiest node have 18 distinct rows). The controller never sends it (5,000 nodes × their
//! chains × 5,000 Services would be its to compute and ship on every change); the node agent
//! computes its own node's after each snapshot arrives and publishes it with the snapshot.
//! `Snapshot::parse` checks every record names a real rule and location, not that the
//! decisions are right: recomputing them is the cost the matrix saves, and the file that
//! carries them is the agent's, whose every byte the shim already trusts.

use std::collections::HashMap;

use super::{Decision, RuleRef, Snapshot, Via, WorkloadId, service_ip};
use crate::format::{
    self, SectionId, directory, header, service, service_verdict, service_verdict_row, workload,
};
use crate::{Location, NoTrace, Protocol};

/// How many Service decisions [`Snapshot::with_service_verdicts`] makes by default: about half a
/// second of one core. A node of 110 pods (the kubelet's default limit) in as many chains fits
/// with 9,000 Services; beyond, the chains used by the fewest workloads go without.
pub const SERVICE_VERDICT_DECISIONS: usize = 1_000_000;

impl<'a> Snapshot<'a> {
    /// Whether the snapshot carries Service verdicts (see [`Snapshot::with_service_verdicts`]).
    pub fn has_service_verdicts(&self) -> bool {
        !self.section(SectionId::ServiceVerdictRows).is_empty()
    }

    /// These bytes with Service verdicts computed for them (replacing any they held): each
    /// chain's decision for every Service frontend, as [`Snapshot::decide`] reaches it by
    /// deciding the backends, chains with equal rows sharing one. `decide` then reads the
    /// record instead, with the same result. Costs one Service decision per chain and
    /// frontend, spread over `workers` threads; the chains most workloads use get rows first,
    /// as many as `max_decisions` allows (see [`SERVICE_VERDICT_DECISIONS`]), the others are
    /// decided from their backends at connect time.
    pub fn with_service_verdicts(&self, workers: usize, max_decisions: usize) -> Vec<u8> {
        let services = self.count(SectionId::Services);
        let chains = self.count(SectionId::Chains);
        // Per chain, a workload to decide for and how many use it.
        let mut users: Vec<(Option<WorkloadId>, u32)> = vec![(None, 0); chains];
        for (index, record) in self.records(SectionId::Workloads).enumerate() {
            if let Some((first, count)) = users.get_mut(workload::CHAIN.get(record) as usize) {
                first.get_or_insert(WorkloadId(index as u32));
                *count += 1;
            }
        }
        let mut chosen: Vec<(usize, WorkloadId)> = users
            .iter()
            .enumerate()
            .filter_map(|(chain, (first, _))| Some((chain, (*first)?)))
            .collect();
        chosen.sort_by_key(|(chain, _)| (std::cmp::Reverse(users[*chain].1), *chain));
        chosen.truncate(max_decisions.checked_div(services).unwrap_or(usize::MAX));
        // Dealt round-robin: neighbouring chains (one namespace's) cost alike.
        let workers = workers.clamp(1, chosen.len().max(1));
        let chosen = &chosen;
        let dealt: Vec<Vec<Vec<u8>>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..workers)
                .map(|first| {
                    scope.spawn(move || {
                        chosen
                            .iter()
                            .skip(first)
                            .step_by(workers)
                            .map(|(_, source)| self.verdict_row(*source, services))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("deciding Services cannot panic"))
                .collect()
        });
        let mut row_numbers: HashMap<&[u8], u32> = HashMap::new();
        let mut verdicts = Vec::new();
        let mut row_of_chain = vec![0u8; chains * service_verdict_row::LEN];
        for record in row_of_chain.chunks_exact_mut(service_verdict_row::LEN) {
            service_verdict_row::ROW.put(record, service_verdict_row::NONE);
        }
        for (i, (chain, _)) in chosen.iter().enumerate() {
            let row = &dealt[i % workers][i / workers];
            let next = row_numbers.len() as u32;
            let number = *row_numbers.entry(row).or_insert_with(|| {
                verdicts.extend_from_slice(row);
                next
            });
            let at = chain * service_verdict_row::LEN;
            service_verdict_row::ROW.put(&mut row_of_chain[at..], number);
        }
        with_sections(
            self.bytes,
            [
                (SectionId::ServiceVerdicts, Some(&verdicts[..])),
                (SectionId::ServiceVerdictRows, Some(&row_of_chain[..])),
            ],
        )
    }

    /// These bytes without Service verdicts: byte for byte the snapshot they were computed
    /// for (their sections are added last), which the controller knows by its checksum.
    pub fn without_service_verdicts(&self) -> Vec<u8> {
        with_sections(
            self.bytes,
            [
                (SectionId::ServiceVerdicts, None),
                (SectionId::ServiceVerdictRows, None),
            ],
        )
    }

    /// One chain's verdicts, deciding for `source`, a workload of that chain.
    fn verdict_row(&self, source: WorkloadId, services: usize) -> Vec<u8> {
        let mut row = vec![0u8; services * service_verdict::LEN];
        for (service, record) in row.chunks_exact_mut(service_verdict::LEN).enumerate() {
            let frontend = self.record(SectionId::Services, service);
            let protocol =
                service::PROTOCOL.decode_or(frontend, Protocol::from_byte, Protocol::Tcp);
            let decision = self.decide_service(
                source,
                service,
                service_ip(frontend),
                protocol,
                &mut NoTrace,
            );
            put_verdict(record, &decision);
        }
        row
    }

    /// `decide`'s answer for `workload` and the frontend record `service`, from the Service
    /// verdicts; `None` when the snapshot has none.
    pub(super) fn service_verdict(
        &self,
        workload: WorkloadId,
        service: usize,
    ) -> Option<Decision<'a>> {
        if !self.has_service_verdicts() {
            return None;
        }
        let source = self.record(SectionId::Workloads, workload.0 as usize);
        let chain = workload::CHAIN.get(source) as usize;
        let row = service_verdict_row::ROW.get(self.record(SectionId::ServiceVerdictRows, chain));
        if row == service_verdict_row::NONE {
            return None;
        }
        let at = row as usize * self.count(SectionId::Services) + service;
        let verdict = self.record(SectionId::ServiceVerdicts, at);
        // Validated: every chain has a row, each record names a location and a rule.
        let location = service_verdict::LOCATION.decode_or(
            verdict,
            Location::from_byte,
            Location::SameCluster,
        );
        let frontend = self.record(SectionId::Services, service);
        let backends = service::BACKENDS.get(frontend).1;
        Some(match service_verdict::OUTCOME.get(verdict) {
            service_verdict::OUTCOME_RULE => {
                let matched = RuleRef {
                    policy: service_verdict::POLICY.get(verdict),
                    rule: service_verdict::RULE.get(verdict),
                };
                Decision {
                    via: Via::ServiceUnanimous { backends },
                    ..self.matched_decision(matched, self.rule_record(matched), location)
                }
            }
            service_verdict::OUTCOME_DEFAULT => {
                self.default_decision(location, Via::ServiceUnanimous { backends })
            }
            _ => self.default_decision(location, Via::ServiceAmbiguous { backends }),
        })
    }
}

/// Writes `decision` as a verdict record.
fn put_verdict(record: &mut [u8], decision: &Decision<'_>) {
    let outcome = match (decision.matched, decision.via) {
        (Some(matched), _) => {
            service_verdict::POLICY.put(record, matched.policy);
            service_verdict::RULE.put(record, matched.rule);
            service_verdict::OUTCOME_RULE
        }
        (None, Via::ServiceUnanimous { .. }) => service_verdict::OUTCOME_DEFAULT,
        (None, _) => service_verdict::OUTCOME_AMBIGUOUS,
    };
    service_verdict::OUTCOME.put(record, outcome);
    service_verdict::LOCATION.put(record, decision.location as u8);
}

/// `snapshot` (whole, valid) with each section of `replaced` set to its bytes or left out: the
/// other sections copied in their order, unknown ones included, the replaced ones last; header
/// sealed again.
fn with_sections<const N: usize>(
    snapshot: &[u8],
    replaced: [(SectionId, Option<&[u8]>); N],
) -> Vec<u8> {
    let count = header::SECTION_COUNT.get(snapshot) as usize;
    let directory_end = format::HEADER_LEN + count * directory::LEN;
    let kept: Vec<(u32, u32, &[u8])> =
        snapshot[format::HEADER_LEN..directory_end]
            .chunks_exact(directory::LEN)
            .filter(|entry| {
                !replaced
                    .iter()
                    .any(|(id, _)| directory::ID.get(entry) == *id as u32)
            })
            .map(|entry| {
                let offset = directory::OFFSET.get(entry) as usize;
                let size = directory::SIZE.get(entry) as usize;
                (
                    directory::ID.get(entry),
                    directory::RECORD_SIZE.get(entry),
                    &snapshot[offset..offset + size],
                )
            })
            .chain(replaced.iter().filter_map(|(id, body)| {
                body.map(|body| (*id as u32, id.record_len() as u32, body))
            }))
            .collect();
    let directory_len = kept.len() * directory::LEN;
    let body_len: usize = kept.iter().map(|(_, _, bytes)| bytes.len()).sum();
    let mut out = Vec::with_capacity(format::HEADER_LEN + directory_len + body_len);
    out.extend_from_slice(&snapshot[..format::HEADER_LEN]);
    out.resize(format::HEADER_LEN + directory_len, 0);
    header::SECTION_COUNT.put(&mut out, kept.len() as u32);
    let mut offset = out.len();
    for (entry, (id, record_size, bytes)) in out[format::HEADER_LEN..]
        .chunks_exact_mut(directory::LEN)
        .zip(&kept)
    {
        directory::ID.put(entry, *id);
        directory::OFFSET.put(entry, offset as u32);
        directory::SIZE.put(entry, bytes.len() as u32);
        directory::RECORD_SIZE.put(entry, *record_size);
        offset += bytes.len();
    }
    for (_, _, bytes) in &kept {
        out.extend_from_slice(bytes);
    }
    format::seal(&mut out);
    out
}
