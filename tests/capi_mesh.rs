//! The mesh layer behind the C launch functions: N ranks (threads here) build the full mesh,
//! exchange checked messages with every peer, pass barriers with data in flight, and find each
//! other through an embedded manager on rank 0.

use std::thread;
use std::time::Duration;

use rsmsg::bootstrap::Token;
use rsmsg::endpoint::Config;
use rsmsg::mesh::{Mesh, MeshError, MeshSetup, Wait};

fn setup(job: &str) -> MeshSetup {
    MeshSetup {
        job: format!("{job}-{}", std::process::id()),
        embed_manager: None,
        timeout: Duration::from_secs(60),
    }
}

fn payload(src: u32, dst: u32, round: u32, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (src as usize * 131 + dst as usize * 17 + round as usize * 7 + i) as u8)
        .collect()
}

/// Runs `size` ranks of `body` on threads, each with its own mesh.
fn ranks(size: u32, config: Config, setup: MeshSetup, body: fn(&Mesh)) {
    let hs: Vec<_> = (0..size)
        .map(|r| {
            let (config, setup) = (config.clone(), setup.clone());
            thread::spawn(move || {
                let mesh = Mesh::connect(&config, r, size, &setup).unwrap();
                assert_eq!((mesh.rank(), mesh.size()), (r, size));
                body(&mesh);
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
}

fn all_to_all(mesh: &Mesh) {
    let (me, size) = (mesh.rank(), mesh.size());
    for round in 0..6u32 {
        let len = [1usize, 100, 1000, 5000, 20000, 70000][round as usize];
        for k in 1..size {
            let dst = (me + k) % size;
            let len = len.min(mesh.max_message(dst).unwrap());
            mesh.send(dst, &payload(me, dst, round, len)).unwrap();
        }
        for k in 1..size {
            let src = (me + size - k) % size;
            let m = mesh.recv(src, Wait::Forever).unwrap().unwrap();
            let len = len.min(mesh.max_message(src).unwrap());
            assert_eq!(
                &*m,
                &payload(src, me, round, len)[..],
                "round {round} from {src}"
            );
        }
        mesh.barrier().unwrap();
    }
}

#[test]
fn four_ranks_all_to_all_over_shared_memory() {
    ranks(4, Config::default(), setup("mesh-a2a"), all_to_all);
}

#[test]
fn data_sent_before_a_barrier_survives_it() {
    ranks(3, Config::default(), setup("mesh-barrier"), |mesh| {
        let me = mesh.rank();
        // Everyone sends to everyone, then enters the barrier before receiving anything: the
        // barrier must step over the data and keep it, in order.
        for peer in (0..mesh.size()).filter(|p| *p != me) {
            for i in 0..5u8 {
                mesh.send(peer, &[me as u8, i]).unwrap();
            }
        }
        mesh.barrier().unwrap();
        mesh.barrier().unwrap();
        for peer in (0..mesh.size()).filter(|p| *p != me) {
            for i in 0..5u8 {
                let m = mesh.recv(peer, Wait::For(Duration::from_secs(10))).unwrap();
                assert_eq!(&*m.unwrap(), &[peer as u8, i]);
            }
            assert!(mesh.recv(peer, Wait::No).unwrap().is_none());
        }
        // Misuse: our own rank, a rank outside the job.
        for bad in [me, mesh.size()] {
            assert!(matches!(
                mesh.send(bad, b"x"),
                Err(MeshError::BadRank { .. })
            ));
            assert!(matches!(
                mesh.recv(bad, Wait::No),
                Err(MeshError::BadRank { .. })
            ));
        }
        assert!(matches!(
            mesh.recv((me + 1) % mesh.size(), Wait::For(Duration::from_millis(10))),
            Err(MeshError::Recv { .. })
        ));
        mesh.barrier().unwrap();
    });
}

#[test]
fn rank_zero_embeds_the_manager() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let token = Token::new(b"mesh-embedded-manager-token".to_vec()).unwrap();
    let config = Config::default().manager(format!("127.0.0.1:{port}"), token.clone());
    let mut s = setup("mesh-mgr");
    s.embed_manager = Some((format!("127.0.0.1:{port}"), token));
    ranks(3, config, s, |mesh| {
        all_to_all(mesh);
        mesh.barrier().unwrap();
    });
}

#[test]
fn a_rank_outside_the_job_is_refused() {
    let e = Mesh::connect(&Config::default(), 2, 2, &setup("mesh-bad")).unwrap_err();
    assert!(matches!(e, MeshError::BadRank { .. }), "{e}");
}
