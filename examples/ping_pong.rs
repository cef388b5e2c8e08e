//! Ping-pong between two processes through named endpoints.
//!
//! ```text
//! ping_pong server NAME [--once]                  # echo every message back
//! ping_pong client NAME [--count N] [--size B]    # N round trips of B bytes, checked
//! ping_pong both [NAME] [--count N] [--size B]    # a server child process and a client
//! ```
//!
//! The transport comes from the environment (`RSMSG_TRANSPORT`, `RSMSG_MANAGER`, `RSMSG_TOKEN`,
//! ...; see `docs/api.md`): shared memory between processes of one host, verbs with
//! `RSMSG_TRANSPORT=verbs` or across hosts. The client prints
//! `ping_pong: N round trips of B bytes over TRANSPORT ...` and `ping_pong: ok`.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use rsmsg::{Config, Endpoint, EndpointError};

/// Guard against a hang: a server with no client, a peer that never answers.
const IDLE_LIMIT: Duration = Duration::from_secs(120);

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let role = args.first().map(String::as_str).unwrap_or("");
    let name = args
        .get(1)
        .filter(|a| !a.starts_with("--"))
        .cloned()
        .unwrap_or_else(|| format!("ping-pong-{}", std::process::id()));
    let count: u64 = flag(&args, "--count")?.unwrap_or(1000);
    let size: usize = flag(&args, "--size")?.unwrap_or(64);
    let config = Config::from_env()?.connect_retry(Duration::from_secs(60));
    match role {
        "server" => server(config, &name, args.iter().any(|a| a == "--once")),
        "client" => client(config, &name, count, size),
        "both" => both(config, &name, count, size),
        _ => bail!("usage: ping_pong server|client|both [NAME] [--count N] [--size B] [--once]"),
    }
}

fn flag<T: std::str::FromStr>(args: &[String], name: &str) -> anyhow::Result<Option<T>>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    match args.iter().position(|a| a == name) {
        None => Ok(None),
        Some(i) => {
            let v = args
                .get(i + 1)
                .with_context(|| format!("{name} needs a value"))?;
            Ok(Some(v.parse().with_context(|| format!("{name} {v}"))?))
        }
    }
}

/// Echoes every message back to its sender; with `once`, returns when the first peer leaves.
fn server(config: Config, name: &str, once: bool) -> anyhow::Result<()> {
    let mut ep = Endpoint::bind(config, name)?;
    println!("listening {name}");
    let mut served = 0u64;
    loop {
        match ep.recv_timeout(IDLE_LIMIT) {
            Ok(Some(msg)) => {
                // Read in place and answered straight from the target segment; the partitions
                // go back to the client when `msg` is dropped.
                msg.reply(&msg)?;
                served += 1;
            }
            Ok(None) => bail!("no message for {IDLE_LIMIT:?}"),
            Err(EndpointError::PeerFailed { peer, source }) => {
                println!("{peer} left after {served} messages: {source}");
                if once {
                    return Ok(());
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn client(config: Config, name: &str, count: u64, size: usize) -> anyhow::Result<()> {
    ensure!(
        size >= 8,
        "--size must be at least 8 (the message carries its number)"
    );
    let mut ep = Endpoint::new(config)?;
    let peer = ep.connect(name)?;
    let info = ep.peer(peer).context("the peer just added")?.clone();
    let mut rtts = Vec::with_capacity(count as usize);
    for i in 0..count {
        let t = Instant::now();
        // Zero-copy send: the message is written straight into the outgoing partitions.
        ep.send_with(peer, size, |buf| fill(buf, i))?;
        let back = ep
            .recv_timeout(IDLE_LIMIT)?
            .with_context(|| format!("no answer to message {i}"))?;
        ensure!(
            back.peer() == peer,
            "answer from {} instead of {peer}",
            back.peer()
        );
        ensure!(
            back.len() == size,
            "answer {i} has {} bytes, sent {size}",
            back.len()
        );
        let mut expect = vec![0u8; size];
        fill(&mut expect, i);
        ensure!(*back == expect[..], "answer {i} differs from what was sent");
        drop(back);
        rtts.push(t.elapsed());
    }
    rtts.sort();
    let c = ep.counters(peer).context("counters")?;
    println!(
        "ping_pong: {count} round trips of {size} bytes over {} to {} (median {:.1} us, sent {} messages / {} bytes, received {})",
        info.transport,
        info.name,
        rtts.get(rtts.len() / 2)
            .map_or(0.0, |d| d.as_secs_f64() * 1e6),
        c.messages_sent,
        c.bytes_sent,
        c.messages_received,
    );
    if let Some(conn) = ep.remove(peer) {
        conn.close();
    }
    println!("ping_pong: ok");
    Ok(())
}

fn fill(buf: &mut [u8], i: u64) {
    buf[..8].copy_from_slice(&i.to_le_bytes());
    for (j, b) in buf[8..].iter_mut().enumerate() {
        *b = (i as usize).wrapping_mul(31).wrapping_add(j) as u8;
    }
}

/// Runs the server as a child process and the client here.
fn both(config: Config, name: &str, count: u64, size: usize) -> anyhow::Result<()> {
    let mut child = Command::new(std::env::current_exe()?)
        .args(["server", name, "--once"])
        .stdout(Stdio::piped())
        .spawn()
        .context("start the server process")?;
    let mut lines = BufReader::new(child.stdout.take().context("server stdout")?).lines();
    match lines.next() {
        Some(Ok(l)) if l.starts_with("listening") => {}
        other => {
            let _ = child.kill();
            bail!("the server did not start: {other:?}");
        }
    }
    let r = client(config, name, count, size);
    if r.is_err() {
        let _ = child.kill();
    }
    for l in lines.map_while(Result::ok) {
        println!("server: {l}");
    }
    let status = child.wait()?;
    r?;
    ensure!(status.success(), "the server exited with {status}");
    Ok(())
}
