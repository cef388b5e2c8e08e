//! Endpoints by name: through the bootstrap manager, peers on one host get shared memory.

use std::thread;

use rsmsg::bootstrap::{Manager, Token};
use rsmsg::endpoint::{self, Config, EndpointError, Listener, TransportChoice};

fn token() -> Token {
    Token::new(b"endpoint-test-secret".to_vec()).unwrap()
}

#[test]
fn connect_by_name_through_the_manager_picks_shared_memory() {
    let manager = Manager::bind("127.0.0.1:0", token()).unwrap();
    let addr = manager.local_addr().to_string();
    let config = Config::default().manager(addr.clone(), token());
    let name = format!("ep-mgr-{}", std::process::id());
    let listener = Listener::bind(&config, &name).unwrap();
    let server = thread::spawn(move || {
        let conn = listener.accept().unwrap();
        for _ in 0..100 {
            let m = conn.recv().unwrap();
            let reply: Vec<u8> = m.iter().rev().copied().collect();
            drop(m);
            conn.send(&reply).unwrap();
        }
    });
    let conn = endpoint::connect(&config, &name).unwrap();
    for i in 0..100u32 {
        let msg = format!("message {i} through a name");
        conn.send(msg.as_bytes()).unwrap();
        let back = conn.recv().unwrap();
        let expect: Vec<u8> = msg.bytes().rev().collect();
        assert_eq!(&*back, &expect[..]);
    }
    server.join().unwrap();
}

#[test]
fn unknown_name_and_wrong_token_are_clear_errors() {
    let manager = Manager::bind("127.0.0.1:0", token()).unwrap();
    let addr = manager.local_addr().to_string();
    let config = Config::default().manager(addr.clone(), token());
    let err = endpoint::connect(&config, "nobody-by-this-name").unwrap_err();
    assert!(matches!(err, EndpointError::Bootstrap(_)), "{err}");
    let stranger = Config::default().manager(addr, Token::new(b"not-the-secret".to_vec()).unwrap());
    let err = endpoint::connect(&stranger, "anything").unwrap_err();
    assert!(matches!(err, EndpointError::Bootstrap(_)), "{err}");
}

#[test]
fn without_a_manager_names_are_local_and_verbs_is_refused() {
    let config = Config::default();
    let name = format!("ep-local-{}", std::process::id());
    let listener = Listener::bind(&config, &name).unwrap();
    let server = thread::spawn(move || {
        let conn = listener.accept().unwrap();
        let m = conn.recv().unwrap();
        assert_eq!(&*m, b"local");
    });
    let conn = endpoint::connect(&config, &name).unwrap();
    conn.send(b"local").unwrap();
    server.join().unwrap();
    let verbs = Config::default().transport(TransportChoice::Verbs);
    assert!(matches!(
        endpoint::connect(&verbs, "x"),
        Err(EndpointError::Config { .. })
    ));
}
