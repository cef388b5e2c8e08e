//! Size sweep across the eager/rendezvous switch: one-way latency (half a ping-pong) and
//! bandwidth (a stream with up to `--window` rendezvous transfers in flight, received with
//! `recv_into_many` into `--window` buffers, so that their READs overlap) per size, both ends
//! in this process (two threads), over verbs (an embedded bootstrap manager; run it where an
//! RDMA device is, e.g. `rdma-setup/vm-run -- target/release/examples/rndv_sweep`) or shared
//! memory.
//!
//! ```text
//! rndv_sweep [--transport verbs|shm] [--sizes 4k,64k,1m,...] [--threshold BYTES]
//!            [--iters N] [--lat-iters N] [--bytes BYTES] [--window W] [--cache BYTES]
//!            [--send-cache BYTES] [--sender-poll busy|event|adaptive[:SPINS]] [--recv copy|in-place]
//!            [--layout SIZE:COUNT:SPAN[:SEGMENTS],...]
//! ```
//! Sizes above the switch point go by rendezvous; the table says which. `--threshold` lowers the
//! switch point (as `RSMSG_RNDV_THRESHOLD` does); `--cache` sets the receiver's registration
//! cache (the receiver uses `recv_into` on one buffer); `--send-cache` the sender's (memory
//! windows over cached registrations instead of a registration per transfer; 0, the default,
//! registers per transfer). `--sender-poll` is the poll mode of the sending end (default busy; the
//! receiving end always spins): `event` lets it sleep while its transfers are read, as the passive
//! side of `ib_write_bw` does, so that in one guest it does not take a CPU from the emulated device.
//! `--recv in-place` receives the stream's eager messages with `recv` (read where they landed,
//! zero-copy, as `ib_write_bw`'s destination is never copied) instead of `recv_into_many`.
//! Latency is the median (and minimum) of the round trips, halved.

use std::thread;
use std::time::Instant;

use anyhow::{Context as _, Result, bail};
use rsmsg::bootstrap::{Manager, Token};
use rsmsg::core::{Layout, RndvConfig};
use rsmsg::transport::{Connection, Link, PollMode, TargetMemory};

fn parse_size(s: &str) -> Result<usize> {
    let s = s.trim();
    let (n, m) = match s.chars().last() {
        Some('k' | 'K') => (&s[..s.len() - 1], 1 << 10),
        Some('m' | 'M') => (&s[..s.len() - 1], 1 << 20),
        Some('g' | 'G') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    Ok(n.parse::<usize>()
        .with_context(|| format!("bad size {s:?}"))?
        * m)
}

#[derive(Clone)]
struct Args {
    transport: String,
    sizes: Vec<usize>,
    threshold: Option<usize>,
    iters: Option<u64>,
    lat_iters: Option<u64>,
    bytes: u64,
    window: usize,
    cache: usize,
    send_cache: usize,
    sender_poll: PollMode,
    /// The stream's eager messages read in place (`recv`, zero-copy) instead of copied out.
    in_place: bool,
    /// The connection's layout (compact form), else the default.
    layout: Option<String>,
}

fn args() -> Result<Args> {
    let mut a = Args {
        transport: "verbs".into(),
        sizes: "4k,16k,64k,128k,256k,512k,1m,2m,4m,8m,16m"
            .split(',')
            .map(parse_size)
            .collect::<Result<_>>()?,
        threshold: None,
        iters: None,
        lat_iters: None,
        bytes: 32 << 20,
        window: 16,
        cache: 256 << 20,
        send_cache: 0,
        sender_poll: PollMode::Busy,
        in_place: false,
        layout: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().with_context(|| format!("{k} needs a value"));
        match k.as_str() {
            "--transport" => a.transport = v()?,
            "--sizes" => a.sizes = v()?.split(',').map(parse_size).collect::<Result<_>>()?,
            "--threshold" => a.threshold = Some(parse_size(&v()?)?),
            "--iters" => a.iters = Some(v()?.parse()?),
            "--lat-iters" => a.lat_iters = Some(v()?.parse::<u64>()?.max(1)),
            "--bytes" => a.bytes = parse_size(&v()?)? as u64,
            "--window" => a.window = v()?.parse::<usize>()?.max(1),
            "--cache" => a.cache = parse_size(&v()?)?,
            "--send-cache" => a.send_cache = parse_size(&v()?)?,
            "--sender-poll" => a.sender_poll = v()?.parse().map_err(anyhow::Error::msg)?,
            "--layout" => a.layout = Some(v()?),
            "--recv" => {
                a.in_place = match v()?.as_str() {
                    "copy" => false,
                    "in-place" => true,
                    other => bail!("--recv {other:?}: copy or in-place"),
                }
            }
            other => bail!("unknown argument {other:?} (see the source's doc comment)"),
        }
    }
    Ok(a)
}

/// Bandwidth iterations for a size: about `--bytes` of traffic, between 5 and 4000.
fn iters_for(a: &Args, size: usize) -> u64 {
    a.iters
        .unwrap_or((a.bytes / size.max(1) as u64).clamp(5, 4000))
}

/// Latency round trips for a size: `--lat-iters`, else a tenth of the bandwidth iterations, at
/// least 5.
fn lat_iters_for(a: &Args, size: usize) -> u64 {
    a.lat_iters.unwrap_or((iters_for(a, size) / 10).max(5))
}

fn configure<L: Link, T: TargetMemory>(c: &Connection<L, T>, a: &Args) {
    c.set_rndv_config(RndvConfig {
        threshold: a.threshold,
        cache_bytes: a.cache,
        send_cache_bytes: a.send_cache,
        ..c.rndv_config()
    });
}

/// The peer: echoes latency rounds, drains bandwidth rounds into one buffer.
fn serve<L: Link, T: TargetMemory>(c: &Connection<L, T>, sizes: &[usize], a: &Args) -> Result<()> {
    let mut buf = vec![0u8; sizes.iter().copied().max().unwrap_or(0)];
    for &size in sizes {
        let n = iters_for(a, size);
        // The stream's destinations, several per receive (their READs in flight together),
        // written once here, before the latency rounds: the client starts its clock right
        // after them, and `ib_write_bw` too touches its buffers before it does. Zeroed memory
        // would be faulted in (and zeroed) by the first registration inside the timed stream.
        let mut bufs: Vec<Vec<u8>> = (0..a.window.min(n as usize))
            .map(|_| vec![0x5au8; size])
            .collect();
        for _ in 0..lat_iters_for(a, size) + 1 {
            let got = c.recv_into(&mut buf)?;
            c.send(&buf[..got])?;
        }
        let mut got = 0;
        if a.in_place && size <= c.switch_point() {
            // Zero-copy: each message is read where it landed, then released.
            while got < n {
                let m = c.recv()?;
                if m.len() != size {
                    bail!("stream message of {} bytes for {size}", m.len());
                }
                got += 1;
            }
        }
        while got < n {
            let want = ((n - got) as usize).min(bufs.len());
            let mut views: Vec<&mut [u8]> = bufs[..want].iter_mut().map(|b| &mut b[..]).collect();
            got += c.recv_into_many(&mut views)?.len() as u64;
        }
        c.send(b"ack")?;
    }
    Ok(())
}

fn drive<L: Link, T: TargetMemory>(c: &Connection<L, T>, sizes: &[usize], a: &Args) -> Result<()> {
    println!(
        "# rndv_sweep: transport {}, switch point {} B, window {}, receiver cache {} B, \
         sender cache {} B ({}), sender poll {:?}, layout {}, stream received {}",
        a.transport,
        c.switch_point(),
        a.window,
        a.cache,
        a.send_cache,
        if c.rndv_send_cache_stats().is_some() {
            "memory windows"
        } else {
            "registration per transfer"
        },
        a.sender_poll,
        a.layout.as_deref().unwrap_or("default"),
        if a.in_place { "in place" } else { "by copy" }
    );
    println!(
        "{:>10} {:>6} {:>8} {:>12} {:>12} {:>14}",
        "#bytes", "mode", "#iters", "lat_med[us]", "lat_min[us]", "BW avg[MB/s]"
    );
    let mut rbuf = vec![0u8; sizes.iter().copied().max().unwrap_or(0)];
    for &size in sizes {
        let buf = vec![0xa5u8; size];
        let n = iters_for(a, size);
        let nl = lat_iters_for(a, size);
        // Latency: one warm-up round trip, then nl.
        c.send(&buf)?;
        c.recv_into(&mut rbuf)?;
        let mut rtts = Vec::with_capacity(nl as usize);
        for _ in 0..nl {
            let t = Instant::now();
            c.send(&buf)?;
            let got = c.recv_into(&mut rbuf)?;
            rtts.push(t.elapsed().as_secs_f64() * 1e6 / 2.0);
            if got != size {
                bail!("echo of {got} bytes for {size}");
            }
        }
        rtts.sort_by(f64::total_cmp);
        let lat = rtts[rtts.len() / 2];
        let lat_min = rtts[0];
        // Bandwidth: a stream, up to `window` transfers in flight.
        let t = Instant::now();
        let mut inflight = std::collections::VecDeque::new();
        for _ in 0..n {
            if inflight.len() == a.window {
                let h: rsmsg::transport::SendHandle<'_, '_, L, T> =
                    inflight.pop_front().expect("non-empty");
                h.wait()?;
            }
            inflight.push_back(c.send_start(&buf)?);
        }
        for h in inflight {
            h.wait()?;
        }
        let ack = c.recv()?;
        if &*ack != b"ack" {
            bail!("no ack");
        }
        let secs = t.elapsed().as_secs_f64();
        let bw = size as f64 * n as f64 / secs / 1e6;
        let mode = if size > c.switch_point() {
            "rndv"
        } else {
            "eager"
        };
        println!("{size:>10} {mode:>6} {n:>8} {lat:>12.2} {lat_min:>12.2} {bw:>14.2}");
    }
    if let Some(s) = c.rndv_cache_stats() {
        println!("# client receive cache: {s:?}");
    }
    if let Some(s) = c.rndv_send_cache_stats() {
        println!("# client send cache: {s:?}");
    }
    Ok(())
}

fn run<L, T>(server: Connection<L, T>, client: Connection<L, T>, a: &Args) -> Result<()>
where
    L: Link + Send + 'static,
    T: TargetMemory + Send + 'static,
{
    configure(&server, a);
    configure(&client, a);
    let a2 = a.clone();
    let h = thread::spawn(move || serve(&server, &a2.sizes, &a2));
    drive(&client, &a.sizes, a)?;
    h.join()
        .map_err(|_| anyhow::anyhow!("server thread panicked"))??;
    Ok(())
}

fn main() -> Result<()> {
    let a = args()?;
    let layout = match &a.layout {
        Some(text) => text.parse::<Layout>()?,
        None => Layout::default(),
    };
    match a.transport.as_str() {
        "verbs" => {
            use rsmsg::transport::verbs::{self, VerbsListener, VerbsOptions};
            let token = Token::new("rndv-sweep-token")?;
            let mgr = Manager::bind("127.0.0.1:0", token.clone())?;
            let addr = mgr.local_addr();
            let opts = VerbsOptions::from_env()?;
            let mut l = VerbsListener::bind(
                addr,
                token.clone(),
                "rndv-sweep",
                layout.clone(),
                PollMode::Busy,
                opts.clone(),
            )?;
            let t = thread::spawn(move || l.accept());
            let client = verbs::connect(addr, &token, "rndv-sweep", layout, a.sender_poll, &opts)?;
            let server = t.join().map_err(|_| anyhow::anyhow!("accept panicked"))??;
            run(server, client, &a)
        }
        "shm" => {
            use rsmsg::transport::shm::{ShmListener, connect_path};
            let path =
                std::env::temp_dir().join(format!("rsmsg-rndv-sweep-{}.sock", std::process::id()));
            let l = ShmListener::bind_path(&path, layout.clone(), PollMode::Busy)?;
            let t = thread::spawn(move || l.accept());
            let client = connect_path(&path, layout, a.sender_poll)?;
            let server = t.join().map_err(|_| anyhow::anyhow!("accept panicked"))??;
            run(server, client, &a)
        }
        other => bail!("unknown transport {other:?} (verbs, shm)"),
    }
}
