//! The mTLS tunnel: pod-to-pod TCP between meshed pods, carried by the node agents over HBONE
//! (HTTP/2 CONNECT over mutual TLS 1.3, port 15008), with SPIFFE identities.
//!
//! ```text
//!  pod A ──TCP──▶ [from_workload marks, to_proxy hands it over] ──▶ outbound listener
//!                   agent 1: A's certificate, CONNECT B:8080, forwarded: for=A
//!                 ══ mTLS + h2 (pooled per source identity and destination node) ══▶
//!  agent 2 (:15008): verify the chain and trust domain, B's ingress policy with the
//!                   certificate's identity, connect to B *from A's address* ──TCP──▶ pod B
//! ```
//!
//! * [`outbound`]: the transparent listeners the datapath steers meshed connections to; the
//!   accepted socket's local address is the original destination.
//! * [`pool`]: HBONE client connections per (source identity, destination node), with a stream
//!   limit and an idle timeout.
//! * [`inbound`]: the HBONE server: authorization by the certificate's identity against the
//!   same compiled policy the kernel enforces, then a transparent connect to the pod.
//! * [`splice`]: bytes between a TCP socket and an h2 stream, with flow control and half-close.
//! * [`view`]: who is where (pods, their identities, nodes and mesh modes), swapped after every
//!   sync.
//! * [`net`]: socket options and the policy route the interception needs.
//! * [`local`]: the same-node fast path: both pods on this node, authorized as the server
//!   would, bytes joined in the kernel (sockmap) rather than through TLS to our own 15008.
//! * [`timewait`]: closing pod-facing sockets without leaving the pods' 4-tuples in TIME_WAIT in
//!   the node's namespace, where they would swallow forwarded plaintext SYNs.

pub mod inbound;
pub mod local;
pub mod net;
pub mod outbound;
pub mod pool;
pub mod splice;
pub mod timewait;
pub mod view;

#[cfg(test)]
pub(crate) mod testing;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::ca::manager::CertManager;
use crate::ca::tls::Trust;
use crate::flows::TunnelRecord;

pub use view::{MeshView, Workload};

/// The HBONE port.
pub const HBONE_PORT: u16 = 15008;

/// Tunnel settings, validated once at start-up.
#[derive(Clone, Debug)]
pub struct TunnelConfig {
    /// Where the HBONE server listens (`--hbone-addr`, default `[::]:15008`).
    pub hbone_addr: SocketAddr,
    /// The port of the peers' HBONE servers.
    pub peer_port: u16,
    /// Streams per pooled HBONE connection before another one is opened.
    pub max_streams_per_connection: usize,
    /// A pooled connection without streams for this long is closed.
    pub idle_timeout: Duration,
    /// TCP connect plus TLS and HTTP/2 handshakes, either side.
    pub handshake_timeout: Duration,
    /// Connecting to the destination pod (server side).
    pub connect_timeout: Duration,
    /// Concurrent streams one client connection may open on our server.
    pub max_concurrent_streams: u32,
    /// Which address the HBONE client dials (`--hbone-dial`).
    pub dial: HboneDial,
}

/// Where the HBONE client connects for a destination pod, and whether this node takes
/// connections at its pods' addresses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HboneDial {
    /// The destination pod's own address, port 15008, as ambient's ztunnel does; this node
    /// delivers its own pods' `podIP:15008` to its agent (`net::HboneRoutes`). A pod address
    /// that refuses or stays silent (its node's agent is down, predates this or runs `node`)
    /// is dialled again at the node's address.
    #[default]
    Pod,
    /// The destination node's address, the pod named in the TLS server name (no routes on
    /// this node).
    Node,
}

impl Default for TunnelConfig {
    fn default() -> Self {
        Self {
            hbone_addr: SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, HBONE_PORT)),
            peer_port: HBONE_PORT,
            max_streams_per_connection: 100,
            idle_timeout: Duration::from_secs(60),
            handshake_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            max_concurrent_streams: 1024,
            dial: HboneDial::default(),
        }
    }
}

/// Counters for metrics and status. Label sets are fixed here, so cardinality is bounded.
#[derive(Debug, Default)]
pub struct TunnelStats {
    /// Outbound connections (pods' connections into the tunnel), by outcome.
    pub outbound_ok: AtomicU64,
    pub outbound_denied: AtomicU64,
    pub outbound_failed: AtomicU64,
    /// Inbound streams (CONNECTs on our server), by outcome.
    pub inbound_ok: AtomicU64,
    pub inbound_denied: AtomicU64,
    pub inbound_failed: AtomicU64,
    /// Streams open right now, each side.
    pub outbound_active: AtomicU64,
    pub inbound_active: AtomicU64,
    /// HBONE (TLS) connections made and accepted.
    pub client_connections: AtomicU64,
    pub server_connections: AtomicU64,
    /// Pooled client connections open now.
    pub pool_open: AtomicU64,
    /// Handshakes refused or failed, by side.
    pub client_handshake_failures: AtomicU64,
    pub server_handshake_failures: AtomicU64,
    /// Payload bytes, by direction as the pod sees them.
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    /// TIME_WAITs of closed pod-facing sockets removed, and removals that failed (see
    /// [`timewait`]).
    pub time_wait_removed: AtomicU64,
    pub time_wait_failed: AtomicU64,
    /// Same-node connections (both pods on this node, no TLS: [`local`]) by how their bytes
    /// moved: joined in the kernel, or copied in user space.
    pub local_kernel: AtomicU64,
    pub local_user: AtomicU64,
}

impl TunnelStats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    #[must_use]
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// Decrements a gauge when dropped (an active stream ending by any path).
pub struct Gauge<'a>(&'a AtomicU64);

impl<'a> Gauge<'a> {
    pub fn up(counter: &'a AtomicU64) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(counter)
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Where tunnel flows go (the agent's flow store, log and metrics).
pub type FlowSink = Arc<dyn Fn(&TunnelRecord) + Send + Sync>;

/// What both sides of the tunnel share: inputs only, assembled in `app.rs`.
pub struct Context {
    pub config: TunnelConfig,
    pub view: RwLock<Arc<MeshView>>,
    pub certs: CertManager,
    pub trust: Trust,
    pub stats: TunnelStats,
    pub flows: FlowSink,
    /// Connections the HBONE server carries now, re-authorized after every policy change.
    pub live: inbound::LiveStreams,
    /// Removes the TIME_WAITs that closed pod-facing sockets leave.
    pub time_wait: timewait::Reaper,
    /// The HTTP proxy's metrics and flow sink (see [`crate::http`]).
    pub http: crate::http::HttpShared,
    /// The same-node fast path's kernel side, once attached (unset: user-space copies).
    pub local: std::sync::OnceLock<local::Kernel>,
}

impl Context {
    /// The current view (cheap: an `Arc` clone).
    #[must_use]
    pub fn view(&self) -> Arc<MeshView> {
        self.view
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Swaps in a new view, then ends the carried connections its policy no longer allows (as
    /// the kernel stops a live flow whose allow was revoked).
    pub fn set_view(&self, view: MeshView) {
        self.set_shared_view(Arc::new(view));
    }

    /// [`Context::set_view`] of a view the caller keeps too.
    pub fn set_shared_view(&self, view: Arc<MeshView>) {
        *self
            .view
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = view;
        inbound::reauthorize(self);
    }
}

/// Runs the tunnel's listeners on a runtime of its own (two workers), so the control loop (a
/// compile at a thousand pods takes tens of milliseconds, on the main runtime) never delays the
/// data path. On the 2-core lab, two workers beat one on request/response latency (p50 185
/// against 205-280 µs, p99 about half) at the same throughput: an idle worker spinning for
/// work answers a wakeup sooner than a parked thread.
///
/// # Errors
/// The thread or its runtime cannot be started.
pub fn run(
    ctx: Arc<Context>,
    outbound: Vec<std::net::TcpListener>,
    hbone: std::net::TcpListener,
    acceptor: inbound::Acceptor,
) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("nodeward-tunnel")
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("nodeward-tunnel-main".into())
        .spawn(move || {
            runtime.block_on(async move {
                let pool = Arc::new(pool::Pool::default());
                for listener in outbound {
                    match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => {
                            tokio::spawn(outbound::serve(l, ctx.clone(), pool.clone()));
                        }
                        Err(e) => tracing::error!(error = %e, "outbound listener unusable"),
                    }
                }
                match tokio::net::TcpListener::from_std(hbone) {
                    Ok(l) => inbound::serve(l, acceptor, ctx).await,
                    Err(e) => tracing::error!(error = %e, "HBONE listener unusable"),
                }
            });
        })?;
    Ok(())
}

/// Accepts on `listener` until the task is dropped, each connection in a task of its own. A
/// failed accept (out of descriptors or memory) backs off rather than spinning.
pub async fn accept_each<F>(
    listener: tokio::net::TcpListener,
    what: &'static str,
    mut handle: impl FnMut(tokio::net::TcpStream, SocketAddr) -> F,
) where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                tokio::spawn(handle(stream, peer));
            }
            Err(e) => {
                tracing::warn!(listener = what, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Why a tunnelled connection did not go through, as a flow and a log say it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TunnelError {
    #[error("{0} is not a pod of this node")]
    UnknownSource(std::net::IpAddr),
    #[error("{0} is not a pod")]
    UnknownDestination(SocketAddr),
    #[error("no certificate for {identity}: {reason}")]
    NoCertificate { identity: String, reason: String },
    #[error("connecting to the agent at {peer}: {reason}")]
    PeerUnreachable { peer: SocketAddr, reason: String },
    #[error("the agent at {peer} refused the CONNECT: {status}")]
    Refused { peer: SocketAddr, status: u16 },
    #[error("the tunnel to {peer} broke: {reason}")]
    Broken { peer: SocketAddr, reason: String },
}
