//! Copies of message bytes, in pieces where one long `memcpy` is pathologically slow.
//!
//! glibc's `memcpy` moves a block larger than its `x86_rep_movsb_threshold` (8 KiB on an AVX2
//! CPU) with `rep movsb`. On hardware that is fast, and it can write whole cache lines without
//! reading them first, which a copy into a peer's shared memory gains from. Under QEMU's TCG
//! emulator, where the Soft-RoCE guest of this project runs, it is emulated byte by byte: a
//! 64 KiB copy takes about 210 us there (310 MB/s) against 25-31 us (2.1-2.6 GB/s) in pieces of
//! 4-8 KiB, and an eager message is copied twice (into the partitions, out of them).
//!
//! So the first connection of a process times both ways once ([`calibrate`], a few microseconds
//! on hardware, under a millisecond under emulation), and copies in pieces of [`PIECE`] bytes
//! only where one long copy took more than twice as long as the pieces. Until then, and where
//! it did not, a copy is one call. `docs/performance.md`, "Copies under emulation".
#![forbid(unsafe_code)]

use std::hint::black_box;
use std::sync::Once;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The largest block one `memcpy` call gets when copies go in pieces: below glibc's
/// `rep movsb` threshold on every x86 CPU it tunes for (2-8 KiB by vector width), a page.
pub(crate) const PIECE: usize = 4096;

/// [`piece_len`]'s value: `usize::MAX` (one call) until [`calibrate`] chose [`PIECE`].
static PIECE_LEN: AtomicUsize = AtomicUsize::new(usize::MAX);

/// The longest block one copy call gets: [`PIECE`] where long copies crawl, else `usize::MAX`.
#[inline]
pub(crate) fn piece_len() -> usize {
    PIECE_LEN.load(Ordering::Relaxed)
}

/// How this process copies message bytes: `Some(n)` when copies go in pieces of at most `n`
/// bytes (one long `memcpy` measured more than twice as slow as pieces: QEMU's TCG emulator),
/// `None` when each copy is one call (hardware, or before the first connection calibrated).
/// `rsmsg perf` prints it; `docs/performance.md`, "Copies under emulation".
pub fn copy_piece_len() -> Option<usize> {
    as_option(piece_len())
}

/// [`piece_len`]'s value as [`copy_piece_len`] reports it: `usize::MAX` (one call) is `None`.
fn as_option(piece_len: usize) -> Option<usize> {
    (piece_len != usize::MAX).then_some(piece_len)
}

/// Sets [`piece_len`] (tests of the copies that go in pieces, on a host where they do not).
#[cfg(test)]
pub(crate) fn set_piece_len(n: usize) {
    PIECE_LEN.store(n, Ordering::Relaxed);
}

/// `dst.copy_from_slice(src)`, in pieces of at most [`piece_len`] bytes.
///
/// # Panics
/// If the lengths differ, as `copy_from_slice` does.
#[inline]
pub(crate) fn copy(dst: &mut [u8], src: &[u8]) {
    let piece = piece_len();
    if src.len() <= piece {
        dst.copy_from_slice(src);
    } else {
        copy_pieces(dst, src, piece);
    }
}

#[inline(never)]
fn copy_pieces(dst: &mut [u8], src: &[u8], piece: usize) {
    assert_eq!(dst.len(), src.len(), "copy: length mismatch");
    for (d, s) in dst.chunks_mut(piece).zip(src.chunks(piece)) {
        d.copy_from_slice(s);
    }
}

/// Times a 64 KiB copy as one call and in pieces, once per process, and makes copies go in
/// pieces when the one call took more than twice as long (the best of three each).
pub(crate) fn calibrate() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let src = vec![0x5A_u8; 64 << 10];
        let mut dst = vec![0_u8; 64 << 10];
        let best = |f: &mut dyn FnMut()| {
            f();
            (0..3)
                .map(|_| {
                    let t = Instant::now();
                    f();
                    t.elapsed()
                })
                .min()
                .unwrap_or(Duration::ZERO)
        };
        let whole = best(&mut || black_box(&mut dst[..]).copy_from_slice(black_box(&src[..])));
        let pieces = best(&mut || copy_pieces(black_box(&mut dst[..]), black_box(&src), PIECE));
        if whole > pieces * 2 {
            PIECE_LEN.store(PIECE, Ordering::Relaxed);
        }
        tracing::debug!(?whole, ?pieces, piece_len = piece_len(), "copy calibrated");
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_every_byte_at_every_boundary_both_ways() {
        for piece in [PIECE, usize::MAX] {
            for len in [
                0,
                1,
                PIECE - 1,
                PIECE,
                PIECE + 1,
                3 * PIECE,
                3 * PIECE + 17,
                65552,
            ] {
                let src: Vec<u8> = (0..len).map(|i| (i * 7 + i / 251) as u8).collect();
                let mut dst = vec![0xAA; len];
                if len <= piece {
                    copy(&mut dst, &src);
                } else {
                    copy_pieces(&mut dst, &src, piece);
                }
                assert_eq!(dst, src, "len {len}, piece {piece}");
            }
        }
        // Whatever the calibration chose (other tests of this process may set it too), copies
        // stay exact.
        calibrate();
        let src: Vec<u8> = (0..65552).map(|i| (i % 253) as u8).collect();
        let mut dst = vec![0; src.len()];
        copy(&mut dst, &src);
        assert_eq!(dst, src);
    }

    #[test]
    fn reports_pieces_only_when_chosen() {
        assert_eq!(as_option(usize::MAX), None);
        assert_eq!(as_option(PIECE), Some(PIECE));
        // Not compared with `piece_len()` here: another test of this process may set it between
        // the two loads.
    }

    #[test]
    #[should_panic(expected = "length mismatch")]
    fn refuses_unequal_lengths_in_pieces() {
        copy_pieces(&mut [0; PIECE + 2], &[1; PIECE + 1], PIECE);
    }
}
