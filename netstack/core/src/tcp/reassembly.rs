//! Out-of-order reassembly: non-overlapping byte runs keyed by stream offset in a B-tree, so any
//! number of holes of any size can be held (bounded only by the receive window).

use std::collections::BTreeMap;

/// Out-of-order data beyond the next expected offset.
#[derive(Debug, Default, Clone)]
pub(crate) struct Reassembly {
    runs: BTreeMap<u64, Vec<u8>>,
    /// Start offset of the run holding the most recently received bytes (RFC 2018 §4: the
    /// first SACK block reports it).
    latest_run: Option<u64>,
    bytes: usize,
}

impl Reassembly {
    /// Stores `data` at `offset`, merging it with overlapping or adjacent runs.
    pub(crate) fn insert(&mut self, offset: u64, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let mut start = offset;
        let mut end = offset + data.len() as u64;
        let mut absorbed: Vec<(u64, Vec<u8>)> = Vec::new();
        // A run that starts before `offset` but reaches it.
        if let Some((&run_start, run)) = self.runs.range(..offset).next_back()
            && run_start + run.len() as u64 >= offset
        {
            start = run_start;
            end = end.max(run_start + run.len() as u64);
        }
        let overlapping: Vec<u64> = self.runs.range(start..=end).map(|(&s, _)| s).collect();
        for run_start in overlapping {
            if let Some(run) = self.runs.remove(&run_start) {
                end = end.max(run_start + run.len() as u64);
                absorbed.push((run_start, run));
            }
        }
        if start < offset
            && let Some(run) = self.runs.remove(&start)
        {
            absorbed.push((start, run));
        }
        let mut merged = vec![0u8; (end - start) as usize];
        for (run_start, run) in &absorbed {
            let at = (run_start - start) as usize;
            merged[at..at + run.len()].copy_from_slice(run);
            self.bytes -= run.len();
        }
        let at = (offset - start) as usize;
        merged[at..at + data.len()].copy_from_slice(data);
        self.bytes += merged.len();
        self.runs.insert(start, merged);
        self.latest_run = Some(start);
    }

    /// Whether `[start, end)` is already held, all within one run.
    pub(crate) fn covers(&self, start: u64, end: u64) -> bool {
        self.runs
            .range(..=start)
            .next_back()
            .is_some_and(|(&run_start, run)| run_start + run.len() as u64 >= end)
    }

    /// Removes and returns the run starting exactly at `offset` (or straddling it), trimmed so it
    /// begins at `offset`. Runs wholly below `offset` are dropped.
    pub(crate) fn take_at(&mut self, offset: u64) -> Option<Vec<u8>> {
        loop {
            let (&run_start, run_len) = self.runs.iter().next().map(|(s, r)| (s, r.len()))?;
            if run_start > offset {
                return None;
            }
            let mut run = self.runs.remove(&run_start)?;
            self.bytes -= run_len;
            if self.latest_run == Some(run_start) {
                self.latest_run = None;
            }
            let end = run_start + run_len as u64;
            if end <= offset {
                continue;
            }
            run.drain(..(offset - run_start) as usize);
            return Some(run);
        }
    }

    /// Up to `max` runs as `(start, end)` offsets, the most recent first (RFC 2018 §4).
    pub(crate) fn sack_blocks(&self, max: usize) -> Vec<(u64, u64)> {
        let mut blocks = Vec::with_capacity(max);
        if let Some(latest) = self.latest_run
            && let Some(run) = self.runs.get(&latest)
        {
            blocks.push((latest, latest + run.len() as u64));
        }
        for (&start, run) in self.runs.iter().rev() {
            if blocks.len() >= max {
                break;
            }
            if Some(start) != self.latest_run {
                blocks.push((start, start + run.len() as u64));
            }
        }
        blocks
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    #[cfg(test)]
    pub(crate) fn buffered_bytes(&self) -> usize {
        self.bytes
    }

    pub(crate) fn clear(&mut self) {
        self.runs.clear();
        self.latest_run = None;
        self.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::Reassembly;

    #[test]
    fn merges_overlaps_and_hands_back_in_order() {
        let mut r = Reassembly::default();
        r.insert(10, b"klmno");
        r.insert(30, b"EFG");
        r.insert(1_000_000, b"far");
        r.insert(12, b"mnopqrs");
        r.insert(5, b"fghij");
        assert_eq!(
            r.sack_blocks(4),
            vec![(5, 19), (1_000_000, 1_000_003), (30, 33)]
        );
        assert_eq!(r.take_at(0), None);
        assert_eq!(r.take_at(7).as_deref(), Some(&b"hijklmnopqrs"[..]));
        r.insert(33, b"H");
        assert_eq!(r.take_at(30).as_deref(), Some(&b"EFGH"[..]));
        assert_eq!(r.buffered_bytes(), 3);
        // Runs wholly below the offset are discarded.
        assert_eq!(r.take_at(2_000_000), None);
        assert!(r.is_empty());
    }

    #[test]
    fn adjacent_runs_join() {
        let mut r = Reassembly::default();
        r.insert(0, b"ab");
        r.insert(4, b"ef");
        r.insert(2, b"cd");
        assert_eq!(r.sack_blocks(3), vec![(0, 6)]);
        assert_eq!(r.buffered_bytes(), 6);
    }
}
