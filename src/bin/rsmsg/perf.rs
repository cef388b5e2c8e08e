//! `rsmsg perf`: latency, bandwidth and message-rate runs, perftest style.
//!
//! Modes: local (default: spawns a server process on this host and runs as its client; over
//! verbs it also embeds a bootstrap manager for the two), `--server` (listens under `--name`),
//! `--client` (connects to `--name`). Over verbs, `--server` and `--client` meet through the
//! manager at `--manager` (or `$RSMSG_MANAGER`), authenticating with `$RSMSG_TOKEN`.
//! The client drives the run: before each test it sends a plan message (test, size,
//! iterations) and the server follows it.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;
use rsmsg::bootstrap::{DEFAULT_PORT, Manager, Token};
use rsmsg::core::Layout;
use rsmsg::transport::shm::{self, ShmListener};
use rsmsg::transport::verbs::{self as vt, VerbsListener, VerbsOptions};
use rsmsg::transport::{Connection, Link, PollMode, TargetMemory};
use serde::Serialize;

/// Arguments of `rsmsg perf`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Tests to run: lat (ping-pong), bw (one-way stream), rate (small-message stream), or all.
    #[arg(short, long, default_value = "all", value_parser = ["lat", "bw", "rate", "all"])]
    test: String,
    /// Message sizes: a list (`8,64,4k`) or a sweep `MIN..MAX` in powers of 4 (`8..1m`).
    /// Default: 64 B for lat and rate, 64 KiB for bw.
    #[arg(short, long)]
    size: Option<String>,
    /// Iterations per size (messages for bw and rate, round trips for lat).
    #[arg(short = 'n', long, conflicts_with = "duration")]
    iters: Option<u64>,
    /// Fewer iterations for large sizes: at most this many bytes per size and direction
    /// (`iterations x size`, e.g. `64m`), but at least 10 iterations.
    #[arg(long, value_name = "BYTES", conflicts_with = "duration")]
    max_bytes: Option<String>,
    /// Run each size for this many seconds instead of a fixed iteration count.
    #[arg(short = 'D', long)]
    duration: Option<f64>,
    /// Transport: shm (processes of this host) or verbs (RDMA; device from $RSMSG_DEVICE, GID
    /// index from $RSMSG_GID_INDEX, else automatic).
    #[arg(long, default_value = "shm", env = "RSMSG_TRANSPORT", value_parser = ["shm", "verbs"])]
    transport: String,
    /// Bootstrap manager address for verbs --server/--client (token from $RSMSG_TOKEN).
    #[arg(long, env = "RSMSG_MANAGER")]
    manager: Option<String>,
    /// Poll mode: busy, event, adaptive[:SPINS].
    #[arg(long, default_value = "busy", env = "RSMSG_POLL")]
    poll: PollMode,
    /// Segment groups, e.g. `256:256:4,4k:64:4,64k:16:4` (SIZE:COUNT:SPAN[:SEGMENTS]).
    #[arg(long, env = "RSMSG_GROUPS")]
    groups: Option<String>,
    /// Run as the server, listening under --name.
    #[arg(long, conflicts_with = "client")]
    server: bool,
    /// Run as the client of the server listening under --name.
    #[arg(long)]
    client: bool,
    /// Endpoint name (server and client modes).
    #[arg(long, default_value = "rsmsg-perf")]
    name: String,
    /// Print results as JSON on stdout instead of a table.
    #[arg(long)]
    json: bool,
    /// Show a progress line on stderr during each measurement (default: only when stderr is a
    /// terminal).
    #[arg(long)]
    progress: bool,
    /// Serve one client, then exit (server mode).
    #[arg(long, hide = true)]
    once: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Test {
    Lat,
    Bw,
    Rate,
}

impl Test {
    fn name(self) -> &'static str {
        match self {
            Test::Lat => "lat",
            Test::Bw => "bw",
            Test::Rate => "rate",
        }
    }
    fn from_name(s: &str) -> Option<Test> {
        match s {
            "lat" => Some(Test::Lat),
            "bw" => Some(Test::Bw),
            "rate" => Some(Test::Rate),
            _ => None,
        }
    }
}

/// One measured row.
#[derive(Debug, Serialize)]
pub struct Row {
    test: &'static str,
    transport: String,
    size: usize,
    iterations: u64,
    /// One-way latency (round trip / 2), microseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    lat_us: Option<LatStats>,
    /// Payload bandwidth, MB/s (10^6 bytes).
    #[serde(skip_serializing_if = "Option::is_none")]
    bw_mbps: Option<f64>,
    /// Messages per second, millions.
    #[serde(skip_serializing_if = "Option::is_none")]
    rate_mmps: Option<f64>,
}

#[derive(Debug, Serialize)]
struct LatStats {
    min: f64,
    p50: f64,
    avg: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

/// Parses `64`, `4k`, `1m`.
fn parse_size(s: &str) -> Result<usize> {
    let t = s.trim().to_ascii_lowercase();
    let (num, mult) = match t.as_bytes().last() {
        Some(b'k') => (&t[..t.len() - 1], 1usize << 10),
        Some(b'm') => (&t[..t.len() - 1], 1 << 20),
        _ => (&t[..], 1),
    };
    let n: usize = num
        .parse()
        .with_context(|| format!("bad size {s:?} (examples: 64, 4k, 1m)"))?;
    n.checked_mul(mult).context("size overflows")
}

fn parse_sizes(spec: &str) -> Result<Vec<usize>> {
    let v = parse_sizes_raw(spec)?;
    if v.is_empty() || v.contains(&0) {
        bail!("bad --size {spec:?}: sizes must be at least 1 byte");
    }
    Ok(v)
}

fn parse_sizes_raw(spec: &str) -> Result<Vec<usize>> {
    if let Some((lo, hi)) = spec.split_once("..") {
        let (lo, hi) = (parse_size(lo)?, parse_size(hi)?);
        if lo == 0 || lo > hi {
            bail!("bad sweep {spec:?}: need 0 < MIN <= MAX");
        }
        let mut v = Vec::new();
        let mut s = lo;
        while s <= hi {
            v.push(s);
            s = match s.checked_mul(4) {
                Some(n) => n,
                None => break,
            };
        }
        Ok(v)
    } else {
        spec.split(',').map(parse_size).collect()
    }
}

fn layout(args: &Args) -> Result<Layout> {
    match &args.groups {
        Some(g) => g
            .parse::<Layout>()
            .map_err(|e| anyhow::anyhow!("--groups {g:?}: {e}")),
        None => Ok(Layout::default()),
    }
}

/// Refuses option combinations that would be silently ignored or cannot work.
fn validate(args: &Args) -> Result<()> {
    let role = if args.server {
        "server"
    } else if args.client {
        "client"
    } else {
        "local"
    };
    if args.server {
        let client_only = [
            ("--test", args.test != "all"),
            ("--size", args.size.is_some()),
            ("--iters", args.iters.is_some()),
            ("--duration", args.duration.is_some()),
            ("--max-bytes", args.max_bytes.is_some()),
            ("--json", args.json),
            ("--progress", args.progress),
        ];
        if let Some((opt, _)) = client_only.iter().find(|(_, set)| *set) {
            bail!("{opt} is a client option: the server follows the plan its client sends");
        }
    } else if args.once {
        bail!("--once applies to --server only");
    }
    if args.transport == "shm" && args.manager.is_some() {
        bail!("--manager applies to --transport verbs (shared memory needs no manager)");
    }
    if role == "local" && args.manager.is_some() {
        bail!(
            "--manager applies to --server and --client; the local mode runs its own private manager"
        );
    }
    if role == "local" && args.name != "rsmsg-perf" {
        bail!("--name applies to --server and --client; the local mode picks a private name");
    }
    if args.iters == Some(0) {
        bail!("--iters must be at least 1");
    }
    if let Some(d) = args.duration
        && !(d.is_finite() && d > 0.0 && d <= 86_400.0)
    {
        bail!("--duration must be a number of seconds in (0, 86400], got {d}");
    }
    if let Some(s) = &args.size {
        parse_sizes(s)?;
    }
    if let Some(b) = &args.max_bytes {
        let n = parse_size(b).map_err(|e| anyhow::anyhow!("--max-bytes: {e}"))?;
        if n == 0 {
            bail!("--max-bytes must be at least 1");
        }
    }
    if args.transport == "shm" {
        shm::socket_path(&args.name).map_err(|e| anyhow::anyhow!("--name {:?}: {e}", args.name))?;
    }
    Ok(())
}

/// Runs `rsmsg perf`.
pub fn run(args: &Args) -> Result<std::process::ExitCode> {
    validate(args)?;
    let layout = layout(args)?;
    tracing::debug!(transport = %args.transport, test = %args.test, layout = %layout, "perf");
    if args.transport == "verbs" {
        return run_verbs(args, layout);
    }
    if args.server {
        return serve(args, layout).map(|()| std::process::ExitCode::SUCCESS);
    }
    let mut child = None;
    let conn = if args.client {
        shm::connect(&args.name, layout, args.poll)
            .with_context(|| format!("connecting to endpoint {:?}", args.name))?
    } else {
        let name = format!("rsmsg-perf-{}", std::process::id());
        let c = spawn_server(args, &name, &[])?;
        child = Some(c);
        shm::connect(&name, layout, args.poll).context("connecting to the local server")?
    };
    finish_client(args, &conn, child)
}

/// Runs the client side over `conn`, tells the server to quit, waits for a local server.
fn finish_client<L: Link, T: TargetMemory>(
    args: &Args,
    conn: &Connection<L, T>,
    child: Option<Child>,
) -> Result<std::process::ExitCode> {
    let result = client(args, conn);
    // Tell the server we are done, whatever happened.
    let _ = conn.send(b"quit");
    if let Some(mut c) = child {
        let status = c.wait().context("waiting for the server process")?;
        if result.is_ok() && !status.success() {
            bail!("the server process failed: {status}");
        }
    }
    let rows = result?;
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&rows)?)?;
    }
    Ok(std::process::ExitCode::SUCCESS)
}

fn manager_addr(args: &Args) -> String {
    match &args.manager {
        Some(m) if m.contains(':') => m.clone(),
        Some(m) => format!("{m}:{DEFAULT_PORT}"),
        None => format!("127.0.0.1:{DEFAULT_PORT}"),
    }
}

/// `--transport verbs`: server, client, or local (embedded manager + server process).
fn run_verbs(args: &Args, layout: Layout) -> Result<std::process::ExitCode> {
    let opts = VerbsOptions::from_env().context("verbs options")?;
    if args.server {
        let addr = manager_addr(args);
        let token = Token::from_env().context("the manager token ($RSMSG_TOKEN)")?;
        let mut listener =
            VerbsListener::bind(addr.as_str(), token, &args.name, layout, args.poll, opts)
                .with_context(|| {
                    format!("registering {:?} with the manager at {addr}", args.name)
                })?;
        serve_clients(args, || Ok(listener.accept()?))?;
        return Ok(std::process::ExitCode::SUCCESS);
    }
    if args.client {
        let addr = manager_addr(args);
        let token = Token::from_env().context("the manager token ($RSMSG_TOKEN)")?;
        let conn = vt::connect(addr.as_str(), &token, &args.name, layout, args.poll, &opts)
            .with_context(|| {
                format!(
                    "connecting to {:?} through the manager at {addr}",
                    args.name
                )
            })?;
        return finish_client(args, &conn, None);
    }
    // Local: a private manager with a fresh token, and a server process that registers with it.
    let secret = format!(
        "rsmsg-perf-{:x}",
        u128::from_le_bytes(rsmsg::bootstrap::auth::nonce()?[..16].try_into()?)
    );
    let token = Token::new(secret.clone())?;
    let manager = Manager::bind("127.0.0.1:0", token.clone()).context("embedded manager")?;
    let addr = manager.local_addr().to_string();
    let name = format!("rsmsg-perf-{}", std::process::id());
    let child = spawn_server(
        args,
        &name,
        &[
            ("RSMSG_TOKEN", secret.as_str()),
            ("RSMSG_MANAGER", addr.as_str()),
        ],
    )?;
    let conn = vt::connect(addr.as_str(), &token, &name, layout, args.poll, &opts)
        .context("connecting to the local server")?;
    let r = finish_client(args, &conn, Some(child));
    drop(conn);
    drop(manager);
    r
}

/// Starts `rsmsg perf --server --once` on this host and waits until it listens.
fn spawn_server(args: &Args, name: &str, env: &[(&str, &str)]) -> Result<Child> {
    let exe = std::env::current_exe().context("locating the rsmsg executable")?;
    let mut cmd = Command::new(exe);
    cmd.args(["perf", "--server", "--once", "--name", name])
        .args(["--transport", &args.transport])
        .envs(env.iter().copied())
        .arg("--poll")
        .arg(poll_name(args.poll))
        .stdout(Stdio::piped())
        .stdin(Stdio::null());
    if let Some(g) = &args.groups {
        cmd.args(["--groups", g]);
    }
    let mut child = cmd.spawn().context("starting the server process")?;
    let stdout = child.stdout.take().context("server stdout")?;
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .context("waiting for the server to listen")?;
    if line.trim() != "listening" {
        let _ = child.kill();
        let _ = child.wait();
        bail!("the server process did not start (said {:?})", line.trim());
    }
    Ok(child)
}

fn poll_name(p: PollMode) -> String {
    match p {
        PollMode::Busy => "busy".into(),
        PollMode::Event => "event".into(),
        PollMode::Adaptive { spins } => format!("adaptive:{spins}"),
    }
}

fn serve(args: &Args, layout: Layout) -> Result<()> {
    let listener = ShmListener::bind(&args.name, layout, args.poll)
        .with_context(|| format!("listening under {:?}", args.name))?;
    serve_clients(args, || Ok(listener.accept()?))
}

/// Says "listening" (the local mode waits for that line), then serves clients one after the
/// other, or just one with `--once`.
fn serve_clients<L: Link, T: TargetMemory>(
    args: &Args,
    mut accept: impl FnMut() -> Result<Connection<L, T>>,
) -> Result<()> {
    outln!("listening")?;
    std::io::stdout().flush()?;
    loop {
        let conn = accept().context("accepting a client")?;
        if let Err(e) = serve_one(&conn) {
            if args.once {
                return Err(e);
            }
            eprintln!("rsmsg perf: client failed: {e:#}");
        }
        if args.once {
            return Ok(());
        }
    }
}

/// Follows the client's plans until it says `quit`.
fn serve_one<L: Link, T: TargetMemory>(conn: &Connection<L, T>) -> Result<()> {
    loop {
        let plan = {
            let m = conn.recv().context("waiting for a plan")?;
            String::from_utf8(m.to_vec()).context("plan is not text")?
        };
        let words: Vec<&str> = plan.split_whitespace().collect();
        match words.as_slice() {
            ["quit"] => return Ok(()),
            [test, size, iters] => {
                let test = Test::from_name(test).context("unknown test in plan")?;
                let size: usize = size.parse().context("bad size in plan")?;
                let iters: u64 = iters.parse().context("bad iterations in plan")?;
                let buf = vec![0x5a; size];
                // Above the switch point messages come by rendezvous: read straight into one
                // buffer (zero copy) rather than into a fresh one per message, and a stream into
                // several (their reads overlap). Every buffer is written before `ready` lets the
                // client start its clock: a page of a zeroed allocation is first touched by the
                // read into it, which would put page faults inside the measurement (perftest too
                // writes its buffers before it times).
                let rndv = size > conn.switch_point();
                let mut dst = if rndv { vec![0x5a; size] } else { Vec::new() };
                let mut bufs: Vec<Vec<u8>> = if rndv && test != Test::Lat {
                    let window = usize::try_from(iters).unwrap_or(usize::MAX);
                    (0..RNDV_WINDOW.min(window.max(1)))
                        .map(|_| vec![0x5a; size])
                        .collect()
                } else {
                    Vec::new()
                };
                conn.send(b"ready")?;
                match test {
                    Test::Lat => {
                        for _ in 0..iters {
                            if dst.is_empty() {
                                let m = conn.recv()?;
                                drop(m);
                            } else {
                                conn.recv_into(&mut dst)?;
                            }
                            conn.send(&buf)?;
                        }
                    }
                    Test::Bw | Test::Rate if !dst.is_empty() => {
                        // Several rendezvous messages per receive: their reads overlap.
                        let mut got = 0u64;
                        while got < iters {
                            let want = ((iters - got) as usize).min(bufs.len());
                            let mut views: Vec<&mut [u8]> =
                                bufs[..want].iter_mut().map(|b| &mut b[..]).collect();
                            got += conn.recv_into_many(&mut views)?.len() as u64;
                        }
                        conn.send(b"ack")?;
                    }
                    Test::Bw | Test::Rate => {
                        for _ in 0..iters {
                            conn.recv()?;
                        }
                        conn.send(b"ack")?;
                    }
                }
            }
            _ => bail!("bad plan {plan:?}"),
        }
    }
}

fn client<L: Link, T: TargetMemory>(args: &Args, conn: &Connection<L, T>) -> Result<Vec<Row>> {
    let tests: Vec<Test> = match args.test.as_str() {
        "all" => vec![Test::Lat, Test::Bw, Test::Rate],
        t => vec![Test::from_name(t).context("unknown test")?],
    };
    let max = conn.max_message();
    let mut rows = Vec::new();
    if !args.json {
        outln!(
            "# rsmsg perf: transport {}, poll {}, largest eager message {} B, switch point {} B \
             (longer messages go by rendezvous), copies {}",
            args.transport,
            poll_name(args.poll),
            max,
            conn.switch_point(),
            match rsmsg::copy_piece_len() {
                Some(n) => format!("in {n} B pieces (one long memcpy measured slow here)"),
                None => "one call each".to_string(),
            }
        )?;
    }
    for test in tests {
        let sizes = match &args.size {
            Some(s) => parse_sizes(s)?,
            None => vec![if test == Test::Bw { 65536 } else { 64 }],
        };
        if !args.json {
            print_header(test)?;
        }
        for &size in &sizes {
            let row = measure(args, conn, test, size)?;
            if !args.json {
                print_row(&row)?;
            }
            rows.push(row);
        }
    }
    Ok(rows)
}

fn default_iters(test: Test, size: usize) -> u64 {
    match test {
        Test::Lat => 100_000,
        Test::Bw => (4_000_000_000 / size.max(64) as u64).clamp(1_000, 1_000_000),
        Test::Rate => 2_000_000,
    }
}

/// How often the progress line may change.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// The progress line on stderr: rewritten in place at most every [`PROGRESS_EVERY`], erased by
/// [`Progress::clear`].
struct Progress {
    on: bool,
    shown: bool,
    last: Option<Instant>,
}

impl Progress {
    fn new(on: bool) -> Self {
        Progress {
            on,
            shown: false,
            last: None,
        }
    }

    fn update(&mut self, test: Test, size: usize, done: u64, goal: Goal, elapsed: Duration) {
        if !self.on || self.last.is_some_and(|t| t.elapsed() < PROGRESS_EVERY) {
            return;
        }
        self.last = Some(Instant::now());
        let of = match goal {
            Goal::Iters(n) => format!(
                "{done}/{n} iterations ({:.0}%)",
                done as f64 * 100.0 / n as f64
            ),
            Goal::Time(d) => format!(
                "{done} iterations, {:.0}% of {:.1} s",
                (elapsed.as_secs_f64() * 100.0 / d.as_secs_f64()).min(100.0),
                d.as_secs_f64()
            ),
        };
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r\x1b[K  {} {} B: {of}, {:.1} s",
            test.name(),
            size,
            elapsed.as_secs_f64()
        );
        let _ = err.flush();
        self.shown = true;
    }

    fn clear(&mut self) {
        if self.shown {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[K");
            let _ = err.flush();
            self.shown = false;
        }
    }
}

/// When a measurement ends: after a number of iterations or after a time.
#[derive(Debug, Clone, Copy)]
enum Goal {
    Iters(u64),
    Time(Duration),
}

/// Iterations of the next plan: the rest of a fixed count in one plan when no progress is shown
/// (the measurement is then one uninterrupted stream); otherwise about [`PROGRESS_EVERY`] worth
/// at the speed seen so far, so that the line moves and a timed run ends near its deadline.
fn next_chunk(goal: Goal, progress: bool, done: u64, elapsed: Duration, per_iter: f64) -> u64 {
    let per_iter = per_iter.max(1e-9);
    let slice = (PROGRESS_EVERY.as_secs_f64() / per_iter).clamp(1.0, 1e9) as u64;
    match goal {
        Goal::Iters(n) if !progress => n - done,
        Goal::Iters(n) => slice.min(n - done),
        Goal::Time(d) => {
            let left = (d.saturating_sub(elapsed).as_secs_f64() / per_iter).ceil() as u64;
            slice.min(left.max(1))
        }
    }
}

/// `iters`, lowered so that `iters x size <= max_bytes`, but not below 10 (nor above `iters`).
fn capped_iters(iters: u64, max_bytes: usize, size: usize) -> u64 {
    let cap = (max_bytes / size.max(1)) as u64;
    iters.min(cap.max(10))
}

/// Runs one test at one size: a warm-up plan, then the measured plan(s).
fn measure<L: Link, T: TargetMemory>(
    args: &Args,
    conn: &Connection<L, T>,
    test: Test,
    size: usize,
) -> Result<Row> {
    let goal = match args.duration {
        Some(d) => Goal::Time(Duration::from_secs_f64(d)),
        None => {
            let n = args.iters.unwrap_or_else(|| default_iters(test, size));
            Goal::Iters(match &args.max_bytes {
                Some(b) => capped_iters(n, parse_size(b)?, size),
                None => n,
            })
        }
    };
    let warm = match goal {
        Goal::Iters(n) => (n / 10).clamp(2, 10_000),
        Goal::Time(_) => 10,
    };
    let warm_time = run_plan(conn, test, size, warm, &mut None)?;
    let mut per_iter = warm_time.as_secs_f64() / warm as f64;
    let show = args.progress || std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut progress = Progress::new(show);
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    let mut done = 0u64;
    let mut elapsed = Duration::ZERO;
    loop {
        let chunk = next_chunk(goal, show, done, elapsed, per_iter);
        let mut h = Some(&mut hist);
        let took = run_plan(conn, test, size, chunk, &mut h);
        let took = match took {
            Ok(t) => t,
            Err(e) => {
                progress.clear();
                return Err(e);
            }
        };
        elapsed += took;
        done += chunk;
        per_iter = elapsed.as_secs_f64() / done as f64;
        let more = match goal {
            Goal::Time(d) => elapsed < d,
            Goal::Iters(n) => done < n,
        };
        if !more {
            break;
        }
        progress.update(test, size, done, goal, elapsed);
    }
    progress.clear();
    let secs = elapsed.as_secs_f64().max(1e-9);
    let us = |ns: u64| ns as f64 / 2000.0;
    Ok(Row {
        test: test.name(),
        transport: args.transport.clone(),
        size,
        iterations: done,
        lat_us: (test == Test::Lat).then(|| LatStats {
            min: us(hist.min()),
            p50: us(hist.value_at_quantile(0.5)),
            avg: hist.mean() / 2000.0,
            p99: us(hist.value_at_quantile(0.99)),
            p999: us(hist.value_at_quantile(0.999)),
            max: us(hist.max()),
        }),
        bw_mbps: (test != Test::Lat).then(|| (done as f64 * size as f64) / secs / 1e6),
        rate_mmps: (test != Test::Lat).then(|| done as f64 / secs / 1e6),
    })
}

/// Rendezvous transfers a bandwidth stream keeps in flight (each handle borrows the one send
/// buffer; the receiver serves them in order).
const RNDV_WINDOW: usize = 16;

/// The clock of the round trips: the TSC (through `quanta`, calibrated against the monotonic
/// clock) where the CPU flags it invariant, the monotonic clock otherwise. A TSC read costs
/// about a third of a `clock_gettime` on the development host (12 ns against 34 ns);
/// `ucx_perftest` and perftest time with the TSC too. The Soft-RoCE guest (QEMU TCG) does not
/// flag its TSC invariant, so there the monotonic clock is used, a system call of about 2.5 us
/// with its HPET clock source.
fn clock() -> &'static quanta::Clock {
    static CLOCK: std::sync::OnceLock<quanta::Clock> = std::sync::OnceLock::new();
    CLOCK.get_or_init(quanta::Clock::new)
}

/// Times round trips with one clock read each: a round trip runs from the previous read to
/// this one, so the clock's own cost is paid once, not twice. Raw readings are kept in a small
/// buffer and put into the histogram in batches; the batch's own time is left out of the next
/// round trip (the clock restarts after it).
struct RoundTrips<'h> {
    hist: Option<&'h mut Histogram<u64>>,
    ticks: Vec<u64>,
    last: u64,
}

impl<'h> RoundTrips<'h> {
    const BATCH: usize = 4096;

    fn new(hist: Option<&'h mut Histogram<u64>>) -> Self {
        let ticks = if hist.is_some() {
            Vec::with_capacity(Self::BATCH)
        } else {
            Vec::new()
        };
        RoundTrips {
            hist,
            ticks,
            last: clock().raw(),
        }
    }

    /// One round trip ended now.
    #[inline]
    fn lap(&mut self) {
        let now = clock().raw();
        if self.hist.is_some() {
            self.ticks.push(now.wrapping_sub(self.last));
            if self.ticks.len() == Self::BATCH {
                self.flush();
                self.last = clock().raw();
                return;
            }
        }
        self.last = now;
    }

    fn flush(&mut self) {
        if let Some(h) = self.hist.as_deref_mut() {
            for &t in &self.ticks {
                h.saturating_record(clock().delta_as_nanos(0, t));
            }
        }
        self.ticks.clear();
    }

    fn finish(mut self) {
        self.flush();
    }
}

/// Sends a plan and runs it; returns the time of the measured part. Round trips go into `hist`
/// (nanoseconds) for latency tests.
fn run_plan<L: Link, T: TargetMemory>(
    conn: &Connection<L, T>,
    test: Test,
    size: usize,
    iters: u64,
    hist: &mut Option<&mut Histogram<u64>>,
) -> Result<Duration> {
    conn.send(format!("{} {size} {iters}", test.name()).as_bytes())?;
    let buf = vec![0xa5u8; size];
    // Above the switch point: rendezvous, echoes read into one buffer (written now, so that no
    // page of it is first touched inside the measurement), streams with several transfers in
    // flight.
    let rndv = size > conn.switch_point();
    let mut dst = if rndv { vec![0xa5u8; size] } else { Vec::new() };
    // The server has its buffers ready: the clock starts now.
    let ready = conn
        .recv()
        .context("waiting for the server to take the plan")?;
    if &*ready != b"ready" {
        bail!(
            "the server did not take the plan (it answered {} bytes)",
            ready.len()
        );
    }
    drop(ready);
    let start = Instant::now();
    match test {
        Test::Lat if rndv => {
            let mut rt = RoundTrips::new(hist.as_deref_mut());
            for _ in 0..iters {
                conn.send(&buf)?;
                let n = conn.recv_into(&mut dst)?;
                if n != size {
                    bail!("echo of {n} bytes for a {size}-byte message");
                }
                rt.lap();
            }
            rt.finish();
        }
        Test::Bw | Test::Rate if rndv => {
            let mut inflight: std::collections::VecDeque<
                rsmsg::transport::SendHandle<'_, '_, L, T>,
            > = std::collections::VecDeque::with_capacity(RNDV_WINDOW);
            for _ in 0..iters {
                if inflight.len() == RNDV_WINDOW
                    && let Some(h) = inflight.pop_front()
                {
                    h.wait()?;
                }
                inflight.push_back(conn.send_start(&buf)?);
            }
            for h in inflight {
                h.wait()?;
            }
            let ack = conn.recv()?;
            if &*ack != b"ack" {
                bail!("server did not acknowledge the stream");
            }
        }
        Test::Lat => {
            let mut rt = RoundTrips::new(hist.as_deref_mut());
            for _ in 0..iters {
                conn.send(&buf)?;
                let m = conn.recv()?;
                if m.len() != size {
                    bail!("echo of {} bytes for a {size}-byte message", m.len());
                }
                drop(m);
                rt.lap();
            }
            rt.finish();
        }
        Test::Bw | Test::Rate => {
            for _ in 0..iters {
                conn.send(&buf)?;
            }
            let ack = conn.recv()?;
            if &*ack != b"ack" {
                bail!("server did not acknowledge the stream");
            }
        }
    }
    Ok(start.elapsed())
}

fn print_header(test: Test) -> std::io::Result<()> {
    match test {
        Test::Lat => outln!(
            "{:>10} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}   (one-way latency, us)",
            "#bytes",
            "#iters",
            "t_min",
            "t_median",
            "t_avg",
            "t_99%",
            "t_99.9%",
            "t_max"
        ),
        Test::Bw | Test::Rate => outln!(
            "{:>10} {:>10} {:>14} {:>14}",
            "#bytes",
            "#iters",
            "BW avg[MB/s]",
            "MsgRate[Mpps]"
        ),
    }
}

fn print_row(r: &Row) -> std::io::Result<()> {
    if let Some(l) = &r.lat_us {
        outln!(
            "{:>10} {:>10} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
            r.size,
            r.iterations,
            l.min,
            l.p50,
            l.avg,
            l.p99,
            l.p999,
            l.max
        )?;
    } else {
        outln!(
            "{:>10} {:>10} {:>14.1} {:>14.3}",
            r.size,
            r.iterations,
            r.bw_mbps.unwrap_or(0.0),
            r.rate_mmps.unwrap_or(0.0)
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_sizes("8,64,4k").unwrap(), vec![8, 64, 4096]);
        assert_eq!(parse_sizes("8..1k").unwrap(), vec![8, 32, 128, 512]);
        assert!(parse_sizes("0..8").is_err());
        assert!(parse_sizes("x").is_err());
        assert!(parse_sizes("9..8").is_err());
    }

    #[test]
    fn capped_iterations() {
        assert_eq!(capped_iters(1000, 1 << 20, 64), 1000);
        assert_eq!(capped_iters(1000, 1 << 20, 4096), 256);
        assert_eq!(capped_iters(1000, 1 << 20, 4 << 20), 10);
        assert_eq!(capped_iters(5, 1 << 20, 4 << 20), 5);
    }
}
