//! Durable files: the persisted snapshot in the state directory and the published snapshot in
//! the socket directory. Both are replaced atomically — written to a temporary file, fsynced,
//! renamed over the old one, and the directory fsynced — so a reader or a crash sees either
//! the old file or the new one, never a mix.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use stackroute_local_api::published::{
    GENERATION_FILE, SNAPSHOT_FILE, SNAPSHOT_TMP_FILE, encode_header,
};
use stackroute_snapshot::Snapshot;
use tracing::{info, warn};

use crate::genmap::GenerationMap;

/// Name of the persisted snapshot in the state directory.
pub const PERSISTED_FILE: &str = "snapshot";
const PERSISTED_TMP_FILE: &str = ".snapshot.tmp";

/// Writes `parts` to `dir/tmp` with `mode`, fsyncs it, renames it to `dir/name` and fsyncs
/// the directory.
pub(crate) fn replace_atomically(
    dir: &Path,
    tmp: &str,
    name: &str,
    mode: u32,
    parts: &[&[u8]],
) -> io::Result<()> {
    let tmp_path = dir.join(tmp);
    match fs::remove_file(&tmp_path) {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp_path)?;
    for part in parts {
        file.write_all(part)?;
    }
    file.sync_all()?;
    drop(file);
    fs::rename(&tmp_path, dir.join(name))?;
    File::open(dir)?.sync_all()
}

/// Creates `dir` (and parents) if missing.
pub fn ensure_dir(dir: &Path, mode: u32) -> io::Result<()> {
    if !dir.is_dir() {
        fs::create_dir_all(dir)?;
        fs::set_permissions(dir, fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// Persists a validated snapshot under the state directory.
pub fn persist(state_dir: &Path, snapshot: &[u8]) -> io::Result<()> {
    replace_atomically(
        state_dir,
        PERSISTED_TMP_FILE,
        PERSISTED_FILE,
        0o600,
        &[snapshot],
    )
}

/// The persisted snapshot, if there is one that validates and belongs to `node`. A corrupt,
/// truncated or foreign file is logged and ignored, never served.
pub fn load_persisted(state_dir: &Path, node: &str) -> Option<Vec<u8>> {
    let path = state_dir.join(PERSISTED_FILE);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            info!(path = %path.display(), "no persisted snapshot");
            return None;
        }
        Err(error) => {
            warn!(path = %path.display(), %error, "cannot read the persisted snapshot; ignoring it");
            return None;
        }
    };
    match Snapshot::parse(&bytes) {
        Ok(snapshot) if snapshot.node_name() == node => {
            info!(path = %path.display(), revision = snapshot.revision(), "loaded the persisted snapshot");
            Some(bytes)
        }
        Ok(snapshot) => {
            warn!(
                path = %path.display(),
                snapshot_node = snapshot.node_name(),
                node,
                "the persisted snapshot belongs to another node; ignoring it"
            );
            None
        }
        Err(error) => {
            warn!(path = %path.display(), %error, "the persisted snapshot is corrupt; ignoring it");
            None
        }
    }
}

/// Publishes snapshots in the socket directory: `DIR/snapshot` (header + snapshot, mode 0444)
/// replaced atomically, then the generation counter in `DIR/generation` advanced.
#[derive(Debug)]
pub struct Publisher {
    dir: PathBuf,
    generation: u64,
    map: GenerationMap,
}

impl Publisher {
    /// Opens the socket directory's generation counter, continuing from the value it holds.
    pub fn open(dir: &Path) -> io::Result<Self> {
        let (map, generation) = GenerationMap::open(&dir.join(GENERATION_FILE))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            generation,
            map,
        })
    }

    /// The last generation published.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Continues above `generation` (announced by an agent that handed over), should the file
    /// hold less. Nothing is stored: readers see the next publication.
    pub fn advance_to(&mut self, generation: u64) {
        if generation > self.generation {
            warn!(
                file = self.generation,
                handed_over = generation,
                "the generation file is behind the handed-over generation; continuing above it"
            );
            self.generation = generation;
        }
    }

    /// Removes a published snapshot left by an earlier agent (when this one has nothing valid
    /// to serve) and advances the generation, so readers drop their mapping. Nothing to remove:
    /// nothing happens.
    pub fn withdraw(&mut self) -> io::Result<bool> {
        match fs::remove_file(self.dir.join(SNAPSHOT_FILE)) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(error) => return Err(error),
        }
        File::open(&self.dir)?.sync_all()?;
        let next = self.generation.max(self.map.load()) + 1;
        self.map.store(next);
        self.generation = next;
        Ok(true)
    }

    /// Publishes a validated snapshot as the next generation, returning it.
    pub fn publish(&mut self, revision: u64, stale: bool, snapshot: &[u8]) -> io::Result<u64> {
        let next = self.generation.max(self.map.load()) + 1;
        let header = encode_header(next, revision, stale, snapshot.len());
        replace_atomically(
            &self.dir,
            SNAPSHOT_TMP_FILE,
            SNAPSHOT_FILE,
            0o444,
            &[&header, snapshot],
        )?;
        self.map.store(next);
        self.generation = next;
        Ok(next)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use stackroute_local_api::published;
    use stackroute_policy::{ClusterState, Compiled, Settings};

    use super::*;

    /// The example cluster's snapshot of `node` at `revision`.
    pub(crate) fn example_snapshot(node: &str, revision: u64) -> Vec<u8> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/cluster");
        let mut state = ClusterState::default();
        for name in ["cluster.yaml", "policies.yaml"] {
            let text = fs::read_to_string(dir.join(name)).unwrap();
            assert!(state.load_text(name, &text).is_empty());
        }
        Compiled::new(&state, Settings::default())
            .node_snapshot(node, revision)
            .unwrap()
    }

    #[test]
    fn persisted_snapshot_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load_persisted(dir.path(), "node-a1"), None);
        let bytes = example_snapshot("node-a1", 7);
        persist(dir.path(), &bytes).unwrap();
        assert_eq!(load_persisted(dir.path(), "node-a1"), Some(bytes.clone()));
        assert!(!dir.path().join(PERSISTED_TMP_FILE).exists());
        // Another node's agent does not serve it.
        assert_eq!(load_persisted(dir.path(), "node-b1"), None);
    }

    #[test]
    fn corrupt_or_truncated_persisted_snapshot_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = example_snapshot("node-a1", 3);
        let mut corrupt = bytes.clone();
        let middle = corrupt.len() / 2;
        corrupt[middle] ^= 0x40;
        fs::write(dir.path().join(PERSISTED_FILE), &corrupt).unwrap();
        assert_eq!(load_persisted(dir.path(), "node-a1"), None);
        fs::write(dir.path().join(PERSISTED_FILE), &bytes[..bytes.len() - 1]).unwrap();
        assert_eq!(load_persisted(dir.path(), "node-a1"), None);
        fs::write(dir.path().join(PERSISTED_FILE), b"").unwrap();
        assert_eq!(load_persisted(dir.path(), "node-a1"), None);
    }

    #[test]
    fn publisher_writes_read_only_files_and_advances_the_generation() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = example_snapshot("node-a1", 5);
        let mut publisher = Publisher::open(dir.path()).unwrap();
        assert_eq!(publisher.publish(5, true, &bytes).unwrap(), 1);
        assert_eq!(publisher.publish(6, false, &bytes).unwrap(), 2);
        let file = fs::read(dir.path().join(SNAPSHOT_FILE)).unwrap();
        let view = published::parse(&file).unwrap();
        assert_eq!((view.generation, view.revision, view.stale), (2, 6, false));
        assert_eq!(view.snapshot, &bytes[..]);
        let mode = fs::metadata(dir.path().join(SNAPSHOT_FILE))
            .unwrap()
            .permissions();
        assert_eq!(mode.mode() & 0o777, 0o444);
        let generation = fs::read(dir.path().join(GENERATION_FILE)).unwrap();
        assert_eq!(published::parse_generation(&generation), Some(2));
        drop(publisher);
        // A restarted agent continues from the generation on disk.
        let mut publisher = Publisher::open(dir.path()).unwrap();
        assert_eq!(publisher.generation(), 2);
        assert_eq!(publisher.publish(6, true, &bytes).unwrap(), 3);
    }
}
