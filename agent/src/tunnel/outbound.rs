//! The outbound side: the transparent listeners the datapath hands meshed connections to, and
//! for each accepted connection a CONNECT to the destination node's agent.
//!
//! The accepted socket's peer is the pod (its own address and port) and its local address is
//! where the pod wanted to go. A connection the tunnel cannot carry (the source or destination
//! no longer a pod, no certificate, the peer agent unreachable, a 401 or 503) is reset at once,
//! so the pod's connect fails promptly instead of hanging.

use std::net::SocketAddr;
use std::sync::Arc;

use agent_common::{DIR_EGRESS, mesh::OUTBOUND_PORT};
use bytes::Bytes;
use h2::{RecvStream, SendStream};
use tokio::net::{TcpListener, TcpStream};

use super::net::{reset_on_close, transparent_listener};
use super::pool::{Lease, Pool};
use super::splice::{h2_io, splice};
use super::timewait::Leftover;
use super::view::Workload;
use super::{Context, Gauge, TunnelError, TunnelStats};
use crate::flows::TunnelRecord;

/// The outbound listeners, `127.0.0.1:15001` and (where the node has IPv6) `[::1]:15001`:
/// loopback, so nothing off the node can reach them; the datapath's `sk_lookup` program hands
/// connections to them.
///
/// # Errors
/// The IPv4 listener cannot be made (`IP_TRANSPARENT` needs `CAP_NET_ADMIN`, or the port is
/// taken).
pub fn listeners() -> std::io::Result<(std::net::TcpListener, Option<std::net::TcpListener>)> {
    let v4 = transparent_listener(SocketAddr::from(([127, 0, 0, 1], OUTBOUND_PORT)))?;
    let v6 = match transparent_listener(SocketAddr::from((
        std::net::Ipv6Addr::LOCALHOST,
        OUTBOUND_PORT,
    ))) {
        Ok(l) => Some(l),
        Err(e) => {
            // IPv6 disabled on the node: IPv6 pods cannot exist there either.
            tracing::warn!(error = %e, "no IPv6 outbound listener; tunnelling IPv4 only");
            None
        }
    };
    Ok((v4, v6))
}

/// Accepts until the task is dropped.
pub async fn serve(listener: TcpListener, ctx: Arc<Context>, pool: Arc<Pool>) {
    super::accept_each(listener, "outbound", |stream, peer| {
        handle(stream, peer, ctx.clone(), pool.clone())
    })
    .await;
}

/// A stream the peer agent accepted (200), ready to carry a connection.
pub struct Opened {
    pub send: SendStream<Bytes>,
    pub recv: RecvStream,
    /// Holds the stream's place on its pooled connection.
    pub lease: Lease,
}

async fn handle(stream: TcpStream, peer: SocketAddr, ctx: Arc<Context>, pool: Arc<Pool>) {
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    let Ok(local) = stream.local_addr() else {
        return;
    };
    let dst = SocketAddr::new(local.ip().to_canonical(), local.port());
    let _ = stream.set_nodelay(true);
    // Names the socket for the TIME_WAIT removal at its end (see `timewait`).
    let leftover = Leftover::of(&stream);
    let view = ctx.view();
    // The mesh modes are not asked again: the datapath steered this connection here under the
    // modes of that moment, and this view follows a change only after the maps do (and the
    // destination's agent applies it on its own time). A connection steered across a mesh change
    // is carried as it was steered, not reset; new connections follow the datapath.
    let source = view.workload(peer.ip()).filter(|w| w.local).cloned();
    let destination = view.workload(dst.ip()).cloned();
    let identities = (
        view.compiled.ipcache_lookup(peer.ip()).unwrap_or_default(),
        view.compiled.ipcache_lookup(dst.ip()).unwrap_or_default(),
    );
    // An HTTP Service port: requests are routed one by one (`crate::http::proxy`).
    let http = source.as_ref().and_then(|s| {
        crate::http::Dialled::dialled(view.http.as_ref(), peer, dst).map(|k| (s.clone(), k))
    });
    drop(view);
    if let Some((source, service)) = http {
        crate::http::proxy::serve(stream, peer, dst, source, service, ctx, pool).await;
        return;
    }
    let record = |forwarded: bool, drop_reason: &'static str, note: String| TunnelRecord {
        source: peer,
        destination: dst,
        source_spiffe_id: source
            .as_ref()
            .map(|w| w.identity.uri())
            .unwrap_or_default(),
        destination_spiffe_id: destination
            .as_ref()
            .map(|w| w.identity.uri())
            .unwrap_or_default(),
        direction: DIR_EGRESS,
        forwarded,
        drop_reason,
        rule_id: 0,
        source_identity: identities.0,
        destination_identity: identities.1,
        note,
        local: false,
    };
    // Both pods on this node: no TLS to our own 15008 (see `local`), unless `rules.http` checks
    // this pair's requests, which only the HBONE server's HTTP authorization does: such a
    // connection takes the tunnel to this node's own server as before.
    if let (Some(s), Some(d)) = (&source, &destination)
        && d.local
        && !crate::http::authz::restricted(&ctx, &s.identity, peer, dst)
    {
        super::local::carry(ctx, stream, peer, dst, s.clone(), d.clone(), identities).await;
        return;
    }
    let opened = match (&source, &destination) {
        (Some(s), Some(d)) => open(&ctx, &pool, s, d, peer, dst).await,
        (None, _) => Err(TunnelError::UnknownSource(peer.ip())),
        (_, None) => Err(TunnelError::UnknownDestination(dst)),
    };
    let opened = match opened {
        Ok(opened) => opened,
        Err(e) => {
            let (counter, reason) = match &e {
                TunnelError::Refused { status: 401, .. } => {
                    (&ctx.stats.outbound_denied, "POLICY_DENIED")
                }
                _ => (&ctx.stats.outbound_failed, "PROXY_CONNECT_FAILED"),
            };
            TunnelStats::add(counter, 1);
            tracing::info!(source = %peer, destination = %dst, error = %e, "tunnel refused a connection");
            (ctx.flows)(&record(false, reason, e.to_string()));
            reset_on_close(&stream);
            return;
        }
    };
    TunnelStats::add(&ctx.stats.outbound_ok, 1);
    (ctx.flows)(&record(true, "", String::new()));
    let _active = Gauge::up(&ctx.stats.outbound_active);
    let Opened { send, recv, lease } = opened;
    let mut stream = stream;
    match splice(
        &mut stream,
        send,
        recv,
        &ctx.stats.bytes_sent,
        &ctx.stats.bytes_received,
    )
    .await
    {
        // The socket's local address is the destination pod's: leave no TIME_WAIT with it.
        Ok(_) => match &leftover {
            Ok(leftover) => ctx.time_wait.close(stream, leftover, &ctx.stats),
            Err(e) => tracing::debug!(error = %e, "cannot name a closing socket"),
        },
        // Closed as before (a FIN after what was queued); see `timewait` for what this leaves.
        Err(e) => {
            tracing::debug!(source = %peer, destination = %dst, error = %e, "tunnelled connection ended with an error");
        }
    }
    drop(lease);
}

/// Opens a stream from `source` (at `peer`) to `dst` on `destination`'s node agent.
///
/// # Errors
/// No route to the destination's node, no certificate, the peer unreachable, or a CONNECT it
/// refused (401, 503) or did not answer in time.
pub async fn open(
    ctx: &Arc<Context>,
    pool: &Arc<Pool>,
    source: &Workload,
    destination: &Workload,
    peer: SocketAddr,
    dst: SocketAddr,
) -> Result<Opened, TunnelError> {
    let node = destination.hbone_peer(dst.ip(), ctx.config.peer_port);
    let (hbone, route) = match ctx.config.dial {
        // A pod elsewhere: its own address. A pod on this node: the node's (see
        // `net::HboneRoutes`: what the node itself sends keeps the main table).
        super::HboneDial::Pod if !destination.local => (
            SocketAddr::new(dst.ip(), ctx.config.peer_port),
            super::pool::Route { fallback: node },
        ),
        super::HboneDial::Pod | super::HboneDial::Node => (
            node.ok_or(TunnelError::UnknownDestination(dst))?,
            super::pool::Route::default(),
        ),
    };
    if let Err(e) = ctx.certs.get(&source.identity) {
        return Err(TunnelError::NoCertificate {
            identity: source.identity.uri(),
            reason: e.to_string(),
        });
    }
    let broken = |reason: String| TunnelError::Broken {
        peer: hbone,
        reason,
    };
    let lease = pool
        .lease(
            ctx,
            &source.identity,
            hbone,
            &destination.identity,
            dst.ip(),
            route,
        )
        .await?;
    let request = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(dst.to_string())
        .header(http::header::FORWARDED, forwarded_for(peer))
        .body(())
        .map_err(|e| broken(e.to_string()))?;
    let exchange = async {
        let mut sender = lease
            .sender()
            .ready()
            .await
            .map_err(|e| broken(h2_io(e).to_string()))?;
        let (response, send) = sender
            .send_request(request, false)
            .map_err(|e| broken(h2_io(e).to_string()))?;
        let response = response.await.map_err(|e| broken(h2_io(e).to_string()))?;
        Ok::<_, TunnelError>((response, send))
    };
    let (response, send) = tokio::time::timeout(ctx.config.handshake_timeout, exchange)
        .await
        .map_err(|_| {
            broken(format!(
                "no answer to the CONNECT within {:?}",
                ctx.config.handshake_timeout
            ))
        })??;
    if response.status() != http::StatusCode::OK {
        return Err(TunnelError::Refused {
            peer: hbone,
            status: response.status().as_u16(),
        });
    }
    Ok(Opened {
        send,
        recv: response.into_body(),
        lease,
    })
}

/// `Forwarded: for="10.0.0.1:41234"` (RFC 7239; quoted, as an address with a port must be).
#[must_use]
pub fn forwarded_for(addr: SocketAddr) -> String {
    format!("for=\"{addr}\"")
}

/// The `for=` address of a `Forwarded` header as [`forwarded_for`] writes it (the first
/// element, the one the sending agent set).
#[must_use]
pub fn parse_forwarded_for(value: &str) -> Option<SocketAddr> {
    let first = value.split(',').next()?;
    first.split(';').find_map(|pair| {
        let (name, v) = pair.trim().split_once('=')?;
        if !name.eq_ignore_ascii_case("for") {
            return None;
        }
        v.trim_matches('"').parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_round_trips_both_families() {
        for addr in ["10.0.0.1:41234", "[fd00:244:1::5]:8080"] {
            let addr: SocketAddr = addr.parse().unwrap();
            assert_eq!(parse_forwarded_for(&forwarded_for(addr)), Some(addr));
        }
        assert_eq!(
            parse_forwarded_for("proto=https;For=\"10.1.2.3:9\", for=\"10.9.9.9:1\""),
            Some("10.1.2.3:9".parse().unwrap())
        );
        assert_eq!(parse_forwarded_for("for=unknown"), None);
        assert_eq!(parse_forwarded_for(""), None);
    }
}
