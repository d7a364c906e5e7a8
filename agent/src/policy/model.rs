//! The one internal policy model. NetworkPolicy, MeshPolicy and ClusterMeshPolicy all translate
//! into [`PolicyModel`]; the compiler reads nothing else.
//!
//! Everything here is already validated: CIDRs parse and excepts lie inside them, port ranges
//! are ordered, selectors are well formed.

use std::fmt;

use ipnet::IpNet;

pub use super::fqdn::FqdnMatch;
pub use super::selector::LabelSelector;
use super::selector::is_dns_label;
use crate::ca::SpiffeId;

/// The front end a policy came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PolicyKind {
    NetworkPolicy,
    MeshPolicy,
    ClusterMeshPolicy,
}

impl PolicyKind {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NetworkPolicy => "NetworkPolicy",
            Self::MeshPolicy => "MeshPolicy",
            Self::ClusterMeshPolicy => "ClusterMeshPolicy",
        }
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which object a policy (and so each of its rules) came from.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RuleOrigin {
    pub kind: PolicyKind,
    /// Empty for cluster-scoped kinds.
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for RuleOrigin {
    /// `NetworkPolicy prod/allow-web`, `ClusterMeshPolicy deny-world`: the form errors use.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// The pods a policy applies to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subject {
    /// `Some(ns)`: only pods of that namespace. `None`: any namespace (cluster-scoped policies).
    pub namespace: Option<String>,
    /// Over the pod's security labels (its labels plus the reserved `nodeward.io/*` ones).
    pub selector: LabelSelector,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    /// Traffic to the selected pod; peers are sources.
    Ingress,
    /// Traffic from the selected pod; peers are destinations.
    Egress,
}

impl Direction {
    /// `agent_common::DIR_INGRESS` or `DIR_EGRESS`.
    #[must_use]
    pub fn as_u8(self) -> u8 {
        match self {
            Self::Ingress => agent_common::DIR_INGRESS,
            Self::Egress => agent_common::DIR_EGRESS,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Action {
    Allow,
    /// Wins over any allow, from any policy.
    Deny,
}

/// Reserved peers, named as in Cilium.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Entity {
    /// Anything outside the cluster.
    World,
    /// The local node.
    Host,
    /// Every pod, node and unmanaged cluster address.
    Cluster,
    /// The other nodes.
    RemoteNode,
    KubeApiserver,
}

/// One peer of a rule. A rule's peers are alternatives (any one matches).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Peer {
    /// Every peer, inside or outside the cluster (identity 0).
    Any,
    /// Pods whose security labels match. Namespace scoping is already part of the selector
    /// (`nodeward.io/namespace`, `nodeward.io/ns-label.*`).
    Endpoints(LabelSelector),
    Entity(Entity),
    /// Addresses in `net` but in none of `except` (each inside `net`).
    Cidr {
        net: IpNet,
        except: Vec<IpNet>,
    },
    /// Sources whose certificate's SPIFFE ID matches: only traffic through the mTLS tunnel
    /// can match (ingress only).
    Principal(PrincipalMatch),
    /// Addresses the DNS proxy saw in an answer for a name this selects (egress only).
    Fqdn(FqdnMatch),
}

/// Which SPIFFE IDs a principal peer stands for. The compiler gives each distinct match its own
/// identity, which no address ever has: the kernel never matches it, the tunnel does when the
/// peer's certificate matches.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PrincipalMatch {
    /// This SPIFFE ID, as its URI (`spiffe://cluster.local/ns/shop/sa/api`).
    Exact(String),
    /// Every SPIFFE ID whose URI starts with this (`spiffe://cluster.local/ns/shop/`, written
    /// `spiffe://cluster.local/ns/shop/*`).
    Prefix(String),
    /// Every certificate of this namespace and service account. Its trust domain is not
    /// compared here: the TLS handshake only accepts the trusted ones.
    ServiceAccount { namespace: String, name: String },
}

impl PrincipalMatch {
    /// Whether a certificate with SPIFFE ID `id` is one of the peers this stands for.
    #[must_use]
    pub fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            Self::Exact(uri) => *uri == id.uri(),
            Self::Prefix(prefix) => id.uri().starts_with(prefix.as_str()),
            Self::ServiceAccount { namespace, name } => {
                id.namespace() == namespace && id.service_account() == name
            }
        }
    }
}

impl fmt::Display for PrincipalMatch {
    /// The form a policy writes it in (`spiffe://td/ns/shop/sa/api`, `spiffe://td/ns/shop/*`,
    /// `shop/api`), unique per match: also the label of its identity.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(uri) => f.write_str(uri),
            Self::Prefix(prefix) => write!(f, "{prefix}*"),
            Self::ServiceAccount { namespace, name } => write!(f, "{namespace}/{name}"),
        }
    }
}

/// Destination ports of a rule. Protocols are IP protocol numbers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortSpec {
    /// `first..=last` of one protocol (TCP, UDP or SCTP); `first >= 1`.
    Range { protocol: u8, first: u16, last: u16 },
    /// A named container port of one protocol: resolved on the destination pod (the endpoint
    /// itself for ingress, each peer pod for egress).
    Named { protocol: u8, name: String },
    /// Every port of one protocol; protocol 0 means every protocol.
    AllOf(u8),
}

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_SCTP: u8 = 132;

/// One rule. It matches a flow when some peer matches and some port spec matches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// Position in the source object, e.g. `ingress[0]`, `egressDeny[1]`.
    pub name: String,
    pub direction: Direction,
    pub action: Action,
    /// Empty: the rule matches no peer (it only has the side effect of its section, such as
    /// enabling default deny).
    pub peers: Vec<Peer>,
    /// Empty: every port of every protocol.
    pub ports: Vec<PortSpec>,
    /// `toPorts[].rules.dns`: `Some` when some port entry restricts the DNS names the
    /// selected pods may ask for through it (the union of the entries that do; empty refuses
    /// every name).
    pub dns: Option<Vec<FqdnMatch>>,
    /// `toPorts[].rules.http` (ingress allow rules): for each entry of `ports`, the HTTP
    /// requests its `toPorts` entry allows (`None`: every request). Empty when no entry has
    /// `rules.http`; otherwise as long as `ports`.
    pub port_http: Vec<Option<super::l7::HttpRules>>,
}

/// A policy after translation: whom it applies to, which directions it puts in default deny, and
/// its rules. Policies add up: a flow is allowed when some allow rule of some selecting policy
/// matches and no deny rule does; a direction no selecting policy enforces is open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyModel {
    pub origin: RuleOrigin,
    pub subject: Subject,
    /// Selected pods drop ingress that no rule allows.
    pub ingress_enforced: bool,
    pub egress_enforced: bool,
    pub rules: Vec<Rule>,
}

/// A policy that cannot be translated: which object, which field, what is wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct PolicyError {
    /// `NetworkPolicy prod/allow-web`.
    pub object: String,
    /// `spec.ingress[0].ports[1].endPort`; empty when the object as a whole is wrong.
    pub field: String,
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.object, self.message)
        } else {
            write!(f, "{}: {}: {}", self.object, self.field, self.message)
        }
    }
}

/// A field-level error before it knows its object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }

    #[must_use]
    pub fn in_object(self, object: &impl fmt::Display) -> PolicyError {
        PolicyError {
            object: object.to_string(),
            field: self.field,
            message: self.message,
        }
    }
}

/// Parses a CIDR and its excepts, checking that every except lies inside it. Paths name the
/// `cidr` field and the `except` list.
pub(crate) fn parse_cidr(
    cidr: &str,
    except: &[String],
    cidr_path: &str,
    except_path: &str,
) -> Result<Peer, FieldError> {
    let net: IpNet = cidr.parse().map_err(|_| {
        FieldError::new(
            cidr_path,
            format!("invalid CIDR {cidr:?} (expected e.g. 10.0.0.0/8 or fd00::/64)"),
        )
    })?;
    let net = net.trunc();
    let mut excepts = Vec::with_capacity(except.len());
    for (i, e) in except.iter().enumerate() {
        let field = format!("{except_path}[{i}]");
        let parsed: IpNet = e
            .parse()
            .map_err(|_| FieldError::new(&field, format!("invalid CIDR {e:?}")))?;
        let parsed = parsed.trunc();
        if !net.contains(&parsed) || parsed.prefix_len() <= net.prefix_len() {
            return Err(FieldError::new(
                field,
                format!("except {e} is not strictly inside {net}"),
            ));
        }
        excepts.push(parsed);
    }
    Ok(Peer::Cidr {
        net,
        except: excepts,
    })
}

/// Checks a numeric port (1..=65535).
pub(crate) fn check_port(port: i64, field: &str) -> Result<u16, FieldError> {
    u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| FieldError::new(field, format!("port {port} is not in 1..=65535")))
}

/// Checks a port name (IANA service name syntax, as Kubernetes does for container ports).
pub(crate) fn check_port_name(name: &str, field: &str) -> Result<(), FieldError> {
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 15
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b.iter().any(u8::is_ascii_lowercase)
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
        && !name.contains("--");
    if ok {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            format!(
                "invalid port name {name:?}: expected 1-15 lowercase alphanumerics or '-', with a letter, or a number"
            ),
        ))
    }
}

/// Parses a `fromPrincipals` entry: a SPIFFE ID, or a prefix of one ending in `*`.
pub(crate) fn parse_principal(principal: &str, field: &str) -> Result<PrincipalMatch, FieldError> {
    let invalid =
        |why: &str| FieldError::new(field, format!("invalid principal {principal:?}: {why}"));
    if !principal.starts_with("spiffe://") {
        return Err(invalid(
            "expected a SPIFFE ID (spiffe://<trust-domain>/ns/<namespace>/sa/<account>) or a prefix of one ending in '*'",
        ));
    }
    match principal.find('*') {
        Some(i) if i + 1 == principal.len() => {
            Ok(PrincipalMatch::Prefix(principal[..i].to_owned()))
        }
        Some(_) => Err(invalid("'*' may only be the last character")),
        None => principal
            .parse::<SpiffeId>()
            .map(|id| PrincipalMatch::Exact(id.uri()))
            .map_err(|e| invalid(&e.to_string())),
    }
}

/// Parses a `fromServiceAccounts` entry: `namespace/name`, or a bare `name` of `namespace` when
/// the policy has one.
pub(crate) fn parse_service_account(
    account: &str,
    namespace: Option<&str>,
    field: &str,
) -> Result<PrincipalMatch, FieldError> {
    let (ns, name) = match (account.split_once('/'), namespace) {
        (Some((ns, name)), _) => (ns, name),
        (None, Some(ns)) => (ns, account),
        (None, None) => {
            return Err(FieldError::new(
                field,
                format!(
                    "service account {account:?} has no namespace: a ClusterMeshPolicy names it as namespace/name"
                ),
            ));
        }
    };
    for (what, value) in [("namespace", ns), ("service account name", name)] {
        if !is_dns_label(value) {
            return Err(FieldError::new(
                field,
                format!(
                    "invalid {what} {value:?} in {account:?}: expected 1-63 lowercase alphanumerics or '-', starting and ending with an alphanumeric"
                ),
            ));
        }
    }
    Ok(PrincipalMatch::ServiceAccount {
        namespace: ns.to_owned(),
        name: name.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(uri: &str) -> SpiffeId {
        uri.parse().expect("test SPIFFE ID")
    }

    #[test]
    fn principals_match_exactly_by_prefix_or_by_service_account() {
        let exact = parse_principal("spiffe://cluster.local/ns/shop/sa/api", "f").expect("exact");
        assert!(exact.matches(&id("spiffe://cluster.local/ns/shop/sa/api")));
        assert!(!exact.matches(&id("spiffe://cluster.local/ns/shop/sa/api2")));
        assert!(!exact.matches(&id("spiffe://other.td/ns/shop/sa/api")));

        let prefix = parse_principal("spiffe://cluster.local/ns/shop/*", "f").expect("prefix");
        assert_eq!(
            prefix,
            PrincipalMatch::Prefix("spiffe://cluster.local/ns/shop/".into())
        );
        assert!(prefix.matches(&id("spiffe://cluster.local/ns/shop/sa/api")));
        assert!(!prefix.matches(&id("spiffe://cluster.local/ns/shopping/sa/api")));

        let sa = parse_service_account("shop/api", None, "f").expect("service account");
        assert!(sa.matches(&id("spiffe://cluster.local/ns/shop/sa/api")));
        assert!(
            sa.matches(&id("spiffe://other.td/ns/shop/sa/api")),
            "the trust domain is the handshake's business"
        );
        assert!(!sa.matches(&id("spiffe://cluster.local/ns/shop/sa/web")));
        assert!(!sa.matches(&id("spiffe://cluster.local/ns/other/sa/api")));
    }

    #[test]
    fn principals_display_as_written() {
        for written in [
            "spiffe://cluster.local/ns/shop/sa/api",
            "spiffe://cluster.local/ns/shop/*",
            "spiffe://*",
        ] {
            let m = parse_principal(written, "f").expect("valid");
            assert_eq!(m.to_string(), written);
        }
        let sa = parse_service_account("api", Some("shop"), "f").expect("bare name");
        assert_eq!(sa.to_string(), "shop/api");
    }

    #[test]
    fn invalid_principals_and_service_accounts_say_why() {
        let err = |r: Result<PrincipalMatch, FieldError>| r.expect_err("invalid").message;
        assert!(
            err(parse_principal("cluster.local/ns/a/sa/b", "f")).contains("expected a SPIFFE ID")
        );
        assert!(
            err(parse_principal("spiffe://cluster.local/ns/*/sa/b", "f"))
                .contains("last character")
        );
        assert!(err(parse_principal("spiffe://**", "f")).contains("last character"));
        assert!(
            err(parse_principal("spiffe://cluster.local/ns/a", "f")).contains("not a SPIFFE ID")
        );
        assert!(
            err(parse_principal("spiffe://cluster.local/ns/../sa/b", "f")).contains("namespace")
        );
        assert!(err(parse_service_account("api", None, "f")).contains("namespace/name"));
        assert!(err(parse_service_account("Shop/api", None, "f")).contains("namespace \"Shop\""));
        assert!(err(parse_service_account("shop/api/x", None, "f")).contains("\"api/x\""));
        assert!(err(parse_service_account("shop/", Some("x"), "f")).contains("name \"\""));
        assert_eq!(
            parse_service_account("other/api", Some("shop"), "f").expect("explicit namespace"),
            PrincipalMatch::ServiceAccount {
                namespace: "other".into(),
                name: "api".into()
            }
        );
    }
}
