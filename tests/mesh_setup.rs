//! Mesh over shared memory: a setup that times out clearly rather than hanging and gets through a
//! busy manager, and a barrier whose copies of data that came while it waited are bounded.

use std::thread;
use std::time::{Duration, Instant};

use rsmsg::bootstrap::{LaunchInfo, Limits, Manager, Token};
use rsmsg::endpoint::Config;
use rsmsg::mesh::{Mesh, MeshError, MeshSetup};

fn setup(job: &str, timeout: Duration) -> MeshSetup {
    MeshSetup {
        job: format!("{job}-{}", std::process::id()),
        embed_manager: None,
        timeout,
    }
}

#[test]
fn a_rank_whose_higher_peers_never_start_times_out_clearly() {
    let s = setup("mesh-lonely", Duration::from_secs(2));
    let t = Instant::now();
    match Mesh::connect(&Config::default(), 0, 3, &s) {
        Err(MeshError::SetupTimeout(limit, what)) => {
            assert_eq!(limit, Duration::from_secs(2));
            assert!(what.contains("ranks 1 to 2"), "{what}");
        }
        Err(e) => panic!("expected a setup timeout, got {e}"),
        Ok(_) => panic!("a mesh of 3 formed with one rank"),
    }
    // Bounded by the setup timeout (generous slack: this guards against a hang only).
    assert!(t.elapsed() < Duration::from_secs(60));
}

#[test]
fn a_partial_mesh_times_out_on_every_started_rank_and_a_full_one_forms() {
    // Ranks 0 and 1 of 3: rank 1 connects to 0, both wait for rank 2, which never comes.
    let s = setup("mesh-partial", Duration::from_secs(2));
    let s1 = s.clone();
    let r1 = thread::spawn(move || Mesh::connect(&Config::default(), 1, 3, &s1).map(|_| ()));
    let r0 = Mesh::connect(&Config::default(), 0, 3, &s).map(|_| ());
    assert!(matches!(r0, Err(MeshError::SetupTimeout(..))), "{r0:?}");
    let r1 = r1.join().unwrap();
    assert!(matches!(r1, Err(MeshError::SetupTimeout(..))), "{r1:?}");

    // All three: the mesh forms and carries a message between every pair.
    let s = setup("mesh-full", Duration::from_secs(30));
    let ranks: Vec<_> = (0..3u32)
        .map(|r| {
            let s = s.clone();
            thread::spawn(move || {
                let m = Mesh::connect(&Config::default(), r, 3, &s).unwrap();
                for to in (0..3).filter(|&to| to != r) {
                    m.send(to, &[r as u8; 16]).unwrap();
                }
                for from in (0..3).filter(|&f| f != r) {
                    let msg = m
                        .recv(from, rsmsg::mesh::Wait::For(Duration::from_secs(30)))
                        .unwrap()
                        .expect("a message from every rank");
                    assert_eq!(&*msg, &[from as u8; 16]);
                }
                m.barrier().unwrap();
            })
        })
        .collect();
    for r in ranks {
        r.join().unwrap();
    }
}

#[test]
fn a_job_size_past_the_maximum_is_refused_up_front() {
    let s = setup("mesh-huge", Duration::from_secs(2));
    for size in [LaunchInfo::MAX_SIZE + 1, u32::MAX] {
        match Mesh::connect(&Config::default(), 0, size, &s) {
            Err(MeshError::Config { name, reason }) => {
                assert_eq!(name, "job size");
                assert!(reason.contains(&size.to_string()), "{reason}");
            }
            Err(e) => panic!("size {size}: expected a configuration error, got {e}"),
            Ok(_) => panic!("size {size}: a mesh formed"),
        }
    }
}

#[test]
fn a_setup_timeout_past_the_maximum_is_refused_not_overflowed() {
    for timeout in [
        MeshSetup::MAX_TIMEOUT + Duration::from_secs(1),
        Duration::from_secs(u64::MAX),
        Duration::MAX,
    ] {
        let s = setup("mesh-forever", timeout);
        match Mesh::connect(&Config::default(), 0, 2, &s) {
            Err(MeshError::Config { name, .. }) => assert_eq!(name, "RSMSG_MESH_TIMEOUT"),
            Err(e) => panic!("{timeout:?}: expected a configuration error, got {e}"),
            Ok(_) => panic!("{timeout:?}: a mesh of 2 formed with one rank"),
        }
    }
}

#[test]
fn a_barrier_flooded_with_data_stops_at_its_backlog_bound_loses_nothing_and_resumes() {
    // Rank 1 sends ten 64 KiB messages, then enters the barrier; rank 0 waits in the barrier
    // with a bound of 128 KiB on what it copies aside.
    const N: usize = 10;
    const LEN: usize = 64 << 10;
    let s = setup("mesh-flood", Duration::from_secs(30));
    let s1 = s.clone();
    let r1 = thread::spawn(move || {
        let m = Mesh::connect(&Config::default(), 1, 2, &s1).unwrap();
        for i in 0..N {
            m.send(0, &vec![i as u8; LEN]).unwrap();
        }
        m.barrier().unwrap();
        m.barrier().unwrap();
    });
    let m = Mesh::connect(&Config::default(), 0, 2, &s).unwrap();
    m.set_barrier_backlog(128 << 10);
    match m.barrier() {
        Err(MeshError::BarrierBacklog { rank, bytes, cap }) => {
            assert_eq!(rank, 1);
            assert_eq!(cap, 128 << 10);
            // Past the bound by at most one message.
            assert!(
                bytes > cap && bytes <= cap + LEN,
                "{bytes} bytes copied aside"
            );
            assert_eq!(m.barrier_backlog(), bytes);
        }
        other => panic!("expected the backlog bound, got {other:?}"),
    }
    // Every message arrives once, in order: the copies first, then the rest in place.
    for i in 0..N {
        let msg = m
            .recv(1, rsmsg::mesh::Wait::For(Duration::from_secs(30)))
            .unwrap()
            .expect("every message");
        assert_eq!(msg.len(), LEN);
        assert!(msg.iter().all(|&b| b == i as u8), "message {i}");
    }
    assert_eq!(m.barrier_backlog(), 0);
    // The unfinished barrier resumes (rank 1 is in it), and a next one still pairs up.
    m.barrier().unwrap();
    m.barrier().unwrap();
    r1.join().unwrap();
}

#[test]
fn a_mesh_forms_through_a_manager_that_turns_clients_away_while_busy() {
    // Five ranks through a manager that serves six clients and one handshake at a time: the
    // five listeners hold five, so concurrent connects and registrations are answered `Busy`
    // until the one before them is done, and the mesh set-up tries them again.
    const SIZE: u32 = 5;
    let token = Token::new("mesh-busy-manager-token").unwrap();
    let mut limits = Limits::default();
    limits.max_clients = SIZE as usize + 1;
    limits.max_unauthenticated = 1;
    let mgr = Manager::bind_with("127.0.0.1:0", token.clone(), limits).unwrap();
    let cfg = Config::default().manager(mgr.local_addr().to_string(), token);
    let s = setup("mesh-busy", Duration::from_secs(60));
    let ranks: Vec<_> = (0..SIZE)
        .map(|r| {
            let (cfg, s) = (cfg.clone(), s.clone());
            thread::spawn(move || {
                let m = Mesh::connect(&cfg, r, SIZE, &s).unwrap();
                for to in (0..SIZE).filter(|&to| to != r) {
                    m.send(to, &[r as u8; 32]).unwrap();
                }
                for from in (0..SIZE).filter(|&f| f != r) {
                    let msg = m
                        .recv(from, rsmsg::mesh::Wait::For(Duration::from_secs(60)))
                        .unwrap()
                        .expect("a message from every rank");
                    assert_eq!(&*msg, &[from as u8; 32]);
                }
                m.barrier().unwrap();
            })
        })
        .collect();
    for r in ranks {
        r.join().unwrap();
    }
}
