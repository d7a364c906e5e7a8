//! The compiler's output: plain data that the datapath sync turns into map entries and the
//! tunnel consults (through [`super::evaluate()`]). Produced by [`super::compile()`], consumed by
//! `datapath::sync`.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use super::fqdn::FqdnMatch;
use super::model::PrincipalMatch;

/// Namespace and name of a pod (or any namespaced object).
#[derive(
    Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One (peer identity, direction, protocol) slice of an endpoint's policy. Identity 0 and
/// protocol 0 are wildcards.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SliceKey {
    pub peer_identity: u32,
    /// `agent_common::DIR_INGRESS` or `DIR_EGRESS`.
    pub direction: u8,
    /// IP protocol number; 0 = any protocol (then the only entry has `prefix_len` 0).
    pub protocol: u8,
}

/// A port prefix with its verdict. Within one slice the prefixes are disjoint (the compiler has
/// already let deny win over allow), so a longest-prefix match can never hide a deny.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortEntry {
    pub port: u16,
    /// 0..=16 bits of `port` that must match; 0 = every port.
    pub prefix_len: u8,
    /// `agent_common::POLICY_ALLOW` or `POLICY_DENY`.
    pub verdict: u8,
    pub rule_id: u32,
}

/// A pod's place in the mTLS mesh, from its `MutualTLS` mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum MeshMode {
    /// Not in the mesh (`DISABLE`): plaintext only, under L3/L4 policy.
    #[default]
    Off,
    /// In the mesh, and plaintext is accepted too (`PERMISSIVE`).
    Permissive,
    /// In the mesh, and only the tunnel may reach it with TCP (`STRICT`).
    Strict,
}

impl MeshMode {
    /// Whether traffic between two pods of these modes is tunnelled (both in the mesh).
    #[must_use]
    pub fn meshed(self) -> bool {
        self != Self::Off
    }
}

/// Everything the datapath needs for one local endpoint (a pod on this node).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointPolicy {
    pub identity: u32,
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
    /// `Some(rule id of the selecting policy)` when some policy selects the pod for ingress, so
    /// what no rule allows is dropped.
    pub ingress_default_deny: Option<u32>,
    pub egress_default_deny: Option<u32>,
    pub slices: BTreeMap<SliceKey, Vec<PortEntry>>,
    /// Filled in after compilation from the pod's `MutualTLS` mode.
    pub mesh: MeshMode,
    /// `Some` when a selecting policy has `toFQDNs` or `rules.dns`: the pod's DNS goes through
    /// the agent's DNS proxy, which learns the answers and refuses names not allowed.
    pub dns: Option<DnsAllow>,
    /// Empty unless an ingress allow rule selecting the pod has `rules.http`; then every
    /// ingress allow of the pod's rules, with the requests it allows (see
    /// [`super::evaluate::http_rules`]).
    pub http_ingress: Vec<HttpAllow>,
}

/// An ingress allow (peer identity, protocol, ports) and the HTTP requests it allows: `None`
/// for every request (a rule without `rules.http`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpAllow {
    pub peer_identity: u32,
    /// 0: every protocol.
    pub protocol: u8,
    pub first: u16,
    pub last: u16,
    pub rule_id: u32,
    pub http: Option<super::l7::HttpRules>,
}

/// Which names a proxied pod may ask for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DnsAllow {
    /// Every name (no selecting rule has `rules.dns`).
    Any,
    /// Only names some of these select (the union of the selecting rules' `rules.dns`).
    Only(Vec<FqdnMatch>),
}

impl DnsAllow {
    /// Whether a query for `name` (normalized) is allowed.
    #[must_use]
    pub fn allows(&self, name: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Only(list) => list.iter().any(|m| m.matches(name)),
        }
    }
}

impl EndpointPolicy {
    /// Number of policy map entries this endpoint needs.
    #[must_use]
    pub fn entry_count(&self) -> usize {
        self.slices.values().map(Vec::len).sum()
    }
}

/// Where a rule id came from, for flows, status and logs.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RuleInfo {
    /// `NetworkPolicy`, `MeshPolicy` or `ClusterMeshPolicy`.
    pub kind: String,
    /// Empty for cluster-scoped kinds.
    pub namespace: String,
    pub name: String,
    /// e.g. `ingress[0]`, `egressDeny[1]`, or `default-deny` for the selection itself.
    pub rule: String,
}

impl RuleInfo {
    /// `kind/namespace/name` (or `kind/name` when cluster scoped).
    #[must_use]
    pub fn policy(&self) -> String {
        policy_label(&self.kind, &self.namespace, &self.name)
    }
}

/// `kind/namespace/name`, or `kind/name` when `namespace` is empty (cluster scoped): how a
/// policy is named in status, flows and metrics.
#[must_use]
pub fn policy_label(kind: &str, namespace: &str, name: &str) -> String {
    if namespace.is_empty() {
        format!("{kind}/{name}")
    } else {
        format!("{kind}/{namespace}/{name}")
    }
}

/// The whole compiled state for one node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompiledState {
    /// Local endpoints: pods whose `spec.nodeName` is this node and which have an IP.
    pub endpoints: BTreeMap<ObjectRef, EndpointPolicy>,
    /// Prefix to identity: every pod IP (/32, /128), node addresses (host or remote-node).
    pub ipcache: BTreeMap<IpNet, u32>,
    /// Prefix to CIDR identity: every CIDR and `except` prefix named by a policy.
    pub policy_cidrs: BTreeMap<IpNet, u32>,
    /// Principal peer to its identity: every `fromPrincipals` and `fromServiceAccounts` entry.
    /// No ipcache entry maps to one, so the kernel never matches their slices; the tunnel adds
    /// the ones the peer's certificate matches (see [`CompiledState::principal_identities`]).
    pub principals: BTreeMap<PrincipalMatch, u32>,
    /// Rule id to its origin.
    pub rules: BTreeMap<u32, RuleInfo>,
    /// FQDN identity to the `toFQDNs` selectors it satisfies. An address the DNS proxy learned
    /// for names that some policy's selectors match gets the identity of exactly that set of
    /// selectors (so addresses with the same selectors share one), as a host entry in
    /// `ipcache` unless a pod or node has the address.
    pub fqdn_identities: BTreeMap<u32, std::collections::BTreeSet<FqdnMatch>>,
}
