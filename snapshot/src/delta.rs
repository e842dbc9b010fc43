//! Snapshot deltas: what changed between two snapshots of one node, so the controller sends a
//! node the few records a revision touched instead of the whole table.
//!
//! A delta names its base (revision and checksum), carries the target's header and section
//! directory verbatim, and says for each target section how to get its bytes from the base:
//! keep the base's section, replace it, or splice a few runs of records into it. [`apply`]
//! rebuilds the target byte for byte — the header's own checksum proves it — so the agent
//! always publishes a complete snapshot, never a partial one, and a delta can never be applied
//! to a base it was not made for.
//!
//! ```text
//! magic          8  b"\x89SRDLTA\n"
//! version        2  = 2 (1 is read too: it is 2 without the shift operation)
//! pad            2
//! base crc       4  the base snapshot's header checksum
//! base revision  8
//! prefix length  4  bytes of the target's header and directory, which follow verbatim
//! prefix         …
//! per directory entry of the target, in order:
//!   op u8: 0 keep (the base's section of the same id) | 1 replace | 2 splice | 3 shift
//!   replace: len u32, bytes
//!   splice:  edits u32, then per edit {at u32 (in the base section), remove u32, insert u32,
//!            bytes}; edits ascending and not overlapping
//!   shift:   (a section of the base's length, records of a multiple of 4 bytes) runs u32, then
//!            per run {first record u32, records u32, one record's worth of u32 addends}: each
//!            record of the run is the base's plus the addends, lane by lane (wrapping); runs
//!            ascending and not overlapping, other records kept
//! ```
//!
//! Edits are found without a general diff. Sections of equal length (the IPv4 address book,
//! filters, most record arrays after a label change) are compared record by record; where
//! records only moved by the same amount (the ranges of the identity sets behind one that grew),
//! a run of them is one shift. Sections whose length changed keep their common
//! prefix and suffix, and between them a bounded greedy alignment finds records inserted or
//! removed (an identity joining a few of many identity sets is a few 4-byte insertions, not the
//! rest of the section). Every encoding is exact for any change; the smallest one is sent.

use std::sync::Arc;

use crate::format::{self, SectionId, U16, U32, U64, directory, header};
use crate::view::DecodeError;
use crate::{SharedTables, SnapshotParts};

/// First eight bytes of every delta.
pub const MAGIC: [u8; 8] = *b"\x89SRDLTA\n";
/// The delta version this crate writes; it reads this and version 1 (a subset).
pub const VERSION: u16 = 2;

const OP_KEEP: u8 = 0;
const OP_REPLACE: u8 = 1;
const OP_SPLICE: u8 = 2;
const OP_SHIFT: u8 = 3;
/// Bytes an edit costs besides its inserted bytes.
const EDIT_OVERHEAD: usize = 12;
/// Bytes a shift run costs besides its addends.
const SHIFT_OVERHEAD: usize = 8;
/// How many records ahead the alignment looks for where base and target meet again.
const ALIGN_WINDOW: usize = 48;
/// Records that must agree after an insertion or removal for the alignment to trust it.
const ALIGN_ANCHOR: usize = 3;
const FIXED_LEN: usize = 28;

/// Why a delta could not be applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeltaError {
    /// The delta is malformed: what is wrong.
    Malformed(&'static str),
    /// The delta was made for another base snapshot.
    WrongBase {
        /// Revision and checksum the delta expects.
        expected: (u64, u32),
        /// Revision and checksum of the snapshot it was applied to.
        found: (u64, u32),
    },
    /// The base is not a readable snapshot.
    Base(DecodeError),
    /// The rebuilt snapshot does not match the target's checksum.
    Mismatch,
}

impl std::fmt::Display for DeltaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Malformed(problem) => write!(f, "malformed snapshot delta: {problem}"),
            Self::WrongBase { expected, found } => write!(
                f,
                "snapshot delta is for revision {} (checksum {:#010x}), this agent has revision {} (checksum {:#010x})",
                expected.0, expected.1, found.0, found.1
            ),
            Self::Base(error) => write!(f, "base of the snapshot delta: {error}"),
            Self::Mismatch => {
                f.write_str("snapshot delta rebuilt bytes whose checksum differs from the target's")
            }
        }
    }
}

impl std::error::Error for DeltaError {}

/// The base a delta applies to: `(revision, checksum)`.
pub fn base_of(delta: &[u8]) -> Result<(u64, u32), DeltaError> {
    let mut reader = Reader::new(delta);
    if reader.take(8)? != MAGIC {
        return Err(DeltaError::Malformed("bad magic"));
    }
    if !(1..=VERSION).contains(&reader.u16()?) {
        return Err(DeltaError::Malformed("unsupported version"));
    }
    reader.take(2)?;
    let crc = reader.u32()?;
    let revision = reader.u64()?;
    Ok((revision, crc))
}

/// The delta that turns `base` into `target`. Both must be complete snapshots (as `encode`
/// writes them); the caller compares the delta's length with the target's and sends the
/// shorter.
pub fn diff(base: &[u8], target: &[u8]) -> Result<Vec<u8>, DecodeError> {
    let base_sections = Sections::read(base)?;
    let target_sections = Sections::read(target)?;
    let mut out = start(
        (base_sections.revision, base_sections.crc),
        target_sections.prefix,
    );
    for (id, body) in &target_sections.bodies {
        let old = id.and_then(|id| base_sections.body(id));
        section_op(&mut out, *id, old, body);
    }
    Ok(out)
}

/// What the shared tables of one revision became in another: each shared section's operation,
/// computed once and reused for every node whose snapshot moves between the two revisions.
#[derive(Debug)]
pub struct SharedDelta {
    base: Arc<SharedTables>,
    target: Arc<SharedTables>,
    ops: Vec<(SectionId, Vec<u8>)>,
}

impl SharedDelta {
    /// Diffs the shared sections of `base` and `target`.
    pub fn new(base: &Arc<SharedTables>, target: &Arc<SharedTables>) -> Self {
        let ops = target
            .sections
            .iter()
            .map(|(id, body)| {
                let old = base
                    .sections
                    .iter()
                    .find(|(found, _)| found == id)
                    .map(|(_, old)| old.as_slice());
                let mut op = Vec::new();
                section_op(&mut op, Some(*id), old, body);
                (*id, op)
            })
            .collect();
        Self {
            base: base.clone(),
            target: target.clone(),
            ops,
        }
    }

    /// Whether this is the delta between `base`'s and `target`'s shared tables.
    pub fn joins(&self, base: &SnapshotParts, target: &SnapshotParts) -> bool {
        Arc::ptr_eq(&self.base, base.shared()) && Arc::ptr_eq(&self.target, target.shared())
    }
}

/// The delta from `base` to `target` without assembling either: exactly the bytes [`diff`]
/// gives for their complete snapshots. The shared sections' operations come from `shared` when
/// it joins the two (see [`SharedDelta::joins`]), and are computed here otherwise.
pub fn diff_parts(
    base: &SnapshotParts,
    target: &SnapshotParts,
    shared: Option<&SharedDelta>,
) -> Vec<u8> {
    diff_parts_with(base, target, shared, None)
}

/// Node sections smaller than this are diffed each time: cheaper than looking an operation up.
const SECTION_OPS_MIN_LEN: usize = 1024;

/// Operations on node sections, each computed once per pair of (base, target) allocations.
/// Nodes with the same policies hold the same interned rule sections
/// (`crate::SectionInterner`), so when a revision changes those sections every such node's
/// delta needs the same operation: diffing it once instead of once per node is most of what
/// diffing a revision costs. Keyed by the sections' addresses, with both kept alive so the
/// addresses cannot be reused while the cache lives; shared by threads that diff in parallel.
#[derive(Debug, Default)]
pub struct SectionOps {
    ops: std::sync::Mutex<std::collections::HashMap<OpsKey, CachedOp>>,
}

/// A node section's id and the addresses of its base and target bytes.
type OpsKey = (SectionId, usize, usize);
/// Base and target sections (kept alive) and the operation between them.
type CachedOp = (Arc<Vec<u8>>, Arc<Vec<u8>>, Arc<Vec<u8>>);

impl SectionOps {
    fn op(&self, id: SectionId, old: &Arc<Vec<u8>>, new: &Arc<Vec<u8>>) -> Arc<Vec<u8>> {
        let key = (id, Arc::as_ptr(old) as usize, Arc::as_ptr(new) as usize);
        if let Some((_, _, op)) = self.lock().get(&key) {
            return op.clone();
        }
        // Computed unlocked: two threads may both compute one, with equal results.
        let mut op = Vec::new();
        section_op(&mut op, Some(id), Some(old), new);
        let op = Arc::new(op);
        self.lock()
            .entry(key)
            .or_insert_with(|| (old.clone(), new.clone(), op))
            .2
            .clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<OpsKey, CachedOp>> {
        // A panic elsewhere cannot leave an entry half-written: insertions are whole.
        self.ops.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// [`diff_parts`], taking large node sections' operations from `ops` (and adding them there).
pub fn diff_parts_with(
    base: &SnapshotParts,
    target: &SnapshotParts,
    shared: Option<&SharedDelta>,
    ops: Option<&SectionOps>,
) -> Vec<u8> {
    let cached = shared.filter(|shared| shared.joins(base, target));
    let same_shared = Arc::ptr_eq(base.shared(), target.shared());
    let base_sections: Vec<_> = base.sections().collect();
    let mut out = start((base.revision(), base.checksum()), target.prefix());
    for (id, body, is_shared) in target.sections() {
        if is_shared && same_shared {
            out.push(OP_KEEP);
            continue;
        }
        if let Some((_, op)) = cached
            .filter(|_| is_shared)
            .and_then(|cached| cached.ops.iter().find(|(found, _)| *found == id))
        {
            out.extend_from_slice(op);
            continue;
        }
        if let Some(ops) = ops.filter(|_| !is_shared && body.len() >= SECTION_OPS_MIN_LEN)
            && let (Some(old), Some(new)) = (base.node_section(id), target.node_section(id))
            && !Arc::ptr_eq(old, new)
        {
            out.extend_from_slice(&ops.op(id, old, new));
            continue;
        }
        let old = base_sections
            .iter()
            .find(|(found, _, _)| *found == id)
            .map(|(_, old, _)| *old);
        section_op(&mut out, Some(id), old, body);
    }
    out
}

/// A delta's fixed part and the target's header and directory.
fn start((base_revision, base_crc): (u64, u32), target_prefix: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(FIXED_LEN + target_prefix.len() + 4096);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&base_crc.to_le_bytes());
    out.extend_from_slice(&base_revision.to_le_bytes());
    out.extend_from_slice(&(target_prefix.len() as u32).to_le_bytes());
    out.extend_from_slice(target_prefix);
    out
}

/// Appends the smallest operation that turns `old` (the base's section of the same id, if it
/// has one) into `body`.
fn section_op(out: &mut Vec<u8>, id: Option<SectionId>, old: Option<&[u8]>, body: &[u8]) {
    let Some(old) = old else {
        return replace(out, body);
    };
    // The same bytes (often the same allocation: see `SectionInterner`) are kept.
    if std::ptr::eq(old, body) || old == body {
        return out.push(OP_KEEP);
    }
    let record = id.map_or(1, SectionId::record_len);
    let edits = splices(old, body, record);
    let splice_len: usize = edits.iter().map(|e| EDIT_OVERHEAD + e.insert.len()).sum();
    let runs = shifts(old, body, record);
    let shift_len = runs
        .as_ref()
        .map_or(usize::MAX, |runs| runs.len() * (SHIFT_OVERHEAD + record));
    if shift_len < splice_len.min(body.len()) {
        out.push(OP_SHIFT);
        let runs = runs.unwrap_or_default();
        out.extend_from_slice(&(runs.len() as u32).to_le_bytes());
        for run in runs {
            out.extend_from_slice(&(run.first as u32).to_le_bytes());
            out.extend_from_slice(&(run.count as u32).to_le_bytes());
            out.extend_from_slice(&run.addends);
        }
    } else if splice_len < body.len() {
        out.push(OP_SPLICE);
        out.extend_from_slice(&(edits.len() as u32).to_le_bytes());
        for edit in edits {
            out.extend_from_slice(&(edit.at as u32).to_le_bytes());
            out.extend_from_slice(&(edit.remove as u32).to_le_bytes());
            out.extend_from_slice(&(edit.insert.len() as u32).to_le_bytes());
            out.extend_from_slice(edit.insert);
        }
    } else {
        replace(out, body);
    }
}

/// Rebuilds the target snapshot from `base` and a delta made by [`diff`]. The result carries
/// the target's checksum, verified here; the caller still parses (validates) it before use.
pub fn apply(base: &[u8], delta: &[u8]) -> Result<Vec<u8>, DeltaError> {
    let base_sections = Sections::read(base).map_err(DeltaError::Base)?;
    let expected = base_of(delta)?;
    let found = (base_sections.revision, base_sections.crc);
    if expected != found {
        return Err(DeltaError::WrongBase { expected, found });
    }
    let mut reader = Reader::new(delta);
    reader.take(FIXED_LEN - 4)?;
    let prefix_len = reader.u32()? as usize;
    let prefix = reader.take(prefix_len)?;
    // The checksum covers everything after itself: the magic is checked on its own.
    if prefix.len() < header::LEN || header::MAGIC.get(prefix) != format::MAGIC {
        return Err(DeltaError::Malformed(
            "the target header lacks the snapshot magic",
        ));
    }
    let layout = Layout::read(prefix).ok_or(DeltaError::Malformed("bad target directory"))?;
    // Each target section is one base section plus bytes the delta carries: a larger declared
    // length is a lie, and must not size an allocation.
    if layout.total_len > base.len().saturating_add(delta.len()) {
        return Err(DeltaError::Malformed(
            "the target is declared larger than base and delta together",
        ));
    }
    let mut out = Vec::with_capacity(layout.total_len);
    out.extend_from_slice(prefix);
    for (id, offset, len) in layout.entries {
        if out.len() != offset {
            return Err(DeltaError::Malformed("target sections are not contiguous"));
        }
        let old = id.and_then(|id| base_sections.body(id));
        match reader.u8()? {
            OP_KEEP => out.extend_from_slice(old.ok_or(DeltaError::Malformed(
                "keeps a section the base does not have",
            ))?),
            OP_REPLACE => {
                let n = reader.u32()? as usize;
                out.extend_from_slice(reader.take(n)?);
            }
            OP_SPLICE => {
                let old = old.ok_or(DeltaError::Malformed(
                    "splices a section the base does not have",
                ))?;
                let edits = reader.u32()?;
                let mut copied = 0usize;
                for _ in 0..edits {
                    let at = reader.u32()? as usize;
                    let remove = reader.u32()? as usize;
                    let insert = reader.u32()? as usize;
                    let end = at
                        .checked_add(remove)
                        .filter(|end| at >= copied && *end <= old.len())
                        .ok_or(DeltaError::Malformed("splice out of order or out of range"))?;
                    out.extend_from_slice(&old[copied..at]);
                    out.extend_from_slice(reader.take(insert)?);
                    copied = end;
                }
                out.extend_from_slice(&old[copied..]);
            }
            OP_SHIFT => {
                let old = old.ok_or(DeltaError::Malformed(
                    "shifts a section the base does not have",
                ))?;
                let record = id.map_or(0, SectionId::record_len);
                if record == 0 || !record.is_multiple_of(4) || old.len() != len {
                    return Err(DeltaError::Malformed(
                        "shifts a section of another length or record size",
                    ));
                }
                let start = out.len();
                out.extend_from_slice(old);
                let runs = reader.u32()?;
                let mut next = 0usize;
                for _ in 0..runs {
                    let first = reader.u32()? as usize;
                    let count = reader.u32()? as usize;
                    let addends = reader.take(record)?;
                    let end = first
                        .checked_add(count)
                        .filter(|end| first >= next && *end <= old.len() / record)
                        .ok_or(DeltaError::Malformed("shift out of order or out of range"))?;
                    for target in
                        out[start + first * record..start + end * record].chunks_mut(record)
                    {
                        add_lanes(target, addends);
                    }
                    next = end;
                }
            }
            _ => return Err(DeltaError::Malformed("unknown section operation")),
        }
        if out.len() != offset + len {
            return Err(DeltaError::Malformed(
                "a section's length differs from the directory's",
            ));
        }
    }
    if !reader.is_empty() {
        return Err(DeltaError::Malformed("trailing bytes"));
    }
    if out.len() != layout.total_len {
        return Err(DeltaError::Malformed(
            "sections end before the declared length",
        ));
    }
    if format::checksum(&out) != layout.crc {
        return Err(DeltaError::Mismatch);
    }
    Ok(out)
}

fn replace(out: &mut Vec<u8>, body: &[u8]) {
    out.push(OP_REPLACE);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
}

/// One splice: `remove` bytes of the base section at `at` give way to `insert`.
struct Edit<'a> {
    at: usize,
    remove: usize,
    insert: &'a [u8],
}

/// Edits turning `old` into `new`, record-aligned: the common prefix and suffix are kept; in
/// between, equal-length sections are compared record by record (runs of changed records, with
/// gaps shorter than an edit's overhead folded in), others replaced as one run.
fn splices<'a>(old: &[u8], new: &'a [u8], record: usize) -> Vec<Edit<'a>> {
    let record = record.max(1);
    let shorter = old.len().min(new.len());
    let prefix = old.iter().zip(new).take_while(|(a, b)| a == b).count() / record * record;
    let suffix = old[prefix..]
        .iter()
        .rev()
        .zip(new[prefix..].iter().rev())
        .take_while(|(a, b)| a == b)
        .count()
        .min(shorter - prefix)
        / record
        * record;
    let (old_mid, new_mid) = (prefix..old.len() - suffix, prefix..new.len() - suffix);
    if old_mid.len() != new_mid.len() {
        return align(&old[old_mid], &new[new_mid], record)
            .into_iter()
            .map(|edit| Edit {
                at: prefix + edit.at,
                ..edit
            })
            .collect();
    }
    // Gaps of unchanged records shorter than this cost less folded into one edit.
    let fold = EDIT_OVERHEAD.div_ceil(record);
    let mut edits: Vec<Edit<'a>> = Vec::new();
    let mut at = prefix;
    while at < old.len() - suffix {
        if old[at..at + record] == new[at..at + record] {
            at += record;
            continue;
        }
        let start = at;
        let mut end = at + record;
        let mut gap = 0;
        at = end;
        while at < old.len() - suffix {
            if old[at..at + record] == new[at..at + record] {
                gap += 1;
                if gap > fold {
                    break;
                }
            } else {
                gap = 0;
                end = at + record;
            }
            at += record;
        }
        edits.push(Edit {
            at: start,
            remove: end - start,
            insert: &new[start..end],
        });
        at = end;
    }
    edits
}

/// Edits turning `old` into `new` (both whole records, of different counts): walks both while
/// records agree; where they part, looks up to [`ALIGN_WINDOW`] records ahead in each for the
/// nearest point where [`ALIGN_ANCHOR`] records (or both ends) agree again, and makes the
/// skipped records one edit. Where no such point is near, the rest is one edit. Bounded work
/// (window² comparisons per edit) and exact for any input; small when a few records were
/// inserted or removed.
fn align<'a>(old: &[u8], new: &'a [u8], record: usize) -> Vec<Edit<'a>> {
    let (n, m) = (old.len() / record, new.len() / record);
    let old_at = |i: usize| &old[i * record..(i + 1) * record];
    let new_at = |j: usize| &new[j * record..(j + 1) * record];
    let meet = |i: usize, j: usize| {
        (0..ALIGN_ANCHOR).all(|k| match (i + k < n, j + k < m) {
            (true, true) => old_at(i + k) == new_at(j + k),
            (false, false) => true,
            _ => false,
        })
    };
    let mut edits: Vec<Edit<'a>> = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < n || j < m {
        if i < n && j < m && old_at(i) == new_at(j) {
            (i, j) = (i + 1, j + 1);
            continue;
        }
        // Nearest meeting point by records skipped in all (removed + inserted).
        let found = (1..=2 * ALIGN_WINDOW).find_map(|skipped| {
            (0..=skipped.min(ALIGN_WINDOW))
                .map(|removed| (removed, skipped - removed))
                .filter(|&(removed, inserted)| {
                    inserted <= ALIGN_WINDOW && i + removed <= n && j + inserted <= m
                })
                .find(|&(removed, inserted)| meet(i + removed, j + inserted))
        });
        let (removed, inserted) = found.unwrap_or((n - i, m - j));
        // The meeting point agrees (or is both ends): the next edit cannot touch this one.
        edits.push(Edit {
            at: i * record,
            remove: removed * record,
            insert: &new[j * record..(j + inserted) * record],
        });
        (i, j) = (i + removed, j + inserted);
    }
    edits
}

/// A run of records that moved by the same addends.
struct Shift {
    first: usize,
    count: usize,
    addends: Vec<u8>,
}

/// Runs of records of `new` that are the record of `old` at the same place plus the same
/// addends (u32 lanes, wrapping); `None` when the sections differ in length or their records
/// are not made of u32 lanes.
fn shifts(old: &[u8], new: &[u8], record: usize) -> Option<Vec<Shift>> {
    if old.len() != new.len() || record == 0 || !record.is_multiple_of(4) {
        return None;
    }
    let mut runs: Vec<Shift> = Vec::new();
    let mut addends = vec![0u8; record];
    for (index, (was, is)) in old
        .chunks_exact(record)
        .zip(new.chunks_exact(record))
        .enumerate()
    {
        if was == is {
            continue;
        }
        for ((lane, was), is) in addends
            .chunks_exact_mut(4)
            .zip(was.chunks_exact(4))
            .zip(is.chunks_exact(4))
        {
            let difference = U32(0).get(is).wrapping_sub(U32(0).get(was));
            lane.copy_from_slice(&difference.to_le_bytes());
        }
        match runs.last_mut() {
            Some(run) if run.first + run.count == index && run.addends == addends => run.count += 1,
            _ => runs.push(Shift {
                first: index,
                count: 1,
                addends: addends.clone(),
            }),
        }
    }
    Some(runs)
}

/// Adds `addends` to `record`, u32 lane by lane (little-endian, wrapping).
fn add_lanes(record: &mut [u8], addends: &[u8]) {
    for (lane, addend) in record.chunks_exact_mut(4).zip(addends.chunks_exact(4)) {
        let sum = U32(0).get(lane).wrapping_add(U32(0).get(addend));
        lane.copy_from_slice(&sum.to_le_bytes());
    }
}

/// A snapshot's header fields a delta needs and its sections, by directory order.
struct Sections<'a> {
    crc: u32,
    revision: u64,
    /// Header and directory.
    prefix: &'a [u8],
    /// Each directory entry's section id (`None` for one this build does not know) and body.
    bodies: Vec<(Option<SectionId>, &'a [u8])>,
}

impl<'a> Sections<'a> {
    /// Reads the directory only: a base was validated when it was applied, a target is the
    /// encoder's own output (parsing 6 MB per node per revision would cost the controller more
    /// than the delta saves).
    fn read(bytes: &'a [u8]) -> Result<Self, DecodeError> {
        if header::MAGIC.get(bytes) != format::MAGIC {
            return Err(DecodeError::BadMagic);
        }
        let layout = Layout::read(bytes)
            .filter(|layout| layout.total_len == bytes.len())
            .ok_or(DecodeError::BadSection(
                "section directory runs past the end",
            ))?;
        let bodies = layout
            .entries
            .iter()
            .map(|(id, offset, len)| (*id, &bytes[*offset..*offset + *len]))
            .collect();
        Ok(Self {
            crc: layout.crc,
            revision: header::REVISION.get(bytes),
            prefix: &bytes[..layout.directory_end],
            bodies,
        })
    }

    fn body(&self, id: SectionId) -> Option<&'a [u8]> {
        self.bodies
            .iter()
            .find(|(found, _)| *found == Some(id))
            .map(|(_, body)| *body)
    }
}

/// The header fields and directory of a snapshot (or of a delta's copy of them).
struct Layout {
    crc: u32,
    total_len: usize,
    directory_end: usize,
    entries: Vec<(Option<SectionId>, usize, usize)>,
}

impl Layout {
    /// Reads the header and directory; `None` when they do not fit or a section lies outside
    /// `total_len`.
    fn read(prefix: &[u8]) -> Option<Self> {
        if prefix.len() < header::LEN {
            return None;
        }
        let total_len = usize::try_from(header::TOTAL_LEN.get(prefix)).ok()?;
        let count = header::SECTION_COUNT.get(prefix) as usize;
        let directory_end = count
            .checked_mul(directory::LEN)?
            .checked_add(header::LEN)?;
        if directory_end > prefix.len() || directory_end > total_len {
            return None;
        }
        let entries = prefix[header::LEN..directory_end]
            .chunks_exact(directory::LEN)
            .map(|entry| {
                let id = directory::ID.get(entry);
                let offset = directory::OFFSET.get(entry) as usize;
                let len = directory::SIZE.get(entry) as usize;
                offset.checked_add(len).filter(|end| *end <= total_len)?;
                Some((SectionId::from_id(id), offset, len))
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Self {
            crc: header::CRC.get(prefix),
            total_len,
            directory_end,
            entries,
        })
    }
}

/// Reads a delta front to back; running out is a malformed delta.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DeltaError> {
        if n > self.bytes.len() {
            return Err(DeltaError::Malformed("truncated"));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, DeltaError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, DeltaError> {
        Ok(U16(0).get(self.take(2)?))
    }

    fn u32(&mut self) -> Result<u32, DeltaError> {
        Ok(U32(0).get(self.take(4)?))
    }

    fn u64(&mut self) -> Result<u64, DeltaError> {
        Ok(U64(0).get(self.take(8)?))
    }

    fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}
