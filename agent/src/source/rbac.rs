//! The Kubernetes API permissions the agent needs: the one list that `deploy/clusterrole.yaml`
//! must equal (a test in `agent/tests/deploy.rs` checks it, no more and no less) and that the
//! Kubernetes source must stay within (see [`allows`]).
//!
//! Least privilege: read what the watchers read; write only events (to report a policy that fails
//! on this node) and the `status` subresource of the policy kinds (server-side apply, one field
//! manager per node). No secrets, no configmaps, no writes to any spec.

/// One `ClusterRole` rule: every verb on every resource of one API group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rule {
    /// `""` for the core group.
    pub api_group: &'static str,
    /// Plural resource names; `name/status` is the status subresource.
    pub resources: &'static [&'static str],
    pub verbs: &'static [&'static str],
}

/// What a reflector (list + watch) and a one-off read need.
pub const READ: &[&str] = &["get", "list", "watch"];
/// Creating an event, or bumping the count of a repeated one.
pub const EVENT_WRITE: &[&str] = &["create", "patch"];
/// Server-side apply of the status subresource is a PATCH.
pub const STATUS_WRITE: &[&str] = &["patch"];

/// Every permission the agent uses, grouped as in `deploy/clusterrole.yaml`.
pub const RBAC: &[Rule] = &[
    // Pods (local endpoints and remote peers), namespaces (their labels are security labels),
    // nodes (addresses for remote-node), service accounts (identities).
    Rule {
        api_group: "",
        resources: &["pods", "namespaces", "nodes", "serviceaccounts"],
        verbs: READ,
    },
    Rule {
        api_group: "networking.k8s.io",
        resources: &["networkpolicies"],
        verbs: READ,
    },
    // Services and their endpoints: the ClusterIPs the cgroup programs translate.
    Rule {
        api_group: "",
        resources: &["services"],
        verbs: READ,
    },
    Rule {
        api_group: "discovery.k8s.io",
        resources: &["endpointslices"],
        verbs: READ,
    },
    Rule {
        api_group: "nodeward.io",
        resources: &[
            "meshpolicies",
            "clustermeshpolicies",
            "mutualtlses",
            "trafficpolicies",
        ],
        verbs: READ,
    },
    // Gateway API mesh routes (GAMMA), for the source agent's HTTP routing.
    Rule {
        api_group: "gateway.networking.k8s.io",
        resources: &["httproutes"],
        verbs: READ,
    },
    // Per-node policy status (see `policy::crd::PolicyStatus`).
    Rule {
        api_group: "nodeward.io",
        resources: &[
            "meshpolicies/status",
            "clustermeshpolicies/status",
            "trafficpolicies/status",
        ],
        verbs: STATUS_WRITE,
    },
    // An Event on a policy that fails to compile or apply on this node (core/v1 and
    // events.k8s.io/v1 Events are the same objects; the client may use either API).
    Rule {
        api_group: "",
        resources: &["events"],
        verbs: EVENT_WRITE,
    },
    Rule {
        api_group: "events.k8s.io",
        resources: &["events"],
        verbs: EVENT_WRITE,
    },
];

/// Whether [`RBAC`] allows `verb` on `resource` (plural, `name/status` for the subresource) of
/// `api_group` (`""` for core). The Kubernetes source's tests use it to check every request
/// they see is allowed by the shipped ClusterRole.
#[must_use]
pub fn allows(api_group: &str, resource: &str, verb: &str) -> bool {
    RBAC.iter().any(|r| {
        r.api_group == api_group && r.resources.contains(&resource) && r.verbs.contains(&verb)
    })
}

/// [`RBAC`] flattened to sorted `(apiGroup, resource, verb)` triples, for comparisons.
#[must_use]
pub fn triples() -> Vec<(String, String, String)> {
    let mut out: Vec<_> = RBAC
        .iter()
        .flat_map(|r| {
            r.resources.iter().flat_map(move |res| {
                r.verbs
                    .iter()
                    .map(move |v| (r.api_group.to_owned(), (*res).to_owned(), (*v).to_owned()))
            })
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_what_is_listed_and_nothing_else() {
        assert!(allows("", "pods", "watch"));
        assert!(allows("nodeward.io", "meshpolicies/status", "patch"));
        assert!(allows("events.k8s.io", "events", "create"));
        assert!(
            !allows("nodeward.io", "meshpolicies", "patch"),
            "spec is never written"
        );
        assert!(!allows("", "secrets", "get"));
        assert!(!allows("", "pods", "delete"));
        assert!(!allows("nodeward.io", "mutualtlses/status", "patch"));
        assert!(allows("discovery.k8s.io", "endpointslices", "watch"));
        assert!(!allows("", "services", "patch"));
        assert!(allows("gateway.networking.k8s.io", "httproutes", "watch"));
        assert!(allows("nodeward.io", "trafficpolicies/status", "patch"));
        // pods.., networkpolicies, services, endpointslices, nodeward.io kinds, httproutes,
        // status, events.
        assert_eq!(triples().len(), 4 * 3 + 3 + 3 + 3 + 4 * 3 + 3 + 3 + 2 + 2);
    }
}
