//! What a child process does between `fork` and `exec` (`CommandExt::pre_exec`): enter the
//! caller's network namespace, create the packet socket there, join the caller's cgroup, leave
//! the agent's session and drop to the caller's credentials. The agent itself never changes
//! namespace or credentials (it is a multi-threaded tokio process); only the forked child does,
//! and, for the network namespace alone, the short-lived thread that prepares AF_XDP
//! (`start::prepare_xdp`; a thread may enter another network namespace by itself).
//!
//! Between `fork` and `exec` only async-signal-safe calls are allowed: raw system calls on
//! descriptors opened beforehand, no allocation, no locks. A failing step writes its name to
//! the ready pipe (the parent reads it to say which step failed) and returns the errno.

use std::io;
use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// The instance's packet socket: descriptor 3 of the instance.
pub(super) const PACKET_FD: RawFd = 3;
/// The write end of the ready pipe: descriptor 4 of the instance.
pub(super) const READY_FD: RawFd = 4;
/// The AF_XDP handover (`stackroute_pktio::XdpHandover`: socket, UMEM, socket map, config
/// map, link): descriptors 5 to 9 of the instance.
pub(super) const XDP_FDS: [RawFd; 5] = [5, 6, 7, 8, 9];
/// Duplicates are made at or above this number first, so that placing one on 3 or 4 never
/// overwrites the other (or a descriptor still needed).
const SCRATCH_FD_BASE: RawFd = 10;
/// prctl's variadic arguments are `unsigned long`s.
const ULONG_0: libc::c_ulong = 0;
const ULONG_1: libc::c_ulong = 1;

/// What the instance's child process sets up before `exec`. Every descriptor must stay open
/// in the parent until the child has been spawned.
#[derive(Clone, Copy, Debug)]
pub(super) struct InstanceSetup {
    /// `/proc/PID/ns/net` of the caller.
    pub(super) netns: RawFd,
    /// The write end of the ready pipe.
    pub(super) ready: RawFd,
    /// A packet socket created beforehand in the caller's namespace (the neighbour socket
    /// that goes with an AF_XDP handover); without it the child creates one.
    pub(super) packet: Option<RawFd>,
    /// The AF_XDP handover, placed on [`XDP_FDS`].
    pub(super) xdp: Option<[RawFd; 5]>,
    /// `cgroup.procs` of the caller's cgroups (v2, and v1 memory and cpu on a hybrid host),
    /// opened for writing.
    pub(super) cgroup_procs: [Option<RawFd>; 3],
    /// Whether failing to join the cgroup fails the start (Kubernetes: the pod pays).
    pub(super) cgroup_required: bool,
    /// The caller's uid and gid, which the instance runs as.
    pub(super) uid: u32,
    /// See `uid`.
    pub(super) gid: u32,
}

/// Makes `command`'s child enter the network namespace `netns` before `exec` (for `iptables`,
/// `cat` and `tee` run in the caller's namespace).
pub(super) fn enter_netns_before_exec(command: &mut Command, netns: RawFd) {
    let enter = move || {
        // SAFETY: setns on a descriptor the parent keeps open until the child is spawned; a
        // plain system call, async-signal-safe.
        if unsafe { libc::setns(netns, libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: the closure makes one async-signal-safe system call and allocates nothing.
    unsafe {
        command.pre_exec(enter);
    }
}

/// Makes `command`'s child the instance: see the module documentation.
pub(super) fn instance_before_exec(command: &mut Command, setup: InstanceSetup) {
    let prepare = move || prepare_instance(&setup);
    // SAFETY: `prepare_instance` makes only async-signal-safe system calls on descriptors the
    // parent keeps open until the child is spawned, and allocates nothing.
    unsafe {
        command.pre_exec(prepare);
    }
}

/// Tells the parent which step failed (best effort) and returns the errno the step left.
fn failed(ready: RawFd, step: &'static str) -> io::Result<()> {
    let error = io::Error::last_os_error();
    // SAFETY: write of a static buffer to a descriptor of this process; async-signal-safe.
    unsafe {
        libc::write(ready, step.as_ptr().cast(), step.len());
    }
    Err(error)
}

fn prepare_instance(setup: &InstanceSetup) -> io::Result<()> {
    let ready = setup.ready;
    // SAFETY: setns on a descriptor the parent keeps open; async-signal-safe.
    if unsafe { libc::setns(setup.netns, libc::CLONE_NEWNET) } != 0 {
        return failed(ready, "setns into the caller's network namespace");
    }
    let packet = match setup.packet {
        Some(packet) => packet,
        None => {
            // Created after setns, so it belongs to the caller's namespace. ETH_P_ALL in
            // network byte order.
            let protocol = i32::from((libc::ETH_P_ALL as u16).to_be());
            // SAFETY: socket(2), async-signal-safe.
            let packet = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, protocol) };
            if packet < 0 {
                return failed(
                    ready,
                    "socket(AF_PACKET, SOCK_RAW) in the caller's namespace",
                );
            }
            packet
        }
    };
    for procs in setup.cgroup_procs.into_iter().flatten() {
        // "0" moves the writing process (`cgroup.procs`, v1 and v2).
        // SAFETY: write of a static buffer to a descriptor the parent keeps open.
        let written = unsafe { libc::write(procs, b"0".as_ptr().cast(), 1) };
        if written != 1 && setup.cgroup_required {
            return failed(ready, "joining the caller's cgroups");
        }
    }
    // Every descriptor is first copied at or above SCRATCH_FD_BASE (CLOEXEC), then placed on
    // its number with dup2, which clears CLOEXEC on the target: the placed ones survive exec,
    // the scratch copies do not, and no placement overwrites a source still needed.
    let mut sources = [-1; 7];
    let mut targets = [-1; 7];
    let mut count = 0;
    for (source, target) in [(packet, PACKET_FD), (ready, READY_FD)] {
        sources[count] = source;
        targets[count] = target;
        count += 1;
    }
    if let Some(xdp) = setup.xdp {
        for (source, target) in xdp.into_iter().zip(XDP_FDS) {
            sources[count] = source;
            targets[count] = target;
            count += 1;
        }
    }
    let mut copies = [-1; 7];
    for index in 0..count {
        // SAFETY: fcntl(F_DUPFD_CLOEXEC) on a descriptor of this process; async-signal-safe.
        copies[index] =
            unsafe { libc::fcntl(sources[index], libc::F_DUPFD_CLOEXEC, SCRATCH_FD_BASE) };
        if copies[index] < 0 {
            return failed(ready, "duplicating descriptors");
        }
    }
    let ready_copy = copies[1];
    for index in 0..count {
        // SAFETY: dup2 of descriptors of this process; async-signal-safe.
        if unsafe { libc::dup2(copies[index], targets[index]) } < 0 {
            return failed(ready_copy, "placing the instance's descriptors");
        }
    }
    if setup.packet.is_none() && !targets[..count].contains(&packet) {
        // SAFETY: close of the socket created above (not CLOEXEC); its copy is on
        // descriptor 3.
        unsafe {
            libc::close(packet);
        }
    }
    // SAFETY: setsid(2): the instance leaves the agent's session and process group, so signals
    // meant for the agent (a terminal's, a process group kill) do not reach it.
    if unsafe { libc::setsid() } < 0 {
        return failed(READY_FD, "setsid");
    }
    // No new privileges through exec (set-uid files, file capabilities), and an empty
    // capability bounding set: even a uid-0 caller's instance execs with no capability.
    // SAFETY: prctl(2) with integer arguments; async-signal-safe.
    if unsafe {
        libc::prctl(
            libc::PR_SET_NO_NEW_PRIVS,
            ULONG_1,
            ULONG_0,
            ULONG_0,
            ULONG_0,
        )
    } != 0
    {
        return failed(READY_FD, "prctl(PR_SET_NO_NEW_PRIVS)");
    }
    for capability in 0..64 as libc::c_ulong {
        // EINVAL past the kernel's last capability: ignored.
        // SAFETY: prctl(2) with integer arguments; async-signal-safe.
        unsafe {
            libc::prctl(libc::PR_CAPBSET_DROP, capability, ULONG_0, ULONG_0, ULONG_0);
        }
    }
    // Groups, then gid, then uid: once the uid is not 0 the others cannot be changed.
    // SAFETY: setgroups/setgid/setuid with plain values; async-signal-safe system calls in
    // the single-threaded child.
    if unsafe { libc::setgroups(0, std::ptr::null()) } != 0 {
        return failed(READY_FD, "setgroups([])");
    }
    // SAFETY: as above.
    if unsafe { libc::setgid(setup.gid) } != 0 {
        return failed(READY_FD, "setgid to the caller's gid");
    }
    // SAFETY: as above. Leaving uid 0 clears the permitted and effective capabilities.
    if unsafe { libc::setuid(setup.uid) } != 0 {
        return failed(READY_FD, "setuid to the caller's uid");
    }
    Ok(())
}
