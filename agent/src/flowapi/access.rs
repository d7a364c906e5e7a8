//! Who may read flows on the flows port (`--flows-allow`): identities as policies name them.

use std::fmt;

use crate::ca::SpiffeId;
use crate::ca::spiffe::{AGENT_NAMESPACE, AGENT_SERVICE_ACCOUNT};
use crate::policy::model::{PrincipalMatch, parse_principal, parse_service_account};

/// The service account of people and tools that read flows from outside a node.
pub const OBSERVER_SERVICE_ACCOUNT: &str = "nodeward-observer";

/// The default `--flows-allow`: the agents themselves and the observer service account.
#[must_use]
pub fn default_allow() -> Vec<String> {
    vec![
        format!("{AGENT_NAMESPACE}/{AGENT_SERVICE_ACCOUNT}"),
        format!("{AGENT_NAMESPACE}/{OBSERVER_SERVICE_ACCOUNT}"),
    ]
}

/// The observer identity of a trust domain (`spiffe://<td>/ns/nodeward-system/sa/nodeward-observer`).
///
/// # Errors
/// The trust domain is not a valid one.
pub fn observer(trust_domain: &str) -> Result<SpiffeId, crate::ca::SpiffeError> {
    SpiffeId::workload(trust_domain, AGENT_NAMESPACE, OBSERVER_SERVICE_ACCOUNT)
}

#[derive(Debug, thiserror::Error)]
#[error("--flows-allow {entry:?}: {reason}")]
pub struct AllowError {
    entry: String,
    reason: String,
}

/// Client identities allowed to read flows. Clients only reach this check with a certificate
/// the mesh's trust roots accept for the agent's own trust domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowList(Vec<PrincipalMatch>);

impl AllowList {
    /// Parses `--flows-allow` entries: a SPIFFE ID, a prefix of one ending in `*`, or
    /// `namespace/serviceaccount` (in the agent's trust domain).
    ///
    /// # Errors
    /// An entry that is none of those, one of another trust domain (no client could match
    /// it), or no entry at all.
    pub fn parse(entries: &[String], trust_domain: &str) -> Result<Self, AllowError> {
        let mut out = Vec::new();
        for entry in entries.iter().map(|e| e.trim()) {
            let fail = |reason: String| AllowError {
                entry: entry.to_owned(),
                reason,
            };
            let parsed = if entry.starts_with("spiffe://") {
                let m = parse_principal(entry, "--flows-allow").map_err(|e| fail(e.message))?;
                let own = format!("spiffe://{trust_domain}/");
                let uri = match &m {
                    PrincipalMatch::Exact(uri) | PrincipalMatch::Prefix(uri) => uri.as_str(),
                    PrincipalMatch::ServiceAccount { .. } => own.as_str(),
                };
                if !uri.starts_with(&own) && !own.starts_with(uri) {
                    return Err(fail(format!(
                        "not in the agent's trust domain {trust_domain} (--trust-domain): no client certificate could match it"
                    )));
                }
                m
            } else if !entry.contains('/') {
                return Err(fail(
                    "expected a SPIFFE ID (spiffe://<trust-domain>/ns/<namespace>/sa/<account>), a prefix of one ending in '*', or namespace/serviceaccount".into(),
                ));
            } else {
                parse_service_account(entry, None, "--flows-allow").map_err(|e| {
                    fail(format!(
                        "{}; expected a SPIFFE ID, a prefix of one ending in '*', or namespace/serviceaccount",
                        e.message
                    ))
                })?
            };
            out.push(parsed);
        }
        if out.is_empty() {
            return Err(AllowError {
                entry: String::new(),
                reason: "no identity: give at least one (the default is the agents and nodeward-observer)".into(),
            });
        }
        Ok(Self(out))
    }

    #[must_use]
    pub fn allows(&self, id: &SpiffeId) -> bool {
        self.0.iter().any(|m| m.matches(id))
    }
}

impl fmt::Display for AllowList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, m) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{m}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TD: &str = "cluster.local";

    fn id(ns: &str, sa: &str) -> SpiffeId {
        SpiffeId::workload(TD, ns, sa).unwrap()
    }

    #[test]
    fn the_default_allows_the_agents_and_the_observer_only() {
        let allow = AllowList::parse(&default_allow(), TD).unwrap();
        assert!(allow.allows(&SpiffeId::agent(TD).unwrap()));
        assert!(allow.allows(&observer(TD).unwrap()));
        assert!(!allow.allows(&id("nodeward-system", "default")));
        assert!(!allow.allows(&id("data", "nodeward-observer")));
        assert!(!allow.allows(&id("frontend", "web")));
        assert_eq!(
            allow.to_string(),
            "nodeward-system/nodeward, nodeward-system/nodeward-observer"
        );
    }

    #[test]
    fn spiffe_ids_and_prefixes_are_accepted() {
        let allow = AllowList::parse(
            &[
                "spiffe://cluster.local/ns/ops/sa/relay".into(),
                "spiffe://cluster.local/ns/monitoring/*".into(),
            ],
            TD,
        )
        .unwrap();
        assert!(allow.allows(&id("ops", "relay")));
        assert!(!allow.allows(&id("ops", "relay2")));
        assert!(allow.allows(&id("monitoring", "grafana")));
        assert!(!allow.allows(&id("nodeward-system", "nodeward-observer")));
    }

    #[test]
    fn bad_entries_name_the_flag_and_the_entry() {
        let err = |entries: &[&str]| {
            AllowList::parse(
                &entries.iter().map(|e| (*e).to_owned()).collect::<Vec<_>>(),
                TD,
            )
            .unwrap_err()
            .to_string()
        };
        let e = err(&["observer"]);
        assert!(e.starts_with("--flows-allow \"observer\": "), "{e}");
        assert!(e.contains("namespace/serviceaccount"), "{e}");
        let e = err(&["spiffe://other.domain/ns/a/sa/b"]);
        assert!(
            e.contains("not in the agent's trust domain cluster.local"),
            "{e}"
        );
        let e = err(&["spiffe://cluster.local/ns/*/sa/b"]);
        assert!(e.contains("'*' may only be the last character"), "{e}");
        assert!(err(&[]).contains("no identity"));
    }
}
