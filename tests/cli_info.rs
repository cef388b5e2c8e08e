//! `rsmsg info` on this host: the transports report, as text and JSON, and logging control.
//! On a host without RDMA (the usual build machine) verbs must be reported unusable with a reason
//! and shared memory usable; with a device, verbs is usable only if some port is ACTIVE.

use std::process::{Command, Output};

use serde_json::Value;

fn rsmsg(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rsmsg"))
        .args(args)
        .env_remove("RSMSG_LOG")
        .env_remove("RSMSG_DEVICE")
        .output()
        .expect("run rsmsg")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn has_rdma() -> bool {
    std::path::Path::new("/sys/class/infiniband")
        .read_dir()
        .is_ok_and(|mut d| d.next().is_some())
}

#[test]
fn info_json_reports_transports() {
    let o = rsmsg(&["info", "--json"]);
    assert!(
        o.status.success(),
        "rsmsg info --json failed: {}",
        text(&o.stderr)
    );
    let v: Value = serde_json::from_slice(&o.stdout).expect("info --json is JSON");
    let shm = &v["transports"]["shm"];
    assert_eq!(shm["usable"], Value::Bool(true), "shm unusable: {shm}");
    assert!(
        shm["reason"].as_str().is_some_and(|r| r.contains("memfd")),
        "{shm}"
    );
    let verbs = &v["transports"]["verbs"];
    let devices = v["devices"].as_array().expect("devices is a list");
    let any_active = devices.iter().any(|d| {
        d["ports"]
            .as_array()
            .is_some_and(|ps| ps.iter().any(|p| p["state"] == "PORT_ACTIVE"))
    });
    assert_eq!(verbs["usable"], Value::Bool(any_active), "{verbs}");
    let reason = verbs["reason"].as_str().expect("verbs reason");
    if !has_rdma() {
        assert!(devices.is_empty());
        assert!(reason.starts_with("no RDMA devices"), "{reason}");
        assert!(v["devices_error"].is_string() || reason == "no RDMA devices");
    } else if any_active {
        assert!(reason.starts_with("ACTIVE: "), "{reason}");
    }
}

#[test]
fn info_text_reports_transports() {
    let o = rsmsg(&["info"]);
    assert!(o.status.success(), "rsmsg info failed: {}", text(&o.stderr));
    let out = text(&o.stdout);
    let line = |name: &str| {
        out.lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no {name} line in:\n{out}"))
            .to_string()
    };
    assert!(out.starts_with("transports\n"), "{out}");
    assert_eq!(
        line("shm").split_whitespace().nth(1),
        Some("usable"),
        "{out}"
    );
    if !has_rdma() {
        assert_eq!(
            line("verbs").split_whitespace().nth(1),
            Some("unusable"),
            "{out}"
        );
        assert!(out.contains("no RDMA devices"), "{out}");
    }
}

#[test]
fn info_unknown_device_is_an_error() {
    let o = rsmsg(&["info", "-d", "no-such-device"]);
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("no RDMA device named \"no-such-device\""),
        "{}",
        text(&o.stderr)
    );
}

#[test]
fn info_unusable_socket_dir_is_reported() {
    // A socket directory below a regular file cannot be created: shm must say so, not fail.
    let dir = std::env::temp_dir().join(format!("rsmsg-cli-info-{}", std::process::id()));
    std::fs::write(&dir, b"not a directory").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_rsmsg"))
        .args(["info", "--json"])
        .env("RSMSG_SHM_DIR", dir.join("sub"))
        .output()
        .unwrap();
    std::fs::remove_file(&dir).unwrap();
    assert!(o.status.success(), "{}", text(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let shm = &v["transports"]["shm"];
    assert_eq!(shm["usable"], Value::Bool(false), "{shm}");
    assert!(
        shm["reason"].as_str().unwrap().contains("RSMSG_SHM_DIR"),
        "{shm}"
    );
}

#[test]
fn log_filter_controls_stderr() {
    // Default (warn): the debug event of `info` does not show; --log debug shows it; RSMSG_LOG too.
    let quiet = rsmsg(&["info"]);
    assert!(
        !text(&quiet.stderr).contains("RDMA device list"),
        "{}",
        text(&quiet.stderr)
    );
    let loud = rsmsg(&["--log", "debug", "info"]);
    let err = text(&loud.stderr);
    assert!(
        err.contains("DEBUG") && err.contains("RDMA device list"),
        "{err}"
    );
    // Global option: also accepted after the subcommand.
    let after = rsmsg(&["info", "--log", "rsmsg=debug"]);
    assert!(text(&after.stderr).contains("RDMA device list"));
    let env = Command::new(env!("CARGO_BIN_EXE_rsmsg"))
        .arg("info")
        .env("RSMSG_LOG", "debug")
        .output()
        .unwrap();
    assert!(text(&env.stderr).contains("RDMA device list"));
    // Logs never go to stdout.
    assert!(!text(&loud.stdout).contains("DEBUG"));
    // --log wins over RSMSG_LOG.
    let both = Command::new(env!("CARGO_BIN_EXE_rsmsg"))
        .args(["--log", "error", "info"])
        .env("RSMSG_LOG", "debug")
        .output()
        .unwrap();
    assert!(!text(&both.stderr).contains("RDMA device list"));
}

#[test]
fn bad_log_filter_is_refused() {
    let o = rsmsg(&["--log", "rsmsg=loud[", "info"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o.stderr).contains("bad log filter"),
        "{}",
        text(&o.stderr)
    );
    assert!(o.stdout.is_empty());
}
