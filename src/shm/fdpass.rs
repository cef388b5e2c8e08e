//! Passing file descriptors over a Unix-domain socket (`SCM_RIGHTS`, see `unix(7)`, `cmsg(3)`).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use super::ShmError;

/// The most fds one message may carry, in either direction.
pub const MAX_FDS: usize = 32;

const FD_SIZE: usize = std::mem::size_of::<RawFd>();
/// Control buffer in `u64` words: `CMSG_SPACE(MAX_FDS * 4)` is 16 + 128 bytes on 64-bit Linux;
/// 32 words leave ample room and give the 8-byte alignment `cmsghdr` needs.
const CMSG_WORDS: usize = 32;

fn cmsg_space(bytes: usize) -> usize {
    // SAFETY: CMSG_SPACE is pure arithmetic.
    unsafe { libc::CMSG_SPACE(bytes as libc::c_uint) as usize }
}

/// Sends `data` (at least one byte) with `fds` attached as one `SCM_RIGHTS` message.
///
/// `sock` is a connected Unix-domain socket; `SOCK_SEQPACKET` keeps message boundaries, with
/// `SOCK_STREAM` the receiver must frame `data` itself (the fds arrive with its first byte).
/// `MSG_NOSIGNAL` is set: a closed peer gives an error, not `SIGPIPE`.
///
/// # Errors
/// [`ShmError::TooManyFds`] beyond [`MAX_FDS`], [`ShmError::InvalidLength`] for empty `data`
/// (a zero-length stream write would silently drop the fds), [`ShmError::SendMsg`],
/// [`ShmError::ShortSend`]. See `sendmsg(2)`.
pub fn send_fds(sock: impl AsFd, data: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), ShmError> {
    if fds.len() > MAX_FDS {
        return Err(ShmError::TooManyFds {
            count: fds.len(),
            max: MAX_FDS,
        });
    }
    send_fds_unchecked(sock, data, fds)
}

/// [`send_fds`] without the [`MAX_FDS`] limit, so tests can play a peer that sends too many.
/// `fds` must fit the control buffer: at most `CMSG_WORDS * 8 - 16` bytes of fds.
fn send_fds_unchecked(
    sock: impl AsFd,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<(), ShmError> {
    if fds.len() * FD_SIZE > CMSG_WORDS * 8 - 16 {
        return Err(ShmError::TooManyFds {
            count: fds.len(),
            max: MAX_FDS,
        });
    }
    if data.is_empty() {
        return Err(ShmError::InvalidLength { len: 0 });
    }
    let mut cbuf = [0u64; CMSG_WORDS];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: `msghdr` is plain old data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let payload = fds.len() * FD_SIZE;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = cmsg_space(payload) as _;
        // SAFETY: `msg_control` points at `cbuf`, 8-byte aligned and large enough for
        // CMSG_SPACE(MAX_FDS * 4) (asserted by construction of CMSG_WORDS), so the first header
        // and its data lie inside `cbuf`. The fds are written unaligned-safely.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            debug_assert!(!cmsg.is_null());
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(payload as libc::c_uint) as _;
            let data_ptr = libc::CMSG_DATA(cmsg).cast::<RawFd>();
            for (i, fd) in fds.iter().enumerate() {
                data_ptr.add(i).write_unaligned(fd.as_raw_fd());
            }
        }
    }
    loop {
        // SAFETY: `msg` points at `iov` (over `data`) and `cbuf`, both alive for the call.
        let n = unsafe { libc::sendmsg(sock.as_fd().as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(ShmError::SendMsg {
                fds: fds.len(),
                source: e,
            });
        }
        let sent = n as usize;
        if sent != data.len() {
            return Err(ShmError::ShortSend {
                sent,
                len: data.len(),
            });
        }
        return Ok(());
    }
}

/// Receives one message into `buf` and exactly `expected_fds` descriptors.
///
/// Received fds are `CLOEXEC` (`MSG_CMSG_CLOEXEC`) and owned: on any error every fd that did
/// arrive is closed before returning, so a peer cannot leak descriptors into this process.
/// Returns the number of data bytes and the fds in the order they were sent.
///
/// # Errors
/// [`ShmError::InvalidLength`] for an empty `buf`, [`ShmError::TooManyFds`] if
/// `expected_fds > MAX_FDS`, [`ShmError::RecvMsg`] (including `WouldBlock` on a non-blocking
/// socket), [`ShmError::PeerClosed`] on end of stream, [`ShmError::ControlTruncated`] when the
/// peer attached more than [`MAX_FDS`] fds, [`ShmError::DataTruncated`] when a datagram did
/// not fit `buf`, [`ShmError::UnexpectedControl`], [`ShmError::FdCount`]. See `recvmsg(2)`.
pub fn recv_fds(
    sock: impl AsFd,
    buf: &mut [u8],
    expected_fds: usize,
) -> Result<(usize, Vec<OwnedFd>), ShmError> {
    if expected_fds > MAX_FDS {
        return Err(ShmError::TooManyFds {
            count: expected_fds,
            max: MAX_FDS,
        });
    }
    if buf.is_empty() {
        return Err(ShmError::InvalidLength { len: 0 });
    }
    let mut cbuf = [0u64; CMSG_WORDS];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: `msghdr` is plain old data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = cmsg_space(MAX_FDS * FD_SIZE) as _;
    let n = loop {
        // SAFETY: `msg` points at `iov` (over `buf`) and `cbuf`, both writable for the call;
        // the kernel writes at most `iov_len` and `msg_controllen` bytes into them.
        let n =
            unsafe { libc::recvmsg(sock.as_fd().as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(ShmError::RecvMsg(e));
        }
        break n as usize;
    };

    // Take ownership of every fd first, so that any error below closes them all.
    let mut fds = Vec::new();
    let mut unexpected = None;
    // SAFETY: the kernel filled `cbuf` and set `msg_controllen` to the bytes used, within the
    // buffer; CMSG_FIRSTHDR/NXTHDR walk headers only inside `msg_control..+msg_controllen`.
    // For SCM_RIGHTS the data holds `(cmsg_len - CMSG_LEN(0)) / 4` fds that the kernel just
    // installed in our table and that nothing else owns.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            let level = (*cmsg).cmsg_level;
            let kind = (*cmsg).cmsg_type;
            if level == libc::SOL_SOCKET && kind == libc::SCM_RIGHTS {
                let data_len =
                    ((*cmsg).cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize);
                let data_ptr = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for i in 0..data_len / FD_SIZE {
                    let raw = data_ptr.add(i).read_unaligned();
                    fds.push(OwnedFd::from_raw_fd(raw));
                }
            } else if unexpected.is_none() {
                unexpected = Some((level, kind));
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(ShmError::ControlTruncated { max: MAX_FDS });
    }
    if msg.msg_flags & libc::MSG_TRUNC != 0 {
        return Err(ShmError::DataTruncated { buf_len: buf.len() });
    }
    if let Some((level, kind)) = unexpected {
        return Err(ShmError::UnexpectedControl { level, kind });
    }
    if n == 0 && fds.is_empty() {
        return Err(ShmError::PeerClosed);
    }
    if fds.len() != expected_fds {
        return Err(ShmError::FdCount {
            expected: expected_fds,
            received: fds.len(),
        });
    }
    Ok((n, fds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::{UnixDatagram, UnixStream};

    fn memfd() -> OwnedFd {
        crate::shm::ShmRegion::create("fdpass-test", 4096)
            .unwrap()
            .fd()
            .try_clone_to_owned()
            .unwrap()
    }

    #[test]
    fn passes_fds_and_data_in_order() {
        let (a, b) = UnixStream::pair().unwrap();
        let r1 = crate::shm::ShmRegion::create("one", 4096).unwrap();
        let r2 = crate::shm::ShmRegion::create("two", 8192).unwrap();
        send_fds(&a, b"hello", &[r1.fd(), r2.fd()]).unwrap();
        let mut buf = [0u8; 16];
        let (n, fds) = recv_fds(&b, &mut buf, 2).unwrap();
        assert_eq!(&buf[..n], b"hello");
        assert_eq!(fds.len(), 2);
        // Order is preserved: the sizes tell the two regions apart.
        let m1 = crate::shm::ShmRegion::from_fd(fds[0].try_clone().unwrap(), 4096).unwrap();
        let m2 = crate::shm::ShmRegion::from_fd(fds[1].try_clone().unwrap(), 8192).unwrap();
        assert_eq!((m1.len(), m2.len()), (4096, 8192));
        for fd in &fds {
            // SAFETY (test): F_GETFD on an fd we own.
            let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
            assert_eq!(
                flags & libc::FD_CLOEXEC,
                libc::FD_CLOEXEC,
                "received fd lacks CLOEXEC"
            );
        }
    }

    #[test]
    fn wrong_fd_count_is_rejected() {
        let (a, b) = UnixStream::pair().unwrap();
        let fd = memfd();
        send_fds(&a, b"x", &[fd.as_fd()]).unwrap();
        let mut buf = [0u8; 4];
        match recv_fds(&b, &mut buf, 2) {
            Err(ShmError::FdCount {
                expected: 2,
                received: 1,
            }) => {}
            other => panic!("expected FdCount, got {other:?}"),
        }
        send_fds(&a, b"y", &[fd.as_fd(), fd.as_fd()]).unwrap();
        match recv_fds(&b, &mut buf, 1) {
            Err(ShmError::FdCount {
                expected: 1,
                received: 2,
            }) => {}
            other => panic!("expected FdCount, got {other:?}"),
        }
        send_fds(&a, b"z", &[]).unwrap();
        match recv_fds(&b, &mut buf, 1) {
            Err(ShmError::FdCount {
                expected: 1,
                received: 0,
            }) => {}
            other => panic!("expected FdCount, got {other:?}"),
        }
    }

    #[test]
    fn too_many_fds_truncates_and_is_rejected() {
        let fd = memfd();
        let many: Vec<BorrowedFd<'_>> = (0..MAX_FDS + 1).map(|_| fd.as_fd()).collect();
        assert!(matches!(
            send_fds(UnixStream::pair().unwrap().0, b"x", &many),
            Err(ShmError::TooManyFds { .. })
        ));
        let (a, b) = UnixStream::pair().unwrap();
        send_fds_unchecked(&a, b"x", &many).unwrap();
        let mut buf = [0u8; 4];
        match recv_fds(&b, &mut buf, 1) {
            Err(ShmError::ControlTruncated { max: MAX_FDS }) => {}
            other => panic!("expected ControlTruncated, got {other:?}"),
        }
        assert!(matches!(
            recv_fds(&b, &mut buf, MAX_FDS + 1),
            Err(ShmError::TooManyFds { .. })
        ));
    }

    #[test]
    fn truncated_datagram_is_rejected() {
        let (a, b) = UnixDatagram::pair().unwrap();
        let fd = memfd();
        send_fds(&a, &[7u8; 64], &[fd.as_fd()]).unwrap();
        let mut buf = [0u8; 8];
        match recv_fds(&b, &mut buf, 1) {
            Err(ShmError::DataTruncated { buf_len: 8 }) => {}
            other => panic!("expected DataTruncated, got {other:?}"),
        }
    }

    #[test]
    fn closed_peer_and_empty_inputs() {
        let (a, b) = UnixStream::pair().unwrap();
        assert!(matches!(
            send_fds(&a, b"", &[]),
            Err(ShmError::InvalidLength { len: 0 })
        ));
        assert!(matches!(
            recv_fds(&b, &mut [], 0),
            Err(ShmError::InvalidLength { len: 0 })
        ));
        drop(a);
        let mut buf = [0u8; 4];
        assert!(matches!(
            recv_fds(&b, &mut buf, 1),
            Err(ShmError::PeerClosed)
        ));
        assert!(matches!(
            send_fds(&b, b"x", &[]),
            Err(ShmError::SendMsg { fds: 0, .. })
        ));
    }
}
