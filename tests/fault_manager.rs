//! The bootstrap manager killed (SIGKILL) while connections are up: established connections
//! keep working (the manager is only on the setup path), new connects fail with a clear
//! "unreachable" error, and once a manager is back on the same address, a listener that
//! registers again is found and connected to.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::Duration;

use rsmsg::bootstrap::{
    BootstrapError, EndpointInfo, EndpointName, HostId, ManagerClient, Registration, Token,
    TransportSet,
};
use rsmsg::core::Layout;
use rsmsg::endpoint::{self, Config, EndpointError, Listener};
use rsmsg::transport::PollMode;
use rsmsg::transport::shm::ShmListener;

const SECRET: &str = "fault-manager-test-secret";
const T: Duration = Duration::from_secs(10);

fn token() -> Token {
    Token::new(SECRET).unwrap()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts `rsmsg manager` on `addr` and waits until it answers.
fn manager(addr: &str) -> Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_rsmsg"))
        .args(["manager", "--listen", addr])
        .env("RSMSG_TOKEN", SECRET)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn rsmsg manager");
    for _ in 0..400 {
        if let Ok(mut c) = ManagerClient::connect(addr, &token(), T)
            && c.ping().is_ok()
        {
            return child;
        }
        thread::sleep(Duration::from_millis(25));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("the manager did not come up on {addr}");
}

fn kill(mut child: Child) {
    child.kill().unwrap();
    child.wait().unwrap();
}

/// Echoes `rounds` messages of one connection, then hands the listener back.
fn echo_server(listener: Listener, rounds: usize) -> thread::JoinHandle<Listener> {
    thread::spawn(move || {
        let conn = listener.accept().unwrap();
        for _ in 0..rounds {
            let m = conn.recv().unwrap();
            let reply = m.to_vec();
            drop(m);
            conn.send(&reply).unwrap();
        }
        listener
    })
}

#[test]
fn killed_manager_spares_live_connections_and_fails_new_ones_clearly() {
    let addr = format!("127.0.0.1:{}", free_port());
    let m = manager(&addr);
    let config = Config::default().manager(addr.clone(), token());
    let name = format!("fault-mgr-{}", std::process::id());
    let listener = Listener::bind(&config, &name).unwrap();
    let server = echo_server(listener, 200);
    let conn = endpoint::connect(&config, &name).unwrap();
    for i in 0..100u32 {
        conn.send(&i.to_le_bytes()).unwrap();
        assert_eq!(&*conn.recv().unwrap(), &i.to_le_bytes());
    }

    kill(m);
    // The established connection does not notice.
    for i in 100..200u32 {
        conn.send(&i.to_le_bytes()).unwrap();
        assert_eq!(&*conn.recv().unwrap(), &i.to_le_bytes());
    }
    let listener = server.join().unwrap();
    // A new connect fails with a clear, classified error, and does not hang.
    match endpoint::connect(&config, &name) {
        Err(EndpointError::Bootstrap(e)) => assert!(e.is_unreachable(), "{e:?}"),
        other => panic!("expected an unreachable manager, got {other:?}"),
    }
    // So does binding a new listener that needs the manager.
    let other = format!("fault-mgr-b-{}", std::process::id());
    assert!(matches!(
        Listener::bind(&config, &other),
        Err(EndpointError::Bootstrap(_))
    ));

    // The manager comes back (empty: registrations died with it). The first listener, which
    // lived through the outage, registers again by itself (it checks its manager connection
    // every second) and is found and connected to.
    let m2 = manager(&addr);
    let server = echo_server(listener, 1);
    let patient = config.clone().connect_retry(Duration::from_secs(20));
    let conn1 = endpoint::connect(&patient, &name).expect("the listener registered again");
    conn1.send(b"same listener").unwrap();
    assert_eq!(&*conn1.recv().unwrap(), b"same listener");
    drop(server.join().unwrap());
    // Once that listener is gone, its name is unknown: a clear error that is not "unreachable".
    match endpoint::connect(&config, &name) {
        Err(EndpointError::Bootstrap(e)) => assert!(!e.is_unreachable(), "{e:?}"),
        other => panic!("expected an unknown name, got {other:?}"),
    }
    // A listener bound after the restart is found and connected to.
    let listener = Listener::bind(&config, &other).unwrap();
    let server = echo_server(listener, 1);
    let conn2 = endpoint::connect(&config, &other).unwrap();
    conn2.send(b"after restart").unwrap();
    assert_eq!(&*conn2.recv().unwrap(), b"after restart");
    server.join().unwrap();
    kill(m2);
}

#[test]
fn a_registration_registers_again_with_a_restarted_manager() {
    let addr = format!("127.0.0.1:{}", free_port());
    let m = manager(&addr);
    let name = format!("fault-mgr-reg-{}", std::process::id());
    let shm = ShmListener::bind(&name, Layout::default(), PollMode::Busy).unwrap();
    let info = EndpointInfo {
        name: EndpointName::new(name.clone()).unwrap(),
        host_id: HostId::local().unwrap(),
        transports: TransportSet::SHM,
        shm_socket: Some(shm.path().to_string_lossy().into_owned()),
    };
    let mut reg = Registration::new(addr.as_str(), token(), info.clone(), T).unwrap();
    assert!(reg.is_connected());
    kill(m);
    // The first use after the loss reports it, clearly.
    let e = reg.with_client(|c| c.ping()).unwrap_err();
    assert!(
        e.is_unreachable() || matches!(e, BootstrapError::Broken),
        "{e:?}"
    );
    assert!(!reg.is_connected());
    // While the manager is away, every use fails the same way, without hanging.
    assert!(reg.with_client(|c| c.ping()).unwrap_err().is_unreachable());
    let m2 = manager(&addr);
    // The next use registers again; lookups find the name once more.
    reg.with_client(|c| c.ping()).unwrap();
    let mut c = ManagerClient::connect(addr.as_str(), &token(), T).unwrap();
    assert_eq!(c.lookup(&info.name).unwrap(), info);
    kill(m2);
}

#[test]
fn standalone_manager_at_trace_level_never_logs_the_token() {
    let addr = format!("127.0.0.1:{}", free_port());
    let log_path = std::env::temp_dir().join(format!("rsmsg-mgr-trace-{}.log", std::process::id()));
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_rsmsg"))
        .args(["manager", "--listen", &addr])
        .env("RSMSG_TOKEN", SECRET)
        .env("RSMSG_LOG", "trace")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut up = None;
    for _ in 0..400 {
        if let Ok(c) = ManagerClient::connect(addr.as_str(), &token(), T) {
            up = Some(c);
            break;
        }
        thread::sleep(Duration::from_millis(25));
    }
    let mut c = up.expect("manager up");
    let wrong = "wrong-secret-for-the-log-test";
    assert!(ManagerClient::connect(addr.as_str(), &Token::new(wrong).unwrap(), T).is_err());
    let info = EndpointInfo {
        name: EndpointName::new("logged").unwrap(),
        host_id: HostId::new("h").unwrap(),
        transports: TransportSet::VERBS,
        shm_socket: None,
    };
    c.register(&info).unwrap();
    assert_eq!(c.lookup(&info.name).unwrap(), info);
    drop(c);
    thread::sleep(Duration::from_millis(200));
    child.kill().unwrap();
    child.wait().unwrap();
    let logs = std::fs::read_to_string(&log_path).unwrap();
    let _ = std::fs::remove_file(&log_path);
    // The log is real and detailed...
    assert!(logs.contains("client failed authentication"), "{logs}");
    assert!(logs.contains("TRACE") || logs.contains("DEBUG"), "{logs}");
    // ...and neither secret appears in it.
    assert!(!logs.contains(SECRET), "{logs}");
    assert!(!logs.contains(wrong), "{logs}");
}
