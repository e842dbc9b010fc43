//! The generation counter file (`DIR/generation`), mapped shared so that the shim, which maps
//! it read-only, sees each new generation with one atomic load and no syscall. The only unsafe
//! code of the agent lives here.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::MmapMut;
use stackroute_local_api::published::{
    GENERATION_LEN, GENERATION_OFFSET, encode_generation, parse_generation,
};

/// A shared, writable mapping of `DIR/generation`.
#[derive(Debug)]
pub(crate) struct GenerationMap {
    map: MmapMut,
    _file: File,
}

impl GenerationMap {
    /// Opens (creating if needed) the generation file and maps it. Returns the map and the
    /// generation the file already held (0 for a new or unrecognised file). The file is never
    /// replaced, so readers that mapped it earlier keep seeing updates.
    pub(crate) fn open(path: &Path) -> io::Result<(Self, u64)> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(path)?;
        let mut bytes = [0; GENERATION_LEN];
        let held = match file.read_exact_at(&mut bytes, 0) {
            Ok(()) => parse_generation(&bytes),
            Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => None,
            Err(error) => return Err(error),
        };
        if held.is_none() {
            file.write_all_at(&encode_generation(0), 0)?;
        }
        file.set_len(GENERATION_LEN as u64)?;
        // SAFETY: the file is GENERATION_LEN bytes long and nobody truncates it (the agent owns
        // its socket directory; readers only map it read-only), so every mapped byte stays
        // backed; all accesses to the shared word go through `atomic()`.
        let map = unsafe { MmapMut::map_mut(&file)? };
        Ok((Self { map, _file: file }, held.unwrap_or(0)))
    }

    fn atomic(&self) -> &AtomicU64 {
        let word = self
            .map
            .as_ptr()
            .wrapping_add(GENERATION_OFFSET)
            .cast_mut()
            .cast::<u64>();
        // SAFETY: a mapping starts on a page boundary and is GENERATION_LEN (16) bytes long, so
        // offset 8 is in bounds and 8-byte aligned; the reference borrows `self`, which owns
        // the mapping; every access by any process to this word is atomic.
        unsafe { AtomicU64::from_ptr(word) }
    }

    /// Publishes `generation` to every reader.
    pub(crate) fn store(&self, generation: u64) {
        self.atomic().store(generation, Ordering::Release);
    }

    /// The generation currently in the file.
    pub(crate) fn load(&self) -> u64 {
        self.atomic().load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_are_visible_through_the_file_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("generation");
        let (map, held) = GenerationMap::open(&path).unwrap();
        assert_eq!(held, 0);
        map.store(41);
        assert_eq!(map.load(), 41);
        assert_eq!(parse_generation(&std::fs::read(&path).unwrap()), Some(41));
        drop(map);
        let (map, held) = GenerationMap::open(&path).unwrap();
        assert_eq!(held, 41);
        assert_eq!(map.load(), 41);
        std::fs::write(&path, b"garbage, not a generation file").unwrap();
        let (_map, held) = GenerationMap::open(&path).unwrap();
        assert_eq!(held, 0);
        assert_eq!(std::fs::read(&path).unwrap().len(), GENERATION_LEN);
    }
}
