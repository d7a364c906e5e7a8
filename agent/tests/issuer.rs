//! The issuer's checks against the fake API server: TokenReview for the node, the pods it
//! lists for the identity, and the CSR, over the real TLS endpoint for the end-to-end cases.

mod fakeapi;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fakeapi::{FakeApi, FakeToken};
use nodeward::ca::{Authority, CaConfig, SpiffeId};
use nodeward::issuer::auth::{DEFAULT_AUDIENCE, NodeAuth};
use nodeward::issuer::check::{RateLimiter, Refusal};
use nodeward::issuer::client::{IssuerClient, IssuerClientConfig};
use nodeward::issuer::{Issuer, PodLookup};

const TD: &str = "cluster.local";
const AGENT_USER: &str = "system:serviceaccount:nodeward-system:nodeward";

fn pod(ns: &str, name: &str, node: &str, sa: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"nodeName": node, "serviceAccountName": sa, "containers": [{"name": "c"}]},
        "status": {"phase": "Running"},
    })
}

fn token(user: &str, audience: &str, ttl: i64, extra: &[(&str, &str)]) -> FakeToken {
    let now = SystemTime::now();
    FakeToken {
        username: user.to_owned(),
        audiences: vec![audience.to_owned()],
        expires: if ttl >= 0 {
            now + Duration::from_secs(ttl.unsigned_abs())
        } else {
            now - Duration::from_secs(ttl.unsigned_abs())
        },
        extra: extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), vec![(*v).to_owned()]))
            .collect::<BTreeMap<_, _>>(),
    }
}

const NODE: &str = "authentication.kubernetes.io/node-name";
const POD: &str = "authentication.kubernetes.io/pod-name";
const UID: &str = "authentication.kubernetes.io/pod-uid";

/// The cluster: shop/api-0 (api) and the agent on node-1, shop/db-0 (db) and its agent on
/// node-2; a token per case.
async fn cluster() -> FakeApi {
    let api = FakeApi::start().await;
    for p in [
        pod("shop", "api-0", "node-1", "api"),
        pod("shop", "db-0", "node-2", "db"),
        pod("nodeward-system", "nodeward-a", "node-1", "nodeward"),
        pod("nodeward-system", "nodeward-b", "node-2", "nodeward"),
    ] {
        api.apply(&p);
    }
    // The API server assigns uids: the bindings name the ones it gave.
    let uid = |name: &str| {
        api.get("v1", "Pod", Some("nodeward-system"), name)
            .expect("the agent pod")["metadata"]["uid"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let (uid_a, uid_b) = (uid("nodeward-a"), uid("nodeward-b"));
    let bound_1 = [(NODE, "node-1"), (POD, "nodeward-a"), (UID, uid_a.as_str())];
    api.add_token("node-1", token(AGENT_USER, DEFAULT_AUDIENCE, 600, &bound_1));
    // An API server before 1.30: the pod binding without the node's name.
    api.add_token(
        "node-2-pod-only",
        token(
            AGENT_USER,
            DEFAULT_AUDIENCE,
            600,
            &[(POD, "nodeward-b"), (UID, uid_b.as_str())],
        ),
    );
    api.add_token(
        "replaced-pod",
        token(
            AGENT_USER,
            DEFAULT_AUDIENCE,
            600,
            &[(POD, "nodeward-b"), (UID, "u-old")],
        ),
    );
    api.add_token(
        "other-audience",
        token(AGENT_USER, "https://kubernetes.default.svc", 600, &bound_1),
    );
    api.add_token("expired", token(AGENT_USER, DEFAULT_AUDIENCE, -1, &bound_1));
    api.add_token(
        "a-workload",
        token(
            "system:serviceaccount:shop:api",
            DEFAULT_AUDIENCE,
            600,
            &[(NODE, "node-1"), (POD, "api-0")],
        ),
    );
    api.add_token("unbound", token(AGENT_USER, DEFAULT_AUDIENCE, 600, &[]));
    api
}

fn issuer(
    api: &FakeApi,
    dir: &std::path::Path,
    limiter: RateLimiter,
) -> (Arc<Issuer>, Arc<Authority>) {
    let authority = Arc::new(Authority::load_or_create(&CaConfig::generated(dir, TD)).unwrap());
    let issuer = Issuer::new(
        authority.clone(),
        NodeAuth::Kubernetes {
            client: api.client(),
            audience: DEFAULT_AUDIENCE.to_owned(),
            agent_user: AGENT_USER.to_owned(),
        },
        PodLookup::Kubernetes(api.client()),
        limiter,
        Duration::from_secs(3600),
    );
    (Arc::new(issuer), authority)
}

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::workload(TD, ns, sa).unwrap()
}

fn csr(identity: &SpiffeId) -> String {
    IssuerClient::csr_for(identity).unwrap().1
}

async fn refused(issuer: &Issuer, token: &str, identity: &SpiffeId, result: &str, why: &str) {
    match issuer.sign(token, &csr(identity)).await {
        Ok(s) => panic!(
            "{token} asking for {identity}: expected a refusal ({why}), got {}",
            s.identity
        ),
        Err(e) => assert!(
            e.result() == result && e.to_string().contains(why),
            "{token} asking for {identity}: expected {result} ({why}), got {} ({e})",
            e.result()
        ),
    }
}

#[tokio::test]
async fn a_node_gets_certificates_for_its_own_pods_only() {
    let api = cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let (issuer, authority) = issuer(&api, dir.path(), RateLimiter::new(100, 10.0));

    let signed = issuer
        .sign("node-1", &csr(&id("shop", "api")))
        .await
        .unwrap();
    assert_eq!(
        (signed.node.as_str(), signed.pod.as_str()),
        ("node-1", "api-0")
    );
    // The agent's own identity: its DaemonSet pod runs on node-1.
    issuer
        .sign("node-1", &csr(&id("nodeward-system", "nodeward")))
        .await
        .expect("the agent's own certificate");
    // node-1 may not have node-2's db, nor an identity no pod runs as.
    refused(
        &issuer,
        "node-1",
        &id("shop", "db"),
        "not_on_node",
        "node node-1",
    )
    .await;
    refused(
        &issuer,
        "node-1",
        &id("shop", "web"),
        "not_on_node",
        "node-1",
    )
    .await;
    // The pre-1.30 binding: the issuer reads the pod for its node.
    issuer
        .sign("node-2-pod-only", &csr(&id("shop", "db")))
        .await
        .expect("node-2 by its pod binding");
    refused(
        &issuer,
        "node-2-pod-only",
        &id("shop", "api"),
        "not_on_node",
        "node-2",
    )
    .await;
    let _ = authority;
}

#[tokio::test]
async fn bad_tokens_are_refused_and_counted() {
    let api = cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let (issuer, _) = issuer(&api, dir.path(), RateLimiter::new(100, 10.0));
    let api_id = id("shop", "api");
    refused(
        &issuer,
        "other-audience",
        &api_id,
        "unauthenticated",
        "audiences",
    )
    .await;
    refused(&issuer, "expired", &api_id, "unauthenticated", "expired").await;
    refused(
        &issuer,
        "nobody",
        &api_id,
        "unauthenticated",
        "invalid bearer token",
    )
    .await;
    refused(
        &issuer,
        "a-workload",
        &api_id,
        "unauthenticated",
        "not the agents' service account",
    )
    .await;
    refused(
        &issuer,
        "unbound",
        &api_id,
        "unauthenticated",
        "not bound to a pod",
    )
    .await;
    refused(
        &issuer,
        "replaced-pod",
        &api_id,
        "unauthenticated",
        "was replaced",
    )
    .await;
    let metrics = issuer.stats.render();
    assert!(
        metrics.contains("nodeward_issuer_csr_total{result=\"unauthenticated\"} 6")
            && metrics.contains("nodeward_issuer_csr_total{result=\"signed\"} 0"),
        "{metrics}"
    );
}

#[tokio::test]
async fn bad_csrs_and_floods_are_refused() {
    let api = cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let (issuer, _) = issuer(&api, dir.path(), RateLimiter::new(3, 0.001));
    // Two SANs: the identity and a DNS name.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![
        rcgen::SanType::URI("spiffe://cluster.local/ns/shop/sa/api".try_into().unwrap()),
        rcgen::SanType::DnsName("api.shop.svc".try_into().unwrap()),
    ];
    let two_sans = params.serialize_request(&key).unwrap().pem().unwrap();
    let e = issuer.sign("node-1", &two_sans).await.unwrap_err();
    assert!(
        matches!(e, Refusal::BadCsr(_)) && e.to_string().contains("2 SANs"),
        "{e}"
    );
    // Burst of 3: two more pass, the next is limited; node-2 is not.
    for _ in 0..2 {
        issuer
            .sign("node-1", &csr(&id("shop", "api")))
            .await
            .unwrap();
    }
    refused(
        &issuer,
        "node-1",
        &id("shop", "api"),
        "rate_limited",
        "node-1 asks too often",
    )
    .await;
    issuer
        .sign("node-2-pod-only", &csr(&id("shop", "db")))
        .await
        .expect("another node has its own budget");
}

#[tokio::test]
async fn an_agent_gets_a_certificate_for_its_own_key_over_tls() {
    let api = cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let (issuer, authority) = issuer(&api, dir.path(), RateLimiter::new(100, 10.0));
    let certs =
        nodeward::ca::manager::CertManager::new(authority.clone(), Duration::from_secs(3600));
    let acceptor = nodeward::issuer::acceptor(&authority, &certs).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(nodeward::issuer::serve(listener, acceptor, issuer.clone()));

    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "node-1\n").unwrap();
    let client = IssuerClient::new(
        &authority.trust(),
        IssuerClientConfig {
            address: addr.to_string(),
            token_file: token_file.clone(),
            timeout: Duration::from_secs(5),
        },
    )
    .unwrap();
    let issued = client.issue_async(&id("shop", "api")).await.unwrap();
    nodeward::ca::tls::verify_chain(
        &authority.roots(),
        issued.leaf(),
        &issued.certified_key.cert[1..],
        rustls::pki_types::UnixTime::now(),
    )
    .expect("the issued chain reaches the root");
    assert_eq!(
        nodeward::ca::tls::spiffe_id_of(issued.leaf()).unwrap(),
        id("shop", "api")
    );
    assert!(
        issued
            .via
            .starts_with(&format!("issuer at {addr}, replica ")),
        "{}",
        issued.via
    );
    assert_eq!(issued.node, None, "a workload's certificate names no node");

    // The node agent's own certificate names the node the token proved, whatever the request
    // puts in its subject.
    let agent_id = SpiffeId::agent(TD).unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "node-2");
    params.subject_alt_names = vec![rcgen::SanType::URI(agent_id.uri().try_into().unwrap())];
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    let chain = client.sign(&csr).await.unwrap();
    assert_eq!(
        nodeward::ca::tls::spiffe_id_of(&chain[0]).unwrap(),
        agent_id
    );
    assert_eq!(nodeward::ca::node_of(&chain[0]).as_deref(), Some("node-1"));
    let agent = client.issue_async(&agent_id).await.unwrap();
    assert_eq!(agent.node.as_deref(), Some("node-1"));

    let e = client.issue_async(&id("shop", "db")).await.unwrap_err();
    assert!(
        e.contains("403") && e.contains("not the identity of any pod scheduled on node node-1"),
        "{e}"
    );

    // A server that is not the issuer (another identity of the same CA) is refused.
    let impostor_id = id("shop", "api");
    let impostor_certs =
        nodeward::ca::manager::CertManager::new(authority.clone(), Duration::from_secs(3600));
    let config = nodeward::ca::tls::server_config_without_client_auth(
        &authority.trust(),
        nodeward::ca::tls::CertResolver::new(impostor_certs, impostor_id),
        nodeward::issuer::ALPN_HTTP1,
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let impostor_addr = listener.local_addr().unwrap();
    tokio::spawn(nodeward::issuer::serve(
        listener,
        tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        issuer.clone(),
    ));
    let client = IssuerClient::new(
        &authority.trust(),
        IssuerClientConfig {
            address: impostor_addr.to_string(),
            token_file,
            timeout: Duration::from_secs(5),
        },
    )
    .unwrap();
    let e = client.issue_async(&id("shop", "api")).await.unwrap_err();
    assert!(e.contains("not one of the identities expected"), "{e}");
}
