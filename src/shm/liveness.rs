//! Detecting a dead peer: by its end of the Unix-domain socket, or by a pidfd.
//!
//! Shared memory gives no failure signal: a peer that dies simply stops writing. The transport
//! keeps the Unix socket it used to pass the memfds open for the connection's lifetime; when
//! the peer process exits, the kernel closes its end and the socket reports `POLLHUP` /
//! `POLLRDHUP`. Both checks are non-blocking and their fds can also sit in an epoll set.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use super::ShmError;

/// Whether a peer is still there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerStatus {
    /// No sign of the peer going away.
    Alive,
    /// The peer closed or shut down its end of the socket, or its process exited.
    Gone,
}

fn poll_now(fd: BorrowedFd<'_>, events: libc::c_short) -> Result<libc::c_short, ShmError> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    };
    loop {
        // SAFETY: `pfd` is one valid pollfd for the call; timeout 0 never blocks.
        let rc = unsafe { libc::poll(&mut pfd, 1, 0) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(ShmError::Poll(e));
        }
        return Ok(if rc == 0 { 0 } else { pfd.revents });
    }
}

/// Polls (without blocking) a connected Unix-domain socket for its peer's departure:
/// `POLLHUP`, `POLLRDHUP` (the peer closed or shut down writing) or `POLLERR` mean
/// [`PeerStatus::Gone`]. Unread data on the socket does not count as a sign of life or death.
///
/// # Errors
/// [`ShmError::Poll`]. See `poll(2)`.
pub fn socket_peer_status(sock: impl AsFd) -> Result<PeerStatus, ShmError> {
    let revents = poll_now(sock.as_fd(), libc::POLLRDHUP)?;
    if revents & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
        Ok(PeerStatus::Gone)
    } else {
        Ok(PeerStatus::Alive)
    }
}

/// The process id of the peer of a connected Unix-domain socket (`SO_PEERCRED`), as it was
/// when the connection was made.
///
/// # Errors
/// [`ShmError::PeerCred`]. See `unix(7)`.
pub fn socket_peer_pid(sock: impl AsFd) -> Result<i32, ShmError> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` is a writable `ucred` and `len` its size, both alive for the call.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(ShmError::PeerCred(io::Error::last_os_error()));
    }
    Ok(cred.pid)
}

/// Watches a process through a pidfd (`pidfd_open(2)`, Linux 5.3+): the fd becomes readable
/// when the process exits, whatever happened to its sockets. Opening by pid after learning it
/// (e.g. from [`socket_peer_pid`]) is racy only if the peer already died and its pid was reused
/// in between; the socket check has no such window, so use both.
#[derive(Debug)]
pub struct PidWatch {
    fd: OwnedFd,
    pid: i32,
}

impl PidWatch {
    /// Opens a pidfd for `pid` (close-on-exec, as every pidfd).
    ///
    /// # Errors
    /// [`ShmError::PidfdOpen`] (`ESRCH` if the process is already gone).
    pub fn open(pid: i32) -> Result<Self, ShmError> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let rc = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0u32) };
        if rc < 0 {
            return Err(ShmError::PidfdOpen {
                pid,
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: `rc` is a freshly created fd (pidfds are always CLOEXEC) owned by no one else.
        let fd = unsafe { OwnedFd::from_raw_fd(rc as i32) };
        Ok(Self { fd, pid })
    }

    /// The watched pid.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The pidfd, e.g. to add to an epoll set (readable once the process exited).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Polls (without blocking) whether the process exited.
    ///
    /// # Errors
    /// [`ShmError::Poll`].
    pub fn status(&self) -> Result<PeerStatus, ShmError> {
        let revents = poll_now(self.fd.as_fd(), libc::POLLIN)?;
        Ok(if revents != 0 {
            PeerStatus::Gone
        } else {
            PeerStatus::Alive
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    use std::process::{Command, Stdio};

    #[test]
    fn socket_reports_a_closed_peer() {
        let (a, b) = UnixStream::pair().unwrap();
        assert_eq!(socket_peer_status(&a).unwrap(), PeerStatus::Alive);
        (&b).write_all(b"pending data is not death").unwrap();
        assert_eq!(socket_peer_status(&a).unwrap(), PeerStatus::Alive);
        assert_eq!(socket_peer_pid(&a).unwrap(), std::process::id() as i32);
        drop(b);
        assert_eq!(socket_peer_status(&a).unwrap(), PeerStatus::Gone);
    }

    #[test]
    fn pidfd_reports_an_exited_process() {
        let mut child = Command::new("cat")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let watch = PidWatch::open(child.id() as i32).unwrap();
        assert_eq!(watch.pid(), child.id() as i32);
        assert_eq!(watch.status().unwrap(), PeerStatus::Alive);
        drop(child.stdin.take());
        child.wait().unwrap();
        assert_eq!(watch.status().unwrap(), PeerStatus::Gone);
        assert!(matches!(
            PidWatch::open(-5),
            Err(ShmError::PidfdOpen { pid: -5, .. })
        ));
    }
}
