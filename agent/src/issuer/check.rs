//! The issuer's checks, as plain data in and out: what a CSR asks for, whether the asking node
//! may have it, and how often a node may ask.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use rcgen::{CertificateSigningRequestParams, IsCa, SanType};

use crate::ca::spiffe::{AGENT_NAMESPACE, AGENT_SERVICE_ACCOUNT};
use crate::ca::{SpiffeError, SpiffeId};

/// Why the issuer refused a request. Each is logged with the node and counted by
/// [`Refusal::result`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refusal {
    #[error("not authenticated: {0}")]
    Unauthenticated(String),
    #[error("the CSR: {0}")]
    BadCsr(String),
    #[error("{identity} is not the identity of any pod scheduled on node {node}")]
    NotOnNode { node: String, identity: String },
    #[error("node {node} asks too often (more than {burst} requests at {per_second}/s)")]
    RateLimited {
        node: String,
        burst: u32,
        per_second: f64,
    },
    #[error("the issuer cannot answer now: {0}")]
    Unavailable(String),
}

impl Refusal {
    /// The `result` label of `nodeward_issuer_csr_total`.
    #[must_use]
    pub fn result(&self) -> &'static str {
        match self {
            Self::Unauthenticated(_) => "unauthenticated",
            Self::BadCsr(_) => "bad_csr",
            Self::NotOnNode { .. } => "not_on_node",
            Self::RateLimited { .. } => "rate_limited",
            Self::Unavailable(_) => "unavailable",
        }
    }

    /// The HTTP status the issuer answers with.
    #[must_use]
    pub fn status(&self) -> u16 {
        match self {
            Self::Unauthenticated(_) => 401,
            Self::BadCsr(_) => 400,
            Self::NotOnNode { .. } => 403,
            Self::RateLimited { .. } => 429,
            Self::Unavailable(_) => 503,
        }
    }
}

/// A CSR that passed the shape checks: its signature is valid, it asks for exactly one SAN, a
/// SPIFFE ID of our trust domain, and not for a CA.
#[derive(Debug)]
pub struct CheckedCsr {
    pub identity: SpiffeId,
    pub public_key: rcgen::PublicKey,
}

/// Parses a PEM CSR and checks its shape. What the issuer signs is built from the identity and
/// the public key alone, never from the request's other fields; the checks refuse (rather than
/// silently drop) what a well-behaved agent never asks for.
///
/// # Errors
/// [`Refusal::BadCsr`] naming what is wrong.
pub fn check_csr(pem: &str, trust_domain: &str) -> Result<CheckedCsr, Refusal> {
    let bad = |m: String| Refusal::BadCsr(m);
    let csr = CertificateSigningRequestParams::from_pem(pem)
        .map_err(|e| bad(format!("not a valid signed PKCS#10 request: {e}")))?;
    if matches!(csr.params.is_ca, IsCa::Ca(_)) {
        return Err(bad("asks for a CA certificate".into()));
    }
    let uri = match csr.params.subject_alt_names.as_slice() {
        [SanType::URI(uri)] => uri.as_str().to_owned(),
        [] => return Err(bad("has no SAN; expected exactly one SPIFFE ID".into())),
        [_] => return Err(bad("its one SAN is not a URI".into())),
        many => {
            return Err(bad(format!(
                "has {} SANs; expected exactly one SPIFFE ID",
                many.len()
            )));
        }
    };
    let identity: SpiffeId = uri
        .parse()
        .map_err(|e: SpiffeError| bad(format!("{uri}: {e}")))?;
    if identity.trust_domain() != trust_domain {
        return Err(bad(format!(
            "{identity} is not of trust domain {trust_domain}"
        )));
    }
    Ok(CheckedCsr {
        identity,
        public_key: csr.public_key,
    })
}

/// Whether the agent of `node` may have a certificate for `identity`: a pod the API shows
/// scheduled on `node`, in the identity's namespace, running as its service account, and not
/// finished. The node agent's own identity is a pod on that node like any other (the agent's
/// DaemonSet pod). Returns the pod's name.
///
/// # Errors
/// [`Refusal::NotOnNode`].
pub fn authorize<'a>(
    node: &str,
    identity: &SpiffeId,
    pods: impl IntoIterator<Item = &'a Pod>,
) -> Result<String, Refusal> {
    for pod in pods {
        let Some(spec) = &pod.spec else { continue };
        if spec.node_name.as_deref() != Some(node) {
            continue;
        }
        if pod.metadata.namespace.as_deref().unwrap_or("default") != identity.namespace() {
            continue;
        }
        let account = spec
            .service_account_name
            .as_deref()
            .filter(|a| !a.is_empty())
            .unwrap_or("default");
        if account != identity.service_account() {
            continue;
        }
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if matches!(phase, Some("Succeeded" | "Failed")) {
            continue;
        }
        return Ok(pod.metadata.name.clone().unwrap_or_default());
    }
    Err(Refusal::NotOnNode {
        node: node.to_owned(),
        identity: identity.uri(),
    })
}

/// Whether `identity` is the node agent's own.
#[must_use]
pub fn is_agent(identity: &SpiffeId) -> bool {
    identity.namespace() == AGENT_NAMESPACE && identity.service_account() == AGENT_SERVICE_ACCOUNT
}

/// A token bucket per node: `burst` requests at once, refilled at `per_second`. An agent asks
/// once per local workload and renewal, so a node far above that is broken or hostile.
#[derive(Debug)]
pub struct RateLimiter {
    burst: f64,
    per_second: f64,
    buckets: HashMap<String, (f64, Instant)>,
}

impl RateLimiter {
    #[must_use]
    pub fn new(burst: u32, per_second: f64) -> Self {
        Self {
            burst: f64::from(burst),
            per_second,
            buckets: HashMap::new(),
        }
    }

    /// Takes one request of `node` at `now`.
    ///
    /// # Errors
    /// [`Refusal::RateLimited`] when the node's bucket is empty.
    pub fn take(&mut self, node: &str, now: Instant) -> Result<(), Refusal> {
        let (burst, rate) = (self.burst, self.per_second);
        let (tokens, last) = self.buckets.entry(node.to_owned()).or_insert((burst, now));
        let elapsed = now.saturating_duration_since(*last);
        *tokens = (*tokens + elapsed.as_secs_f64() * rate).min(burst);
        *last = now;
        if *tokens < 1.0 {
            #[expect(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "burst came from a u32"
            )]
            return Err(Refusal::RateLimited {
                node: node.to_owned(),
                burst: burst as u32,
                per_second: rate,
            });
        }
        *tokens -= 1.0;
        Ok(())
    }

    /// Forgets nodes that have been quiet long enough to be full again (bounded memory).
    pub fn prune(&mut self, now: Instant) {
        let full_after = Duration::from_secs_f64(self.burst / self.per_second.max(1e-9));
        self.buckets
            .retain(|_, (_, last)| now.saturating_duration_since(*last) < full_after);
    }
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, KeyPair};

    use super::*;

    const TD: &str = "cluster.local";

    fn csr(sans: Vec<SanType>, ca: bool) -> String {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        if ca {
            params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        }
        params.serialize_request(&key).unwrap().pem().unwrap()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    fn refused(pem: &str, why: &str) {
        match check_csr(pem, TD) {
            Ok(c) => panic!("expected a refusal ({why}), got a CSR for {}", c.identity),
            Err(e) => assert!(
                e.to_string().contains(why) && e.result() == "bad_csr",
                "refused, but not because {why:?}: {e}"
            ),
        }
    }

    #[test]
    fn a_csr_for_one_spiffe_id_passes_and_extra_sans_or_a_ca_flag_do_not() {
        let good = check_csr(
            &csr(vec![uri("spiffe://cluster.local/ns/shop/sa/api")], false),
            TD,
        )
        .unwrap();
        assert_eq!(
            good.identity,
            SpiffeId::workload(TD, "shop", "api").unwrap()
        );
        refused(
            &csr(
                vec![
                    uri("spiffe://cluster.local/ns/shop/sa/api"),
                    SanType::DnsName("api.shop".try_into().unwrap()),
                ],
                false,
            ),
            "has 2 SANs",
        );
        refused(
            &csr(
                vec![
                    uri("spiffe://cluster.local/ns/shop/sa/api"),
                    uri("spiffe://cluster.local/ns/shop/sa/db"),
                ],
                false,
            ),
            "has 2 SANs",
        );
        refused(
            &csr(vec![uri("spiffe://cluster.local/ns/shop/sa/api")], true),
            "asks for a CA",
        );
        refused(&csr(vec![], false), "has no SAN");
        refused(
            &csr(vec![SanType::DnsName("api".try_into().unwrap())], false),
            "not a URI",
        );
        refused(
            &csr(vec![uri("spiffe://other.example/ns/shop/sa/api")], false),
            "not of trust domain cluster.local",
        );
        refused(&csr(vec![uri("https://example.com/")], false), "https://");
        refused("not a CSR", "not a valid signed PKCS#10 request");
        // A request whose signature does not match its key (the body altered in flight).
        let mut tampered = csr(vec![uri("spiffe://cluster.local/ns/shop/sa/api")], false);
        let der = pem::parse(&tampered).unwrap();
        let mut bytes = der.contents().to_vec();
        let last = bytes.len() - 5;
        bytes[last] ^= 0x55;
        tampered = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", bytes));
        refused(&tampered, "not a valid signed PKCS#10 request");
    }

    fn pod(ns: &str, name: &str, node: &str, sa: &str, phase: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": ns},
            "spec": {"nodeName": node, "serviceAccountName": sa, "containers": []},
            "status": {"phase": phase},
        }))
        .unwrap()
    }

    #[test]
    fn only_a_running_pod_on_the_asking_node_with_that_account_is_authorized() {
        let pods = [
            pod("shop", "api-0", "node-1", "api", "Running"),
            pod("shop", "db-0", "node-2", "db", "Running"),
            pod("shop", "old-0", "node-1", "old", "Succeeded"),
        ];
        let id = |sa: &str| SpiffeId::workload(TD, "shop", sa).unwrap();
        assert_eq!(authorize("node-1", &id("api"), &pods).unwrap(), "api-0");
        // A pod of another node.
        let e = authorize("node-1", &id("db"), &pods).unwrap_err();
        assert_eq!(e.result(), "not_on_node");
        assert!(e.to_string().contains("node-1"), "{e}");
        assert!(authorize("node-2", &id("db"), &pods).is_ok());
        // No pod runs as that account.
        assert!(authorize("node-1", &id("web"), &pods).is_err());
        // The right account in another namespace.
        let other_ns = SpiffeId::workload(TD, "other", "api").unwrap();
        assert!(authorize("node-1", &other_ns, &pods).is_err());
        // A finished pod no longer counts.
        assert!(authorize("node-1", &id("old"), &pods).is_err());
    }

    #[test]
    fn a_flooding_node_is_limited_and_others_are_not() {
        let mut limiter = RateLimiter::new(3, 1.0);
        let t0 = Instant::now();
        for _ in 0..3 {
            limiter.take("node-1", t0).unwrap();
        }
        let e = limiter.take("node-1", t0).unwrap_err();
        assert_eq!(e.result(), "rate_limited");
        limiter
            .take("node-2", t0)
            .expect("another node has its own bucket");
        // One second later, one more.
        limiter
            .take("node-1", t0 + Duration::from_secs(1))
            .expect("refilled");
        assert!(limiter.take("node-1", t0 + Duration::from_secs(1)).is_err());
        limiter.prune(t0 + Duration::from_secs(60));
        assert!(limiter.buckets.is_empty(), "quiet nodes are forgotten");
    }
}
