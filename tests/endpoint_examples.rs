//! The examples, run as their own processes over shared memory: `ping_pong` in one process
//! pair and in server/client roles through a bootstrap manager, `fan_in` with several client
//! processes. (`tests/guest/examples.sh` runs them over verbs.)

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::Once;

use rsmsg::Config;
use rsmsg::bootstrap::{Manager, Token};

/// The executable of example `name`, next to this test's directory (`cargo test` builds the
/// examples); built here when missing (e.g. `cargo test --test endpoint_examples`).
fn example(name: &str) -> PathBuf {
    static BUILD: Once = Once::new();
    let exe = std::env::current_exe().expect("test executable");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps")
        .join("examples");
    let path = dir.join(name);
    if !path.exists() {
        BUILD.call_once(|| {
            let st = Command::new(env!("CARGO"))
                .args(["build", "--examples"])
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .status()
                .expect("run cargo build --examples");
            assert!(st.success(), "cargo build --examples failed");
        });
    }
    assert!(path.exists(), "no example executable at {}", path.display());
    path
}

/// A command for example `name` with no `RSMSG_*` variable inherited.
fn command(name: &str) -> Command {
    let mut c = Command::new(example(name));
    for v in Config::ENV_VARS {
        c.env_remove(v);
    }
    c
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", std::process::id())
}

fn run(mut c: Command) -> (String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = c.output().expect("run the example");
    let (out, err) = (
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    );
    assert!(status.success(), "{status}\nstdout:\n{out}\nstderr:\n{err}");
    (out, err)
}

#[test]
fn ping_pong_in_one_process_pair_over_shared_memory() {
    let mut c = command("ping_pong");
    c.args(["both", &unique("ex-pp"), "--count", "500", "--size", "256"])
        .env("RSMSG_TRANSPORT", "shm");
    let (out, _) = run(c);
    assert!(
        out.contains("ping_pong: 500 round trips of 256 bytes over shm"),
        "{out}"
    );
    assert!(
        out.contains("sent 500 messages / 128000 bytes, received 500"),
        "{out}"
    );
    assert!(out.contains("ping_pong: ok"), "{out}");
    assert!(out.contains("left after 500 messages"), "{out}");
}

#[test]
fn ping_pong_roles_through_a_manager() {
    let token = "examples-test-secret";
    let manager = Manager::bind("127.0.0.1:0", Token::new(token).unwrap()).unwrap();
    let addr = manager.local_addr().to_string();
    let name = unique("ex-pp-mgr");
    let mut server = command("ping_pong");
    server
        .args(["server", &name, "--once"])
        .env("RSMSG_MANAGER", &addr)
        .env("RSMSG_TOKEN", token)
        .env("RSMSG_POLL", "adaptive:100")
        .stdout(Stdio::piped());
    let mut server = server.spawn().expect("start the server");
    let mut lines = BufReader::new(server.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), format!("listening {name}"));
    let mut client = command("ping_pong");
    client
        .args(["client", &name, "--count", "300", "--size", "4000"])
        .env("RSMSG_MANAGER", &addr)
        .env("RSMSG_TOKEN", token)
        .env("RSMSG_POLL", "event");
    let (out, _) = run(client);
    assert!(
        out.contains(&format!("300 round trips of 4000 bytes over shm to {name}")),
        "{out}"
    );
    assert!(out.contains("ping_pong: ok"), "{out}");
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(server.wait().unwrap().success(), "{rest:?}");
    assert!(
        rest.iter().any(|l| l.contains("left after 300 messages")),
        "{rest:?}"
    );
}

#[test]
fn fan_in_from_client_processes_over_shared_memory() {
    let mut c = command("fan_in");
    c.args([
        "both",
        &unique("ex-fan"),
        "--clients",
        "4",
        "--count",
        "250",
    ]);
    let (out, _) = run(c);
    assert!(
        out.contains("fan_in: 4 clients x 250 messages verified"),
        "{out}"
    );
    for k in 0..4 {
        let line = format!("client {k} sent 250 messages");
        let hits: Vec<&str> = out.lines().filter(|l| l.contains(&line)).collect();
        assert_eq!(hits.len(), 1, "{line}: {out}");
        assert!(hits[0].contains(", shm)"), "{}", hits[0]);
    }
    assert!(out.contains("fan_in: ok"), "{out}");
}

#[test]
fn a_bad_variable_stops_an_example_with_its_name() {
    let mut c = command("ping_pong");
    c.args(["both", &unique("ex-bad")])
        .env("RSMSG_POLL", "sometimes");
    let out = c.output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("RSMSG_POLL"), "{err}");
}
