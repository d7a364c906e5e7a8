//! The flows port over loopback: who gets flows, who is refused and how, and what a follower
//! that never reads costs.

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Mutex, RwLock};

use tokio::io::AsyncWriteExt as _;

use super::client::{ClientFiles, ClientTls, fetch_flows};
use super::*;
use crate::ca::client::write_files;
use crate::ca::testing::authority;
use crate::ca::{Authority, DEFAULT_CERT_TTL};

const TD: &str = "cluster.local";
const TIMEOUT: Duration = Duration::from_secs(10);

fn shared(ca: Arc<Authority>) -> Arc<Shared> {
    let certs = crate::ca::manager::CertManager::new(ca.clone(), DEFAULT_CERT_TTL);
    Arc::new(Shared {
        node: "n1".into(),
        flows: crate::flows::FlowStore::new(64),
        flow_log: None,
        index: RwLock::new(Arc::new(crate::flows::EnrichmentIndex::default())),
        status: RwLock::new(crate::app::Status::default()),
        ready: AtomicBool::new(true),
        metrics: crate::metrics::Metrics::new().unwrap(),
        counters: Mutex::new(None),
        syncs: AtomicU64::new(0),
        ca: ca.mesh_ca(),
        certs,
        tunnel: std::sync::OnceLock::new(),
        flow_api: FlowApiStats::default(),
        services: RwLock::default(),
        dns_allow: RwLock::default(),
    })
}

/// An agent's flows port on loopback, with the default allow list.
struct Agent {
    _dir: tempfile::TempDir,
    ca: Arc<Authority>,
    shared: Arc<Shared>,
    addr: String,
}

async fn agent(followers_per_client: usize) -> Agent {
    let dir = tempfile::tempdir().unwrap();
    let ca = Arc::new(authority(dir.path(), TD));
    let shared = shared(ca.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = FlowApiConfig {
        addr,
        allow: AllowList::parse(&access::default_allow(), TD).unwrap(),
        followers_per_client,
        handshake_timeout: Duration::from_secs(2),
    };
    tokio::spawn(serve(
        listener,
        acceptor(&shared).unwrap(),
        config,
        shared.clone(),
    ));
    Agent {
        _dir: dir,
        ca,
        shared,
        addr: addr.to_string(),
    }
}

/// A client of `identity` whose certificate `issuer` signed, trusting `agent`'s CA.
fn client(
    agent: &Agent,
    issuer: &Authority,
    identity: &SpiffeId,
) -> (tempfile::TempDir, ClientTls) {
    let dir = tempfile::tempdir().unwrap();
    let pem = issuer
        .issue_client(identity, Duration::from_secs(600))
        .unwrap();
    let ca = std::fs::read(agent._dir.path().join("ca").join(crate::ca::CA_CERT_FILE)).unwrap();
    write_files(dir.path(), &pem, &ca).unwrap();
    let tls = ClientTls::load(&ClientFiles::in_dir(dir.path())).unwrap();
    (dir, tls)
}

fn observer() -> SpiffeId {
    access::observer(TD).unwrap()
}

fn push(shared: &Shared, n: usize) {
    for _ in 0..n {
        shared.flows.push(crate::flows::tests::sample());
    }
}

async fn read_last(
    agent: &Agent,
    tls: &ClientTls,
    last: usize,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut got = Vec::new();
    let query = FlowQuery {
        last: Some(last),
        ..FlowQuery::default()
    };
    tokio::time::timeout(
        TIMEOUT,
        fetch_flows(&agent.addr, tls, &query, |v| {
            got.push(v);
            std::future::ready(Ok(()))
        }),
    )
    .await
    .map_err(|_| anyhow::anyhow!("timed out"))??;
    Ok(got)
}

fn refusals(agent: &Agent) -> Vec<(&'static str, u64)> {
    agent
        .shared
        .flow_api
        .refusals()
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// Waits for the server's counters, which it updates after the client has its answer.
async fn eventually_refused(agent: &Agent, want: &[(&'static str, u64)]) {
    let deadline = Instant::now() + TIMEOUT;
    while refusals(agent) != want && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(refusals(agent), want);
}

#[tokio::test]
async fn the_observer_reads_flows_and_the_agents_too() {
    let agent = agent(8).await;
    push(&agent.shared, 5);
    let (_d, tls) = client(&agent, &agent.ca, &observer());
    let flows = read_last(&agent, &tls, 3).await.unwrap();
    assert_eq!(flows.len(), 3, "{flows:#?}");
    assert_eq!(flows[0]["source"]["pod_name"], "web");
    let (_d, tls) = client(&agent, &agent.ca, &SpiffeId::agent(TD).unwrap());
    assert_eq!(read_last(&agent, &tls, 10).await.unwrap().len(), 5);
    assert!(refusals(&agent).is_empty(), "{:?}", refusals(&agent));
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    #[derive(Debug)]
    struct NoCert;
    impl rustls::client::ResolvesClientCert for NoCert {
        fn resolve(
            &self,
            _: &[&[u8]],
            _: &[rustls::SignatureScheme],
        ) -> Option<Arc<rustls::sign::CertifiedKey>> {
            None
        }
        fn has_certs(&self) -> bool {
            false
        }
    }
    let agent = agent(8).await;
    push(&agent.shared, 5);
    let mut config = tls::client_config(
        &agent.ca.trust(),
        Arc::new(NoCert),
        tls::ExpectedServer::AnyInTrustDomain,
    )
    .unwrap();
    config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    let tcp = tokio::net::TcpStream::connect(&agent.addr).await.unwrap();
    // TLS 1.3: the client's side of the handshake may complete before the server checks it;
    // the refusal then arrives as an alert on the first read.
    if let Ok(mut stream) = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(tls::server_name(), tcp)
        .await
    {
        let _ = stream
            .write_all(b"GET /v1/flows?last=5 HTTP/1.1\r\nHost: x\r\n\r\n")
            .await;
        let mut answer = Vec::new();
        let read = tokio::time::timeout(
            TIMEOUT,
            tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut answer),
        )
        .await
        .unwrap();
        assert!(read.is_err(), "expected the agent's alert, read {answer:?}");
        assert!(
            answer.is_empty(),
            "no flow may reach a client without a certificate"
        );
    }
    eventually_refused(&agent, &[("handshake", 1)]).await;

    // Plaintext HTTP on the flows port gets no answer either.
    let mut tcp = tokio::net::TcpStream::connect(&agent.addr).await.unwrap();
    tcp.write_all(b"GET /v1/flows?last=5 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(
        TIMEOUT,
        tokio::io::AsyncReadExt::read_to_end(&mut tcp, &mut answer),
    )
    .await
    .unwrap();
    assert!(
        !String::from_utf8_lossy(&answer).contains("source"),
        "plaintext got flows: {answer:?}"
    );
    eventually_refused(&agent, &[("handshake", 2)]).await;
}

#[tokio::test]
async fn a_client_of_a_foreign_ca_is_refused() {
    let agent = agent(8).await;
    push(&agent.shared, 5);
    let foreign_dir = tempfile::tempdir().unwrap();
    let foreign = authority(foreign_dir.path(), TD);
    let (_d, tls) = client(&agent, &foreign, &observer());
    let err = read_last(&agent, &tls, 5).await.unwrap_err().to_string();
    assert!(
        err.contains("the agent refused this client's certificate"),
        "{err}"
    );
    eventually_refused(&agent, &[("handshake", 1)]).await;
}

#[tokio::test]
async fn an_identity_that_may_not_read_flows_is_refused_with_403() {
    let agent = agent(8).await;
    push(&agent.shared, 5);
    let web = SpiffeId::workload(TD, "frontend", "web").unwrap();
    let (_d, tls) = client(&agent, &agent.ca, &web);
    let err = read_last(&agent, &tls, 5).await.unwrap_err().to_string();
    assert!(
        err.contains("spiffe://cluster.local/ns/frontend/sa/web may not read flows"),
        "{err}"
    );
    assert!(err.contains("--flows-allow"), "{err}");
    eventually_refused(&agent, &[("identity", 1)]).await;
}

#[tokio::test]
async fn the_flows_port_serves_only_flows() {
    let agent = agent(8).await;
    let (_d, tls) = client(&agent, &agent.ca, &observer());
    let tcp = tokio::net::TcpStream::connect(&agent.addr).await.unwrap();
    let stream = tokio_rustls::TlsConnector::from(tls.config.clone())
        .connect(tls::server_name(), tcp)
        .await
        .unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    for path in ["/metrics", "/", "/v1/flowsx"] {
        let request = hyper::Request::get(path)
            .header(hyper::header::HOST, "x")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
        let _ = http_body_util::BodyExt::collect(response.into_body()).await;
    }
}

#[tokio::test]
async fn followers_per_client_are_bounded_and_given_back() {
    let agent = agent(2).await;
    let (_d, tls) = client(&agent, &agent.ca, &observer());
    let follow = FlowQuery {
        follow: true,
        ..FlowQuery::default()
    };
    let mut held = Vec::new();
    for _ in 0..2 {
        let (addr, tls, follow) = (agent.addr.clone(), tls.clone(), follow.clone());
        held.push(tokio::spawn(async move {
            fetch_flows(&addr, &tls, &follow, |_| std::future::ready(Ok(()))).await
        }));
    }
    let deadline = Instant::now() + TIMEOUT;
    while agent.shared.flow_api.streams.load(Ordering::Relaxed) < 2 {
        assert!(Instant::now() < deadline, "the two followers did not start");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let err = read_last(&agent, &tls, 1).await.unwrap_err().to_string();
    assert!(
        err.contains("already has 2 flow streams open on this agent"),
        "{err}"
    );
    eventually_refused(&agent, &[("followers", 1)]).await;
    // Another identity has places of its own.
    let (_d2, agent_tls) = client(&agent, &agent.ca, &SpiffeId::agent(TD).unwrap());
    read_last(&agent, &agent_tls, 1).await.unwrap();

    // A follower that goes away gives its place back.
    held.pop().unwrap().abort();
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match read_last(&agent, &tls, 1).await {
            Ok(_) => break,
            Err(e) => assert!(Instant::now() < deadline, "no place came back: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_follower_that_never_reads_misses_flows_instead_of_buffering_them() {
    let agent = agent(8).await;
    let (_d, tls) = client(&agent, &agent.ca, &observer());
    // A small receive buffer, so the kernel does not absorb what the agent must drop.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(agent.addr.parse().unwrap()).await.unwrap();
    let mut stream = tokio_rustls::TlsConnector::from(tls.config.clone())
        .connect(tls::server_name(), tcp)
        .await
        .unwrap();
    stream
        .write_all(b"GET /v1/flows?follow=true HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    stream.flush().await.unwrap();
    let deadline = Instant::now() + TIMEOUT;
    while agent.shared.flow_api.streams.load(Ordering::Relaxed) < 1 {
        assert!(Instant::now() < deadline, "the follower did not start");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Far more than the stream's queue, the broadcast ring and every buffer below them hold.
    let flows = 20_000;
    for chunk in 0..20 {
        push(&agent.shared, flows / 20);
        // Let the stream's task run between bursts, as flows arrive over time.
        tokio::time::sleep(Duration::from_millis(5 + chunk % 2)).await;
    }
    let deadline = Instant::now() + TIMEOUT;
    let lagged = || {
        agent
            .shared
            .flows
            .lost
            .follower_lagged
            .load(Ordering::Relaxed)
    };
    while lagged() == 0 && Instant::now() < deadline {
        push(&agent.shared, 100);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        lagged() > 0,
        "the follower that never reads missed no flows"
    );
    let missed = lagged();
    assert!(
        missed > 10_000,
        "only {missed} of {flows} flows were dropped: something buffers them"
    );
    assert_eq!(agent.shared.flow_api.streams.load(Ordering::Relaxed), 1);
    drop(stream);
    let deadline = Instant::now() + TIMEOUT;
    while agent.shared.flow_api.streams.load(Ordering::Relaxed) > 0 {
        push(&agent.shared, 1);
        assert!(Instant::now() < deadline, "the stream outlived its client");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
