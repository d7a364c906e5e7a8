//! The agent's certificate authority: the issuer of workload certificates and the trust roots
//! every mTLS peer is checked against.
//!
//! By default the agent creates a self-signed ECDSA P-256 root in `<state-dir>/ca/` on first
//! start (key file mode 0600, written atomically) and reuses it after. With `--ca-cert` and
//! `--ca-key` it loads a root or intermediate instead, so every node of a cluster can share one
//! issuer (for example a cert-manager `Certificate`). `--trust-bundle` adds more roots, so a root
//! can be rotated with an overlap. Every file is checked once at start-up; a bad one stops the
//! agent with a one-line error naming it.
//!
//! Workload keys never touch the disk: [`manager::CertManager`] keeps them in memory.

pub mod client;
pub mod manager;
pub mod spiffe;
pub mod tls;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use time::OffsetDateTime;

pub use spiffe::{DEFAULT_TRUST_DOMAIN, SpiffeError, SpiffeId};

/// Certificate and key file names of a generated CA, inside `<state-dir>/ca/`.
pub const CA_CERT_FILE: &str = "ca-cert.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// Default workload certificate lifetime.
pub const DEFAULT_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Shortest lifetime accepted: X.509 times have a resolution of one second.
pub const MIN_CERT_TTL: Duration = Duration::from_secs(2);
/// Lifetime of a root the agent generates for itself.
const GENERATED_ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Workload certificates start this much before they are issued, for peers whose clocks lag.
const BACKDATE: Duration = Duration::from_secs(60);

/// Where the CA comes from, validated once at start-up.
#[derive(Clone, Debug)]
pub struct CaConfig {
    /// The agent's `--state-dir`; a generated CA lives in its `ca/` directory.
    pub state_dir: PathBuf,
    /// `--ca-cert`: the issuing CA certificate, optionally followed by its own issuers.
    pub ca_cert: Option<PathBuf>,
    /// `--ca-key`: the issuing CA's private key (PKCS#8 PEM).
    pub ca_key: Option<PathBuf>,
    /// `--trust-bundle`: more trust roots (PEM, one or more certificates per file).
    pub trust_bundle: Vec<PathBuf>,
    pub trust_domain: String,
}

impl CaConfig {
    #[must_use]
    pub fn generated(state_dir: &Path, trust_domain: &str) -> Self {
        Self {
            state_dir: state_dir.to_path_buf(),
            ca_cert: None,
            ca_key: None,
            trust_bundle: Vec::new(),
            trust_domain: trust_domain.to_owned(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{}: cannot read", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error("{}: cannot write the generated CA", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--ca-cert and --ca-key go together: give both, or neither to use a generated CA")]
    HalfConfigured,
    #[error("--trust-domain: {0}")]
    TrustDomain(#[source] SpiffeError),
    #[error("generating the CA: {0}")]
    Generate(String),
    #[error(
        "--ca-mode issuer needs --trust-bundle: the root certificates the issuer's CA chains to"
    )]
    NoTrustBundle,
    #[error("--ca-mode issuer: the CA key stays with the issuer; remove --ca-cert and --ca-key")]
    KeyWithIssuer,
    #[error("the issuer: {0}")]
    Issuer(String),
    #[error("issuing a certificate for {identity}: {reason}")]
    Issue { identity: String, reason: String },
}

/// Where an agent's certificates come from (`--ca-mode`).
#[derive(Clone, Debug)]
pub enum CaMode {
    /// The agent's own CA (`--ca-cert`/`--ca-key`, or generated): standalone mode and the demo.
    Local,
    /// `nodeward issuer`: the agent sends CSRs and holds no CA key.
    Issuer(crate::issuer::client::IssuerClientConfig),
}

/// How the CA came to be, for logs and `nodeward certs`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CaOrigin {
    /// Created by this agent (now or on an earlier start) in this directory.
    Generated(PathBuf),
    /// Loaded from `--ca-cert` and `--ca-key`.
    Files { cert: PathBuf, key: PathBuf },
}

/// What an agent knows of the mesh's CA in either mode: the trust roots and domain every peer
/// is checked against, and where its certificates come from (logs, `nodeward certs`). With
/// `--ca-mode local` it comes from the [`Authority`]; with `--ca-mode issuer` from
/// `--trust-bundle` alone, and the agent holds no CA key.
#[derive(Clone, Debug)]
pub struct MeshCa {
    trust_domain: String,
    roots: Arc<RootCertStore>,
    issuer: String,
    source: String,
}

impl MeshCa {
    /// Roots from the PEM files `bundle` (CA certificates only), for an agent whose
    /// certificates come from `issuer` (described as `source`).
    ///
    /// # Errors
    /// A file cannot be read or holds something other than valid CA certificates, there is no
    /// file, or the trust domain is invalid.
    pub fn from_bundle(
        trust_domain: &str,
        bundle: &[PathBuf],
        issuer: String,
        source: String,
    ) -> Result<Self, CaError> {
        spiffe::validate_trust_domain(trust_domain).map_err(CaError::TrustDomain)?;
        if bundle.is_empty() {
            return Err(CaError::NoTrustBundle);
        }
        let mut roots = RootCertStore::empty();
        for path in bundle {
            for cert in &read_certs(path)? {
                check_ca(path, cert)?;
                add_root(&mut roots, path, cert)?;
            }
        }
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            roots: Arc::new(roots),
            issuer,
            source,
        })
    }

    #[must_use]
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    #[must_use]
    pub fn roots(&self) -> Arc<RootCertStore> {
        self.roots.clone()
    }

    /// What a TLS config needs to check peers.
    #[must_use]
    pub fn trust(&self) -> tls::Trust {
        tls::Trust::new(self.roots.clone(), &self.trust_domain)
    }

    /// Who signs: the issuing CA's subject, or the issuer service.
    #[must_use]
    pub fn issuer_name(&self) -> &str {
        &self.issuer
    }

    /// `generated in DIR`, `loaded from FILE`, or `issuer at ADDRESS`.
    #[must_use]
    pub fn source(&self) -> &str {
        &self.source
    }
}

/// [`Issued::via`] of a certificate this agent's own CA signed.
pub const VIA_LOCAL: &str = "local";
/// The organization in a node agent's certificate subject (with the node as common name).
pub const NODE_AGENT_ORGANIZATION: &str = "nodeward node agent";

/// The node a certificate's subject names (`O=nodeward node agent, CN=<node>`), if any.
#[must_use]
pub fn node_of(leaf: &CertificateDer<'_>) -> Option<String> {
    let (_, x509) = x509_parser::parse_x509_certificate(leaf).ok()?;
    let subject = x509.subject();
    let org = subject.iter_organization().next()?.as_str().ok()?;
    if org != NODE_AGENT_ORGANIZATION {
        return None;
    }
    Some(subject.iter_common_name().next()?.as_str().ok()?.to_owned())
}

/// A certificate the CA issued, with its key, ready for rustls.
#[derive(Debug)]
pub struct Issued {
    pub identity: SpiffeId,
    /// Leaf, then the CA chain; the key stays in memory.
    pub certified_key: Arc<CertifiedKey>,
    /// Hexadecimal, as `openssl x509 -serial` prints it.
    pub serial: String,
    /// The issuer's subject, as text.
    pub issuer: String,
    pub issued_at: SystemTime,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// The node a node agent's certificate names (its subject's common name); `None` for a
    /// workload's.
    pub node: Option<String>,
    /// Who signed it: `local` (this agent's own CA) or `issuer at ADDRESS, replica NAME`.
    pub via: String,
}

impl Issued {
    /// The leaf certificate.
    #[must_use]
    pub fn leaf(&self) -> &CertificateDer<'static> {
        &self.certified_key.cert[0]
    }
}

/// Something that issues workload certificates: the [`Authority`], or a test double.
pub trait IssueCerts: Send + Sync {
    fn issue(&self, identity: &SpiffeId, ttl: Duration) -> Result<Issued, CaError>;
}

/// The CA: issuer key and certificate chain, and the trust roots.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    /// The issuing CA certificate and its issuers up to (not including) a self-signed root:
    /// what follows the leaf in every chain the agent presents.
    chain: Vec<CertificateDer<'static>>,
    issuer_name: String,
    roots: Arc<RootCertStore>,
    trust_domain: String,
    origin: CaOrigin,
    /// The node whose agent's certificate this CA signs (`--ca-mode local`): it names it.
    node: Option<String>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("issuer", &self.issuer_name)
            .field("trust_domain", &self.trust_domain)
            .field("roots", &self.roots.len())
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

/// Loads (or creates) the CA and starts the certificate cache with the node agent's own
/// identity issued. Call inside the Tokio runtime: renewals run on it.
pub fn start(config: &CaConfig, ttl: Duration) -> Result<(MeshCa, manager::CertManager), CaError> {
    start_for_node(config, ttl, None)
}

/// [`start`], the agent's own certificate naming `node` when given.
///
/// # Errors
/// As [`Authority::load_or_create`], or the agent's certificate cannot be issued.
pub fn start_for_node(
    config: &CaConfig,
    ttl: Duration,
    node: Option<&str>,
) -> Result<(MeshCa, manager::CertManager), CaError> {
    let mut authority = Authority::load_or_create(config)?;
    authority.node = node.map(str::to_owned);
    let authority = Arc::new(authority);
    let certs = manager::CertManager::new(authority.clone(), ttl);
    let agent = SpiffeId::agent(&config.trust_domain).map_err(CaError::TrustDomain)?;
    certs.pin(&agent)?;
    tracing::info!(
        issuer = %authority.issuer_name(),
        trust_domain = %authority.trust_domain(),
        roots = authority.roots().len(),
        origin = ?authority.origin(),
        ttl = %humantime::format_duration(ttl),
        "certificate authority ready"
    );
    Ok((authority.mesh_ca(), certs))
}

impl Authority {
    /// Loads the configured CA, or creates (first start) or reuses the generated one.
    pub fn load_or_create(config: &CaConfig) -> Result<Self, CaError> {
        spiffe::validate_trust_domain(&config.trust_domain).map_err(CaError::TrustDomain)?;
        let (cert_path, key_path, origin) = match (&config.ca_cert, &config.ca_key) {
            (Some(cert), Some(key)) => (
                cert.clone(),
                key.clone(),
                CaOrigin::Files {
                    cert: cert.clone(),
                    key: key.clone(),
                },
            ),
            (None, None) => {
                let dir = config.state_dir.join("ca");
                ensure_generated(&dir, &config.trust_domain)?;
                (
                    dir.join(CA_CERT_FILE),
                    dir.join(CA_KEY_FILE),
                    CaOrigin::Generated(dir),
                )
            }
            _ => return Err(CaError::HalfConfigured),
        };
        let certs = read_certs(&cert_path)?;
        let key = read_key(&key_path)?;
        let ca = check_ca(&cert_path, &certs[0])?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&certs[0])
            .map_err(|e| invalid(&cert_path, format!("not an X.509 certificate: {e}")))?;
        if parsed.public_key().subject_public_key.data.as_ref()
            != rcgen::PublicKeyData::der_bytes(&key)
        {
            return Err(invalid(
                &key_path,
                format!("does not match the CA certificate {}", cert_path.display()),
            ));
        }
        drop(parsed);
        let issuer = Issuer::from_ca_cert_der(&certs[0], key)
            .map_err(|e| invalid(&cert_path, format!("cannot issue with it: {e}")))?;

        let mut roots = RootCertStore::empty();
        let mut chain = Vec::new();
        for cert in &certs {
            if is_self_signed(cert) {
                add_root(&mut roots, &cert_path, cert)?;
            } else {
                chain.push(cert.clone());
            }
        }
        for path in &config.trust_bundle {
            let bundle = read_certs(path)?;
            for cert in &bundle {
                check_ca(path, cert)?;
                add_root(&mut roots, path, cert)?;
            }
        }
        if roots.is_empty() {
            // An intermediate without its root: trust the issuing CA itself. Peers that have
            // the real root (in their --trust-bundle) still accept our chains.
            tracing::warn!(
                ca_cert = %cert_path.display(),
                "the CA certificate is not self-signed and no --trust-bundle was given: trusting the issuing CA itself"
            );
            add_root(&mut roots, &cert_path, &certs[0])?;
        }
        let authority = Self {
            issuer,
            chain,
            issuer_name: ca.subject,
            roots: Arc::new(roots),
            trust_domain: config.trust_domain.clone(),
            origin,
            node: None,
        };
        // One probe certificate proves the issuer, the chain and the roots fit together.
        let probe = authority.issue(
            &SpiffeId::agent(&config.trust_domain).map_err(CaError::TrustDomain)?,
            Duration::from_secs(60),
        )?;
        tls::verify_chain(&authority.roots, probe.leaf(), &probe.certified_key.cert[1..], rustls::pki_types::UnixTime::now()).map_err(|e| {
            invalid(
                &cert_path,
                format!(
                    "certificates it issues do not chain to any trust root ({e}); add its root CA with --trust-bundle"
                ),
            )
        })?;
        Ok(authority)
    }

    #[must_use]
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// This CA as the agent's [`MeshCa`].
    #[must_use]
    pub fn mesh_ca(&self) -> MeshCa {
        MeshCa {
            trust_domain: self.trust_domain.clone(),
            roots: self.roots.clone(),
            issuer: self.issuer_name.clone(),
            source: match &self.origin {
                CaOrigin::Generated(dir) => format!("generated in {}", dir.display()),
                CaOrigin::Files { cert, .. } => format!("loaded from {}", cert.display()),
            },
        }
    }

    /// The trust anchors: self-signed certificates of `--ca-cert`, `--trust-bundle`, or the
    /// generated root.
    #[must_use]
    pub fn roots(&self) -> Arc<RootCertStore> {
        self.roots.clone()
    }

    #[must_use]
    pub fn origin(&self) -> &CaOrigin {
        &self.origin
    }

    /// The issuing CA's subject.
    #[must_use]
    pub fn issuer_name(&self) -> &str {
        &self.issuer_name
    }

    /// What a TLS config needs to check peers against this CA's roots and trust domain.
    #[must_use]
    pub fn trust(&self) -> tls::Trust {
        tls::Trust::new(self.roots.clone(), &self.trust_domain)
    }

    /// Issues a certificate valid from `not_before` to `not_after` (tests use this for
    /// expired and not-yet-valid certificates).
    pub fn issue_with_validity(
        &self,
        identity: &SpiffeId,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Issued, CaError> {
        let fail = |reason: String| CaError::Issue {
            identity: identity.uri(),
            reason,
        };
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| fail(format!("generating a key: {e}")))?;
        let node = self
            .node
            .as_deref()
            .filter(|_| SpiffeId::agent(&self.trust_domain).is_ok_and(|a| a == *identity));
        let (cert, serial) = self.sign_leaf(identity, &key, not_before, not_after, node)?;
        let mut chain = vec![cert];
        chain.extend(self.chain.iter().cloned());
        let signing_key = rustls::crypto::ring::sign::any_ecdsa_type(&PrivateKeyDer::Pkcs8(
            PrivatePkcs8KeyDer::from(key.serialize_der()),
        ))
        .map_err(|e| fail(format!("loading the key into rustls: {e}")))?;
        Ok(Issued {
            identity: identity.clone(),
            certified_key: Arc::new(CertifiedKey::new(chain, signing_key)),
            serial: serial.iter().map(|b| format!("{b:02X}")).collect(),
            issuer: self.issuer_name.clone(),
            issued_at: SystemTime::now(),
            // X.509 times have whole seconds.
            not_before: whole_seconds(not_before),
            not_after: whole_seconds(not_after),
            node: node.map(str::to_owned),
            via: VIA_LOCAL.to_owned(),
        })
    }
}

impl Authority {
    /// The CA chain that follows a leaf this CA signs (without a self-signed root).
    #[must_use]
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// Signs a workload certificate for `identity` with the public key `key` (generated here,
    /// or from a CSR the issuer checked): the SPIFFE ID as the only SAN, no CA flag, server and
    /// client authentication. Returns the leaf and its serial number.
    ///
    /// # Errors
    /// The identity is not of this trust domain, or signing fails.
    pub fn sign_workload(
        &self,
        identity: &SpiffeId,
        key: &impl rcgen::PublicKeyData,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<(CertificateDer<'static>, [u8; 16]), CaError> {
        self.sign_leaf(identity, key, not_before, not_after, None)
    }

    /// [`Authority::sign_workload`], naming `node` in the subject (`O=nodeward node agent,
    /// CN=<node>`) when given: a node agent's certificate, for that node only (the issuer
    /// gives the node its token proved, never one the request names).
    ///
    /// # Errors
    /// As [`Authority::sign_workload`].
    pub fn sign_leaf(
        &self,
        identity: &SpiffeId,
        key: &impl rcgen::PublicKeyData,
        not_before: SystemTime,
        not_after: SystemTime,
        node: Option<&str>,
    ) -> Result<(CertificateDer<'static>, [u8; 16]), CaError> {
        let fail = |reason: String| CaError::Issue {
            identity: identity.uri(),
            reason,
        };
        if identity.trust_domain() != self.trust_domain {
            return Err(fail(format!(
                "not in this CA's trust domain {}",
                self.trust_domain
            )));
        }
        let mut params = CertificateParams::default();
        // Empty subject: the SPIFFE ID in the (then critical) URI SAN is the whole identity;
        // a node agent's names its node too.
        params.distinguished_name = DistinguishedName::new();
        if let Some(node) = node {
            params
                .distinguished_name
                .push(rcgen::DnType::OrganizationName, NODE_AGENT_ORGANIZATION);
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, node);
        }
        params.subject_alt_names = vec![SanType::URI(
            identity
                .uri()
                .try_into()
                .map_err(|e| fail(format!("the SPIFFE ID as a SAN: {e}")))?,
        )];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let serial = random_serial().map_err(fail)?;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.not_before = OffsetDateTime::from(not_before);
        params.not_after = OffsetDateTime::from(not_after);
        let cert = params
            .signed_by(key, &self.issuer)
            .map_err(|e| fail(format!("signing: {e}")))?;
        Ok((cert.der().clone(), serial))
    }
}

impl IssueCerts for Authority {
    fn issue(&self, identity: &SpiffeId, ttl: Duration) -> Result<Issued, CaError> {
        let now = SystemTime::now();
        let mut issued = self.issue_with_validity(identity, now - BACKDATE, now + ttl)?;
        issued.issued_at = now;
        Ok(issued)
    }
}

fn whole_seconds(t: SystemTime) -> SystemTime {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// 16 random bytes, positive as a DER integer.
fn random_serial() -> Result<[u8; 16], String> {
    use ring::rand::SecureRandom as _;
    let mut serial = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut serial)
        .map_err(|_| "no randomness for a serial number".to_owned())?;
    serial[0] &= 0x7f;
    serial[0] |= 0x01; // never a leading zero byte, so the hex form is stable
    Ok(serial)
}

fn invalid(path: &Path, reason: impl Into<String>) -> CaError {
    CaError::Invalid {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, CaError> {
    std::fs::read(path).map_err(|source| CaError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Every certificate in a PEM file; at least one.
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let pem = read_file(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(path, format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(
            path,
            "no PEM certificate (BEGIN CERTIFICATE) in it",
        ));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<KeyPair, CaError> {
    let pem = read_file(path)?;
    let key = PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| invalid(path, format!("no PEM private key in it: {e}")))?;
    let PrivateKeyDer::Pkcs8(pkcs8) = key else {
        return Err(invalid(
            path,
            "the key is not PKCS#8 (BEGIN PRIVATE KEY); convert it with `openssl pkcs8 -topk8 -nocrypt`",
        ));
    };
    KeyPair::try_from(&pkcs8).map_err(|e| invalid(path, format!("unusable private key: {e}")))
}

struct CaInfo {
    subject: String,
}

/// Checks that `cert` is a CA certificate valid now.
fn check_ca(path: &Path, cert: &CertificateDer<'_>) -> Result<CaInfo, CaError> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| invalid(path, format!("not an X.509 certificate: {e}")))?;
    let subject = x509.subject().to_string();
    let is_ca = x509
        .basic_constraints()
        .ok()
        .flatten()
        .is_some_and(|bc| bc.value.ca);
    if !is_ca {
        return Err(invalid(
            path,
            format!("{subject} is not a CA certificate (basicConstraints CA is not set)"),
        ));
    }
    if let Ok(Some(ku)) = x509.key_usage()
        && !ku.value.key_cert_sign()
    {
        return Err(invalid(
            path,
            format!("{subject} may not sign certificates (keyUsage lacks keyCertSign)"),
        ));
    }
    let now = x509_parser::time::ASN1Time::now();
    let validity = x509.validity();
    if now > validity.not_after {
        return Err(invalid(
            path,
            format!("{subject} expired on {}", validity.not_after),
        ));
    }
    if now < validity.not_before {
        return Err(invalid(
            path,
            format!("{subject} is not valid before {}", validity.not_before),
        ));
    }
    Ok(CaInfo { subject })
}

fn is_self_signed(cert: &CertificateDer<'_>) -> bool {
    x509_parser::parse_x509_certificate(cert).is_ok_and(|(_, x509)| {
        x509.subject().as_raw() == x509.issuer().as_raw() && x509.verify_signature(None).is_ok()
    })
}

fn add_root(
    roots: &mut RootCertStore,
    path: &Path,
    cert: &CertificateDer<'_>,
) -> Result<(), CaError> {
    roots
        .add(cert.clone().into_owned())
        .map_err(|e| invalid(path, format!("not usable as a trust root: {e}")))
}

/// Creates the generated CA in `dir` unless it is there. A key without its certificate (a
/// crash between the two renames) is replaced; a certificate without its key is an error, not
/// a silent new root.
/// Creates a new self-signed root in `dir` (`ca-cert.pem`, and `ca-key.pem` with mode 0600)
/// for `--ca-cert`/`--ca-key` on every node: one issuer for the whole cluster. Refuses to
/// replace an existing one.
///
/// # Errors
/// A root is already there, the trust domain is invalid, or the files cannot be written.
pub fn create_root(dir: &Path, trust_domain: &str) -> Result<(PathBuf, PathBuf), CaError> {
    spiffe::validate_trust_domain(trust_domain).map_err(CaError::TrustDomain)?;
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    for path in [&cert_path, &key_path] {
        if path.exists() {
            return Err(invalid(
                path,
                "already exists; remove it first to create a new root",
            ));
        }
    }
    ensure_generated(dir, trust_domain)?;
    Ok((cert_path, key_path))
}

fn ensure_generated(dir: &Path, trust_domain: &str) -> Result<(), CaError> {
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    if cert_path.exists() {
        if !key_path.exists() {
            return Err(invalid(
                &key_path,
                format!(
                    "missing, but {} exists: restore the key, or remove both to create a new root",
                    cert_path.display()
                ),
            ));
        }
        return Ok(());
    }
    create_private_dir(dir)?;
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| CaError::Generate(e.to_string()))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, trust_domain);
    let serial = random_serial().map_err(CaError::Generate)?;
    // A name of its own, so two generated roots (a rotation, two clusters) never look alike.
    let tag: String = serial[..4].iter().map(|b| format!("{b:02x}")).collect();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("nodeward root CA {tag}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    let now = SystemTime::now();
    params.not_before = OffsetDateTime::from(now - BACKDATE);
    params.not_after = OffsetDateTime::from(now + GENERATED_ROOT_LIFETIME);
    let cert = params
        .self_signed(&key)
        .map_err(|e| CaError::Generate(e.to_string()))?;
    // Key first: a certificate on disk always has its key beside it.
    write_atomically(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_atomically(&cert_path, cert.pem().as_bytes(), 0o644)?;
    tracing::info!(dir = %dir.display(), trust_domain, "created a new root CA");
    Ok(())
}

pub(crate) fn create_private_dir(dir: &Path) -> Result<(), CaError> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| CaError::Write {
            path: dir.to_path_buf(),
            source,
        })
}

/// Writes `path` through a temporary file in the same directory, created with `mode`, synced,
/// then renamed over: readers see the old file or the whole new one, never a part.
pub(crate) fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let err = |source| CaError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    // A leftover from a crash may have another mode; start from nothing.
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    let written = file.write_all(contents).and_then(|()| file.sync_all());
    drop(file);
    if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(err(e));
    }
    if let Some(dir) = path.parent()
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Helpers for tests here and in [`tls`] and [`manager`].
#[cfg(test)]
pub(crate) mod testing {
    use std::path::{Path, PathBuf};
    use std::sync::Arc;

    use rcgen::{CertificateParams, Issuer, KeyPair};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    use rustls::sign::CertifiedKey;

    use super::{Authority, CA_CERT_FILE, CA_KEY_FILE, CaConfig};

    /// A generated CA in `dir` for trust domain `td`.
    pub fn authority(dir: &Path, td: &str) -> Authority {
        Authority::load_or_create(&CaConfig::generated(dir, td))
            .unwrap_or_else(|e| panic!("creating a CA in {}: {e}", dir.display()))
    }

    /// The certificate and key files of the CA generated in `dir`.
    pub fn ca_files(dir: &Path) -> (PathBuf, PathBuf) {
        (
            dir.join("ca").join(CA_CERT_FILE),
            dir.join("ca").join(CA_KEY_FILE),
        )
    }

    /// Signs `params` with the CA generated in `dir` (for certificates the agent would never
    /// issue: wrong SANs and the like).
    pub fn sign_with_ca(dir: &Path, params: &CertificateParams) -> Arc<CertifiedKey> {
        let (cert, key) = ca_files(dir);
        let ca_key = KeyPair::from_pem(&std::fs::read_to_string(key).unwrap()).unwrap();
        let ca_pem = std::fs::read_to_string(cert).unwrap();
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        certified(cert.der().clone(), &key)
    }

    pub fn certified(cert: CertificateDer<'static>, key: &KeyPair) -> Arc<CertifiedKey> {
        let key = rustls::crypto::ring::sign::any_ecdsa_type(&PrivateKeyDer::Pkcs8(
            PrivatePkcs8KeyDer::from(key.serialize_der()),
        ))
        .unwrap();
        Arc::new(CertifiedKey::new(vec![cert], key))
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use rcgen::{CertificateParams, KeyPair};

    use super::testing::{authority, ca_files};
    use super::*;

    fn td() -> &'static str {
        DEFAULT_TRUST_DOMAIN
    }

    fn files_config(state: &Path, cert: &Path, key: &Path) -> CaConfig {
        CaConfig {
            ca_cert: Some(cert.to_path_buf()),
            ca_key: Some(key.to_path_buf()),
            ..CaConfig::generated(state, td())
        }
    }

    fn error_of(config: &CaConfig) -> String {
        match Authority::load_or_create(config) {
            Ok(a) => panic!("expected a CA error, got a CA: {a:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn generated_ca_is_created_once_and_reused_with_a_private_key_file() {
        let state = tempfile::tempdir().unwrap();
        let first = authority(state.path(), td());
        let (cert, key) = ca_files(state.path());
        let pem = std::fs::read(&cert).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&key), 0o600, "the CA key must be private");
        assert_eq!(mode(&state.path().join("ca")), 0o700);
        assert!(
            !std::fs::read_dir(state.path().join("ca"))
                .unwrap()
                .any(|e| e.unwrap().file_name().to_string_lossy().contains(".tmp")),
            "no temporary file is left behind"
        );

        // A restart: the same root, and what one issues the other trusts.
        let second = authority(state.path(), td());
        assert_eq!(std::fs::read(&cert).unwrap(), pem, "the root was replaced");
        assert_eq!(
            second.origin(),
            &CaOrigin::Generated(state.path().join("ca"))
        );
        let id = SpiffeId::workload(td(), "shop", "api").unwrap();
        let issued = first.issue(&id, DEFAULT_CERT_TTL).unwrap();
        tls::verify_chain(
            &second.roots(),
            issued.leaf(),
            &issued.certified_key.cert[1..],
            rustls::pki_types::UnixTime::now(),
        )
        .expect("a certificate from before the restart chains to the reused root");
    }

    #[test]
    fn the_agents_certificate_names_its_node_and_a_workloads_names_none() {
        let state = tempfile::tempdir().unwrap();
        let mut ca = authority(state.path(), td());
        ca.node = Some("node-1".into());
        let agent_id = SpiffeId::agent(td()).unwrap();
        let agent = ca.issue(&agent_id, Duration::from_secs(60)).unwrap();
        assert_eq!(node_of(agent.leaf()).as_deref(), Some("node-1"));
        assert_eq!(agent.node.as_deref(), Some("node-1"));
        assert_eq!(agent.via, VIA_LOCAL);
        assert_eq!(tls::spiffe_id_of(agent.leaf()).unwrap(), agent_id);
        let workload = ca
            .issue(
                &SpiffeId::workload(td(), "shop", "api").unwrap(),
                Duration::from_secs(60),
            )
            .unwrap();
        assert_eq!(node_of(workload.leaf()), None);
        assert_eq!(workload.node, None);
    }

    #[test]
    fn a_certificate_without_its_key_is_an_error_not_a_new_root() {
        let state = tempfile::tempdir().unwrap();
        authority(state.path(), td());
        let (_, key) = ca_files(state.path());
        std::fs::remove_file(&key).unwrap();
        let e = error_of(&CaConfig::generated(state.path(), td()));
        assert!(
            e.contains(&key.display().to_string()) && e.contains("missing"),
            "{e}"
        );
    }

    #[test]
    fn ca_is_loaded_from_files_and_issues_chains_to_it() {
        let shared = tempfile::tempdir().unwrap();
        authority(shared.path(), td());
        let (cert, key) = ca_files(shared.path());
        // Two nodes, each with its own state dir, share the issuer.
        let node1 = tempfile::tempdir().unwrap();
        let node2 = tempfile::tempdir().unwrap();
        let a1 = Authority::load_or_create(&files_config(node1.path(), &cert, &key)).unwrap();
        let a2 = Authority::load_or_create(&files_config(node2.path(), &cert, &key)).unwrap();
        assert!(!node1.path().join("ca").exists(), "no CA is generated");
        assert!(matches!(a1.origin(), CaOrigin::Files { .. }));
        assert!(
            a1.issuer_name().contains("nodeward root CA"),
            "{}",
            a1.issuer_name()
        );
        let issued = a1
            .issue(
                &SpiffeId::workload(td(), "a", "b").unwrap(),
                DEFAULT_CERT_TTL,
            )
            .unwrap();
        tls::verify_chain(
            &a2.roots(),
            issued.leaf(),
            &[],
            rustls::pki_types::UnixTime::now(),
        )
        .expect("node 2 trusts node 1's certificates");
    }

    #[test]
    fn mismatched_key_is_refused_naming_the_file() {
        let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        authority(one.path(), td());
        authority(two.path(), td());
        let (cert, _) = ca_files(one.path());
        let (_, other_key) = ca_files(two.path());
        let state = tempfile::tempdir().unwrap();
        let e = error_of(&files_config(state.path(), &cert, &other_key));
        assert!(
            e.starts_with(&other_key.display().to_string()) && e.contains("does not match"),
            "expected an error naming {}, got: {e}",
            other_key.display()
        );
        assert!(!e.contains('\n'), "one line: {e}");
    }

    #[test]
    fn unreadable_or_non_ca_files_are_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        authority(dir.path(), td());
        let (cert, key) = ca_files(dir.path());
        let state = tempfile::tempdir().unwrap();

        let missing = dir.path().join("nope.pem");
        let e = error_of(&files_config(state.path(), &missing, &key));
        assert!(
            e.starts_with(&missing.display().to_string()) && e.contains("cannot read"),
            "{e}"
        );

        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "hello\n").unwrap();
        let e = error_of(&files_config(state.path(), &garbage, &key));
        assert!(e.starts_with(&garbage.display().to_string()), "{e}");
        let e = error_of(&files_config(state.path(), &cert, &garbage));
        assert!(e.starts_with(&garbage.display().to_string()), "{e}");

        // A leaf certificate with its own key: matching, but not a CA.
        let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let leaf = CertificateParams::new(vec!["leaf.example".to_owned()])
            .unwrap()
            .self_signed(&leaf_key)
            .unwrap();
        let (leaf_cert, leaf_key_path) = (dir.path().join("leaf.pem"), dir.path().join("leaf.key"));
        std::fs::write(&leaf_cert, leaf.pem()).unwrap();
        std::fs::write(&leaf_key_path, leaf_key.serialize_pem()).unwrap();
        let e = error_of(&files_config(state.path(), &leaf_cert, &leaf_key_path));
        assert!(
            e.starts_with(&leaf_cert.display().to_string()) && e.contains("not a CA"),
            "{e}"
        );
        let e = error_of(&CaConfig {
            trust_bundle: vec![leaf_cert.clone()],
            ..CaConfig::generated(state.path(), td())
        });
        assert!(e.contains("not a CA"), "a trust bundle holds CAs only: {e}");

        let e = error_of(&CaConfig {
            ca_cert: Some(cert),
            ..CaConfig::generated(state.path(), td())
        });
        assert!(e.contains("go together"), "{e}");
    }

    #[test]
    fn workload_certificate_carries_the_spiffe_id_and_chains_to_the_ca() {
        let state = tempfile::tempdir().unwrap();
        let ca = authority(state.path(), "prod.example");
        let id = SpiffeId::workload("prod.example", "shop", "api").unwrap();
        let issued = ca.issue(&id, Duration::from_secs(3600)).unwrap();
        assert_eq!(tls::spiffe_id_of(issued.leaf()).unwrap(), id);
        let (_, x509) = x509_parser::parse_x509_certificate(issued.leaf()).unwrap();
        let uris: Vec<String> = x509
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(uris, ["URI(spiffe://prod.example/ns/shop/sa/api)"]);
        assert!(!x509.is_ca());
        assert_eq!(x509.issuer().to_string(), ca.issuer_name());
        assert_eq!(
            x509.raw_serial_as_string().replace(':', "").to_uppercase(),
            issued.serial
        );
        let life = issued.not_after.duration_since(issued.issued_at).unwrap();
        assert!(
            life <= Duration::from_secs(3600) && life > Duration::from_secs(3598),
            "{life:?}"
        );
        tls::verify_chain(
            &ca.roots(),
            issued.leaf(),
            &issued.certified_key.cert[1..],
            rustls::pki_types::UnixTime::now(),
        )
        .unwrap();
        // Keys are fresh per certificate and stay in memory: nothing new on disk.
        let again = ca.issue(&id, Duration::from_secs(3600)).unwrap();
        assert_ne!(issued.serial, again.serial);
        assert_eq!(
            std::fs::read_dir(state.path().join("ca")).unwrap().count(),
            2
        );
        // Another trust domain's identity is not this CA's to issue.
        let foreign = SpiffeId::workload("other.example", "shop", "api").unwrap();
        assert!(ca.issue(&foreign, DEFAULT_CERT_TTL).is_err());
    }

    #[test]
    fn intermediate_ca_with_its_root_in_the_trust_bundle() {
        let root_dir = tempfile::tempdir().unwrap();
        authority(root_dir.path(), td());
        let (root_cert, root_key) = ca_files(root_dir.path());
        let root = Issuer::from_ca_cert_pem(
            &std::fs::read_to_string(&root_cert).unwrap(),
            KeyPair::from_pem(&std::fs::read_to_string(&root_key).unwrap()).unwrap(),
        )
        .unwrap();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "node intermediate");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        params.not_after = OffsetDateTime::now_utc() + time::Duration::days(30);
        let cert = params.signed_by(&key, &root).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (cert_path, key_path) = (dir.path().join("int.pem"), dir.path().join("int.key"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();

        // Without the root, the agent cannot know what peers trust: it trusts the issuer.
        let state = tempfile::tempdir().unwrap();
        let config = CaConfig {
            trust_bundle: vec![root_cert.clone()],
            ..files_config(state.path(), &cert_path, &key_path)
        };
        let ca = Authority::load_or_create(&config).unwrap();
        let issued = ca
            .issue(
                &SpiffeId::workload(td(), "a", "b").unwrap(),
                DEFAULT_CERT_TTL,
            )
            .unwrap();
        assert_eq!(issued.certified_key.cert.len(), 2, "leaf then intermediate");
        assert!(ca.issuer_name().contains("node intermediate"));
        // A node holding only the root verifies it.
        let root_only = authority(root_dir.path(), td());
        tls::verify_chain(
            &root_only.roots(),
            issued.leaf(),
            &issued.certified_key.cert[1..],
            rustls::pki_types::UnixTime::now(),
        )
        .expect("the chain through the intermediate reaches the root");

        // A trust bundle that does not contain the issuer's root is caught at start-up.
        let unrelated = tempfile::tempdir().unwrap();
        authority(unrelated.path(), td());
        let e = error_of(&CaConfig {
            trust_bundle: vec![ca_files(unrelated.path()).0],
            ..files_config(state.path(), &cert_path, &key_path)
        });
        assert!(
            e.starts_with(&cert_path.display().to_string()) && e.contains("--trust-bundle"),
            "{e}"
        );
    }

    #[test]
    fn trust_bundle_lets_an_old_and_a_new_root_overlap() {
        let (old, new) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        authority(old.path(), td());
        authority(new.path(), td());
        let state = tempfile::tempdir().unwrap();
        let (new_cert, new_key) = ca_files(new.path());
        // A node already on the new root still trusts the old one during the overlap.
        let rotated = Authority::load_or_create(&CaConfig {
            trust_bundle: vec![ca_files(old.path()).0],
            ..files_config(state.path(), &new_cert, &new_key)
        })
        .unwrap();
        assert_eq!(rotated.roots().len(), 2);
        let from_old = authority(old.path(), td())
            .issue(
                &SpiffeId::workload(td(), "a", "b").unwrap(),
                DEFAULT_CERT_TTL,
            )
            .unwrap();
        tls::verify_chain(
            &rotated.roots(),
            from_old.leaf(),
            &[],
            rustls::pki_types::UnixTime::now(),
        )
        .expect("the old root is still trusted");
    }
}
