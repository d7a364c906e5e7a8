//! SPIFFE IDs of Kubernetes workloads: `spiffe://<trust-domain>/ns/<namespace>/sa/<account>`,
//! the format Istio and ztunnel use, carried as the one URI SAN of a workload certificate.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The trust domain when none is configured (Kubernetes' default cluster domain, as Istio).
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// Namespace and service account of the node agent's own identity.
pub const AGENT_NAMESPACE: &str = "nodeward-system";
pub const AGENT_SERVICE_ACCOUNT: &str = "nodeward";

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeError {
    #[error(
        "{0:?} is not a SPIFFE ID (expected spiffe://<trust-domain>/ns/<namespace>/sa/<account>)"
    )]
    Format(String),
    #[error(
        "trust domain {0:?}: use lowercase letters, digits, '.', '-' and '_' (at most 255 characters)"
    )]
    TrustDomain(String),
    #[error("{what} {value:?}: use letters, digits, '.', '-' and '_' (not '.' or '..')")]
    Segment { what: &'static str, value: String },
}

/// A workload identity. Ordered and hashable so it can key the certificate cache.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

/// Checks a trust domain name (SPIFFE ID spec, section 2.1).
pub fn validate_trust_domain(td: &str) -> Result<(), SpiffeError> {
    let ok = !td.is_empty()
        && td.len() <= 255
        && td.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        });
    if ok {
        Ok(())
    } else {
        Err(SpiffeError::TrustDomain(td.to_owned()))
    }
}

fn validate_segment(what: &'static str, value: &str) -> Result<(), SpiffeError> {
    let ok = !value.is_empty()
        && value != "."
        && value != ".."
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(SpiffeError::Segment {
            what,
            value: value.to_owned(),
        })
    }
}

impl SpiffeId {
    /// The identity of a workload running as `namespace/service_account`.
    pub fn workload(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeError> {
        validate_trust_domain(trust_domain)?;
        validate_segment("namespace", namespace)?;
        validate_segment("service account", service_account)?;
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        })
    }

    /// The node agent's own identity (the HBONE server presents it, as ztunnel in node mode).
    pub fn agent(trust_domain: &str) -> Result<Self, SpiffeError> {
        Self::workload(trust_domain, AGENT_NAMESPACE, AGENT_SERVICE_ACCOUNT)
    }

    #[must_use]
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    #[must_use]
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    #[must_use]
    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    /// The URI form, as it appears in the certificate.
    #[must_use]
    pub fn uri(&self) -> String {
        self.to_string()
    }
}

/// The identity of a pod: its namespace and service account (`default` when the spec names
/// none, as Kubernetes fills it in).
pub fn pod_identity(
    trust_domain: &str,
    namespace: &str,
    pod: &k8s_openapi::api::core::v1::Pod,
) -> Result<SpiffeId, SpiffeError> {
    let account = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.as_deref())
        .filter(|a| !a.is_empty())
        .unwrap_or("default");
    SpiffeId::workload(trust_domain, namespace, account)
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let format = || SpiffeError::Format(s.to_owned());
        let rest = s.strip_prefix("spiffe://").ok_or_else(format)?;
        let mut parts = rest.split('/');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some(td), Some("ns"), Some(ns), Some("sa"), Some(sa), None) => {
                Self::workload(td, ns, sa)
            }
            _ => Err(format()),
        }
    }
}

impl Serialize for SpiffeId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SpiffeId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_ids_round_trip_through_their_uri() {
        let id = SpiffeId::workload("cluster.local", "shop", "api").unwrap();
        assert_eq!(id.uri(), "spiffe://cluster.local/ns/shop/sa/api");
        assert_eq!(id.uri().parse::<SpiffeId>().unwrap(), id);
        assert_eq!(
            SpiffeId::agent("cluster.local").unwrap().uri(),
            "spiffe://cluster.local/ns/nodeward-system/sa/nodeward"
        );
    }

    #[test]
    fn a_pod_is_its_namespace_and_service_account() {
        let mut pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(
            serde_json::json!({"metadata": {"name": "p"}, "spec": {"containers": [], "serviceAccountName": "api"}}),
        )
        .unwrap();
        let id = pod_identity("cluster.local", "shop", &pod).unwrap();
        assert_eq!(id.uri(), "spiffe://cluster.local/ns/shop/sa/api");
        pod.spec.as_mut().unwrap().service_account_name = None;
        let id = pod_identity("cluster.local", "shop", &pod).unwrap();
        assert_eq!(id.service_account(), "default");
    }

    #[test]
    fn malformed_ids_are_refused() {
        for bad in [
            "http://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a",
            "spiffe://cluster.local/ns/a/sa/b/extra",
            "spiffe://cluster.local/sa/b/ns/a",
            "spiffe://Cluster.Local/ns/a/sa/b",
            "spiffe:///ns/a/sa/b",
            "spiffe://cluster.local/ns/../sa/b",
            "spiffe://cluster.local/ns/a/sa/",
            "spiffe://cluster.local/ns/a b/sa/c",
        ] {
            assert!(
                bad.parse::<SpiffeId>().is_err(),
                "{bad} should not parse as a SPIFFE ID"
            );
        }
    }
}
