//! Waiting on several file descriptors at once (`poll(2)`): an [`Endpoint`](crate::endpoint::Endpoint)
//! in event mode sleeps on the event descriptors of all its connections and its listener.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

use super::ShmError;

/// Waits until at least one of `fds` is readable, or `timeout` passes (`None`: no limit).
/// Returns whether one became readable. An empty set just sleeps for `timeout`.
///
/// # Errors
/// `poll(2)` failed for another reason than a signal.
pub fn wait_readable_any(
    fds: &[BorrowedFd<'_>],
    timeout: Option<Duration>,
) -> Result<bool, ShmError> {
    let ms: libc::c_int = match timeout {
        None => -1,
        // Round up, so that a short non-zero wait does not become a busy poll.
        Some(t) => t
            .as_nanos()
            .div_ceil(1_000_000)
            .try_into()
            .unwrap_or(libc::c_int::MAX),
    };
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let n = libc::nfds_t::try_from(pfds.len())
        .map_err(|_| ShmError::Poll(io::Error::from(io::ErrorKind::InvalidInput)))?;
    loop {
        // SAFETY: `pfds` holds `n` initialised pollfd entries and lives across the call; the
        // descriptors are borrowed, so they stay open for its duration.
        let rc = unsafe { libc::poll(pfds.as_mut_ptr(), n, ms) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(ShmError::Poll(e));
        }
        return Ok(rc > 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shm::EventFd;
    use std::time::Instant;

    #[test]
    fn wakes_on_any_readable_fd_and_times_out_otherwise() {
        let a = EventFd::new().unwrap();
        let b = EventFd::new().unwrap();
        let t = Instant::now();
        assert!(!wait_readable_any(&[a.fd(), b.fd()], Some(Duration::from_millis(20))).unwrap());
        assert!(t.elapsed() >= Duration::from_millis(20));
        b.signal().unwrap();
        assert!(wait_readable_any(&[a.fd(), b.fd()], None).unwrap());
        assert!(b.drain().unwrap());
        assert!(!wait_readable_any(&[a.fd(), b.fd()], Some(Duration::ZERO)).unwrap());
        assert!(!wait_readable_any(&[], Some(Duration::from_millis(1))).unwrap());
    }
}
