//! Traffic from inside a pod's network namespace: TCP and UDP echo probes, long-lived connections,
//! and reachability matrices checked in parallel.

use std::fmt;
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::sys::in_netns;

static NONCE: AtomicU64 = AtomicU64::new(1);

fn nonce(tag: &str) -> Vec<u8> {
    format!(
        "nodeward-lab {tag} {}\n",
        NONCE.fetch_add(1, Ordering::Relaxed)
    )
    .into_bytes()
}

/// Opens a TCP connection from inside `netns`.
pub fn connect_from(netns: &str, to: SocketAddr, timeout: Duration) -> Result<TcpStream> {
    Ok(in_netns(netns, || {
        TcpStream::connect_timeout(&to, timeout)
    })??)
}

/// Sends a line over `stream` and reads the echo within `timeout`.
pub fn echo_roundtrip(stream: &mut TcpStream, timeout: Duration) -> bool {
    let msg = nonce("tcp");
    let deadline = Instant::now() + timeout;
    if stream.set_write_timeout(Some(timeout)).is_err() || stream.write_all(&msg).is_err() {
        return false;
    }
    let mut got = Vec::with_capacity(msg.len());
    let mut buf = [0u8; 256];
    while got.len() < msg.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return false;
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    got == msg
}

/// Connect, send, read the echo: true only if the whole exchange succeeds within `timeout`.
pub fn tcp_probe(netns: &str, to: SocketAddr, timeout: Duration) -> bool {
    let start = Instant::now();
    match connect_from(netns, to, timeout) {
        Ok(mut stream) => echo_roundtrip(&mut stream, timeout.saturating_sub(start.elapsed())),
        Err(_) => false,
    }
}

/// Sends a datagram from inside `netns` (re-sent every 200 ms) until its echo comes back or
/// `timeout` passes.
pub fn udp_probe(netns: &str, to: SocketAddr, timeout: Duration) -> bool {
    let bind: SocketAddr = match to.ip() {
        IpAddr::V4(_) => "0.0.0.0:0".parse().expect("literal"),
        IpAddr::V6(_) => "[::]:0".parse().expect("literal"),
    };
    let Ok(Ok(socket)) = in_netns(netns, || UdpSocket::bind(bind)) else {
        return false;
    };
    let msg = nonce("udp");
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 512];
    while Instant::now() < deadline {
        if socket.send_to(&msg, to).is_err() {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(200));
        if wait.is_zero() || socket.set_read_timeout(Some(wait)).is_err() {
            break;
        }
        // Datagrams from anyone else, or stale echoes, are skipped.
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            if from == to && buf[..n] == msg[..] {
                return true;
            }
        }
    }
    false
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

/// One probe of a reachability matrix and its expected outcome.
#[derive(Clone, Debug)]
pub struct Case {
    pub from: String,
    pub to: String,
    pub proto: Proto,
    pub port: u16,
    pub allowed: bool,
}

impl Case {
    pub fn tcp(from: &str, to: &str, port: u16, allowed: bool) -> Self {
        Self {
            from: from.into(),
            to: to.into(),
            proto: Proto::Tcp,
            port,
            allowed,
        }
    }

    pub fn udp(from: &str, to: &str, port: u16, allowed: bool) -> Self {
        Self {
            from: from.into(),
            to: to.into(),
            proto: Proto::Udp,
            port,
            allowed,
        }
    }
}

impl fmt::Display for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = match self.proto {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        };
        let want = if self.allowed { "allowed" } else { "denied" };
        write!(
            f,
            "{} -> {} {proto}/{} should be {want}",
            self.from, self.to, self.port
        )
    }
}

/// Runs `probe` for every item on its own thread; results in input order.
pub fn parallel<T: Sync, R: Send>(items: &[T], probe: impl Fn(&T) -> R + Sync) -> Vec<R> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = items
            .iter()
            .map(|item| scope.spawn(|| probe(item)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("probe thread panicked"))
            .collect()
    })
}
