//! The `nodeward.io/v1alpha1` CRDs: `MeshPolicy` (namespaced), `ClusterMeshPolicy` (cluster
//! scoped) and `MutualTLS` (namespaced). The two policy kinds have the same spec; the Rust types
//! are the source of truth for the schemas in `policies/crds/` and `deploy/crds.yaml`
//! (regenerate with `cargo run -p nodeward -- crd --write policies/crds` and
//! `cargo run -p nodeward -- crd > deploy/crds.yaml`, or `NODEWARD_UPDATE_CRDS=1 cargo test -p
//! nodeward crd`).
//!
//! The schemas reject at admission what the compiler would reject (enums, port numbers and
//! names, `endPort` without a numeric `port`, CIDR syntax, selector operators and their values,
//! label values, required fields), so `kubectl apply` fails early. What a structural schema
//! cannot express without CEL (`endPort` below `port`, an `except` outside its `cidr`, label key
//! syntax, a ClusterMeshPolicy's `fromServiceAccounts` entry without a namespace, since both
//! policy kinds share one rule type) is still checked by the agent, which reports it on the
//! object.
//!
//! The policy kinds have a `status` subresource written by the agents, each with its own
//! server-side-apply field manager, so agents never overwrite each other: see [`PolicyStatus`].
//!
//! Semantics (Cilium's, where Cilium has one):
//!
//! - `endpointSelector` selects the pods the policy applies to; in a MeshPolicy, only pods of its
//!   namespace. An empty selector selects every such pod.
//! - Selectors match a pod's labels plus reserved labels: `nodeward.io/namespace` (the pod's
//!   namespace), `nodeward.io/ns-label.<key>` (its namespace's labels, including
//!   `kubernetes.io/metadata.name`) and `nodeward.io/serviceaccount`.
//! - In a MeshPolicy, a peer selector that constrains neither `nodeward.io/namespace` nor any
//!   `nodeward.io/ns-label.*` key means pods of the policy's own namespace. In a
//!   ClusterMeshPolicy it means pods of every namespace.
//! - Within a rule, the peer fields (`fromEndpoints`, `fromEntities`, `fromCIDRSet`,
//!   `fromPrincipals`, `fromServiceAccounts`) are alternatives, and `toPorts` restricts the
//!   ports. A rule with `toPorts` but no peer field applies to every peer (an L4-only rule). A
//!   rule with neither (`{}`) matches nothing: it is the way to enable default deny without
//!   allowing anything.
//! - `fromPrincipals` (SPIFFE IDs, exact or a prefix ending in `*`) and `fromServiceAccounts`
//!   (`namespace/name`; in a MeshPolicy a bare `name` is one of its own namespace, in a
//!   ClusterMeshPolicy the namespace is required) match the source's certificate, in ingress
//!   rules only. Principal peers can only be satisfied over the mTLS tunnel (the kernel never
//!   sees a certificate), so a plaintext flow never matches them, allow or deny: use STRICT
//!   mode (a `MutualTLS` object) on the destination to make sure a deny by principal covers
//!   everything.
//! - A deny rule (`ingressDeny`, `egressDeny`) wins over every allow, from any policy.
//! - Default deny: a pod selected by a policy whose spec has `ingress` or `ingressDeny` (even an
//!   empty list) drops ingress that no rule allows; likewise for egress. `enableDefaultDeny`
//!   turns that off per direction, so a policy can add allows or denies without closing the
//!   rest.
//! - `toPorts[].protocol` defaults to `ANY`: with a port, TCP, UDP and SCTP on that port; without
//!   a port, every protocol.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::CustomResource;
use kube::core::CustomResourceExt;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// A port number as a string (1-65535, no leading zeros) or a port name (IANA service name
/// syntax: 1-15 lowercase alphanumerics or `-`, at least one letter, no leading, trailing or
/// double `-`). RE2 and ECMA compatible (the API server and test validators use either).
pub const PORT_PATTERN: &str = concat!(
    "^(?:",
    "[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5]",
    "|(?:[a-z0-9]+-)*[a-z0-9]*[a-z][a-z0-9]*(?:-[a-z0-9]+)*",
    ")$"
);

macro_rules! ipv4 {
    () => {
        "(?:(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])\\.){3}(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
    };
}
macro_rules! h16 {
    () => {
        "[0-9a-fA-F]{1,4}"
    };
}
macro_rules! ipv6 {
    () => {
        concat!(
            "(?:",
            "(?:",
            h16!(),
            ":){7}",
            h16!(),
            "|(?:",
            h16!(),
            ":){1,7}:",
            "|(?:",
            h16!(),
            ":){1,6}:",
            h16!(),
            "|(?:",
            h16!(),
            ":){1,5}(?::",
            h16!(),
            "){1,2}",
            "|(?:",
            h16!(),
            ":){1,4}(?::",
            h16!(),
            "){1,3}",
            "|(?:",
            h16!(),
            ":){1,3}(?::",
            h16!(),
            "){1,4}",
            "|(?:",
            h16!(),
            ":){1,2}(?::",
            h16!(),
            "){1,5}",
            "|",
            h16!(),
            ":(?::",
            h16!(),
            "){1,6}",
            "|:(?:(?::",
            h16!(),
            "){1,7}|:)",
            "|(?:",
            h16!(),
            ":){6}",
            ipv4!(),
            "|::(?:",
            h16!(),
            ":){0,5}",
            ipv4!(),
            "|(?:",
            h16!(),
            ":){1}:(?:",
            h16!(),
            ":){0,4}",
            ipv4!(),
            "|(?:",
            h16!(),
            ":){2}:(?:",
            h16!(),
            ":){0,3}",
            ipv4!(),
            "|(?:",
            h16!(),
            ":){3}:(?:",
            h16!(),
            ":){0,2}",
            ipv4!(),
            "|(?:",
            h16!(),
            ":){4}:(?:",
            h16!(),
            ":){0,1}",
            ipv4!(),
            "|(?:",
            h16!(),
            ":){5}:",
            ipv4!(),
            ")"
        )
    };
}

/// An IPv4 CIDR (prefix 0-32) or an IPv6 CIDR (prefix 0-128, any textual form Rust and Go
/// parse). Host bits may be set (they are ignored), as `net.ParseCIDR` allows.
pub const CIDR_PATTERN: &str = concat!(
    "^(?:",
    ipv4!(),
    "/(?:3[0-2]|[12]?[0-9])|",
    ipv6!(),
    "/(?:12[0-8]|1[01][0-9]|[1-9]?[0-9]))$"
);

/// One path segment of a SPIFFE ID (namespace, service account): letters, digits, `.`, `-`,
/// `_`, but not `.` or `..` (RE2 has no lookahead, hence the three alternatives).
macro_rules! spiffe_segment {
    () => {
        "(?:[A-Za-z0-9_-][A-Za-z0-9._-]*|\\.[A-Za-z0-9_-][A-Za-z0-9._-]*|\\.\\.[A-Za-z0-9._-]+)"
    };
}

/// A `fromPrincipals` entry: a workload SPIFFE ID (`spiffe://<trust-domain>/ns/<ns>/sa/<sa>`)
/// or `spiffe://` followed by a prefix and one `*` at the end.
pub const PRINCIPAL_PATTERN: &str = concat!(
    "^spiffe://(?:[a-z0-9._-]{1,255}/ns/",
    spiffe_segment!(),
    "/sa/",
    spiffe_segment!(),
    "|[^*]*\\*)$"
);

macro_rules! dns_label {
    () => {
        "[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?"
    };
}

/// A `fromServiceAccounts` entry: `namespace/name` or a bare `name`, each a DNS label.
pub const SERVICE_ACCOUNT_PATTERN: &str = concat!("^(?:", dns_label!(), "/)?", dns_label!(), "$");

/// A Kubernetes label value: empty, or up to 63 alphanumerics, `-`, `_`, `.`, starting and
/// ending with an alphanumeric.
pub const LABEL_VALUE_PATTERN: &str = "^(?:(?:[A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$";

fn label_value_schema() -> serde_json::Value {
    serde_json::json!({"type": "string", "maxLength": 63, "pattern": LABEL_VALUE_PATTERN})
}

fn match_labels_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "description": "Labels that must all be present with these values.",
        "type": "object",
        "nullable": true,
        "additionalProperties": label_value_schema(),
    })
}

fn selector_values_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "description": "Required (non-empty) for In and NotIn, forbidden for Exists and DoesNotExist.",
        "type": "array",
        "nullable": true,
        "items": label_value_schema(),
    })
}

fn port_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "description": "A number (1-65535) or the name of a container port of the destination pod. Absent: every port of `protocol`.",
        "x-kubernetes-int-or-string": true,
        "nullable": true,
        // Number validations apply to an integer, string validations to a string.
        "minimum": 1,
        "maximum": 65535,
        "maxLength": 15,
        "pattern": PORT_PATTERN,
    })
}

fn end_port_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "description": "Last port of a range starting at `port` (which must be a number, not above endPort).",
        "type": "integer",
        "format": "int32",
        "nullable": true,
        "minimum": 1,
        "maximum": 65535,
    })
}

fn cidr_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "description": "An IPv4 or IPv6 CIDR, e.g. 10.0.0.0/8 or fd00::/64.",
        "type": "string",
        "format": "cidr",
        "pattern": CIDR_PATTERN,
    })
}

fn principals_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "description": "SPIFFE IDs of the sources' certificates: exact (spiffe://cluster.local/ns/shop/sa/api) or a prefix ending in * (spiffe://cluster.local/ns/shop/*). Only traffic through the mTLS tunnel can match.",
        "type": "array",
        "nullable": true,
        "items": {"type": "string", "pattern": PRINCIPAL_PATTERN},
    })
}

fn service_accounts_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "description": "Service accounts of the sources' certificates, as namespace/name (a bare name: the MeshPolicy's namespace; a ClusterMeshPolicy must name the namespace). Only traffic through the mTLS tunnel can match.",
        "type": "array",
        "nullable": true,
        "items": {"type": "string", "maxLength": 127, "pattern": SERVICE_ACCOUNT_PATTERN},
    })
}

fn except_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "description": "CIDRs strictly inside `cidr` to leave out.",
        "type": "array",
        "items": {"type": "string", "format": "cidr", "pattern": CIDR_PATTERN},
    })
}

/// A label selector over a pod's security labels (its labels and the reserved `nodeward.io/*`
/// ones). Empty selects everything in scope.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointSelector {
    /// Labels that must all be present with these values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "match_labels_schema")]
    pub match_labels: Option<BTreeMap<String, String>>,
    /// Requirements that must all hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_expressions: Option<Vec<SelectorRequirement>>,
}

/// One `matchExpressions` requirement.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
// In and NotIn need at least one value; Exists and DoesNotExist take none. (`not`/`allOf`, not
// `anyOf`, so kube's structural rewriter leaves the junctors alone.)
#[schemars(extend("allOf" = [
    {"not": {
        "required": ["operator"],
        "properties": {"operator": {"enum": ["In", "NotIn"]}},
        "not": {"required": ["values"], "properties": {"values": {"minItems": 1}}},
    }},
    {"not": {
        "required": ["operator", "values"],
        "properties": {"operator": {"enum": ["Exists", "DoesNotExist"]}, "values": {"minItems": 1}},
    }},
]))]
pub struct SelectorRequirement {
    /// A label key (`nodeward.io/namespace`, `nodeward.io/ns-label.<key>` and
    /// `nodeward.io/serviceaccount` are the reserved ones).
    #[schemars(length(min = 1, max = 317))]
    pub key: String,
    pub operator: SelectorOperator,
    /// Required (non-empty) for In and NotIn, forbidden for Exists and DoesNotExist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "selector_values_schema")]
    pub values: Option<Vec<String>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum SelectorOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl SelectorOperator {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::In => "In",
            Self::NotIn => "NotIn",
            Self::Exists => "Exists",
            Self::DoesNotExist => "DoesNotExist",
        }
    }
}

/// Reserved peers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Entity {
    /// Anything outside the cluster.
    World,
    /// The local node.
    Host,
    /// Every pod, node and unmanaged address of the cluster.
    Cluster,
    /// The other nodes of the cluster.
    RemoteNode,
    /// The Kubernetes API server.
    KubeApiserver,
    /// Every peer, inside or outside the cluster.
    All,
}

/// Addresses in `cidr` but not in any `except` prefix (each strictly inside `cidr`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CidrRule {
    #[schemars(schema_with = "cidr_schema")]
    pub cidr: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "except_schema")]
    pub except: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Protocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    #[serde(rename = "SCTP")]
    Sctp,
    /// TCP, UDP and SCTP when a port is given; every protocol otherwise.
    #[serde(rename = "ANY")]
    Any,
}

/// Destination ports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
// `endPort` needs a numeric `port`: not (endPort and not (port and port is a number)).
#[schemars(extend("not" = {
    "required": ["endPort"],
    "not": {"required": ["port"], "properties": {"port": {"pattern": "^[0-9]+$"}}},
}))]
pub struct PortRule {
    /// A number (1-65535) or the name of a container port of the destination pod. Absent: every
    /// port of `protocol`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "port_schema")]
    pub port: Option<IntOrString>,
    /// Last port of a range starting at `port` (which must be a number).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "end_port_schema")]
    pub end_port: Option<i32>,
    /// Defaults to ANY.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    /// Application-level rules on these ports: `dns` (egress), `http` (ingress).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<PortRules>,
}

/// Application-level rules of a `toPorts` entry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortRules {
    /// The DNS names the selected pods may ask for through these ports (usually 53 of the
    /// cluster DNS Service); other queries are answered REFUSED. Egress only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<Vec<FqdnSelector>>,
    /// The HTTP requests allowed through these ports (ingress allow rules only, as Cilium's
    /// `rules.http`): a request is allowed when it matches one entry (every field given must
    /// match). Checked by the destination pod's agent on tunnelled (mTLS) connections, with
    /// the identity the client's certificate proves; a refused request is answered 403 and the
    /// connection carries on. Another allow rule for the same peer and port without
    /// `rules.http` allows every request, as in Cilium.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<Vec<PortRuleHttp>>,
}

/// One allowed kind of HTTP request.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortRuleHttp {
    /// A regular expression the whole method must match (`GET`, `GET|HEAD`). Absent: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// A regular expression the whole path must match (`/public(/.*)?`); the query is not
    /// part of the path. Absent: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Headers the request must have: `Name` (present) or `Name: value` (exactly this value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<Vec<String>>,
}

/// A DNS name selector: exactly one of `matchName` and `matchPattern`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("oneOf" = [{"required": ["matchName"]}, {"required": ["matchPattern"]}]))]
pub struct FqdnSelector {
    /// An exact name (case-insensitive, trailing dot optional): `api.example.com`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "fqdn_name_schema")]
    pub match_name: Option<String>,
    /// A pattern: `*` matches within one label (`*.example.com`, `api-*.example.com`), a
    /// leading `**.` matches any depth of subdomains (`**.example.com`), `*` alone every name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "fqdn_pattern_schema")]
    pub match_pattern: Option<String>,
}

fn fqdn_name_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "description": "An exact name (case-insensitive, trailing dot optional): api.example.com.",
        "type": "string",
        "nullable": true,
        "maxLength": 254,
        "pattern": FQDN_NAME_PATTERN,
    })
}

fn fqdn_pattern_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "description": "A pattern: * matches within one label (*.example.com), a leading **. any depth of subdomains (**.example.com), * alone every name.",
        "type": "string",
        "nullable": true,
        "maxLength": 254,
        "pattern": FQDN_PATTERN_PATTERN,
    })
}

/// A `matchName`: dot-separated labels of letters, digits, `-` and `_`, optional final dot.
pub const FQDN_NAME_PATTERN: &str = "^(?:[-A-Za-z0-9_]{1,63}\\.)*[-A-Za-z0-9_]{1,63}\\.?$";
/// A `matchPattern`: as a name, with `*` in labels and an optional leading `**.`.
pub const FQDN_PATTERN_PATTERN: &str =
    "^(?:\\*\\*\\.)?(?:[-A-Za-z0-9_*]{1,63}\\.)*[-A-Za-z0-9_*]{1,63}\\.?$";

/// Sources of ingress (`ingress`, `ingressDeny`). Peer fields are alternatives; with none,
/// a rule with `toPorts` applies to every source and a rule without matches nothing. The
/// principal fields (`fromPrincipals`, `fromServiceAccounts`) exist for ingress only: the
/// tunnel checks the certificate of the source that connects.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IngressRule {
    /// Pods whose labels match any of these selectors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_endpoints: Option<Vec<EndpointSelector>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_entities: Option<Vec<Entity>>,
    #[serde(
        rename = "fromCIDRSet",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub from_cidr_set: Option<Vec<CidrRule>>,
    /// Sources by the SPIFFE ID of their certificate: exact
    /// (`spiffe://cluster.local/ns/shop/sa/api`) or a prefix ending in `*`
    /// (`spiffe://cluster.local/ns/shop/*`). Only traffic through the mTLS tunnel can match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "principals_schema")]
    pub from_principals: Option<Vec<String>>,
    /// Sources by the service account of their certificate, `namespace/name` (a bare `name`:
    /// the MeshPolicy's own namespace). Only traffic through the mTLS tunnel can match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "service_accounts_schema")]
    pub from_service_accounts: Option<Vec<String>>,
    /// Destination ports on the selected pod; absent means every port of every protocol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_ports: Option<Vec<PortRule>>,
}

/// Destinations of egress (`egress`, `egressDeny`). Peer fields are alternatives; with none,
/// a rule with `toPorts` applies to every destination and a rule without matches nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EgressRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_endpoints: Option<Vec<EndpointSelector>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_entities: Option<Vec<Entity>>,
    #[serde(rename = "toCIDRSet", default, skip_serializing_if = "Option::is_none")]
    pub to_cidr_set: Option<Vec<CidrRule>>,
    /// Destinations by DNS name: the addresses the cluster DNS answered for a selected name,
    /// learned by the agent's DNS proxy while the answer's TTL lasts (and while a connection to
    /// them is open). The selected pods' DNS then goes through the proxy; their egress to the
    /// DNS server itself must still be allowed (a rule to port 53, with `rules.dns` to limit
    /// the names they may ask for).
    #[serde(rename = "toFQDNs", default, skip_serializing_if = "Option::is_none")]
    pub to_fqdns: Option<Vec<FqdnSelector>>,
    /// Destination ports on the peer; absent means every port of every protocol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_ports: Option<Vec<PortRule>>,
}

/// Per-direction switch for default deny (each defaults to true when its section is present).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DefaultDeny {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<bool>,
}

// The two kinds share one spec shape; a macro keeps the field list (and its schema docs) in one
// place, since `CustomResource` derives the root type from the spec struct it decorates.
macro_rules! policy_spec {
    ($(#[$attr:meta])* $name:ident) => {
        #[derive(CustomResource, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
        $(#[$attr])*
        #[serde(rename_all = "camelCase", deny_unknown_fields)]
        pub struct $name {
            /// The pods this policy applies to (empty: all in scope).
            #[serde(default)]
            pub endpoint_selector: EndpointSelector,
            /// Allowed sources.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub ingress: Option<Vec<IngressRule>>,
            /// Allowed destinations.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub egress: Option<Vec<EgressRule>>,
            /// Denied sources; a deny wins over any allow.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub ingress_deny: Option<Vec<IngressRule>>,
            /// Denied destinations; a deny wins over any allow.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub egress_deny: Option<Vec<EgressRule>>,
            /// Whether selected pods drop what no rule allows, per direction. Defaults to true
            /// for a direction whose allow or deny section is present.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub enable_default_deny: Option<DefaultDeny>,
        }
    };
}

policy_spec!(
    /// Identity-based L3/L4 policy for the pods of one namespace.
    #[kube(
        group = "nodeward.io",
        version = "v1alpha1",
        kind = "MeshPolicy",
        namespaced,
        shortname = "mp",
        category = "nodeward",
        derive = "PartialEq",
        derive = "Default",
        doc = "Identity-based L3/L4 policy for the pods of one namespace.",
        status = "PolicyStatus",
        printcolumn(
            name = "Selector",
            type_ = "string",
            json_path = ".spec.endpointSelector",
            description = "the pods the policy applies to"
        ),
        printcolumn(
            name = "Enforcing",
            type_ = "integer",
            json_path = ".status.enforcingNodes",
            description = "nodes whose agent enforces the current generation"
        ),
        printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
    )]
    MeshPolicySpec
);

policy_spec!(
    /// Identity-based L3/L4 policy for pods of any namespace.
    #[kube(
        group = "nodeward.io",
        version = "v1alpha1",
        kind = "ClusterMeshPolicy",
        shortname = "cmp",
        category = "nodeward",
        derive = "PartialEq",
        derive = "Default",
        doc = "Identity-based L3/L4 policy for pods of any namespace.",
        status = "PolicyStatus",
        printcolumn(
            name = "Selector",
            type_ = "string",
            json_path = ".spec.endpointSelector",
            description = "the pods the policy applies to"
        ),
        printcolumn(
            name = "Enforcing",
            type_ = "integer",
            json_path = ".status.enforcingNodes",
            description = "nodes whose agent enforces the current generation"
        ),
        printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
    )]
    ClusterMeshPolicySpec
);

/// Where a policy is enforced: the `status` subresource of `MeshPolicy` and `ClusterMeshPolicy`.
///
/// Written by the agents with server-side apply: the agent of node `N` applies
/// `{"status": {"nodes": {"N": {...}}, "enforcingNodes": <count>}}` to the `status` subresource
/// with field manager `nodeward-N` (force), so each agent owns only its own `nodes` entry (a
/// granular map) and a removed node's entry can be dropped by applying without it.
/// `enforcingNodes` is the number of `nodes` entries with `enforced: true` for the current
/// generation as last computed by an agent (informational; the per-node entries are the truth).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    /// Nodes whose agent has compiled the current generation and has it in its maps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub enforcing_nodes: Option<i32>,
    /// Per node name: that node's agent's view of this policy.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub nodes: BTreeMap<String, NodePolicyStatus>,
}

/// One agent's report on one policy.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodePolicyStatus {
    /// The policy (at `observedGeneration`) compiled and is in this node's maps.
    pub enforced: bool,
    /// Why not, as one line naming the field; absent when enforced. While it is set the node
    /// keeps enforcing its previous good state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The `metadata.generation` this entry describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The mutual TLS mode of the selected pods.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum MutualTlsMode {
    /// Only mTLS (tunnelled) traffic reaches the selected pods; plaintext is dropped.
    #[default]
    #[serde(rename = "STRICT")]
    Strict,
    /// mTLS when the peer is meshed, plaintext accepted otherwise.
    #[serde(rename = "PERMISSIVE")]
    Permissive,
    /// No tunnel for the selected pods: plaintext only (kernel policy still applies).
    #[serde(rename = "DISABLE")]
    Disable,
}

/// Mutual TLS for the pods of one namespace (like Istio's PeerAuthentication): whether they
/// are in the mesh, and whether plaintext may still reach them. Traffic between two meshed pods
/// goes through the agents' HBONE tunnel, authenticated by SPIFFE certificates; see
/// [`crate::policy::mtls`] for which object decides a pod's mode.
#[expect(
    clippy::duplicated_attributes,
    reason = "each printcolumn has its own type_"
)]
#[derive(
    CustomResource, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema,
)]
#[kube(
    group = "nodeward.io",
    version = "v1alpha1",
    kind = "MutualTLS",
    plural = "mutualtlses",
    singular = "mutualtls",
    namespaced,
    shortname = "mtls",
    category = "nodeward",
    derive = "PartialEq",
    derive = "Default",
    doc = "Mutual TLS mode for the pods of one namespace: STRICT (only the mTLS tunnel reaches them over TCP), PERMISSIVE (in the mesh, plaintext accepted too) or DISABLE (not in the mesh).",
    printcolumn(name = "Mode", type_ = "string", json_path = ".spec.mode"),
    printcolumn(
        name = "Selector",
        type_ = "string",
        json_path = ".spec.selector",
        description = "the pods the mode applies to"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MutualTLSSpec {
    /// The pods of this namespace the mode applies to (empty: all of them).
    #[serde(default)]
    pub selector: EndpointSelector,
    /// STRICT, PERMISSIVE or DISABLE.
    pub mode: MutualTlsMode,
}

/// A borrowed view of either spec, so the translation is written once.
#[derive(Clone, Copy, Debug)]
pub struct SpecView<'a> {
    pub endpoint_selector: &'a EndpointSelector,
    pub ingress: Option<&'a [IngressRule]>,
    pub egress: Option<&'a [EgressRule]>,
    pub ingress_deny: Option<&'a [IngressRule]>,
    pub egress_deny: Option<&'a [EgressRule]>,
    pub enable_default_deny: Option<&'a DefaultDeny>,
}

macro_rules! view {
    ($spec:ty) => {
        impl $spec {
            #[must_use]
            pub fn view(&self) -> SpecView<'_> {
                SpecView {
                    endpoint_selector: &self.endpoint_selector,
                    ingress: self.ingress.as_deref(),
                    egress: self.egress.as_deref(),
                    ingress_deny: self.ingress_deny.as_deref(),
                    egress_deny: self.egress_deny.as_deref(),
                    enable_default_deny: self.enable_default_deny.as_ref(),
                }
            }
        }
    };
}
view!(MeshPolicySpec);
view!(ClusterMeshPolicySpec);

/// The CRDs, in a stable order.
#[must_use]
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![
        MeshPolicy::crd(),
        ClusterMeshPolicy::crd(),
        MutualTLS::crd(),
        crate::http::traffic::TrafficPolicy::crd(),
    ]
}

const HEADER: &str = "# Generated by `nodeward crd` from agent/src/policy/crd.rs. Do not edit.\n";

/// One CRD as a YAML document (without header or separator).
fn crd_yaml(crd: &CustomResourceDefinition) -> String {
    serde_yaml_ng::to_string(crd).expect("a CustomResourceDefinition always serializes")
}

/// All CRDs as one multi-document YAML stream, with a header comment.
#[must_use]
pub fn crds_yaml() -> String {
    let mut out = String::from(HEADER);
    for crd in crds() {
        out.push_str("---\n");
        out.push_str(&crd_yaml(&crd));
    }
    out
}

/// The files of `policies/crds/`: `(file name, contents)`, one per CRD, named by the CRD name
/// (`meshpolicies.nodeward.io.yaml`).
#[must_use]
pub fn crd_files() -> Vec<(String, String)> {
    crds()
        .iter()
        .map(|crd| {
            let name = crd.metadata.name.clone().unwrap_or_default();
            (format!("{name}.yaml"), format!("{HEADER}{}", crd_yaml(crd)))
        })
        .collect()
}

/// Writes [`crd_files`] into `dir` (created if missing).
///
/// # Errors
/// Creating the directory or writing a file failed.
pub fn write_crds(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (name, contents) in crd_files() {
        std::fs::write(dir.join(name), contents)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crd_files_in_the_repository_are_up_to_date() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let dir = root.join("policies/crds");
        let deploy = root.join("deploy/crds.yaml");
        // Also refreshable without the CLI: `NODEWARD_UPDATE_CRDS=1 cargo test -p nodeward crd`.
        if std::env::var_os("NODEWARD_UPDATE_CRDS").is_some() {
            write_crds(&dir).expect("write policies/crds");
            std::fs::write(&deploy, crds_yaml()).expect("write deploy/crds.yaml");
        }
        let mut want_names: Vec<String> = Vec::new();
        for (name, want) in crd_files() {
            let path = dir.join(&name);
            let have = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                have == want,
                "{} is stale or missing; refresh it with `cargo run -p nodeward -- crd --write policies/crds`",
                path.display()
            );
            want_names.push(name);
        }
        // No leftover file of a renamed or removed kind.
        let mut have_names: Vec<String> = std::fs::read_dir(&dir)
            .expect("policies/crds")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        have_names.sort();
        want_names.sort();
        assert_eq!(have_names, want_names, "files in policies/crds");
        let have = std::fs::read_to_string(&deploy).unwrap_or_default();
        assert!(
            have == crds_yaml(),
            "{} is stale or missing; refresh it with `cargo run -p nodeward -- crd > deploy/crds.yaml`",
            deploy.display()
        );
    }

    #[test]
    fn crds_have_the_expected_names_and_scope() {
        let crds = crds();
        let names: Vec<_> = crds
            .iter()
            .map(|c| {
                (
                    c.metadata.name.clone().unwrap_or_default(),
                    c.spec.scope.clone(),
                    c.spec.names.short_names.clone().unwrap_or_default(),
                )
            })
            .collect();
        assert_eq!(
            names,
            vec![
                (
                    "meshpolicies.nodeward.io".to_owned(),
                    "Namespaced".to_owned(),
                    vec!["mp".to_owned()]
                ),
                (
                    "clustermeshpolicies.nodeward.io".to_owned(),
                    "Cluster".to_owned(),
                    vec!["cmp".to_owned()]
                ),
                (
                    "mutualtlses.nodeward.io".to_owned(),
                    "Namespaced".to_owned(),
                    vec!["mtls".to_owned()]
                ),
                (
                    "trafficpolicies.nodeward.io".to_owned(),
                    "Namespaced".to_owned(),
                    vec!["tp".to_owned()]
                ),
            ]
        );
        let yaml = crds_yaml();
        assert!(yaml.starts_with("# Generated by `nodeward crd`"));
        assert_eq!(
            yaml.lines().filter(|l| *l == "---").count(),
            4,
            "four documents"
        );
        assert!(yaml.contains("fromCIDRSet"));
        assert!(yaml.contains("x-kubernetes-int-or-string"));
        assert!(
            !yaml.contains("additionalProperties: false"),
            "structural schemas cannot set additionalProperties next to properties"
        );
    }
}
