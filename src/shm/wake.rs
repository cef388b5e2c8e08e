//! The consumer's pollable wake-up across processes: one end of an `AF_UNIX` datagram socket
//! pair. The consumer keeps one end (it polls and drains it); the producer's process gets the
//! other (`SCM_RIGHTS` at connection setup) and sends a byte when the consumer has armed.
//!
//! Why not an eventfd: an fd passed with `SCM_RIGHTS` shares its open file description, and
//! with it the `O_NONBLOCK` flag. A peer holding our eventfd could make it blocking, and our next
//! drain (a `read` on a counter of 0) would then hang; the peer's eventfd, made blocking with
//! its counter at the maximum, would hang our next signal. Sockets take the non-blocking choice
//! per call (`MSG_DONTWAIT`), whatever the file's flags, and the peer holds only the end we
//! send to, never the end we read.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use super::ShmError;
use super::liveness::socket_peer_pid;

/// Datagrams one [`WakeSocket::drain`] takes at most: a peer sending as fast as we read cannot
/// hold the call; what is left keeps the socket readable, which only means an early wake-up.
const DRAIN_MAX: usize = 64;

/// One end of a wake-up socket pair (see the module documentation).
#[derive(Debug)]
pub struct WakeSocket {
    fd: OwnedFd,
}

impl WakeSocket {
    /// A new pair: the end this process keeps (to poll and [`drain`](Self::drain)), and the end
    /// to pass to the producer's process (which adopts it with [`WakeSocket::from_peer`]).
    ///
    /// # Errors
    /// [`ShmError::Wake`] (`"create"`) if `socketpair(2)` fails.
    pub fn pair() -> Result<(WakeSocket, OwnedFd), ShmError> {
        let mut fds = [-1i32; 2];
        // SAFETY: socketpair writes two fds into `fds`, a writable array of two ints alive for
        // the call; no other pointer is passed.
        let rc = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                0,
                fds.as_mut_ptr(),
            )
        };
        if rc != 0 {
            return Err(ShmError::Wake {
                op: "create",
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: both fds were just returned by socketpair and are owned by nothing else.
        let (ours, theirs) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok((WakeSocket { fd: ours }, theirs))
    }

    /// Adopts the end a peer process passed, refusing anything but a connected `AF_UNIX`
    /// datagram socket whose pair the process `peer_pid` created (`SO_PEERCRED` of a socket
    /// pair names its creator): so every byte [`signal`](Self::signal) sends goes to that
    /// process's own socket, never to a socket of some other program the peer got hold of.
    ///
    /// # Errors
    /// [`ShmError::Wake`] (`"check"`) naming what is wrong.
    pub fn from_peer(fd: OwnedFd, peer_pid: i32) -> Result<WakeSocket, ShmError> {
        let bad = |why: String| ShmError::Wake {
            op: "check",
            source: io::Error::new(io::ErrorKind::InvalidInput, why),
        };
        let domain = sockopt_int(fd.as_fd(), libc::SO_DOMAIN)
            .map_err(|e| bad(format!("the fd is not a socket ({e})")))?;
        if domain != libc::AF_UNIX {
            return Err(bad(format!("socket domain {domain}, expected AF_UNIX")));
        }
        let ty = sockopt_int(fd.as_fd(), libc::SO_TYPE)
            .map_err(|e| bad(format!("cannot read the socket type ({e})")))?;
        if ty != libc::SOCK_DGRAM {
            return Err(bad(format!("socket type {ty}, expected a datagram socket")));
        }
        let creator = socket_peer_pid(fd.as_fd())
            .map_err(|e| bad(format!("cannot read the socket's peer ({e})")))?;
        if creator != peer_pid {
            return Err(bad(format!(
                "the socket's other end belongs to pid {creator}, not to the peer (pid {peer_pid})"
            )));
        }
        Ok(WakeSocket { fd })
    }

    /// The fd, for `poll`/`epoll`: readable once signaled.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Makes the other end readable: sends one byte, never waiting. A full queue means a wake-up
    /// is pending already; a closed other end means the consumer is gone, which the connection's
    /// liveness check reports. Neither is an error here.
    ///
    /// # Errors
    /// [`ShmError::Wake`] (`"signal"`) for any other failure of `send(2)`.
    pub fn signal(&self) -> Result<(), ShmError> {
        let one = [1u8];
        loop {
            // SAFETY: sends the one byte of `one`, alive for the call, on an fd we own.
            let rc = unsafe {
                libc::send(
                    self.fd.as_raw_fd(),
                    one.as_ptr().cast(),
                    one.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            if rc >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => {}
                Some(libc::EAGAIN | libc::ECONNREFUSED | libc::EPIPE | libc::ECONNRESET) => {
                    return Ok(());
                }
                _ => {
                    return Err(ShmError::Wake {
                        op: "signal",
                        source: e,
                    });
                }
            }
        }
    }

    /// Takes what was signaled, never waiting; returns whether anything was. Takes at most
    /// 64 datagrams, so a peer that keeps sending cannot hold the call.
    ///
    /// # Errors
    /// [`ShmError::Wake`] (`"drain"`) for a failure of `recv(2)` other than "nothing queued".
    pub fn drain(&self) -> Result<bool, ShmError> {
        let mut got = false;
        let mut buf = [0u8; 8];
        let mut taken = 0;
        while taken < DRAIN_MAX {
            // SAFETY: receives at most `buf.len()` bytes into `buf`, alive for the call, from an
            // fd we own; a longer datagram is truncated by the kernel, never overrun.
            let rc = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if rc >= 0 {
                got = true;
                taken += 1;
                continue;
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => {}
                Some(libc::EAGAIN) => break,
                _ => {
                    return Err(ShmError::Wake {
                        op: "drain",
                        source: e,
                    });
                }
            }
        }
        Ok(got)
    }
}

/// An integer socket option at `SOL_SOCKET`.
fn sockopt_int(fd: BorrowedFd<'_>, opt: libc::c_int) -> io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `v` is a writable int and `len` its size, both alive for the call.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> i32 {
        std::process::id() as i32
    }

    fn set_blocking(fd: BorrowedFd<'_>) {
        // SAFETY: F_GETFL/F_SETFL on a valid fd; no pointers.
        unsafe {
            let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
            assert!(flags >= 0);
            assert_eq!(
                libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK),
                0
            );
        }
    }

    #[test]
    fn a_signal_makes_the_kept_end_readable_until_drained() {
        let (ours, theirs) = WakeSocket::pair().unwrap();
        let producer = WakeSocket::from_peer(theirs, me()).unwrap();
        assert!(!ours.drain().unwrap(), "nothing signaled yet");
        producer.signal().unwrap();
        producer.signal().unwrap();
        assert!(ours.drain().unwrap());
        assert!(
            !ours.drain().unwrap(),
            "one drain takes every pending signal"
        );
    }

    #[test]
    fn neither_end_blocks_when_its_file_is_made_blocking() {
        let (ours, theirs) = WakeSocket::pair().unwrap();
        let producer = WakeSocket::from_peer(theirs, me()).unwrap();
        // What a hostile holder of either end could do: clear O_NONBLOCK on the shared file.
        set_blocking(ours.fd());
        set_blocking(producer.fd());
        // Nothing queued: a read on a blocking file would wait forever.
        assert!(!ours.drain().unwrap());
        // A full queue: a send on a blocking file would wait forever.
        for _ in 0..100_000 {
            producer.signal().unwrap();
        }
        // Drained in bounded slices; each slice reports that something came.
        while ours.drain().unwrap() {}
    }

    #[test]
    fn a_signal_to_a_closed_end_is_not_an_error() {
        let (ours, theirs) = WakeSocket::pair().unwrap();
        let producer = WakeSocket::from_peer(theirs, me()).unwrap();
        drop(ours);
        producer.signal().unwrap();
    }

    #[test]
    fn only_a_datagram_socket_pair_made_by_the_peer_is_adopted() {
        let reason = |r: Result<WakeSocket, ShmError>| match r {
            Err(ShmError::Wake {
                op: "check",
                source,
            }) => source.to_string(),
            other => panic!("expected a refusal, got {other:?}"),
        };
        // Not a socket.
        let file: OwnedFd = std::fs::File::open("/proc/self/stat").unwrap().into();
        assert!(reason(WakeSocket::from_peer(file, me())).contains("not a socket"));
        // A stream socket pair.
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(reason(WakeSocket::from_peer(a.into(), me())).contains("datagram"));
        // Not connected: no peer credentials to match.
        let lone = std::os::unix::net::UnixDatagram::unbound().unwrap();
        assert!(reason(WakeSocket::from_peer(lone.into(), me())).contains("peer"));
        // A pair created by another process than the one named.
        let (_ours, theirs) = WakeSocket::pair().unwrap();
        assert!(reason(WakeSocket::from_peer(theirs, me() + 1)).contains("not to the peer"));
    }
}
