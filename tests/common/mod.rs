//! Helpers shared by the integration tests (a module, not a test target).

#[allow(dead_code)] // only the rendezvous tests use it
pub mod answer_room;

/// Deterministic content of message `seq` of length `len` (xorshift from a seed derived from
/// `seq`), so a receiver can check every byte without the sender's buffer.
pub fn payload(seq: u64, len: usize) -> Vec<u8> {
    let mut x = seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Voluntary context switches of the calling thread so far (each one a wake-up after a sleep),
/// from `/proc/thread-self/status`.
#[allow(dead_code)] // not every test target that includes this module counts wake-ups
pub fn wakeups() -> i64 {
    let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
        .expect("voluntary_ctxt_switches in /proc/thread-self/status")
        .trim()
        .parse()
        .unwrap()
}
