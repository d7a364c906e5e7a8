//! The flows port (`--flows-addr`, off by default): flows leave the node only here, over mutual
//! TLS, to clients whose certificate the mesh CA issued for an identity the agent allows to read
//! flows (`--flows-allow`: by default the agents themselves and the `nodeward-observer` service
//! account). Without it, flows are read only on the local Unix socket (`api.rs`).
//!
//! `GET /v1/flows?last=N&follow=BOOL&filter=JSON` answers flows as JSON lines (the filter is the
//! one the local API takes, run in the agent); anything else is 404. `nodeward observe --node`
//! is the client ([`client`]). Like Hubble's server on 4244 beside Cilium's metrics on 9962: the
//! metrics address serves metrics and health only.
//!
//! Refusals are logged (rate-limited) and counted by reason
//! (`nodeward_flows_api_refused_total`): `handshake` (no certificate, a foreign CA, an expired
//! or malformed one, plaintext, no handshake in time), `identity` (a valid certificate whose
//! identity may not read flows: 403), `followers` (that identity already has
//! `--flows-followers-per-client` streams open on this agent: 429) and `connections` (more than
//! [`MAX_CONNECTIONS`] connections at once, handshakes included).
//!
//! A slow follower never holds the agent's memory: each stream has a queue of
//! [`STREAM_QUEUE`] lines, and while it is full the stream drops new flows at once, counts them
//! (`lost_events{place="follower_lagged"}`) and, once there is room, tells the client with a
//! `{"lost_flows": n}` line, as the local socket does. Below the queue, hyper and rustls stop taking bytes once
//! their own bounded buffers are full, and the kernel's socket buffer is not the agent's heap.

pub mod access;
pub mod client;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};

use crate::app::Shared;
use crate::ca::SpiffeId;
use crate::ca::tls::{self, CertResolver};
use crate::flows::FlowFilter;

pub use access::AllowList;

/// The flows port, as Hubble's (the README and `deploy/` use it).
pub const DEFAULT_PORT: u16 = 4244;
/// Connections served at once, TLS handshakes included; more are closed at once.
pub const MAX_CONNECTIONS: usize = 256;
/// Flow lines queued for one stream; a client slower than this misses flows (counted).
pub const STREAM_QUEUE: usize = 256;
/// The ALPN protocol of the flows port: HTTP/1.1, one stream per connection.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// `--flows-addr` and its settings, validated at start-up.
#[derive(Clone, Debug)]
pub struct FlowApiConfig {
    pub addr: SocketAddr,
    /// `--flows-allow`: who may read flows.
    pub allow: AllowList,
    /// `--flows-followers-per-client`: streams one client identity may have open at once.
    pub followers_per_client: usize,
    /// How long a client has to complete the TLS handshake and send its request head.
    pub handshake_timeout: Duration,
}

/// Counters of the flows port, read by the metrics at scrape time and by `nodeward status`.
#[derive(Debug, Default)]
pub struct FlowApiStats {
    pub refused_handshake: AtomicU64,
    pub refused_identity: AtomicU64,
    pub refused_followers: AtomicU64,
    pub refused_connections: AtomicU64,
    /// Streams open now.
    pub streams: AtomicU64,
    /// Streams served since start.
    pub streams_total: AtomicU64,
}

impl FlowApiStats {
    /// `(reason, total)` for each refusal reason, as the metric labels them.
    #[must_use]
    pub fn refusals(&self) -> [(&'static str, u64); 4] {
        [
            ("handshake", self.refused_handshake.load(Ordering::Relaxed)),
            ("identity", self.refused_identity.load(Ordering::Relaxed)),
            ("followers", self.refused_followers.load(Ordering::Relaxed)),
            (
                "connections",
                self.refused_connections.load(Ordering::Relaxed),
            ),
        ]
    }

    #[must_use]
    pub fn to_json(&self) -> serde_json::Value {
        let refused: serde_json::Map<String, serde_json::Value> = self
            .refusals()
            .into_iter()
            .map(|(reason, n)| (reason.to_owned(), n.into()))
            .collect();
        serde_json::json!({
            "streams": self.streams.load(Ordering::Relaxed),
            "streams_total": self.streams_total.load(Ordering::Relaxed),
            "refused": refused,
        })
    }
}

/// `GET /v1/flows` parameters.
#[derive(Clone, Debug, Default)]
pub struct FlowQuery {
    /// Stored flows to send first (default 20 without follow, 0 with it).
    pub last: Option<usize>,
    pub follow: bool,
    pub filter: FlowFilter,
}

impl FlowQuery {
    #[must_use]
    pub fn to_query_string(&self) -> String {
        let filter = serde_json::to_string(&self.filter).unwrap_or_else(|_| "{}".into());
        let mut q = format!("follow={}&filter={}", self.follow, percent_encode(&filter));
        if let Some(n) = self.last {
            q = format!("last={n}&{q}");
        }
        q
    }

    /// # Errors
    /// A parameter that is not understood, with what was expected.
    pub fn parse(query: &str) -> Result<Self, String> {
        let mut out = Self::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value =
                percent_decode(value).ok_or_else(|| format!("{key}: bad percent-encoding"))?;
            match key {
                "last" => {
                    out.last = Some(
                        value
                            .parse()
                            .map_err(|_| format!("last={value:?}: expected a number of flows"))?,
                    );
                }
                "follow" => {
                    out.follow = match value.as_str() {
                        "" | "true" | "1" => true,
                        "false" | "0" => false,
                        _ => return Err(format!("follow={value:?}: expected true or false")),
                    };
                }
                "filter" => {
                    out.filter = serde_json::from_str(&value)
                        .map_err(|e| format!("filter: not a flow filter: {e}"))?;
                }
                other => {
                    return Err(format!(
                        "unknown parameter {other:?}: expected last, follow, filter"
                    ));
                }
            }
        }
        out.filter.validate().map_err(|e| e.to_string())?;
        Ok(out)
    }
}

fn percent_encode(s: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = s.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// A whole reply, or flow lines as the agent produces them.
enum Body {
    Full(Full<Bytes>),
    Lines(tokio::sync::mpsc::Receiver<Bytes>),
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Self::Full(full) => Pin::new(full).poll_frame(cx),
            Self::Lines(rx) => rx
                .poll_recv(cx)
                .map(|line| line.map(|l| Ok(hyper::body::Frame::data(l)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Full(full) => full.is_end_stream(),
            Self::Lines(_) => false,
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            Self::Full(full) => full.size_hint(),
            Self::Lines(_) => hyper::body::SizeHint::default(),
        }
    }
}

fn json_reply(status: StatusCode, error: &str) -> Response<Body> {
    let body = serde_json::json!({ "error": error }).to_string() + "\n";
    let mut response = Response::new(Body::Full(Full::new(Bytes::from(body))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

/// Streams open per client identity, each held by a [`Slot`] for as long as its stream runs.
#[derive(Debug)]
struct Followers {
    limit: usize,
    open: Mutex<HashMap<SpiffeId, usize>>,
}

impl Followers {
    fn take(self: &Arc<Self>, client: &SpiffeId) -> Option<Slot> {
        let mut open = self
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = open.entry(client.clone()).or_insert(0);
        if *n >= self.limit {
            return None;
        }
        *n += 1;
        Some(Slot {
            followers: self.clone(),
            client: client.clone(),
        })
    }
}

/// One open stream of one client; gives its place back when dropped.
#[derive(Debug)]
struct Slot {
    followers: Arc<Followers>,
    client: SpiffeId,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self
            .followers
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = open.get_mut(&self.client) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.client);
            }
        }
    }
}

/// At most [`LOG_BURST`] refusal lines per [`LOG_WINDOW`]; the next line says how many were
/// left out, so a scanner cannot flood the agent's log.
#[derive(Debug)]
struct RefusalLog {
    window: Mutex<(Instant, u32, u64)>,
}

const LOG_WINDOW: Duration = Duration::from_secs(10);
const LOG_BURST: u32 = 10;

impl RefusalLog {
    fn new() -> Self {
        Self {
            window: Mutex::new((Instant::now(), 0, 0)),
        }
    }

    fn refused(&self, peer: SocketAddr, client: Option<&SpiffeId>, reason: &str) {
        let mut w = self
            .window
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if w.0.elapsed() > LOG_WINDOW {
            *w = (Instant::now(), 0, w.2);
        }
        if w.1 >= LOG_BURST {
            w.2 += 1;
            return;
        }
        w.1 += 1;
        let suppressed = std::mem::take(&mut w.2);
        drop(w);
        let client = client.map(ToString::to_string).unwrap_or_default();
        tracing::warn!(
            peer = %peer,
            client = %client,
            reason = %reason,
            suppressed,
            "flows port: refused a client"
        );
    }
}

/// The TLS side: the agent's own certificate (pinned, so renewed like the workloads'), a client
/// certificate required and checked against the mesh's trust roots and trust domain.
///
/// # Errors
/// The agent has no certificate, or the TLS configuration cannot be built.
pub fn acceptor(shared: &Shared) -> Result<tokio_rustls::TlsAcceptor, String> {
    let trust = shared.ca.trust();
    let agent = SpiffeId::agent(trust.trust_domain()).map_err(|e| e.to_string())?;
    shared.certs.pin(&agent).map_err(|e| e.to_string())?;
    let mut config = tls::server_config(&trust, CertResolver::new(shared.certs.clone(), agent))
        .map_err(|e| e.to_string())?;
    config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Serves the flows port until the listener fails.
pub async fn serve(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    config: FlowApiConfig,
    shared: Arc<Shared>,
) {
    let server = Arc::new(Server {
        followers: Arc::new(Followers {
            limit: config.followers_per_client,
            open: Mutex::new(HashMap::new()),
        }),
        config,
        acceptor,
        connections: Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS)),
        log: RefusalLog::new(),
        shared,
    });
    loop {
        match listener.accept().await {
            Ok((tcp, peer)) => {
                let Ok(permit) = server.connections.clone().try_acquire_owned() else {
                    server.refuse(
                        &server.shared.flow_api.refused_connections,
                        peer,
                        None,
                        &format!("{MAX_CONNECTIONS} connections are open"),
                    );
                    continue;
                };
                let server = server.clone();
                tokio::spawn(async move {
                    server.connection(tcp, peer).await;
                    drop(permit);
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "flows port: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

struct Server {
    config: FlowApiConfig,
    acceptor: tokio_rustls::TlsAcceptor,
    followers: Arc<Followers>,
    connections: Arc<tokio::sync::Semaphore>,
    log: RefusalLog,
    shared: Arc<Shared>,
}

impl Server {
    fn refuse(&self, counter: &AtomicU64, peer: SocketAddr, client: Option<&SpiffeId>, why: &str) {
        counter.fetch_add(1, Ordering::Relaxed);
        self.log.refused(peer, client, why);
    }

    async fn connection(self: Arc<Self>, tcp: tokio::net::TcpStream, peer: SocketAddr) {
        let stats = &self.shared.flow_api;
        let timeout = self.config.handshake_timeout;
        let tls = match tokio::time::timeout(timeout, self.acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                return self.refuse(
                    &stats.refused_handshake,
                    peer,
                    None,
                    &tls::describe_handshake_error(&e),
                );
            }
            Err(_) => {
                return self.refuse(
                    &stats.refused_handshake,
                    peer,
                    None,
                    &format!("no TLS handshake within {timeout:?}"),
                );
            }
        };
        let Some(client) = tls::peer_identity(tls.get_ref().1) else {
            return self.refuse(
                &stats.refused_handshake,
                peer,
                None,
                "the client presented no SPIFFE ID",
            );
        };
        let allowed = self.config.allow.allows(&client);
        if !allowed {
            self.refuse(
                &stats.refused_identity,
                peer,
                Some(&client),
                "this identity may not read flows (--flows-allow)",
            );
        }
        let server = self.clone();
        let service = hyper::service::service_fn(move |req| {
            let server = server.clone();
            let client = client.clone();
            async move { Ok::<_, Infallible>(server.handle(&req, &client, allowed, peer)) }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(timeout)
            .keep_alive(allowed)
            .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
            .await;
    }

    fn handle(
        &self,
        req: &Request<hyper::body::Incoming>,
        client: &SpiffeId,
        allowed: bool,
        peer: SocketAddr,
    ) -> Response<Body> {
        if !allowed {
            return json_reply(
                StatusCode::FORBIDDEN,
                &format!(
                    "{client} may not read flows from this agent (it allows {}; see --flows-allow)",
                    self.config.allow
                ),
            );
        }
        if req.uri().path() != "/v1/flows" {
            return json_reply(
                StatusCode::NOT_FOUND,
                "not found: the flows port serves GET /v1/flows",
            );
        }
        if req.method() != hyper::Method::GET {
            return json_reply(StatusCode::METHOD_NOT_ALLOWED, "use GET /v1/flows");
        }
        let query = match FlowQuery::parse(req.uri().query().unwrap_or("")) {
            Ok(q) => q,
            Err(e) => return json_reply(StatusCode::BAD_REQUEST, &e),
        };
        let Some(slot) = self.followers.take(client) else {
            let limit = self.followers.limit;
            self.refuse(
                &self.shared.flow_api.refused_followers,
                peer,
                Some(client),
                &format!("{limit} streams of this identity are open"),
            );
            return json_reply(
                StatusCode::TOO_MANY_REQUESTS,
                &format!(
                    "{client} already has {limit} flow streams open on this agent (--flows-followers-per-client)"
                ),
            );
        };
        flows_reply(query, self.shared.clone(), slot)
    }
}

/// Streams flows to one client: the stored ones asked for, then (following) new ones, through
/// a queue of [`STREAM_QUEUE`] lines.
fn flows_reply(query: FlowQuery, shared: Arc<Shared>, slot: Slot) -> Response<Body> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(STREAM_QUEUE);
    shared.flow_api.streams.fetch_add(1, Ordering::Relaxed);
    shared
        .flow_api
        .streams_total
        .fetch_add(1, Ordering::Relaxed);
    tokio::spawn(async move {
        stream_flows(&query, &shared, &tx).await;
        shared.flow_api.streams.fetch_sub(1, Ordering::Relaxed);
        drop(slot);
    });
    let mut response = Response::new(Body::Lines(rx));
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/x-ndjson"),
    );
    response
}

async fn stream_flows(query: &FlowQuery, shared: &Shared, tx: &tokio::sync::mpsc::Sender<Bytes>) {
    fn line(value: &impl serde::Serialize) -> Bytes {
        let mut v = serde_json::to_vec(value).unwrap_or_default();
        v.push(b'\n');
        Bytes::from(v)
    }
    // Subscribe before reading the ring so nothing falls between the two.
    let mut follow = query.follow.then(|| shared.flows.subscribe());
    let last = query.last.unwrap_or(if query.follow { 0 } else { 20 });
    for flow in shared.flows.last(last, &query.filter) {
        if tx.send(line(&*flow)).await.is_err() {
            return;
        }
    }
    let Some(rx) = follow.as_mut() else { return };
    // Flows this client missed and has not been told of yet.
    let mut missed: u64 = 0;
    let lost = &shared.flows.lost.follower_lagged;
    loop {
        let next = tokio::select! {
            next = rx.recv() => next,
            () = tx.closed() => return,
        };
        let flow = match next {
            Ok(flow) if query.filter.matches(&flow) => flow,
            Ok(_) => continue,
            // Only when this task itself falls behind the broadcast (a busy machine).
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                lost.fetch_add(n, Ordering::Relaxed);
                missed += n;
                continue;
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        };
        // A full queue: the client does not read. Drop and count now, without even
        // serialising the flow, rather than wait for room.
        let room = if missed > 0 { 2 } else { 1 };
        if tx.capacity() < room {
            lost.fetch_add(1, Ordering::Relaxed);
            missed += 1;
            continue;
        }
        if missed > 0 {
            if tx
                .try_send(line(&serde_json::json!({ "lost_flows": missed })))
                .is_err()
            {
                return;
            }
            missed = 0;
        }
        if tx.try_send(line(&*flow)).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests;
