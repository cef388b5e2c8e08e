//! Fan-in: one server receives from several clients at once and checks every message against
//! the identity of the peer it came from.
//!
//! ```text
//! fan_in server NAME --clients N [--count M]        # receive N x M messages, ack each client
//! fan_in client NAME --index K [--count M]          # send M numbered messages, wait for the ack
//! fan_in both [NAME] [--clients N] [--count M]      # the server here, N client processes
//! ```
//!
//! Each client sends messages of varying length (so they use several segment groups) that carry
//! its index and a sequence number. The server, receiving from any peer, checks that every peer
//! sends as one client only, in order, with the right contents, that the clients are all
//! distinct, and answers each client with an acknowledgement by peer id. It prints one line per
//! peer and `fan_in: ok`. The transport comes from the environment (see `docs/api.md`).

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use rsmsg::{Config, Endpoint, EndpointError, PeerId};

const IDLE_LIMIT: Duration = Duration::from_secs(120);
const HEADER: usize = 16;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let role = args.first().map(String::as_str).unwrap_or("");
    let name = args
        .get(1)
        .filter(|a| !a.starts_with("--"))
        .cloned()
        .unwrap_or_else(|| format!("fan-in-{}", std::process::id()));
    let clients: u64 = flag(&args, "--clients")?.unwrap_or(4);
    let count: u64 = flag(&args, "--count")?.unwrap_or(200);
    let config = Config::from_env()?.connect_retry(Duration::from_secs(60));
    match role {
        "server" => {
            let mut ep = Endpoint::bind(config, &name)?;
            println!("listening {name}");
            serve(&mut ep, clients, count)
        }
        "client" => {
            let index: u64 = flag(&args, "--index")?.context("client needs --index K")?;
            client(&config, &name, index, count)
        }
        "both" => both(config, &name, clients, count),
        _ => bail!("usage: fan_in server|client|both [NAME] [--clients N] [--count M] [--index K]"),
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

/// Length of message `seq` of client `index`: from 16 bytes to a few kilobytes.
fn message_len(index: u64, seq: u64) -> usize {
    HEADER + ((index * 977 + seq * 131) % 6000) as usize
}

fn fill(buf: &mut [u8], index: u64, seq: u64) {
    buf[..8].copy_from_slice(&index.to_le_bytes());
    buf[8..16].copy_from_slice(&seq.to_le_bytes());
    for (j, b) in buf[HEADER..].iter_mut().enumerate() {
        *b = (index as usize * 59 + seq as usize * 7 + j) as u8;
    }
}

/// What the server has seen from one peer.
struct Seen {
    info: String,
    index: u64,
    next: u64,
    bytes: u64,
}

fn serve(ep: &mut Endpoint, clients: u64, count: u64) -> anyhow::Result<()> {
    let mut seen: BTreeMap<PeerId, Seen> = BTreeMap::new();
    let mut done = 0u64;
    while done < clients {
        let msg = match ep.recv_timeout(IDLE_LIMIT) {
            Ok(Some(m)) => m,
            Ok(None) => {
                bail!("nothing received for {IDLE_LIMIT:?} ({done} of {clients} clients done)")
            }
            Err(EndpointError::PeerFailed { peer, source }) => {
                // A client that goes away before it finished is an error of this run; one that
                // finished may close before we notice.
                let finished = seen.get(&peer.id).is_some_and(|s| s.next == count);
                ensure!(
                    finished,
                    "peer {peer} failed before sending everything: {source}"
                );
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let peer = msg.peer();
        ensure!(
            msg.len() >= HEADER,
            "{peer}: message of {} bytes",
            msg.len()
        );
        let index = u64::from_le_bytes(msg[..8].try_into()?);
        let seq = u64::from_le_bytes(msg[8..16].try_into()?);
        let s = seen.entry(peer).or_insert_with(|| Seen {
            info: msg.peer_info().to_string(),
            index,
            next: 0,
            bytes: 0,
        });
        ensure!(
            s.index == index,
            "{peer} sent as client {index} after sending as client {}",
            s.index
        );
        ensure!(
            s.next == seq,
            "{peer} (client {index}): message {seq}, expected {}",
            s.next
        );
        let mut expect = vec![0u8; message_len(index, seq)];
        fill(&mut expect, index, seq);
        ensure!(
            *msg == expect[..],
            "{peer} (client {index}): message {seq} is corrupt"
        );
        s.next += 1;
        s.bytes += msg.len() as u64;
        drop(msg);
        if s.next == count {
            // Acknowledge by peer id: the client exits once it has this.
            ep.send(peer, format!("done {index}").as_bytes())?;
            done += 1;
        }
    }
    let indices: BTreeSet<u64> = seen.values().map(|s| s.index).collect();
    ensure!(
        indices.len() as u64 == clients && seen.len() as u64 == clients,
        "{} peers sent as {} distinct clients, expected {clients}",
        seen.len(),
        indices.len()
    );
    for s in seen.values() {
        println!(
            "fan_in: {}: client {} sent {} messages, {} bytes",
            s.info, s.index, s.next, s.bytes
        );
    }
    let bytes: u64 = seen.values().map(|s| s.bytes).sum();
    println!("fan_in: {clients} clients x {count} messages verified ({bytes} bytes)");
    println!("fan_in: ok");
    Ok(())
}

fn client(config: &Config, name: &str, index: u64, count: u64) -> anyhow::Result<()> {
    // A single connection: the plain `Conn` API.
    let conn = rsmsg::connect(config, name)?;
    for seq in 0..count {
        let len = message_len(index, seq);
        conn.send_with(len, |buf| fill(buf, index, seq))?;
    }
    let ack = conn.recv_timeout(IDLE_LIMIT)?;
    ensure!(
        *ack == *format!("done {index}").as_bytes(),
        "client {index}: unexpected acknowledgement {:?}",
        String::from_utf8_lossy(&ack)
    );
    drop(ack);
    conn.close();
    Ok(())
}

/// The server here, the clients as child processes.
fn both(config: Config, name: &str, clients: u64, count: u64) -> anyhow::Result<()> {
    let mut ep = Endpoint::bind(config, name)?;
    let exe = std::env::current_exe()?;
    let mut children: Vec<Child> = Vec::new();
    for k in 0..clients {
        let c = Command::new(&exe)
            .args([
                "client",
                name,
                "--index",
                &k.to_string(),
                "--count",
                &count.to_string(),
            ])
            .spawn()
            .with_context(|| format!("start client {k}"))?;
        children.push(c);
    }
    let r = serve(&mut ep, clients, count);
    let mut failed = 0;
    for mut c in children {
        if r.is_err() {
            let _ = c.kill();
        }
        if !c.wait()?.success() {
            failed += 1;
        }
    }
    r?;
    ensure!(failed == 0, "{failed} client processes failed");
    Ok(())
}
