//! Services in the lab: pods dial a ClusterIP, and the agent's cgroup programs translate it to a
//! backend pod before any packet exists, so policy, flows and the tunnel see the pod.
//!
//! kube-proxy is simulated as its iptables mode works: DNAT in each node's nat PREROUTING, which
//! runs after nodeward's TC hook on the pod's interface. A client outside the agent's cgroup
//! (this test process, entering only the pod's network namespace) takes that path, and policy
//! then sees the ClusterIP (`world`); a client in the pod's cgroup (`nodeward-lab-load probe`)
//! is translated first. Pods: `frontend/web-N`, `backend/api-N`, `data/db-N`; N = 0 and 2 on
//! node-1, N = 1 on node-2. Every test makes Services of its own (ClusterIPs 10.96.1.x).

use std::io::BufRead as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nodeward_lab::load::{Process, in_pod};
use nodeward_lab::manifests::{SimpleService, bulk_services, documents};
use nodeward_lab::shared::shared_lab;
use nodeward_lab::{Case, HTTP_PORT, Lab, METRICS_PORT, eventually, netpol};
use serde_json::{Value, json};

const SETTLE: Duration = Duration::from_secs(10);

fn load_bin() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_BIN_EXE_nodeward-lab-load"))
}

/// A Service `name` in `namespace` at `vip:80` (TCP, target port 8080 by the slice's `http`)
/// with one EndpointSlice of `backends` (pod key, ready).
fn service(namespace: &str, name: &str, vip: Ipv4Addr, backends: &[(&Lab, &str, bool)]) -> String {
    service_to(namespace, name, vip, HTTP_PORT, backends)
}

/// [`service_to`] with more fields in the Service's spec.
fn service_with(
    namespace: &str,
    name: &str,
    vip: Ipv4Addr,
    spec: &Value,
    backends: &[(&Lab, &str, bool)],
) -> String {
    let mut docs: Vec<Value> = serde_yaml_ng::Deserializer::from_str(&service_to(
        namespace, name, vip, HTTP_PORT, backends,
    ))
    .map(|d| serde::Deserialize::deserialize(d).expect("our own YAML"))
    .collect();
    if let (Some(into), Some(from)) = (docs[0]["spec"].as_object_mut(), spec.as_object()) {
        into.extend(from.clone());
    }
    documents(docs)
}

/// The same with the backends' port `target`.
fn service_to(
    namespace: &str,
    name: &str,
    vip: Ipv4Addr,
    target: u16,
    backends: &[(&Lab, &str, bool)],
) -> String {
    let endpoints: Vec<Value> = backends
        .iter()
        .map(|(lab, pod, ready)| {
            let p = lab.pod(pod);
            json!({
                "addresses": [p.ip4.to_string()],
                "conditions": { "ready": ready, "serving": ready, "terminating": false },
                "nodeName": p.node,
                "targetRef": { "kind": "Pod", "name": p.name, "namespace": p.namespace },
            })
        })
        .collect();
    documents([
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": { "name": name, "namespace": namespace },
            "spec": {
                "clusterIP": vip.to_string(),
                "ports": [{ "name": "http", "port": 80, "targetPort": "http" }],
            },
        }),
        json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": format!("{name}-1"),
                "namespace": namespace,
                "labels": { "kubernetes.io/service-name": name },
            },
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": [{ "name": "http", "port": target, "protocol": "TCP" }],
        }),
    ])
}

/// `nodeward-lab-load probe ARGS` as a process of pod `from` (in its cgroup): its JSON lines.
fn probe(lab: &Lab, from: &str, addr: SocketAddr, args: &[&str]) -> Vec<Value> {
    let out = in_pod(lab.pod(from), load_bin())
        .arg("probe")
        .args(["--addr", &addr.to_string()])
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .expect("running nodeward-lab-load probe");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("probe printed {l:?}: {e}")))
        .collect()
}

/// One TCP probe that must succeed within `SETTLE` (the agents pick a new manifest up in
/// milliseconds; the loop covers a busy machine).
fn probe_ok(lab: &Lab, from: &str, addr: SocketAddr) -> Value {
    let mut last = Vec::new();
    let ok = eventually(SETTLE, Duration::from_millis(100), || {
        last = probe(lab, from, addr, &["--timeout-ms", "1000"]);
        last.first().is_some_and(|l| l["ok"] == true)
    });
    assert!(ok, "{from} -> {addr} never succeeded: {last:?}");
    last.remove(0)
}

/// The flow from `from` with TCP source port `port`, as node `node` recorded it.
fn flow_of(lab: &Lab, node: &str, from: &str, port: u64) -> Value {
    let mut found = None;
    let seen = eventually(Duration::from_secs(5), Duration::from_millis(100), || {
        let flows = lab
            .observe(node, &["--last", "500", "--from-pod", from])
            .unwrap_or_default();
        found = flows
            .into_iter()
            .find(|f| f["l4"]["TCP"]["source_port"].as_u64() == Some(port));
        found.is_some()
    });
    assert!(
        seen,
        "no flow from {from} with source port {port} on {node}"
    );
    found.unwrap_or_default()
}

/// The pod (`ns/name`) that flow went to.
fn flow_destination(lab: &Lab, node: &str, from: &str, port: u64) -> String {
    let f = flow_of(lab, node, from, port);
    format!(
        "{}/{}",
        f["destination"]["namespace"].as_str().unwrap_or_default(),
        f["destination"]["pod_name"].as_str().unwrap_or_default()
    )
}

/// kube-proxy's iptables mode for one Service port on every node: DNAT in nat PREROUTING.
/// Removed when dropped.
struct KubeProxy {
    rules: Vec<(String, Vec<String>)>,
}

impl KubeProxy {
    fn dnat(lab: &Lab, vip: Ipv4Addr, backend: &str, port: u16) -> Self {
        let to = format!("{}:{port}", lab.pod(backend).ip4);
        let rule: Vec<String> = [
            "PREROUTING",
            "-d",
            &format!("{vip}/32"),
            "-p",
            "tcp",
            "--dport",
            "80",
            "-j",
            "DNAT",
            "--to-destination",
            &to,
        ]
        .iter()
        .map(ToString::to_string)
        .collect();
        let mut rules = Vec::new();
        for node in lab.nodes() {
            let status = Command::new("ip")
                .args(["netns", "exec", &node.netns, "iptables", "-t", "nat", "-A"])
                .args(&rule)
                .status()
                .expect("running iptables");
            assert!(status.success(), "iptables DNAT in {} failed", node.netns);
            rules.push((node.netns.clone(), rule.clone()));
        }
        Self { rules }
    }
}

impl Drop for KubeProxy {
    fn drop(&mut self) {
        for (netns, rule) in &self.rules {
            let _ = Command::new("ip")
                .args(["netns", "exec", netns, "iptables", "-t", "nat", "-D"])
                .args(rule)
                .status();
        }
    }
}

#[test]
fn an_egress_allow_by_pod_selector_admits_the_pods_service() {
    let lab = shared_lab();
    let vip = Ipv4Addr::new(10, 96, 1, 1);
    let addr = SocketAddr::new(vip.into(), 80);
    // api-1 is on the other node: the connection crosses the underlay. Its port 9090 backs
    // this Service alone (the lab's `api` Service has 8080), so flows can name the Service.
    lab.write_manifest(
        "svc-allow",
        &service_to(
            "backend",
            "svc-allow",
            vip,
            METRICS_PORT,
            &[(&lab, "backend/api-1", true)],
        ),
    )
    .unwrap();
    let _kube_proxy = KubeProxy::dnat(&lab, vip, "backend/api-1", METRICS_PORT);
    lab.write_manifest(
        "web-egress",
        &netpol::mesh_policy(
            "frontend",
            "web-egress",
            &json!({
                "endpointSelector": { "matchLabels": { "app": "web" } },
                "egress": [{
                    "toEndpoints": [{ "matchLabels": {
                        "app": "api", "nodeward.io/namespace": "backend" } }],
                    "toPorts": [{ "port": METRICS_PORT, "protocol": "TCP" }],
                }],
            }),
        ),
    )
    .unwrap();
    // The policy is in force: the pod IP of a db pod is refused, api's is allowed.
    lab.expect(
        &[
            Case::tcp("frontend/web-0", "data/db-1", METRICS_PORT, false),
            Case::tcp("frontend/web-0", "backend/api-1", METRICS_PORT, true),
        ],
        SETTLE,
    );
    let start = Instant::now();
    let line = probe_ok(&lab, "frontend/web-0", addr);
    assert_eq!(
        line["peer"], "10.96.1.1:80",
        "the application must see the ClusterIP as its peer: {line}"
    );
    let port = line["local_port"].as_u64().expect("local port");
    let flow = flow_of(&lab, "node-1", "frontend/web-0", port);
    assert_eq!(
        (&flow["destination"]["pod_name"], &flow["verdict"]),
        (&json!("api-1"), &json!("FORWARDED")),
        "the flow must name the backend pod: {flow}"
    );
    assert_eq!(
        flow["destination_service"],
        json!({ "name": "svc-allow", "namespace": "backend" }),
        "the flow must name the Service: {flow}"
    );
    let by_service = lab
        .observe(
            "node-1",
            &["--last", "500", "--to-service", "backend/svc-allow"],
        )
        .unwrap();
    assert!(
        !by_service.is_empty()
            && by_service
                .iter()
                .all(|f| f["destination_service"]["name"] == "svc-allow"),
        "observe --to-service: {by_service:?}"
    );
    // Outside the cgroup, the packet leaves the pod with the ClusterIP: kube-proxy's DNAT comes
    // after nodeward's hook, which sees `world` and drops it under the egress policy.
    assert!(
        !nodeward_lab::probe::tcp_probe(
            &lab.pod("frontend/web-0").netns,
            addr,
            Duration::from_millis(800)
        ),
        "an untranslated connection to the ClusterIP was admitted (policy saw the backend?)"
    );
    eprintln!("translated and admitted in {:?}", start.elapsed());
}

#[test]
fn an_egress_deny_to_a_pod_covers_its_service() {
    let lab = shared_lab();
    let denied = Ipv4Addr::new(10, 96, 1, 2);
    let allowed = Ipv4Addr::new(10, 96, 1, 5);
    let mut yaml = service("data", "svc-deny", denied, &[(&lab, "data/db-1", true)]);
    yaml.push_str(&service(
        "backend",
        "svc-other",
        allowed,
        &[(&lab, "backend/api-1", true)],
    ));
    lab.write_manifest("svc-deny", &yaml).unwrap();
    lab.write_manifest(
        "web-deny-db",
        &netpol::mesh_policy(
            "frontend",
            "web-deny-db",
            &json!({
                "endpointSelector": { "matchLabels": { "app": "web" } },
                "enableDefaultDeny": { "egress": false },
                "egressDeny": [{
                    "toEndpoints": [{ "matchLabels": {
                        "app": "db", "nodeward.io/namespace": "data" } }],
                }],
            }),
        ),
    )
    .unwrap();
    lab.expect(
        &[Case::tcp("frontend/web-0", "data/db-1", HTTP_PORT, false)],
        SETTLE,
    );
    // The same client reaches another Service, so the refusal below is the deny's.
    probe_ok(&lab, "frontend/web-0", SocketAddr::new(allowed.into(), 80));
    let lines = probe(
        &lab,
        "frontend/web-0",
        SocketAddr::new(denied.into(), 80),
        &["--timeout-ms", "1000", "--count", "3"],
    );
    assert_eq!(lines.len(), 3, "{lines:?}");
    for line in &lines {
        assert_eq!(
            line["ok"], false,
            "the deny to db-1 let its Service through: {line}"
        );
    }
}

#[test]
fn a_service_without_ready_endpoints_refuses_at_once_and_recovers() {
    let lab = shared_lab();
    let vip = Ipv4Addr::new(10, 96, 1, 3);
    let addr = SocketAddr::new(vip.into(), 80);
    let refused = |lab: &Lab| {
        let mut last = Vec::new();
        let ok = eventually(SETTLE, Duration::from_millis(100), || {
            last = probe(lab, "frontend/web-0", addr, &["--timeout-ms", "1000"]);
            last.first()
                .is_some_and(|l| l["errno"] == libc_econnrefused())
        });
        assert!(ok, "never refused: {last:?}");
        let ms = last[0]["ms"].as_f64().unwrap_or(f64::MAX);
        assert!(ms < 100.0, "refused only after {ms} ms: {last:?}");
    };
    lab.write_manifest(
        "svc-empty",
        &service(
            "backend",
            "svc-empty",
            vip,
            &[(&lab, "backend/api-0", false)],
        ),
    )
    .unwrap();
    refused(&lab);
    // `nodeward services` lists the frontend with its endpoint, not in use; status and metrics
    // count it.
    let listed = lab.services("node-1").unwrap();
    let port = listed["ports"]
        .as_array()
        .and_then(|ports| ports.iter().find(|p| p["frontend"]["addr"] == "10.96.1.3"))
        .unwrap_or_else(|| panic!("10.96.1.3 is not listed: {listed}"));
    assert_eq!(port["service"]["name"], "svc-empty", "{port}");
    assert_eq!(port["endpoints"][0]["ready"], false, "{port}");
    assert_eq!(port["endpoints"][0]["used"], false, "{port}");
    let status = lab.status("node-1").unwrap();
    assert_eq!(status["services"]["translating"], true, "{status}");
    assert!(
        status["services"]["without_backends"].as_u64() >= Some(1),
        "{}",
        status["services"]
    );
    let metrics = lab.agent_http_get("node-1", "/metrics").unwrap();
    let refusals = metrics
        .lines()
        .find_map(|l| l.strip_prefix("nodeward_service_no_backend_total "))
        .and_then(|v| v.trim().parse::<f64>().ok());
    assert!(
        refusals.is_some_and(|n| n >= 1.0),
        "no refusal counted: {refusals:?}"
    );
    // Flapping: a ready backend is used, and when it goes, connects are refused again.
    lab.write_manifest(
        "svc-empty",
        &service(
            "backend",
            "svc-empty",
            vip,
            &[(&lab, "backend/api-0", true)],
        ),
    )
    .unwrap();
    probe_ok(&lab, "frontend/web-0", addr);
    lab.write_manifest(
        "svc-empty",
        &service(
            "backend",
            "svc-empty",
            vip,
            &[(&lab, "backend/api-0", false)],
        ),
    )
    .unwrap();
    refused(&lab);
}

const fn libc_econnrefused() -> i32 {
    111
}

#[test]
fn a_backend_removed_from_the_slice_gets_no_new_connections_and_a_live_one_keeps_working() {
    let lab = shared_lab();
    let vip = Ipv4Addr::new(10, 96, 1, 4);
    let addr = SocketAddr::new(vip.into(), 80);
    lab.write_manifest(
        "svc-move",
        &service("backend", "svc-move", vip, &[(&lab, "backend/api-1", true)]),
    )
    .unwrap();
    probe_ok(&lab, "frontend/web-0", addr);
    // A connection to api-1, held open while api-1 leaves the slice.
    let mut held = Process::spawn(
        in_pod(lab.pod("frontend/web-0"), load_bin())
            .arg("probe")
            .args(["--addr", &addr.to_string(), "--hold-secs", "6"])
            .stdout(Stdio::piped()),
        "the held connection",
    )
    .unwrap();
    let mut lines = std::io::BufReader::new(held.stdout().expect("piped")).lines();
    let first: Value = serde_json::from_str(&lines.next().expect("a line").unwrap()).unwrap();
    assert_eq!(first["ok"], true, "{first}");
    let port = first["local_port"].as_u64().unwrap();
    assert_eq!(
        flow_destination(&lab, "node-1", "frontend/web-0", port),
        "backend/api-1"
    );
    lab.write_manifest(
        "svc-move",
        &service("backend", "svc-move", vip, &[(&lab, "backend/api-2", true)]),
    )
    .unwrap();
    // Once the agent has the new slice, every new connection goes to api-2.
    let moved = eventually(SETTLE, Duration::from_millis(100), || {
        let line = probe_ok(&lab, "frontend/web-0", addr);
        let port = line["local_port"].as_u64().unwrap();
        flow_destination(&lab, "node-1", "frontend/web-0", port) == "backend/api-2"
    });
    assert!(moved, "new connections never went to the new backend");
    let lines10 = probe(&lab, "frontend/web-0", addr, &["--count", "10"]);
    assert_eq!(lines10.len(), 10);
    for line in &lines10 {
        assert_eq!(line["ok"], true, "{line}");
        let port = line["local_port"].as_u64().unwrap();
        assert_eq!(
            flow_destination(&lab, "node-1", "frontend/web-0", port),
            "backend/api-2",
            "a new connection went to the removed backend"
        );
    }
    let last: Value = serde_json::from_str(&lines.next().expect("a last line").unwrap()).unwrap();
    assert_eq!(
        last["alive"], true,
        "the live connection to the removed backend was cut"
    );
    drop(held);
}

#[test]
fn service_connections_keep_working_while_the_agent_restarts() {
    let mut lab = shared_lab();
    let vip = Ipv4Addr::new(10, 96, 1, 6);
    let addr = SocketAddr::new(vip.into(), 80);
    lab.write_manifest(
        "svc-restart",
        &service(
            "backend",
            "svc-restart",
            vip,
            &[(&lab, "backend/api-1", true), (&lab, "backend/api-2", true)],
        ),
    )
    .unwrap();
    probe_ok(&lab, "frontend/web-0", addr);
    // The pinned programs and maps keep translating with no agent at all...
    lab.kill_agent("node-1").unwrap();
    let lines = probe(&lab, "frontend/web-0", addr, &["--count", "5"]);
    assert!(
        lines.len() == 5
            && lines
                .iter()
                .all(|l| l["ok"] == true && l["peer"] == "10.96.1.6:80"),
        "without its agent, node-1 stopped translating: {lines:?}"
    );
    // ...and while the next one starts and takes over (probes every 50 ms meanwhile).
    let mut during = Process::spawn(
        in_pod(lab.pod("frontend/web-0"), load_bin())
            .arg("probe")
            .args(["--addr", &addr.to_string(), "--count", "60"])
            .args(["--interval-ms", "50", "--timeout-ms", "1000"])
            .stdout(Stdio::piped()),
        "probes during the restart",
    )
    .unwrap();
    let stdout = during.stdout().expect("piped");
    lab.start_agent("node-1").unwrap();
    let lines: Vec<Value> = std::io::BufReader::new(stdout)
        .lines()
        .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
        .collect();
    assert_eq!(lines.len(), 60, "{lines:?}");
    let failed: Vec<&Value> = lines.iter().filter(|l| l["ok"] != true).collect();
    assert!(failed.is_empty(), "failed during the restart: {failed:?}");
    let lines = probe(&lab, "frontend/web-0", addr, &["--count", "5"]);
    assert!(
        lines.iter().all(|l| l["ok"] == true),
        "after the restart: {lines:?}"
    );
}

#[test]
fn an_egress_allow_admits_the_service_over_udp_and_replies_come_from_the_cluster_ip() {
    let lab = shared_lab();
    // The lab's own Services: `api` at 10.96.0.11, `db` at 10.96.0.12, `dns` 53/UDP to 5353.
    let api = SocketAddr::new(nodeward_lab::manifests::cluster_ip(1).into(), 53);
    let db = SocketAddr::new(nodeward_lab::manifests::cluster_ip(2).into(), 53);
    lab.write_manifest(
        "web-egress-udp",
        &netpol::mesh_policy(
            "frontend",
            "web-egress-udp",
            &json!({
                "endpointSelector": { "matchLabels": { "app": "web" } },
                "egress": [{
                    "toEndpoints": [{ "matchLabels": {
                        "app": "api", "nodeward.io/namespace": "backend" } }],
                    "toPorts": [{ "port": nodeward_lab::DNS_PORT, "protocol": "UDP" }],
                }],
            }),
        ),
    )
    .unwrap();
    lab.expect(
        &[
            Case::udp("frontend/web-0", "data/db-1", nodeward_lab::DNS_PORT, false),
            Case::udp(
                "frontend/web-0",
                "backend/api-1",
                nodeward_lab::DNS_PORT,
                true,
            ),
        ],
        SETTLE,
    );
    for proto in ["udp", "udpc"] {
        let lines = probe(
            &lab,
            "frontend/web-0",
            api,
            &["--proto", proto, "--count", "5", "--timeout-ms", "1000"],
        );
        assert_eq!(lines.len(), 5, "{proto}: {lines:?}");
        for line in &lines {
            assert_eq!(line["ok"], true, "{proto}: {line}");
            assert_eq!(
                line["peer"], "10.96.0.11:53",
                "{proto}: the reply must come from the ClusterIP: {line}"
            );
        }
        let denied = probe(
            &lab,
            "frontend/web-0",
            db,
            &["--proto", proto, "--timeout-ms", "500"],
        );
        assert_eq!(
            denied[0]["ok"], false,
            "{proto}: db's Service passed: {denied:?}"
        );
    }
}

#[test]
fn strict_meshed_pods_reach_a_service_through_the_tunnel_only() {
    let lab = shared_lab();
    for ns in ["frontend", "backend"] {
        lab.write_manifest(&format!("mtls-{ns}"), &netpol::mutual_tls(ns, "STRICT"))
            .unwrap();
    }
    for node in lab.node_names() {
        let want = lab
            .pods_on(&node)
            .iter()
            .filter(|p| p.namespace == "frontend" || p.namespace == "backend")
            .count() as u64;
        let meshed = eventually(SETTLE, Duration::from_millis(50), || {
            lab.status(&node)
                .is_ok_and(|s| s["tunnel"]["meshed_endpoints"].as_u64() == Some(want))
        });
        assert!(
            meshed,
            "{node}: the agent did not count {want} meshed endpoints"
        );
    }
    // api-0 is on node-1, web-1 on node-2: the connection crosses the underlay.
    let vip = Ipv4Addr::new(10, 96, 1, 7);
    let addr = SocketAddr::new(vip.into(), 80);
    lab.write_manifest(
        "svc-mesh",
        &service("backend", "svc-mesh", vip, &[(&lab, "backend/api-0", true)]),
    )
    .unwrap();
    probe_ok(&lab, "frontend/web-1", addr);
    let pcap = lab.state().dir.join("tmp").join("services-underlay.pcap");
    let capture =
        nodeward_lab::capture::Capture::start(&lab.state().underlay_netns, "br0", "tcp", &pcap)
            .unwrap();
    let lines = probe(&lab, "frontend/web-1", addr, &["--count", "5"]);
    let (_, packets) = capture.stop().unwrap();
    assert!(
        lines.len() == 5
            && lines
                .iter()
                .all(|l| l["ok"] == true && l["peer"] == "10.96.1.7:80"),
        "STRICT pods could not talk through the Service: {lines:?}"
    );
    assert!(
        packets.lines().any(|l| l.contains(".15008")),
        "the underlay saw no HBONE (port 15008) traffic:\n{packets}"
    );
    let plaintext: Vec<&str> = packets
        .lines()
        .filter(|l| l.contains(&format!(".{HTTP_PORT}")) || l.contains("10.96.1.7"))
        .collect();
    assert!(
        plaintext.is_empty(),
        "Service traffic crossed the underlay outside the tunnel:\n{plaintext:#?}"
    );
}

#[test]
fn a_dual_stack_service_is_translated_over_ipv6() {
    let lab = shared_lab();
    // The lab's `api` Service: fd00:96::b, http 80 and dns 53/UDP, backends on both nodes.
    let vip = nodeward_lab::manifests::cluster_ip6(1);
    let http = SocketAddr::new(vip.into(), 80);
    let line = probe_ok(&lab, "frontend/web-0", http);
    assert_eq!(line["peer"], "[fd00:96::b]:80", "{line}");
    let port = line["local_port"].as_u64().expect("local port");
    let to = flow_destination(&lab, "node-1", "frontend/web-0", port);
    assert!(to.starts_with("backend/api-"), "the flow went to {to}");
    for proto in ["udp", "udpc"] {
        let lines = probe(
            &lab,
            "frontend/web-0",
            SocketAddr::new(vip.into(), 53),
            &["--proto", proto, "--count", "3", "--timeout-ms", "1000"],
        );
        assert!(
            lines.len() == 3
                && lines
                    .iter()
                    .all(|l| l["ok"] == true && l["peer"] == "[fd00:96::b]:53"),
            "{proto} over IPv6: {lines:?}"
        );
    }
}

#[test]
fn session_affinity_client_ip_keeps_a_pod_on_one_backend() {
    let lab = shared_lab();
    let vip = Ipv4Addr::new(10, 96, 1, 8);
    let addr = SocketAddr::new(vip.into(), 80);
    lab.write_manifest(
        "svc-sticky",
        &service_with(
            "backend",
            "svc-sticky",
            vip,
            &json!({ "sessionAffinity": "ClientIP" }),
            &[(&lab, "backend/api-1", true), (&lab, "backend/api-2", true)],
        ),
    )
    .unwrap();
    probe_ok(&lab, "frontend/web-0", addr);
    let lines = probe(&lab, "frontend/web-0", addr, &["--count", "12"]);
    assert_eq!(lines.len(), 12, "{lines:?}");
    let mut backends = std::collections::BTreeSet::new();
    for line in &lines {
        assert_eq!(line["ok"], true, "{line}");
        let port = line["local_port"].as_u64().unwrap();
        backends.insert(flow_destination(&lab, "node-1", "frontend/web-0", port));
    }
    // Without affinity, 12 random picks of 2 land on one backend 1 time in 2,048.
    assert_eq!(
        backends.len(),
        1,
        "one pod's connections spread: {backends:?}"
    );
}

#[test]
fn internal_traffic_policy_local_keeps_each_node_on_its_own_backends() {
    let lab = shared_lab();
    let vip = Ipv4Addr::new(10, 96, 1, 9);
    let addr = SocketAddr::new(vip.into(), 80);
    lab.write_manifest(
        "svc-local",
        &service_with(
            "backend",
            "svc-local",
            vip,
            &json!({ "internalTrafficPolicy": "Local" }),
            &[(&lab, "backend/api-1", true), (&lab, "backend/api-2", true)],
        ),
    )
    .unwrap();
    // web-0 and api-2 are on node-1, web-1 and api-1 on node-2.
    for (from, node, want) in [
        ("frontend/web-0", "node-1", "backend/api-2"),
        ("frontend/web-1", "node-2", "backend/api-1"),
    ] {
        probe_ok(&lab, from, addr);
        let lines = probe(&lab, from, addr, &["--count", "6"]);
        assert_eq!(lines.len(), 6, "{lines:?}");
        for line in &lines {
            assert_eq!(line["ok"], true, "{from}: {line}");
            let port = line["local_port"].as_u64().unwrap();
            assert_eq!(
                flow_destination(&lab, node, from, port),
                want,
                "{from} left its node"
            );
        }
    }
}

/// The benchmark's Service table size (1,000 Services, 10,000 backends) in the lab: it fits the
/// maps, and a Service among them translates. Prints how long the table took to reach the
/// kernel and the agent's RSS (a debug build here; the release build is smaller).
#[test]
fn a_thousand_services_with_ten_thousand_backends_fit_and_translate() {
    let lab = shared_lab();
    let docs = bulk_services("backend", 1000, 10)
        .iter()
        .flat_map(SimpleService::documents)
        .collect::<Vec<_>>();
    let vip = Ipv4Addr::new(10, 96, 1, 10);
    let mut yaml = documents(docs);
    yaml.push_str(&service(
        "backend",
        "svc-target",
        vip,
        &[(&lab, "backend/api-1", true)],
    ));
    let written = Instant::now();
    lab.write_manifest("svc-bulk", &yaml).unwrap();
    probe_ok(&lab, "frontend/web-0", SocketAddr::new(vip.into(), 80));
    let reached = written.elapsed();
    // The status is published just after the maps are written.
    let mut status = Value::Null;
    let fit = eventually(SETTLE, Duration::from_millis(50), || {
        status = lab.status("node-1").unwrap_or_default();
        let svc = &status["services"];
        svc["services"].as_u64() >= Some(1001) && svc["backends"].as_u64() >= Some(10_001)
    });
    let svc = &status["services"];
    assert!(fit, "the table did not fit: {svc}");
    assert!(svc["sync_error"].is_null(), "{svc}");
    let pid = lab.agent_pid("node-1").expect("node-1's agent runs");
    let rss_kib = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0);
    let phases = status["last_sync"]["phases_ms"].clone();
    // A change elsewhere does not rebuild the table: the next sync's services step only
    // compares what the table was built from.
    let syncs = status["syncs"].as_u64().unwrap_or(0);
    lab.write_manifest(
        "svc-bulk-other",
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: other, namespace: backend}\n",
    )
    .unwrap();
    let mut next = Value::Null;
    assert!(
        eventually(SETTLE, Duration::from_millis(50), || {
            next = lab.status("node-1").unwrap_or_default();
            next["syncs"].as_u64() > Some(syncs)
        }),
        "no sync after the change"
    );
    let services_ms = next["last_sync"]["phases_ms"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p[0] == "services"))
        .and_then(|p| p[1].as_f64())
        .unwrap_or(f64::MAX);
    eprintln!(
        "1,000 Services / 10,000 backends: translated {reached:?} after the write; \
         agent RSS {} MiB (debug build); first sync phases {phases}; an unrelated change's \
         services step {services_ms} ms",
        rss_kib / 1024
    );
    assert!(
        services_ms < 50.0,
        "an unrelated change rebuilt the service table ({services_ms} ms)"
    );
}

#[test]
fn each_connection_names_the_service_it_dialled_when_one_backend_serves_two() {
    let lab = shared_lab();
    let a = Ipv4Addr::new(10, 96, 1, 40);
    let b = Ipv4Addr::new(10, 96, 1, 41);
    // api-1:8080 backs both, and the lab's own `api` Service too: its address cannot say which
    // Service a connection to it came through; the kernel's record of the dialled frontend can.
    let mut yaml = service("backend", "svc-two-a", a, &[(&lab, "backend/api-1", true)]);
    yaml.push_str(&service(
        "backend",
        "svc-two-b",
        b,
        &[(&lab, "backend/api-1", true)],
    ));
    lab.write_manifest("svc-two", &yaml).unwrap();
    for (vip, name) in [(a, "svc-two-a"), (b, "svc-two-b"), (a, "svc-two-a")] {
        let line = probe_ok(&lab, "frontend/web-0", SocketAddr::new(vip.into(), 80));
        let port = line["local_port"].as_u64().expect("local port");
        let flow = flow_of(&lab, "node-1", "frontend/web-0", port);
        assert_eq!(
            flow["destination"]["pod_name"], "api-1",
            "the flow must name the backend pod: {flow}"
        );
        assert_eq!(
            flow["destination_service"],
            json!({ "name": name, "namespace": "backend" }),
            "a connection to {vip}:80 must name {name}: {flow}"
        );
    }
}
