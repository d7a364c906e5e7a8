//! `networking.k8s.io/v1` NetworkPolicy to the internal model, with upstream semantics:
//!
//! - `podSelector` selects pods of the policy's namespace (empty: all of them).
//! - `policyTypes` defaults to `Ingress`, plus `Egress` when `spec.egress` has rules. A selected
//!   pod is default deny in each of the policy's types; rules of other types are ignored.
//! - A rule with no (or an empty) `from`/`to` matches every peer; with no (or empty) `ports`,
//!   every port and protocol.
//! - A peer's `podSelector` alone means pods of the policy's namespace, `namespaceSelector` alone
//!   all pods of matching namespaces, both together the pods matching both; `ipBlock` stands
//!   alone and may carry `except` prefixes strictly inside `cidr`.
//! - Ports: protocol TCP (default), UDP or SCTP; a number, or a named container port; `endPort`
//!   only with a numeric `port`, and `endPort >= port`.
//! - There are no deny rules; policies add up.

use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector as K8sSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::model::{
    Action, Direction, FieldError, PROTO_SCTP, PROTO_TCP, PROTO_UDP, Peer, PolicyError, PolicyKind,
    PolicyModel, PortSpec, Rule, RuleOrigin, Subject, check_port, check_port_name, parse_cidr,
};
use super::selector::{LabelSelector, NAMESPACE_LABEL, NS_LABEL_PREFIX, Requirement};

/// Translates and validates one NetworkPolicy.
///
/// # Errors
/// The first invalid field, named by its path (`spec.ingress[0].ports[1].endPort`).
pub fn translate_network_policy(np: &NetworkPolicy) -> Result<PolicyModel, PolicyError> {
    let namespace = np
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_owned());
    let origin = RuleOrigin {
        kind: PolicyKind::NetworkPolicy,
        namespace: namespace.clone(),
        name: np.metadata.name.clone().unwrap_or_default(),
    };
    translate(np, &namespace, &origin).map_err(|e| e.in_object(&origin))
}

fn translate(
    np: &NetworkPolicy,
    namespace: &str,
    origin: &RuleOrigin,
) -> Result<PolicyModel, FieldError> {
    if origin.name.is_empty() {
        return Err(FieldError::new("metadata.name", "missing"));
    }
    let Some(spec) = &np.spec else {
        return Err(FieldError::new("spec", "missing"));
    };
    let selector = match &spec.pod_selector {
        Some(s) => k8s_selector(s, "spec.podSelector")?,
        None => LabelSelector::everything(),
    };

    let (mut ingress, mut egress) = (false, false);
    match &spec.policy_types {
        Some(types) if !types.is_empty() => {
            for (i, t) in types.iter().enumerate() {
                match t.as_str() {
                    "Ingress" => ingress = true,
                    "Egress" => egress = true,
                    other => {
                        return Err(FieldError::new(
                            format!("spec.policyTypes[{i}]"),
                            format!("unknown policy type {other:?} (expected Ingress or Egress)"),
                        ));
                    }
                }
            }
        }
        // Upstream defaulting (SetDefaults_NetworkPolicySpec).
        _ => {
            ingress = true;
            egress = spec.egress.as_ref().is_some_and(|e| !e.is_empty());
        }
    }

    let mut rules = Vec::new();
    if ingress {
        for (i, r) in spec.ingress.iter().flatten().enumerate() {
            let path = format!("spec.ingress[{i}]");
            rules.push(Rule {
                name: format!("ingress[{i}]"),
                direction: Direction::Ingress,
                action: Action::Allow,
                peers: peers(r.from.as_deref(), namespace, &format!("{path}.from"))?,
                ports: ports(r.ports.as_deref(), &format!("{path}.ports"))?,
                dns: None,
                port_http: Vec::new(),
            });
        }
    }
    if egress {
        for (i, r) in spec.egress.iter().flatten().enumerate() {
            let path = format!("spec.egress[{i}]");
            rules.push(Rule {
                name: format!("egress[{i}]"),
                direction: Direction::Egress,
                action: Action::Allow,
                peers: peers(r.to.as_deref(), namespace, &format!("{path}.to"))?,
                ports: ports(r.ports.as_deref(), &format!("{path}.ports"))?,
                dns: None,
                port_http: Vec::new(),
            });
        }
    }

    Ok(PolicyModel {
        origin: origin.clone(),
        subject: Subject {
            namespace: Some(namespace.to_owned()),
            selector,
        },
        ingress_enforced: ingress,
        egress_enforced: egress,
        rules,
    })
}

fn k8s_selector(s: &K8sSelector, path: &str) -> Result<LabelSelector, FieldError> {
    LabelSelector::parse(
        s.match_labels.as_ref(),
        s.match_expressions
            .iter()
            .flatten()
            .map(|e| (e.key.as_str(), e.operator.as_str(), e.values.as_deref())),
        path,
    )
}

fn peers(
    list: Option<&[NetworkPolicyPeer]>,
    namespace: &str,
    path: &str,
) -> Result<Vec<Peer>, FieldError> {
    let list = list.unwrap_or_default();
    if list.is_empty() {
        return Ok(vec![Peer::Any]);
    }
    list.iter()
        .enumerate()
        .map(|(i, p)| peer(p, namespace, &format!("{path}[{i}]")))
        .collect()
}

fn peer(p: &NetworkPolicyPeer, namespace: &str, path: &str) -> Result<Peer, FieldError> {
    if let Some(block) = &p.ip_block {
        if p.pod_selector.is_some() || p.namespace_selector.is_some() {
            return Err(FieldError::new(
                path,
                "ipBlock cannot be combined with podSelector or namespaceSelector",
            ));
        }
        return parse_cidr(
            &block.cidr,
            block.except.as_deref().unwrap_or_default(),
            &format!("{path}.ipBlock.cidr"),
            &format!("{path}.ipBlock.except"),
        );
    }
    let pods = p
        .pod_selector
        .as_ref()
        .map(|s| k8s_selector(s, &format!("{path}.podSelector")))
        .transpose()?;
    let namespaces = p
        .namespace_selector
        .as_ref()
        .map(|s| k8s_selector(s, &format!("{path}.namespaceSelector")))
        .transpose()?;
    let selector = match (pods, namespaces) {
        (None, None) => {
            return Err(FieldError::new(
                path,
                "a peer needs podSelector, namespaceSelector or ipBlock",
            ));
        }
        (Some(pods), None) => pods.with(Requirement::equals(NAMESPACE_LABEL, namespace)),
        (pods, Some(ns)) => pods
            .unwrap_or_default()
            .and(ns.map_keys(|k| format!("{NS_LABEL_PREFIX}{k}"))),
    };
    Ok(Peer::Endpoints(selector))
}

fn ports(list: Option<&[NetworkPolicyPort]>, path: &str) -> Result<Vec<PortSpec>, FieldError> {
    list.unwrap_or_default()
        .iter()
        .enumerate()
        .map(|(i, p)| port(p, &format!("{path}[{i}]")))
        .collect()
}

fn port(p: &NetworkPolicyPort, path: &str) -> Result<PortSpec, FieldError> {
    let protocol = match p.protocol.as_deref().unwrap_or("TCP") {
        "TCP" => PROTO_TCP,
        "UDP" => PROTO_UDP,
        "SCTP" => PROTO_SCTP,
        other => {
            return Err(FieldError::new(
                format!("{path}.protocol"),
                format!("unknown protocol {other:?} (expected TCP, UDP or SCTP)"),
            ));
        }
    };
    let end_path = format!("{path}.endPort");
    match &p.port {
        None if p.end_port.is_some() => {
            Err(FieldError::new(end_path, "endPort requires a numeric port"))
        }
        None => Ok(PortSpec::AllOf(protocol)),
        Some(IntOrString::String(name)) => {
            if p.end_port.is_some() {
                return Err(FieldError::new(
                    end_path,
                    "endPort cannot be used with a named port",
                ));
            }
            // A numeric string is what `port: "80"` in YAML gives: accept it as the number.
            if let Ok(n) = name.parse::<i64>() {
                let first = check_port(n, &format!("{path}.port"))?;
                return Ok(PortSpec::Range {
                    protocol,
                    first,
                    last: first,
                });
            }
            check_port_name(name, &format!("{path}.port"))?;
            Ok(PortSpec::Named {
                protocol,
                name: name.clone(),
            })
        }
        Some(IntOrString::Int(n)) => {
            let first = check_port(i64::from(*n), &format!("{path}.port"))?;
            let last = match p.end_port {
                None => first,
                Some(end) => {
                    let last = check_port(i64::from(end), &end_path)?;
                    if last < first {
                        return Err(FieldError::new(
                            end_path,
                            format!("endPort {last} is lower than port {first}"),
                        ));
                    }
                    last
                }
            };
            Ok(PortSpec::Range {
                protocol,
                first,
                last,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn np(yaml: &str) -> NetworkPolicy {
        serde_yaml_ng::from_str(yaml).expect("test NetworkPolicy parses")
    }

    fn err(yaml: &str) -> String {
        translate_network_policy(&np(yaml))
            .expect_err("policy should be rejected")
            .to_string()
    }

    const HEAD: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: allow-web, namespace: prod}\n";

    #[test]
    fn policy_types_default_to_ingress_plus_egress_when_present() {
        let m = translate_network_policy(&np(&format!("{HEAD}spec: {{podSelector: {{}}}}")))
            .expect("valid");
        assert!(m.ingress_enforced && !m.egress_enforced);
        let m = translate_network_policy(&np(&format!(
            "{HEAD}spec: {{podSelector: {{}}, egress: [{{}}]}}"
        )))
        .expect("valid");
        assert!(m.ingress_enforced && m.egress_enforced);
        assert_eq!(m.rules[0].peers, vec![Peer::Any]);
        assert!(m.rules[0].ports.is_empty());
        let m = translate_network_policy(&np(&format!(
            "{HEAD}spec: {{podSelector: {{}}, policyTypes: [Egress], ingress: [{{}}]}}"
        )))
        .expect("valid");
        assert!(!m.ingress_enforced && m.egress_enforced);
        assert!(
            m.rules.is_empty(),
            "ingress rules of an Egress-only policy are ignored"
        );
    }

    #[test]
    fn pod_selector_alone_means_own_namespace() {
        let m = translate_network_policy(&np(&format!(
            "{HEAD}spec:\n  podSelector: {{}}\n  ingress: [{{from: [{{podSelector: {{matchLabels: {{app: web}}}}}}]}}]"
        )))
        .expect("valid");
        let Peer::Endpoints(sel) = &m.rules[0].peers[0] else {
            panic!("expected an endpoint peer, got {:?}", m.rules[0].peers)
        };
        assert_eq!(sel.to_string(), "app=web,nodeward.io/namespace=prod");
    }

    #[test]
    fn validation_errors_name_object_and_field() {
        let cases = [
            (
                "spec: {podSelector: {}, ingress: [{ports: [{port: 80}, {port: 90, endPort: 80}]}]}",
                "NetworkPolicy prod/allow-web: spec.ingress[0].ports[1].endPort: endPort 80 is lower than port 90",
            ),
            (
                "spec: {podSelector: {}, ingress: [{ports: [{port: http, endPort: 80}]}]}",
                "NetworkPolicy prod/allow-web: spec.ingress[0].ports[0].endPort: endPort cannot be used with a named port",
            ),
            (
                "spec: {podSelector: {}, ingress: [{ports: [{port: 0}]}]}",
                "NetworkPolicy prod/allow-web: spec.ingress[0].ports[0].port: port 0 is not in 1..=65535",
            ),
            (
                "spec: {podSelector: {}, ingress: [{ports: [{port: 70000}]}]}",
                "NetworkPolicy prod/allow-web: spec.ingress[0].ports[0].port: port 70000 is not in 1..=65535",
            ),
            (
                "spec: {podSelector: {}, egress: [{ports: [{protocol: ICMP}]}]}",
                "NetworkPolicy prod/allow-web: spec.egress[0].ports[0].protocol: unknown protocol \"ICMP\" (expected TCP, UDP or SCTP)",
            ),
            (
                "spec: {podSelector: {}, egress: [{to: [{ipBlock: {cidr: 10.0.0.0/33}}]}]}",
                "NetworkPolicy prod/allow-web: spec.egress[0].to[0].ipBlock.cidr: invalid CIDR \"10.0.0.0/33\" (expected e.g. 10.0.0.0/8 or fd00::/64)",
            ),
            (
                "spec: {podSelector: {}, egress: [{to: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16, 11.0.0.0/16]}}]}]}",
                "NetworkPolicy prod/allow-web: spec.egress[0].to[0].ipBlock.except[1]: except 11.0.0.0/16 is not strictly inside 10.0.0.0/8",
            ),
            (
                "spec: {podSelector: {matchExpressions: [{key: app, operator: In}]}}",
                "NetworkPolicy prod/allow-web: spec.podSelector.matchExpressions[0].values: operator In requires at least one value",
            ),
            (
                "spec: {podSelector: {}, ingress: [{from: [{namespaceSelector: {matchExpressions: [{key: team, operator: Exists, values: [a]}]}}]}]}",
                "NetworkPolicy prod/allow-web: spec.ingress[0].from[0].namespaceSelector.matchExpressions[0].values: operator Exists must not have values",
            ),
            (
                "spec: {podSelector: {matchExpressions: [{key: app, operator: Like, values: [a]}]}}",
                "NetworkPolicy prod/allow-web: spec.podSelector.matchExpressions[0].operator: unknown operator \"Like\" (expected In, NotIn, Exists or DoesNotExist)",
            ),
            (
                "spec: {podSelector: {matchLabels: {-bad: x}}}",
                "NetworkPolicy prod/allow-web: spec.podSelector.matchLabels.-bad: invalid label key \"-bad\": the name must be 1-63 alphanumerics, '-', '_' or '.', starting and ending with an alphanumeric",
            ),
            (
                "spec: {podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]}]}",
                "NetworkPolicy prod/allow-web: spec.ingress[0].from[0]: ipBlock cannot be combined with podSelector or namespaceSelector",
            ),
            (
                "spec: {podSelector: {}, policyTypes: [Sideways]}",
                "NetworkPolicy prod/allow-web: spec.policyTypes[0]: unknown policy type \"Sideways\" (expected Ingress or Egress)",
            ),
        ];
        for (spec, want) in cases {
            assert_eq!(err(&format!("{HEAD}{spec}")), want, "for {spec}");
        }
    }
}
