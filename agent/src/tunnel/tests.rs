//! The tunnel end to end in one process, on loopback: a client context dials a server context
//! over real mutual TLS and HTTP/2, the server authorizes against a compiled policy and
//! connects (transparently, with the agent's mark) to an echo "pod". Needs root
//! (`IP_TRANSPARENT`, `SO_MARK`); fails, never skips, without it.
//!
//! The "pods": the destination is 127.0.0.1 (the echo server), the source 127.0.0.2 (any
//! loopback address is local, so the transparent connect from it needs no route).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use super::outbound::{Opened, open};
use super::pool::Pool;
use super::splice::splice;
use super::testing::{self, ALLOW_RULE, CLIENT, CLIENT_IDENTITY, POD, TD, workload};
use super::{Context, MeshView, TunnelConfig, TunnelStats, Workload, inbound};
use crate::ca::manager::CertManager;
use crate::ca::testing::authority;
use crate::ca::{Authority, SpiffeId};
use crate::flows::TunnelRecord;
use crate::policy::CompiledState;

const DEFAULT_DENY_RULE: u32 = 8;

fn require_root() {
    // SAFETY: no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the tunnel tests need root (IP_TRANSPARENT, SO_MARK); running as uid {euid}"
    );
}

/// The destination's compiled policy: default deny on ingress, and, when `allow_client`, an
/// allow of TCP/8080.. from the client's identity.
fn compiled(allow_client: bool) -> CompiledState {
    testing::compiled(Some(DEFAULT_DENY_RULE), allow_client)
}

struct Side {
    ctx: Arc<Context>,
    records: Arc<Mutex<Vec<TunnelRecord>>>,
}

fn side(ca: &Arc<Authority>, local: &str, compiled: CompiledState, config: TunnelConfig) -> Side {
    side_with(ca, local, compiled, config, "api", &[])
}

/// A side whose view has the destination pod running as `server_sa`, and `extra` workloads.
fn side_with(
    ca: &Arc<Authority>,
    local: &str,
    compiled: CompiledState,
    config: TunnelConfig,
    server_sa: &str,
    extra: &[Workload],
) -> Side {
    let records: Arc<Mutex<Vec<TunnelRecord>>> = Arc::default();
    let sink = records.clone();
    let mut workloads = std::collections::HashMap::new();
    for w in [
        workload("backend", server_sa, POD, local == "server"),
        workload("frontend", "web", CLIENT, local == "client"),
    ]
    .into_iter()
    .chain(extra.iter().cloned())
    {
        let ip = w.host_ips[0];
        workloads.insert(ip, Arc::new(w));
    }
    let ctx = Arc::new(Context {
        config,
        view: RwLock::new(Arc::new(MeshView {
            workloads,
            compiled: Arc::new(compiled),
            http: Arc::default(),
        })),
        certs: CertManager::new(ca.clone(), Duration::from_secs(3600)),
        trust: ca.trust(),
        stats: TunnelStats::default(),
        flows: Arc::new(move |r: &TunnelRecord| sink.lock().unwrap().push(r.clone())),
        live: inbound::LiveStreams::default(),
        time_wait: super::timewait::Reaper::default(),
        http: crate::http::HttpShared::default(),
        local: std::sync::OnceLock::new(),
    });
    // As the control loop does (`ensure_certificates`): every local workload has its
    // certificate before the HBONE server is asked to present it.
    for w in ctx.view().workloads.values().filter(|w| w.local) {
        ctx.certs.get(&w.identity).unwrap();
    }
    Side { ctx, records }
}

/// An echo "pod" on 127.0.0.1, and the HBONE server (on 127.0.0.1 too) in front of it.
async fn server(ca: &Arc<Authority>, allow_client: bool) -> (Side, SocketAddr, SocketAddr) {
    server_as(ca, allow_client, "api", &[]).await
}

/// [`server`] whose own view has the pod running as `server_sa` (a forged agent holding that
/// workload's certificate when it is not the client's "api"), with `extra` workloads.
async fn server_as(
    ca: &Arc<Authority>,
    allow_client: bool,
    server_sa: &str,
    extra: &[Workload],
) -> (Side, SocketAddr, SocketAddr) {
    let echo = TcpListener::bind((POD, 0)).await.unwrap();
    let pod = echo.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    let config = TunnelConfig {
        handshake_timeout: Duration::from_millis(500),
        ..TunnelConfig::default()
    };
    let srv = side_with(
        ca,
        "server",
        compiled(allow_client),
        config,
        server_sa,
        extra,
    );
    let listener = TcpListener::bind((POD, 0)).await.unwrap();
    let hbone = listener.local_addr().unwrap();
    let acceptor = inbound::acceptor(&srv.ctx).unwrap();
    tokio::spawn(inbound::serve(listener, acceptor, srv.ctx.clone()));
    (srv, hbone, pod)
}

fn client(ca: &Arc<Authority>, hbone: SocketAddr) -> Side {
    side(
        ca,
        "client",
        CompiledState::default(),
        TunnelConfig {
            peer_port: hbone.port(),
            ..TunnelConfig::default()
        },
    )
}

async fn connect(
    c: &Side,
    pool: &Arc<Pool>,
    pod: SocketAddr,
) -> Result<Opened, super::TunnelError> {
    let view = c.ctx.view();
    let source = view.workload(CLIENT.parse().unwrap()).unwrap().clone();
    let destination = view.workload(POD.parse().unwrap()).unwrap().clone();
    let from: SocketAddr = (CLIENT.parse::<std::net::IpAddr>().unwrap(), 40000).into();
    open(&c.ctx, pool, &source, &destination, from, pod).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_is_carried_to_the_pod_and_both_halves_close() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let ca = Arc::new(authority(dir.path(), TD));
    let (srv, hbone, pod) = server(&ca, true).await;
    let c = client(&ca, hbone);
    let pool = Arc::new(Pool::default());

    let opened = connect(&c, &pool, pod)
        .await
        .expect("the CONNECT is accepted");
    // A local socket pair stands in for the pod's connection to the outbound listener.
    let local = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut app = TcpStream::connect(local.local_addr().unwrap())
        .await
        .unwrap();
    let (accepted, _) = local.accept().await.unwrap();
    let stats = &c.ctx.stats;
    let spliced = tokio::spawn({
        let ctx = c.ctx.clone();
        async move {
            let Opened { send, recv, lease } = opened;
            let mut accepted = accepted;
            let moved = splice(
                &mut accepted,
                send,
                recv,
                &ctx.stats.bytes_sent,
                &ctx.stats.bytes_received,
            )
            .await;
            drop(lease);
            moved
        }
    });
    let payload = vec![0x5au8; 1 << 20];
    app.write_all(&payload).await.unwrap();
    app.shutdown().await.unwrap();
    let mut echoed = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), app.read_to_end(&mut echoed))
        .await
        .expect("the echo completes")
        .unwrap();
    assert_eq!(
        echoed.len(),
        payload.len(),
        "every byte came back, then EOF"
    );
    assert_eq!(echoed, payload);
    let moved = spliced.await.unwrap().expect("a clean end");
    assert_eq!((moved.up, moved.down), (1 << 20, 1 << 20));
    assert_eq!(TunnelStats::get(&stats.bytes_sent), 1 << 20);
    assert_eq!(TunnelStats::get(&srv.ctx.stats.inbound_ok), 1);

    let rec = srv.records.lock().unwrap()[0].clone();
    assert!(rec.forwarded);
    assert_eq!(rec.rule_id, ALLOW_RULE);
    assert_eq!(rec.source_identity, CLIENT_IDENTITY);
    assert_eq!(
        rec.source_spiffe_id,
        "spiffe://cluster.local/ns/frontend/sa/web"
    );
    assert_eq!(
        rec.destination_spiffe_id,
        "spiffe://cluster.local/ns/backend/sa/api"
    );
    assert_eq!(
        rec.source,
        "127.0.0.2:40000".parse().unwrap(),
        "forwarded: the original source"
    );

    // A second stream reuses the pooled connection.
    drop(connect(&c, &pool, pod).await.unwrap());
    assert_eq!(TunnelStats::get(&stats.client_connections), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_connect_gets_401_and_a_dropped_flow_naming_the_rule() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let ca = Arc::new(authority(dir.path(), TD));
    let (srv, hbone, pod) = server(&ca, false).await;
    let c = client(&ca, hbone);
    let pool = Arc::new(Pool::default());
    match connect(&c, &pool, pod).await {
        Err(super::TunnelError::Refused { status: 401, .. }) => {}
        Err(e) => panic!("expected a 401, got {e}"),
        Ok(_) => panic!("expected a 401, the CONNECT was accepted"),
    }
    let records = srv.records.lock().unwrap();
    let rec = records.first().expect("the server recorded the denial");
    assert!(!rec.forwarded);
    assert_eq!(rec.drop_reason, "POLICY_DENIED");
    assert_eq!(rec.rule_id, DEFAULT_DENY_RULE);
    assert_eq!(TunnelStats::get(&srv.ctx.stats.inbound_denied), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_and_stalled_clients_neither_crash_nor_block_the_listener() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let ca = Arc::new(authority(dir.path(), TD));
    let (srv, hbone, pod) = server(&ca, true).await;

    let mut plaintext = TcpStream::connect(hbone).await.unwrap();
    plaintext
        .write_all(b"CONNECT 127.0.0.1:8080 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut stalled = TcpStream::connect(hbone).await.unwrap();

    // Meanwhile a real client gets through.
    let c = client(&ca, hbone);
    let pool = Arc::new(Pool::default());
    tokio::time::timeout(Duration::from_secs(3), connect(&c, &pool, pod))
        .await
        .expect("a valid client is served while others misbehave")
        .expect("the CONNECT is accepted");

    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(3), plaintext.read(&mut buf)).await;
    assert!(
        read.is_ok(),
        "the plaintext client must be answered (an alert) or closed at once, not left waiting"
    );
    // The stalled one is dropped after the handshake deadline (500 ms here).
    let read = tokio::time::timeout(Duration::from_secs(3), stalled.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0) | Err(_))),
        "the stalled client was not dropped: {read:?}"
    );
    assert!(
        TunnelStats::get(&srv.ctx.stats.server_handshake_failures) >= 2,
        "both bad handshakes are counted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_of_a_foreign_ca_is_refused_at_the_handshake() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let ca = Arc::new(authority(dir.path(), TD));
    let other = tempfile::tempdir().unwrap();
    let foreign = Arc::new(authority(other.path(), TD));
    let (srv, hbone, pod) = server(&ca, true).await;
    let c = client(&foreign, hbone);
    let pool = Arc::new(Pool::default());
    match connect(&c, &pool, pod).await {
        Err(super::TunnelError::PeerUnreachable { reason, .. }) => assert!(
            reason.contains("invalid peer certificate"),
            "the refusal names the certificate: {reason}"
        ),
        Err(e) => panic!("expected a refused handshake, got {e}"),
        Ok(_) => panic!("a client of a foreign CA was accepted"),
    }
    assert_eq!(TunnelStats::get(&c.ctx.stats.client_handshake_failures), 1);
    // The server never carried anything for it.
    assert!(srv.records.lock().unwrap().is_empty());
}

/// The client's handshake must fail naming the identity it expected; nothing reaches the pod.
fn assert_refused_server(result: Result<Opened, super::TunnelError>, c: &Side, presented: &str) {
    match result {
        Err(super::TunnelError::PeerUnreachable { reason, .. }) => assert!(
            reason.contains("not one of the identities expected")
                && reason.contains(presented)
                && reason.contains("spiffe://cluster.local/ns/backend/sa/api"),
            "the refusal names the server's identity and the one expected: {reason}"
        ),
        Err(e) => panic!("expected the client to refuse the server's certificate, got {e}"),
        Ok(_) => panic!("the client accepted a server that is not the destination workload"),
    }
    assert_eq!(TunnelStats::get(&c.ctx.stats.client_handshake_failures), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_holding_another_workloads_certificate_cannot_terminate_the_connection() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let ca = Arc::new(authority(dir.path(), TD));
    // A forged agent: a valid certificate of the same CA, for a workload of its own node
    // ("backend/forged"), answering for the address of the pod the client wants ("backend/api").
    let (srv, hbone, pod) = server_as(&ca, true, "forged", &[]).await;
    let c = client(&ca, hbone);
    let pool = Arc::new(Pool::default());
    let result = connect(&c, &pool, pod).await;
    assert_refused_server(result, &c, "spiffe://cluster.local/ns/backend/sa/forged");
    assert!(
        srv.records.lock().unwrap().is_empty(),
        "the forged server must never see a CONNECT"
    );
    assert_eq!(TunnelStats::get(&srv.ctx.stats.server_connections), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_presenting_its_node_agents_certificate_is_refused() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let ca = Arc::new(authority(dir.path(), TD));
    // What every HBONE server presented before: the node agent's identity, valid for the
    // trust domain, but not the destination workload's.
    let (srv, _, pod) = server(&ca, true).await;
    let agent = SpiffeId::agent(TD).unwrap();
    let config = crate::ca::tls::server_config(
        &ca.trust(),
        crate::ca::tls::CertResolver::new(srv.ctx.certs.clone(), agent),
    )
    .unwrap();
    let listener = TcpListener::bind((POD, 0)).await.unwrap();
    let hbone = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    tokio::spawn(inbound::serve(listener, acceptor, srv.ctx.clone()));
    let c = client(&ca, hbone);
    let pool = Arc::new(Pool::default());
    let result = connect(&c, &pool, pod).await;
    assert_refused_server(
        result,
        &c,
        "spiffe://cluster.local/ns/nodeward-system/sa/nodeward",
    );
    assert!(srv.records.lock().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_to_another_workload_than_the_connection_proved_gets_421() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let ca = Arc::new(authority(dir.path(), TD));
    // A second local pod with another identity, on the same node as the destination.
    let other = workload("backend", "billing", "127.0.0.3", true);
    let (srv, hbone, pod) = server_as(&ca, true, "api", std::slice::from_ref(&other)).await;
    let c = client(&ca, hbone);
    let pool = Arc::new(Pool::default());
    let source = SpiffeId::workload(TD, "frontend", "web").unwrap();
    let api = SpiffeId::workload(TD, "backend", "api").unwrap();
    let lease = pool
        .lease(
            &c.ctx,
            &source,
            hbone,
            &api,
            pod.ip(),
            super::pool::Route::default(),
        )
        .await
        .expect("the server proves backend/api");
    let request = |dst: SocketAddr| {
        http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(dst.to_string())
            .header(
                http::header::FORWARDED,
                super::outbound::forwarded_for(
                    (CLIENT.parse::<std::net::IpAddr>().unwrap(), 40001).into(),
                ),
            )
            // ztunnel's tracing headers are accepted as they come.
            .header("baggage", "k8s.cluster.name=lab")
            .header(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )
            .body(())
            .unwrap()
    };
    let status = |dst: SocketAddr| {
        let sender = lease.sender();
        async move {
            let mut sender = sender.ready().await.unwrap();
            let (response, _send) = sender.send_request(request(dst), false).unwrap();
            tokio::time::timeout(Duration::from_secs(5), response)
                .await
                .expect("an answer")
                .expect("a response")
                .status()
        }
    };
    let misdirected = SocketAddr::new(other.host_ips[0], pod.port());
    assert_eq!(
        status(misdirected).await,
        http::StatusCode::MISDIRECTED_REQUEST,
        "a stream to backend/billing on a connection that proved backend/api"
    );
    assert_eq!(
        status(pod).await,
        http::StatusCode::OK,
        "the proved workload's pod"
    );
    assert_eq!(TunnelStats::get(&srv.ctx.stats.inbound_ok), 1);
}

/// A TLS handshake with the HBONE server at `hbone` as `web`, sending `server_name` (an IP
/// address: no SNI, as ztunnel dials), accepting only `expected`; the identity the server proved.
async fn handshake_as_web(
    c: &Side,
    hbone: SocketAddr,
    server_name: rustls::pki_types::ServerName<'static>,
    expected: &SpiffeId,
) -> Result<SpiffeId, String> {
    let web = SpiffeId::workload(TD, "frontend", "web").unwrap();
    c.ctx.certs.get(&web).unwrap();
    let config = crate::ca::tls::client_config(
        &c.ctx.trust,
        crate::ca::tls::CertResolver::new(c.ctx.certs.clone(), web),
        crate::ca::tls::ExpectedServer::OneOf(vec![expected.clone()]),
    )
    .unwrap();
    let tcp = TcpStream::connect(hbone).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(server_name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let leaf = &tls.get_ref().1.peer_certificates().unwrap()[0];
    Ok(crate::ca::tls::spiffe_id_of(leaf).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dialled_pod_address_picks_the_certificate_whatever_the_server_name() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let ca = Arc::new(authority(dir.path(), TD));
    // The HBONE server listens on the destination pod's address (127.0.0.1), as a connection
    // the node routed from `podIP:15008` arrives; another local pod runs as backend/billing.
    let other = workload("backend", "billing", "127.0.0.3", true);
    let (_srv, hbone, _pod) = server_as(&ca, true, "api", std::slice::from_ref(&other)).await;
    let c = client(&ca, hbone);
    let api = SpiffeId::workload(TD, "backend", "api").unwrap();
    // No SNI at all (ztunnel sends none): the dialled pod's workload.
    let none = rustls::pki_types::ServerName::IpAddress(std::net::Ipv4Addr::UNSPECIFIED.into());
    assert_eq!(
        handshake_as_web(&c, hbone, none, &api).await,
        Ok(api.clone())
    );
    // A server name for the other local pod: the address still decides.
    let billing = crate::ca::tls::pod_server_name(other.host_ips[0]);
    assert_eq!(
        handshake_as_web(&c, hbone, billing, &api).await,
        Ok(api.clone())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_change_ends_a_live_connection_it_no_longer_allows() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let ca = Arc::new(authority(dir.path(), TD));
    let (srv, hbone, pod) = server(&ca, true).await;
    let c = client(&ca, hbone);
    let pool = Arc::new(Pool::default());
    let Opened {
        mut send,
        mut recv,
        lease: _lease,
    } = connect(&c, &pool, pod).await.expect("allowed at first");
    send.send_data(bytes::Bytes::from_static(b"ping"), false)
        .unwrap();
    let echoed = tokio::time::timeout(Duration::from_secs(3), recv.data())
        .await
        .expect("an echo")
        .expect("data")
        .unwrap();
    assert_eq!(&echoed[..], b"ping");
    assert_eq!(srv.ctx.live.len(), 1);

    // The allow goes away: the server ends the connection and says why.
    let view = srv.ctx.view();
    srv.ctx.set_view(MeshView {
        workloads: view.workloads.clone(),
        compiled: Arc::new(compiled(false)),
        http: Arc::default(),
    });
    let ended = tokio::time::timeout(Duration::from_secs(3), recv.data()).await;
    assert!(
        matches!(ended, Ok(None | Some(Err(_)))),
        "the revoked connection must end: {ended:?}"
    );
    let records = srv.records.lock().unwrap().clone();
    assert!(
        records
            .iter()
            .any(|r| !r.forwarded && r.note.contains("revoked") && r.rule_id == DEFAULT_DENY_RULE),
        "a DROPPED flow names the revocation: {records:?}"
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        srv.ctx.live.is_empty(),
        "the connection is no longer carried"
    );
}

/// The TIME_WAIT sockets in this namespace whose peer is `peer` (`ss`, by the peer's port).
fn time_waits_to(peer: SocketAddr) -> Vec<String> {
    let out = std::process::Command::new("ss")
        .args(["-Htan", "state", "time-wait", "dst"])
        .arg(peer.to_string())
        .output()
        .expect("running ss (iproute2)");
    assert!(out.status.success(), "ss failed: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// A "pod" on 127.0.0.1 that answers every connection with one byte and closes first.
async fn closing_server() -> SocketAddr {
    let sink = TcpListener::bind((POD, 0)).await.unwrap();
    let addr = sink.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = sink.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(b"x").await;
                let _ = s.shutdown().await;
                let mut rest = Vec::new();
                let _ = s.read_to_end(&mut rest).await;
            });
        }
    });
    addr
}

/// A pod's connection to the outbound listener, stood in for by a local socket pair whose
/// accepted end is spliced with `opened` and then closed as `outbound` closes it after a clean
/// end. Returns the pod's end and the task, which yields when that close returned.
async fn pod_connection(
    c: &Side,
    local: &TcpListener,
    opened: Opened,
) -> (TcpStream, tokio::task::JoinHandle<std::time::Instant>) {
    let app = TcpStream::connect(local.local_addr().unwrap())
        .await
        .unwrap();
    let (mut accepted, _) = local.accept().await.unwrap();
    let leftover = super::timewait::Leftover::of(&accepted).unwrap();
    let ctx = c.ctx.clone();
    let spliced = tokio::spawn(async move {
        let Opened { send, recv, lease } = opened;
        splice(
            &mut accepted,
            send,
            recv,
            &ctx.stats.bytes_sent,
            &ctx.stats.bytes_received,
        )
        .await
        .expect("a clean end");
        drop(lease);
        ctx.time_wait.close(accepted, &leftover, &ctx.stats);
        std::time::Instant::now()
    });
    (app, spliced)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_destination_side_leaves_no_time_wait_with_the_client_pods_address() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let ca = Arc::new(authority(dir.path(), TD));
    let (srv, hbone, pod) = server(&ca, true).await;
    let c = client(&ca, hbone);
    let pool = Arc::new(Pool::default());
    let Opened {
        mut send,
        mut recv,
        lease: _lease,
    } = connect(&c, &pool, pod)
        .await
        .expect("the CONNECT is accepted");
    // The client ends first: the server agent shuts its socket to the echo pod down first, and
    // that socket, bound to the client pod's address, would stay in TIME_WAIT for 60 s.
    send.send_data(bytes::Bytes::from_static(b"ping"), true)
        .unwrap();
    let mut echoed = Vec::new();
    while let Some(data) = tokio::time::timeout(Duration::from_secs(3), recv.data())
        .await
        .expect("the echo and its end")
    {
        echoed.extend_from_slice(&data.unwrap());
    }
    assert_eq!(&echoed[..], b"ping");
    // The server's task closes the socket right after the stream ends, which we may see first.
    let mut removed = false;
    for _ in 0..300 {
        removed = TunnelStats::get(&srv.ctx.stats.time_wait_removed) == 1;
        if removed {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let left = time_waits_to(pod);
    assert!(
        removed && left.is_empty(),
        "the server agent's socket to the pod left a TIME_WAIT (removed: {}, failed: {}): {left:?}",
        TunnelStats::get(&srv.ctx.stats.time_wait_removed),
        TunnelStats::get(&srv.ctx.stats.time_wait_failed),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_source_side_leaves_no_time_wait_with_the_destination_pods_address() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let ca = Arc::new(authority(dir.path(), TD));
    let (srv, hbone, _) = server(&ca, true).await;
    let sink = closing_server().await;
    let c = client(&ca, hbone);
    let pool = Arc::new(Pool::default());
    let opened = connect(&c, &pool, sink).await.expect("accepted");
    let local = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (mut app, spliced) = pod_connection(&c, &local, opened).await;
    let app_addr = app.local_addr().unwrap();
    // The server pod closes first, so our FIN reaches the app before its own: without the
    // removal, the accepted socket stays in TIME_WAIT.
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(3), app.read_to_end(&mut got))
        .await
        .expect("the byte and EOF")
        .unwrap();
    assert_eq!(got, b"x");
    drop(app);
    spliced.await.unwrap();
    let left = time_waits_to(app_addr);
    assert!(
        left.is_empty(),
        "the accepted socket left a TIME_WAIT: {left:?}"
    );
    assert_eq!(TunnelStats::get(&c.ctx.stats.time_wait_removed), 1);
    assert_eq!(TunnelStats::get(&c.ctx.stats.time_wait_failed), 0);
    drop(srv);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_time_wait_is_gone_within_milliseconds_of_the_pods_close() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let ca = Arc::new(authority(dir.path(), TD));
    let (_srv, hbone, _) = server(&ca, true).await;
    let sink = closing_server().await;
    let c = client(&ca, hbone);
    let pool = Arc::new(Pool::default());
    let local = TcpListener::bind("127.0.0.1:0").await.unwrap();
    // From the pod's FIN (which, on loopback, makes the TIME_WAIT within its close) to the
    // removal's answer.
    let mut windows = Vec::new();
    for _ in 0..50 {
        let opened = connect(&c, &pool, sink).await.expect("accepted");
        let (mut app, spliced) = pod_connection(&c, &local, opened).await;
        let mut got = Vec::new();
        app.read_to_end(&mut got).await.unwrap();
        let closed = std::time::Instant::now();
        drop(app);
        let removed = spliced.await.unwrap();
        windows.push(removed.saturating_duration_since(closed));
    }
    windows.sort();
    let (p50, p99, max) = (windows[24], windows[48], windows[49]);
    eprintln!("TIME_WAIT lifetime over 50 connections: p50 {p50:?}, p99 {p99:?}, max {max:?}");
    assert_eq!(TunnelStats::get(&c.ctx.stats.time_wait_removed), 50);
    // Well under the 1 s after which a client's SYN is sent again (so a stall could show), with
    // room for a busy shared machine: p50 is about 100 µs.
    assert!(
        max < Duration::from_millis(500),
        "a TIME_WAIT lived {max:?} (p50 {p50:?}): the removal must follow the close at once"
    );
}
