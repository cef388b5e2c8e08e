//! Every fd the shared-memory layer opens is closed again, on success and on error paths.
//! This file holds a single test so that no other test of the same process opens fds meanwhile.

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use anyhow::Result;
use rsmsg::shm::{
    CreditMailbox, DoorbellConsumer, DoorbellProducer, PeerStatus, PidWatch, PushOutcome,
    RingLayout, ShmError, ShmRegion, recv_fds, send_fds, socket_peer_status,
};

fn open_fds() -> Result<usize> {
    Ok(std::fs::read_dir("/proc/self/fd")?.count())
}

fn exercise() -> Result<()> {
    let layout = RingLayout::new(64)?;
    let len = layout.bytes() + CreditMailbox::bytes(4);
    let (a, b) = UnixStream::pair()?;

    let region = Arc::new(ShmRegion::create("leak-test", len)?);
    let extra = ShmRegion::create("leak-test-extra", 4096)?;

    // Success path: one fd.
    send_fds(&a, b"ring", &[region.fd()])?;
    let mut buf = [0u8; 16];
    let (_, mut fds) = recv_fds(&b, &mut buf, 1)?;
    let mapped = Arc::new(ShmRegion::from_fd(fds.remove(0), len)?);

    // Error paths: the received fds must be closed by recv_fds / from_fd.
    send_fds(&a, b"two", &[region.fd(), extra.fd()])?;
    assert!(matches!(
        recv_fds(&b, &mut buf, 1),
        Err(ShmError::FdCount { .. })
    ));
    send_fds(&a, b"size", &[extra.fd()])?;
    let (_, mut fds) = recv_fds(&b, &mut buf, 1)?;
    assert!(matches!(
        ShmRegion::from_fd(fds.remove(0), 8192),
        Err(ShmError::SizeMismatch { .. })
    ));

    // Ring, mailbox, liveness.
    let mut producer = DoorbellProducer::new(mapped.clone(), 0, layout)?;
    let mut consumer = DoorbellConsumer::new(region.clone(), 0, layout)?;
    let tx = CreditMailbox::new(region, layout.bytes(), 4)?;
    let rx = CreditMailbox::new(mapped, layout.bytes(), 4)?;
    for i in 0..1000 {
        assert_eq!(producer.try_push(i)?, PushOutcome::Pushed);
        producer.notify()?;
        assert_eq!(consumer.try_pop()?, Some(i));
    }
    tx.store(2, 99)?;
    assert_eq!(rx.load(2)?, 99);
    let watch = PidWatch::open(std::process::id() as i32)?;
    assert_eq!(watch.status()?, PeerStatus::Alive);
    assert_eq!(socket_peer_status(a.as_fd())?, PeerStatus::Alive);
    Ok(())
}

#[test]
fn dropping_everything_leaks_no_fd() -> Result<()> {
    // Warm up anything the runtime opens lazily on first use.
    exercise()?;
    let before = open_fds()?;
    for _ in 0..10 {
        exercise()?;
    }
    let after = open_fds()?;
    assert_eq!(
        before, after,
        "fds leaked: {before} open before, {after} after"
    );
    Ok(())
}
