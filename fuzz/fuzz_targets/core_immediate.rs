//! Immediates (`src/core/wire.rs`): any 32 bits a peer may put in a completion, and the credit
//! reconstruction from a notice's low bits.
//!
//! Decoding never panics; every decoded immediate re-encodes to the same 32 bits; a
//! reconstructed credit is at most the head and congruent to the notice.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rsmsg::core::{Generation, Immediate, ImmediateKind, reconstruct_freed};

fuzz_target!(|data: [u8; 12]| {
    let raw = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
    let imm = Immediate::from_be_bytes([data[0], data[1], data[2], data[3]]);
    assert_eq!(imm.get(), raw);
    assert_eq!(Immediate::from_be(imm.to_be()), imm);
    match imm.decode() {
        Ok(ImmediateKind::Message {
            segment,
            first,
            generation_bits,
            bare,
        }) => {
            assert!(generation_bits < 64);
            let g = Generation(u32::from(generation_bits));
            let again = if bare {
                Immediate::bare(segment, first, g)
            } else {
                Immediate::message(segment, first, g)
            };
            assert_eq!(again, imm);
        }
        Ok(ImmediateKind::Credit { segment, freed_low }) => {
            assert!(freed_low < 1 << 22);
            assert_eq!(Immediate::credit(segment, u64::from(freed_low)), imm);
        }
        Err(_) => assert_eq!(raw >> 30, 3, "only type 3 is refused"),
    }
    let low = u32::from_le_bytes([data[4], data[5], data[6], data[7]]) & ((1 << 22) - 1);
    let head = u64::from(u32::from_le_bytes([data[8], data[9], data[10], data[11]]))
        << (data[0] & 31);
    match reconstruct_freed(low, head) {
        Some(v) => {
            assert!(v <= head);
            assert_eq!(v & ((1 << 22) - 1), u64::from(low));
            assert!(head - v < 1 << 22);
        }
        None => assert!(head < u64::from(low)),
    }
});
