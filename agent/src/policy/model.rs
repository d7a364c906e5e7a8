//! The one internal policy model. NetworkPolicy, MeshPolicy and ClusterMeshPolicy all translate
//! into [`PolicyModel`]; the compiler reads nothing else.
//!
//! Everything here is already validated: CIDRs parse and excepts lie inside them, port ranges
//! are ordered, selectors are well formed.

use std::fmt;

use ipnet::IpNet;

pub use super::selector::LabelSelector;

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
#[derive(Clone, Debug, PartialEq, Eq)]
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
