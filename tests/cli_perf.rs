//! `rsmsg perf` over shared memory (local mode: the binary spawns its own server process):
//! the JSON rows for lat, bw and rate, size sweeps, timed runs, the progress line, and the
//! refusal of option combinations that cannot work, and a quiet stop when stdout closes.

use std::process::{Command, Output};

use serde_json::Value;

fn perf(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rsmsg"))
        .arg("perf")
        .args(args)
        .env_remove("RSMSG_LOG")
        .env_remove("RSMSG_TRANSPORT")
        .env_remove("RSMSG_MANAGER")
        .env_remove("RSMSG_GROUPS")
        .env_remove("RSMSG_POLL")
        .output()
        .expect("run rsmsg perf")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn rows(args: &[&str]) -> Vec<Value> {
    let o = perf(args);
    assert!(
        o.status.success(),
        "rsmsg perf {args:?} failed: {}",
        text(&o.stderr)
    );
    let v: Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(&o.stdout)));
    v.as_array().expect("a list of rows").clone()
}

fn num(v: &Value, k: &str) -> f64 {
    v[k].as_f64()
        .unwrap_or_else(|| panic!("no number {k} in {v}"))
}

#[test]
fn lat_sweep_json() {
    let r = rows(&["--json", "-t", "lat", "-s", "8..512", "-n", "300"]);
    let sizes: Vec<u64> = r.iter().map(|x| x["size"].as_u64().unwrap()).collect();
    assert_eq!(sizes, [8, 32, 128, 512]);
    for x in &r {
        assert_eq!(x["test"], "lat");
        assert_eq!(x["transport"], "shm");
        assert_eq!(x["iterations"], 300);
        assert!(
            x.get("bw_mbps").is_none() && x.get("rate_mmps").is_none(),
            "{x}"
        );
        let l = &x["lat_us"];
        let (min, p50, avg, p99, p999, max) = (
            num(l, "min"),
            num(l, "p50"),
            num(l, "avg"),
            num(l, "p99"),
            num(l, "p999"),
            num(l, "max"),
        );
        assert!(min > 0.0, "{l}");
        assert!(
            min <= p50 && p50 <= p99 && p99 <= p999 && p999 <= max,
            "{l}"
        );
        assert!(min <= avg && avg <= max, "{l}");
    }
}

#[test]
fn max_bytes_lowers_large_sizes_only() {
    let r = rows(&[
        "--json",
        "-t",
        "bw",
        "-s",
        "64,4k,64k",
        "-n",
        "400",
        "--max-bytes",
        "256k",
    ]);
    let got: Vec<(u64, u64)> = r
        .iter()
        .map(|x| {
            (
                x["size"].as_u64().unwrap(),
                x["iterations"].as_u64().unwrap(),
            )
        })
        .collect();
    // 256 KiB / 64 B = 4096 > 400: unchanged; / 4 KiB = 64; / 64 KiB = 4, raised to the floor of 10.
    assert_eq!(got, [(64, 400), (4096, 64), (65536, 10)]);
}

#[test]
fn bw_and_rate_json() {
    let r = rows(&["--json", "-t", "bw", "-s", "64,4k,64k", "-n", "500"]);
    assert_eq!(r.len(), 3);
    for (x, size) in r.iter().zip([64u64, 4096, 65536]) {
        assert_eq!(x["test"], "bw");
        assert_eq!(x["size"], size);
        assert_eq!(x["iterations"], 500);
        assert!(x.get("lat_us").is_none());
        let (bw, rate) = (num(x, "bw_mbps"), num(x, "rate_mmps"));
        assert!(bw > 0.0 && rate > 0.0, "{x}");
        // Bandwidth is the message rate times the size (MB/s of 10^6 bytes, Mmsg/s).
        let expect = rate * size as f64;
        assert!((bw - expect).abs() <= expect * 1e-6, "{x}");
    }
    let r = rows(&["--json", "-t", "rate", "-n", "2000"]);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0]["test"], "rate");
    assert_eq!(r[0]["size"], 64, "rate defaults to 64 B");
    assert_eq!(r[0]["iterations"], 2000);
    assert!(num(&r[0], "rate_mmps") > 0.0);
}

#[test]
fn all_tests_table() {
    let o = perf(&["-n", "200"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    assert!(out.starts_with("# rsmsg perf: transport shm"), "{out}");
    assert!(
        out.contains("t_median") && out.contains("BW avg[MB/s]"),
        "{out}"
    );
    // Three tests, default sizes: lat 64, bw 64 KiB, rate 64.
    let data: Vec<Vec<&str>> = out
        .lines()
        .filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()))
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(data.len(), 3, "{out}");
    assert_eq!((data[0][0], data[0].len()), ("64", 8));
    assert_eq!((data[1][0], data[1].len()), ("65536", 4));
    assert_eq!((data[2][0], data[2].len()), ("64", 4));
    assert!(data.iter().all(|r| r[1] == "200"), "{out}");
    // No progress line when stderr is not a terminal.
    assert!(!text(&o.stderr).contains('\r'));
}

#[test]
fn timed_run_with_progress() {
    let o = perf(&["--json", "-t", "lat", "-D", "0.8", "--progress"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let it = v[0]["iterations"].as_u64().unwrap();
    assert!(it > 0);
    let err = text(&o.stderr);
    assert!(
        err.contains("lat 64 B: ") && err.contains("% of 0.8 s"),
        "{err:?}"
    );
    // Every progress update rewrites the line, and the last thing written erases it.
    assert!(err.ends_with("\r\x1b[K"), "{err:?}");
    assert!(!err.contains('\n'), "{err:?}");
}

#[test]
fn big_messages_go_by_rendezvous_or_fit_a_larger_layout() {
    // The default layout carries up to 256 KiB eagerly: 1 MiB goes by rendezvous, in both tests.
    for t in ["bw", "lat"] {
        let r = rows(&["--json", "-t", t, "-s", "1m", "-n", "10"]);
        assert_eq!(r[0]["size"], 1 << 20, "{t}");
        assert_eq!(r[0]["iterations"], 10, "{t}");
        let v = if t == "bw" {
            num(&r[0], "bw_mbps")
        } else {
            r[0]["lat_us"]["avg"].as_f64().unwrap()
        };
        assert!(v > 0.0, "{t}: {v}");
    }
    let r = rows(&[
        "--json",
        "-t",
        "bw",
        "-s",
        "1m",
        "-n",
        "10",
        "--groups",
        "4k:64:4,1m:8:2",
    ]);
    assert_eq!(r[0]["size"], 1 << 20);
}

/// Each refused combination: a non-zero exit and a message naming the problem.
#[test]
fn invalid_options_are_refused() {
    let cases: &[(&[&str], &str)] = &[
        (&["-n", "0"], "--iters must be at least 1"),
        (&["-n", "5", "-D", "1"], "cannot be used with"),
        (&["-D", "0"], "--duration must be"),
        (&["--max-bytes", "0"], "--max-bytes must be at least 1"),
        (&["--max-bytes", "lots"], "--max-bytes"),
        (&["--max-bytes", "1m", "-D", "1"], "cannot be used with"),
        (
            &["--server", "--max-bytes", "1m"],
            "--max-bytes is a client option",
        ),
        (&["-D=-1"], "--duration must be"),
        (&["-D", "nan"], "--duration must be"),
        (&["-s", "0"], "at least 1 byte"),
        (&["-s", "64,0"], "at least 1 byte"),
        (&["-s", "1k..8"], "bad sweep"),
        (&["-s", "12q"], "bad size"),
        (&["-t", "latency"], "invalid value 'latency'"),
        (&["--transport", "tcp"], "invalid value 'tcp'"),
        (&["--poll", "sometimes"], "--poll"),
        (&["--groups", "nonsense"], "--groups"),
        (&["--server", "--client"], "cannot be used with"),
        (&["--server", "--json"], "--json is a client option"),
        (&["--server", "-n", "10"], "--iters is a client option"),
        (&["--server", "-t", "lat"], "--test is a client option"),
        (&["--client", "--once"], "--once applies to --server only"),
        (&["--once"], "--once applies to --server only"),
        (
            &["--manager", "127.0.0.1:1"],
            "--manager applies to --transport verbs",
        ),
        (
            &["--transport", "verbs", "--manager", "127.0.0.1:1"],
            "the local mode runs its own private manager",
        ),
        (
            &["--name", "other"],
            "--name applies to --server and --client",
        ),
        (&["--client", "--name", "../x"], "--name"),
        (&["--bogus"], "unexpected argument '--bogus'"),
    ];
    for (args, want) in cases {
        let o = perf(args);
        let err = text(&o.stderr);
        assert!(!o.status.success(), "rsmsg perf {args:?} succeeded");
        assert!(
            err.contains(want),
            "rsmsg perf {args:?}: {want:?} not in {err:?}"
        );
        assert!(
            o.stdout.is_empty(),
            "rsmsg perf {args:?} printed {:?}",
            text(&o.stdout)
        );
    }
}

#[test]
fn client_without_server_fails_clearly() {
    let name = format!("rsmsg-cli-none-{}", std::process::id());
    let o = perf(&["--client", "--name", &name, "-n", "10"]);
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains(&format!("connecting to endpoint \"{name}\"")),
        "{}",
        text(&o.stderr)
    );
}

#[test]
fn a_closed_stdout_stops_the_run_quietly() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;

    // `rsmsg perf | head -2`: after the reader goes away, the next row cannot be written.
    let mut child = Command::new(env!("CARGO_BIN_EXE_rsmsg"))
        .args(["perf", "-t", "lat", "-s", "8..4k", "-n", "200"])
        .env_remove("RSMSG_LOG")
        .env_remove("RSMSG_TRANSPORT")
        .env_remove("RSMSG_MANAGER")
        .env_remove("RSMSG_GROUPS")
        .env_remove("RSMSG_POLL")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run rsmsg perf");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    assert!(first.starts_with("# rsmsg perf"), "{first}");
    drop(out);
    let o = child.wait_with_output().unwrap();
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(141), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.trim().is_empty(), "nothing on stderr: {err}");
}
