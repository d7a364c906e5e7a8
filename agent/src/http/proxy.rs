//! The source agent's HTTP proxy for one meshed connection to an HTTP Service port.
//!
//! hyper serves the pod's connection (HTTP/1.1 with keep-alive, or prior-knowledge h2c, told
//! apart by the first bytes). Each request is routed on its own: the route table of the moment
//! picks a rule, the rule a backend Service by weight, then an endpoint; hyper's client sends
//! the request over an HBONE CONNECT to that endpoint's node, in the protocol the pod spoke.
//! Upstream connections are kept per endpoint for the life of the pod's connection, so
//! keep-alive and h2 multiplexing carry on through the tunnel. An upgrade (WebSocket's 101, a
//! CONNECT's 2xx) turns both sides into a byte pipe.
//!
//! The agent answers by itself when it cannot forward: 404 no rule matches, 500 an invalid rule
//! or a backend without weight or Service, 503 no endpoint (or one outside the mesh), 502 the
//! tunnel or the backend failed, 504 `timeouts.request` passed before the response's headers.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, Version, header};
use http_body_util::{BodyExt as _, Full, combinators::UnsyncBoxBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use super::io::H2Io;
use super::routes::ServiceKey;
use super::{HttpRecord, RequestLabels};
use crate::tunnel::pool::Pool;
use crate::tunnel::timewait::Leftover;
use crate::tunnel::{Context, Workload};

pub(super) type Body = UnsyncBoxBody<Bytes, hyper::Error>;

/// How long a request's head may take to arrive (HTTP/1.1); 1 s in unit tests.
const HEADER_READ_TIMEOUT: std::time::Duration = if cfg!(test) {
    std::time::Duration::from_secs(1)
} else {
    std::time::Duration::from_secs(10)
};

/// A client connection to one endpoint, over one HBONE stream.
enum Upstream {
    H1(hyper::client::conn::http1::SendRequest<Body>),
    H2(hyper::client::conn::http2::SendRequest<Body>),
}

struct Conn {
    ctx: Arc<Context>,
    pool: Arc<Pool>,
    source: Arc<Workload>,
    peer: SocketAddr,
    /// The backend the kernel chose for this connection.
    dialled: SocketAddr,
    service: ServiceKey,
    /// Idle upstream connections by (endpoint, h2).
    upstreams: Mutex<HashMap<(SocketAddr, bool), Upstream>>,
    /// Requests each of those connections carried (for `maxRequestsPerConnection`).
    uses: Mutex<HashMap<(SocketAddr, bool), u32>>,
    /// Worked out once for the connection's requests: the source's SPIFFE ID, its service
    /// account (the metrics' `source_workload`), the dialled Service as `name.namespace`.
    source_spiffe_id: String,
    source_workload: String,
    service_name: String,
}

/// Serves the pod's connection until it ends.
pub async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    dialled: SocketAddr,
    source: Arc<Workload>,
    service: ServiceKey,
    ctx: Arc<Context>,
    pool: Arc<Pool>,
) {
    // hyper closes a client that trickles a request's head (its header timeout has no answer of
    // its own): the 408 goes out through a second descriptor of the same socket, kept for that.
    let spare = std::os::fd::AsFd::as_fd(&stream).try_clone_to_owned().ok();
    // Named for the TIME_WAIT removal at its end, as the L4 path does (`tunnel::timewait`).
    let stream = PodSocket::new(stream, ctx.clone());
    let leftover = stream.leftover;
    let unanswered = stream.unanswered.clone();
    let reaper = stream.ctx.clone();
    let source_spiffe_id = source.identity.uri();
    let source_workload = source_spiffe_id
        .rsplit_once("/sa/")
        .map(|(_, sa)| sa.to_owned())
        .unwrap_or_default();
    let service_name = format!("{}.{}", service.service.name, service.service.namespace);
    let conn = Arc::new(Conn {
        source_spiffe_id,
        source_workload,
        service_name,
        ctx,
        pool,
        source,
        peer,
        dialled,
        service,
        upstreams: Mutex::new(HashMap::new()),
        uses: Mutex::new(HashMap::new()),
    });
    let service = hyper::service::service_fn(move |req| {
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(conn.request(req).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // A client that trickles a request's head (slow-loris) is closed after this, not held;
    // the head is bounded by hyper's limits (431 past them, 400 when malformed).
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let served = builder
        .serve_connection_with_upgrades(TokioIo::new(stream), service)
        .await;
    let slow = served.as_ref().is_err_and(|e| {
        e.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_timeout)
    });
    if let Err(e) = served {
        tracing::debug!(source = %peer, destination = %dialled, error = %e, "HTTP connection ended with an error");
    }
    if let Some(fd) = spare {
        let mut spare = std::net::TcpStream::from(fd);
        // Only a head begun and never answered: an idle keep-alive connection just closes.
        if slow && unanswered.load(std::sync::atomic::Ordering::Relaxed) {
            // A few bytes into an empty send buffer (the socket is non-blocking): written at
            // once, or not at all.
            let _ = std::io::Write::write(&mut spare, REQUEST_TIMEOUT);
        }
        if let (Ok(spare), Some(leftover)) = (TcpStream::from_std(spare), leftover) {
            reaper.time_wait.close(spare, &leftover, &reaper.stats);
        }
    }
}

/// The answer to a client whose request head did not arrive within [`HEADER_READ_TIMEOUT`].
const REQUEST_TIMEOUT: &[u8] =
    b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";

/// The pod's socket, closed through the TIME_WAIT reaper when hyper is done with it: its local
/// address is the destination pod's, and a TIME_WAIT with it in the node's namespace would
/// swallow a later plaintext connection with the same 4-tuple (see `tunnel::timewait`).
pub(crate) struct PodSocket {
    stream: Option<TcpStream>,
    leftover: Option<Leftover>,
    ctx: Arc<Context>,
    /// Bytes came in since the agent last wrote: a request (head) not answered yet.
    unanswered: Arc<std::sync::atomic::AtomicBool>,
}

impl PodSocket {
    pub(crate) fn new(stream: TcpStream, ctx: Arc<Context>) -> Self {
        // Named now: the name needs the socket's addresses, gone once it is closed.
        let leftover = Leftover::of(&stream).ok();
        Self {
            stream: Some(stream),
            leftover,
            ctx,
            unanswered: Arc::default(),
        }
    }

    fn stream(&mut self) -> std::io::Result<&mut TcpStream> {
        self.stream
            .as_mut()
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotConnected))
    }
}

impl Drop for PodSocket {
    fn drop(&mut self) {
        if let (Some(stream), Some(leftover)) = (self.stream.take(), &self.leftover) {
            self.ctx.time_wait.close(stream, leftover, &self.ctx.stats);
        }
    }
}

impl tokio::io::AsyncRead for PodSocket {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = match self.stream() {
            Ok(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Err(e) => std::task::Poll::Ready(Err(e)),
        };
        if buf.filled().len() > before {
            self.unanswered
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        polled
    }
}

impl tokio::io::AsyncWrite for PodSocket {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.unanswered
            .store(false, std::sync::atomic::Ordering::Relaxed);
        match self.stream() {
            Ok(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Err(e) => std::task::Poll::Ready(Err(e)),
        }
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.stream() {
            Ok(s) => std::pin::Pin::new(s).poll_flush(cx),
            Err(e) => std::task::Poll::Ready(Err(e)),
        }
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.stream() {
            Ok(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Err(e) => std::task::Poll::Ready(Err(e)),
        }
    }
}

pub(super) fn local(status: StatusCode, why: &str) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(Bytes::from(format!("{why}\n")))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// Whether a request is gRPC (`content-type: application/grpc`, `application/grpc+proto`...).
pub(super) fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The agent's own answer to a gRPC request: gRPC clients read `grpc-status`, not the HTTP
/// status, so it is a trailers-only response (HTTP 200, `grpc-status` mapped from `status` as
/// gRPC's HTTP-to-gRPC status table does, `grpc-message` the reason), as Envoy's local replies
/// to gRPC are. The flow keeps the HTTP status the agent decided on.
pub(super) fn grpc_local(status: StatusCode, why: &str) -> Response<Body> {
    let code = match status.as_u16() {
        400 => 13,             // INTERNAL
        401 => 16,             // UNAUTHENTICATED
        403 => 7,              // PERMISSION_DENIED
        404 => 12,             // UNIMPLEMENTED
        429 | 502..=504 => 14, // UNAVAILABLE
        _ => 2,                // UNKNOWN
    };
    // Percent-encoded as the gRPC spec asks of grpc-message.
    let mut message = String::with_capacity(why.len());
    for b in why.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            message.push(char::from(b));
        } else {
            let _ = std::fmt::Write::write_fmt(&mut message, format_args!("%{b:02X}"));
        }
    }
    let mut resp = Response::new(
        http_body_util::Empty::new()
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert("grpc-status", HeaderValue::from(code));
    if let Ok(v) = HeaderValue::from_str(&message) {
        headers.insert("grpc-message", v);
    }
    resp
}

pub(super) fn protocol(v: Version) -> &'static str {
    match v {
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2",
        _ => "HTTP/1.1",
    }
}

/// The request's URL for flows: the URI, or for HTTP/1.1's origin form the Host header and
/// the path.
pub(super) fn request_url<B>(req: &Request<B>) -> String {
    if req.uri().scheme().is_some() {
        req.uri().to_string()
    } else {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or_default();
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        format!("http://{host}{path}")
    }
}

/// What one attempt came to.
struct Attempt {
    response: Response<Body>,
    endpoint: Option<SocketAddr>,
    /// Why the agent answered itself; empty when the backend answered.
    note: String,
    /// The request never left (no connection to the endpoint): safe to send again.
    unsent: bool,
    /// The request went out and this is the backend's answer (or a gateway error after it).
    sent: bool,
    /// The body was consumed (sent, or dropped).
    body_taken: bool,
    /// The body, when the request never left.
    body: Option<Body>,
    /// `timeouts.request` passed: no more attempts.
    deadline_passed: bool,
}

impl Attempt {
    /// The agent's own answer `status` after the request went to `endpoint` (its body is
    /// spent); `deadline_passed` when `timeouts.request` ended it.
    fn gave_up(
        status: StatusCode,
        why: String,
        endpoint: SocketAddr,
        deadline_passed: bool,
    ) -> Self {
        Self {
            response: local(status, &why),
            endpoint: Some(endpoint),
            note: why,
            unsent: false,
            sent: true,
            body_taken: true,
            body: None,
            deadline_passed,
        }
    }
}

/// The most of a body buffered so that a request can be sent again.
const REPLAY_LIMIT: u64 = 64 * 1024;

/// The whole body of a request, buffered so that it can be sent more than once, or the body
/// back untouched: an empty body always qualifies, another only when its length is known and at
/// most [`REPLAY_LIMIT`].
async fn replayable(body: Incoming) -> Result<Bytes, Body> {
    use hyper::body::Body as _;
    if body.is_end_stream() {
        return Ok(Bytes::new());
    }
    let bounded = body.size_hint().upper().is_some_and(|n| n <= REPLAY_LIMIT);
    if !bounded {
        return Err(body.boxed_unsync());
    }
    match body.collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        // The client's body broke: what is left to send is nothing; the attempt will fail.
        Err(_) => Ok(Bytes::new()),
    }
}

fn full(bytes: Bytes) -> Body {
    Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Headers that belong to one hop (RFC 9110 7.6.1), dropped before forwarding unless the
/// request is an upgrade.
pub(super) const HOP_BY_HOP: [header::HeaderName; 6] = [
    header::CONNECTION,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Drops the [`HOP_BY_HOP`] headers, but keeps `te: trailers`: HTTP/2 allows that one value
/// (RFC 9113 8.2.2), and gRPC servers check for it.
pub(super) fn strip_hop_by_hop(headers: &mut http::HeaderMap) {
    let trailers = headers
        .get_all(header::TE)
        .iter()
        .any(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

impl Conn {
    async fn request(self: &Arc<Self>, mut req: Request<Incoming>) -> Response<Body> {
        let start = Instant::now();
        let started = std::time::SystemTime::now();
        let version = req.version();
        let method = req.method().to_string();
        // The trace goes on (or starts) before routing, so a retry or a mirror carries it too.
        let trace =
            super::trace::Tracing::begin(self.ctx.http.tracing.get(), req.headers_mut(), &method);
        let url = request_url(&req);
        let upgrading = req.method() == http::Method::CONNECT
            || (version != Version::HTTP_2 && req.headers().contains_key(header::UPGRADE));
        let on_upgrade = upgrading.then(|| hyper::upgrade::on(&mut req));
        let grpc = is_grpc(req.headers());
        let (resp, rule_route, endpoint, note) = self.forward(req, on_upgrade).await;
        let code = resp.status().as_u16();
        let resp = if grpc && !note.is_empty() {
            grpc_local(resp.status(), &note)
        } else {
            resp
        };
        let latency = start.elapsed();
        let view = self.ctx.view();
        let destination = endpoint.unwrap_or(self.dialled);
        let dst_workload = view.workload(destination.ip());
        let record = HttpRecord {
            source: self.peer,
            destination,
            source_spiffe_id: self.source_spiffe_id.clone(),
            destination_spiffe_id: dst_workload.map(|w| w.identity.uri()).unwrap_or_default(),
            source_identity: view
                .compiled
                .ipcache_lookup(self.peer.ip())
                .unwrap_or_default(),
            destination_identity: view
                .compiled
                .ipcache_lookup(destination.ip())
                .unwrap_or_default(),
            method,
            url,
            protocol: protocol(version),
            code,
            latency,
            route: rule_route,
            note,
            direction: agent_common::DIR_EGRESS,
            drop_reason: "",
            rule_id: 0,
            trace_id: trace.as_ref().map(super::trace::RequestTrace::trace_id_hex),
        };
        drop(view);
        if let Some(trace) = trace {
            trace.finish(&super::trace::Finished {
                method: &record.method,
                url: &record.url,
                protocol: if version == Version::HTTP_2 {
                    "2"
                } else {
                    "1.1"
                },
                code,
                route: &record.route,
                service: &self.service_name,
                source: &record.source_spiffe_id,
                destination,
                note: &record.note,
                end: started + latency,
            });
        }
        self.ctx.http.metrics.observe(
            &RequestLabels {
                source_namespace: &self.source.pod.namespace,
                source_workload: &self.source_workload,
                destination_namespace: &self.service.service.namespace,
                destination_service: &self.service.service.name,
                route: &record.route,
            },
            code,
            latency,
        );
        if let Some(sink) = self.ctx.http.flows.get() {
            sink(&record);
        }
        resp
    }

    /// Routes and forwards one request: the response, the route's name, the endpoint it went
    /// to, and why the agent answered itself (empty when the backend answered).
    ///
    /// With a `retry`, a request that can be sent again is: one whose body is empty, or
    /// (idempotent methods only) bounded and buffered first; a failed attempt (a code the rule
    /// lists, or a connection that could not be made) gets another after `backoff`, with a new
    /// draw of backend and endpoint. `timeouts.request` bounds them all, and
    /// `timeouts.backendRequest` each one. Anything else is sent once, streaming.
    async fn forward(
        self: &Arc<Self>,
        req: Request<Incoming>,
        on_upgrade: Option<hyper::upgrade::OnUpgrade>,
    ) -> (Response<Body>, String, Option<SocketAddr>, String) {
        let view = self.ctx.view();
        let table = view.http.clone();
        drop(view);
        let (mut parts, body) = req.into_parts();
        let Some(rule) = table
            .ports
            .get(&self.service)
            .and_then(|p| p.select(&parts))
            .cloned()
        else {
            let why = "no route matched";
            return (
                local(StatusCode::NOT_FOUND, why),
                String::new(),
                None,
                why.into(),
            );
        };
        let route = rule.route.clone();
        if let Some(why) = &rule.invalid {
            let why = format!("invalid route rule: {why}");
            return (
                local(StatusCode::INTERNAL_SERVER_ERROR, &why),
                route,
                None,
                why,
            );
        }
        if on_upgrade.is_none() {
            strip_hop_by_hop(&mut parts.headers);
        }
        // `TrafficPolicy` fault injection on the dialled Service (VirtualService's place).
        if let Some(policy) = table.traffic.get(&self.service.service)
            && let Some(fault) = &policy.fault
        {
            let hit = |percent: f64| percent > 0.0 && fastrand::f64() * 100.0 < percent;
            if let Some((percent, delay)) = fault.delay
                && hit(percent)
            {
                tokio::time::sleep(delay).await;
            }
            if let Some((percent, status)) = fault.abort
                && hit(percent)
            {
                let why = format!("fault injected by TrafficPolicy {}", policy.policy);
                return (local(status, &why), route, None, why);
            }
        }
        rule.request_headers.apply(&mut parts.headers);
        let deadline = rule.timeout.map(|t| tokio::time::Instant::now() + t);
        // The body to send again, when the request may be retried or mirrored.
        let copies = rule.retry.is_some() || !rule.mirrors.is_empty();
        let replay = if copies && on_upgrade.is_none() {
            replayable(body).await
        } else {
            Err(body.boxed_unsync())
        };
        let (replay, mut once) = match replay {
            Ok(bytes) => (Some(bytes), None),
            Err(body) => (None, Some(body)),
        };
        if let Some(bytes) = &replay {
            self.mirror(&rule, &table, &parts, bytes);
        }
        // Sent again only when that is safe (RFC 9110 9.2.2): no body, or an idempotent method.
        let idempotent = matches!(
            parts.method,
            http::Method::GET
                | http::Method::HEAD
                | http::Method::OPTIONS
                | http::Method::TRACE
                | http::Method::PUT
                | http::Method::DELETE
        );
        // A buffered body of another method is still sent again when it never left.
        let resend = replay.as_ref().is_some_and(|b| b.is_empty() || idempotent);
        let retry = rule.retry.clone().unwrap_or_default();
        let mut on_upgrade = on_upgrade;
        let mut attempt = 0;
        loop {
            let body = match (&replay, once.take()) {
                (Some(bytes), _) => full(bytes.clone()),
                (None, Some(body)) => body,
                // The streamed body is gone (not reached: the loop only goes on with it back).
                (None, None) => break,
            };
            let mut req = Request::new(body);
            *req.method_mut() = parts.method.clone();
            *req.uri_mut() = parts.uri.clone();
            *req.version_mut() = parts.version;
            *req.headers_mut() = parts.headers.clone();
            let outcome = self
                .attempt(&rule, &table, req, on_upgrade.take(), deadline)
                .await;
            let code = outcome.response.status().as_u16();
            let retryable = outcome.unsent || (outcome.sent && retry.codes.contains(&code));
            let timed_out = outcome.deadline_passed;
            let may_retry = resend || (outcome.unsent && (replay.is_some() || !outcome.body_taken));
            if !retryable || attempt >= retry.attempts || timed_out || !may_retry {
                return (outcome.response, route, outcome.endpoint, outcome.note);
            }
            if outcome.unsent && !outcome.body_taken {
                once = outcome.body;
            }
            attempt += 1;
            tracing::debug!(route = %route, code, attempt, "HTTP: retrying");
            if !retry.backoff.is_zero() {
                tokio::time::sleep(retry.backoff).await;
            }
        }
        let why = "the request could not be sent again".to_owned();
        (local(StatusCode::BAD_GATEWAY, &why), route, None, why)
    }

    /// One attempt: a backend by weight, an endpoint, the exchange.
    async fn attempt(
        self: &Arc<Self>,
        rule: &super::routes::Rule,
        table: &super::routes::RouteTable,
        req: Request<Body>,
        on_upgrade: Option<hyper::upgrade::OnUpgrade>,
        deadline: Option<tokio::time::Instant>,
    ) -> Attempt {
        let fail = |status, why: String, endpoint, req: Option<Request<Body>>| Attempt {
            response: local(status, &why),
            endpoint,
            note: why,
            unsent: req.is_some(),
            sent: false,
            body_taken: false,
            body: req.map(|r| r.into_body()),
            deadline_passed: false,
        };
        let Some(backend) = rule.pick(fastrand::u64(..)) else {
            return fail(
                StatusCode::INTERNAL_SERVER_ERROR,
                "every backend of the rule has weight 0".into(),
                None,
                None,
            );
        };
        let endpoints = table.endpoints_of(&backend.service, self.dialled.ip());
        if endpoints.is_empty() {
            let status = if table.endpoints.contains_key(&backend.service) {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                // No such Service (port): the Gateway API's 500.
                StatusCode::INTERNAL_SERVER_ERROR
            };
            return fail(
                status,
                format!("no endpoint for {}", backend.service),
                None,
                None,
            );
        }
        // The backend Service's `TrafficPolicy` (DestinationRule's place): ejected endpoints
        // are left out of the draw, the connection pool admits the request or answers 503.
        let policy = table.traffic.get(&backend.service.service).cloned();
        let outlier = policy.as_ref().and_then(|p| p.outlier);
        let pool = policy.as_ref().and_then(|p| p.pool);
        let traffic = &self.ctx.http.traffic;
        let healthy = match outlier {
            Some(_) => traffic.healthy(&backend.service.service, &endpoints),
            None => Vec::new(),
        };
        let candidates = if healthy.is_empty() {
            &endpoints
        } else {
            &healthy
        };
        // The kernel's choice stands when the request stays on the dialled Service (session
        // affinity, topology); another Service's endpoint is drawn at random.
        let endpoint = if candidates.contains(&self.dialled) {
            self.dialled
        } else {
            candidates[fastrand::usize(..candidates.len())]
        };
        let count = |outcome| {
            if let Some(rule) = &outlier
                && let Some(time) = traffic.record(
                    &backend.service.service,
                    endpoint,
                    &endpoints,
                    rule,
                    outcome,
                )
            {
                tracing::info!(service = %backend.service, endpoint = %endpoint, ejection = ?time, "HTTP: outlier detection ejects an endpoint");
            }
        };
        let permit = match pool {
            Some(limits) => {
                match traffic
                    .admit(&backend.service.service, &limits, deadline)
                    .await
                {
                    Ok(permit) => permit,
                    Err(super::traffic::Overflow(why)) => {
                        return fail(StatusCode::SERVICE_UNAVAILABLE, why, None, None);
                    }
                }
            }
            None => None,
        };
        let per_connection = pool.and_then(|l| l.max_requests_per_connection);
        let h2 = req.version() == Version::HTTP_2;
        let mut upstream = match self.upstream(endpoint, h2, on_upgrade.is_some()).await {
            Ok(u) => u,
            Err(why) => {
                count(super::traffic::Outcome::GatewayError);
                return fail(StatusCode::BAD_GATEWAY, why, Some(endpoint), Some(req));
            }
        };
        // Neither future borrows its sender, which is kept for the next request below.
        let sent = match &mut upstream {
            Upstream::H1(s) => futures::future::Either::Left(s.send_request(req)),
            Upstream::H2(s) => futures::future::Either::Right(s.send_request(req)),
        };
        let now = tokio::time::Instant::now();
        let per_try = rule.backend_timeout.map(|t| now + t);
        let limit = match (deadline, per_try) {
            (Some(a), Some(b)) => Some((a.min(b), a <= b)),
            (Some(a), None) => Some((a, true)),
            (None, Some(b)) => Some((b, false)),
            (None, None) => None,
        };
        let answer = match limit {
            Some((at, whole)) => match tokio::time::timeout_at(at, sent).await {
                Ok(r) => r,
                Err(_) => {
                    let which = if whole {
                        format!("timeouts.request {:?}", rule.timeout.unwrap_or_default())
                    } else {
                        format!(
                            "timeouts.backendRequest {:?}",
                            rule.backend_timeout.unwrap_or_default()
                        )
                    };
                    let why = format!("no response within {which}");
                    count(super::traffic::Outcome::GatewayError);
                    return Attempt::gave_up(StatusCode::GATEWAY_TIMEOUT, why, endpoint, whole);
                }
            },
            None => sent.await,
        };
        let mut resp = match answer {
            Ok(resp) => resp,
            Err(e) => {
                let why = format!("the backend {endpoint} failed: {e}");
                // A gateway error: retried when the rule lists 502.
                count(super::traffic::Outcome::GatewayError);
                return Attempt::gave_up(StatusCode::BAD_GATEWAY, why, endpoint, false);
            }
        };
        count(super::traffic::Outcome::of(resp.status()));
        let switched = resp.status() == StatusCode::SWITCHING_PROTOCOLS
            || (on_upgrade.is_some() && resp.status().is_success());
        match (on_upgrade, switched) {
            (Some(down), true) => {
                let up = hyper::upgrade::on(&mut resp);
                tokio::spawn(async move {
                    if let (Ok(down), Ok(up)) = (down.await, up.await) {
                        let _ = tokio::io::copy_bidirectional(
                            &mut TokioIo::new(down),
                            &mut TokioIo::new(up),
                        )
                        .await;
                    }
                });
            }
            // An upgrade the backend refused, or an ordinary exchange: the connection can
            // serve the next request, unless it has carried `maxRequestsPerConnection`.
            _ => {
                if !self.retire(endpoint, h2, per_connection) {
                    self.keep(endpoint, h2, upstream);
                }
            }
        }
        rule.response_headers.apply(resp.headers_mut());
        let response = match permit {
            // The pool's place is held until the response's body has gone to the client.
            Some(permit) => resp.map(move |b| {
                b.map_frame(move |frame| {
                    let _held = &permit;
                    frame
                })
                .boxed_unsync()
            }),
            None => resp.map(http_body_util::BodyExt::boxed_unsync),
        };
        Attempt {
            response,
            endpoint: Some(endpoint),
            note: String::new(),
            unsent: false,
            sent: true,
            body_taken: true,
            body: None,
            deadline_passed: false,
        }
    }

    /// `RequestMirror`: a copy of the request to each mirror Service (drawn by its percent),
    /// in a task of its own; the answer is read and discarded, failures only logged.
    fn mirror(
        self: &Arc<Self>,
        rule: &super::routes::Rule,
        table: &Arc<super::routes::RouteTable>,
        parts: &http::request::Parts,
        body: &Bytes,
    ) {
        for (service, percent) in &rule.mirrors {
            if fastrand::u32(0..100) >= *percent {
                continue;
            }
            let endpoints = table.endpoints_of(service, self.dialled.ip());
            if endpoints.is_empty() {
                tracing::debug!(mirror = %service, "HTTP: no endpoint to mirror to");
                continue;
            }
            let endpoint = endpoints[fastrand::usize(..endpoints.len())];
            let mut req = Request::new(full(body.clone()));
            *req.method_mut() = parts.method.clone();
            *req.uri_mut() = parts.uri.clone();
            *req.version_mut() = parts.version;
            *req.headers_mut() = parts.headers.clone();
            let h2 = parts.version == Version::HTTP_2;
            let conn = self.clone();
            let service = service.clone();
            tokio::spawn(async move {
                let sent = async {
                    let mut upstream = conn.upstream(endpoint, h2, false).await?;
                    let resp = match &mut upstream {
                        Upstream::H1(s) => s.send_request(req).await,
                        Upstream::H2(s) => s.send_request(req).await,
                    }
                    .map_err(|e| e.to_string())?;
                    // Read to the end, so the connection can carry the next request.
                    let _ = resp.into_body().collect().await;
                    conn.keep(endpoint, h2, upstream);
                    Ok::<_, String>(())
                };
                let limit = std::time::Duration::from_secs(30);
                match tokio::time::timeout(limit, sent).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::debug!(mirror = %service, error = %e, "HTTP: the mirror failed");
                    }
                    Err(_) => tracing::debug!(mirror = %service, "HTTP: the mirror timed out"),
                }
            });
        }
    }

    /// Counts a request on the connection to `endpoint`; true when that was its last one
    /// (`maxRequestsPerConnection`): it is not kept, so it closes once the exchange ends.
    fn retire(&self, endpoint: SocketAddr, h2: bool, limit: Option<u32>) -> bool {
        let Some(limit) = limit else { return false };
        let mut uses = self
            .uses
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let used = uses.entry((endpoint, h2)).or_default();
        *used += 1;
        if *used < limit {
            return false;
        }
        uses.remove(&(endpoint, h2));
        drop(uses);
        // An h2 connection is shared while in use: no new request takes it from now on.
        self.upstreams
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&(endpoint, h2));
        true
    }

    fn keep(&self, endpoint: SocketAddr, h2: bool, upstream: Upstream) {
        let mut idle = self
            .upstreams
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        idle.insert((endpoint, h2), upstream);
    }

    /// An idle upstream connection to `endpoint`, or a new one. An HTTP/1.1 one is taken out
    /// while in use (one request at a time); an h2 one is shared.
    async fn upstream(
        &self,
        endpoint: SocketAddr,
        h2: bool,
        upgrade: bool,
    ) -> Result<Upstream, String> {
        let cached = {
            let mut idle = self
                .upstreams
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if h2 {
                match idle.get(&(endpoint, true)) {
                    Some(Upstream::H2(s)) => Some(Upstream::H2(s.clone())),
                    _ => None,
                }
            } else {
                idle.remove(&(endpoint, false))
            }
        };
        let reusable = match cached {
            Some(Upstream::H1(mut s)) if !upgrade => {
                s.ready().await.is_ok().then_some(Upstream::H1(s))
            }
            Some(Upstream::H2(s)) if !s.is_closed() => Some(Upstream::H2(s)),
            _ => None,
        };
        if let Some(upstream) = reusable {
            return Ok(upstream);
        }
        // Boxed: a new connection's future (tunnel, TLS, handshake) is large, and every
        // request's future would otherwise carry its size, copied whenever hyper spawns or
        // moves the request's task.
        Box::pin(self.connect(endpoint, h2)).await
    }

    /// A new upstream connection to `endpoint` over a new HBONE stream.
    async fn connect(&self, endpoint: SocketAddr, h2: bool) -> Result<Upstream, String> {
        let view = self.ctx.view();
        let Some(destination) = view.workload(endpoint.ip()).cloned() else {
            return Err(format!("the endpoint {endpoint} is not a meshed pod"));
        };
        drop(view);
        let opened = crate::tunnel::outbound::open(
            &self.ctx,
            &self.pool,
            &self.source,
            &destination,
            self.peer,
            endpoint,
        )
        .await
        .map_err(|e| format!("tunnel to {endpoint}: {e}"))?;
        let lease = opened.lease;
        // A new connection: it has carried nothing yet.
        self.uses
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&(endpoint, h2));
        let io = TokioIo::new(H2Io::new(opened.send, opened.recv));
        if h2 {
            let (sender, connection) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .map_err(|e| format!("h2c to {endpoint}: {e}"))?;
            tokio::spawn(async move {
                let _ = connection.await;
                drop(lease);
            });
            self.keep(endpoint, true, Upstream::H2(sender.clone()));
            Ok(Upstream::H2(sender))
        } else {
            let (sender, connection) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(|e| format!("HTTP/1.1 to {endpoint}: {e}"))?;
            tokio::spawn(async move {
                let _ = connection.with_upgrades().await;
                drop(lease);
            });
            Ok(Upstream::H1(sender))
        }
    }
}
