//! The same-node fast path: a meshed connection between two pods of this node, carried without
//! TLS or HTTP/2.
//!
//! The agent is both the HBONE client and the server, so it authorizes the connection itself,
//! with the server's own function ([`inbound::authorize`]) and the source pod's identity (from
//! the endpoint map; anti-spoofing in the datapath already guarantees the pod's address), and
//! connects to the destination pod from the source pod's address as the server does. Then the
//! two pod-facing sockets are joined in the kernel: `local_splice` (an `sk_skb` stream verdict
//! on `NW_LOCAL_PEERS`, `agent-ebpf/src/local.rs`) sends each socket's data out of its peer, and
//! no byte crosses user space. Where the program could not be attached (or a socket cannot join
//! the map), the bytes are copied in user space instead, which a log line and
//! `nodeward_tunnel_local_total{path="user"}` show.
//!
//! The kernel moves data but not the ends of streams: the agent watches both sockets for a FIN
//! or a reset only (`EPOLLRDHUP`, no `EPOLLIN`, so redirected data wakes nobody). On a FIN it
//! waits until the peer socket has taken every byte the kernel redirected to it (counted per
//! socket in `NW_LOCAL_BYTES`), then shuts the peer's write side: half-closes work as over the
//! tunnel. A reset on one side resets the other. At the end both sockets leave the map before
//! they are closed.
//!
//! Flows and metrics are those of a tunnelled connection on one node (an `EGRESS` and an
//! `INGRESS` flow, `Type` `TUNNEL` with both SPIFFE IDs), marked `tunnel_local`.

use std::io::{self, Read as _, Write as _};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use agent_common::{DIR_EGRESS, mesh::MARK_FROM_AGENT};
use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;

use super::inbound;
use super::net::{reset_on_close, transparent_connect};
use super::timewait::Leftover;
use super::view::Workload;
use super::{Context, Gauge, TunnelStats};
use crate::datapath::loader::LocalSplice;
use crate::flows::TunnelRecord;

/// The kernel side, shared by every same-node connection of the agent.
pub struct Kernel {
    maps: std::sync::Mutex<LocalSplice>,
}

impl Kernel {
    #[must_use]
    pub fn new(maps: LocalSplice) -> Self {
        Self {
            maps: std::sync::Mutex::new(maps),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LocalSplice> {
        self.maps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Joins `a` and `b` (cookies `ca`, `cb`). The entry that sends `b`'s data to `a` goes in
    /// last: until then `b`'s data stays on `b` for [`pump`] to read, so nothing is lost while
    /// the pair is half-made.
    fn join(
        &self,
        a: &std::net::TcpStream,
        ca: u64,
        b: &std::net::TcpStream,
        cb: u64,
    ) -> Result<Joined<'_>, aya::maps::MapError> {
        let joined = Joined {
            kernel: self,
            cookies: [ca, cb],
        };
        let mut maps = self.lock();
        maps.bytes.insert(ca, 0, 0)?;
        maps.bytes.insert(cb, 0, 0)?;
        maps.peers.insert(ca, b.as_raw_fd(), 0)?;
        maps.peers.insert(cb, a.as_raw_fd(), 0)?;
        drop(maps);
        Ok(joined)
    }

    /// Bytes the kernel redirected from the socket with `cookie` to its peer.
    fn redirected(&self, cookie: u64) -> u64 {
        self.lock().bytes.get(&cookie, 0).unwrap_or(0)
    }
}

/// A joined pair; leaves the maps when dropped (before the sockets close).
struct Joined<'a> {
    kernel: &'a Kernel,
    cookies: [u64; 2],
}

impl Drop for Joined<'_> {
    fn drop(&mut self) {
        let mut maps = self.kernel.lock();
        for cookie in self.cookies {
            // Absent when the join failed half-way or the kernel dropped a closed socket.
            let _ = maps.peers.remove(&cookie);
            let _ = maps.bytes.remove(&cookie);
        }
    }
}

/// Carries `stream` (accepted from `source` at `peer`, for `dst` on `destination`, both pods of
/// this node) to the destination pod.
pub(super) async fn carry(
    ctx: Arc<Context>,
    stream: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    source: Arc<Workload>,
    destination: Arc<Workload>,
    identities: (u32, u32),
) {
    let client = source.identity.clone();
    let egress = |forwarded: bool, drop_reason: &'static str, note: String| TunnelRecord {
        source: peer,
        destination: dst,
        source_spiffe_id: source.identity.uri(),
        destination_spiffe_id: destination.identity.uri(),
        direction: DIR_EGRESS,
        forwarded,
        drop_reason,
        rule_id: 0,
        source_identity: identities.0,
        destination_identity: identities.1,
        note,
        local: true,
    };
    let Some(decision) = inbound::authorize(&ctx, &client, peer, dst) else {
        // The view changed since the caller looked: not a pod of this node any more.
        TunnelStats::add(&ctx.stats.outbound_failed, 1);
        (ctx.flows)(&egress(
            false,
            "PROXY_CONNECT_FAILED",
            format!("{} is not a pod of this node", dst.ip()),
        ));
        reset_on_close(&stream);
        return;
    };
    let ingress = |forwarded: bool, drop_reason: &'static str, note: String| {
        let mut record = decision.record(&client, peer, dst, forwarded, drop_reason, note);
        record.local = true;
        record
    };
    if !decision.allowed {
        TunnelStats::add(&ctx.stats.inbound_denied, 1);
        TunnelStats::add(&ctx.stats.outbound_denied, 1);
        tracing::info!(source = %peer, destination = %dst, client = %client, reason = %decision.note, "same-node tunnel: denied");
        (ctx.flows)(&ingress(false, decision.drop_reason, decision.note.clone()));
        (ctx.flows)(&egress(
            false,
            "POLICY_DENIED",
            "denied on this node".into(),
        ));
        reset_on_close(&stream);
        return;
    }
    let pod = match transparent_connect(peer.ip(), dst, MARK_FROM_AGENT, ctx.config.connect_timeout)
        .await
    {
        Ok(pod) => pod,
        Err(e) => {
            TunnelStats::add(&ctx.stats.inbound_failed, 1);
            TunnelStats::add(&ctx.stats.outbound_failed, 1);
            tracing::info!(source = %peer, destination = %dst, error = %e, "same-node tunnel: the destination did not accept");
            let note = format!("connect: {e}");
            (ctx.flows)(&ingress(false, "PROXY_CONNECT_FAILED", note.clone()));
            (ctx.flows)(&egress(false, "PROXY_CONNECT_FAILED", note));
            reset_on_close(&stream);
            return;
        }
    };
    let _ = pod.set_nodelay(true);
    TunnelStats::add(&ctx.stats.outbound_ok, 1);
    TunnelStats::add(&ctx.stats.inbound_ok, 1);
    (ctx.flows)(&egress(true, "", String::new()));
    (ctx.flows)(&ingress(true, "", decision.note.clone()));
    let _active = (
        Gauge::up(&ctx.stats.outbound_active),
        Gauge::up(&ctx.stats.inbound_active),
    );
    let live = ctx.live.register(&client, peer, dst, false);
    // Both sockets carry pod addresses in the node's namespace (see `timewait`).
    let leftovers = (Leftover::of(&stream), Leftover::of(&pod));
    let moved = tokio::select! {
        moved = move_bytes(&ctx, stream, pod) => moved,
        () = live.revoked() => {
            // Dropping `move_bytes` closed both sockets (with a reset: see `Pair`).
            tracing::info!(source = %peer, destination = %dst, client = %client, "same-node tunnel: a policy change revoked a live connection");
            return;
        }
    };
    match moved {
        Ok((stream, pod)) => {
            for (socket, leftover) in [(stream, &leftovers.0), (pod, &leftovers.1)] {
                match leftover {
                    Ok(leftover) => ctx.time_wait.close(socket, leftover, &ctx.stats),
                    Err(e) => tracing::debug!(error = %e, "cannot name a closing socket"),
                }
            }
        }
        Err(e) => {
            tracing::debug!(source = %peer, destination = %dst, error = %e, "same-node connection ended with an error");
        }
    }
}

/// Moves both directions to their end, in the kernel where it can, and returns the sockets
/// (both directions ended cleanly) for the caller to close.
async fn move_bytes(
    ctx: &Context,
    a: TcpStream,
    b: TcpStream,
) -> io::Result<(TcpStream, TcpStream)> {
    if let Some(kernel) = ctx.local.get() {
        let (a, b) = (a.into_std()?, b.into_std()?);
        let cookies = (cookie(a.as_raw_fd()), cookie(b.as_raw_fd()));
        let joined = match cookies {
            // Only established sockets can join; checking both first keeps the second insert
            // from failing after the first (whose socket would then leave the map again, and
            // with it what it had received meanwhile).
            _ if !established(a.as_raw_fd()) || !established(b.as_raw_fd()) => {
                Err("a pod closed before the join".to_owned())
            }
            (Ok(ca), Ok(cb)) => kernel.join(&a, ca, &b, cb).map_err(|e| e.to_string()),
            (Err(e), _) | (_, Err(e)) => Err(e.to_string()),
        };
        match joined {
            Ok(joined) => {
                TunnelStats::add(&ctx.stats.local_kernel, 1);
                let mut pair = Pair {
                    sockets: [Some(a), Some(b)],
                    clean: false,
                };
                pump(kernel, &joined, &mut pair, &ctx.stats).await?;
                drop(joined);
                pair.clean = true;
                let [a, b] = pair.sockets.each_mut().map(Option::take);
                let (Some(a), Some(b)) = (a, b) else {
                    return Err(io::Error::other("a joined socket went missing"));
                };
                return Ok((TcpStream::from_std(a)?, TcpStream::from_std(b)?));
            }
            Err(e) => {
                // A pod that already closed cannot join (the map takes established sockets).
                tracing::debug!(error = %e, "same-node tunnel: a connection copied in user space");
                let (mut a, mut b) = (TcpStream::from_std(a)?, TcpStream::from_std(b)?);
                TunnelStats::add(&ctx.stats.local_user, 1);
                copy(&mut a, &mut b, &ctx.stats).await?;
                return Ok((a, b));
            }
        }
    }
    let (mut a, mut b) = (a, b);
    TunnelStats::add(&ctx.stats.local_user, 1);
    copy(&mut a, &mut b, &ctx.stats).await?;
    Ok((a, b))
}

/// The user-space fallback: both directions copied, each FIN passed on as a shutdown.
async fn copy(a: &mut TcpStream, b: &mut TcpStream, stats: &TunnelStats) -> io::Result<()> {
    let result = tokio::io::copy_bidirectional(a, b).await;
    match result {
        Ok((up, down)) => {
            TunnelStats::add(&stats.bytes_sent, up);
            TunnelStats::add(&stats.bytes_received, down);
            Ok(())
        }
        Err(e) => {
            reset_on_close(a);
            reset_on_close(b);
            Err(e)
        }
    }
}

/// The two sockets of a joined connection; closed with a reset unless the pair ended cleanly.
struct Pair {
    sockets: [Option<std::net::TcpStream>; 2],
    clean: bool,
}

impl Drop for Pair {
    fn drop(&mut self) {
        if self.clean {
            return;
        }
        for socket in self.sockets.iter().flatten() {
            let _ = socket2::SockRef::from(socket).set_linger(Some(Duration::ZERO));
        }
    }
}

/// How long a FIN waits for the bytes before it (in the kernel's queue for the peer socket) to
/// be taken by that socket: as long as a pod that does not read may hold them, bounded.
const DRAIN_LIMIT: Duration = Duration::from_secs(60);

/// Watches a joined pair until both directions ended: passes each FIN on once the data before
/// it went out, and answers a reset with a reset (an error).
async fn pump(
    kernel: &Kernel,
    joined: &Joined<'_>,
    pair: &mut Pair,
    stats: &TunnelStats,
) -> io::Result<()> {
    let [Some(a), Some(b)] = &pair.sockets else {
        return Err(io::Error::other("a joined socket went missing"));
    };
    let fds = [a.as_raw_fd(), b.as_raw_fd()];
    let epoll = Epoll::new(&fds)?;
    // SAFETY: `Epoll` owns its descriptor, which stays open and the same until it is dropped
    // with the `AsyncFd`.
    let epoll = unsafe { AsyncFd::register_with_interest(epoll, tokio::io::Interest::READABLE) }?;
    // What each side's socket had taken when it joined, and what the agent itself sent on.
    let base = [written(fds[0])?, written(fds[1])?];
    let mut copied = [0u64; 2];
    let mut open = [true, true];
    let counters = [&stats.bytes_sent, &stats.bytes_received];
    loop {
        for from in 0..2 {
            if !open[from] {
                continue;
            }
            let to = 1 - from;
            let (reader, writer) = if from == 0 { (a, b) } else { (b, a) };
            // The first read also hands what arrived before the join to the verdict program
            // (the kernel does that on a read of a joined socket with queued data).
            match read_on(reader, writer, counters[from])? {
                Some(n) => copied[from] += n,
                None => {
                    // A FIN: once the peer took all that went before it, pass it on.
                    let target = kernel.redirected(joined.cookies[from]) + copied[from];
                    drain(fds[to], base[to], target).await;
                    let _ = writer.shutdown(std::net::Shutdown::Write);
                    open[from] = false;
                    epoll.get_ref().remove(fds[from]);
                }
            }
        }
        if !open[0] && !open[1] {
            let redirected = [
                kernel.redirected(joined.cookies[0]),
                kernel.redirected(joined.cookies[1]),
            ];
            TunnelStats::add(&stats.bytes_sent, redirected[0]);
            TunnelStats::add(&stats.bytes_received, redirected[1]);
            return Ok(());
        }
        let mut guard = epoll.readable().await?;
        // Readiness first, then the reports: a report arriving after `clear` makes the epoll
        // readable again and wakes the next wait (the other order could lose it, and with it
        // a reset: the pair would then outlive its client).
        guard.clear_ready();
        guard.get_inner().clear();
    }
}

/// Reads what stayed on `reader` (data from before the join) and sends it on; `None` at a FIN.
fn read_on(
    mut reader: &std::net::TcpStream,
    mut writer: &std::net::TcpStream,
    counter: &AtomicU64,
) -> io::Result<Option<u64>> {
    let mut buf = [0u8; 16 * 1024];
    let mut total = 0u64;
    loop {
        match reader.read(&mut buf) {
            Ok(0) => return Ok(None),
            Ok(n) => {
                write_all(&mut writer, &buf[..n])?;
                TunnelStats::add(counter, n as u64);
                total += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Some(total)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Writes on a non-blocking socket; only the few bytes that arrived before a join take this
/// path, so waiting for room by polling is good enough.
fn write_all(writer: &mut &std::net::TcpStream, mut buf: &[u8]) -> io::Result<()> {
    let started = Instant::now();
    while !buf.is_empty() {
        match writer.write(buf) {
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if started.elapsed() > DRAIN_LIMIT {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the pod does not read",
                    ));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Waits (bounded) until the socket `fd` has taken `target` bytes more than at `base`.
async fn drain(fd: RawFd, base: u64, target: u64) {
    let started = Instant::now();
    let mut pause = Duration::from_micros(50);
    loop {
        match written(fd) {
            Ok(now) if now.saturating_sub(base) >= target => return,
            Ok(_) => {}
            // The socket failed: nothing more will leave it.
            Err(_) => return,
        }
        if started.elapsed() > DRAIN_LIMIT {
            tracing::debug!(
                target,
                "same-node tunnel: a FIN passed on before its data left"
            );
            return;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(10));
    }
}

/// Bytes the socket has taken to send since it was made: acknowledged plus still queued. Read
/// in that order, so a concurrent acknowledgement can only make it smaller than the truth.
fn written(fd: RawFd) -> io::Result<u64> {
    // `struct tcp_info` up to `tcpi_bytes_received`; `tcpi_bytes_acked` is its 16th u64.
    let mut info = [0u8; 17 * 8];
    if tcp_info(fd, &mut info)? < info.len() {
        return Err(io::Error::other("TCP_INFO without tcpi_bytes_acked"));
    }
    let mut acked = [0u8; 8];
    acked.copy_from_slice(&info[15 * 8..16 * 8]);
    let acked = u64::from_ne_bytes(acked);
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &raw mut queued) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(acked + u64::try_from(queued).unwrap_or(0))
}

/// Reads the first `buf.len()` bytes of the socket's `struct tcp_info`: how many the kernel wrote.
fn tcp_info(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    let mut len = libc::socklen_t::try_from(buf.len()).unwrap_or(0);
    // SAFETY: getsockopt writes at most `len` bytes into `buf`, which is that large.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            buf.as_mut_ptr().cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(len as usize)
}

/// `TCP_INFO`'s state is `TCP_ESTABLISHED`.
fn established(fd: RawFd) -> bool {
    let mut info = [0u8; 8];
    tcp_info(fd, &mut info).is_ok_and(|len| len >= 1 && info[0] == 1)
}

/// `SO_COOKIE`: the kernel's name for a socket, which the verdict program reads too.
fn cookie(fd: RawFd) -> io::Result<u64> {
    let mut value = 0u64;
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<u64>()).unwrap_or(0);
    // SAFETY: getsockopt writes at most `len` bytes into `value`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&raw mut value).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// An epoll instance that reports a FIN (`EPOLLRDHUP`), a reset (`EPOLLERR`) or a hang-up on
/// its sockets, and never their data.
struct Epoll(OwnedFd);

impl Epoll {
    fn new(fds: &[RawFd]) -> io::Result<Self> {
        // SAFETY: plain syscall; the result is checked before use.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if ep < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a descriptor we just made and own.
        let this = Self(unsafe { OwnedFd::from_raw_fd(ep) });
        for &fd in fds {
            let mut event = libc::epoll_event {
                events: (libc::EPOLLRDHUP | libc::EPOLLERR | libc::EPOLLHUP) as u32,
                u64: 0,
            };
            // SAFETY: valid descriptors and an event on the stack.
            let rc = unsafe {
                libc::epoll_ctl(this.0.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &raw mut event)
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(this)
    }

    /// Stops reporting `fd` (its FIN was handled; it would stay ready).
    fn remove(&self, fd: RawFd) {
        // SAFETY: valid descriptors; a null event is allowed for EPOLL_CTL_DEL.
        let _ = unsafe {
            libc::epoll_ctl(
                self.0.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                fd,
                std::ptr::null_mut(),
            )
        };
    }

    /// Takes the pending reports (which socket does not matter: both are read again).
    fn clear(&self) {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 4];
        // SAFETY: the buffer holds 4 events; timeout 0 never blocks.
        let _ = unsafe { libc::epoll_wait(self.0.as_raw_fd(), events.as_mut_ptr(), 4, 0) };
    }
}

impl std::os::fd::AsRawFd for Epoll {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}
