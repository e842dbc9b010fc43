//! Who is calling: the peer's credentials from `SO_PEERCRED`, its cgroup, and which addresses
//! its network namespace owns.
//!
//! Address ownership is read from the caller's own view of the network: `/proc/PID/net` is the
//! network namespace of process PID, so `/proc/PID/net/fib_trie` lists that namespace's local
//! IPv4 addresses (entries marked `/32 host LOCAL`) and `/proc/PID/net/if_inet6` its IPv6
//! addresses. The namespace identity (`/proc/PID/ns/net`) is read before and after, so a
//! process that exits (and whose pid is reused) or switches namespace while we read is refused
//! rather than checked against the wrong namespace. Nothing here enters a namespace or needs
//! unsafe code; the agent needs `CAP_SYS_PTRACE`-level access to `/proc/PID/ns` (root has it).

use std::collections::BTreeSet;
use std::io;
use std::net::{IpAddr, Ipv6Addr};
use std::path::{Path, PathBuf};

/// The caller of a Unix-socket connection.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Peer {
    /// Its pid as seen from the agent's pid namespace (`None` if not visible there).
    pub pid: Option<i32>,
    /// Effective uid.
    pub uid: u32,
    /// Effective gid.
    pub gid: u32,
    /// Its cgroup (from `/proc/PID/cgroup`), which names the pod under Kubernetes.
    pub cgroup: Option<String>,
    /// The inode of its network namespace (`/proc/PID/ns/net`), which tells pods apart: every
    /// pod but a host-network one has its own.
    pub netns: Option<u64>,
    /// The pod UID named by its cgroup path (kubelet's `pod<uid>` component), if any.
    pub pod_uid: Option<String>,
}

impl Peer {
    /// Reads what `/proc` tells about the process `pid` with credentials `uid`/`gid`.
    pub fn from_proc(proc_root: &Path, pid: Option<i32>, uid: u32, gid: u32) -> Self {
        let pid = pid.filter(|pid| *pid > 0);
        let cgroup = pid.and_then(|pid| cgroup(proc_root, pid));
        Self {
            pid,
            uid,
            gid,
            pod_uid: cgroup.as_deref().and_then(pod_uid),
            netns: pid.and_then(|pid| netns_inode(proc_root, pid)),
            cgroup,
        }
    }

    /// Who this caller is for connection caps and quotas when it is not bound to a workload:
    /// its pod (by UID) when its cgroup names one, else its uid, network namespace and cgroup.
    pub fn scope(&self) -> String {
        match &self.pod_uid {
            Some(uid) => format!("pod {uid}"),
            None => format!(
                "uid {} netns {} cgroup {}",
                self.uid,
                self.netns
                    .map_or_else(|| "?".to_string(), |n| n.to_string()),
                self.cgroup.as_deref().unwrap_or("?")
            ),
        }
    }
}

/// Every process under `proc_root`: its pid and its directory.
pub fn processes(proc_root: &Path) -> impl Iterator<Item = (i32, PathBuf)> {
    std::fs::read_dir(proc_root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse::<i32>().ok()?;
            Some((pid, entry.path()))
        })
}

/// The inode of `pid`'s network namespace (`net:[INODE]` in `/proc/PID/ns/net`).
pub fn netns_inode(proc_root: &Path, pid: i32) -> Option<u64> {
    let link = std::fs::read_link(proc_root.join(pid.to_string()).join("ns/net")).ok()?;
    parse_netns_link(link.to_str()?)
}

/// The inode from a namespace link's text, `net:[4026531840]`.
pub fn parse_netns_link(link: &str) -> Option<u64> {
    link.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
}

/// The pod UID in a kubelet cgroup path. The cgroupfs driver writes
/// `/kubepods/burstable/pod1b2c…-…/CONTAINER`, the systemd driver
/// `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1b2c…_….slice/…` (dashes of
/// the UID turned into underscores); either gives the UID with dashes.
pub fn pod_uid(cgroup: &str) -> Option<String> {
    cgroup.split('/').find_map(|component| {
        let component = component.strip_suffix(".slice").unwrap_or(component);
        // The last `pod` in the component: `kubepods-besteffort-pod<uid>` or `pod<uid>`.
        let at = component.rfind("pod")?;
        if at > 0 && !component[..at].ends_with('-') {
            return None;
        }
        let uid = component[at + 3..].replace('_', "-");
        let hex: Vec<&str> = uid.split('-').collect();
        let lengths = [8, 4, 4, 4, 12];
        (hex.len() == lengths.len()
            && hex.iter().zip(lengths).all(|(part, len)| {
                part.len() == len && part.chars().all(|c| c.is_ascii_hexdigit())
            }))
        .then(|| uid.to_ascii_lowercase())
    })
}

/// The parent pid and start time (field 22) of `pid`, from `/proc/PID/stat`.
pub fn parent_and_start(proc_root: &Path, pid: i32) -> Option<(i32, u64)> {
    let stat = std::fs::read_to_string(proc_root.join(pid.to_string()).join("stat")).ok()?;
    parse_parent_and_start(&stat)
}

/// Fields 4 (ppid) and 22 (starttime) of a `/proc/PID/stat` line, counted after the command
/// name's last `)`.
pub fn parse_parent_and_start(stat: &str) -> Option<(i32, u64)> {
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some((fields.get(1)?.parse().ok()?, fields.get(19)?.parse().ok()?))
}

/// Whether `ip` names one pod or host on the network: not loopback, link-local, multicast or
/// unspecified (every network namespace has those, so they identify nothing).
pub fn is_routable(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            !(v4.is_loopback()
                || v4.is_link_local()
                || v4.is_multicast()
                || v4.is_unspecified()
                || v4.is_broadcast())
        }
        IpAddr::V6(v6) => {
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || v6.is_unicast_link_local())
        }
    }
}

/// The cgroup v2 path of `pid` (`0::/path`), or the first line for cgroup v1.
pub fn cgroup(proc_root: &Path, pid: i32) -> Option<String> {
    let text = std::fs::read_to_string(proc_root.join(pid.to_string()).join("cgroup")).ok()?;
    parse_cgroup(&text)
}

/// The cgroup path from the contents of `/proc/PID/cgroup`.
pub fn parse_cgroup(text: &str) -> Option<String> {
    let line = text
        .lines()
        .find(|l| l.starts_with("0::"))
        .or_else(|| text.lines().next())?;
    Some(
        line.rsplit_once(':')
            .map_or(line, |(_, path)| path)
            .to_string(),
    )
}

/// Local IPv4 addresses from `/proc/PID/net/fib_trie`: each leaf line `|-- A.B.C.D` followed
/// by a `/32 host LOCAL` line.
pub fn parse_fib_trie(text: &str) -> BTreeSet<IpAddr> {
    let mut addresses = BTreeSet::new();
    let mut leaf: Option<IpAddr> = None;
    for line in text.lines() {
        let line = line.trim_start_matches([' ', '|', '+', '-']).trim();
        if let Ok(ip) = line.parse::<std::net::Ipv4Addr>() {
            leaf = Some(IpAddr::V4(ip));
        } else if line.starts_with("/32 host LOCAL")
            && let Some(ip) = leaf
        {
            addresses.insert(ip);
        }
    }
    addresses
}

/// IPv6 addresses from `/proc/PID/net/if_inet6`: the first field of each line, 32 hex digits.
pub fn parse_if_inet6(text: &str) -> BTreeSet<IpAddr> {
    text.lines()
        .filter_map(|line| {
            let hex = line.split_whitespace().next()?;
            (hex.len() == 32).then_some(())?;
            u128::from_str_radix(hex, 16)
                .ok()
                .map(|v| IpAddr::V6(Ipv6Addr::from(v)))
        })
        .collect()
}

/// Why an address check failed.
#[derive(Debug)]
pub enum OwnershipError {
    /// The caller's pid is not visible from the agent's pid namespace.
    NoPid,
    /// The caller exited or changed namespace while being checked.
    Raced,
    /// Reading `/proc` failed.
    Io(io::Error),
}

impl std::fmt::Display for OwnershipError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NoPid => f.write_str("the caller's pid is not visible to the agent"),
            Self::Raced => f.write_str("the caller exited or changed network namespace"),
            Self::Io(error) => write!(f, "cannot read the caller's network namespace: {error}"),
        }
    }
}

/// Reads addresses from `/proc` (a parameter so tests can point it elsewhere).
#[derive(Clone, Debug)]
pub struct ProcNet {
    root: PathBuf,
}

impl Default for ProcNet {
    fn default() -> Self {
        Self {
            root: PathBuf::from("/proc"),
        }
    }
}

impl ProcNet {
    /// Reads from `root` instead of `/proc`.
    pub fn with_root(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The `/proc` root in use.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Every address assigned to an interface in `pid`'s network namespace.
    pub fn addresses(&self, pid: i32) -> Result<BTreeSet<IpAddr>, OwnershipError> {
        self.namespace_addresses(pid)
            .map(|(_, addresses)| addresses)
    }

    /// The inode of `pid`'s network namespace (0 if its link does not parse) and every address
    /// assigned to an interface in it.
    pub fn namespace_addresses(&self, pid: i32) -> Result<(u64, BTreeSet<IpAddr>), OwnershipError> {
        let dir = self.root.join(pid.to_string());
        let namespace = || std::fs::read_link(dir.join("ns/net")).map_err(OwnershipError::Io);
        let before = namespace()?;
        let fib = std::fs::read_to_string(dir.join("net/fib_trie")).map_err(OwnershipError::Io)?;
        // A kernel without IPv6 has no if_inet6.
        let inet6 = std::fs::read_to_string(dir.join("net/if_inet6")).unwrap_or_default();
        if namespace()? != before {
            return Err(OwnershipError::Raced);
        }
        let mut addresses = parse_fib_trie(&fib);
        addresses.extend(parse_if_inet6(&inet6));
        let inode = before.to_str().and_then(parse_netns_link).unwrap_or(0);
        Ok((inode, addresses))
    }

    /// Whether `ip` may be used by `peer`: the unspecified address always (a wildcard bind
    /// covers only the caller's own namespace), any other only if assigned to an interface in
    /// the caller's network namespace.
    pub fn owns(&self, peer: &Peer, ip: IpAddr) -> Result<bool, OwnershipError> {
        let ip = ip.to_canonical();
        if ip.is_unspecified() {
            return Ok(true);
        }
        let pid = peer
            .pid
            .filter(|pid| *pid > 0)
            .ok_or(OwnershipError::NoPid)?;
        Ok(self.addresses(pid)?.contains(&ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIB_TRIE: &str = "Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 10.0.2.0/24 2 0 2
        +-- 10.0.2.0/30 2 0 2
           |-- 10.0.2.0
              /24 link UNICAST
           |-- 10.0.2.15
              /32 host LOCAL
        |-- 10.0.2.255
           /32 link BROADCAST
     +-- 127.0.0.0/8 2 0 2
        |-- 127.0.0.1
           /32 host LOCAL
Local:
  +-- 0.0.0.0/0 3 0 5
     |-- 10.0.2.15
        /32 host LOCAL
";

    #[test]
    fn fib_trie_yields_local_addresses_only() {
        let addresses = parse_fib_trie(FIB_TRIE);
        let expected: BTreeSet<IpAddr> = ["10.0.2.15", "127.0.0.1"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(addresses, expected);
    }

    #[test]
    fn if_inet6_yields_addresses() {
        let text = "00000000000000000000000000000001 01 80 10 80       lo\n\
                    fe800000000000005054fffe123456ab 02 40 20 80     eth0\nshort 1 2\n";
        let addresses = parse_if_inet6(text);
        assert!(addresses.contains(&"::1".parse::<IpAddr>().unwrap()));
        assert!(addresses.contains(&"fe80::5054:fffe:1234:56ab".parse::<IpAddr>().unwrap()));
        assert_eq!(addresses.len(), 2);
    }

    #[test]
    fn cgroup_paths_parse() {
        assert_eq!(
            parse_cgroup("0::/user.slice/session-1.scope\n").unwrap(),
            "/user.slice/session-1.scope"
        );
        assert_eq!(
            parse_cgroup("12:pids:/kubepods/pod1\n1:name=systemd:/x\n").unwrap(),
            "/kubepods/pod1"
        );
        assert_eq!(parse_cgroup(""), None);
    }

    #[test]
    fn pod_uids_come_from_either_cgroup_driver() {
        let uid = "1b2c3d4e-5f60-4a7b-8c9d-0e1f2a3b4c5d";
        // cgroupfs driver, cgroup v1 and v2.
        assert_eq!(
            pod_uid(&format!("/kubepods/burstable/pod{uid}/0123abcd")).as_deref(),
            Some(uid)
        );
        assert_eq!(
            pod_uid(&format!("/kubepods/pod{uid}/c1")).as_deref(),
            Some(uid)
        );
        // systemd driver: dashes become underscores.
        let systemd = format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-0123.scope",
            uid.replace('-', "_")
        );
        assert_eq!(pod_uid(&systemd).as_deref(), Some(uid));
        let guaranteed = format!(
            "/kubepods.slice/kubepods-pod{}.slice/x.scope",
            uid.replace('-', "_").to_uppercase()
        );
        assert_eq!(pod_uid(&guaranteed).as_deref(), Some(uid));
        for not_a_pod in [
            "/user.slice/user-0.slice/session-1.scope",
            "/kubepods/burstable/podnot-a-uid/c",
            "/system.slice/ipod-1b2c3d4e-5f60-4a7b-8c9d-0e1f2a3b4c5d.service",
            "/",
        ] {
            assert_eq!(pod_uid(not_a_pod), None, "{not_a_pod}");
        }
    }

    #[test]
    fn proc_stat_and_namespace_links_parse() {
        let stat = "1234 (we ird) (name) S 77 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_parent_and_start(stat), Some((77, 987654)));
        assert_eq!(parse_parent_and_start("garbage"), None);
        assert_eq!(parse_netns_link("net:[4026531840]"), Some(4026531840));
        assert_eq!(parse_netns_link("mnt:[1]"), None);
        let me = std::process::id() as i32;
        let (parent, start) = parent_and_start(Path::new("/proc"), me).unwrap();
        assert_eq!(parent as u32, std::os::unix::process::parent_id());
        assert!(start > 0);
        let peer = Peer::from_proc(Path::new("/proc"), Some(me), 0, 0);
        assert!(peer.netns.is_some() && peer.cgroup.is_some());
        assert!(peer.scope().starts_with("uid 0 netns "), "{}", peer.scope());
        assert!(is_routable("192.0.2.1".parse().unwrap()));
        assert!(is_routable("2001:db8::1".parse().unwrap()));
        for local in [
            "127.0.0.1",
            "::1",
            "fe80::1",
            "169.254.0.1",
            "0.0.0.0",
            "::",
            "ff02::1",
        ] {
            assert!(!is_routable(local.parse().unwrap()), "{local}");
        }
    }

    #[test]
    fn ownership_is_checked_in_the_callers_namespace() {
        let me = Peer {
            pid: Some(std::process::id() as i32),
            ..Default::default()
        };
        let proc_net = ProcNet::default();
        assert!(proc_net.owns(&me, "127.0.0.1".parse().unwrap()).unwrap());
        assert!(proc_net.owns(&me, "0.0.0.0".parse().unwrap()).unwrap());
        assert!(proc_net.owns(&me, "::".parse().unwrap()).unwrap());
        // TEST-NET-3 is assigned to no interface here.
        assert!(!proc_net.owns(&me, "203.0.113.77".parse().unwrap()).unwrap());
        let ghost = Peer {
            pid: None,
            ..me.clone()
        };
        assert!(matches!(
            proc_net.owns(&ghost, "127.0.0.1".parse().unwrap()),
            Err(OwnershipError::NoPid)
        ));
        let gone = Peer {
            pid: Some(i32::MAX),
            ..me
        };
        assert!(matches!(
            proc_net.owns(&gone, "127.0.0.1".parse().unwrap()),
            Err(OwnershipError::Io(_))
        ));
    }

    #[test]
    fn ownership_reads_a_fake_proc_tree() {
        let root = tempfile::tempdir().unwrap();
        let pid = root.path().join("42");
        std::fs::create_dir_all(pid.join("net")).unwrap();
        std::fs::create_dir_all(pid.join("ns")).unwrap();
        std::os::unix::fs::symlink("net:[4026531840]", pid.join("ns/net")).unwrap();
        std::fs::write(pid.join("net/fib_trie"), FIB_TRIE).unwrap();
        std::fs::write(
            pid.join("net/if_inet6"),
            "fd000000000000000000000000000007 02 40 00 80 eth0\n",
        )
        .unwrap();
        let proc_net = ProcNet::with_root(root.path());
        let peer = Peer {
            pid: Some(42),
            uid: 1000,
            gid: 1000,
            ..Default::default()
        };
        assert!(proc_net.owns(&peer, "10.0.2.15".parse().unwrap()).unwrap());
        assert!(
            proc_net
                .owns(&peer, "::ffff:10.0.2.15".parse().unwrap())
                .unwrap()
        );
        assert!(proc_net.owns(&peer, "fd00::7".parse().unwrap()).unwrap());
        assert!(!proc_net.owns(&peer, "10.0.2.255".parse().unwrap()).unwrap());
        assert!(!proc_net.owns(&peer, "10.0.2.16".parse().unwrap()).unwrap());
    }
}
