//! The cgroups an instance joins so that its caller's pod pays for it: the caller's cgroup v2
//! (`0::PATH` in `/proc/PID/cgroup`) and, on a host whose `memory` and `cpu` controllers are
//! still cgroup v1 hierarchies (a hybrid host, as kubelet's cgroupfs driver with runc on v1
//! uses), the caller's cgroups of those two as well: there the v2 hierarchy accounts nothing.
//! Each is opened here, in the agent, and written (`0`: the writing process) by the instance's
//! child before `exec`.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The v1 controllers whose accounting matters for "the pod pays".
const V1_CONTROLLERS: [&str; 2] = ["memory", "cpu"];

/// The `cgroup.procs` files an instance writes itself into, opened for writing.
#[derive(Debug, Default)]
pub(super) struct Membership {
    files: Vec<File>,
}

impl Membership {
    /// The cgroups of process `pid`, whose v2 path (already read) is `cgroup`.
    pub(super) fn open(pid: i32, cgroup: Option<&str>) -> Result<Self, String> {
        let cgroup = cgroup.ok_or("the caller's cgroup is unknown")?;
        let mut files = vec![open_procs(
            roots()
                .v2
                .as_deref()
                .ok_or("no cgroup v2 hierarchy is mounted")?,
            cgroup,
        )?];
        if !roots().v1.is_empty() {
            let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
                .map_err(|e| format!("/proc/{pid}/cgroup: {e}"))?;
            for (controller, path) in v1_paths(&text) {
                let root = roots()
                    .v1
                    .iter()
                    .find(|(name, _)| *name == controller)
                    .map(|(_, root)| root)
                    .ok_or_else(|| format!("the {controller} hierarchy is not mounted"))?;
                files.push(open_procs(root, &path)?);
            }
        }
        Ok(Self { files })
    }

    /// The descriptors, for the child (at most three: v2, memory, cpu).
    pub(super) fn procs_fds(&self) -> [Option<RawFd>; 3] {
        let mut fds = [None; 3];
        for (slot, file) in fds.iter_mut().zip(&self.files) {
            *slot = Some(file.as_raw_fd());
        }
        fds
    }
}

/// Where the hierarchies are mounted in the agent's mount namespace, from
/// `/proc/self/mountinfo`: v2 (`/sys/fs/cgroup` on a unified host, `/sys/fs/cgroup/unified` on a
/// hybrid one) and each v1 controller of [`V1_CONTROLLERS`].
#[derive(Debug, Default)]
struct Roots {
    v2: Option<PathBuf>,
    v1: Vec<(&'static str, PathBuf)>,
}

/// Where the cgroup v2 hierarchy is mounted in the agent's mount namespace, if anywhere.
pub(crate) fn v2_root() -> Option<&'static Path> {
    roots().v2.as_deref()
}

fn roots() -> &'static Roots {
    static ROOTS: OnceLock<Roots> = OnceLock::new();
    ROOTS.get_or_init(|| {
        std::fs::read_to_string("/proc/self/mountinfo")
            .map(|text| parse_mountinfo(&text))
            .unwrap_or_default()
    })
}

fn parse_mountinfo(text: &str) -> Roots {
    let mut roots = Roots::default();
    for line in text.lines() {
        let Some((mount, fs)) = line.split_once(" - ") else {
            continue;
        };
        // Mounted at the root of the hierarchy only: a sub-tree mount (a container's own view)
        // would shift paths. The last such mount wins: it is the one on top.
        let mut fields = mount.split(' ');
        let (Some(root), Some(point)) = (fields.nth(3), fields.next()) else {
            continue;
        };
        if root != "/" {
            continue;
        }
        let mut fs = fs.split(' ');
        match (fs.next(), fs.nth(1)) {
            (Some("cgroup2"), _) => roots.v2 = Some(PathBuf::from(point)),
            (Some("cgroup"), Some(options)) => {
                for controller in V1_CONTROLLERS {
                    if options.split(',').any(|o| o == controller) {
                        roots.v1.retain(|(name, _)| *name != controller);
                        roots.v1.push((controller, PathBuf::from(point)));
                    }
                }
            }
            _ => {}
        }
    }
    roots
}

/// The v1 paths of [`V1_CONTROLLERS`] in the contents of `/proc/PID/cgroup`
/// (`ID:CONTROLLERS:PATH` lines).
fn v1_paths(text: &str) -> Vec<(&'static str, String)> {
    let mut paths = Vec::new();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        for controller in V1_CONTROLLERS {
            if controllers.split(',').any(|c| c == controller) {
                paths.push((controller, path.to_owned()));
            }
        }
    }
    paths
}

/// Whether process `pid` is the only process left in a cgroup it joined below the root: its
/// memory cgroup (v1), else its v2 cgroup. An instance joins its caller's container cgroup,
/// so alone there means the container has exited; the runtime and kubelet wait for that
/// cgroup to empty before the pod is gone.
pub(super) fn alone_in_cgroup(pid: i32) -> bool {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
        return false;
    };
    let (root, path) = match v1_paths(&text)
        .into_iter()
        .find(|(controller, _)| *controller == "memory")
        .and_then(|(_, path)| {
            Some((
                roots().v1.iter().find(|(c, _)| *c == "memory")?.1.clone(),
                path,
            ))
        }) {
        Some(found) => found,
        None => match (
            roots().v2.as_deref(),
            text.lines().find_map(|l| l.strip_prefix("0::")),
        ) {
            (Some(root), Some(path)) => (root.to_path_buf(), path.to_owned()),
            _ => return false,
        },
    };
    let path = path.trim_start_matches('/');
    if path.is_empty() || path.split('/').any(|part| part == "..") {
        return false;
    }
    std::fs::read_to_string(root.join(path).join("cgroup.procs"))
        .is_ok_and(|procs| only_pid(&procs, pid))
}

/// Whether the contents of a `cgroup.procs` file list `pid` and no other process.
fn only_pid(procs: &str, pid: i32) -> bool {
    let mut listed = procs.split_whitespace().map(str::parse::<i32>);
    listed.next() == Some(Ok(pid)) && listed.next().is_none()
}

/// `cgroup.procs` of `cgroup` (a path from `/proc/PID/cgroup`) under `root`, opened for
/// writing.
fn open_procs(root: &Path, cgroup: &str) -> Result<File, String> {
    if cgroup.split('/').any(|part| part == "..") {
        return Err(format!("unexpected cgroup path {cgroup:?}"));
    }
    let path = root
        .join(cgroup.trim_start_matches('/'))
        .join("cgroup.procs");
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alone_means_the_only_pid_listed() {
        assert!(only_pid("42\n", 42));
        assert!(!only_pid("42\n43\n", 42));
        assert!(!only_pid("43\n", 42));
        assert!(!only_pid("", 42));
    }

    #[test]
    fn hybrid_and_unified_mounts_are_told_apart() {
        // A hybrid host as this machine mounts it, then an agent container's own sub-tree
        // view (root not "/") that must be ignored.
        let hybrid = "\
30 25 0:26 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw
35 30 0:31 / /sys/fs/cgroup/memory rw,nosuid shared:16 - cgroup cgroup rw,memory
36 30 0:32 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:17 - cgroup cgroup rw,cpu,cpuacct
37 30 0:33 / /sys/fs/cgroup/pids rw,nosuid shared:18 - cgroup cgroup rw,pids
90 80 0:31 /kubepods/x /host/memory rw - cgroup cgroup rw,memory
";
        let roots = parse_mountinfo(hybrid);
        assert_eq!(
            roots.v2.as_deref(),
            Some(Path::new("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            roots.v1,
            vec![
                ("memory", PathBuf::from("/sys/fs/cgroup/memory")),
                ("cpu", PathBuf::from("/sys/fs/cgroup/cpu,cpuacct")),
            ]
        );
        let unified = "40 30 0:27 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n";
        let roots = parse_mountinfo(unified);
        assert_eq!(roots.v2.as_deref(), Some(Path::new("/sys/fs/cgroup")));
        assert!(roots.v1.is_empty());
    }

    #[test]
    fn v1_paths_of_memory_and_cpu() {
        let text = "12:pids:/kubepods/besteffort/pod1/c1
5:memory:/kubepods/besteffort/pod1/c1
3:cpu,cpuacct:/kubepods/besteffort/pod1/c1
1:name=systemd:/kubepods/besteffort/pod1/c1
0::/kubepods/besteffort/pod1/c1
";
        assert_eq!(
            v1_paths(text),
            vec![
                ("memory", "/kubepods/besteffort/pod1/c1".to_owned()),
                ("cpu", "/kubepods/besteffort/pod1/c1".to_owned()),
            ]
        );
        assert!(v1_paths("0::/user.slice\n").is_empty());
    }
}
