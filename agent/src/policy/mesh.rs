//! `MeshPolicy` and `ClusterMeshPolicy` to the internal model. The semantics are documented on
//! the CRD types in [`super::crd`].

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::de::DeserializeOwned;

use super::crd::{
    CidrRule, ClusterMeshPolicy, EgressRule, EndpointSelector, Entity as CrdEntity, FqdnSelector,
    IngressRule, MeshPolicy, PortRule, Protocol, SpecView,
};
use super::fqdn::FqdnMatch;
use super::model::{
    Action, Direction, Entity, FieldError, PROTO_SCTP, PROTO_TCP, PROTO_UDP, Peer, PolicyError,
    PolicyKind, PolicyModel, PortSpec, Rule, RuleOrigin, Subject, check_port, check_port_name,
    parse_cidr, parse_principal, parse_service_account,
};
use super::selector::{LabelSelector, NAMESPACE_LABEL, Requirement};

/// Translates and validates a MeshPolicy.
///
/// # Errors
/// The first invalid field, named by its path.
pub fn translate_mesh_policy(p: &MeshPolicy) -> Result<PolicyModel, PolicyError> {
    let namespace = p
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_owned());
    let origin = RuleOrigin {
        kind: PolicyKind::MeshPolicy,
        namespace: namespace.clone(),
        name: p.metadata.name.clone().unwrap_or_default(),
    };
    translate(p.spec.view(), Some(&namespace), &origin).map_err(|e| e.in_object(&origin))
}

/// Translates and validates a ClusterMeshPolicy.
///
/// # Errors
/// The first invalid field, named by its path.
pub fn translate_cluster_mesh_policy(p: &ClusterMeshPolicy) -> Result<PolicyModel, PolicyError> {
    let origin = RuleOrigin {
        kind: PolicyKind::ClusterMeshPolicy,
        namespace: String::new(),
        name: p.metadata.name.clone().unwrap_or_default(),
    };
    translate(p.spec.view(), None, &origin).map_err(|e| e.in_object(&origin))
}

/// Deserializes a MeshPolicy, naming the field path of an unknown field or a wrong type.
///
/// # Errors
/// Wrong `apiVersion`/`kind`, unknown fields, wrong types.
pub fn parse_mesh_policy(value: serde_json::Value) -> Result<MeshPolicy, PolicyError> {
    parse(value, "MeshPolicy")
}

/// Deserializes a ClusterMeshPolicy, naming the field path of an unknown field or a wrong type.
///
/// # Errors
/// Wrong `apiVersion`/`kind`, unknown fields, wrong types.
pub fn parse_cluster_mesh_policy(
    value: serde_json::Value,
) -> Result<ClusterMeshPolicy, PolicyError> {
    parse(value, "ClusterMeshPolicy")
}

/// Deserializes a `nodeward.io/v1alpha1` object of `kind`, naming the object as errors do
/// (`Kind ns/name` for the namespaced kinds, `Kind name` otherwise).
pub(super) fn parse<T: DeserializeOwned>(
    value: serde_json::Value,
    kind: &str,
) -> Result<T, PolicyError> {
    let meta = |key: &str| {
        value
            .pointer(&format!("/metadata/{key}"))
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned)
    };
    let namespaced = kind != "ClusterMeshPolicy";
    let object = match (meta("namespace"), meta("name")) {
        (Some(ns), Some(name)) if namespaced => format!("{kind} {ns}/{name}"),
        (_, Some(name)) => format!("{kind} {name}"),
        (_, None) => format!("{kind} <unnamed>"),
    };
    let error = |field: &str, message: String| PolicyError {
        object: object.clone(),
        field: field.to_owned(),
        message,
    };
    let api_version = value.get("apiVersion").and_then(serde_json::Value::as_str);
    if api_version != Some("nodeward.io/v1alpha1") {
        return Err(error(
            "apiVersion",
            format!("expected nodeward.io/v1alpha1, got {api_version:?}"),
        ));
    }
    let got_kind = value.get("kind").and_then(serde_json::Value::as_str);
    if got_kind != Some(kind) {
        return Err(error("kind", format!("expected {kind}, got {got_kind:?}")));
    }
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { String::new() } else { path };
        error(&field, e.into_inner().to_string())
    })
}

fn translate(
    spec: SpecView<'_>,
    namespace: Option<&str>,
    origin: &RuleOrigin,
) -> Result<PolicyModel, FieldError> {
    if origin.name.is_empty() {
        return Err(FieldError::new("metadata.name", "missing"));
    }
    let subject = Subject {
        namespace: namespace.map(str::to_owned),
        selector: selector(spec.endpoint_selector, "spec.endpointSelector")?,
    };
    let mut rules = Vec::new();
    let sections_in: [(&str, Option<&[IngressRule]>, Action); 2] = [
        ("ingress", spec.ingress, Action::Allow),
        ("ingressDeny", spec.ingress_deny, Action::Deny),
    ];
    for (section, list, action) in sections_in {
        for (i, r) in list.into_iter().flatten().enumerate() {
            let name = format!("{section}[{i}]");
            let path = format!("spec.{name}");
            rules.push(rule(
                name,
                Direction::Ingress,
                action,
                RulePeers {
                    endpoints: r.from_endpoints.as_deref(),
                    entities: r.from_entities.as_deref(),
                    cidrs: r.from_cidr_set.as_deref(),
                    principals: r.from_principals.as_deref(),
                    service_accounts: r.from_service_accounts.as_deref(),
                    fqdns: None,
                    ports: r.to_ports.as_deref(),
                    prefix: "from",
                },
                namespace,
                &path,
            )?);
        }
    }
    let sections_out: [(&str, Option<&[EgressRule]>, Action); 2] = [
        ("egress", spec.egress, Action::Allow),
        ("egressDeny", spec.egress_deny, Action::Deny),
    ];
    for (section, list, action) in sections_out {
        for (i, r) in list.into_iter().flatten().enumerate() {
            let name = format!("{section}[{i}]");
            let path = format!("spec.{name}");
            rules.push(rule(
                name,
                Direction::Egress,
                action,
                RulePeers {
                    endpoints: r.to_endpoints.as_deref(),
                    entities: r.to_entities.as_deref(),
                    cidrs: r.to_cidr_set.as_deref(),
                    // A certificate names the source: egress has no principal peers.
                    principals: None,
                    service_accounts: None,
                    fqdns: r.to_fqdns.as_deref(),
                    ports: r.to_ports.as_deref(),
                    prefix: "to",
                },
                namespace,
                &path,
            )?);
        }
    }
    let switch = spec.enable_default_deny;
    let ingress_enforced = (spec.ingress.is_some() || spec.ingress_deny.is_some())
        && switch.and_then(|d| d.ingress).unwrap_or(true);
    let egress_enforced = (spec.egress.is_some() || spec.egress_deny.is_some())
        && switch.and_then(|d| d.egress).unwrap_or(true);
    Ok(PolicyModel {
        origin: origin.clone(),
        subject,
        ingress_enforced,
        egress_enforced,
        rules,
    })
}

struct RulePeers<'a> {
    endpoints: Option<&'a [EndpointSelector]>,
    entities: Option<&'a [CrdEntity]>,
    cidrs: Option<&'a [CidrRule]>,
    /// `fromPrincipals` (ingress only).
    principals: Option<&'a [String]>,
    /// `fromServiceAccounts` (ingress only).
    service_accounts: Option<&'a [String]>,
    /// `toFQDNs` (egress only).
    fqdns: Option<&'a [FqdnSelector]>,
    ports: Option<&'a [PortRule]>,
    /// `from` or `to`, for field names.
    prefix: &'static str,
}

fn rule(
    name: String,
    direction: Direction,
    action: Action,
    r: RulePeers<'_>,
    namespace: Option<&str>,
    path: &str,
) -> Result<Rule, FieldError> {
    let pre = r.prefix;
    let mut peers = Vec::new();
    for (i, s) in r.endpoints.into_iter().flatten().enumerate() {
        let mut sel = selector(s, &format!("{path}.{pre}Endpoints[{i}]"))?;
        if let Some(ns) = namespace
            && !sel.constrains_namespace()
        {
            sel = sel.with(Requirement::equals(NAMESPACE_LABEL, ns));
        }
        peers.push(Peer::Endpoints(sel));
    }
    for e in r.entities.into_iter().flatten() {
        peers.push(match e {
            CrdEntity::World => Peer::Entity(Entity::World),
            CrdEntity::Host => Peer::Entity(Entity::Host),
            CrdEntity::Cluster => Peer::Entity(Entity::Cluster),
            CrdEntity::RemoteNode => Peer::Entity(Entity::RemoteNode),
            CrdEntity::KubeApiserver => Peer::Entity(Entity::KubeApiserver),
            CrdEntity::All => Peer::Any,
        });
    }
    for (i, c) in r.cidrs.into_iter().flatten().enumerate() {
        let field = format!("{path}.{pre}CIDRSet[{i}]");
        peers.push(parse_cidr(
            &c.cidr,
            &c.except,
            &format!("{field}.cidr"),
            &format!("{field}.except"),
        )?);
    }
    for (i, p) in r.principals.into_iter().flatten().enumerate() {
        let field = format!("{path}.{pre}Principals[{i}]");
        peers.push(Peer::Principal(parse_principal(p, &field)?));
    }
    for (i, a) in r.service_accounts.into_iter().flatten().enumerate() {
        let field = format!("{path}.{pre}ServiceAccounts[{i}]");
        peers.push(Peer::Principal(parse_service_account(
            a, namespace, &field,
        )?));
    }
    for (i, f) in r.fqdns.into_iter().flatten().enumerate() {
        let field = format!("{path}.toFQDNs[{i}]");
        peers.push(Peer::Fqdn(fqdn_selector(f, &field)?));
    }
    let mut ports = Vec::new();
    let mut port_http = Vec::new();
    let mut dns: Option<Vec<FqdnMatch>> = None;
    for (i, p) in r.ports.into_iter().flatten().enumerate() {
        let field = format!("{path}.toPorts[{i}]");
        let specs = port(p, &field)?;
        let http = match p.rules.as_ref().and_then(|r| r.http.as_ref()) {
            Some(_) if direction == Direction::Egress || action == Action::Deny => {
                return Err(FieldError::new(
                    format!("{field}.rules.http"),
                    "HTTP rules list what the selected pods may be asked: only in ingress (allow) rules",
                ));
            }
            Some(list) => Some(super::l7::translate(list, &format!("{field}.rules.http"))?),
            None => None,
        };
        port_http.extend(std::iter::repeat_n(http, specs.len()));
        ports.extend(specs);
        if let Some(list) = p.rules.as_ref().and_then(|r| r.dns.as_ref()) {
            if direction == Direction::Ingress || action == Action::Deny {
                return Err(FieldError::new(
                    format!("{field}.rules.dns"),
                    "DNS rules list what the selected pods may ask for: only in egress (allow) rules",
                ));
            }
            let names = dns.get_or_insert_with(Vec::new);
            for (j, f) in list.iter().enumerate() {
                names.push(fqdn_selector(f, &format!("{field}.rules.dns[{j}]"))?);
            }
        }
    }
    // An L4-only rule (ports but no peer field) applies to every peer, as in Cilium. A rule
    // with neither stays peerless and matches nothing.
    let no_peer_field = r.endpoints.is_none()
        && r.entities.is_none()
        && r.cidrs.is_none()
        && r.principals.is_none()
        && r.service_accounts.is_none()
        && r.fqdns.is_none();
    if no_peer_field && r.ports.is_some_and(|p| !p.is_empty()) {
        peers.push(Peer::Any);
    }
    if port_http.iter().all(Option::is_none) {
        port_http.clear();
    }
    Ok(Rule {
        name,
        direction,
        action,
        peers,
        ports,
        dns,
        port_http,
    })
}

/// A `toFQDNs` or `rules.dns` entry: exactly one of `matchName` and `matchPattern`.
fn fqdn_selector(f: &FqdnSelector, path: &str) -> Result<FqdnMatch, FieldError> {
    match (&f.match_name, &f.match_pattern) {
        (Some(name), None) => FqdnMatch::name(name, &format!("{path}.matchName")),
        (None, Some(pattern)) => FqdnMatch::pattern(pattern, &format!("{path}.matchPattern")),
        _ => Err(FieldError::new(
            path,
            "expected exactly one of matchName and matchPattern",
        )),
    }
}

/// A CRD selector as a validated [`LabelSelector`]; `path` names it in errors.
pub(super) fn selector(s: &EndpointSelector, path: &str) -> Result<LabelSelector, FieldError> {
    LabelSelector::parse(
        s.match_labels.as_ref(),
        s.match_expressions
            .iter()
            .flatten()
            .map(|e| (e.key.as_str(), e.operator.as_str(), e.values.as_deref())),
        path,
    )
}

fn port(p: &PortRule, path: &str) -> Result<Vec<PortSpec>, FieldError> {
    let protocols: &[u8] = match p.protocol.unwrap_or(Protocol::Any) {
        Protocol::Tcp => &[PROTO_TCP],
        Protocol::Udp => &[PROTO_UDP],
        Protocol::Sctp => &[PROTO_SCTP],
        Protocol::Any => &[PROTO_TCP, PROTO_UDP, PROTO_SCTP],
    };
    let end_path = format!("{path}.endPort");
    let port_path = format!("{path}.port");
    let number = match &p.port {
        None if p.end_port.is_some() => {
            return Err(FieldError::new(end_path, "endPort requires a numeric port"));
        }
        None if p.protocol.unwrap_or(Protocol::Any) == Protocol::Any => {
            return Ok(vec![PortSpec::AllOf(0)]);
        }
        None => return Ok(protocols.iter().map(|p| PortSpec::AllOf(*p)).collect()),
        Some(IntOrString::Int(n)) => i64::from(*n),
        Some(IntOrString::String(s)) => match s.parse::<i64>() {
            Ok(n) => n,
            Err(_) => {
                if p.end_port.is_some() {
                    return Err(FieldError::new(
                        end_path,
                        "endPort cannot be used with a named port",
                    ));
                }
                check_port_name(s, &port_path)?;
                return Ok(protocols
                    .iter()
                    .map(|proto| PortSpec::Named {
                        protocol: *proto,
                        name: s.clone(),
                    })
                    .collect());
            }
        },
    };
    let first = check_port(number, &port_path)?;
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
    Ok(protocols
        .iter()
        .map(|proto| PortSpec::Range {
            protocol: *proto,
            first,
            last,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::model::PrincipalMatch;
    use serde_json::json;

    fn mp(spec: serde_json::Value) -> serde_json::Value {
        json!({
            "apiVersion": "nodeward.io/v1alpha1",
            "kind": "MeshPolicy",
            "metadata": {"name": "api", "namespace": "backend"},
            "spec": spec,
        })
    }

    #[test]
    fn unknown_fields_and_wrong_types_name_the_path() {
        let e = parse_mesh_policy(mp(json!({"ingress": [{"toPort": []}]}))).expect_err("typo");
        assert_eq!(e.object, "MeshPolicy backend/api");
        assert_eq!(e.field, "spec.ingress[0].toPort");
        assert!(e.message.contains("unknown field `toPort`"), "{e}");
        let e = parse_mesh_policy(mp(
            json!({"egress": [{"toPorts": [{"port": 80, "protocol": "ICMP"}]}]}),
        ))
        .expect_err("bad protocol");
        assert_eq!(e.field, "spec.egress[0].toPorts[0].protocol");
        let e = parse_mesh_policy(mp(
            json!({"endpointSelector": {"matchExpressions": [{"key": "a", "operator": "Like"}]}}),
        ))
        .expect_err("bad operator");
        assert_eq!(
            e.field,
            "spec.endpointSelector.matchExpressions[0].operator"
        );
        let e = parse_mesh_policy(mp(json!({"ingress": [{"fromEntities": ["moon"]}]})))
            .expect_err("bad entity");
        assert_eq!(e.field, "spec.ingress[0].fromEntities[0]");
        let mut v = mp(json!({}));
        v["kind"] = json!("ClusterMeshPolicy");
        let e = parse_mesh_policy(v).expect_err("wrong kind");
        assert_eq!(e.field, "kind");
    }

    #[test]
    fn validation_errors_name_the_path() {
        let cases = [
            (
                json!({"ingress": [{"fromCIDRSet": [{"cidr": "10.0.0.0/8", "except": ["192.168.0.0/16"]}]}]}),
                "MeshPolicy backend/api: spec.ingress[0].fromCIDRSet[0].except[0]: except 192.168.0.0/16 is not strictly inside 10.0.0.0/8",
            ),
            (
                json!({"egressDeny": [{"toPorts": [{"port": 100, "endPort": 99}]}]}),
                "MeshPolicy backend/api: spec.egressDeny[0].toPorts[0].endPort: endPort 99 is lower than port 100",
            ),
            (
                json!({"egress": [{"toPorts": [{"port": "dns", "endPort": 99}]}]}),
                "MeshPolicy backend/api: spec.egress[0].toPorts[0].endPort: endPort cannot be used with a named port",
            ),
            (
                json!({"ingress": [{"fromEndpoints": [{"matchExpressions": [{"key": "app", "operator": "NotIn"}]}]}]}),
                "MeshPolicy backend/api: spec.ingress[0].fromEndpoints[0].matchExpressions[0].values: operator NotIn requires at least one value",
            ),
            (
                json!({"ingress": [{"toPorts": [{"port": 65536}]}]}),
                "MeshPolicy backend/api: spec.ingress[0].toPorts[0].port: port 65536 is not in 1..=65535",
            ),
        ];
        for (spec, want) in cases {
            let p = parse_mesh_policy(mp(spec.clone())).expect("parses");
            let e = translate_mesh_policy(&p).expect_err("invalid");
            assert_eq!(e.to_string(), want, "for {spec}");
        }
    }

    #[test]
    fn principal_peers_translate_with_the_policy_namespace_for_bare_service_accounts() {
        let p = parse_mesh_policy(mp(json!({
            "ingress": [
                {"fromPrincipals": ["spiffe://cluster.local/ns/shop/sa/api", "spiffe://cluster.local/ns/shop/*"]},
                {"fromServiceAccounts": ["web", "shop/api"], "toPorts": [{"port": 80, "protocol": "TCP"}]},
                {"fromPrincipals": [], "toPorts": [{"port": 80}]},
            ],
        })))
        .expect("parses");
        let m = translate_mesh_policy(&p).expect("valid");
        assert_eq!(
            m.rules[0].peers,
            vec![
                Peer::Principal(PrincipalMatch::Exact(
                    "spiffe://cluster.local/ns/shop/sa/api".into()
                )),
                Peer::Principal(PrincipalMatch::Prefix(
                    "spiffe://cluster.local/ns/shop/".into()
                )),
            ]
        );
        let sa = |namespace: &str, name: &str| {
            Peer::Principal(PrincipalMatch::ServiceAccount {
                namespace: namespace.into(),
                name: name.into(),
            })
        };
        assert_eq!(
            m.rules[1].peers,
            vec![sa("backend", "web"), sa("shop", "api")]
        );
        assert!(
            m.rules[2].peers.is_empty(),
            "an empty principal list is a peer field: the rule matches nothing, not everyone"
        );
    }

    #[test]
    fn principal_errors_name_the_path() {
        let cases = [
            (
                json!({"ingress": [{"fromPrincipals": ["spiffe://cluster.local/ns/a/sa/b", "spiffe://cluster.local/*/sa/b*"]}]}),
                "MeshPolicy backend/api: spec.ingress[0].fromPrincipals[1]: invalid principal \"spiffe://cluster.local/*/sa/b*\": '*' may only be the last character",
            ),
            (
                json!({"ingressDeny": [{"fromPrincipals": ["spiffe://cluster.local/ns/a"]}]}),
                "MeshPolicy backend/api: spec.ingressDeny[0].fromPrincipals[0]: invalid principal \"spiffe://cluster.local/ns/a\": \"spiffe://cluster.local/ns/a\" is not a SPIFFE ID (expected spiffe://<trust-domain>/ns/<namespace>/sa/<account>)",
            ),
            (
                json!({"ingress": [{}, {"fromServiceAccounts": ["shop/Api"]}]}),
                "MeshPolicy backend/api: spec.ingress[1].fromServiceAccounts[0]: invalid service account name \"Api\" in \"shop/Api\": expected 1-63 lowercase alphanumerics or '-', starting and ending with an alphanumeric",
            ),
        ];
        for (spec, want) in cases {
            let p = parse_mesh_policy(mp(spec.clone())).expect("parses");
            let e = translate_mesh_policy(&p).expect_err("invalid");
            assert_eq!(e.to_string(), want, "for {spec}");
        }
        let e = parse_mesh_policy(mp(json!({"egress": [{"toPrincipals": []}]})))
            .expect_err("no egress counterpart");
        assert_eq!(e.field, "spec.egress[0].toPrincipals");
        let c = parse_cluster_mesh_policy(json!({
            "apiVersion": "nodeward.io/v1alpha1",
            "kind": "ClusterMeshPolicy",
            "metadata": {"name": "all"},
            "spec": {"ingress": [{"fromServiceAccounts": ["shop/api", "api"]}]},
        }))
        .expect("parses");
        let e = translate_cluster_mesh_policy(&c).expect_err("bare name");
        assert_eq!(
            e.to_string(),
            "ClusterMeshPolicy all: spec.ingress[0].fromServiceAccounts[1]: service account \"api\" has no namespace: a ClusterMeshPolicy names it as namespace/name"
        );
    }

    #[test]
    fn fqdn_peers_and_dns_rules_translate() {
        let p = parse_mesh_policy(mp(json!({
            "egress": [
                {"toFQDNs": [{"matchName": "API.example.test."}, {"matchPattern": "*.example.test"}],
                 "toPorts": [{"port": 443, "protocol": "TCP"}]},
                {"toPorts": [{"port": 53, "protocol": "UDP", "rules": {"dns": [{"matchPattern": "**.example.test"}]}}]},
                {"toFQDNs": []},
            ],
        })))
        .expect("parses");
        let m = translate_mesh_policy(&p).expect("valid");
        assert_eq!(
            m.rules[0].peers,
            vec![
                Peer::Fqdn(FqdnMatch::Name("api.example.test".into())),
                Peer::Fqdn(FqdnMatch::Pattern("*.example.test".into())),
            ]
        );
        assert_eq!(m.rules[0].dns, None);
        assert_eq!(m.rules[1].peers, vec![Peer::Any]);
        assert_eq!(
            m.rules[1].dns,
            Some(vec![FqdnMatch::Pattern("**.example.test".into())])
        );
        assert!(
            m.rules[2].peers.is_empty(),
            "an empty toFQDNs is a peer field: matches nothing"
        );
    }

    #[test]
    fn fqdn_errors_name_the_path() {
        let cases = [
            (
                json!({"egress": [{"toFQDNs": [{"matchName": "a.test"}, {"matchName": "a..test"}]}]}),
                "MeshPolicy backend/api: spec.egress[0].toFQDNs[1].matchName: invalid matchName \"a..test\": empty label",
            ),
            (
                json!({"egress": [{"toFQDNs": [{"matchName": "a.test", "matchPattern": "*.test"}]}]}),
                "MeshPolicy backend/api: spec.egress[0].toFQDNs[0]: expected exactly one of matchName and matchPattern",
            ),
            (
                json!({"egress": [{"toFQDNs": [{}]}]}),
                "MeshPolicy backend/api: spec.egress[0].toFQDNs[0]: expected exactly one of matchName and matchPattern",
            ),
            (
                json!({"egress": [{"toPorts": [{"port": 53}, {"port": 53, "rules": {"dns": [{"matchPattern": "a.**.test"}]}}]}]}),
                "MeshPolicy backend/api: spec.egress[0].toPorts[1].rules.dns[0].matchPattern: invalid matchPattern \"a.**.test\": '**' may only be the whole first label ('**.example.com')",
            ),
            (
                json!({"ingress": [{"toPorts": [{"port": 53, "rules": {"dns": []}}]}]}),
                "MeshPolicy backend/api: spec.ingress[0].toPorts[0].rules.dns: DNS rules list what the selected pods may ask for: only in egress (allow) rules",
            ),
            (
                json!({"egressDeny": [{"toPorts": [{"port": 53, "rules": {"dns": []}}]}]}),
                "MeshPolicy backend/api: spec.egressDeny[0].toPorts[0].rules.dns: DNS rules list what the selected pods may ask for: only in egress (allow) rules",
            ),
        ];
        for (spec, want) in cases {
            let p = parse_mesh_policy(mp(spec.clone())).expect("parses");
            let e = translate_mesh_policy(&p).expect_err("invalid");
            assert_eq!(e.to_string(), want, "for {spec}");
        }
        let e = parse_mesh_policy(mp(json!({"egress": [{"toFQDNs": [{"matchNames": "a"}]}]})))
            .expect_err("typo");
        assert_eq!(e.field, "spec.egress[0].toFQDNs[0].matchNames");
        let e = parse_mesh_policy(mp(json!({"ingress": [{"fromFQDNs": []}]})))
            .expect_err("no ingress counterpart");
        assert_eq!(e.field, "spec.ingress[0].fromFQDNs");
    }

    #[test]
    fn peer_semantics() {
        let p = parse_mesh_policy(mp(json!({
            "ingress": [
                {"fromEndpoints": [{"matchLabels": {"app": "web"}}]},
                {"fromEndpoints": [{"matchLabels": {"app": "web", "nodeward.io/ns-label.team": "a"}}]},
                {"toPorts": [{"port": 53, "protocol": "UDP"}]},
                {},
            ],
            "enableDefaultDeny": {"egress": false},
            "egressDeny": [{"toEntities": ["world"]}],
        })))
        .expect("parses");
        let m = translate_mesh_policy(&p).expect("valid");
        assert!(m.ingress_enforced);
        assert!(!m.egress_enforced);
        let sel = |i: usize| match &m.rules[i].peers[0] {
            Peer::Endpoints(s) => s.to_string(),
            other => panic!("expected an endpoint peer, got {other:?}"),
        };
        assert_eq!(sel(0), "app=web,nodeward.io/namespace=backend");
        assert_eq!(sel(1), "app=web,nodeward.io/ns-label.team=a");
        assert_eq!(
            m.rules[2].peers,
            vec![Peer::Any],
            "L4-only rule applies to all"
        );
        assert!(m.rules[3].peers.is_empty(), "empty rule matches nothing");
        assert_eq!(m.rules[4].name, "egressDeny[0]");
        assert_eq!(m.rules[4].action, Action::Deny);

        let c = parse_cluster_mesh_policy(json!({
            "apiVersion": "nodeward.io/v1alpha1",
            "kind": "ClusterMeshPolicy",
            "metadata": {"name": "all"},
            "spec": {"ingress": [{"fromEndpoints": [{"matchLabels": {"app": "web"}}]}]},
        }))
        .expect("parses");
        let m = translate_cluster_mesh_policy(&c).expect("valid");
        assert_eq!(m.subject.namespace, None);
        assert_eq!(
            m.rules[0].peers,
            vec![Peer::Endpoints(
                LabelSelector::everything().with(Requirement::equals("app", "web"))
            )]
        );
    }
}
