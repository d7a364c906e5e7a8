//! Bytes between a pod's TCP connection and an HBONE stream, both ways, until both are done.
//!
//! Memory stays bounded and idle connections cost no buffers: a read buffer is allocated only
//! once the socket is readable (small first, large while the data keeps filling it) and
//! dropped as soon as its bytes are handed to h2, whose flow control (the peer's window, at
//! most [`STREAM_WINDOW`]) bounds what is in flight. A FIN from
//! the pod ends our half of the stream (`END_STREAM`) and the end of the peer's half shuts our
//! write side down, so half-closed connections behave as they would without the tunnel. An error
//! either way resets the stream. The socket stays the caller's: it closes it gracefully after a
//! clean end (removing what that leaves behind, [`super::timewait`]) and resets it after an
//! error, as the pod's peer would have.

use std::future::poll_fn;
use std::io;
use std::sync::atomic::AtomicU64;

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};

use super::TunnelStats;

/// One read from the pod's socket, at most.
pub const READ_CHUNK: usize = 256 * 1024;
/// The first read after the socket turns readable: enough for a request or a response, small
/// enough that a message does not cost a large allocation. A read that fills it means bulk
/// data, and the next reads take [`READ_CHUNK`].
const FIRST_READ: usize = 16 * 1024;
/// The h2 flow-control window per stream, and per connection.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// The largest DATA frame either side sends.
pub const MAX_FRAME: u32 = 256 * 1024;

/// Bytes moved each way by one [`splice`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Moved {
    /// From the socket into the stream.
    pub up: u64,
    /// From the stream into the socket.
    pub down: u64,
}

/// Runs both directions to their end. `sent` and `received` count payload bytes as they move
/// (metrics), from the socket's and the stream's side respectively.
///
/// # Errors
/// The first error of either direction (the other is then stopped).
pub async fn splice(
    socket: &mut TcpStream,
    send: SendStream<Bytes>,
    recv: RecvStream,
    sent: &AtomicU64,
    received: &AtomicU64,
) -> io::Result<Moved> {
    let (read, write) = socket.split();
    let up = socket_to_stream(read, send, sent);
    let down = stream_to_socket(recv, write, received);
    let (up, down) = tokio::try_join!(up, down)?;
    Ok(Moved { up, down })
}

async fn socket_to_stream(
    read: ReadHalf<'_>,
    mut send: SendStream<Bytes>,
    sent: &AtomicU64,
) -> io::Result<u64> {
    let mut total = 0u64;
    let mut want = FIRST_READ;
    loop {
        read.readable().await?;
        let mut buf = BytesMut::with_capacity(want);
        let n = match read.try_read_buf(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                send.send_reset(h2::Reason::CANCEL);
                return Err(e);
            }
        };
        if n == 0 {
            send.send_data(Bytes::new(), true).map_err(h2_io)?;
            return Ok(total);
        }
        want = if n >= buf.capacity() {
            READ_CHUNK
        } else {
            FIRST_READ
        };
        total += n as u64;
        TunnelStats::add(sent, n as u64);
        while !buf.is_empty() {
            send.reserve_capacity(buf.len());
            let granted = match poll_fn(|cx| send.poll_capacity(cx)).await {
                Some(Ok(granted)) => granted,
                Some(Err(e)) => return Err(h2_io(e)),
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "the peer closed the stream",
                    ));
                }
            };
            let chunk = buf.split_to(granted.min(buf.len())).freeze();
            send.send_data(chunk, false).map_err(h2_io)?;
        }
    }
}

async fn stream_to_socket(
    mut recv: RecvStream,
    mut write: WriteHalf<'_>,
    received: &AtomicU64,
) -> io::Result<u64> {
    let mut total = 0u64;
    while let Some(data) = recv.data().await {
        let data = data.map_err(h2_io)?;
        let n = data.len();
        write.write_all(&data).await?;
        // Only now, once the pod's socket took the bytes, may the peer send more.
        let _ = recv.flow_control().release_capacity(n);
        total += n as u64;
        TunnelStats::add(received, n as u64);
    }
    write.shutdown().await?;
    Ok(total)
}

/// An h2 error as an I/O error (a reset stream reads as a reset connection).
#[must_use]
pub fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::Error::other("h2 I/O error"));
    }
    let kind = if e.is_reset() {
        io::ErrorKind::ConnectionReset
    } else {
        io::ErrorKind::Other
    };
    io::Error::new(kind, e)
}
