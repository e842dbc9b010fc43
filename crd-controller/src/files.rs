//! The standalone source: a directory of Kubernetes YAML/JSON, polled for changes.
//!
//! ```text
//! DIR/*.yaml|*.yml|*.json ─► poller thread (mtime, size, content) ─► FileEvent ─► index
//! ```
//!
//! Each file is loaded on its own ([`FileSource`]) so that a broken new version of one file
//! keeps that file's last good objects in force while every other file keeps applying.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use stackroute_policy::{ClusterState, LoadProblem};

/// The source name of the state directory, for [`FileEvent::Synced`].
pub const DIRECTORY: &str = "state directory";

/// One state file as the index keeps it: the objects in force and the problems of the version
/// most recently read.
#[derive(Debug, Default)]
pub struct FileSource {
    /// Objects in force.
    in_force: ClusterState,
    /// Whether `in_force` came from a version without problems.
    clean: bool,
    /// Problems of the newest version read (empty when it loaded cleanly).
    problems: Vec<LoadProblem>,
    /// Whether the newest version was set aside for the last good one.
    kept_previous: bool,
}

impl FileSource {
    /// Loads a file's first version. Objects that load are used even if others did not (there
    /// is no earlier version to fall back to).
    pub fn new(source: &str, text: &str) -> Self {
        let mut file = Self::default();
        file.update(source, text);
        file
    }

    /// Reads a new version of the file. A version without problems replaces what is in force;
    /// a version with problems is reported and, if a clean version is in force, set aside.
    pub fn update(&mut self, source: &str, text: &str) {
        let mut state = ClusterState::default();
        let problems = state.load_text(source, text);
        if problems.is_empty() {
            self.in_force = state;
            self.clean = true;
            self.kept_previous = false;
        } else if self.clean {
            self.kept_previous = true;
        } else {
            // No good version yet: use what loaded, like `stackroute explain` does.
            self.in_force = state;
            self.kept_previous = false;
        }
        self.problems = problems;
    }

    /// Objects in force.
    pub fn objects(&self) -> &ClusterState {
        &self.in_force
    }

    /// Problems of the newest version.
    pub fn problems(&self) -> &[LoadProblem] {
        &self.problems
    }

    /// Whether the newest version had problems and the last good version stays in force.
    pub fn kept_previous(&self) -> bool {
        self.kept_previous
    }
}

/// A change seen in the state directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileEvent {
    /// A file appeared or changed: its source name and text.
    Changed(String, String),
    /// A file disappeared.
    Removed(String),
    /// A file could not be read (permissions, not UTF-8, ...): source name and why.
    Unreadable(String, String),
    /// A source delivered its first complete view (the directory poller: [`DIRECTORY`]).
    Synced(String),
}

/// Whether a directory entry is a state file.
pub fn is_state_file(path: &Path) -> bool {
    let hidden = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_none_or(|n| n.starts_with('.'));
    let extension = path.extension().and_then(|e| e.to_str());
    !hidden && matches!(extension, Some("yaml" | "yml" | "json"))
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    modified: Option<SystemTime>,
    len: u64,
    text: String,
}

/// Polls `dir` every `interval`, calling `emit` for every change; returns when `emit` returns
/// `false` (the receiver is gone). Files modified in the last two seconds are re-read on every
/// poll and compared by content, so a rewrite within one mtime tick is not missed.
pub fn poll_dir(dir: &Path, interval: Duration, mut emit: impl FnMut(FileEvent) -> bool) {
    let mut seen: BTreeMap<PathBuf, Seen> = BTreeMap::new();
    let mut unreadable: BTreeMap<PathBuf, String> = BTreeMap::new();
    let mut synced = false;
    loop {
        let mut present = Vec::new();
        match std::fs::read_dir(dir) {
            Ok(entries) => {
                for entry in entries.flatten() {
                    let path = entry.path();
                    if is_state_file(&path) && path.is_file() {
                        present.push(path);
                    }
                }
            }
            Err(error) => {
                tracing::warn!(dir = %dir.display(), %error, "cannot read the state directory");
            }
        }
        present.sort();
        for path in &present {
            let source = path.display().to_string();
            let Ok(metadata) = std::fs::metadata(path) else {
                continue;
            };
            let modified = metadata.modified().ok();
            let len = metadata.len();
            let recent = modified
                .and_then(|m| m.elapsed().ok())
                .is_none_or(|age| age < Duration::from_secs(2));
            let unchanged_meta = seen
                .get(path)
                .is_some_and(|s| s.modified == modified && s.len == len);
            if unchanged_meta && !recent {
                continue;
            }
            let text = match std::fs::read(path).map(String::from_utf8) {
                Ok(Ok(text)) => text,
                Ok(Err(_)) => {
                    let why = "not UTF-8 text".to_string();
                    if unreadable.get(path) != Some(&why) {
                        unreadable.insert(path.clone(), why.clone());
                        if !emit(FileEvent::Unreadable(source, why)) {
                            return;
                        }
                    }
                    continue;
                }
                Err(error) => {
                    let why = error.to_string();
                    if unreadable.get(path) != Some(&why) {
                        unreadable.insert(path.clone(), why.clone());
                        if !emit(FileEvent::Unreadable(source, why)) {
                            return;
                        }
                    }
                    continue;
                }
            };
            unreadable.remove(path);
            let changed = seen.get(path).is_none_or(|s| s.text != text);
            seen.insert(
                path.clone(),
                Seen {
                    modified,
                    len,
                    text: text.clone(),
                },
            );
            if changed && !emit(FileEvent::Changed(source, text)) {
                return;
            }
        }
        let gone: Vec<PathBuf> = seen
            .keys()
            .filter(|p| !present.contains(p))
            .cloned()
            .collect();
        for path in gone {
            seen.remove(&path);
            if !emit(FileEvent::Removed(path.display().to_string())) {
                return;
            }
        }
        unreadable.retain(|p, _| present.contains(p));
        if !synced {
            synced = true;
            if !emit(FileEvent::Synced(DIRECTORY.to_string())) {
                return;
            }
        }
        std::thread::sleep(interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: a}\nspec: {nodeName: n1, containers: []}\nstatus: {podIP: 10.1.0.1}\n";
    const GOOD2: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: b}\n";
    const BROKEN: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: c}\n---\nkind: Pod\nmetadata: {name: [\n";

    #[test]
    fn a_clean_version_replaces_what_is_in_force() {
        let mut file = FileSource::new("f.yaml", GOOD);
        assert!(file.problems().is_empty());
        assert_eq!(file.objects().pods.len(), 1);
        file.update("f.yaml", GOOD2);
        assert!(file.objects().pods.is_empty());
        assert!(file.objects().namespaces.contains_key("b"));
        assert!(!file.kept_previous());
    }

    #[test]
    fn a_broken_version_keeps_the_last_good_one_in_force() {
        let mut file = FileSource::new("f.yaml", GOOD);
        file.update("f.yaml", BROKEN);
        assert!(file.kept_previous());
        assert_eq!(file.problems().len(), 1);
        let problem = file.problems()[0].to_string();
        assert!(problem.starts_with("f.yaml:"), "{problem}");
        assert_eq!(file.problems()[0].line, Some(7), "{problem}");
        // The old objects, not the partial new ones.
        assert_eq!(file.objects().pods.len(), 1);
        assert!(!file.objects().namespaces.contains_key("c"));
        // A fixed version takes over and clears the problem.
        file.update("f.yaml", GOOD2);
        assert!(file.problems().is_empty());
        assert!(!file.kept_previous());
        assert!(file.objects().namespaces.contains_key("b"));
    }

    #[test]
    fn a_first_version_with_problems_applies_what_loaded() {
        let mut file = FileSource::new("f.yaml", BROKEN);
        assert!(!file.kept_previous());
        assert!(file.objects().namespaces.contains_key("c"));
        // Until a clean version arrives, newer partial versions replace older partial ones.
        file.update(
            "f.yaml",
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: d}\n---\nkind: [\n",
        );
        assert!(file.objects().namespaces.contains_key("d"));
        assert!(!file.objects().namespaces.contains_key("c"));
    }

    #[test]
    fn only_visible_yaml_and_json_files_count() {
        assert!(is_state_file(Path::new("/d/a.yaml")));
        assert!(is_state_file(Path::new("/d/a.yml")));
        assert!(is_state_file(Path::new("/d/a.json")));
        assert!(!is_state_file(Path::new("/d/a.yaml.swp")));
        assert!(!is_state_file(Path::new("/d/.a.yaml")));
        assert!(!is_state_file(Path::new("/d/README")));
    }

    #[test]
    fn the_poller_reports_changes_and_removals() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("a.yaml"), GOOD).expect("write");
        std::fs::write(dir.path().join("notes.txt"), "ignored").expect("write");
        let (tx, rx) = std::sync::mpsc::channel();
        let path = dir.path().to_path_buf();
        let poller = std::thread::spawn(move || {
            poll_dir(&path, Duration::from_millis(20), |event| {
                tx.send(event).is_ok()
            });
        });
        let next = || {
            rx.recv_timeout(Duration::from_secs(5))
                .expect("poller event within 5 s")
        };
        let a = dir.path().join("a.yaml").display().to_string();
        assert_eq!(next(), FileEvent::Changed(a.clone(), GOOD.to_string()));
        assert_eq!(next(), FileEvent::Synced(DIRECTORY.to_string()));
        // Same length, same mtime tick possible: the content comparison still sees it.
        let rewritten = GOOD.replace("10.1.0.1", "10.1.0.2");
        std::fs::write(dir.path().join("a.yaml"), &rewritten).expect("write");
        assert_eq!(next(), FileEvent::Changed(a.clone(), rewritten));
        std::fs::remove_file(dir.path().join("a.yaml")).expect("remove");
        assert_eq!(next(), FileEvent::Removed(a));
        drop(rx);
        // The poller stops at its next emit; give it something to emit.
        std::fs::write(dir.path().join("b.yaml"), GOOD2).expect("write");
        poller.join().expect("poller thread");
    }
}
