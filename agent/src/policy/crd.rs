//! The `nodeward.io/v1alpha1` CRDs: `MeshPolicy` (namespaced) and `ClusterMeshPolicy` (cluster
//! scoped). Both have the same spec; the Rust types are the source of truth for the schemas in
//! `policies/crds/` (regenerate with `cargo run -p nodeward -- crd --write policies/crds`).
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
//! - Within a rule, the peer fields (`fromEndpoints`, `fromEntities`, `fromCIDRSet`) are
//!   alternatives, and `toPorts` restricts the ports. A rule with `toPorts` but no peer field
//!   applies to every peer (an L4-only rule). A rule with neither (`{}`) matches nothing: it is
//!   the way to enable default deny without allowing anything.
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
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A label selector over a pod's security labels (its labels and the reserved `nodeward.io/*`
/// ones). Empty selects everything in scope.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointSelector {
    /// Labels that must all be present with these values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_labels: Option<BTreeMap<String, String>>,
    /// Requirements that must all hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_expressions: Option<Vec<SelectorRequirement>>,
}

/// One `matchExpressions` requirement.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SelectorRequirement {
    pub key: String,
    pub operator: SelectorOperator,
    /// Required (non-empty) for In and NotIn, forbidden for Exists and DoesNotExist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
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
    pub cidr: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
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
pub struct PortRule {
    /// A number (1-65535) or the name of a container port of the destination pod. Absent: every
    /// port of `protocol`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<IntOrString>,
    /// Last port of a range starting at `port` (which must be a number).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_port: Option<i32>,
    /// Defaults to ANY.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
}

/// Sources of ingress (`ingress`, `ingressDeny`). Peer fields are alternatives; with none,
/// a rule with `toPorts` applies to every source and a rule without matches nothing.
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
        printcolumn(
            name = "Selector",
            type_ = "string",
            json_path = ".spec.endpointSelector",
            description = "the pods the policy applies to"
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
        printcolumn(
            name = "Selector",
            type_ = "string",
            json_path = ".spec.endpointSelector",
            description = "the pods the policy applies to"
        ),
        printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
    )]
    ClusterMeshPolicySpec
);

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
    vec![MeshPolicy::crd(), ClusterMeshPolicy::crd()]
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
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/crds");
        // Also refreshable without the CLI: `NODEWARD_UPDATE_CRDS=1 cargo test -p nodeward crd`.
        if std::env::var_os("NODEWARD_UPDATE_CRDS").is_some() {
            write_crds(&dir).expect("write policies/crds");
        }
        for (name, want) in crd_files() {
            let path = dir.join(&name);
            let have = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                have == want,
                "{} is stale or missing; refresh it with `cargo run -p nodeward -- crd --write policies/crds`",
                path.display()
            );
        }
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
            ]
        );
        let yaml = crds_yaml();
        assert!(yaml.starts_with("# Generated by `nodeward crd`"));
        assert_eq!(
            yaml.lines().filter(|l| *l == "---").count(),
            2,
            "two documents"
        );
        assert!(yaml.contains("fromCIDRSet"));
        assert!(yaml.contains("x-kubernetes-int-or-string"));
        assert!(
            !yaml.contains("additionalProperties: false"),
            "structural schemas cannot set additionalProperties next to properties"
        );
    }
}
