//! Passing descriptors over a Unix stream socket (`SCM_RIGHTS`), through rustix's safe
//! `sendmsg`/`recvmsg`: no unsafe code here.

use std::io::{self, IoSlice, IoSliceMut, Write};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

use rustix::io::Errno;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, recvmsg, sendmsg,
};

/// Most descriptors accepted in one read; more are a protocol error (the kernel closes the
/// excess ones it could not deliver).
const MAX_FDS: usize = 4;

/// Writes all of `bytes`, with `fds` attached to the first byte.
pub(crate) fn send_with_fds(
    stream: &UnixStream,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if fds.len() > MAX_FDS || !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other("too many descriptors for one message"));
    }
    let sent = loop {
        match sendmsg(
            stream,
            &[IoSlice::new(bytes)],
            &mut control,
            SendFlags::NOSIGNAL,
        ) {
            Err(Errno::INTR) => continue,
            result => break result?,
        }
    };
    let mut rest = stream;
    rest.write_all(&bytes[sent..])
}

/// One read into `buf`: the byte count (0 at end of stream), the descriptors that came with
/// it (close-on-exec), and whether the kernel dropped descriptors that did not fit.
pub(crate) fn recv_with_fds(
    stream: &UnixStream,
    buf: &mut [u8],
) -> io::Result<(usize, Vec<OwnedFd>, bool)> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let received = loop {
        match recvmsg(
            stream,
            &mut [IoSliceMut::new(buf)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        ) {
            Err(Errno::INTR) => continue,
            result => break result?,
        }
    };
    let mut fds = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = message {
            fds.extend(received);
        }
    }
    let truncated = received.flags.contains(ReturnFlags::CTRUNC);
    Ok((received.bytes, fds, truncated))
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixListener;

    use super::*;

    #[test]
    fn a_listening_socket_crosses_and_still_accepts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        send_with_fds(&a, b"hello", &[listener.as_fd()]).unwrap();
        drop(listener);
        let mut buf = [0; 16];
        let (n, mut fds, truncated) = recv_with_fds(&b, &mut buf).unwrap();
        assert_eq!((&buf[..n], fds.len(), truncated), (&b"hello"[..], 1, false));
        let received = UnixListener::from(fds.pop().unwrap());
        let _client = UnixStream::connect(&path).unwrap();
        received.accept().unwrap();
        // Plain data: no descriptors; end of stream: 0 bytes.
        (&a).write_all(b"x").unwrap();
        drop(a);
        let (n, fds, _) = recv_with_fds(&b, &mut buf).unwrap();
        assert_eq!((n, fds.len()), (1, 0));
        assert_eq!(recv_with_fds(&b, &mut buf).unwrap().0, 0);
    }
}
