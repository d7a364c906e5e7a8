//! Closing a pod-facing socket without leaving the pod's 4-tuple behind in the node's network
//! namespace.
//!
//! Both ends of the tunnel hold sockets that carry pod addresses: on the source node the
//! outbound listener's accepted socket (local address: the destination pod's), on the
//! destination node the transparent connect (local address: the client pod's). When such a
//! socket closes first, the kernel keeps its 4-tuple in TIME_WAIT for 60 s. A later *plaintext*
//! connection with the same 4-tuple (the mesh turned off, a peer losing its `MutualTLS`; clients
//! reuse ports all the time) is forwarded through the node, and the forwarded SYN meets that
//! TIME_WAIT in early demux (`tcp_v4_early_demux` sets `skb->sk`), which `ip_forward` then drops
//! without a trace. The pod's connection hangs until the TIME_WAIT expires.
//!
//! So once both halves of a proxied connection are done, [`Reaper::close`] closes the socket
//! gracefully (FIN, as before) and then removes the TIME_WAIT it left with `SOCK_DESTROY` over
//! `NETLINK_SOCK_DIAG` (`tcp_abort`, which for a TIME_WAIT socket only unhashes it; it needs
//! `CAP_NET_ADMIN`, which the agent has, and a kernel with `CONFIG_INET_DIAG_DESTROY`). The
//! request names the exact 4-tuple *and* the socket's cookie (`SO_COOKIE`, read while the
//! connection is set up: a TIME_WAIT inherits the cookie of the socket it replaces only if it was
//! made before), so the kernel finds no other socket with that tuple (`ENOENT`), a new
//! connection or a listener an `sk_lookup` program would return included: nothing but our own
//! leftover can be removed.
//!
//! Only a TIME_WAIT is removed. A socket that is still in `LAST_ACK` (the pod closed first and
//! has not yet acknowledged our FIN) leaves no TIME_WAIT and is gone once the ACK arrives;
//! destroying it would stop our FIN's retransmission and could leave the pod waiting for it. If
//! our final ACK to the pod is lost after the TIME_WAIT is gone, the pod's retransmitted FIN
//! meets no socket and is answered with a reset, which ends its `LAST_ACK` exactly as the ACK
//! would have: its application has already closed, so it sees nothing.
//!
//! DEVELOPERS.md ("Proxied sockets and the pods' 4-tuples") has the measurements and the
//! alternatives that were weighed.

use std::io;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_packet_sock_diag::{SockDiagDestroy, SockDiagMessage};
use netlink_sys::{Socket, protocols::NETLINK_SOCK_DIAG};
use socket2::SockRef;
use tokio::net::TcpStream;

use super::TunnelStats;

/// `tcpi_state` values (`include/net/tcp_states.h`).
const TCP_CLOSE: u8 = 7;

/// The kernel's socket-diagnostics channel, opened on first use and shared by the tunnel's
/// threads (one request and its answer at a time: a few microseconds).
#[derive(Default)]
pub struct Reaper {
    socket: Mutex<Option<Socket>>,
    /// Sequence numbers, so an answer is matched to its request.
    sequence: AtomicU32,
    /// A failure that will not go away (no `SOCK_DESTROY` in this kernel, no permission) is
    /// logged once, not per connection.
    warned: AtomicBool,
}

/// The identity of a pod-facing socket, read before it is closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leftover {
    pub local: SocketAddr,
    pub peer: SocketAddr,
    /// `SO_COOKIE`: a TIME_WAIT keeps the cookie of the socket it replaces.
    pub cookie: u64,
}

/// What [`Reaper::remove`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Removed {
    /// The socket's TIME_WAIT is gone.
    TimeWait,
    /// Nothing with that tuple and cookie was left.
    Nothing,
}

impl Leftover {
    /// Names a connected pod-facing socket. Call it while the connection is set up: the cookie
    /// is made on first request, and a TIME_WAIT only inherits one made before it existed.
    ///
    /// # Errors
    /// The socket is not connected, or `SO_COOKIE` fails.
    pub fn of(stream: &TcpStream) -> io::Result<Self> {
        Ok(Self {
            local: stream.local_addr()?,
            peer: stream.peer_addr()?,
            cookie: SockRef::from(stream).cookie()?,
        })
    }
}

impl Reaper {
    /// Closes `stream`, whose both halves are done (we read the pod's FIN and sent ours), and
    /// removes the TIME_WAIT it leaves, which `leftover` ([`Leftover::of`] the same socket)
    /// names. A socket that is not closed yet on our side (the pod closed first and our FIN
    /// awaits its ACK) leaves none and is just dropped. `stats` counts what was removed and
    /// what could not be (`time_wait_*`).
    pub fn close(&self, stream: TcpStream, leftover: &Leftover, stats: &TunnelStats) {
        let closed = match tcp_state(&stream) {
            // The full socket moved to TIME_WAIT (or was reset): only a TIME_WAIT can carry its
            // cookie now.
            Ok(state) => state == TCP_CLOSE,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read a closing socket's state");
                false
            }
        };
        drop(stream);
        if !closed {
            return;
        }
        match self.remove(leftover) {
            Ok(Removed::TimeWait) => TunnelStats::add(&stats.time_wait_removed, 1),
            Ok(Removed::Nothing) => {}
            Err(e) => {
                TunnelStats::add(&stats.time_wait_failed, 1);
                if !self.warned.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        local = %leftover.local,
                        peer = %leftover.peer,
                        error = %e,
                        "cannot remove a proxied connection's TIME_WAIT (SOCK_DESTROY); \
                         plaintext connections reusing its 4-tuple through this node may \
                         stall until it expires (60 s). Logged once; counted in \
                         nodeward_tunnel_time_wait_total{{result=\"failed\"}}"
                    );
                }
            }
        }
    }

    /// Asks the kernel to destroy the socket `leftover` names (4-tuple and cookie).
    ///
    /// `Removed::Nothing` when no socket has that tuple and cookie: already gone, or another
    /// socket (a new connection) holds the tuple now (the kernel answers `ENOENT` for both).
    ///
    /// # Errors
    /// The netlink channel cannot be opened or used, or the kernel refuses: `EOPNOTSUPP` without
    /// `CONFIG_INET_DIAG_DESTROY`, `EPERM` without `CAP_NET_ADMIN`.
    pub fn remove(&self, leftover: &Leftover) -> io::Result<Removed> {
        let sequence = self.sequence.fetch_add(1, Ordering::Relaxed);
        let request = destroy_request(leftover, sequence);
        let mut guard = self
            .socket
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if guard.is_none() {
            *guard = Some(open()?);
        }
        let socket = guard.as_ref().expect("just opened");
        socket.send(&request, 0)?;
        // The kernel answers within `send`. An answer to an earlier request whose reader gave
        // up (it cannot happen, but a mismatch must not be taken for this answer) is skipped.
        let answer = loop {
            let mut buf = Vec::with_capacity(512);
            socket.recv(&mut buf, 0)?;
            let answer = NetlinkMessage::<SockDiagMessage>::deserialize(&buf)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            if answer.header.sequence_number == sequence {
                break answer;
            }
        };
        match answer.payload {
            NetlinkPayload::Error(e) if e.code.is_none() => Ok(Removed::TimeWait),
            NetlinkPayload::Error(e) if e.raw_code().abs() == libc::ENOENT => Ok(Removed::Nothing),
            NetlinkPayload::Error(e) => Err(e.to_io()),
            other => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unexpected answer to SOCK_DESTROY: {other:?}"),
            )),
        }
    }
}

fn tcp_state(stream: &TcpStream) -> io::Result<u8> {
    use std::os::fd::AsRawFd as _;
    // SAFETY: tcp_info is plain old data; all zeroes is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::tcp_info>())
        .expect("tcp_info fits a socklen_t");
    // SAFETY: getsockopt writes at most `len` bytes into `info`, which is that large.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info.tcpi_state)
}

fn open() -> io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&netlink_sys::SocketAddr::new(0, 0))?;
    // The kernel answers within `send`; never wait on a missing answer.
    socket.set_non_blocking(true)?;
    Ok(socket)
}

/// `SOCK_DESTROY` for exactly `leftover`: its tuple (as the socket sees it: source = local) and
/// its cookie, asking for an acknowledgement.
fn destroy_request(leftover: &Leftover, sequence: u32) -> Vec<u8> {
    let local = canonical(leftover.local);
    let peer = canonical(leftover.peer);
    let family = if local.is_ipv4() { AF_INET } else { AF_INET6 };
    let cookie = leftover.cookie;
    let mut cookie_bytes = [0u8; 8];
    // `idiag_cookie` is two host-order u32s, low half first (`sock_diag_check_cookie`).
    #[expect(
        clippy::cast_possible_truncation,
        reason = "splitting a u64 into halves"
    )]
    {
        cookie_bytes[..4].copy_from_slice(&(cookie as u32).to_ne_bytes());
        cookie_bytes[4..].copy_from_slice(&((cookie >> 32) as u32).to_ne_bytes());
    }
    let request = InetRequest {
        family,
        protocol: IPPROTO_TCP,
        extensions: ExtensionFlags::empty(),
        states: StateFlags::all(),
        socket_id: SocketId {
            source_port: local.port(),
            destination_port: peer.port(),
            source_address: local.ip(),
            destination_address: peer.ip(),
            interface_id: 0,
            cookie: cookie_bytes,
        },
    };
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK;
    header.sequence_number = sequence;
    let mut message = NetlinkMessage::new(
        header,
        NetlinkPayload::InnerMessage(SockDiagDestroy::new(SockDiagMessage::InetRequest(request))),
    );
    message.finalize();
    let mut buf = vec![0u8; message.buffer_len()];
    message.serialize(&mut buf);
    buf
}

/// An IPv4-mapped address as the IPv4 socket it is.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_names_the_tuple_and_the_cookie_in_the_kernel_layout() {
        let leftover = Leftover {
            local: "10.244.2.11:8080".parse().unwrap(),
            peer: "10.244.1.10:40000".parse().unwrap(),
            cookie: 0x0000_0001_0000_0002,
        };
        let buf = destroy_request(&leftover, 9);
        // nlmsghdr (16) + inet_diag_req_v2 (56).
        assert_eq!(buf.len(), 72);
        assert_eq!(u16::from_ne_bytes([buf[4], buf[5]]), 21, "SOCK_DESTROY");
        assert_eq!(
            u32::from_ne_bytes([buf[8], buf[9], buf[10], buf[11]]),
            9,
            "sequence"
        );
        assert_eq!(
            u16::from_ne_bytes([buf[6], buf[7]]),
            NLM_F_REQUEST | NLM_F_ACK
        );
        let req = &buf[16..];
        assert_eq!((req[0], req[1]), (AF_INET, IPPROTO_TCP));
        let id = &req[8..];
        assert_eq!(&id[0..2], &8080u16.to_be_bytes(), "sport: the local port");
        assert_eq!(&id[2..4], &40000u16.to_be_bytes(), "dport: the peer's");
        assert_eq!(&id[4..8], &[10, 244, 2, 11], "src: the local address");
        assert_eq!(&id[20..24], &[10, 244, 1, 10], "dst: the peer's");
        assert_eq!(&id[40..44], &2u32.to_ne_bytes(), "cookie, low half first");
        assert_eq!(&id[44..48], &1u32.to_ne_bytes());
    }

    #[test]
    fn a_mapped_ipv4_tuple_is_asked_for_as_ipv4_and_ipv6_as_ipv6() {
        let mapped = Leftover {
            local: "[::ffff:10.0.0.1]:80".parse().unwrap(),
            peer: "[::ffff:10.0.0.2]:9".parse().unwrap(),
            cookie: 1,
        };
        assert_eq!(destroy_request(&mapped, 1)[16], AF_INET);
        let v6 = Leftover {
            local: "[fd00::1]:80".parse().unwrap(),
            peer: "[fd00::2]:9".parse().unwrap(),
            cookie: 1,
        };
        let buf = destroy_request(&v6, 1);
        assert_eq!(buf[16], AF_INET6);
        assert_eq!(
            &buf[16 + 8 + 4..16 + 8 + 20],
            &"fd00::1".parse::<std::net::Ipv6Addr>().unwrap().octets()
        );
    }
}
