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
                    let mut resp = http::Response::new(Full::new(Bytes::from_static(b"pod")));
                    resp.headers_mut().insert(
                        "x-seen-version",
                        format!("{:?}", req.version()).parse().unwrap(),
                    );
                    if let Some(env) = env {
                        resp.headers_mut().insert("x-seen-env", env);
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
    assert!(table.errors.is_empty(), "{:?}", table.errors);
    table
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h1_h2c_and_upgrades_are_routed_through_the_tunnel_with_filters_and_timeouts() {
    // SAFETY: no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the proxy tests need root (IP_TRANSPARENT, SO_MARK)"
    );
    let dir = tempfile::tempdir().unwrap();
    let ca = Arc::new(authority(dir.path(), TD));
    let pod = http_pod().await;
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
    // The source's agent, its proxy behind a local listener standing in for the outbound one.
    let table = routes(pod);
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
    // SAFETY: no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the proxy tests need root (IP_TRANSPARENT, SO_MARK)"
    );
    let dir = tempfile::tempdir().unwrap();
    let ca = Arc::new(authority(dir.path(), TD));
    let pod = http_pod().await;
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
    table.traffic.insert(api.clone(), Arc::new(policy));
    let key = ServiceKey {
        service: api,
        port: 80,
    };
    let client: SocketAddr = (CLIENT.parse::<IpAddr>().unwrap(), 40001).into();
    let ctx = context(
        &ca,
        "client",
        TunnelConfig {
            peer_port: hbone.port(),
            ..TunnelConfig::default()
        },
        table,
    );
    let outbound = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let outbound_addr = outbound.local_addr().unwrap();
    {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let source = ctx
                .view()
                .workload(CLIENT.parse().unwrap())
                .unwrap()
                .clone();
            if let Ok((stream, _)) = outbound.accept().await {
                super::proxy::serve(
                    stream,
                    client,
                    pod,
                    source,
                    key,
                    ctx.clone(),
                    Arc::new(Pool::default()),
                )
                .await;
            }
        });
    }
    let io = TokioIo::new(TcpStream::connect(outbound_addr).await.unwrap());
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
        TunnelStats::get(&srv.stats.inbound_ok),
        2,
        "4 requests, 2 per upstream connection"
    );
}
