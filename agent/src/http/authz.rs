//! Authorization by request: the destination agent's check of `MeshPolicy`
//! `toPorts[].rules.http` on a tunnelled connection.
//!
//! The HBONE server authorizes the CONNECT at L4 first (`tunnel::inbound`). When the
//! destination pod's policy restricts the requests this peer may send to this port
//! ([`crate::policy::evaluate::http_rules`]), the stream is not spliced: hyper serves it
//! (HTTP/1.1 or prior-knowledge h2c, as the client speaks) and every request is checked
//! against the policy of the moment with the identity the client's certificate proved. An
//! allowed request goes to the pod over a hyper client connection made from the client's
//! address; a refused one is answered 403 here (its body drained, up to a bound) and the
//! connection serves the next request. Both leave an L7 flow: FORWARDED, or DROPPED with
//! `POLICY_DENIED` and the restricting rule.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent_common::{DIR_INGRESS, IDENTITY_WORLD, mesh::MARK_FROM_AGENT};
use bytes::Bytes;
use h2::{RecvStream, SendStream};
use http::{Request, Response, StatusCode, Version, header};
use http_body_util::{BodyExt as _, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use super::HttpRecord;
use super::io::H2Io;
use super::proxy::{Body, PodSocket, grpc_local, is_grpc, local, protocol, request_url};
use crate::ca::SpiffeId;
use crate::policy::PeerFacts;
use crate::tunnel::Context;

/// How much of a refused request's body is read (so that the connection can serve the next
/// request) before the connection is given up instead.
const DRAIN_LIMIT: usize = 64 * 1024;
const DRAIN_TIME: Duration = Duration::from_secs(1);
/// How long a request's head may take to arrive (HTTP/1.1), as on the source side.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// What the policy says about one connection's requests.
enum Requests {
    /// Every request (no `rules.http` restricts this peer on this port).
    Any,
    /// Only those some entry matches: (rule id, entries) per restricting allow.
    Only(Vec<(u32, crate::policy::l7::HttpRules)>),
    /// None: L4 policy no longer allows the connection (it is being revoked).
    Denied(u32),
}

/// The client's facts as the HBONE server's L4 check takes them (the address's identity only
/// counts because that check made sure it is the certificate's workload's or no pod's).
fn requests(ctx: &Context, client: &SpiffeId, src: SocketAddr, dst: SocketAddr) -> Requests {
    let view = ctx.view();
    let Some(policy) = view
        .workload(dst.ip())
        .filter(|w| w.local)
        .and_then(|w| view.endpoint_policy(&w.pod))
    else {
        return Requests::Denied(0);
    };
    let compiled = &view.compiled;
    let facts = PeerFacts {
        identity: compiled.ipcache_lookup(src.ip()).unwrap_or(IDENTITY_WORLD),
        cidr_identity: compiled.policy_cidr_lookup(src.ip()),
        principal_identities: compiled.principal_identities(client),
    };
    let verdict = crate::policy::evaluate(
        policy,
        DIR_INGRESS,
        &facts,
        crate::policy::model::PROTO_TCP,
        dst.port(),
    );
    if !verdict.allowed {
        return Requests::Denied(verdict.rule_id);
    }
    match crate::policy::evaluate::http_rules(policy, &facts, dst.port()) {
        None => Requests::Any,
        Some(rules) => Requests::Only(rules),
    }
}

/// Whether the HBONE server must check this connection's requests one by one (`rules.http`
/// restricts what this client may ask this pod on this port).
#[must_use]
pub fn restricted(ctx: &Context, client: &SpiffeId, src: SocketAddr, dst: SocketAddr) -> bool {
    matches!(requests(ctx, client, src, dst), Requests::Only(_))
}

/// One checked connection.
struct Conn {
    ctx: Arc<Context>,
    client: SpiffeId,
    src: SocketAddr,
    dst: SocketAddr,
    /// The connection the HBONE server made to the pod, until the first request takes it.
    fresh: Mutex<Option<TcpStream>>,
    /// The idle client connection to the pod.
    upstream: Mutex<Option<Upstream>>,
}

enum Upstream {
    H1(hyper::client::conn::http1::SendRequest<Incoming>),
    H2(hyper::client::conn::http2::SendRequest<Incoming>),
}

/// Serves the HBONE stream `send`/`recv` (already answered 200) as HTTP until it ends,
/// forwarding the allowed requests to the pod (`pod`: connected from the client's address).
pub async fn serve(
    ctx: Arc<Context>,
    client: SpiffeId,
    src: SocketAddr,
    dst: SocketAddr,
    pod: TcpStream,
    send: SendStream<Bytes>,
    recv: RecvStream,
) {
    let conn = Arc::new(Conn {
        ctx,
        client,
        src,
        dst,
        fresh: Mutex::new(Some(pod)),
        upstream: Mutex::new(None),
    });
    let service = hyper::service::service_fn(move |req| {
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(conn.request(req).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let io = TokioIo::new(H2Io::new(send, recv));
    if let Err(e) = builder.serve_connection_with_upgrades(io, service).await {
        tracing::debug!(source = %src, destination = %dst, error = %e, "checked HTTP connection ended with an error");
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Conn {
    async fn request(self: &Arc<Self>, mut req: Request<Incoming>) -> Response<Body> {
        let start = Instant::now();
        let version = req.version();
        let method = req.method().to_string();
        let url = request_url(&req);
        // The source agent's proxy continued or started the trace: named on this flow too.
        let trace_id = req
            .headers()
            .get(super::trace::TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(super::trace::TraceParent::parse)
            .map(|t| super::trace::to_hex(&t.trace_id));
        let (allowed, rule_id, why) = match requests(&self.ctx, &self.client, self.src, self.dst) {
            Requests::Any => (true, 0, String::new()),
            Requests::Denied(rule) => (false, rule, "the connection is no longer allowed".into()),
            Requests::Only(rules) => {
                let path = req.uri().path();
                let hit = rules.iter().find(|(_, entries)| {
                    entries
                        .iter()
                        .any(|m| m.matches(req.method().as_str(), path, req.headers()))
                });
                match hit {
                    Some((rule, _)) => (true, *rule, String::new()),
                    None => (
                        false,
                        rules.first().map_or(0, |(rule, _)| *rule),
                        "no rules.http entry matches".into(),
                    ),
                }
            }
        };
        let grpc = is_grpc(req.headers());
        let (resp, note) = if allowed {
            let upgrading = req.method() == http::Method::CONNECT
                || (version != Version::HTTP_2 && req.headers().contains_key(header::UPGRADE));
            let on_upgrade = upgrading.then(|| hyper::upgrade::on(&mut req));
            self.forward(req, on_upgrade).await
        } else {
            // Read what the client sends of the refused body, so the connection stays usable;
            // past the bound, hyper closes it after the answer.
            let body = Limited::new(req.into_body(), DRAIN_LIMIT);
            let _ = tokio::time::timeout(DRAIN_TIME, body.collect()).await;
            tracing::info!(source = %self.src, destination = %self.dst, client = %self.client, method = %method, url = %url, "HTTP: request refused by rules.http");
            (local(StatusCode::FORBIDDEN, "Access denied"), String::new())
        };
        let code = resp.status().as_u16();
        let resp = if grpc && (!allowed || !note.is_empty()) {
            grpc_local(resp.status(), if allowed { &note } else { "Access denied" })
        } else {
            resp
        };
        let view = self.ctx.view();
        let record = HttpRecord {
            source: self.src,
            destination: self.dst,
            source_spiffe_id: self.client.uri(),
            destination_spiffe_id: view
                .workload(self.dst.ip())
                .map(|w| w.identity.uri())
                .unwrap_or_default(),
            source_identity: view
                .compiled
                .ipcache_lookup(self.src.ip())
                .unwrap_or_default(),
            destination_identity: view
                .compiled
                .ipcache_lookup(self.dst.ip())
                .unwrap_or_default(),
            method,
            url,
            protocol: protocol(version),
            code,
            latency: start.elapsed(),
            route: String::new(),
            note: if allowed { note } else { why },
            direction: DIR_INGRESS,
            drop_reason: if allowed { "" } else { "POLICY_DENIED" },
            rule_id,
            trace_id,
        };
        drop(view);
        if let Some(sink) = self.ctx.http.flows.get() {
            sink(&record);
        }
        resp
    }

    /// Sends an allowed request to the pod: the response, and why the agent answered itself
    /// (empty when the pod answered).
    async fn forward(
        self: &Arc<Self>,
        req: Request<Incoming>,
        on_upgrade: Option<hyper::upgrade::OnUpgrade>,
    ) -> (Response<Body>, String) {
        let (mut parts, body) = req.into_parts();
        if on_upgrade.is_none() {
            super::proxy::strip_hop_by_hop(&mut parts.headers);
        }
        let h2 = parts.version == Version::HTTP_2;
        let req = Request::from_parts(parts, body);
        let mut upstream = match self.upstream(h2, on_upgrade.is_some()).await {
            Ok(u) => u,
            Err(why) => return (local(StatusCode::BAD_GATEWAY, &why), why),
        };
        let sent = match &mut upstream {
            Upstream::H1(s) => futures::future::Either::Left(s.send_request(req)),
            Upstream::H2(s) => futures::future::Either::Right(s.send_request(req)),
        };
        let mut resp = match sent.await {
            Ok(resp) => resp,
            Err(e) => {
                let why = format!("the pod {} failed: {e}", self.dst);
                return (local(StatusCode::BAD_GATEWAY, &why), why);
            }
        };
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
            _ => *lock(&self.upstream) = Some(upstream),
        }
        (
            resp.map(http_body_util::BodyExt::boxed_unsync),
            String::new(),
        )
    }

    /// The idle client connection to the pod, or a new one: on the socket the HBONE server
    /// connected first, then (when the pod closed one) from the client's address again.
    async fn upstream(&self, h2: bool, upgrade: bool) -> Result<Upstream, String> {
        let cached = lock(&self.upstream).take();
        let reusable = match cached {
            Some(Upstream::H1(mut s)) if !h2 && !upgrade => {
                s.ready().await.is_ok().then_some(Upstream::H1(s))
            }
            Some(Upstream::H2(s)) if h2 && !s.is_closed() => {
                *lock(&self.upstream) = Some(Upstream::H2(s.clone()));
                Some(Upstream::H2(s))
            }
            _ => None,
        };
        if let Some(upstream) = reusable {
            return Ok(upstream);
        }
        let fresh = lock(&self.fresh).take();
        let pod = match fresh {
            Some(pod) => pod,
            None => crate::tunnel::net::transparent_connect(
                self.src.ip(),
                self.dst,
                MARK_FROM_AGENT,
                self.ctx.config.connect_timeout,
            )
            .await
            .map_err(|e| format!("connect to the pod {}: {e}", self.dst))?,
        };
        let io = TokioIo::new(PodSocket::new(pod, self.ctx.clone()));
        if h2 {
            let (sender, connection) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .map_err(|e| format!("h2c to the pod {}: {e}", self.dst))?;
            tokio::spawn(connection);
            *lock(&self.upstream) = Some(Upstream::H2(sender.clone()));
            Ok(Upstream::H2(sender))
        } else {
            let (sender, connection) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(|e| format!("HTTP/1.1 to the pod {}: {e}", self.dst))?;
            tokio::spawn(connection.with_upgrades());
            Ok(Upstream::H1(sender))
        }
    }
}
