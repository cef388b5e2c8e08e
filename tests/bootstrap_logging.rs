//! The token never appears in the manager's or the client's logs, at any level.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rsmsg::bootstrap::{
    Descriptors, EndpointInfo, EndpointName, HostId, Manager, ManagerClient, Side, Token,
    TransportSet,
};

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn token_never_logged() {
    let captured = Captured::default();
    let sink = captured.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || sink.clone())
        .init();

    let secret = "s3cr3t-token-value-XYZ";
    let wrong = "wrong-token-value-QWE";
    let token = Token::new(secret).unwrap();
    let m = Manager::bind("127.0.0.1:0", token.clone()).unwrap();
    let t = Duration::from_secs(10);
    let info = |n: &str| EndpointInfo {
        name: EndpointName::new(n).unwrap(),
        host_id: HostId::new("h").unwrap(),
        transports: TransportSet::VERBS,
        shm_socket: None,
    };

    let e = ManagerClient::connect(m.local_addr(), &Token::new(wrong).unwrap(), t).unwrap_err();
    let shown = format!("{e} {e:?}");
    assert!(!shown.contains(wrong));

    let mut b = ManagerClient::connect(m.local_addr(), &token, t).unwrap();
    b.register(&info("b")).unwrap();
    let mut a = ManagerClient::connect(m.local_addr(), &token, t).unwrap();
    let id = a
        .connect_to(&info("a"), &info("b").name, &Descriptors::default())
        .unwrap();
    let inc = b.wait_connect(&info("b").name, t).unwrap().unwrap();
    b.close(inc.id, Side::Listener, "rejected").unwrap();
    assert!(a.recv(id, Side::Initiator, t).is_err());
    drop((a, b));
    m.shutdown();

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    // The capture works: the manager's events are there...
    assert!(logs.contains("bootstrap manager listening"), "{logs}");
    assert!(logs.contains("client failed authentication"), "{logs}");
    assert!(logs.contains("registered"), "{logs}");
    // ...but neither token is.
    assert!(!logs.contains(secret), "{logs}");
    assert!(!logs.contains(wrong), "{logs}");
}
