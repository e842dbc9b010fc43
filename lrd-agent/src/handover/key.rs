//! The state directory's part in the hand-over: the directory itself (mode 0700, never the
//! socket directory or inside it) and the node's hand-over secret `STATE_DIR/handover.key`.
//!
//! The first agent on a node creates the key (32 bytes from `/dev/urandom`, mode 0600); every
//! agent reads it when it starts. It is written to a temporary file and hard-linked into place,
//! so two agents starting at once end up with the same key and nobody ever reads half of one.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read as _, Write as _};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use anyhow::{Context as _, bail};
use tracing::{info, warn};

use super::protocol::{KEY_FILE, KEY_LEN, Key};

/// Refuses a state directory that is the socket directory or inside it: the socket directory
/// is mounted into every injected pod, and the hand-over socket and key must not be.
pub fn check_separate(socket_dir: &Path, state_dir: &Path) -> anyhow::Result<()> {
    let socket_dir = absolute(socket_dir)?;
    let state_dir = absolute(state_dir)?;
    if state_dir.starts_with(&socket_dir) {
        bail!(
            "--state-dir {} is inside --socket-dir {}: the socket directory is mounted into workloads, and the state directory holds the hand-over socket and secret; use a directory of its own",
            state_dir.display(),
            socket_dir.display()
        );
    }
    Ok(())
}

/// `path` made absolute and normalised lexically, with symbolic links of the existing part
/// resolved (so `a/../b` and a link to the socket directory are caught).
fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    let absolute = std::path::absolute(path)
        .with_context(|| format!("{}: cannot make absolute", path.display()))?;
    let mut normal = PathBuf::new();
    for component in absolute.components() {
        match component {
            Component::ParentDir => {
                normal.pop();
            }
            Component::CurDir => {}
            other => normal.push(other),
        }
    }
    // The longest existing prefix, canonicalised; the rest as it is.
    let mut existing = normal.as_path();
    let mut rest = Vec::new();
    loop {
        if let Ok(real) = fs::canonicalize(existing) {
            let mut path = real;
            path.extend(rest.iter().rev());
            return Ok(path);
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_owned());
                existing = parent;
            }
            _ => return Ok(normal),
        }
    }
}

/// Creates the state directory (mode 0700) or tightens an existing one to 0700 (a hostPath
/// created by the kubelet is 0755).
pub fn secure_dir(dir: &Path) -> anyhow::Result<()> {
    crate::files::ensure_dir(dir, 0o700)
        .with_context(|| format!("{}: cannot create", dir.display()))?;
    let meta = fs::metadata(dir).with_context(|| format!("{}: cannot stat", dir.display()))?;
    if !meta.is_dir() {
        bail!("{}: not a directory", dir.display());
    }
    if meta.mode() & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("{}: cannot set mode 0700", dir.display()))?;
        info!(dir = %dir.display(), old_mode = format!("{:o}", meta.mode() & 0o7777), "state directory set to mode 0700");
    }
    Ok(())
}

/// The node's hand-over secret from `DIR/handover.key`, created if missing. A key file that is
/// not a regular file of exactly 32 bytes, mode 0600 and owned by this agent's user is not
/// trusted: it is replaced (a running agent that holds the old key then refuses this one's
/// request, and this one takes the directory over without a hand-over).
pub fn load_or_create(dir: &Path) -> anyhow::Result<Key> {
    secure_dir(dir)?;
    let path = dir.join(KEY_FILE);
    for _ in 0..3 {
        match read(&path)? {
            Found::Key(key) => return Ok(key),
            Found::Missing => {}
            Found::Untrusted(why) => {
                warn!(path = %path.display(), %why, "replacing the hand-over key");
                match fs::remove_file(&path) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => {
                        return Err(e)
                            .with_context(|| format!("{}: cannot remove", path.display()));
                    }
                    _ => {}
                }
            }
        }
        if create(dir, &path)? {
            info!(path = %path.display(), "created the node's hand-over key");
        }
    }
    bail!(
        "{}: the hand-over key keeps changing under this agent",
        path.display()
    )
}

enum Found {
    Key(Key),
    Missing,
    Untrusted(String),
}

fn read(path: &Path) -> anyhow::Result<Found> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Found::Missing),
        Err(e) => return Err(e).with_context(|| format!("{}: cannot stat", path.display())),
    };
    let own_uid = rustix::process::getuid().as_raw();
    if !meta.file_type().is_file() {
        if meta.is_dir() {
            bail!("{}: is a directory, not the hand-over key", path.display());
        }
        return Ok(Found::Untrusted("not a regular file".into()));
    }
    if meta.uid() != own_uid {
        return Ok(Found::Untrusted(format!(
            "owned by uid {}, not {own_uid}",
            meta.uid()
        )));
    }
    if meta.mode() & 0o077 != 0 {
        return Ok(Found::Untrusted(format!(
            "mode {:o} lets others read it",
            meta.mode() & 0o7777
        )));
    }
    let mut bytes = Vec::with_capacity(KEY_LEN + 1);
    File::open(path)
        .and_then(|file| file.take(KEY_LEN as u64 + 1).read_to_end(&mut bytes))
        .with_context(|| format!("{}: cannot read", path.display()))?;
    Ok(match Key::from_file_bytes(&bytes) {
        Some(key) => Found::Key(key),
        None => Found::Untrusted(format!("{} bytes, not {KEY_LEN}", bytes.len())),
    })
}

/// Writes a new key to a temporary file and links it into place unless another agent did
/// first. True if this call's key is the one in place.
fn create(dir: &Path, path: &Path) -> anyhow::Result<bool> {
    let mut bytes = [0; KEY_LEN];
    File::open("/dev/urandom")
        .and_then(|mut random| random.read_exact(&mut bytes))
        .context("cannot read /dev/urandom for the hand-over key")?;
    let key = Key::from_bytes(bytes);
    let tmp = dir.join(format!(".{KEY_FILE}.{}.tmp", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let written = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut file| {
            file.write_all(key.as_bytes())?;
            file.sync_all()
        });
    let linked = written.and_then(|()| match fs::hard_link(&tmp, path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    });
    let _ = fs::remove_file(&tmp);
    let linked = linked.with_context(|| format!("{}: cannot create", path.display()))?;
    if linked {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("{}: cannot sync", dir.display()))?;
    }
    Ok(linked)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().mode() & 0o7777
    }

    #[test]
    fn the_key_is_created_once_private_and_then_read() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        let key = load_or_create(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        let path = dir.join(KEY_FILE);
        assert_eq!(mode(&path), 0o600);
        assert_eq!(fs::read(&path).unwrap(), key.as_bytes());
        assert_eq!(load_or_create(&dir).unwrap(), key);
        // Two keys in a row differ (they are random).
        let other = tmp.path().join("other");
        assert_ne!(load_or_create(&other).unwrap(), key);
        // Nothing temporary is left behind.
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [KEY_FILE]);
    }

    #[test]
    fn an_open_state_directory_is_tightened() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        load_or_create(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
    }

    #[test]
    fn untrusted_key_files_are_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        let first = load_or_create(&dir).unwrap();
        let path = dir.join(KEY_FILE);
        // Readable by others: maybe read by others, so not the node's secret any more.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let second = load_or_create(&dir).unwrap();
        assert_ne!(second, first);
        assert_eq!(mode(&path), 0o600);
        // Truncated.
        fs::write(&path, [1u8; 5]).unwrap();
        let third = load_or_create(&dir).unwrap();
        assert_ne!(third, second);
        assert_eq!(fs::read(&path).unwrap().len(), KEY_LEN);
        // A symbolic link.
        fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(tmp.path().join("elsewhere"), &path).unwrap();
        load_or_create(&dir).unwrap();
        assert!(fs::symlink_metadata(&path).unwrap().file_type().is_file());
        // A directory is an error, not something to delete.
        fs::remove_file(&path).unwrap();
        fs::create_dir(&path).unwrap();
        let error = load_or_create(&dir).unwrap_err().to_string();
        assert!(error.contains("is a directory"), "{error}");
    }

    #[test]
    fn the_state_directory_must_not_be_in_the_socket_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path().join("run");
        fs::create_dir(&run).unwrap();
        assert!(check_separate(&run, &tmp.path().join("state")).is_ok());
        assert!(check_separate(&run, &tmp.path().join("run-state")).is_ok());
        for bad in [
            run.clone(),
            run.join("state"),
            run.join("a/../state"),
            tmp.path().join("x/../run/state"),
        ] {
            let error = check_separate(&run, &bad).unwrap_err().to_string();
            assert!(
                error.contains("inside --socket-dir"),
                "{}: {error}",
                bad.display()
            );
        }
        // Through a symbolic link to the socket directory.
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&run, &link).unwrap();
        assert!(check_separate(&run, &link.join("state")).is_err());
    }
}
