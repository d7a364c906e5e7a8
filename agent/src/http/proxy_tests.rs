//! The HTTP proxy end to end in one process, on loopback: a pod's connection is served by
//! `proxy::serve` on the client context, each request goes over a real HBONE connection (mutual
//! TLS, HTTP/2 CONNECT) to a server context that connects to an HTTP "pod". Needs root
//! (`IP_TRANSPARENT`, `SO_MARK`), as the tunnel's own tests; fails, never skips, without it.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use super::gateway::HttpRoute;
use super::{HttpRecord, RouteTable, ServiceKey};
use crate::ca::manager::CertManager;
use crate::ca::testing::authority;
use crate::policy::ObjectRef;
use crate::services::{Endpoint, Frontend, Protocol, ServicePort, ServiceTable};
use crate::tunnel::pool::Pool;
use crate::tunnel::testing::{self, CLIENT, POD, TD, workload};
use crate::tunnel::{Context, MeshView, TunnelConfig, TunnelStats, inbound};

fn context(
    ca: &Arc<crate::ca::Authority>,
    local: &str,
    config: TunnelConfig,
    http: RouteTable,
) -> Arc<Context> {
    let mut workloads = std::collections::HashMap::new();
    for w in [
        workload("backend", "api", POD, local == "server"),
        workload("frontend", "web", CLIENT, local == "client"),
    ] {
        workloads.insert(w.host_ips[0], Arc::new(w));
    }
    let ctx = Arc::new(Context {
        config,
        view: RwLock::new(Arc::new(MeshView {
            workloads,
            compiled: Arc::new(testing::compiled(None, true)),
            http: Arc::new(http),
        })),
        certs: CertManager::new(ca.clone(), Duration::from_secs(3600)),
        trust: ca.trust(),
        stats: TunnelStats::default(),
        flows: Arc::new(|_| {}),
        live: inbound::LiveStreams::default(),
        time_wait: crate::tunnel::timewait::Reaper::default(),
        http: super::HttpShared::default(),
        local: std::sync::OnceLock::new(),
    });
    for w in ctx.view().workloads.values().filter(|w| w.local) {
        ctx.certs.get(&w.identity).unwrap();
    }
    ctx
}

/// An HTTP/1.1 and h2c "pod": answers `pod` with the request's protocol and its `x-env` header
/// in `x-seen-*`; `/slow` answers after 2 s.
async fn http_pod() -> SocketAddr {
    let listener = TcpListener::bind((POD, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|mut req: http::Request<_>| async move {
                    if req.headers().contains_key(http::header::UPGRADE) {
                        // An echo after the switch, as a WebSocket server would talk.
                        let upgrade = hyper::upgrade::on(&mut req);
                        tokio::spawn(async move {
                            if let Ok(upgraded) = upgrade.await {
                                let (mut r, mut w) = tokio::io::split(TokioIo::new(upgraded));
                                let _ = tokio::io::copy(&mut r, &mut w).await;
                            }
                        });
                        let mut resp = http::Response::new(Full::new(Bytes::new()));
                        *resp.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
                        resp.headers_mut()
                            .insert(http::header::CONNECTION, "upgrade".parse().unwrap());
                        resp.headers_mut()
                            .insert(http::header::UPGRADE, "echo".parse().unwrap());
                        return Ok::<_, Infallible>(resp);
                    }
                    if req.uri().path() == "/slow" {
                        tokio::time::sleep(Duration::from_secs(2)).await;
                    }
                    let env = req.headers().get("x-env").cloned();
                    let traceparent = req.headers().get("traceparent").cloned();
                    let mut resp = http::Response::new(Full::new(Bytes::from_static(b"pod")));
                    resp.headers_mut().insert(
                        "x-seen-version",
                        format!("{:?}", req.version()).parse().unwrap(),
                    );
                    if let Some(env) = env {
                        resp.headers_mut().insert("x-seen-env", env);
                    }
                    if let Some(tp) = traceparent {
                        resp.headers_mut().insert("x-seen-traceparent", tp);
                    }
                    Ok::<_, Infallible>(resp)
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// Service `backend/api` port 80 (`http`) with the pod as its one endpoint, and a route on it.
fn routes(pod: SocketAddr) -> RouteTable {
    let service: k8s_openapi::api::core::v1::Service = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "api", "namespace": "backend"},
        "spec": {"ports": [{"name": "http", "port": 80}]},
    }))
    .unwrap();
    let r = ObjectRef {
        namespace: "backend".into(),
        name: "api".into(),
    };
    let frontend = Frontend {
        addr: "10.96.0.1".parse().unwrap(),
        port: 80,
        protocol: Protocol::Tcp,
    };
    let table = ServiceTable {
        ports: BTreeMap::from([(
            frontend,
            ServicePort {
                service: r.clone(),
                port_name: "http".into(),
                frontend,
                endpoints: vec![Endpoint {
                    addr: pod.ip(),
                    port: pod.port(),
                    ready: true,
                    serving: true,
                    terminating: false,
                    node: None,
                    zone: None,
                    pod: None,
                    used: true,
                }],
                local_only: false,
                affinity_secs: 0,
            },
        )]),
        skipped: BTreeMap::new(),
    };
    let route: HttpRoute = serde_yaml_ng::from_str(
        r"
metadata: {name: api, namespace: backend}
spec:
  parentRefs: [{group: '', kind: Service, name: api}]
  rules:
  - matches: [{path: {value: /slow}}]
    backendRefs: [{name: api, port: 80}]
    timeouts: {request: 300ms}
  - matches: [{path: {value: /ghost}}]
    backendRefs: [{name: ghost, port: 80}]
  - matches: [{path: {value: /}}]
    filters:
    - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-env, value: mesh}]}}
    - {type: ResponseHeaderModifier, responseHeaderModifier: {add: [{name: x-route, value: api}]}}
    backendRefs: [{name: api, port: 80}]
",
    )
    .unwrap();
    let table = RouteTable::build(
        &BTreeMap::from([(r.clone(), Arc::new(service))]),
        &BTreeMap::from([(r, Arc::new(route))]),
        &table,
    );
    let fields: Vec<&str> = table.errors.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(
        fields,
        ["spec.rules[1].backendRefs[0]"],
        "only the missing Service: {:?}",
        table.errors
    );
    table
}

/// Both agents of a test: the destination's HBONE server, the source's proxy behind a local
/// listener standing in for the outbound one, and the source's L7 flows.
struct Mesh {
    ctx: Arc<Context>,
    srv: Arc<Context>,
    outbound: SocketAddr,
    records: Arc<Mutex<Vec<HttpRecord>>>,
    _dir: tempfile::TempDir,
}

/// Starts a [`Mesh`] whose proxy serves `table` for Service `backend/api` port 80 (`pod` is the
/// backend the kernel chose); `tracing`, when given, is the source agent's.
async fn mesh(pod: SocketAddr, table: RouteTable, tracing: Option<super::trace::Tracing>) -> Mesh {
    // SAFETY: no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the proxy tests need root (IP_TRANSPARENT, SO_MARK)"
    );
    let dir = tempfile::tempdir().unwrap();
    let ca = Arc::new(authority(dir.path(), TD));
    // The destination's agent.
    let srv = context(
        &ca,
        "server",
        TunnelConfig::default(),
        RouteTable::default(),
    );
    let listener = TcpListener::bind((POD, 0)).await.unwrap();
    let hbone = listener.local_addr().unwrap();
    tokio::spawn(inbound::serve(
        listener,
        inbound::acceptor(&srv).unwrap(),
        srv.clone(),
    ));
    let key = ServiceKey {
        service: ObjectRef {
            namespace: "backend".into(),
            name: "api".into(),
        },
        port: 80,
    };
    let client: SocketAddr = (CLIENT.parse::<IpAddr>().unwrap(), 40000).into();
    assert_eq!(
        super::Dialled::dialled(&table, client, pod),
        Some(key.clone())
    );
    let ctx = context(
        &ca,
        "client",
        TunnelConfig {
            peer_port: hbone.port(),
            ..TunnelConfig::default()
        },
        table,
    );
    if let Some(t) = tracing {
        let _ = ctx.http.tracing.set(t);
    }
    let records: Arc<Mutex<Vec<HttpRecord>>> = Arc::default();
    let sink = records.clone();
    let _ = ctx.http.flows.set(Arc::new(move |r: &HttpRecord| {
        sink.lock().unwrap().push(r.clone())
    }));
    let outbound = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let outbound_addr = outbound.local_addr().unwrap();
    let pool = Arc::new(Pool::default());
    {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let source = ctx
                .view()
                .workload(CLIENT.parse().unwrap())
                .unwrap()
                .clone();
            while let Ok((stream, _)) = outbound.accept().await {
                tokio::spawn(super::proxy::serve(
                    stream,
                    client,
                    pod,
                    source.clone(),
                    key.clone(),
                    ctx.clone(),
                    pool.clone(),
                ));
            }
        });
    }
    Mesh {
        ctx,
        srv,
        outbound: outbound_addr,
        records,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h1_h2c_and_upgrades_are_routed_through_the_tunnel_with_filters_and_timeouts() {
    let pod = http_pod().await;
    let Mesh {
        ctx,
        srv,
        outbound: outbound_addr,
        records,
        _dir,
    } = mesh(pod, routes(pod), None).await;

    // h2c with prior knowledge: gRPC's transport.
    let io = TokioIo::new(TcpStream::connect(outbound_addr).await.unwrap());
    let (mut h2, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
        .await
        .unwrap();
    tokio::spawn(conn);
    for _ in 0..3 {
        let req = http::Request::builder()
            .uri("http://api.backend/hello")
            .header("x-env", "prod")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = h2.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.headers()["x-seen-version"],
            "HTTP/2.0",
            "h2c end to end"
        );
        assert_eq!(
            resp.headers()["x-seen-env"],
            "mesh",
            "the request header was set"
        );
        assert_eq!(
            resp.headers()["x-route"],
            "api",
            "the response header was added"
        );
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"pod");
    }
    // The route's timeout answers 504 in its time, not the pod's 2 s.
    let started = Instant::now();
    let req = http::Request::builder()
        .uri("http://api.backend/slow")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = h2.send_request(req).await.unwrap();
    let took = started.elapsed();
    assert_eq!(resp.status(), 504);
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(1000),
        "504 after {took:?}, want 300 ms"
    );

    // HTTP/1.1 with keep-alive: two requests, one connection.
    let io = TokioIo::new(TcpStream::connect(outbound_addr).await.unwrap());
    let (mut h1, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(conn);
    for _ in 0..2 {
        h1.ready().await.unwrap();
        let req = http::Request::builder()
            .uri("/hello")
            .header("host", "api.backend")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = h1.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-seen-version"], "HTTP/1.1");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"pod");
    }

    // An upgrade (WebSocket's shape) becomes a byte pipe after the pod's 101.
    let mut ws = TcpStream::connect(outbound_addr).await.unwrap();
    ws.write_all(
        b"GET /ws HTTP/1.1\r\nhost: api.backend\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 4096 {
        ws.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: echo"), "{head}");
    ws.write_all(b"not http at all").await.unwrap();
    let mut echoed = [0u8; 15];
    tokio::time::timeout(Duration::from_secs(5), ws.read_exact(&mut echoed))
        .await
        .expect("the upgraded connection echoes")
        .unwrap();
    assert_eq!(&echoed, b"not http at all");

    let records = records.lock().unwrap().clone();
    let codes: Vec<u16> = records.iter().map(|r| r.code).collect();
    assert_eq!(codes, [200, 200, 200, 504, 200, 200, 101], "{records:?}");
    assert_eq!(records[0].protocol, "HTTP/2");
    assert_eq!(records[0].url, "http://api.backend/hello");
    assert_eq!(records[4].url, "http://api.backend/hello");
    assert_eq!(records[0].route, "backend/api");
    assert_eq!(records[0].destination, pod);
    let metrics = ctx.http.metrics.gather();
    let requests = metrics
        .iter()
        .find(|f| f.name() == "nodeward_http_requests_total")
        .expect("the requests counter");
    let total: f64 = requests
        .get_metric()
        .iter()
        .map(|m| m.get_counter().get_value())
        .sum();
    assert!((total - 7.0).abs() < f64::EPSILON, "counted {total} of 7");
    // Keep-alive and multiplexing reached the tunnel: one pooled HBONE connection, one stream
    // per pod connection, not one per request.
    assert_eq!(TunnelStats::get(&ctx.stats.client_connections), 1);
    assert_eq!(TunnelStats::get(&srv.stats.inbound_ok), 3);
}

/// `maxRequestsPerConnection: 2`: four HTTP/1.1 requests on one pod connection take two
/// upstream connections (two HBONE streams at the destination), where keep-alive alone takes
/// one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_requests_per_connection_closes_the_upstream_connection_after_its_requests() {
    let pod = http_pod().await;
    let api = ObjectRef {
        namespace: "backend".into(),
        name: "api".into(),
    };
    let mut table = routes(pod);
    let policy = super::traffic::Resilience {
        policy: "backend/api".into(),
        targets: vec![api.clone()],
        pool: Some(super::traffic::PoolLimits {
            max_requests_per_connection: Some(2),
            ..super::traffic::PoolLimits::default()
        }),
        outlier: None,
        fault: None,
    };
    table.traffic.insert(api, Arc::new(policy));
    let m = mesh(pod, table, None).await;
    let io = TokioIo::new(TcpStream::connect(m.outbound).await.unwrap());
    let (mut h1, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(conn);
    for _ in 0..4 {
        h1.ready().await.unwrap();
        let req = http::Request::builder()
            .uri("/hello")
            .header("host", "api.backend")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = h1.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let _ = resp.into_body().collect().await.unwrap();
    }
    assert_eq!(
        TunnelStats::get(&m.srv.stats.inbound_ok),
        2,
        "4 requests, 2 per upstream connection"
    );
}

/// An OTLP/HTTP collector: every span it is sent (with its resource's attributes), decoded.
async fn otlp_collector() -> (
    SocketAddr,
    Arc<
        Mutex<
            Vec<(
                Vec<opentelemetry_proto::tonic::common::v1::KeyValue>,
                opentelemetry_proto::tonic::trace::v1::Span,
            )>,
        >,
    >,
) {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use prost::Message as _;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let spans: Arc<Mutex<Vec<_>>> = Arc::default();
    let got = spans.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let got = got.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let got = got.clone();
                        async move {
                            assert_eq!(req.uri().path(), "/v1/traces");
                            assert_eq!(req.headers()["content-type"], "application/x-protobuf");
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let export = ExportTraceServiceRequest::decode(body).unwrap();
                            for rs in export.resource_spans {
                                let resource =
                                    rs.resource.map(|r| r.attributes).unwrap_or_default();
                                for ss in rs.scope_spans {
                                    for span in ss.spans {
                                        got.lock().unwrap().push((resource.clone(), span));
                                    }
                                }
                            }
                            Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::new())))
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, spans)
}

fn attr(attrs: &[opentelemetry_proto::tonic::common::v1::KeyValue], key: &str) -> String {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    match attrs
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.as_ref())
        .and_then(|v| v.value.as_ref())
    {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        other => format!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traceparent_is_continued_or_started_and_the_spans_reach_the_otlp_collector() {
    use super::trace::{TraceConfig, TraceParent, Tracing, to_hex};
    let (collector, spans) = otlp_collector().await;
    let pod = http_pod().await;
    let tracing = Tracing::new(
        &TraceConfig::new(1.0, Some(&format!("http://{collector}"))).unwrap(),
        "node-1",
    )
    .unwrap();
    let m = mesh(pod, routes(pod), Some(tracing)).await;
    let io = TokioIo::new(TcpStream::connect(m.outbound).await.unwrap());
    let (mut h1, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(conn);
    let mut seen = Vec::new();
    let given = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let unsampled = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
    for traceparent in [Some(given), None, Some(unsampled)] {
        h1.ready().await.unwrap();
        let mut req = http::Request::builder()
            .uri("/hello")
            .header("host", "api.backend");
        if let Some(tp) = traceparent {
            req = req.header("traceparent", tp);
        }
        let resp = h1
            .send_request(req.body(Empty::<Bytes>::new()).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let tp = resp
            .headers()
            .get("x-seen-traceparent")
            .map(|v| v.to_str().unwrap().to_owned())
            .expect("the backend got a traceparent");
        let _ = resp.into_body().collect().await;
        seen.push(TraceParent::parse(&tp).expect("a valid traceparent reached the backend"));
    }
    // Continued: the same trace, the proxy's span as the backend's parent.
    assert_eq!(
        to_hex(&seen[0].trace_id),
        "4bf92f3577b34da6a3ce929d0e0e4736"
    );
    assert_ne!(to_hex(&seen[0].parent_id), "00f067aa0ba902b7");
    // Started: a new sampled trace.
    assert_ne!(seen[1].trace_id, seen[0].trace_id);
    assert!(seen[1].sampled());
    // Not sampled by the caller: passed on untouched.
    assert_eq!(seen[2].header(), unsampled);
    // Each L7 flow names its trace.
    let records = m.records.lock().unwrap().clone();
    let ids: Vec<Option<String>> = records.iter().map(|r| r.trace_id.clone()).collect();
    assert_eq!(
        ids,
        seen.iter()
            .map(|t| Some(to_hex(&t.trace_id)))
            .collect::<Vec<_>>()
    );
    let flow = serde_json::to_value(crate::flows::from_http(
        &records[0],
        &crate::flows::EnrichmentIndex::default(),
    ))
    .unwrap();
    assert_eq!(
        flow["trace_context"]["parent"]["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736",
        "{flow}"
    );

    // The spans of the two sampled requests reach the collector (the batch flushed now, not
    // in its 5 s).
    let ctx = m.ctx.clone();
    tokio::task::spawn_blocking(move || ctx.http.tracing.get().unwrap().flush())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while spans.lock().unwrap().len() < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let spans = spans.lock().unwrap().clone();
    assert_eq!(spans.len(), 2, "two sampled requests, two spans: {spans:?}");
    let (resource, first) = spans
        .iter()
        .find(|(_, s)| s.trace_id == seen[0].trace_id)
        .expect("the continued trace's span");
    assert_eq!(attr(resource, "service.name"), "nodeward");
    assert_eq!(attr(resource, "host.name"), "node-1");
    assert_eq!(
        first.parent_span_id,
        hex_bytes("00f067aa0ba902b7"),
        "the caller's span is the parent"
    );
    assert_eq!(
        first.span_id, seen[0].parent_id,
        "the backend's parent is this span"
    );
    assert_eq!(first.kind, 3, "SPAN_KIND_CLIENT");
    assert_eq!(first.name, "GET");
    assert_eq!(attr(&first.attributes, "http.request.method"), "GET");
    assert_eq!(attr(&first.attributes, "http.response.status_code"), "200");
    assert_eq!(
        attr(&first.attributes, "url.full"),
        "http://api.backend/hello"
    );
    assert_eq!(attr(&first.attributes, "nodeward.route"), "backend/api");
    assert_eq!(attr(&first.attributes, "server.address"), "api.backend");
    assert!(first.end_time_unix_nano > first.start_time_unix_nano);
    let (_, second) = spans
        .iter()
        .find(|(_, s)| s.trace_id == seen[1].trace_id)
        .expect("the started trace's span");
    assert!(second.parent_span_id.is_empty(), "a root span");
    assert_eq!(second.span_id, seen[1].parent_id);
}

fn hex_bytes(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// A gRPC-shaped h2c "pod": `/pkg.Echo/Say` answers the request's message framed as gRPC
/// does, with `grpc-status: 0` in the trailers, when the request came with `te: trailers`
/// (as gRPC servers require); `/slow` answers after 2 s; anything else is UNIMPLEMENTED.
async fn grpc_pod() -> SocketAddr {
    use http_body_util::StreamBody;
    use hyper::body::Frame;
    let listener = TcpListener::bind((POD, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let te = req.headers().get("te").cloned();
                        let path = req.uri().path().to_owned();
                        let message = req.into_body().collect().await.unwrap().to_bytes();
                        if path == "/slow" {
                            tokio::time::sleep(Duration::from_secs(2)).await;
                        }
                        let (status, data) =
                            match (path.as_str(), te.as_ref().map(|v| v.as_bytes())) {
                                ("/pkg.Echo/Say", Some(b"trailers")) => ("0", message),
                                ("/pkg.Echo/Say", _) => ("13", Bytes::new()),
                                _ => ("12", Bytes::new()),
                            };
                        let mut trailers = http::HeaderMap::new();
                        trailers.insert("grpc-status", status.parse().unwrap());
                        let frames: Vec<Result<Frame<Bytes>, Infallible>> =
                            vec![Ok(Frame::data(data)), Ok(Frame::trailers(trailers))];
                        let mut resp =
                            http::Response::new(StreamBody::new(futures::stream::iter(frames)));
                        resp.headers_mut()
                            .insert("content-type", "application/grpc".parse().unwrap());
                        Ok::<_, Infallible>(resp)
                    },
                );
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_over_h2c_keeps_its_trailers_and_the_agents_answers_carry_grpc_status() {
    let pod = grpc_pod().await;
    let m = mesh(pod, routes(pod), None).await;
    let io = TokioIo::new(TcpStream::connect(m.outbound).await.unwrap());
    let (mut h2, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
        .await
        .unwrap();
    tokio::spawn(conn);
    let call = |path: &str| {
        // One length-prefixed message: not compressed, 5 bytes.
        let framed = Bytes::from_static(b"\x00\x00\x00\x00\x05hello");
        http::Request::builder()
            .method("POST")
            .uri(format!("http://api.backend{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(framed))
            .unwrap()
    };
    for _ in 0..2 {
        let resp = h2.send_request(call("/pkg.Echo/Say")).await.unwrap();
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap();
        let trailers = body.trailers().cloned().expect("trailers came through");
        assert_eq!(
            trailers["grpc-status"], "0",
            "the pod saw te: trailers and answered OK"
        );
        assert_eq!(&body.to_bytes()[..], b"\x00\x00\x00\x00\x05hello");
    }
    let resp = h2.send_request(call("/pkg.Echo/Other")).await.unwrap();
    let body = resp.into_body().collect().await.unwrap();
    assert_eq!(
        body.trailers().unwrap()["grpc-status"],
        "12",
        "the pod's own status"
    );
    // The route's timeout: the agent's 504, as gRPC's UNAVAILABLE.
    let started = Instant::now();
    let resp = h2.send_request(call("/slow")).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(resp.status(), 200, "gRPC reads grpc-status");
    assert_eq!(resp.headers()["grpc-status"], "14");
    assert!(
        resp.headers()["grpc-message"]
            .to_str()
            .unwrap()
            .contains("timeouts.request"),
        "{:?}",
        resp.headers()
    );
    let records = m.records.lock().unwrap().clone();
    let codes: Vec<u16> = records.iter().map(|r| r.code).collect();
    assert_eq!(
        codes,
        [200, 200, 200, 504],
        "the flows keep the HTTP status"
    );
    assert!(records.iter().all(|r| r.protocol == "HTTP/2"));
}

/// A raw HTTP/1.1 "pod" for faults: after a request's head, `/reset-head` resets the connection
/// before answering, `/reset-body` sends the head and half the body, then resets; anything
/// else is answered `ok`.
async fn faulty_pod() -> SocketAddr {
    let listener = TcpListener::bind((POD, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let text = String::from_utf8_lossy(&head).into_owned();
                    head.clear();
                    let reset = |s: TcpStream| {
                        let s = s.into_std().unwrap();
                        socket2::SockRef::from(&s)
                            .set_linger(Some(Duration::ZERO))
                            .unwrap();
                        drop(s);
                    };
                    if text.starts_with("GET /reset-head ") {
                        reset(stream);
                        return;
                    }
                    if text.starts_with("GET /reset-body ") {
                        stream
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nhalf")
                            .await
                            .unwrap();
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        reset(stream);
                        return;
                    }
                    if stream
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Writes `request` on a new connection to `addr` and reads until the peer closes (or 5 s):
/// what came back.
async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_oversized_slow_and_reset_exchanges_get_400_431_408_502_and_stall_no_one() {
    let pod = faulty_pod().await;
    let m = mesh(pod, routes(pod), None).await;
    let ok = async || {
        let started = Instant::now();
        let answer = raw_exchange(
            m.outbound,
            b"GET /fine HTTP/1.1\r\nhost: api.backend\r\nconnection: close\r\n\r\n",
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
        assert!(answer.ends_with("ok"), "{answer:?}");
        started.elapsed()
    };
    ok().await;

    // A slow-loris client holds a connection with half a head; others are served meanwhile.
    let mut slow = TcpStream::connect(m.outbound).await.unwrap();
    slow.write_all(b"GET /fine HTTP/1.1\r\nhost: api.backend\r\n")
        .await
        .unwrap();
    let slow_started = Instant::now();

    // Malformed: a header line without a colon.
    let bad = raw_exchange(
        m.outbound,
        b"GET / HTTP/1.1\r\nhost: api.backend\r\nthis is not a header\r\n\r\n",
    )
    .await;
    assert!(bad.starts_with("HTTP/1.1 400"), "malformed: {bad:?}");
    // Oversized: more header fields than the proxy takes.
    let mut big = b"GET / HTTP/1.1\r\nhost: api.backend\r\n".to_vec();
    for i in 0..200 {
        big.extend_from_slice(format!("x-filler-{i}: {}\r\n", "a".repeat(40)).as_bytes());
    }
    big.extend_from_slice(b"\r\n");
    let large = raw_exchange(m.outbound, &big).await;
    assert!(large.starts_with("HTTP/1.1 431"), "oversized: {large:?}");
    // The backend resets before its answer: 502 from the agent.
    let reset = raw_exchange(
        m.outbound,
        b"GET /reset-head HTTP/1.1\r\nhost: api.backend\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(
        reset.starts_with("HTTP/1.1 502"),
        "reset before the answer: {reset:?}"
    );
    // A backendRef to a Service that does not exist: 500, as the Gateway API says.
    let ghost = raw_exchange(
        m.outbound,
        b"GET /ghost HTTP/1.1\r\nhost: api.backend\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(
        ghost.starts_with("HTTP/1.1 500"),
        "missing backend Service: {ghost:?}"
    );
    // ...or halfway through its body: the answer began, so the client's connection is cut
    // (never a hang, never a complete-looking body).
    let started = Instant::now();
    let cut = raw_exchange(
        m.outbound,
        b"GET /reset-body HTTP/1.1\r\nhost: api.backend\r\n\r\n",
    )
    .await;
    assert!(
        cut.starts_with("HTTP/1.1 200") && cut.len() < cut.find("\r\n\r\n").unwrap() + 4 + 100,
        "a truncated body, then the close: {cut:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "cut after {:?}",
        started.elapsed()
    );
    // None of it stalled an ordinary request.
    let took = ok().await;
    assert!(
        took < Duration::from_millis(500),
        "an ordinary request took {took:?}"
    );

    // The slow client gets its 408 after the header timeout (1 s in tests), then the close.
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut answer))
        .await
        .expect("the slow-loris connection is closed")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "slow-loris: {answer:?}");
    let waited = slow_started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(3),
        "408 after {waited:?}"
    );
    // An idle keep-alive connection is closed quietly, not answered 408.
    let mut idle = TcpStream::connect(m.outbound).await.unwrap();
    idle.write_all(b"GET /fine HTTP/1.1\r\nhost: api.backend\r\n\r\n")
        .await
        .unwrap();
    let mut first = vec![0u8; 64];
    let n = idle.read(&mut first).await.unwrap();
    assert!(first[..n].starts_with(b"HTTP/1.1 200"));
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), idle.read_to_end(&mut rest)).await;
    assert!(
        !String::from_utf8_lossy(&rest).contains("408"),
        "an idle connection got {:?}",
        String::from_utf8_lossy(&rest)
    );

    let codes: Vec<u16> = m.records.lock().unwrap().iter().map(|r| r.code).collect();
    assert_eq!(
        codes,
        [200, 502, 500, 200, 200, 200],
        "one flow per request that reached the proxy (hyper answers 400, 431, 408 before one exists)"
    );
}
