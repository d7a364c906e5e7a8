//! The client side of the flows port: `nodeward observe --node`, with a client certificate
//! issued by the cluster's CA (`nodeward ca-issue` writes one into [`default_dir`]).
//!
//! The client's trust domain is its own certificate's; it accepts only a server that proves
//! the node agent's identity of that trust domain with a chain to the given CA.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use rustls::client::ResolvesClientCert;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, SignatureScheme};

use super::{ALPN_HTTP1, FlowQuery};
use crate::ca::SpiffeId;
use crate::ca::client::{CLIENT_CA_FILE, CLIENT_CERT_FILE, CLIENT_KEY_FILE};
use crate::ca::tls::{self, ExpectedServer, Trust};

/// Where `nodeward ca-issue` writes, and `observe --node` reads, the client's files when no
/// directory is given: `$NODEWARD_OBSERVER_DIR`, else `~/.config/nodeward/observer`.
#[must_use]
pub fn default_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("NODEWARD_OBSERVER_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let config = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from("/etc"));
    config.join("nodeward").join("observer")
}

/// The client's certificate, key and CA files: given one by one, or in one directory.
#[derive(Clone, Debug)]
pub struct ClientFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl ClientFiles {
    /// `cert.pem`, `key.pem` and `ca.pem` in `dir`.
    #[must_use]
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            cert: dir.join(CLIENT_CERT_FILE),
            key: dir.join(CLIENT_KEY_FILE),
            ca: dir.join(CLIENT_CA_FILE),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientTlsError {
    #[error("{}: cannot read ({reason}); create the observer's files with `nodeward ca-issue` (see `nodeward ca-issue --help`), or give --tls-dir or --cert/--key/--ca-cert", path.display())]
    Read {
        path: PathBuf,
        reason: std::io::Error,
    },
    #[error("{}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
}

/// A loaded client certificate and the roots to check agents against.
#[derive(Clone, Debug)]
pub struct ClientTls {
    pub identity: SpiffeId,
    pub(super) config: Arc<rustls::ClientConfig>,
}

#[derive(Debug)]
struct FixedCert(Arc<CertifiedKey>);

impl ResolvesClientCert for FixedCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

fn read(path: &Path) -> Result<Vec<u8>, ClientTlsError> {
    std::fs::read(path).map_err(|reason| ClientTlsError::Read {
        path: path.to_path_buf(),
        reason,
    })
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, ClientTlsError> {
    let invalid = |reason: String| ClientTlsError::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(&read(path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(
            "no PEM certificate (BEGIN CERTIFICATE) in it".into(),
        ));
    }
    Ok(certs)
}

impl ClientTls {
    /// Loads and checks the three files.
    ///
    /// # Errors
    /// A file is missing or unreadable, the key does not fit the certificate, the certificate
    /// has no SPIFFE ID or is not valid now: each error names its file.
    pub fn load(files: &ClientFiles) -> Result<Self, ClientTlsError> {
        let invalid = |path: &Path, reason: String| ClientTlsError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let chain = certs(&files.cert)?;
        let identity =
            tls::spiffe_id_of(&chain[0]).map_err(|e| invalid(&files.cert, e.to_string()))?;
        check_validity(&chain[0]).map_err(|r| invalid(&files.cert, r))?;
        let key = PrivateKeyDer::from_pem_slice(&read(&files.key)?)
            .map_err(|e| invalid(&files.key, format!("no PEM private key in it: {e}")))?;
        let signer = rustls::crypto::ring::sign::any_supported_type(&key)
            .map_err(|e| invalid(&files.key, format!("unusable private key: {e}")))?;
        let certified = CertifiedKey::new(chain, signer);
        certified.keys_match().map_err(|e| {
            invalid(
                &files.key,
                format!(
                    "does not match the certificate {}: {e}",
                    files.cert.display()
                ),
            )
        })?;
        let mut roots = RootCertStore::empty();
        for cert in certs(&files.ca)? {
            roots
                .add(cert)
                .map_err(|e| invalid(&files.ca, format!("not usable as a trust root: {e}")))?;
        }
        let trust = Trust::new(Arc::new(roots), identity.trust_domain());
        let agent = SpiffeId::agent(identity.trust_domain())
            .map_err(|e| invalid(&files.cert, e.to_string()))?;
        let mut config = tls::client_config(
            &trust,
            Arc::new(FixedCert(Arc::new(certified))),
            ExpectedServer::OneOf(vec![agent]),
        )
        .map_err(|e| invalid(&files.cert, format!("building the TLS client: {e}")))?;
        config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
        Ok(Self {
            identity,
            config: Arc::new(config),
        })
    }
}

/// An expired or not yet valid certificate, said before the agent refuses it.
fn check_validity(cert: &CertificateDer<'_>) -> Result<(), String> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let validity = x509.validity();
    let now = x509_parser::time::ASN1Time::now();
    if now > validity.not_after {
        return Err(format!(
            "the certificate expired on {}; issue a new one with `nodeward ca-issue`",
            validity.not_after
        ));
    }
    if now < validity.not_before {
        return Err(format!(
            "the certificate is not valid before {}",
            validity.not_before
        ));
    }
    Ok(())
}

/// What a failed request to the flows port means, in words: a TLS alert from the agent is
/// its refusal of our certificate.
fn explain(e: &(dyn std::error::Error + 'static), identity: &SpiffeId) -> Option<String> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        let tls = err.downcast_ref::<rustls::Error>().or_else(|| {
            err.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        match tls {
            Some(rustls::Error::AlertReceived(alert)) => {
                return Some(format!(
                    "the agent refused this client's certificate ({identity}; TLS alert {alert:?}): it must be issued by the cluster's CA, in the agent's trust domain"
                ));
            }
            Some(other) => return Some(format!("TLS: {other}")),
            None => source = err.source(),
        }
    }
    None
}

/// One line of the agent's answer: a flow (or a `lost_flows` note), nothing for a blank line,
/// or the agent's error.
fn parse_line(line: &[u8]) -> anyhow::Result<Option<serde_json::Value>> {
    if line.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let value: serde_json::Value = serde_json::from_slice(line).with_context(|| {
        format!(
            "the agent sent a line that is not JSON: {}",
            String::from_utf8_lossy(line)
        )
    })?;
    if let Some(error) = value.get("error").and_then(|e| e.as_str()) {
        anyhow::bail!("{error}");
    }
    Ok(Some(value))
}

/// `GET /v1/flows` on an agent's flows port: calls `on_line` for every JSON line until the
/// agent closes.
///
/// # Errors
/// The agent cannot be reached or refuses this client, answers with an error, or sends a line
/// that is not JSON.
pub async fn fetch_flows<F>(
    addr: &str,
    tls: &ClientTls,
    query: &FlowQuery,
    mut on_line: impl FnMut(serde_json::Value) -> F,
) -> anyhow::Result<()>
where
    F: std::future::Future<Output = anyhow::Result<()>>,
{
    use http_body_util::BodyExt as _;
    let connect = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("cannot reach the agent's flows port {addr}"))?;
        let _ = tcp.set_nodelay(true);
        let stream = tokio_rustls::TlsConnector::from(tls.config.clone())
            .connect(tls::server_name(), tcp)
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "TLS with {addr}: {} (is it an agent's flows port, its --flows-addr?)",
                    tls::describe_handshake_error(&e)
                )
            })?;
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        anyhow::Ok((sender, conn))
    };
    let (mut sender, conn) = tokio::time::timeout(Duration::from_secs(5), connect)
        .await
        .map_err(|_| anyhow::anyhow!("connecting to the flows port {addr} timed out"))??;
    tokio::spawn(conn);
    let request = hyper::Request::get(format!("/v1/flows?{}", query.to_query_string()))
        .header(hyper::header::HOST, addr)
        .body(http_body_util::Empty::<Bytes>::new())?;
    let response = match sender.send_request(request).await {
        Ok(r) => r,
        Err(e) => {
            let why = explain(&e, &tls.identity).unwrap_or_else(|| crate::error_chain(&e));
            anyhow::bail!("{why}");
        }
    };
    let status = response.status();
    let mut body = response.into_body();
    let mut pending: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            if let Some(value) = parse_line(&line)? {
                on_line(value).await?;
            }
        }
    }
    if let Some(value) = parse_line(&pending)? {
        on_line(value).await?;
    }
    anyhow::ensure!(status.is_success(), "the agent answered {status}");
    Ok(())
}
