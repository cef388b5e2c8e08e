//! The committed seed corpus of the fuzz targets (`fuzz/corpus/<target>/seed-*`): every seed is
//! a valid encoding that its decoder accepts and re-encodes byte for byte, so the fuzzers start
//! from inputs that reach past the first checks.
//!
//! `RSMSG_WRITE_FUZZ_SEEDS=1 cargo test --test fault_fuzz_corpus` rewrites the seeds from the
//! encoders (after a wire format change); without it the test only checks them.

use std::path::{Path, PathBuf};

use rsmsg::bootstrap::wire::{
    Descriptors, EndpointInfo, EndpointName, ErrorCode, HostId, MailboxDescriptor, Message, QpInfo,
    RendezvousId, SegmentDescriptor, Side, TransportSet,
};
use rsmsg::core::{
    ControlMessage, Generation, Header, Immediate, Layout, MessageKind, PartitionIndex, SegmentId,
};
use rsmsg::verbs::QpEndpoint;

fn info(name: &str, shm: bool) -> EndpointInfo {
    EndpointInfo {
        name: EndpointName::new(name).unwrap(),
        host_id: HostId::new("host-1").unwrap(),
        transports: if shm {
            TransportSet::SHM.union(TransportSet::VERBS)
        } else {
            TransportSet::VERBS
        },
        shm_socket: shm.then(|| "/run/rsmsg/a.sock".to_string()),
    }
}

fn descriptors() -> Descriptors {
    Descriptors {
        qp: Some(QpInfo {
            qpn: 0x123,
            psn: 0x456,
            gid: [0xfe; 16],
            lid: 0,
            mtu: 1024,
            port: 1,
            gid_index: 1,
        }),
        mailbox: Some(MailboxDescriptor {
            addr: 0x1000,
            rkey: 7,
            len: 2056,
        }),
        segments: vec![
            SegmentDescriptor {
                segment_id: 0,
                group: 0,
                addr: 0x10_0000,
                len: 256 * 256,
                rkey: 9,
                partition_size: 256,
                partition_count: 256,
                span_factor: 4,
            },
            SegmentDescriptor {
                segment_id: 1,
                group: 1,
                addr: 0x20_0000,
                len: 4096 * 64,
                rkey: 10,
                partition_size: 4096,
                partition_count: 64,
                span_factor: 4,
            },
        ],
        opaque: vec![1, 2, 3, 4],
    }
}

fn bootstrap_seeds() -> Vec<Vec<u8>> {
    let id = RendezvousId(42);
    let msgs = vec![
        Message::Hello { nonce: [1; 32] },
        Message::Challenge { nonce: [2; 32] },
        Message::Auth { mac: [3; 32] },
        Message::AuthOk { mac: [4; 32] },
        Message::Register {
            info: info("a", true),
        },
        Message::Unregister {
            name: EndpointName::new("a").unwrap(),
        },
        Message::Lookup {
            name: EndpointName::new("b").unwrap(),
        },
        Message::Connect {
            from: info("a", false),
            to: EndpointName::new("b").unwrap(),
            offer: descriptors(),
        },
        Message::WaitConnect {
            name: EndpointName::new("b").unwrap(),
            timeout_ms: 1000,
        },
        Message::Send {
            id,
            side: Side::Initiator,
            payload: descriptors(),
        },
        Message::Recv {
            id,
            side: Side::Listener,
            timeout_ms: 5,
        },
        Message::Close {
            id,
            side: Side::Initiator,
            reason: "done".into(),
        },
        Message::Ping,
        Message::Ok,
        Message::Found {
            info: info("b", false),
        },
        Message::Queued { id },
        Message::Incoming {
            id,
            from: info("a", true),
            offer: Descriptors::default(),
        },
        Message::Delivered {
            payload: descriptors(),
        },
        Message::TimedOut,
        Message::Pong,
        Message::Error {
            code: ErrorCode::UnknownName,
            message: "no such endpoint".into(),
        },
    ];
    msgs.iter().map(|m| m.encode().unwrap()).collect()
}

fn immediate_seeds() -> Vec<Vec<u8>> {
    let imms = [
        Immediate::message(SegmentId(0), PartitionIndex::from_u16(0), Generation(0)),
        Immediate::message(SegmentId(3), PartitionIndex::from_u16(77), Generation(5)),
        Immediate::credit(SegmentId(1), 1000),
        Immediate(0x8000_0001),
    ];
    imms.iter()
        .enumerate()
        .map(|(i, imm)| {
            let mut b = imm.to_be_bytes().to_vec();
            b.extend_from_slice(&(imm.get() & 0x3f_ffff).to_le_bytes());
            b.extend_from_slice(&(i as u32 * 5000).to_le_bytes());
            b
        })
        .collect()
}

fn header_seeds() -> Vec<Vec<u8>> {
    [MessageKind::Data, MessageKind::Control]
        .iter()
        .map(|&kind| {
            Header {
                kind,
                len: 100,
                seq: 7,
                generation: Generation(3),
            }
            .encode()
            .to_vec()
        })
        .collect()
}

fn control_seeds() -> Vec<Vec<u8>> {
    [
        ControlMessage::RendezvousRequest {
            id: 1,
            addr: 0x7000_0000,
            len: 1 << 20,
            rkey: 5,
        },
        ControlMessage::RendezvousDone { id: 1 },
        ControlMessage::Close { reason: 0 },
    ]
    .iter()
    .map(|m| m.encode().as_slice().to_vec())
    .collect()
}

fn config_seeds() -> Vec<Vec<u8>> {
    [
        "256:256:4,4k:64:4,64k:16:4:2",
        " 64:1:1 , 128:2:2 ",
        "busy",
        "event",
        "adaptive:100",
        "auto",
        "verbs",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

fn endpoint_seeds() -> Vec<Vec<u8>> {
    let mut roce = vec![1u8, 2, 3, 1];
    roce.extend_from_slice(&0x11u32.to_be_bytes());
    roce.extend_from_slice(&0x22u32.to_be_bytes());
    roce.extend_from_slice(&[0, 0, 1, 0]);
    roce.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 1]);
    let mut ib = roce.clone();
    ib[1] = 1;
    ib[12..14].copy_from_slice(&5u16.to_be_bytes());
    vec![roce, ib]
}

/// Checks one seed with its decoder; returns a reason on failure.
fn check(target: &str, seed: &[u8]) -> Result<(), String> {
    match target {
        "bootstrap_frame" => {
            let m = Message::decode_frame(seed).map_err(|e| e.to_string())?;
            (m.encode().unwrap() == seed)
                .then_some(())
                .ok_or("re-encoding differs".into())
        }
        "core_immediate" => {
            let imm = Immediate::from_be_bytes(seed[..4].try_into().unwrap());
            // Type 2 and 3 seeds are there to reach the error path.
            match imm.decode() {
                Ok(_) => Ok(()),
                Err(_) if imm.get() >> 30 >= 2 => Ok(()),
                Err(e) => Err(e.to_string()),
            }
        }
        "core_header" => {
            let h = Header::decode(seed).map_err(|e| e.to_string())?;
            (h.encode()[..] == *seed)
                .then_some(())
                .ok_or("re-encoding differs".into())
        }
        "core_control" => {
            let m = ControlMessage::decode(seed).map_err(|e| e.to_string())?;
            (m.encode().as_slice() == seed)
                .then_some(())
                .ok_or("re-encoding differs".into())
        }
        "config_strings" => {
            let s = std::str::from_utf8(seed).map_err(|e| e.to_string())?;
            let ok = s.parse::<Layout>().is_ok()
                || s.parse::<rsmsg::transport::PollMode>().is_ok()
                || s.parse::<rsmsg::endpoint::TransportChoice>().is_ok();
            ok.then_some(()).ok_or("no parser accepts it".into())
        }
        "verbs_endpoint" => {
            let ep = QpEndpoint::decode(seed).map_err(|e| e.to_string())?;
            (ep.encode()[..] == *seed)
                .then_some(())
                .ok_or("re-encoding differs".into())
        }
        other => Err(format!("unknown fuzz target {other}")),
    }
}

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

#[test]
fn committed_seeds_are_valid_encodings() {
    let sets: [(&str, Vec<Vec<u8>>); 6] = [
        ("bootstrap_frame", bootstrap_seeds()),
        ("core_immediate", immediate_seeds()),
        ("core_header", header_seeds()),
        ("core_control", control_seeds()),
        ("config_strings", config_seeds()),
        ("verbs_endpoint", endpoint_seeds()),
    ];
    let write = std::env::var_os("RSMSG_WRITE_FUZZ_SEEDS").is_some();
    for (target, seeds) in &sets {
        let dir = corpus_dir(target);
        if write {
            std::fs::create_dir_all(&dir).unwrap();
            for (i, s) in seeds.iter().enumerate() {
                check(target, s).unwrap_or_else(|e| panic!("{target} seed {i}: {e}"));
                std::fs::write(dir.join(format!("seed-{i:02}")), s).unwrap();
            }
        }
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if !name.starts_with("seed-") {
                continue;
            }
            let bytes = std::fs::read(&path).unwrap();
            check(target, &bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            n += 1;
        }
        assert!(
            n >= seeds.len(),
            "{target}: {n} seeds, expected {}",
            seeds.len()
        );
    }
}
