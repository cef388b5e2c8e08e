//! Variables read from the process environment: a malformed value is an error that names it,
//! up front where the settings are read and again where a connection set-up reads them; never
//! a silent fallback to the defaults, never a panic or an abort.
//!
//! Each case runs in a child process (this test binary run again, selected by an environment
//! variable) with its own environment, so that no test changes the environment of another.

use std::ffi::{CStr, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::process::Command;
use std::thread;

use rsmsg::bootstrap::{LaunchError, LaunchInfo};
use rsmsg::capi::*;
use rsmsg::core::{Layout, RndvConfig, RndvConfigError};
use rsmsg::endpoint::{Config, EndpointError, Listener, TransportChoice};
use rsmsg::mesh::{Mesh, MeshError, MeshSetup};
use rsmsg::transport::shm::{ShmListener, connect_path};
use rsmsg::transport::{PollMode, TransportError};

/// Names the case a child process runs.
const ROLE: &str = "RSMSG_ENV_PROCESS_ROLE";
/// The parent's socket path, for a child that connects to it.
const PEER: &str = "RSMSG_ENV_PROCESS_PEER";

/// Variables a child must not inherit from whoever runs the tests.
const INHERITED: [&str; 14] = [
    "RSMSG_JOB",
    "RSMSG_MESH_TIMEOUT",
    "RSMSG_EMBED_MANAGER",
    "RSMSG_TOKEN_FILE",
    "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_SIZE",
    "PMI_RANK",
    "PMI_SIZE",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "PMIX_NAMESPACE",
    "OMPI_MCA_ess_base_jobid",
    "SLURM_JOB_ID",
    "SLURM_STEP_ID",
];

/// Whether this process is a child running test `test` (role `TEST` or `TEST/CASE`).
fn is_child(test: &str) -> bool {
    std::env::var(ROLE).is_ok_and(|r| r.split('/').next() == Some(test))
}

/// Runs `role` (`TEST` or `TEST/CASE`, `TEST` being the test function) in a child process with
/// `env` added to a clean environment, and checks that it ran and passed.
fn run_child(role: &str, env: &[(&str, &[u8])]) {
    assert!(
        std::env::var_os(ROLE).is_none(),
        "a child process does not start children of its own"
    );
    let test = role.split('/').next().expect("split yields one part");
    let mut c = Command::new(std::env::current_exe().expect("the test binary"));
    c.args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(ROLE, role);
    for v in Config::ENV_VARS.iter().chain(&INHERITED) {
        c.env_remove(v);
    }
    for (k, v) in env {
        c.env(k, OsStr::from_bytes(v));
    }
    let out = c.output().expect("run the child");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "child {role} failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
}

fn last_error() -> String {
    // SAFETY: rsmsg_last_error returns a NUL-terminated string valid until the next failing
    // call on this thread; it is copied at once.
    unsafe { CStr::from_ptr(rsmsg_last_error()) }
        .to_string_lossy()
        .into_owned()
}

fn sock_path(tag: &str) -> PathBuf {
    std::env::temp_dir()
        .join(format!("rsmsg-env-process-{}", std::process::id()))
        .join(format!("{tag}.sock"))
}

fn unique(tag: &str) -> String {
    format!("envp-{tag}-{}", std::process::id())
}

/// The error must be a configuration error naming `var`.
fn names(r: Result<impl std::fmt::Debug, EndpointError>, var: &str) {
    match r {
        Err(EndpointError::Config { name, reason }) => {
            assert_eq!(name, var, "{reason}");
        }
        other => panic!("expected a configuration error naming {var}, got {other:?}"),
    }
}

#[test]
fn malformed_rendezvous_values_are_configuration_errors() {
    const ME: &str = "malformed_rendezvous_values_are_configuration_errors";
    if !is_child(ME) {
        run_child(
            ME,
            &[
                ("RSMSG_RNDV_MAX", b"512MB"),
                ("RSMSG_RNDV_STREAM_ONLY", b"1"),
            ],
        );
        return;
    }
    match RndvConfig::from_env() {
        Err(e @ RndvConfigError::Parse { .. }) => assert_eq!(e.var(), "RSMSG_RNDV_MAX"),
        other => panic!("{other:?}"),
    }
    names(Config::from_env(), "RSMSG_RNDV_MAX");
    let shown = Config::from_env().unwrap_err().to_string();
    assert!(shown.contains("512MB"), "{shown}");
    // A configuration built without the environment is checked against it before use: every
    // connection would read these variables.
    names(Config::default().validate(), "RSMSG_RNDV_MAX");
    let shm = Config::default().transport(TransportChoice::Shm);
    names(Listener::bind(&shm, &unique("bind")), "RSMSG_RNDV_MAX");
    names(rsmsg::connect(&shm, &unique("nobody")), "RSMSG_RNDV_MAX");
    // The C API says so with its configuration code.
    let mut cfg = rsmsg_config { id: 0 };
    assert_eq!(rsmsg_config_from_env(&mut cfg), RSMSG_ERR_CONFIG);
    assert!(last_error().contains("RSMSG_RNDV_MAX"), "{}", last_error());
    assert_eq!(cfg.id, 0);
    assert_eq!(rsmsg_config_new(&mut cfg), RSMSG_OK);
    let name = std::ffi::CString::new(unique("c-bind")).unwrap();
    let mut l = rsmsg_listener { id: 0 };
    assert_eq!(rsmsg_listen(cfg, name.as_ptr(), &mut l), RSMSG_ERR_CONFIG);
    assert!(last_error().contains("RSMSG_RNDV_MAX"), "{}", last_error());
    assert_eq!(rsmsg_config_free(cfg), RSMSG_OK);
}

#[test]
fn shm_set_up_fails_on_a_malformed_rendezvous_value() {
    const ME: &str = "shm_set_up_fails_on_a_malformed_rendezvous_value";
    if !is_child(ME) {
        // The parent listens with a clean environment; the child connects with a bad one.
        let path = sock_path("parent");
        let listener = ShmListener::bind_path(&path, Layout::default(), PollMode::Busy)
            .expect("bind the parent's listener");
        run_child(
            ME,
            &[
                ("RSMSG_RNDV_CACHE", b"lots"),
                (PEER, path.as_os_str().as_bytes()),
            ],
        );
        // The child gave up during the handshake: this side gets an error, not a connection.
        assert!(listener.accept().is_err());
        return;
    }
    let is_named = |r: Result<_, TransportError>| match r {
        Err(TransportError::Config(e)) => {
            assert_eq!(e.var(), "RSMSG_RNDV_CACHE");
            let shown = TransportError::Config(e).to_string();
            assert!(shown.contains("RSMSG_RNDV_CACHE"), "{shown}");
        }
        Err(e) => panic!("expected a configuration error, got {e}"),
        Ok(_) => panic!("connected with a malformed RSMSG_RNDV_CACHE"),
    };
    // Connecting side.
    let peer = PathBuf::from(std::env::var_os(PEER).expect("the parent's socket"));
    is_named(connect_path(&peer, Layout::default(), PollMode::Busy));
    // Accepting side (the connector, in the same environment, fails as well).
    let path = sock_path("child");
    let listener = ShmListener::bind_path(&path, Layout::default(), PollMode::Busy)
        .expect("bind the child's listener");
    let p = path.clone();
    let connector = thread::spawn(move || connect_path(&p, Layout::default(), PollMode::Busy));
    is_named(listener.accept());
    assert!(connector.join().expect("connector thread").is_err());
}

#[test]
fn empty_rendezvous_values_keep_the_default_and_the_others_apply() {
    const ME: &str = "empty_rendezvous_values_keep_the_default_and_the_others_apply";
    if !is_child(ME) {
        run_child(
            ME,
            &[
                ("RSMSG_RNDV_THRESHOLD", b""),
                ("RSMSG_RNDV_SEND_CACHE", b" "),
                ("RSMSG_RNDV_MAX", b"4m"),
                ("RSMSG_RNDV_STREAM_ONLY", b"1"),
            ],
        );
        return;
    }
    let want = RndvConfig {
        threshold: None,
        max_recv: 4 << 20,
        stream_only: true,
        ..RndvConfig::default()
    };
    assert_eq!(RndvConfig::from_env().unwrap(), want);
    Config::from_env().unwrap();
    // Both ends of a connection made in this environment use it.
    let path = sock_path("empty");
    let listener = ShmListener::bind_path(&path, Layout::default(), PollMode::Busy).expect("bind");
    let p = path.clone();
    let connector = thread::spawn(move || connect_path(&p, Layout::default(), PollMode::Busy));
    let a = listener.accept().expect("accept");
    let b = connector
        .join()
        .expect("connector thread")
        .expect("connect");
    for c in [&a, &b] {
        assert_eq!(c.rndv_config(), want);
        // Each side said it would not read the other: both stream.
        assert!(!c.rndv_peer_can_read());
    }
}

#[test]
fn values_that_are_not_utf8_are_refused() {
    const ME: &str = "values_that_are_not_utf8_are_refused";
    const NOT_UTF8: &[u8] = b"\xff\xfe";
    if !is_child(ME) {
        run_child(
            &format!("{ME}/rndv"),
            &[("RSMSG_RNDV_SEND_CACHE", NOT_UTF8)],
        );
        run_child(&format!("{ME}/job"), &[("RSMSG_JOB", NOT_UTF8)]);
        run_child(
            &format!("{ME}/timeout"),
            &[("RSMSG_MESH_TIMEOUT", NOT_UTF8)],
        );
        run_child(
            &format!("{ME}/launcher"),
            &[("PMI_RANK", b"0"), ("PMI_SIZE", NOT_UTF8)],
        );
        return;
    }
    let role = std::env::var(ROLE).unwrap();
    match role.rsplit('/').next().unwrap() {
        "rndv" => {
            assert_eq!(
                RndvConfig::from_env(),
                Err(RndvConfigError::NotUnicode {
                    var: "RSMSG_RNDV_SEND_CACHE"
                })
            );
            names(Config::from_env(), "RSMSG_RNDV_SEND_CACHE");
            names(Config::default().validate(), "RSMSG_RNDV_SEND_CACHE");
        }
        case @ ("job" | "timeout") => {
            let var = if case == "job" {
                "RSMSG_JOB"
            } else {
                "RSMSG_MESH_TIMEOUT"
            };
            match MeshSetup::from_env() {
                Err(MeshError::Config { name, reason }) => {
                    assert_eq!(name, var);
                    assert!(reason.contains("UTF-8"), "{reason}");
                }
                other => panic!("{other:?}"),
            }
        }
        "launcher" => {
            assert_eq!(
                LaunchInfo::from_env(),
                Err(LaunchError::NotUnicode { var: "PMI_SIZE" })
            );
            let (mut r, mut s) = (7u32, 7u32);
            assert_eq!(rsmsg_launch_info(&mut r, &mut s), RSMSG_ERR_LAUNCH);
            assert!(last_error().contains("PMI_SIZE"), "{}", last_error());
            assert_eq!((r, s), (7, 7));
        }
        other => panic!("unknown case {other}"),
    }
}

#[test]
fn launcher_sizes_and_timeouts_out_of_range_are_errors_not_aborts() {
    const ME: &str = "launcher_sizes_and_timeouts_out_of_range_are_errors_not_aborts";
    if !is_child(ME) {
        run_child(
            &format!("{ME}/size"),
            &[("PMI_RANK", b"0"), ("PMI_SIZE", b"4294967295")],
        );
        run_child(
            &format!("{ME}/timeout"),
            &[
                ("PMI_RANK", b"0"),
                ("PMI_SIZE", b"1"),
                ("RSMSG_MESH_TIMEOUT", b"18446744073709551615"),
                ("RSMSG_JOB", b"envp-timeout"),
            ],
        );
        return;
    }
    let role = std::env::var(ROLE).unwrap();
    let mut cfg = rsmsg_config { id: 0 };
    assert_eq!(rsmsg_config_new(&mut cfg), RSMSG_OK);
    let mut m = rsmsg_mesh { id: 0 };
    match role.rsplit('/').next().unwrap() {
        "size" => {
            let e = LaunchInfo::from_env().unwrap_err();
            assert_eq!(
                e,
                LaunchError::TooLarge {
                    var: "PMI_SIZE",
                    size: u32::MAX,
                    max: LaunchInfo::MAX_SIZE
                }
            );
            match Mesh::from_env() {
                Err(MeshError::Launch(LaunchError::TooLarge { .. })) => {}
                other => panic!("{other:?}"),
            }
            let (mut r, mut s) = (7u32, 7u32);
            assert_eq!(rsmsg_launch_info(&mut r, &mut s), RSMSG_ERR_LAUNCH);
            assert!(last_error().contains("PMI_SIZE"), "{}", last_error());
            assert_eq!(rsmsg_mesh_init(cfg, &mut m), RSMSG_ERR_LAUNCH);
            assert!(last_error().contains("PMI_SIZE"), "{}", last_error());
        }
        "timeout" => {
            match Mesh::from_env() {
                Err(MeshError::Config { name, .. }) => assert_eq!(name, "RSMSG_MESH_TIMEOUT"),
                other => panic!("{other:?}"),
            }
            assert_eq!(rsmsg_mesh_init(cfg, &mut m), RSMSG_ERR_CONFIG);
            assert!(
                last_error().contains("RSMSG_MESH_TIMEOUT"),
                "{}",
                last_error()
            );
        }
        other => panic!("unknown case {other}"),
    }
    assert_eq!(m.id, 0);
    assert_eq!(rsmsg_config_free(cfg), RSMSG_OK);
}
