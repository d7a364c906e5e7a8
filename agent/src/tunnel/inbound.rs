//! The HBONE server (port 15008): mutual TLS, then HTTP/2 CONNECT streams, each authorized
//! against the destination pod's ingress policy with the identity the client's certificate
//! proves, then carried to the pod by a connection made from the original source address.
//!
//! Answers: 200 and the stream carries the connection; 401 when policy denies it (a DROPPED
//! flow names the rule); 503 when the destination is not a pod of this node or does not
//! answer; 400 and 405 for requests that are not a well-formed CONNECT. A handshake that fails
//! (plaintext, a foreign or expired certificate, a self-signed leaf, a stalled client) is
//! counted and logged and costs the listener nothing: every connection is its own task with a
//! handshake deadline, and each client connection may open at most
//! `max_concurrent_streams` streams.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use agent_common::{DIR_INGRESS, IDENTITY_WORLD, mesh::MARK_FROM_AGENT};
use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{Request, Response, StatusCode};
use tokio::net::{TcpListener, TcpStream};

use super::net::transparent_connect;
use super::outbound::parse_forwarded_for;
use super::splice::{CONNECTION_WINDOW, MAX_FRAME, STREAM_WINDOW, splice};
use super::timewait::Leftover;
use super::{Context, Gauge, TunnelStats};
use crate::ca::SpiffeId;
use crate::ca::tls::{self, CertResolver};
use crate::flows::TunnelRecord;
use crate::policy::model::PROTO_TCP;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// The TLS side of the server. A connection that arrived at a local pod's address (the
/// destination node hands `podIP:15008` to the agent: `net::HboneRoutes`) gets that pod's
/// certificate, whatever its server name says: the destination address is authoritative, as
/// in ambient. A connection to the node's own address gets the certificate of the local
/// workload its server name names ([`tls::pod_server_name`], `--hbone-dial node`); a name for no
/// local pod is refused, and a client that sends no pod name gets the node agent's own
/// certificate (pinned in the certificate manager, so it is renewed like the workloads'), which
/// a nodeward client never accepts for a pod. Either way a client certificate is required.
///
/// # Errors
/// The agent has no certificate, or the TLS configuration cannot be built.
pub fn acceptor(ctx: &Arc<Context>) -> Result<Acceptor, String> {
    let agent = SpiffeId::agent(ctx.trust.trust_domain()).map_err(|e| e.to_string())?;
    ctx.certs.pin(&agent).map_err(|e| e.to_string())?;
    let resolver = Arc::new(WorkloadResolver {
        ctx: Arc::downgrade(ctx),
        agent: CertResolver::new(ctx.certs.clone(), agent),
    });
    let config = tls::server_config(&ctx.trust, resolver).map_err(|e| e.to_string())?;
    Ok(Acceptor {
        fallback: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        pods: Some(Arc::new(PodAcceptors {
            ctx: Arc::downgrade(ctx),
            cache: std::sync::Mutex::default(),
        })),
    })
}

/// The HBONE server's TLS acceptors: one per local pod address connections arrive at, and the
/// server-name one for connections to the node's address (see [`acceptor`]).
#[derive(Clone)]
pub struct Acceptor {
    fallback: tokio_rustls::TlsAcceptor,
    pods: Option<Arc<PodAcceptors>>,
}

/// One configuration for every connection, whatever its destination (tests' forged servers).
impl From<tokio_rustls::TlsAcceptor> for Acceptor {
    fn from(fallback: tokio_rustls::TlsAcceptor) -> Self {
        Self {
            fallback,
            pods: None,
        }
    }
}

/// Local pods' acceptors, by address, built on a pod's first connection and kept (a TLS
/// configuration holds the client verifier, too costly to build per connection).
struct PodAcceptors {
    ctx: std::sync::Weak<Context>,
    cache: std::sync::Mutex<HashMap<IpAddr, tokio_rustls::TlsAcceptor>>,
}

/// Entries kept before those of addresses that are no longer local pods are dropped.
const POD_ACCEPTORS_KEPT: usize = 512;

impl Acceptor {
    /// The acceptor for a connection that arrived at `local`, and the local pod it was dialled
    /// at (`None`: the node's own address, or an acceptor without per-pod configurations).
    fn for_destination(&self, local: IpAddr) -> (tokio_rustls::TlsAcceptor, Option<IpAddr>) {
        let Some(pods) = &self.pods else {
            return (self.fallback.clone(), None);
        };
        let Some(ctx) = pods.ctx.upgrade() else {
            return (self.fallback.clone(), None);
        };
        let local = local.to_canonical();
        if !ctx.view().workload(local).is_some_and(|w| w.local) {
            return (self.fallback.clone(), None);
        }
        let mut cache = pods
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(acceptor) = cache.get(&local) {
            return (acceptor.clone(), Some(local));
        }
        let resolver = Arc::new(PodResolver {
            ctx: Arc::downgrade(&ctx),
            pod: local,
        });
        match tls::server_config(&ctx.trust, resolver) {
            Ok(config) => {
                if cache.len() >= POD_ACCEPTORS_KEPT {
                    let view = ctx.view();
                    cache.retain(|ip, _| view.workload(*ip).is_some_and(|w| w.local));
                }
                let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
                cache.insert(local, acceptor.clone());
                (acceptor, Some(local))
            }
            Err(e) => {
                tracing::warn!(pod = %local, error = %e, "HBONE: no TLS configuration for a pod");
                (self.fallback.clone(), None)
            }
        }
    }
}

/// The certificate of the local workload at `pod`, renewed as the control loop renews it.
fn workload_certificate(ctx: &Context, pod: IpAddr) -> Option<Arc<CertifiedKey>> {
    let view = ctx.view();
    let Some(workload) = view.workload(pod).filter(|w| w.local) else {
        tracing::info!(pod = %pod, "HBONE: a client asked for a pod that is not on this node");
        return None;
    };
    // Never issued here: the control loop issues every local workload's certificate, and a
    // handshake must not wait on an issuer (`--ca-mode issuer`).
    if let Some(cert) = ctx.certs.cached(&workload.identity) {
        Some(cert.certified_key.clone())
    } else {
        tracing::warn!(identity = %workload.identity, "HBONE: no certificate to present yet");
        None
    }
}

/// Presents the certificate of the pod a connection was dialled at, whatever the server name.
#[derive(Debug)]
struct PodResolver {
    ctx: std::sync::Weak<Context>,
    pod: IpAddr,
}

impl ResolvesServerCert for PodResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let ctx = self.ctx.upgrade()?;
        workload_certificate(&ctx, self.pod)
    }
}

/// Picks the server certificate per handshake on the node's address: the local workload at the
/// pod address the SNI names (see [`acceptor`]).
struct WorkloadResolver {
    /// Weak: the context outlives every handshake that matters, and holds no acceptor.
    ctx: std::sync::Weak<Context>,
    agent: Arc<CertResolver>,
}

impl std::fmt::Debug for WorkloadResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadResolver")
            .field("agent", &self.agent)
            .finish_non_exhaustive()
    }
}

impl ResolvesServerCert for WorkloadResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = hello.server_name() else {
            return ResolvesServerCert::resolve(self.agent.as_ref(), hello);
        };
        let ctx = self.ctx.upgrade()?;
        let Some(pod) = tls::pod_of_server_name(name) else {
            return ResolvesServerCert::resolve(self.agent.as_ref(), hello);
        };
        workload_certificate(&ctx, pod)
    }
}

/// Accepts HBONE connections until the task is dropped.
pub async fn serve(listener: TcpListener, acceptor: impl Into<Acceptor>, ctx: Arc<Context>) {
    let acceptor = acceptor.into();
    super::accept_each(listener, "HBONE", |tcp, peer| {
        connection(tcp, peer, acceptor.clone(), ctx.clone())
    })
    .await;
}

async fn connection(tcp: TcpStream, peer: SocketAddr, acceptor: Acceptor, ctx: Arc<Context>) {
    let _ = tcp.set_nodelay(true);
    let (acceptor, dialled) = match tcp.local_addr() {
        Ok(local) => acceptor.for_destination(local.ip()),
        Err(_) => (acceptor.fallback.clone(), None),
    };
    let timeout = ctx.config.handshake_timeout;
    let refuse = |reason: String| {
        TunnelStats::add(&ctx.stats.server_handshake_failures, 1);
        tracing::warn!(peer = %peer, reason = %reason, "HBONE: refused a connection");
    };
    let tls = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return refuse(tls::describe_handshake_error(&e)),
        Err(_) => return refuse(format!("no TLS handshake within {timeout:?}")),
    };
    let Some(client) = tls::peer_identity(tls.get_ref().1) else {
        return refuse("the client presented no SPIFFE ID".into());
    };
    // The workload whose certificate this connection presented (see `acceptor`): its streams
    // may only go to that workload's pods.
    let presented = dialled
        .or_else(|| {
            tls.get_ref()
                .1
                .server_name()
                .and_then(tls::pod_of_server_name)
        })
        .and_then(|pod| ctx.view().workload(pod).map(|w| w.identity.clone()));
    let presented = presented.map(Arc::new);
    let handshake = h2::server::Builder::new()
        .max_concurrent_streams(ctx.config.max_concurrent_streams)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .handshake::<_, Bytes>(tls);
    let mut conn = match tokio::time::timeout(timeout, handshake).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => return refuse(format!("HTTP/2 handshake with {client}: {e}")),
        Err(_) => {
            return refuse(format!(
                "no HTTP/2 preface from {client} within {timeout:?}"
            ));
        }
    };
    TunnelStats::add(&ctx.stats.server_connections, 1);
    tracing::debug!(peer = %peer, client = %client, "HBONE connection");
    while let Some(next) = conn.accept().await {
        match next {
            Ok((request, respond)) => {
                tokio::spawn(stream(
                    request,
                    respond,
                    client.clone(),
                    presented.clone(),
                    dialled,
                    ctx.clone(),
                ));
            }
            Err(e) => {
                tracing::debug!(peer = %peer, client = %client, error = %e, "HBONE connection ended");
                break;
            }
        }
    }
}

/// A response head with `status` and nothing else.
fn head(status: StatusCode) -> Response<()> {
    let mut response = Response::new(());
    *response.status_mut() = status;
    response
}

/// Answers a request that will not be carried, with a status and no body.
fn answer(mut respond: SendResponse<Bytes>, status: StatusCode) {
    let _ = respond.send_response(head(status), true);
}

/// What authorization decided, with what the flow needs.
pub(super) struct Decision {
    pub allowed: bool,
    pub drop_reason: &'static str,
    rule_id: u32,
    source_identity: u32,
    destination_identity: u32,
    destination_spiffe: String,
    pub note: String,
}

impl Decision {
    /// The flow of `client`'s connection `src -> dst` under this decision.
    pub(super) fn record(
        &self,
        client: &SpiffeId,
        src: SocketAddr,
        dst: SocketAddr,
        forwarded: bool,
        drop_reason: &'static str,
        note: String,
    ) -> TunnelRecord {
        TunnelRecord {
            source: src,
            destination: dst,
            source_spiffe_id: client.uri(),
            destination_spiffe_id: self.destination_spiffe.clone(),
            direction: DIR_INGRESS,
            forwarded,
            drop_reason,
            rule_id: self.rule_id,
            source_identity: self.source_identity,
            destination_identity: self.destination_identity,
            note,
            local: false,
        }
    }
}

async fn stream(
    request: Request<RecvStream>,
    respond: SendResponse<Bytes>,
    client: SpiffeId,
    presented: Option<Arc<SpiffeId>>,
    dialled: Option<IpAddr>,
    ctx: Arc<Context>,
) {
    if request.method() != http::Method::CONNECT {
        return answer(respond, StatusCode::METHOD_NOT_ALLOWED);
    }
    let dst = request
        .uri()
        .authority()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok());
    let src = request
        .headers()
        .get(http::header::FORWARDED)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_forwarded_for);
    let (Some(dst), Some(src)) = (dst, src) else {
        return answer(respond, StatusCode::BAD_REQUEST);
    };
    let (src, dst) = (
        SocketAddr::new(src.ip().to_canonical(), src.port()),
        SocketAddr::new(dst.ip().to_canonical(), dst.port()),
    );
    if let Some(pod) = dialled
        && dst.ip() != pod
    {
        // Dialled at one pod, asked for another (ztunnel refuses this too): the connection
        // proved only the dialled pod's workload.
        tracing::info!(source = %src, destination = %dst, client = %client, dialled = %pod, "HBONE: a CONNECT for another pod than the one dialled");
        return answer(respond, StatusCode::MISDIRECTED_REQUEST);
    }
    if let Some(presented) = &presented
        && ctx
            .view()
            .workload(dst.ip())
            .is_some_and(|w| w.identity != **presented)
    {
        // The client authenticated this connection's server as another workload: a stream to
        // this one would reach a peer it never verified (HTTP's "misdirected request").
        tracing::info!(source = %src, destination = %dst, client = %client, presented = %presented, "HBONE: a CONNECT for another workload than the connection's");
        return answer(respond, StatusCode::MISDIRECTED_REQUEST);
    }
    let Some(decision) = authorize(&ctx, &client, src, dst) else {
        tracing::info!(source = %src, destination = %dst, client = %client, "HBONE: no pod at the destination on this node");
        return answer(respond, StatusCode::SERVICE_UNAVAILABLE);
    };
    let record = |forwarded: bool, drop_reason: &'static str, note: String| {
        decision.record(&client, src, dst, forwarded, drop_reason, note)
    };
    if !decision.allowed {
        TunnelStats::add(&ctx.stats.inbound_denied, 1);
        tracing::info!(source = %src, destination = %dst, client = %client, reason = %decision.note, "HBONE: denied");
        (ctx.flows)(&record(false, decision.drop_reason, decision.note.clone()));
        return answer(respond, StatusCode::UNAUTHORIZED);
    }
    let pod = match transparent_connect(src.ip(), dst, MARK_FROM_AGENT, ctx.config.connect_timeout)
        .await
    {
        Ok(pod) => pod,
        Err(e) => {
            TunnelStats::add(&ctx.stats.inbound_failed, 1);
            tracing::info!(source = %src, destination = %dst, error = %e, "HBONE: the destination did not accept");
            (ctx.flows)(&record(
                false,
                "PROXY_CONNECT_FAILED",
                format!("connect: {e}"),
            ));
            return answer(respond, StatusCode::SERVICE_UNAVAILABLE);
        }
    };
    let mut respond = respond;
    let send = match respond.send_response(head(StatusCode::OK), false) {
        Ok(send) => send,
        // The client gave up meanwhile.
        Err(_) => return,
    };
    TunnelStats::add(&ctx.stats.inbound_ok, 1);
    (ctx.flows)(&record(true, "", decision.note.clone()));
    let _active = Gauge::up(&ctx.stats.inbound_active);
    if crate::http::authz::restricted(&ctx, &client, src, dst) {
        // `rules.http`: each request is checked, so the stream is served as HTTP, not spliced.
        let live = ctx.live.register(&client, src, dst, true);
        let body = request.into_body();
        let checked =
            crate::http::authz::serve(ctx.clone(), client.clone(), src, dst, pod, send, body);
        tokio::select! {
            () = checked => {}
            () = live.revoked() => {}
        }
        return;
    }
    let live = ctx.live.register(&client, src, dst, false);
    // Names the socket for the TIME_WAIT removal at its end (see `timewait`).
    let leftover = Leftover::of(&pod);
    let mut pod = pod;
    let carried = splice(
        &mut pod,
        send,
        request.into_body(),
        &ctx.stats.bytes_sent,
        &ctx.stats.bytes_received,
    );
    let clean = tokio::select! {
        result = carried => match result {
            Ok(_) => true,
            Err(e) => {
                tracing::debug!(source = %src, destination = %dst, error = %e, "tunnelled connection ended with an error");
                false
            }
        },
        // Dropping the splice resets the stream.
        () = live.revoked() => {
            tracing::info!(source = %src, destination = %dst, client = %client, "HBONE: a policy change revoked a live connection");
            false
        }
    };
    if clean {
        // The socket's local address is the client pod's: leave no TIME_WAIT with it.
        match &leftover {
            Ok(leftover) => ctx.time_wait.close(pod, leftover, &ctx.stats),
            Err(e) => tracing::debug!(error = %e, "cannot name a closing socket"),
        }
    }
    // Otherwise closed as before (a FIN after what was queued); see `timewait`.
}

/// The connections the server carries, so a policy change can end those it no longer allows.
#[derive(Default)]
pub struct LiveStreams {
    next: std::sync::atomic::AtomicU64,
    streams: std::sync::Mutex<std::collections::HashMap<u64, Live>>,
}

struct Live {
    client: SpiffeId,
    src: SocketAddr,
    dst: SocketAddr,
    /// Its requests are checked one by one (`http::authz`); a spliced one must end when
    /// `rules.http` starts to restrict it.
    checked: bool,
    revoke: Arc<tokio::sync::Notify>,
}

/// One registered connection; unregisters when dropped.
pub struct LiveGuard<'a> {
    streams: &'a LiveStreams,
    id: u64,
    revoke: Arc<tokio::sync::Notify>,
}

impl LiveGuard<'_> {
    /// Resolves when a policy change revokes the connection.
    pub async fn revoked(&self) {
        self.revoke.notified().await;
    }
}

impl Drop for LiveGuard<'_> {
    fn drop(&mut self) {
        self.streams.lock().remove(&self.id);
    }
}

impl LiveStreams {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<u64, Live>> {
        self.streams
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn register(
        &self,
        client: &SpiffeId,
        src: SocketAddr,
        dst: SocketAddr,
        checked: bool,
    ) -> LiveGuard<'_> {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let revoke = Arc::new(tokio::sync::Notify::new());
        self.lock().insert(
            id,
            Live {
                client: client.clone(),
                src,
                dst,
                checked,
                revoke: revoke.clone(),
            },
        );
        LiveGuard {
            streams: self,
            id,
            revoke,
        }
    }

    /// Connections carried now.
    #[must_use]
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Checks every carried connection against the current view; ends (and records as DROPPED)
/// those it denies.
pub fn reauthorize(ctx: &Context) {
    type Entry = (
        SpiffeId,
        SocketAddr,
        SocketAddr,
        bool,
        Arc<tokio::sync::Notify>,
    );
    let live: Vec<Entry> = ctx
        .live
        .lock()
        .values()
        .map(|l| (l.client.clone(), l.src, l.dst, l.checked, l.revoke.clone()))
        .collect();
    for (client, src, dst, checked, revoke) in live {
        let decision = authorize(ctx, &client, src, dst);
        if decision.as_ref().is_some_and(|d| d.allowed) {
            if !checked && crate::http::authz::restricted(ctx, &client, src, dst) {
                // A spliced connection that `rules.http` now restricts: its next requests
                // would go unchecked. It ends, and the client's next one is checked.
                tracing::info!(source = %src, destination = %dst, client = %client, "HBONE: rules.http now restricts a spliced connection");
                revoke.notify_one();
            }
            continue;
        }
        revoke.notify_one();
        TunnelStats::add(&ctx.stats.inbound_denied, 1);
        if let Some(d) = decision {
            let note = "revoked by a policy change".to_owned();
            (ctx.flows)(&d.record(&client, src, dst, false, d.drop_reason, note));
        }
    }
}

/// The destination pod's ingress policy for `src -> dst`, with the identity the certificate
/// proves. `None` when `dst` is not a pod of this node.
///
/// The destination's mesh mode is not required: the client's agent tunnels what its datapath
/// steered under its own view of the modes, which runs ahead of or behind ours while a change
/// spreads, and a tunnelled connection is never less than plaintext (the policy decides with
/// the certificate's identity). So a mode change alone neither refuses nor revokes a connection.
///
/// The source address only counts when it belongs to the certificate's workload (or to no pod
/// at all): a client cannot borrow another pod's address, and so its labels, to satisfy an
/// endpoint selector.
///
/// The same-node fast path ([`super::local`]) authorizes with this too, with the source pod's
/// own identity as the client's.
pub(super) fn authorize(
    ctx: &Context,
    client: &SpiffeId,
    src: SocketAddr,
    dst: SocketAddr,
) -> Option<Decision> {
    let view = ctx.view();
    let destination = view.workload(dst.ip()).filter(|w| w.local)?;
    let policy = view.endpoint_policy(&destination.pod)?;
    let compiled = &view.compiled;
    let mut decision = Decision {
        allowed: false,
        drop_reason: "POLICY_DENIED",
        rule_id: 0,
        source_identity: 0,
        destination_identity: policy.identity,
        destination_spiffe: destination.identity.uri(),
        note: String::new(),
    };
    if let Some(source) = view.workload(src.ip())
        && source.identity != *client
    {
        decision.note = format!(
            "{} belongs to {}, but the client is {client}",
            src.ip(),
            source.identity
        );
        return Some(decision);
    }
    let identity = compiled.ipcache_lookup(src.ip()).unwrap_or(IDENTITY_WORLD);
    decision.source_identity = identity;
    let facts = crate::policy::PeerFacts {
        identity,
        cidr_identity: compiled.policy_cidr_lookup(src.ip()),
        principal_identities: compiled.principal_identities(client),
    };
    let verdict = crate::policy::evaluate(policy, DIR_INGRESS, &facts, PROTO_TCP, dst.port());
    decision.allowed = verdict.allowed;
    decision.rule_id = verdict.rule_id;
    decision.drop_reason = agent_common::drop_reason::describe(verdict.drop_reason);
    Some(decision)
}
