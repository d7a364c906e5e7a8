//! HBONE client connections, pooled per (source identity, peer address, destination
//! identity): the peer is the destination pod's `podIP:15008` as ambient dials it (so one
//! connection per destination pod), or its node's address with `--hbone-dial node`.
//!
//! A connection presents the source workload's certificate, so it can only carry that
//! workload's streams; it names the destination pod in its SNI and accepts only a server that
//! proves the destination workload's exact identity (as ztunnel checks the SAN it expects for
//! the destination pod): a node agent that merely belongs to the trust domain, or holds another
//! workload's certificate, cannot terminate it. A connection carries at most
//! `max_streams_per_connection` streams (then another is opened), only to pods of that one
//! identity, and closes after `idle_timeout` without streams. A failed connection leaves the
//! pool at once, so the next stream dials again: when a peer agent comes back, new connections
//! succeed immediately.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use tokio::net::TcpStream;
use tokio::sync::Mutex as AsyncMutex;

use super::splice::{CONNECTION_WINDOW, MAX_FRAME, STREAM_WINDOW};
use super::{Context, TunnelError, TunnelStats};
use crate::ca::SpiffeId;
use crate::ca::tls::{self, CertResolver, ExpectedServer};

/// How to reach a peer besides its address.
#[derive(Clone, Copy, Debug, Default)]
pub struct Route {
    /// Dialled when the peer address refuses or stays silent for [`POD_DIAL_TIMEOUT`]: the
    /// destination node's own address, when the peer is a pod's.
    pub fallback: Option<SocketAddr>,
}

/// How long a pod address may stay silent before its node's address is tried.
pub const POD_DIAL_TIMEOUT: Duration = Duration::from_secs(1);

async fn connect_tcp(peer: SocketAddr) -> std::io::Result<TcpStream> {
    TcpStream::connect(peer).await
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    source: SpiffeId,
    peer: SocketAddr,
    /// The identity the server must prove.
    destination: SpiffeId,
}

/// One HBONE connection and the streams on it.
pub struct Connection {
    send: SendRequest<Bytes>,
    streams: AtomicUsize,
    closed: AtomicBool,
}

/// A stream's claim on a pooled connection: counts the stream until dropped.
pub struct Lease {
    conn: Arc<Connection>,
}

impl Lease {
    /// A handle to open the stream with (h2's handles are cheap clones of one connection).
    #[must_use]
    pub fn sender(&self) -> SendRequest<Bytes> {
        self.conn.send.clone()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.conn.streams.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Default)]
pub struct Pool {
    conns: Mutex<HashMap<Key, Vec<Arc<Connection>>>>,
    /// One dial at a time per key, so a burst of new streams shares one new connection.
    dialing: Mutex<HashMap<Key, Arc<AsyncMutex<()>>>>,
}

impl Pool {
    /// A connection for a stream from `source` to the pod at `pod`, whose workload is
    /// `destination`, through the node agent at `peer`: a pooled one with room, or a new one.
    ///
    /// # Errors
    /// No certificate for `source`, or the peer cannot be reached or refuses the handshake
    /// (among others when it does not prove `destination`).
    pub async fn lease(
        self: &Arc<Self>,
        ctx: &Arc<Context>,
        source: &SpiffeId,
        peer: SocketAddr,
        destination: &SpiffeId,
        pod: IpAddr,
        route: Route,
    ) -> Result<Lease, TunnelError> {
        let key = Key {
            source: source.clone(),
            peer,
            destination: destination.clone(),
        };
        if let Some(lease) = self.find(&key, ctx.config.max_streams_per_connection) {
            return Ok(lease);
        }
        let gate = self
            .dialing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(key.clone())
            .or_default()
            .clone();
        let _dialing = gate.lock().await;
        // Another stream may have dialed while this one waited.
        if let Some(lease) = self.find(&key, ctx.config.max_streams_per_connection) {
            return Ok(lease);
        }
        let conn = self.dial(ctx, &key, pod, route).await?;
        conn.streams.fetch_add(1, Ordering::Relaxed);
        self.conns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(key)
            .or_default()
            .push(conn.clone());
        Ok(Lease { conn })
    }

    fn find(&self, key: &Key, max_streams: usize) -> Option<Lease> {
        let mut conns = self
            .conns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let list = conns.get_mut(key)?;
        list.retain(|c| !c.closed.load(Ordering::Relaxed));
        let conn = list
            .iter()
            .find(|c| c.streams.load(Ordering::Relaxed) < max_streams)?
            .clone();
        conn.streams.fetch_add(1, Ordering::Relaxed);
        Some(Lease { conn })
    }

    /// Takes `conn` out of the pool if no stream uses it, under the same lock [`Pool::find`]
    /// leases under, so a stream never lands on a connection being closed.
    fn retire_if_idle(&self, key: &Key, conn: &Arc<Connection>) -> bool {
        let mut conns = self
            .conns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if conn.streams.load(Ordering::Relaxed) != 0 {
            return false;
        }
        conn.closed.store(true, Ordering::Relaxed);
        if let Some(list) = conns.get_mut(key) {
            list.retain(|c| !Arc::ptr_eq(c, conn));
            if list.is_empty() {
                conns.remove(key);
            }
        }
        true
    }

    fn remove(&self, key: &Key, conn: &Arc<Connection>) {
        let mut conns = self
            .conns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(list) = conns.get_mut(key) {
            list.retain(|c| !Arc::ptr_eq(c, conn));
            if list.is_empty() {
                conns.remove(key);
            }
        }
    }

    async fn dial(
        self: &Arc<Self>,
        ctx: &Arc<Context>,
        key: &Key,
        pod: IpAddr,
        route: Route,
    ) -> Result<Arc<Connection>, TunnelError> {
        let unreachable = |reason: String| TunnelError::PeerUnreachable {
            peer: key.peer,
            reason,
        };
        let config = tls::client_config(
            &ctx.trust,
            CertResolver::new(ctx.certs.clone(), key.source.clone()),
            ExpectedServer::OneOf(vec![key.destination.clone()]),
        )
        .map_err(|e| unreachable(e.to_string()))?;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let handshake = async {
            let first = match route.fallback {
                Some(_) => tokio::time::timeout(POD_DIAL_TIMEOUT, connect_tcp(key.peer))
                    .await
                    .unwrap_or_else(|_| {
                        Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("no answer within {POD_DIAL_TIMEOUT:?}"),
                        ))
                    }),
                None => connect_tcp(key.peer).await,
            };
            let tcp = match (first, route.fallback) {
                (Ok(tcp), _) => tcp,
                // The pod's address refused or stayed silent: its node does not hand
                // `podIP:15008` to an agent (an older agent, not routed yet, or its agent is
                // down: the kernel cannot answer a reset from an address that is not its own).
                // The node's address answers at once, and its agent must prove the same
                // identity.
                (Err(e), Some(node))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    tracing::debug!(peer = %key.peer, node = %node, error = %e, "HBONE: dialling the pod's node instead");
                    connect_tcp(node)
                        .await
                        .map_err(|e2| unreachable(format!("{e2} (and {}: {e})", key.peer)))?
                }
                (Err(e), _) => return Err(unreachable(e.to_string())),
            };
            let _ = tcp.set_nodelay(true);
            let tls = connector
                .connect(tls::pod_server_name(pod), tcp)
                .await
                .map_err(|e| {
                    TunnelStats::add(&ctx.stats.client_handshake_failures, 1);
                    unreachable(tls::describe_handshake_error(&e))
                })?;
            h2::client::Builder::new()
                .initial_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONNECTION_WINDOW)
                .max_frame_size(MAX_FRAME)
                .enable_push(false)
                .handshake::<_, Bytes>(tls)
                .await
                .map_err(|e| unreachable(format!("HTTP/2 handshake: {e}")))
        };
        let (send, connection) = tokio::time::timeout(ctx.config.handshake_timeout, handshake)
            .await
            .map_err(|_| {
                unreachable(format!(
                    "no handshake within {:?}",
                    ctx.config.handshake_timeout
                ))
            })??;
        TunnelStats::add(&ctx.stats.client_connections, 1);
        let conn = Arc::new(Connection {
            send,
            streams: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
        });
        tokio::spawn(drive(
            Arc::downgrade(self),
            key.clone(),
            conn.clone(),
            connection,
            ctx.clone(),
        ));
        Ok(conn)
    }
}

/// Runs one connection until it fails or stays idle too long, then takes it out of the pool.
async fn drive<T>(
    pool: Weak<Pool>,
    key: Key,
    conn: Arc<Connection>,
    mut connection: h2::client::Connection<T, Bytes>,
    ctx: Arc<Context>,
) where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let _open = super::Gauge::up(&ctx.stats.pool_open);
    let idle_timeout = ctx.config.idle_timeout;
    let check = (idle_timeout / 4).max(Duration::from_millis(100));
    let mut idle_for = Duration::ZERO;
    loop {
        tokio::select! {
            result = &mut connection => {
                if let Err(e) = result {
                    tracing::debug!(peer = %key.peer, source = %key.source, error = %e, "HBONE connection ended");
                }
                break;
            }
            () = tokio::time::sleep(check) => {
                if conn.streams.load(Ordering::Relaxed) == 0 {
                    idle_for += check;
                } else {
                    idle_for = Duration::ZERO;
                }
                if idle_for >= idle_timeout
                    && pool.upgrade().is_none_or(|p| p.retire_if_idle(&key, &conn))
                {
                    break;
                }
            }
        }
    }
    conn.closed.store(true, Ordering::Relaxed);
    if let Some(pool) = pool.upgrade() {
        pool.remove(&key, &conn);
    }
    // Dropping the connection future closes the socket; streams still running on it (only
    // possible after a failure) end with an error.
}
