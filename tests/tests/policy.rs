//! NetworkPolicy enforcement by the real agent in the lab (2 nodes x 3 namespaces x 3 pods).
//!
//! Pods: `frontend/web-N`, `backend/api-N`, `data/db-N`; N = 0 and 2 run on node-1, N = 1 on
//! node-2, so every case below names which pairs cross nodes. Namespaces carry `team=<name>`,
//! pods `app=<web|api|db>` and `instance=<pod name>`. Every test starts with no policy.

use std::time::Duration;

use nodeward_lab::shared::shared_lab;
use nodeward_lab::{Case, DNS_PORT, HTTP_PORT, METRICS_PORT, netpol};
use serde_json::{Value, json};

/// How long a policy change may take to show in the datapath (probes retry until then).
const SETTLE: Duration = Duration::from_secs(10);

fn allow(from: &str, to: &str, port: u16) -> Case {
    Case::tcp(from, to, port, true)
}

fn deny(from: &str, to: &str, port: u16) -> Case {
    Case::tcp(from, to, port, false)
}

#[test]
fn without_policy_every_pod_reaches_every_pod() {
    let lab = shared_lab();
    let keys: Vec<String> = lab.pods().iter().map(nodeward_lab::PodState::key).collect();
    let mut cases = Vec::new();
    for from in &keys {
        for to in keys.iter().filter(|t| *t != from) {
            cases.push(allow(from, to, HTTP_PORT));
        }
    }
    cases.push(allow("frontend/web-1", "data/db-0", METRICS_PORT));
    cases.push(Case::udp("frontend/web-1", "data/db-0", DNS_PORT, true));
    lab.expect(&cases, SETTLE);
}

#[test]
fn status_lists_every_local_pod_as_an_attached_endpoint() {
    let lab = shared_lab();
    for node in lab.node_names() {
        let status = lab.status(&node).expect("status");
        assert_eq!(status["ready"], true, "{node}: {status}");
        assert_eq!(status["node"], node.as_str(), "{status}");
        let endpoints = status["endpoints"]
            .as_array()
            .unwrap_or_else(|| panic!("{node}: no endpoints: {status}"));
        let mut got: Vec<&str> = endpoints.iter().filter_map(|e| e["pod"].as_str()).collect();
        got.sort_unstable();
        let mut want: Vec<String> = lab.pods_on(&node).iter().map(|p| p.key()).collect();
        want.sort();
        assert_eq!(got, want, "{node}: endpoints");
        for e in endpoints {
            assert_eq!(e["attached"], true, "{node}: endpoint not attached: {e}");
            assert!(
                e["identity"].as_u64().is_some_and(|i| i > 0),
                "{node}: endpoint without identity: {e}"
            );
            assert!(
                e["ifindex"].as_u64().is_some_and(|i| i > 0),
                "{node}: endpoint without ifindex: {e}"
            );
        }
    }
}

#[test]
fn deny_all_ingress_isolates_the_namespace_but_not_its_egress() {
    let lab = shared_lab();
    lab.write_manifest("deny-backend", &netpol::deny_all_ingress("backend"))
        .unwrap();
    lab.expect(
        &[
            deny("frontend/web-0", "backend/api-0", HTTP_PORT), // same node
            deny("frontend/web-1", "backend/api-0", HTTP_PORT), // across nodes
            deny("frontend/web-0", "backend/api-1", METRICS_PORT),
            deny("backend/api-2", "backend/api-0", HTTP_PORT), // same namespace
            Case::udp("frontend/web-0", "backend/api-1", DNS_PORT, false),
            allow("backend/api-0", "data/db-1", HTTP_PORT), // backend's egress is untouched
            allow("frontend/web-0", "data/db-1", HTTP_PORT),
        ],
        SETTLE,
    );
}

#[test]
fn ingress_from_namespace_selector() {
    let lab = shared_lab();
    let from = [json!({ "namespaceSelector": { "matchLabels": { "team": "frontend" } } })];
    lab.write_manifest(
        "backend-from-frontend",
        &netpol::allow_ingress("backend", "from-frontend", &json!({}), &from, &[]),
    )
    .unwrap();
    lab.expect(
        &[
            allow("frontend/web-0", "backend/api-0", HTTP_PORT),
            allow("frontend/web-1", "backend/api-2", METRICS_PORT),
            deny("data/db-0", "backend/api-0", HTTP_PORT),
            deny("data/db-1", "backend/api-0", HTTP_PORT),
            deny("backend/api-1", "backend/api-0", HTTP_PORT),
        ],
        SETTLE,
    );
}

#[test]
fn ingress_from_pod_selector_means_the_same_namespace() {
    let lab = shared_lab();
    let from = [json!({ "podSelector": { "matchLabels": { "instance": "db-0" } } })];
    lab.write_manifest(
        "data-from-db0",
        &netpol::allow_ingress("data", "from-db-0", &json!({}), &from, &[]),
    )
    .unwrap();
    lab.expect(
        &[
            allow("data/db-0", "data/db-1", HTTP_PORT),
            allow("data/db-0", "data/db-2", HTTP_PORT),
            deny("data/db-2", "data/db-1", HTTP_PORT),
            deny("data/db-1", "data/db-0", HTTP_PORT),
            deny("frontend/web-0", "data/db-1", HTTP_PORT),
        ],
        SETTLE,
    );
}

#[test]
fn policy_applies_only_to_the_pods_it_selects() {
    let lab = shared_lab();
    let yaml = netpol::network_policy(
        "backend",
        "isolate-api-1",
        &json!({ "podSelector": { "matchLabels": { "instance": "api-1" } }, "policyTypes": ["Ingress"] }),
    );
    lab.write_manifest("isolate-api-1", &yaml).unwrap();
    lab.expect(
        &[
            deny("frontend/web-0", "backend/api-1", HTTP_PORT),
            allow("frontend/web-0", "backend/api-0", HTTP_PORT),
            allow("frontend/web-1", "backend/api-2", HTTP_PORT),
        ],
        SETTLE,
    );
}

#[test]
fn namespace_and_pod_selector_in_one_peer_must_both_match() {
    let lab = shared_lab();
    let from = [json!({
        "namespaceSelector": { "matchLabels": { "team": "frontend" } },
        "podSelector": { "matchLabels": { "instance": "web-1" } },
    })];
    lab.write_manifest(
        "backend-from-web1",
        &netpol::allow_ingress("backend", "from-web-1", &json!({}), &from, &[]),
    )
    .unwrap();
    lab.expect(
        &[
            allow("frontend/web-1", "backend/api-0", HTTP_PORT),
            deny("frontend/web-0", "backend/api-0", HTTP_PORT),
            deny("frontend/web-2", "backend/api-1", HTTP_PORT),
            deny("data/db-1", "backend/api-0", HTTP_PORT),
        ],
        SETTLE,
    );
}

#[test]
fn separate_peers_are_alternatives() {
    let lab = shared_lab();
    let from = [
        json!({ "namespaceSelector": { "matchLabels": { "team": "data" } } }),
        json!({ "podSelector": { "matchLabels": { "instance": "api-2" } } }),
    ];
    lab.write_manifest(
        "backend-either",
        &netpol::allow_ingress("backend", "either", &json!({}), &from, &[]),
    )
    .unwrap();
    lab.expect(
        &[
            allow("data/db-0", "backend/api-0", HTTP_PORT),
            allow("data/db-1", "backend/api-0", HTTP_PORT),
            allow("backend/api-2", "backend/api-1", HTTP_PORT),
            deny("backend/api-1", "backend/api-0", HTTP_PORT),
            deny("frontend/web-0", "backend/api-0", HTTP_PORT),
        ],
        SETTLE,
    );
}

#[test]
fn ports_with_end_port_and_protocols() {
    let lab = shared_lab();
    let anyone = [json!({ "namespaceSelector": {} })];
    let range = [json!({ "protocol": "TCP", "port": 8000, "endPort": 8100 })];
    lab.write_manifest(
        "backend-range",
        &netpol::allow_ingress("backend", "range", &json!({}), &anyone, &range),
    )
    .unwrap();
    let single = [json!({ "protocol": "TCP", "port": METRICS_PORT })];
    lab.write_manifest(
        "data-single",
        &netpol::allow_ingress("data", "single", &json!({}), &anyone, &single),
    )
    .unwrap();
    let udp = [json!({ "protocol": "UDP", "port": DNS_PORT })];
    lab.write_manifest(
        "frontend-udp",
        &netpol::allow_ingress("frontend", "udp", &json!({}), &anyone, &udp),
    )
    .unwrap();
    lab.expect(
        &[
            allow("frontend/web-0", "backend/api-1", HTTP_PORT),
            deny("frontend/web-0", "backend/api-1", METRICS_PORT),
            Case::udp("frontend/web-0", "backend/api-1", DNS_PORT, false),
            allow("frontend/web-1", "data/db-0", METRICS_PORT),
            deny("frontend/web-1", "data/db-0", HTTP_PORT),
            Case::udp("backend/api-0", "frontend/web-1", DNS_PORT, true),
            deny("backend/api-0", "frontend/web-1", HTTP_PORT),
        ],
        SETTLE,
    );
}

#[test]
fn named_ports_resolve_to_the_pods_container_ports() {
    let lab = shared_lab();
    let anyone = [json!({ "namespaceSelector": {} })];
    let http = [json!({ "port": "http" })];
    lab.write_manifest(
        "backend-http",
        &netpol::allow_ingress("backend", "http", &json!({}), &anyone, &http),
    )
    .unwrap();
    let dns = [json!({ "protocol": "UDP", "port": "dns" })];
    lab.write_manifest(
        "data-dns",
        &netpol::allow_ingress("data", "dns", &json!({}), &anyone, &dns),
    )
    .unwrap();
    lab.expect(
        &[
            allow("frontend/web-1", "backend/api-0", HTTP_PORT),
            deny("frontend/web-1", "backend/api-0", METRICS_PORT),
            Case::udp("frontend/web-0", "data/db-1", DNS_PORT, true),
            deny("frontend/web-0", "data/db-1", HTTP_PORT),
        ],
        SETTLE,
    );
}

#[test]
fn ip_block_with_except() {
    let lab = shared_lab();
    let web0 = lab.pod("frontend/web-0").ip4;
    let from =
        [json!({ "ipBlock": { "cidr": "10.244.0.0/16", "except": [format!("{web0}/32")] } })];
    lab.write_manifest(
        "data-cidr",
        &netpol::allow_ingress("data", "cidr", &json!({}), &from, &[]),
    )
    .unwrap();
    lab.expect(
        &[
            allow("frontend/web-1", "data/db-0", HTTP_PORT),
            allow("frontend/web-2", "data/db-1", HTTP_PORT),
            allow("backend/api-0", "data/db-2", HTTP_PORT),
            deny("frontend/web-0", "data/db-0", HTTP_PORT),
            deny("frontend/web-0", "data/db-1", HTTP_PORT),
        ],
        SETTLE,
    );
}

#[test]
fn egress_deny_all_then_allow_one_namespace_and_port() {
    let lab = shared_lab();
    lab.write_manifest("frontend-deny-egress", &netpol::deny_all_egress("frontend"))
        .unwrap();
    lab.expect(
        &[
            deny("frontend/web-0", "backend/api-0", HTTP_PORT),
            deny("frontend/web-1", "data/db-1", HTTP_PORT),
            deny("frontend/web-0", "frontend/web-2", HTTP_PORT),
            // Ingress to frontend is not restricted, and replies are not new egress.
            allow("backend/api-0", "frontend/web-0", HTTP_PORT),
            allow("data/db-1", "frontend/web-2", HTTP_PORT),
        ],
        SETTLE,
    );
    let to_backend = netpol::network_policy(
        "frontend",
        "egress-to-backend",
        &json!({
            "podSelector": {},
            "policyTypes": ["Egress"],
            "egress": [{
                "to": [{ "namespaceSelector": { "matchLabels": { "team": "backend" } } }],
                "ports": [{ "protocol": "TCP", "port": HTTP_PORT }],
            }],
        }),
    );
    lab.write_manifest("frontend-egress-backend", &to_backend)
        .unwrap();
    lab.expect(
        &[
            allow("frontend/web-0", "backend/api-0", HTTP_PORT),
            allow("frontend/web-1", "backend/api-0", HTTP_PORT),
            deny("frontend/web-0", "backend/api-0", METRICS_PORT),
            deny("frontend/web-0", "data/db-0", HTTP_PORT),
        ],
        SETTLE,
    );
}

/// Dotted Hubble field (`IP.destination`), in a flow printed bare or wrapped as `{"flow": ...}`.
fn field<'a>(flow: &'a Value, path: &str) -> &'a Value {
    let flow = flow.get("flow").unwrap_or(flow);
    path.split('.').fold(flow, |v, key| &v[key])
}

fn observed(lab: &nodeward_lab::Lab, args: &[&str]) -> Vec<Value> {
    lab.node_names()
        .iter()
        .flat_map(|node| {
            lab.observe(node, args)
                .unwrap_or_else(|e| panic!("observe on {node}: {e:#}"))
        })
        .collect()
}

#[test]
fn dropped_flow_appears_in_observe() {
    let lab = shared_lab();
    lab.write_manifest("deny-data", &netpol::deny_all_ingress("data"))
        .unwrap();
    lab.expect(&[deny("frontend/web-1", "data/db-0", HTTP_PORT)], SETTLE);
    let (src, dst) = (
        lab.pod("frontend/web-1").ip4.to_string(),
        lab.pod("data/db-0").ip4.to_string(),
    );
    let mut seen = Vec::new();
    let found =
        nodeward_lab::eventually(Duration::from_secs(5), Duration::from_millis(200), || {
            assert!(!lab.tcp_probe(
                "frontend/web-1",
                "data/db-0",
                HTTP_PORT,
                Duration::from_millis(300)
            ));
            seen = observed(&lab, &["--last", "500", "--verdict", "DROPPED"]);
            seen.iter().any(|f| {
                field(f, "IP.source") == src.as_str()
                    && field(f, "IP.destination") == dst.as_str()
                    && field(f, "l4.TCP.destination_port") == HTTP_PORT
            })
        });
    assert!(
        found,
        "no DROPPED flow {src} -> {dst}:{HTTP_PORT} in observe; it printed {} flows: {seen:#?}",
        seen.len()
    );
    let flow = seen
        .iter()
        .find(|f| field(f, "IP.destination") == dst.as_str())
        .expect("found above");
    assert_eq!(field(flow, "verdict"), "DROPPED", "{flow}");
    assert_eq!(field(flow, "source.namespace"), "frontend", "{flow}");
    assert_eq!(field(flow, "source.pod_name"), "web-1", "{flow}");
    assert_eq!(field(flow, "destination.namespace"), "data", "{flow}");
    assert_eq!(field(flow, "destination.pod_name"), "db-0", "{flow}");
    assert!(
        field(flow, "drop_reason_desc")
            .as_str()
            .is_some_and(|d| !d.is_empty()),
        "no drop reason: {flow}"
    );
}

#[test]
fn allowed_flow_appears_in_observe_as_forwarded() {
    let lab = shared_lab();
    lab.expect(&[allow("backend/api-1", "data/db-2", HTTP_PORT)], SETTLE);
    let dst = lab.pod("data/db-2").ip4.to_string();
    let mut seen = Vec::new();
    let found =
        nodeward_lab::eventually(Duration::from_secs(5), Duration::from_millis(200), || {
            seen = observed(&lab, &["--last", "500", "--verdict", "FORWARDED"]);
            seen.iter().any(|f| {
                field(f, "IP.destination") == dst.as_str()
                    && field(f, "l4.TCP.destination_port") == HTTP_PORT
            })
        });
    assert!(
        found,
        "no FORWARDED flow to {dst}:{HTTP_PORT} in observe: {seen:#?}"
    );
}
