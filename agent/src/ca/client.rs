//! Client certificates for programs outside the agent, such as `nodeward observe --node` reading
//! flows from the agents' flows port (`nodeward ca-issue`).
//!
//! They differ from workload certificates on purpose: extended key usage `clientAuth` only, so
//! a leaked observer certificate can read flows but never act as a server (an agent, or a
//! workload behind the tunnel); and their key is written out as PEM, since the client that uses
//! them is another process.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
    SanType, SerialNumber,
};
use time::OffsetDateTime;

use super::{
    Authority, BACKDATE, CaError, SpiffeId, create_private_dir, random_serial, write_atomically,
};

/// File names `nodeward ca-issue` writes and `nodeward observe --tls-dir` reads.
pub const CLIENT_CERT_FILE: &str = "cert.pem";
pub const CLIENT_KEY_FILE: &str = "key.pem";
pub const CLIENT_CA_FILE: &str = "ca.pem";

/// A client certificate, its chain and its new key, as PEM.
#[derive(Clone)]
pub struct ClientPem {
    pub identity: SpiffeId,
    /// The leaf, then the issuing CA's chain (without a self-signed root).
    pub cert_chain: String,
    pub key: String,
    pub not_after: SystemTime,
}

impl std::fmt::Debug for ClientPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientPem")
            .field("identity", &self.identity)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Authority {
    /// Signs a new key for `identity` as a client-only certificate valid for `ttl`.
    ///
    /// # Errors
    /// The identity is not of this CA's trust domain, or signing fails.
    pub fn issue_client(&self, identity: &SpiffeId, ttl: Duration) -> Result<ClientPem, CaError> {
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
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| fail(format!("generating a key: {e}")))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            identity
                .uri()
                .try_into()
                .map_err(|e| fail(format!("the SPIFFE ID as a SAN: {e}")))?,
        )];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(SerialNumber::from_slice(&random_serial().map_err(fail)?));
        let now = SystemTime::now();
        let not_after = now + ttl;
        params.not_before = OffsetDateTime::from(now - BACKDATE);
        params.not_after = OffsetDateTime::from(not_after);
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| fail(format!("signing: {e}")))?;
        let mut cert_chain = cert.pem();
        for c in &self.chain {
            cert_chain.push_str(&pem(c));
        }
        Ok(ClientPem {
            identity: identity.clone(),
            cert_chain,
            key: key.serialize_pem(),
            not_after,
        })
    }
}

/// PEM text of one DER certificate.
fn pem(der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new("CERTIFICATE", der),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

/// Writes `cert.pem`, `key.pem` (mode 0600) and `ca.pem` (the trust roots given) into `dir`
/// (created with mode 0700), each atomically; replaces what was there (a renewal).
///
/// # Errors
/// A file cannot be written.
pub fn write_files(dir: &Path, client: &ClientPem, ca_pem: &[u8]) -> Result<[PathBuf; 3], CaError> {
    create_private_dir(dir)?;
    let paths = [
        dir.join(CLIENT_CERT_FILE),
        dir.join(CLIENT_KEY_FILE),
        dir.join(CLIENT_CA_FILE),
    ];
    // Key first: a certificate on disk always has its key beside it.
    write_atomically(&paths[1], client.key.as_bytes(), 0o600)?;
    write_atomically(&paths[0], client.cert_chain.as_bytes(), 0o644)?;
    write_atomically(&paths[2], ca_pem, 0o644)?;
    Ok(paths)
}
