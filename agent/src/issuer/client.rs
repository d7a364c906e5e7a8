//! The agent's side of the issuer: a CSR for a key generated here, sent over TLS with the
//! node's token, and the certificate chain back. The key never leaves the agent.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;

use super::{ALPN_HTTP1, SIGN_PATH};
use crate::ca::tls::{self, ExpectedServer, Trust};
use crate::ca::{CaError, IssueCerts, Issued, SpiffeId};

/// Where the issuer is and how to prove the node to it.
#[derive(Clone, Debug)]
pub struct IssuerClientConfig {
    /// `host:port` (a Service name in a cluster, an address in the lab).
    pub address: String,
    /// A file holding the token: the projected ServiceAccount token (re-read per request, as
    /// the kubelet rotates it) or the bootstrap token.
    pub token_file: PathBuf,
    /// Per request: connect, TLS, answer.
    pub timeout: Duration,
}

/// Asks the issuer for certificates.
pub struct IssuerClient {
    config: IssuerClientConfig,
    connector: tokio_rustls::TlsConnector,
    issuer_name: String,
}

impl std::fmt::Debug for IssuerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuerClient")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl IssuerClient {
    /// A client that accepts only a server proving the issuer's identity under `trust`.
    ///
    /// # Errors
    /// The trust domain is invalid or the TLS configuration cannot be built.
    pub fn new(trust: &Trust, config: IssuerClientConfig) -> Result<Self, String> {
        let issuer = super::identity(trust.trust_domain()).map_err(|e| e.to_string())?;
        let tls_config = tls::client_config_without_client_auth(
            trust,
            ExpectedServer::OneOf(vec![issuer.clone()]),
            ALPN_HTTP1,
        )
        .map_err(|e| e.to_string())?;
        Ok(Self {
            issuer_name: format!("{issuer} at {}", config.address),
            config,
            connector: tokio_rustls::TlsConnector::from(Arc::new(tls_config)),
        })
    }

    /// Where certificates come from, for `nodeward certs`.
    #[must_use]
    pub fn describe(&self) -> &str {
        &self.issuer_name
    }

    /// Posts `csr_pem` and returns the chain the issuer signed (leaf first).
    ///
    /// # Errors
    /// The token cannot be read, the issuer cannot be reached or refuses (its reason).
    pub async fn sign(&self, csr_pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
        Ok(self.sign_naming_replica(csr_pem).await?.0)
    }

    /// [`sign`](Self::sign), with the name of the replica that signed, when it says.
    ///
    /// # Errors
    /// As [`sign`](Self::sign).
    pub async fn sign_naming_replica(
        &self,
        csr_pem: &str,
    ) -> Result<(Vec<CertificateDer<'static>>, Option<String>), String> {
        tokio::time::timeout(self.config.timeout, self.try_sign(csr_pem))
            .await
            .map_err(|_| format!("no answer within {:?}", self.config.timeout))?
    }

    async fn try_sign(
        &self,
        csr_pem: &str,
    ) -> Result<(Vec<CertificateDer<'static>>, Option<String>), String> {
        let token = std::fs::read_to_string(&self.config.token_file)
            .map_err(|e| format!("{}: {e}", self.config.token_file.display()))?;
        let tcp = tokio::net::TcpStream::connect(&self.config.address)
            .await
            .map_err(|e| format!("connecting to {}: {e}", self.config.address))?;
        let tls = self
            .connector
            .connect(tls::server_name(), tcp)
            .await
            .map_err(|e| tls::describe_handshake_error(&e))?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .map_err(|e| format!("HTTP: {e}"))?;
        tokio::spawn(conn);
        let request = hyper::Request::post(SIGN_PATH)
            .header(hyper::header::HOST, &self.config.address)
            .header(
                hyper::header::AUTHORIZATION,
                format!("Bearer {}", token.trim()),
            )
            .body(Full::new(Bytes::from(csr_pem.to_owned())))
            .map_err(|e| e.to_string())?;
        let response = send
            .send_request(request)
            .await
            .map_err(|e| format!("HTTP: {e}"))?;
        let status = response.status();
        let replica = response
            .headers()
            .get(super::REPLICA_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("HTTP: {e}"))?
            .to_bytes();
        let text = String::from_utf8_lossy(&body);
        if !status.is_success() {
            return Err(format!("the issuer answered {status}: {}", text.trim()));
        }
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&body)
            .collect::<Result<_, _>>()
            .map_err(|e| format!("the issuer's answer is not PEM certificates: {e}"))?;
        if chain.is_empty() {
            return Err("the issuer answered no certificate".into());
        }
        Ok((chain, replica))
    }

    /// A new key and a CSR for `identity` (the key stays here).
    ///
    /// # Errors
    /// Key generation or serialisation fails.
    pub fn csr_for(identity: &SpiffeId) -> Result<(KeyPair, String), String> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| format!("generating a key: {e}"))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            identity
                .uri()
                .try_into()
                .map_err(|e| format!("the SPIFFE ID as a SAN: {e}"))?,
        )];
        let csr = params
            .serialize_request(&key)
            .and_then(|c| c.pem())
            .map_err(|e| format!("the CSR: {e}"))?;
        Ok((key, csr))
    }

    /// A whole certificate for `identity`: key, CSR, the issuer's answer, checked.
    ///
    /// # Errors
    /// As [`sign`](Self::sign), or the answer is not a certificate for `identity` with our key.
    pub async fn issue_async(&self, identity: &SpiffeId) -> Result<Issued, String> {
        let (key, csr) = Self::csr_for(identity)?;
        let (chain, replica) = self.sign_naming_replica(&csr).await?;
        let leaf = &chain[0];
        let node = crate::ca::node_of(leaf);
        let id = tls::spiffe_id_of(leaf).map_err(|e| format!("the issued certificate: {e}"))?;
        if id != *identity {
            return Err(format!("the issuer signed {id}, not {identity}"));
        }
        let (_, x509) = x509_parser::parse_x509_certificate(leaf)
            .map_err(|e| format!("the issued certificate: {e}"))?;
        if x509.public_key().subject_public_key.data.as_ref()
            != rcgen::PublicKeyData::der_bytes(&key)
        {
            return Err("the issued certificate is not for the key we sent".into());
        }
        let validity = x509.validity();
        let to_system = |t: x509_parser::time::ASN1Time| {
            SystemTime::UNIX_EPOCH
                + Duration::from_secs(u64::try_from(t.timestamp()).unwrap_or_default())
        };
        let (not_before, not_after) = (
            to_system(validity.not_before),
            to_system(validity.not_after),
        );
        let serial = x509.raw_serial_as_string().replace(':', "").to_uppercase();
        let issuer = x509.issuer().to_string();
        drop(x509);
        let signing_key = rustls::crypto::ring::sign::any_ecdsa_type(&PrivateKeyDer::Pkcs8(
            PrivatePkcs8KeyDer::from(key.serialize_der()),
        ))
        .map_err(|e| format!("loading the key into rustls: {e}"))?;
        Ok(Issued {
            identity: identity.clone(),
            certified_key: Arc::new(CertifiedKey::new(chain, signing_key)),
            serial,
            issuer,
            issued_at: SystemTime::now(),
            not_before,
            not_after,
            node,
            via: match replica {
                Some(replica) => format!("issuer at {}, replica {replica}", self.config.address),
                None => format!("issuer at {}", self.config.address),
            },
        })
    }
}

/// [`IssueCerts`] through the issuer, for the certificate manager, whose calls are
/// synchronous: each request runs on a thread of its own with a small runtime, so a caller on
/// a Tokio worker waits without blocking the runtime's other tasks from being stolen by its
/// other workers (and without nesting runtimes). The TTL is the issuer's to decide.
#[derive(Debug)]
pub struct RemoteIssuer {
    client: Arc<IssuerClient>,
}

impl RemoteIssuer {
    #[must_use]
    pub fn new(client: IssuerClient) -> Self {
        Self {
            client: Arc::new(client),
        }
    }
}

impl IssueCerts for RemoteIssuer {
    fn issue(&self, identity: &SpiffeId, _ttl: Duration) -> Result<Issued, CaError> {
        let client = self.client.clone();
        let id = identity.clone();
        let fail = |reason: String| CaError::Issue {
            identity: identity.uri(),
            reason,
        };
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(|e| format!("a runtime for the request: {e}"))?;
                    runtime.block_on(client.issue_async(&id))
                })
                .join()
                .unwrap_or_else(|_| Err("the request's thread panicked".into()))
        })
        .map_err(fail)
    }
}

/// The agent's certificates from the issuer (`--ca-mode issuer`): trust roots from
/// `--trust-bundle` only (no CA key may be given), and the agent's own certificate before
/// anything else starts. An issuer that is not answering yet is retried with backoff for up to
/// a minute (an agent and its issuer often start together); after that start-up fails, and the
/// DaemonSet's restart backoff takes over.
///
/// # Errors
/// A CA key was given, the bundle is unusable, or the issuer never signed the agent's own
/// certificate.
pub async fn start(
    ca: &crate::ca::CaConfig,
    issuer: &IssuerClientConfig,
    ttl: Duration,
) -> Result<(crate::ca::MeshCa, crate::ca::manager::CertManager), CaError> {
    if ca.ca_cert.is_some() || ca.ca_key.is_some() {
        return Err(CaError::KeyWithIssuer);
    }
    let issuer_id = super::identity(&ca.trust_domain).map_err(CaError::TrustDomain)?;
    let mesh = crate::ca::MeshCa::from_bundle(
        &ca.trust_domain,
        &ca.trust_bundle,
        issuer_id.uri(),
        format!("issuer at {}", issuer.address),
    )?;
    let client = IssuerClient::new(&mesh.trust(), issuer.clone()).map_err(CaError::Issuer)?;
    let certs = crate::ca::manager::CertManager::new(Arc::new(RemoteIssuer::new(client)), ttl);
    let agent = SpiffeId::agent(&ca.trust_domain).map_err(CaError::TrustDomain)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut failures = 0u32;
    loop {
        let (c, a) = (certs.clone(), agent.clone());
        let pinned = tokio::task::spawn_blocking(move || c.pin(&a).map(|_| ()))
            .await
            .unwrap_or_else(|e| Err(CaError::Issuer(e.to_string())));
        match pinned {
            Ok(()) => break,
            Err(e) if std::time::Instant::now() < deadline => {
                failures += 1;
                let wait = crate::ca::manager::retry_delay(
                    failures,
                    Duration::from_secs(100),
                    fastrand::f64(),
                );
                tracing::warn!(issuer = %issuer.address, error = %e, retry_in = ?wait, "no certificate from the issuer yet");
                tokio::time::sleep(wait).await;
            }
            Err(e) => return Err(e),
        }
    }
    tracing::info!(
        issuer = %issuer.address,
        trust_domain = %ca.trust_domain,
        roots = mesh.roots().len(),
        "certificates from the issuer; no CA key on this node"
    );
    Ok((mesh, certs))
}
