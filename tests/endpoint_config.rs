//! Configuration: every `RSMSG_*` value is validated, and errors name the variable.

use std::collections::HashMap;
use std::time::Duration;

use rsmsg::bootstrap::Token;
use rsmsg::endpoint::{Config, EndpointError, Listener, TransportChoice};
use rsmsg::transport::PollMode;
use rsmsg::verbs::{GidIndex, GidSelector};

fn vars(pairs: &[(&str, &str)]) -> Result<Config, EndpointError> {
    let m: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Config::from_vars(|k| m.get(k).cloned())
}

const TOKEN: (&str, &str) = ("RSMSG_TOKEN", "a-good-enough-secret");
const MANAGER: (&str, &str) = ("RSMSG_MANAGER", "127.0.0.1:7000");

/// The error must be a configuration error naming `var`.
fn fails_naming(pairs: &[(&str, &str)], var: &str) -> String {
    match vars(pairs) {
        Err(EndpointError::Config { name, reason }) => {
            assert_eq!(name, var, "{pairs:?}: wrong variable named ({reason})");
            let shown = EndpointError::Config { name, reason }.to_string();
            assert!(shown.contains(var), "{shown:?} should name {var}");
            shown
        }
        Err(e) => panic!("{pairs:?}: expected a configuration error, got {e}"),
        Ok(c) => panic!("{pairs:?}: accepted as {c:?}"),
    }
}

#[test]
fn every_variable_is_parsed() {
    let c = vars(&[
        ("RSMSG_TRANSPORT", "verbs"),
        MANAGER,
        TOKEN,
        ("RSMSG_GROUPS", "256:16:4,4k:8:2:2"),
        ("RSMSG_POLL", "adaptive:500"),
        ("RSMSG_DEVICE", "rxe0"),
        ("RSMSG_GID_INDEX", "3"),
        ("RSMSG_PORT", "2"),
        ("RSMSG_QP_TIMEOUT", "14"),
        ("RSMSG_STALL_TIMEOUT", "45"),
    ])
    .unwrap();
    assert_eq!(c.get_transport(), TransportChoice::Verbs);
    assert_eq!(c.get_manager(), Some("127.0.0.1:7000"));
    assert_eq!(c.get_layout().to_string(), "256:16:4,4096:8:2:2");
    assert_eq!(c.get_poll(), PollMode::Adaptive { spins: 500 });
    let v = c.get_verbs_options();
    assert_eq!(v.device.as_deref(), Some("rxe0"));
    assert!(matches!(v.gid, GidSelector::Index(GidIndex(3))));
    assert_eq!(v.port, 2);
    assert_eq!(v.params.timeout, 14);
    assert_eq!(v.stall_timeout, Duration::from_secs(45));
}

#[test]
fn unset_and_empty_variables_keep_the_defaults() {
    let c = vars(&[("RSMSG_TRANSPORT", " "), ("RSMSG_POLL", "")]).unwrap();
    assert_eq!(c.get_transport(), TransportChoice::Auto);
    assert_eq!(c.get_poll(), PollMode::Busy);
    assert_eq!(c.get_manager(), None);
    assert_eq!(c.get_layout(), Config::default().get_layout());
}

#[test]
fn each_bad_value_names_its_variable() {
    fails_naming(&[("RSMSG_TRANSPORT", "carrier-pigeon")], "RSMSG_TRANSPORT");
    fails_naming(&[("RSMSG_GROUPS", "nonsense")], "RSMSG_GROUPS");
    fails_naming(&[("RSMSG_GROUPS", "100:4:1")], "RSMSG_GROUPS");
    fails_naming(&[("RSMSG_POLL", "sometimes")], "RSMSG_POLL");
    fails_naming(&[("RSMSG_POLL", "adaptive:lots")], "RSMSG_POLL");
    fails_naming(&[("RSMSG_MANAGER", "no-port"), TOKEN], "RSMSG_MANAGER");
    fails_naming(&[("RSMSG_MANAGER", "host:99999"), TOKEN], "RSMSG_MANAGER");
    fails_naming(&[("RSMSG_MANAGER", ":7000"), TOKEN], "RSMSG_MANAGER");
    fails_naming(&[MANAGER, ("RSMSG_TOKEN", "short")], "RSMSG_TOKEN");
    fails_naming(&[("RSMSG_DEVICE", "rxe 0")], "RSMSG_DEVICE");
    fails_naming(&[("RSMSG_DEVICE", "../../etc")], "RSMSG_DEVICE");
    fails_naming(&[("RSMSG_GID_INDEX", "256")], "RSMSG_GID_INDEX");
    fails_naming(&[("RSMSG_GID_INDEX", "-1")], "RSMSG_GID_INDEX");
    fails_naming(&[("RSMSG_PORT", "0")], "RSMSG_PORT");
    fails_naming(&[("RSMSG_QP_TIMEOUT", "32")], "RSMSG_QP_TIMEOUT");
    fails_naming(&[("RSMSG_STALL_TIMEOUT", "0")], "RSMSG_STALL_TIMEOUT");
    fails_naming(&[("RSMSG_STALL_TIMEOUT", "86401")], "RSMSG_STALL_TIMEOUT");
    fails_naming(&[("RSMSG_STALL_TIMEOUT", "1.5")], "RSMSG_STALL_TIMEOUT");
}

#[test]
fn manager_addresses_are_used_as_checked() {
    // From the environment the value is trimmed, and the trimmed address is the one kept.
    let c = vars(&[("RSMSG_MANAGER", " 127.0.0.1:7000\n"), TOKEN]).unwrap();
    assert_eq!(c.get_manager(), Some("127.0.0.1:7000"));
    c.validate().unwrap();
    // Given to the builder, it is used as given: whitespace around it is refused rather than
    // kept in an address the resolver then fails on.
    let token = Token::new("a-good-enough-secret").unwrap();
    for addr in [
        " 127.0.0.1:7000",
        "127.0.0.1:7000 ",
        "127.0.0.1:7000\n",
        "\tlocalhost:1",
    ] {
        let c = Config::default().manager(addr, token.clone());
        match c.validate() {
            Err(EndpointError::Config { name, reason }) => {
                assert_eq!(name, "RSMSG_MANAGER");
                assert!(reason.contains("whitespace"), "{addr:?}: {reason}");
            }
            other => panic!("{addr:?}: {other:?}"),
        }
        assert!(
            matches!(
                Config::check_manager_addr(addr),
                Err(EndpointError::Config {
                    name: "RSMSG_MANAGER",
                    ..
                })
            ),
            "{addr:?}"
        );
    }
    for bad in ["", "host", "host:", "host:0", "ho st:1", ":1"] {
        assert!(Config::check_manager_addr(bad).is_err(), "{bad:?}");
    }
    for good in [
        "localhost:7000",
        "10.0.0.1:1",
        "node-3.example:65535",
        "[::1]:7000",
    ] {
        Config::check_manager_addr(good).unwrap();
    }
}

#[test]
fn rendezvous_variables_are_listed() {
    for v in [
        "RSMSG_RNDV_THRESHOLD",
        "RSMSG_RNDV_MAX",
        "RSMSG_RNDV_CACHE",
        "RSMSG_RNDV_SEND_CACHE",
        "RSMSG_RNDV_STREAM_ONLY",
    ] {
        assert!(
            Config::ENV_VARS.contains(&v),
            "{v} missing from Config::ENV_VARS"
        );
    }
}

#[test]
fn inconsistent_settings_name_the_missing_variable() {
    let why = fails_naming(&[MANAGER], "RSMSG_TOKEN");
    assert!(why.contains("RSMSG_MANAGER"), "{why}");
    let why = fails_naming(&[("RSMSG_TRANSPORT", "verbs")], "RSMSG_MANAGER");
    assert!(why.contains("verbs"), "{why}");
    // A token alone is fine (nothing uses it).
    vars(&[TOKEN]).unwrap();
}

#[test]
fn builder_configurations_are_validated_before_use() {
    let verbs_alone = Config::default().transport(TransportChoice::Verbs);
    match verbs_alone.validate() {
        Err(EndpointError::Config { name, .. }) => assert_eq!(name, "RSMSG_MANAGER"),
        other => panic!("{other:?}"),
    }
    match Listener::bind(&verbs_alone, "never-bound") {
        Err(EndpointError::Config { name, .. }) => assert_eq!(name, "RSMSG_MANAGER"),
        other => panic!("{other:?}"),
    }
    let token = Token::new("a-good-enough-secret").unwrap();
    let bad_addr = Config::default().manager("nowhere", token.clone());
    match rsmsg::connect(&bad_addr, "x") {
        Err(EndpointError::Config { name, .. }) => assert_eq!(name, "RSMSG_MANAGER"),
        other => panic!("{other:?}"),
    }
    let bad_device = Config::default().device("a b");
    match bad_device.validate() {
        Err(EndpointError::Config { name, .. }) => assert_eq!(name, "RSMSG_DEVICE"),
        other => panic!("{other:?}"),
    }
    let ok = Config::default()
        .manager("localhost:7000", token)
        .device("rxe0")
        .gid_index(1)
        .poll(PollMode::Event);
    ok.validate().unwrap();
}

#[test]
fn bad_endpoint_names_are_refused() {
    for name in ["", "has space", "slash/inside", &"x".repeat(65)] {
        match Listener::bind(&Config::default(), name) {
            Err(EndpointError::Config { name: what, .. }) => assert_eq!(what, "endpoint name"),
            other => panic!("{name:?}: {other:?}"),
        }
    }
}
