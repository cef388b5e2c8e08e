//! `rsmsg manager`: the token comes from RSMSG_TOKEN or a file and is never logged; the listening
//! address is logged at `--log info`; a missing or short token is refused; limits from the command
//! line; a closed stderr does not stop it.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::process::{Child, ChildStderr, Command, Stdio};

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

/// A manager started and listening: the process, the rest of its stderr, what it wrote up to
/// its "listening" line, and the address from that line.
struct Started {
    child: Child,
    err: BufReader<ChildStderr>,
    seen: String,
    addr: String,
}

fn start(mut cmd: Command) -> Started {
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
    Started {
        child,
        err,
        seen,
        addr,
    }
}

/// Starts the manager, waits for its "listening" log line, connects once, stops it, and returns
/// everything it wrote on stderr.
fn run_and_stop(cmd: Command) -> String {
    let Started {
        mut child,
        mut err,
        seen,
        addr,
    } = start(cmd);
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

    // `_err` keeps the manager's stderr open while it runs.
    let Started {
        mut child,
        err: _err,
        seen,
        addr,
    } = start(manager(
        &[
            "--log",
            "info",
            "--max-clients",
            "1",
            "--max-endpoints",
            "7",
        ],
        Some(SECRET),
    ));
    assert!(
        seen.contains("max_clients=1") && seen.contains("max_endpoints=7"),
        "{seen}"
    );
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

#[test]
fn a_manager_whose_stderr_closes_keeps_serving() {
    use rsmsg::bootstrap::{EndpointName, ErrorCode, ManagerClient, Token};
    use std::time::Duration;

    // A manager started in the background whose log reader goes away (a closed terminal, a
    // pipe into a log collector that died): every later log line fails to write, and it must
    // still serve.
    let Started {
        mut child,
        err,
        addr,
        ..
    } = start(manager(&["--log", "debug"], Some(SECRET)));
    drop(err);
    let token = Token::new(SECRET).unwrap();
    for _ in 0..3 {
        let c = ManagerClient::connect(addr.as_str(), &token, Duration::from_secs(10));
        let mut c = c.unwrap_or_else(|e| panic!("the manager stopped serving: {e}"));
        // A request, which the manager logs at debug: an unknown name is an answer too.
        let name = EndpointName::new("nobody-here").unwrap();
        let e = c.lookup(&name).expect_err("nobody registered that name");
        assert_eq!(e.code(), Some(ErrorCode::UnknownName), "{e}");
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "the manager exited when its stderr closed"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}
