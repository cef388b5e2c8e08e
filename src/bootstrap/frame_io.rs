//! Reading and writing whole frames on a blocking `TcpStream` under deadlines.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use super::wire::{DecodeError, FrameHeader, HEADER_LEN, Message};

/// Why a frame could not be read.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// The peer closed the connection before the first byte of a frame.
    Closed,
    /// The peer closed the connection in the middle of a frame.
    ClosedMidFrame,
    /// No frame started before the idle deadline.
    Idle,
    /// A frame started but did not complete within the frame timeout.
    Stalled,
    /// A socket error.
    Io(io::Error),
    /// The frame is malformed.
    Decode(DecodeError),
}

enum Fill {
    Done,
    Eof,
    Timeout,
}

fn fill(stream: &mut TcpStream, buf: &mut [u8], deadline: Instant) -> io::Result<Fill> {
    let mut got = 0;
    while got < buf.len() {
        let now = Instant::now();
        if now >= deadline {
            return Ok(Fill::Timeout);
        }
        // A zero timeout means "block forever" to the OS: keep at least 1 ms.
        let wait = (deadline - now).max(Duration::from_millis(1));
        stream.set_read_timeout(Some(wait))?;
        match stream.read(&mut buf[got..]) {
            Ok(0) => return Ok(Fill::Eof),
            Ok(n) => got += n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Fill::Done)
}

/// Reads one frame. The first byte must arrive before `idle_deadline`; from then on the whole
/// frame must arrive within `frame_timeout` (a client trickling bytes is cut off).
pub(crate) fn read_frame(
    stream: &mut TcpStream,
    idle_deadline: Instant,
    frame_timeout: Duration,
) -> Result<Message, ReadError> {
    let mut head = [0u8; HEADER_LEN];
    match fill(stream, &mut head[..1], idle_deadline).map_err(ReadError::Io)? {
        Fill::Done => {}
        Fill::Eof => return Err(ReadError::Closed),
        Fill::Timeout => return Err(ReadError::Idle),
    }
    let deadline = Instant::now() + frame_timeout;
    let mut rest = |buf: &mut [u8]| match fill(stream, buf, deadline).map_err(ReadError::Io)? {
        Fill::Done => Ok(()),
        Fill::Eof => Err(ReadError::ClosedMidFrame),
        Fill::Timeout => Err(ReadError::Stalled),
    };
    rest(&mut head[1..])?;
    let header = FrameHeader::decode(&head).map_err(ReadError::Decode)?;
    let mut payload = vec![0u8; header.len];
    rest(&mut payload)?;
    Message::decode_payload(header.kind, &payload).map_err(ReadError::Decode)
}

/// Writes one frame (already encoded) completely, under the stream's write timeout.
pub(crate) fn write_frame(stream: &mut TcpStream, frame: &[u8]) -> io::Result<()> {
    stream.write_all(frame)?;
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn trickled_frame_is_cut_off() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let mut c = TcpStream::connect(addr).unwrap();
            let f = Message::Ping.encode().unwrap();
            for b in &f[..6] {
                c.write_all(&[*b]).unwrap();
                std::thread::sleep(Duration::from_millis(40));
            }
            std::thread::sleep(Duration::from_millis(400));
            c
        });
        let (mut s, _) = l.accept().unwrap();
        let r = read_frame(
            &mut s,
            Instant::now() + Duration::from_secs(30),
            Duration::from_millis(150),
        );
        assert!(matches!(r, Err(ReadError::Stalled)), "{r:?}");
        drop(t.join().unwrap());
    }

    #[test]
    fn whole_frame_and_eof() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let mut c = TcpStream::connect(addr).unwrap();
            write_frame(&mut c, &Message::Pong.encode().unwrap()).unwrap();
        });
        let (mut s, _) = l.accept().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let m = read_frame(&mut s, deadline, Duration::from_secs(5)).unwrap();
        assert_eq!(m, Message::Pong);
        t.join().unwrap();
        assert!(matches!(
            read_frame(&mut s, deadline, Duration::from_secs(5)),
            Err(ReadError::Closed)
        ));
    }
}
