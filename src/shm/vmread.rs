//! Reading a peer process's memory with `process_vm_readv(2)`: the single copy of a shared-memory
//! rendezvous (the receiver copies the sender's buffer straight into its destination).
//!
//! The kernel checks the permission as for `ptrace` (`PTRACE_MODE_ATTACH_REALCREDS`): same
//! credentials, and under Yama `ptrace_scope` 1 only a descendant, or a process the target named
//! with `prctl(PR_SET_PTRACER)`; scope 2 and 3 forbid it for unprivileged processes. A refusal is
//! reported, never retried; see `docs/rendezvous.md`.

use std::io;

/// Copies `dst.len()` bytes at address `addr` of process `pid` into `dst`.
///
/// # Errors
/// The `process_vm_readv` error: `EPERM` (not permitted, see the module docs), `ESRCH` (no such
/// process), `EFAULT` (the range is not mapped in the peer); `UnexpectedEof` when the peer's
/// mapping ends inside the range (a partial read).
pub fn read_peer_memory(pid: i32, addr: u64, dst: &mut [u8]) -> io::Result<()> {
    let mut done = 0usize;
    while done < dst.len() {
        let remote_addr = addr
            .checked_add(done as u64)
            .and_then(|a| usize::try_from(a).ok())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EFAULT))?;
        let rest = &mut dst[done..];
        let local = libc::iovec {
            iov_base: rest.as_mut_ptr().cast(),
            iov_len: rest.len(),
        };
        let remote = libc::iovec {
            iov_base: remote_addr as *mut libc::c_void,
            iov_len: rest.len(),
        };
        // SAFETY: `local` describes `rest`, a live, exclusively borrowed slice the kernel writes
        // (at most `rest.len()` bytes). `remote` names memory of another process, which the
        // kernel reads under its own permission and mapping checks (a bad address is `EFAULT`,
        // never a fault here). One iovec each, flags 0 as the call requires.
        let n = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the peer's mapping ends inside the range",
            ));
        }
        done += n as usize;
    }
    Ok(())
}

/// Length of the readability probe ([`probe_addr`]).
pub const PROBE_LEN: usize = 16;

/// The probe's content, the same in every process (documented in `docs/shm.md`).
pub const PROBE_CONTENT: [u8; PROBE_LEN] = *b"rsmsg-vm-probe\x5a\xa5";

/// The probe buffer of this process: [`PROBE_CONTENT`] at a fixed address for the life of the
/// process.
static PROBE: [u8; PROBE_LEN] = PROBE_CONTENT;

/// The address of this process's readability probe: [`PROBE_LEN`] bytes of [`PROBE_CONTENT`],
/// offered to a shared-memory peer in the handshake so that it can find out whether the kernel
/// lets it read this process (`process_vm_readv`) before any transfer.
pub fn probe_addr() -> u64 {
    PROBE.as_ptr() as u64
}

/// Whether this process may read process `pid`'s memory: reads the [`PROBE_LEN`] bytes the
/// peer named as its probe at `addr` and checks that they hold [`PROBE_CONTENT`]. Any failure
/// (`EPERM`, no such process, an unmapped address, other content) is `false`.
pub fn probe_peer(pid: i32, addr: u64) -> bool {
    let mut b = [0u8; PROBE_LEN];
    match read_peer_memory(pid, addr, &mut b) {
        Ok(()) => b == PROBE_CONTENT,
        Err(e) => {
            tracing::debug!(error = %e, pid, "the peer's probe is not readable");
            false
        }
    }
}

/// Whether this process may read the memory of `pid` (one probe of `len` 0 is not enough for
/// the kernel's check, so it reads one byte at `addr`).
pub fn may_read_peer(pid: i32, addr: u64) -> bool {
    let mut b = [0u8; 1];
    read_peer_memory(pid, addr, &mut b).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_memory_and_refuses_unmapped() {
        let src: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
        let mut dst = vec![0u8; src.len()];
        let pid = std::process::id() as i32;
        read_peer_memory(pid, src.as_ptr() as u64, &mut dst).unwrap();
        assert_eq!(src, dst);
        let e = read_peer_memory(pid, 8, &mut dst[..16]).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EFAULT));
        assert!(may_read_peer(pid, src.as_ptr() as u64));
        assert!(read_peer_memory(pid, u64::MAX - 3, &mut dst[..16]).is_err());
    }

    #[test]
    fn probe_is_readable_by_this_process_and_checked() {
        let pid = std::process::id() as i32;
        assert!(probe_peer(pid, probe_addr()));
        // Readable memory with other content is not the probe.
        let other = [0u8; PROBE_LEN];
        assert!(!probe_peer(pid, other.as_ptr() as u64));
        // An unmapped address, an address that wraps.
        assert!(!probe_peer(pid, 8));
        assert!(!probe_peer(pid, u64::MAX - 3));
    }
}
