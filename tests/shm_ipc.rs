//! Two processes sharing a memfd: the test process is the receiver (creates the region, owns the
//! consumer end), and it re-runs its own binary as the sender, selected by an environment
//! variable, which maps the regions from the fds it receives over a Unix socket, copies each
//! message into the receiver's segment and rings the doorbell.

use std::io::ErrorKind;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use rsmsg::shm::{
    CreditMailbox, DoorbellConsumer, DoorbellProducer, PeerStatus, PushOutcome, RingLayout,
    ShmRegion, WaitMode, recv_fds, send_fds, socket_peer_status,
};

const ROLE_VAR: &str = "RSMSG_SHM_TEST_ROLE";
const SOCK_VAR: &str = "RSMSG_SHM_TEST_SOCK";
/// Generous bound on how long the receiver waits for one entry before declaring the sender stuck.
const STALL: Duration = Duration::from_secs(60);

/// The value carried by entry `i`: every bit position varies.
fn value(i: u64) -> u32 {
    (i as u32).wrapping_mul(0x9e37_79b1) ^ (i >> 32) as u32
}

/// The setup message sent with the memfd: capacity, count, producer mode.
struct Setup {
    capacity: u32,
    count: u64,
    notify: bool,
}

impl Setup {
    fn encode(&self) -> [u8; 13] {
        let mut b = [0u8; 13];
        b[..4].copy_from_slice(&self.capacity.to_le_bytes());
        b[4..12].copy_from_slice(&self.count.to_le_bytes());
        b[12] = self.notify as u8;
        b
    }
    fn decode(b: &[u8]) -> Result<Self> {
        ensure!(b.len() == 13, "setup message of {} bytes", b.len());
        Ok(Self {
            capacity: u32::from_le_bytes(b[..4].try_into()?),
            count: u64::from_le_bytes(b[4..12].try_into()?),
            notify: b[12] != 0,
        })
    }
}

/// Region layout: the ring at 0, then one credit counter.
fn region_len(layout: RingLayout) -> usize {
    layout.bytes() + CreditMailbox::bytes(1)
}

/// The message bytes live in a second region, the target segment, cut into 64-byte
/// partitions, twice as many as ring slots. The sender writes entry `i`'s partition after
/// pushing entry `i - 1`, which needed room in the ring, i.e. the receiver had taken entry
/// `i - 1 - capacity` and so had finished reading every partition up to `i - 2 - capacity`,
/// including `i - 2 * capacity`, the previous user of this partition (capacity >= 2).
const PARTITION: usize = 64;
fn segment_len(layout: RingLayout) -> usize {
    2 * layout.capacity() as usize * PARTITION
}
fn partition_offset(layout: RingLayout, i: u64) -> usize {
    (i % (2 * u64::from(layout.capacity()))) as usize * PARTITION
}
/// The message of entry `i`: its index, then a fill byte derived from it.
fn message(i: u64) -> [u8; PARTITION] {
    let mut m = [(i as u8) ^ 0x5a; PARTITION];
    m[..8].copy_from_slice(&i.to_le_bytes());
    m
}

/// Runs the sender side if this process is the re-invoked child. Returns `true` if it was.
fn run_child_role() -> Result<bool> {
    let Ok(role) = std::env::var(ROLE_VAR) else {
        return Ok(false);
    };
    ensure!(role == "producer", "unknown role {role}");
    let name = std::env::var(SOCK_VAR).context("socket name")?;
    let addr = SocketAddr::from_abstract_name(name.as_bytes())?;
    let sock = UnixStream::connect_addr(&addr).context("connect to receiver")?;
    let mut buf = [0u8; 64];
    let (n, fds) = recv_fds(&sock, &mut buf, 2).context("receive memfds")?;
    let setup = Setup::decode(&buf[..n])?;
    let layout = RingLayout::new(setup.capacity)?;
    ensure!(
        layout.capacity() >= 2,
        "the partition reuse argument needs capacity >= 2"
    );
    let [ring_fd, segment_fd]: [_; 2] = fds.try_into().map_err(|_| anyhow::anyhow!("2 fds"))?;
    let region = Arc::new(ShmRegion::from_fd(ring_fd, region_len(layout))?);
    let mut segment = ShmRegion::from_fd(segment_fd, segment_len(layout))?;
    let mut producer = DoorbellProducer::new(region.clone(), 0, layout)?;
    let mailbox = CreditMailbox::new(region, layout.bytes(), 1)?;

    for i in 0..setup.count {
        if setup.notify && i % 97 == 0 {
            // Pause now and then so that the receiver goes to sleep and must be woken.
            std::thread::sleep(Duration::from_micros(300));
        }
        segment.copy_in(partition_offset(layout, i), &message(i))?;
        let mut polls = 0u64;
        loop {
            let outcome = producer.try_push(value(i))?;
            if setup.notify {
                producer.notify()?;
            }
            if outcome == PushOutcome::Pushed {
                break;
            }
            polls += 1;
            if polls.is_multiple_of(4096) && socket_peer_status(&sock)? == PeerStatus::Gone {
                bail!("receiver went away at entry {i}");
            }
            if setup.notify {
                // An event-mode sender gives its core away while the ring is full: the
                // receiver it just woke may need that core (this host may have only two).
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
    }
    // The receiver acknowledges everything through the credit mailbox.
    loop {
        let credit = mailbox.load(0)?;
        if credit == setup.count {
            return Ok(true);
        }
        ensure!(
            credit < setup.count,
            "credit {credit} above {}",
            setup.count
        );
        if socket_peer_status(&sock)? == PeerStatus::Gone {
            bail!("receiver went away before the final credit ({credit})");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn spawn_producer(test_name: &str, sock_name: &str) -> Result<Child> {
    Command::new(std::env::current_exe()?)
        .args([test_name, "--exact", "--nocapture", "--test-threads=1"])
        .env(ROLE_VAR, "producer")
        .env(SOCK_VAR, sock_name)
        .spawn()
        .context("spawn producer process")
}

/// Accepts the child's connection, failing (not hanging) if the child dies first.
fn accept_from(listener: &UnixListener, child: &mut Child) -> Result<UnixStream> {
    listener.set_nonblocking(true)?;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                return Ok(s);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if let Some(status) = child.try_wait()? {
                    bail!("producer exited before connecting: {status}");
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The receiver: creates the region, sends it, checks every entry, returns the sleep count.
fn run_receiver(test_name: &str, setup: Setup, mode: WaitMode) -> Result<u64> {
    let sock_name = format!("rsmsg-shm-test-{}-{test_name}", std::process::id());
    let listener = UnixListener::bind_addr(&SocketAddr::from_abstract_name(sock_name.as_bytes())?)?;
    let mut child = spawn_producer(test_name, &sock_name)?;
    let sock = accept_from(&listener, &mut child)?;

    let layout = RingLayout::new(setup.capacity)?;
    let region = Arc::new(ShmRegion::create(
        "rsmsg-test-doorbell",
        region_len(layout),
    )?);
    let segment = ShmRegion::create("rsmsg-test-segment", segment_len(layout))?;
    send_fds(&sock, &setup.encode(), &[region.fd(), segment.fd()])?;
    let mut consumer = DoorbellConsumer::new(region.clone(), 0, layout)?;
    let mailbox = CreditMailbox::new(region, layout.bytes(), 1)?;

    for i in 0..setup.count {
        match consumer.wait(mode, Some(STALL))? {
            Some(v) => {
                ensure!(v == value(i), "entry {i}: got {v:#x}, want {:#x}", value(i));
                let mut got = [0u8; PARTITION];
                segment.copy_out(partition_offset(layout, i), &mut got)?;
                ensure!(got == message(i), "entry {i}: message bytes {got:?}");
            }
            None => bail!(
                "no entry {i} within {STALL:?} (sender exit: {:?})",
                child.try_wait()?
            ),
        }
    }
    mailbox.store(0, consumer.popped())?;
    let status = child.wait()?;
    ensure!(status.success(), "producer process failed: {status}");
    // Nothing more may arrive.
    ensure!(
        consumer
            .wait(WaitMode::Busy, Some(Duration::from_millis(1)))?
            .is_none()
    );
    Ok(consumer.sleeps())
}

#[test]
fn one_million_immediates_between_processes() -> Result<()> {
    if run_child_role()? {
        return Ok(());
    }
    let setup = Setup {
        capacity: 256,
        count: 1_000_000,
        notify: false,
    };
    run_receiver(
        "one_million_immediates_between_processes",
        setup,
        WaitMode::Busy,
    )?;
    Ok(())
}

#[test]
fn event_mode_wakeups_between_processes() -> Result<()> {
    if run_child_role()? {
        return Ok(());
    }
    let setup = Setup {
        capacity: 64,
        count: 20_000,
        notify: true,
    };
    let sleeps = run_receiver(
        "event_mode_wakeups_between_processes",
        setup,
        WaitMode::Event,
    )?;
    ensure!(
        sleeps > 0,
        "the receiver never slept, so no wake-up was tested"
    );
    Ok(())
}

#[test]
fn adaptive_mode_between_processes() -> Result<()> {
    if run_child_role()? {
        return Ok(());
    }
    let setup = Setup {
        capacity: 16,
        count: 20_000,
        notify: true,
    };
    let sleeps = run_receiver(
        "adaptive_mode_between_processes",
        setup,
        WaitMode::Adaptive { spins: 200 },
    )?;
    ensure!(sleeps > 0, "the receiver never slept after spinning");
    Ok(())
}
