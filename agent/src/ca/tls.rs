//! rustls configurations for the mesh: TLS 1.3 only, ALPN `h2`, mutual authentication against
//! the agent's trust roots, and the peer's SPIFFE ID taken from its certificate.
//!
//! A peer is refused when its leaf is self-signed, its chain does not reach a trust root, it is
//! expired or not yet valid, it lacks exactly one well-formed SPIFFE URI SAN, its trust domain is
//! not ours, or (client side, when asked) it is not one of the identities expected.
//!
//! Certificates are picked per handshake by a [`CertResolver`], which asks the
//! [`CertManager`](super::manager::CertManager) for the current one: a renewal changes what NEW
//! handshakes present, while an established connection keeps its keys by construction (TLS 1.3
//! has no renegotiation, and rustls never looks at the certificate again after the handshake).
//! Session resumption is off, so every connection is authenticated with a live certificate.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, CommonState, DigitallySignedStruct, DistinguishedName,
    OtherError, RootCertStore, ServerConfig, SignatureScheme,
};

use super::manager::CertManager;
use super::spiffe::SpiffeId;

/// The ALPN protocol of HBONE (HTTP/2 CONNECT).
pub const ALPN_H2: &[u8] = b"h2";

/// Why a peer certificate was refused, beyond what webpki reports.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("the peer's leaf certificate is self-signed")]
    SelfSigned,
    #[error("the peer's certificate has no SPIFFE ID (expected exactly one spiffe:// URI SAN)")]
    NoSpiffeId,
    #[error("the peer's certificate has {0} URI SANs; expected exactly one SPIFFE ID")]
    ManyUris(usize),
    #[error("the peer's SPIFFE ID: {0}")]
    BadSpiffeId(#[source] super::SpiffeError),
    #[error("the peer {peer} is from trust domain {}, not {expected}", peer.trust_domain())]
    ForeignTrustDomain { peer: SpiffeId, expected: String },
    #[error("the peer is {peer}, not one of the identities expected ({expected})")]
    Unexpected { peer: SpiffeId, expected: String },
}

fn refuse(e: PeerError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// ring's TLS 1.3 suites with AES-128-GCM first (ring's default puts AES-256 first): as
/// strong as the mesh needs, and a third cheaper per byte, which is what the tunnel spends its
/// CPU on (Go's crypto/tls makes the same choice on CPUs with AES instructions).
fn provider() -> CryptoProvider {
    use rustls::crypto::ring::cipher_suite::{
        TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
    };
    CryptoProvider {
        cipher_suites: vec![
            TLS13_AES_128_GCM_SHA256,
            TLS13_AES_256_GCM_SHA384,
            TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..rustls::crypto::ring::default_provider()
    }
}

/// Roots and trust domain every peer is checked against.
#[derive(Clone, Debug)]
pub struct Trust {
    roots: Arc<RootCertStore>,
    trust_domain: String,
    provider: Arc<CryptoProvider>,
}

impl Trust {
    #[must_use]
    pub fn new(roots: Arc<RootCertStore>, trust_domain: &str) -> Self {
        Self {
            roots,
            trust_domain: trust_domain.to_owned(),
            provider: Arc::new(provider()),
        }
    }

    #[must_use]
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The checks both sides share, after webpki accepted the chain.
    fn check_identity(&self, end_entity: &CertificateDer<'_>) -> Result<SpiffeId, rustls::Error> {
        let id = spiffe_id_of(end_entity).map_err(refuse)?;
        if id.trust_domain() != self.trust_domain {
            return Err(refuse(PeerError::ForeignTrustDomain {
                peer: id,
                expected: self.trust_domain.clone(),
            }));
        }
        Ok(id)
    }
}

/// Checks that `end_entity` chains to `roots` through `intermediates` and is valid at `now`
/// (as a server certificate; the workload certificates are valid for both ends).
pub fn verify_chain(
    roots: &RootCertStore,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
) -> Result<(), rustls::Error> {
    if is_self_signed_leaf(end_entity) {
        return Err(refuse(PeerError::SelfSigned));
    }
    let parsed = ParsedCertificate::try_from(end_entity)?;
    verify_server_cert_signed_by_trust_anchor(
        &parsed,
        roots,
        intermediates,
        now,
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .all,
    )
}

fn is_self_signed_leaf(cert: &CertificateDer<'_>) -> bool {
    x509_parser::parse_x509_certificate(cert).is_ok_and(|(_, x509)| {
        x509.subject().as_raw() == x509.issuer().as_raw() && x509.verify_signature(None).is_ok()
    })
}

/// The SPIFFE ID of a certificate: its one URI SAN. Does not check the chain.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, PeerError> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert).map_err(|_| PeerError::NoSpiffeId)?;
    let san = x509
        .subject_alternative_name()
        .map_err(|_| PeerError::NoSpiffeId)?
        .ok_or(PeerError::NoSpiffeId)?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [] => Err(PeerError::NoSpiffeId),
        [uri] => uri.parse().map_err(PeerError::BadSpiffeId),
        many => Err(PeerError::ManyUris(many.len())),
    }
}

/// A handshake failure in words: our own reasons ([`PeerError`]) by their message, rustls'
/// by its. Takes the `io::Error` tokio-rustls returns.
#[must_use]
pub fn describe_handshake_error(e: &std::io::Error) -> String {
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return e.to_string();
    };
    if let rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(other))) = tls
        && let Some(peer) = other.downcast_ref::<PeerError>()
    {
        return format!("invalid peer certificate: {peer}");
    }
    tls.to_string()
}

/// The verified SPIFFE ID of the other end of an established connection (client or server,
/// plain or through tokio-rustls' `get_ref().1`).
#[must_use]
pub fn peer_identity(conn: &CommonState) -> Option<SpiffeId> {
    conn.peer_certificates()
        .and_then(|c| c.first())
        .and_then(|leaf| spiffe_id_of(leaf).ok())
}

/// Which server identities a client accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExpectedServer {
    /// Any identity of our trust domain (the caller checks [`peer_identity`] itself).
    AnyInTrustDomain,
    /// Exactly one of these (the destination workload, or its node agent).
    OneOf(Vec<SpiffeId>),
}

#[derive(Debug)]
struct SpiffeServerVerifier {
    trust: Trust,
    expected: ExpectedServer,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        verify_chain(&self.trust.roots, end_entity, intermediates, now)?;
        let id = self.trust.check_identity(end_entity)?;
        if let ExpectedServer::OneOf(ids) = &self.expected
            && !ids.contains(&id)
        {
            let expected = ids
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ");
            return Err(refuse(PeerError::Unexpected { peer: id, expected }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // The configs offer TLS 1.3 only.
        Err(rustls::Error::General("TLS 1.2 is not offered".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.trust.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.trust
            .provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// webpki's client verifier (chain, validity, clientAuth usage), then the SPIFFE checks.
#[derive(Debug)]
struct SpiffeClientVerifier {
    trust: Trust,
    inner: Arc<dyn ClientCertVerifier>,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Every client has one certificate; hints would only enlarge the handshake.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if is_self_signed_leaf(end_entity) {
            return Err(refuse(PeerError::SelfSigned));
        }
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        self.trust.check_identity(end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Presents the current certificate of one identity, looked up per handshake.
#[derive(Debug)]
pub struct CertResolver {
    manager: CertManager,
    identity: SpiffeId,
}

impl CertResolver {
    #[must_use]
    pub fn new(manager: CertManager, identity: SpiffeId) -> Arc<Self> {
        Arc::new(Self { manager, identity })
    }

    fn current(&self) -> Option<Arc<CertifiedKey>> {
        match self.manager.get(&self.identity) {
            Ok(cert) => Some(cert.certified_key.clone()),
            Err(e) => {
                tracing::warn!(identity = %self.identity, error = %e, "no certificate to present");
                None
            }
        }
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

impl ResolvesClientCert for CertResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.current()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A server config: TLS 1.3, ALPN h2, client certificates required and checked against
/// `trust`, presenting what `cert` resolves per handshake.
pub fn server_config(
    trust: &Trust,
    cert: Arc<dyn ResolvesServerCert>,
) -> Result<ServerConfig, rustls::Error> {
    let inner =
        WebPkiClientVerifier::builder_with_provider(trust.roots.clone(), trust.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(format!("building the client verifier: {e}")))?;
    let verifier = Arc::new(SpiffeClientVerifier {
        trust: trust.clone(),
        inner,
    });
    let mut config = ServerConfig::builder_with_provider(trust.provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// A client config: TLS 1.3, ALPN h2, presenting what `cert` resolves, accepting a server of
/// our trust domain whose identity is `expected`. The server name given to rustls is not
/// checked (identities are SPIFFE IDs, not DNS names); any valid name will do.
pub fn client_config(
    trust: &Trust,
    cert: Arc<dyn ResolvesClientCert>,
    expected: ExpectedServer,
) -> Result<ClientConfig, rustls::Error> {
    let verifier = Arc::new(SpiffeServerVerifier {
        trust: trust.clone(),
        expected,
    });
    let mut config = ClientConfig::builder_with_provider(trust.provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(cert);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

/// A server config for a service whose clients authenticate otherwise (the issuer: agents
/// bring a token, and may have no certificate yet): TLS 1.3, ALPN `alpn`, no client
/// certificate, presenting what `cert` resolves per handshake.
///
/// # Errors
/// The TLS configuration cannot be built.
pub fn server_config_without_client_auth(
    trust: &Trust,
    cert: Arc<dyn ResolvesServerCert>,
    alpn: &[u8],
) -> Result<ServerConfig, rustls::Error> {
    let mut config = ServerConfig::builder_with_provider(trust.provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(config)
}

/// The client side of [`server_config_without_client_auth`]: TLS 1.3, ALPN `alpn`, no client
/// certificate, accepting only a server of our trust roots whose identity is `expected`.
///
/// # Errors
/// The TLS configuration cannot be built.
pub fn client_config_without_client_auth(
    trust: &Trust,
    expected: ExpectedServer,
    alpn: &[u8],
) -> Result<ClientConfig, rustls::Error> {
    let verifier = Arc::new(SpiffeServerVerifier {
        trust: trust.clone(),
        expected,
    });
    let mut config = ClientConfig::builder_with_provider(trust.provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(config)
}

/// The server name clients pass to rustls; never checked (see [`client_config`]).
#[must_use]
pub fn server_name() -> ServerName<'static> {
    ServerName::try_from("nodeward.mesh.invalid").expect("a valid DNS name")
}

/// The DNS suffix of the server names that name a destination pod (see [`pod_server_name`]).
const POD_NAME_SUFFIX: &str = ".pod.nodeward.internal";

/// The server name (SNI) an HBONE client sends for a connection to the pod at `pod`: the
/// address in hexadecimal, under [`POD_NAME_SUFFIX`]. The HBONE server presents the
/// certificate of the local workload at that address (ztunnel chooses by the address it was
/// dialled on; a nodeward client dials the destination's node, so the address travels in the
/// SNI). rustls does not send IP addresses as SNI, hence the encoding.
#[must_use]
pub fn pod_server_name(pod: std::net::IpAddr) -> ServerName<'static> {
    use std::fmt::Write as _;
    let octets = match pod.to_canonical() {
        std::net::IpAddr::V4(v4) => v4.octets().to_vec(),
        std::net::IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    let mut name = String::with_capacity(octets.len() * 2 + POD_NAME_SUFFIX.len());
    for b in octets {
        let _ = write!(name, "{b:02x}");
    }
    name.push_str(POD_NAME_SUFFIX);
    ServerName::try_from(name).expect("hexadecimal labels under a fixed suffix are a DNS name")
}

/// The pod address a server name from [`pod_server_name`] carries; `None` for any other name.
#[must_use]
pub fn pod_of_server_name(name: &str) -> Option<std::net::IpAddr> {
    let hex = name.strip_suffix(POD_NAME_SUFFIX)?;
    let byte = |i: usize| u8::from_str_radix(hex.get(i * 2..i * 2 + 2)?, 16).ok();
    match hex.len() {
        8 => {
            let mut b = [0u8; 4];
            for (i, v) in b.iter_mut().enumerate() {
                *v = byte(i)?;
            }
            Some(std::net::IpAddr::from(b))
        }
        32 => {
            let mut b = [0u8; 16];
            for (i, v) in b.iter_mut().enumerate() {
                *v = byte(i)?;
            }
            Some(std::net::IpAddr::from(b).to_canonical())
        }
        _ => None,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::Path;
    use std::time::{Duration, SystemTime};

    use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, KeyPair, SanType};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;
    use crate::ca::testing::{authority, ca_files, certified, sign_with_ca};
    use crate::ca::{Authority, CaConfig, IssueCerts as _};

    const TD: &str = "cluster.local";
    const TIMEOUT: Duration = Duration::from_secs(5);

    /// Always presents one certificate.
    #[derive(Debug)]
    pub(crate) struct Fixed(pub Arc<CertifiedKey>);

    impl ResolvesServerCert for Fixed {
        fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
            Some(self.0.clone())
        }
    }

    impl ResolvesClientCert for Fixed {
        fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
            Some(self.0.clone())
        }
        fn has_certs(&self) -> bool {
            true
        }
    }

    /// What each side saw: the peer's identity after a full ping/pong, or the error.
    #[derive(Debug)]
    struct Outcome {
        server: Result<SpiffeId, String>,
        client: Result<SpiffeId, String>,
    }

    /// One connection over loopback TCP: handshake, "ping" one way, "pong" back.
    async fn exchange(server: ServerConfig, client: ClientConfig) -> Outcome {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.map_err(|e| e.to_string())?;
            let mut tls = acceptor
                .accept(tcp)
                .await
                .map_err(|e| describe_handshake_error(&e))?;
            let (_, conn) = tls.get_ref();
            assert_eq!(conn.alpn_protocol(), Some(ALPN_H2));
            assert_eq!(
                conn.protocol_version(),
                Some(rustls::ProtocolVersion::TLSv1_3)
            );
            let id = peer_identity(conn).ok_or("no peer identity")?;
            let mut ping = [0u8; 4];
            tls.read_exact(&mut ping).await.map_err(|e| e.to_string())?;
            tls.write_all(b"pong").await.map_err(|e| e.to_string())?;
            tls.shutdown().await.map_err(|e| e.to_string())?;
            Ok::<_, String>(id)
        });
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let client = async {
            let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
            let mut tls = connector
                .connect(server_name(), tcp)
                .await
                .map_err(|e| describe_handshake_error(&e))?;
            let id = peer_identity(tls.get_ref().1).ok_or("no peer identity")?;
            tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
            let mut pong = [0u8; 4];
            tls.read_exact(&mut pong).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(id)
        };
        let client = tokio::time::timeout(TIMEOUT, client)
            .await
            .unwrap_or_else(|_| Err("client timed out".into()));
        let server = tokio::time::timeout(TIMEOUT, server)
            .await
            .map_or_else(|_| Err("server timed out".into()), |r| r.unwrap());
        Outcome { server, client }
    }

    fn id(ns: &str, sa: &str) -> SpiffeId {
        SpiffeId::workload(TD, ns, sa).unwrap()
    }

    fn issued(ca: &Authority, who: &SpiffeId) -> Arc<CertifiedKey> {
        ca.issue(who, Duration::from_secs(3600))
            .unwrap()
            .certified_key
    }

    /// A server presenting the node agent's certificate from `ca`, trusting `ca`.
    fn agent_server(ca: &Authority) -> ServerConfig {
        let agent = SpiffeId::agent(TD).unwrap();
        server_config(&ca.trust(), Arc::new(Fixed(issued(ca, &agent)))).unwrap()
    }

    /// A client presenting `cert`, trusting `ca`, accepting any server of the trust domain.
    fn client_with(ca: &Authority, cert: Arc<CertifiedKey>) -> ClientConfig {
        client_config(
            &ca.trust(),
            Arc::new(Fixed(cert)),
            ExpectedServer::AnyInTrustDomain,
        )
        .unwrap()
    }

    fn refused(outcome: &Outcome, side: &str, why: &str) {
        let result = if side == "server" {
            &outcome.server
        } else {
            &outcome.client
        };
        match result {
            Ok(id) => panic!("the {side} should have refused the peer ({why}), but accepted {id}"),
            Err(e) => assert!(
                e.to_lowercase().contains(&why.to_lowercase()),
                "the {side} refused, but not because of {why:?}: {e}"
            ),
        }
        let other = if side == "server" {
            &outcome.client
        } else {
            &outcome.server
        };
        assert!(
            other.is_err(),
            "the connection must not carry data: {outcome:?}"
        );
    }

    #[test]
    fn a_pod_server_name_carries_the_pod_address_and_nothing_else_does() {
        for pod in ["10.244.2.12", "0.0.0.0", "fd00:244:1::5", "::1"] {
            let ip: std::net::IpAddr = pod.parse().unwrap();
            let ServerName::DnsName(name) = pod_server_name(ip) else {
                panic!("{pod}: not a DNS name");
            };
            assert_eq!(pod_of_server_name(name.as_ref()), Some(ip), "{pod}");
        }
        let mapped: std::net::IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        let ServerName::DnsName(name) = pod_server_name(mapped) else {
            panic!("not a DNS name");
        };
        assert_eq!(name.as_ref(), "0a010203.pod.nodeward.internal");
        for other in [
            "nodeward.mesh.invalid",
            "0a01020.pod.nodeward.internal",
            "0a0102zz.pod.nodeward.internal",
            "x0a010203.pod.nodeward.internal",
            ".pod.nodeward.internal",
        ] {
            assert_eq!(pod_of_server_name(other), None, "{other}");
        }
    }

    #[tokio::test]
    async fn mutual_tls_gives_both_sides_the_peer_spiffe_id() {
        let state = tempfile::tempdir().unwrap();
        let ca = Arc::new(authority(state.path(), TD));
        let certs = crate::ca::manager::CertManager::new(ca.clone(), Duration::from_secs(3600));
        let (agent, workload) = (SpiffeId::agent(TD).unwrap(), id("shop", "api"));
        let server = server_config(&ca.trust(), CertResolver::new(certs.clone(), agent.clone()));
        let client = client_config(
            &ca.trust(),
            CertResolver::new(certs.clone(), workload.clone()),
            ExpectedServer::OneOf(vec![id("shop", "db"), agent.clone()]),
        );
        let outcome = exchange(server.unwrap(), client.unwrap()).await;
        assert_eq!(outcome.server, Ok(workload), "the server sees the client");
        assert_eq!(outcome.client, Ok(agent), "the client sees the server");
    }

    #[tokio::test]
    async fn client_from_a_foreign_ca_is_refused() {
        let (ours, theirs) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let ca = authority(ours.path(), TD);
        let foreign = authority(theirs.path(), TD);
        let cert = issued(&foreign, &id("shop", "api"));
        let outcome = exchange(agent_server(&ca), client_with(&ca, cert)).await;
        refused(&outcome, "server", "UnknownIssuer");
        // And the other way round: a server from the foreign CA.
        let outcome = exchange(
            agent_server(&foreign),
            client_with(&ca, issued(&ca, &id("a", "b"))),
        )
        .await;
        refused(&outcome, "client", "UnknownIssuer");
    }

    #[tokio::test]
    async fn expired_and_not_yet_valid_certificates_are_refused() {
        let state = tempfile::tempdir().unwrap();
        let ca = authority(state.path(), TD);
        let now = SystemTime::now();
        let hour = Duration::from_secs(3600);
        let expired = ca
            .issue_with_validity(&id("shop", "api"), now - 2 * hour, now - hour)
            .unwrap();
        let outcome = exchange(agent_server(&ca), client_with(&ca, expired.certified_key)).await;
        refused(&outcome, "server", "expired");
        let early = ca
            .issue_with_validity(&id("shop", "api"), now + hour, now + 2 * hour)
            .unwrap();
        let outcome = exchange(agent_server(&ca), client_with(&ca, early.certified_key)).await;
        refused(&outcome, "server", "not valid");
        // An expired server certificate, seen by the client.
        let server = server_config(
            &ca.trust(),
            Arc::new(Fixed(
                ca.issue_with_validity(&SpiffeId::agent(TD).unwrap(), now - 2 * hour, now - hour)
                    .unwrap()
                    .certified_key,
            )),
        )
        .unwrap();
        let outcome = exchange(server, client_with(&ca, issued(&ca, &id("a", "b")))).await;
        refused(&outcome, "client", "expired");
    }

    #[tokio::test]
    async fn a_peer_from_another_trust_domain_is_refused_even_with_a_good_chain() {
        let state = tempfile::tempdir().unwrap();
        let ca = authority(state.path(), TD);
        // The same issuer, configured for another trust domain.
        let (cert, key) = ca_files(state.path());
        let other = Authority::load_or_create(&CaConfig {
            ca_cert: Some(cert),
            ca_key: Some(key),
            ..CaConfig::generated(state.path(), "other.example")
        })
        .unwrap();
        let stranger = issued(
            &other,
            &SpiffeId::workload("other.example", "shop", "api").unwrap(),
        );
        let outcome = exchange(agent_server(&ca), client_with(&ca, stranger.clone())).await;
        refused(&outcome, "server", "trust domain");
        let server = server_config(&ca.trust(), Arc::new(Fixed(stranger))).unwrap();
        let outcome = exchange(server, client_with(&ca, issued(&ca, &id("a", "b")))).await;
        refused(&outcome, "client", "trust domain");
    }

    fn leaf_params(sans: Vec<SanType>) -> CertificateParams {
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
        params.not_after = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
        params
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    #[tokio::test]
    async fn certificates_without_exactly_one_spiffe_id_are_refused() {
        let state = tempfile::tempdir().unwrap();
        let ca = authority(state.path(), TD);
        let sign = |sans| sign_with_ca(state.path(), &leaf_params(sans));
        let cases = [
            (
                sign(vec![SanType::DnsName("api.shop.svc".try_into().unwrap())]),
                "no SPIFFE ID",
            ),
            (
                sign(vec![
                    uri("spiffe://cluster.local/ns/shop/sa/api"),
                    uri("spiffe://cluster.local/ns/shop/sa/admin"),
                ]),
                "2 URI SANs",
            ),
            (
                sign(vec![uri("spiffe://cluster.local/api")]),
                "not a SPIFFE ID",
            ),
        ];
        for (cert, why) in cases {
            let outcome = exchange(agent_server(&ca), client_with(&ca, cert)).await;
            refused(&outcome, "server", why);
        }
    }

    #[tokio::test]
    async fn a_self_signed_leaf_is_refused_even_when_trusted_as_a_root() {
        let state = tempfile::tempdir().unwrap();
        let ca = authority(state.path(), TD);
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let leaf = leaf_params(vec![uri("spiffe://cluster.local/ns/shop/sa/api")])
            .self_signed(&key)
            .unwrap();
        let mut roots = (*ca.roots()).clone();
        roots.add(leaf.der().clone()).unwrap();
        let trust = Trust::new(Arc::new(roots), TD);
        let agent = issued(&ca, &SpiffeId::agent(TD).unwrap());
        let server = server_config(&trust, Arc::new(Fixed(agent))).unwrap();
        let outcome = exchange(
            server,
            client_with(&ca, certified(leaf.der().clone(), &key)),
        )
        .await;
        refused(&outcome, "server", "self-signed");
    }

    #[tokio::test]
    async fn client_refuses_a_server_that_is_not_the_expected_identity() {
        let state = tempfile::tempdir().unwrap();
        let ca = authority(state.path(), TD);
        let client = client_config(
            &ca.trust(),
            Arc::new(Fixed(issued(&ca, &id("shop", "web")))),
            ExpectedServer::OneOf(vec![id("shop", "db")]),
        )
        .unwrap();
        let outcome = exchange(agent_server(&ca), client).await;
        refused(&outcome, "client", "not one of the identities expected");
    }

    #[test]
    fn generated_ca_dir_is_not_a_test_leftover() {
        // `ca_files` points into the state dir the helpers use; keep the two in step.
        let (cert, key) = ca_files(Path::new("/s"));
        assert_eq!(cert, Path::new("/s/ca/ca-cert.pem"));
        assert_eq!(key, Path::new("/s/ca/ca-key.pem"));
    }
}
