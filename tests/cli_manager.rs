//! `rsmsg manager`: the token comes from RSMSG_TOKEN or a file and is never logged; the listening
//! address is logged at `--log info`; a missing or short token is refused.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::process::{Command, Stdio};

const SECRET: &str = "cli-manager-test-secret-1234";

fn manager(extra: &[&str], token_env: Option<&str>) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rsmsg"));
    c.args(["manager", "--listen", "127.0.0.1:0"])
        .args(extra)
        .env_remove("RSMSG_LOG")
        .env_remove("RSMSG_TOKEN");
    if let Some(t) = token_env {
        c.env("RSMSG_TOKEN", t);
    }
    c
}

/// Starts the manager, waits for its "listening" log line, connects once, stops it, and returns
/// everything it wrote on stderr.
fn run_and_stop(mut cmd: Command) -> String {
    let mut child = cmd
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    let mut line = String::new();
    loop {
        line.clear();
        if err.read_line(&mut line).expect("read stderr") == 0 {
            panic!("manager exited before listening: {seen}");
        }
        seen.push_str(&line);
        if line.contains("bootstrap manager listening") {
            break;
        }
    }
    let addr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("addr="))
        .expect("addr= in the listening line")
        .to_string();
    TcpStream::connect(&addr).expect("the manager accepts connections");
    child.kill().unwrap();
    child.wait().unwrap();
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut err, &mut rest);
    seen + &rest
}

#[test]
fn token_from_env_is_not_logged() {
    let log = run_and_stop(manager(&["--log", "trace"], Some(SECRET)));
    assert!(log.contains("bootstrap manager listening"), "{log}");
    assert!(!log.contains(SECRET), "the token appears in the log: {log}");
}

#[test]
fn token_from_file_is_not_logged() {
    let path = std::env::temp_dir().join(format!("rsmsg-cli-manager-{}.token", std::process::id()));
    std::fs::write(&path, SECRET).unwrap();
    let log = run_and_stop(manager(
        &["--log", "debug", "--token-file", path.to_str().unwrap()],
        None,
    ));
    std::fs::remove_file(&path).unwrap();
    assert!(!log.contains(SECRET), "{log}");
}

#[test]
fn missing_or_short_token_is_refused() {
    let o = manager(&[], None).output().unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("manager configuration"), "{err}");
    assert!(err.contains("RSMSG_TOKEN"), "{err}");
    let o = manager(&[], Some("short")).output().unwrap();
    assert!(!o.status.success());
    assert!(
        !String::from_utf8_lossy(&o.stderr).contains("short\""),
        "the token is echoed"
    );
    let o = manager(&["--token-file", "/nonexistent/token"], None)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent/token"));
}

#[test]
fn max_clients_is_applied_and_out_of_range_limits_are_refused() {
    use rsmsg::bootstrap::{ErrorCode, ManagerClient, Token};
    use std::time::Duration;

    let mut child = manager(
        &[
            "--log",
            "info",
            "--max-clients",
            "1",
            "--max-endpoints",
            "7",
        ],
        Some(SECRET),
    )
    .stderr(Stdio::piped())
    .stdout(Stdio::null())
    .spawn()
    .expect("spawn");
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    let mut line = String::new();
    loop {
        line.clear();
        if err.read_line(&mut line).expect("read stderr") == 0 {
            panic!("manager exited before listening: {seen}");
        }
        seen.push_str(&line);
        if line.contains("bootstrap manager listening") {
            break;
        }
    }
    assert!(
        seen.contains("max_clients=1") && seen.contains("max_endpoints=7"),
        "{seen}"
    );
    let addr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("addr="))
        .expect("addr= in the listening line")
        .to_string();
    let token = Token::new(SECRET).unwrap();
    let first = ManagerClient::connect(addr.as_str(), &token, Duration::from_secs(30))
        .expect("the first client is served");
    match ManagerClient::connect(addr.as_str(), &token, Duration::from_secs(30)) {
        Err(e) => assert_eq!(e.code(), Some(ErrorCode::Busy), "{e}"),
        Ok(_) => panic!("a second client was served with --max-clients 1"),
    }
    drop(first);
    child.kill().unwrap();
    child.wait().unwrap();

    for bad in [
        ["--max-clients", "0"],
        ["--max-clients", "65537"],
        ["--max-endpoints", "0"],
    ] {
        let o = manager(&bad, Some(SECRET)).output().unwrap();
        assert!(!o.status.success(), "{bad:?} accepted");
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains(bad[0]), "{bad:?}: {e}");
    }
}
