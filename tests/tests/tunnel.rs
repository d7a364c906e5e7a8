//! The mTLS tunnel in the lab (2 nodes): meshed pods talk through HBONE on port 15008, the
//! modes decide what plaintext may reach a pod, identities come from certificates, and the
//! tunnel survives certificate renewals and agent restarts.
//!
//! Pods: `frontend/web-N` (service account `web`), `backend/api-N` (`api`), `data/db-N` (`db`);
//! N = 0 and 2 on node-1, N = 1 on node-2. Nothing is meshed until a test writes a MutualTLS.

use std::io::{Read as _, Write as _};
use std::time::{Duration, Instant};

use nodeward_lab::capture::Capture;
use nodeward_lab::shared::shared_lab;
use nodeward_lab::{Case, HTTP_PORT, Lab, eventually, netpol};
use serde_json::{Value, json};

const SETTLE: Duration = Duration::from_secs(10);

fn allow(from: &str, to: &str) -> Case {
    Case::tcp(from, to, HTTP_PORT, true)
}

fn deny(from: &str, to: &str) -> Case {
    Case::tcp(from, to, HTTP_PORT, false)
}

/// Puts each namespace in the mesh with its mode and waits until both agents count the pods as
/// meshed (a probe that passes proves nothing: plaintext passes too without policy).
fn mesh(lab: &Lab, namespaces: &[(&str, &str)]) {
    for (ns, mode) in namespaces {
        lab.write_manifest(&format!("mtls-{ns}"), &netpol::mutual_tls(ns, mode))
            .unwrap();
    }
    for node in lab.node_names() {
        let want = lab
            .pods_on(&node)
            .iter()
            .filter(|p| {
                namespaces
                    .iter()
                    .any(|(ns, mode)| p.namespace == *ns && *mode != "DISABLE")
            })
            .count() as u64;
        let meshed = eventually(SETTLE, Duration::from_millis(50), || {
            lab.status(&node)
                .is_ok_and(|s| s["tunnel"]["meshed_endpoints"].as_u64() == Some(want))
        });
        assert!(
            meshed,
            "{node}: the agent did not count {want} meshed endpoints: {:?}",
            lab.status(&node).map(|s| s["tunnel"].clone())
        );
    }
}

fn spiffe(ns: &str, sa: &str) -> String {
    format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")
}

/// The first flow of `node` matching `want` within a few seconds, or a panic showing them all.
fn flow_on(lab: &Lab, node: &str, what: &str, want: impl Fn(&Value) -> bool) -> Value {
    let mut last = Vec::new();
    let found = eventually(Duration::from_secs(5), Duration::from_millis(100), || {
        last = lab.observe(node, &["--last", "1000"]).unwrap_or_default();
        last.iter().any(&want)
    });
    assert!(
        found,
        "{node}: no flow {what} among {} flows:\n{}",
        last.len(),
        last.iter()
            .rev()
            .take(10)
            .map(Value::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    );
    last.into_iter().rev().find(want).expect("just found")
}

fn tunnel_stat(lab: &Lab, node: &str, path: &[&str]) -> u64 {
    let status = lab.status(node).expect("status");
    let mut v = &status["tunnel"];
    for p in path {
        v = &v[*p];
    }
    v.as_u64()
        .unwrap_or_else(|| panic!("{node}: status has no tunnel.{}: {status}", path.join(".")))
}

/// Sends `payload` over a fresh connection and checks the echo.
fn echo_once(lab: &Lab, from: &str, to: std::net::SocketAddr, payload: &[u8]) {
    let mut stream =
        nodeward_lab::probe::connect_from(&lab.pod(from).netns, to, Duration::from_secs(3))
            .unwrap_or_else(|e| {
                panic!(
                    "{from} -> {to}: connect: {e:#}\n{}",
                    lab.agent_logs_tail(15)
                )
            });
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    stream.write_all(payload).unwrap();
    let mut got = vec![0u8; payload.len()];
    stream
        .read_exact(&mut got)
        .unwrap_or_else(|e| panic!("{from} -> {to}: no echo: {e}\n{}", lab.agent_logs_tail(15)));
    assert_eq!(got, payload, "{from} -> {to}: the echo differs");
}

#[test]
fn meshed_pods_talk_through_the_tunnel_and_the_wire_sees_only_tls() {
    let lab = shared_lab();
    mesh(
        &lab,
        &[("frontend", "PERMISSIVE"), ("backend", "PERMISSIVE")],
    );
    // web-1 is on node-2, api-0 on node-1.
    lab.expect(&[allow("frontend/web-1", "backend/api-0")], SETTLE);
    let redirected_before = tunnel_stat(&lab, "node-2", &["redirected_flows"]);
    let inbound_before = tunnel_stat(&lab, "node-1", &["inbound", "ok"]);

    let pcap = lab.state().dir.join("tmp").join("underlay.pcap");
    let capture = Capture::start(&lab.state().underlay_netns, "br0", "tcp", &pcap).unwrap();
    let secret = b"nodeward-tunnel-secret-3f9c2a77d1 and nothing else\n";
    echo_once(
        &lab,
        "frontend/web-1",
        lab.addr("backend/api-0", HTTP_PORT),
        secret,
    );
    echo_once(
        &lab,
        "frontend/web-1",
        lab.addr6("backend/api-0", HTTP_PORT),
        secret,
    );
    let (bytes, packets) = capture.stop().unwrap();

    let lines: Vec<&str> = packets.lines().collect();
    assert!(
        lines.iter().any(|l| l.contains(".15008")),
        "the underlay saw no HBONE (port 15008) traffic:\n{packets}"
    );
    let plaintext: Vec<&&str> = lines
        .iter()
        .filter(|l| l.contains(&format!(".{HTTP_PORT}")))
        .collect();
    assert!(
        plaintext.is_empty(),
        "the pods' port {HTTP_PORT} appeared on the underlay:\n{plaintext:#?}"
    );
    assert!(
        !bytes.windows(secret.len()).any(|w| w == secret),
        "the payload crossed the underlay in the clear"
    );

    assert!(
        tunnel_stat(&lab, "node-2", &["redirected_flows"]) >= redirected_before + 2,
        "node-2's datapath did not steer the connections to the agent"
    );
    assert!(
        tunnel_stat(&lab, "node-1", &["inbound", "ok"]) >= inbound_before + 2,
        "node-1's HBONE server carried fewer than the two connections"
    );
    let api0 = lab.pod("backend/api-0").ip4.to_string();
    let flow = flow_on(&lab, "node-1", "of the tunnel into api-0", |f| {
        f["Type"] == "TUNNEL"
            && f["verdict"] == "FORWARDED"
            && f["traffic_direction"] == "INGRESS"
            && f["IP"]["destination"] == api0.as_str()
    });
    assert_eq!(
        flow["source"]["spiffe_id"],
        spiffe("frontend", "web"),
        "{flow}"
    );
    assert_eq!(
        flow["destination"]["spiffe_id"],
        spiffe("backend", "api"),
        "{flow}"
    );
    assert_eq!(flow["source"]["pod_name"], "web-1", "{flow}");
    flow_on(&lab, "node-2", "of the tunnel out of web-1", |f| {
        f["Type"] == "TUNNEL"
            && f["verdict"] == "FORWARDED"
            && f["traffic_direction"] == "EGRESS"
            && f["destination"]["spiffe_id"] == spiffe("backend", "api").as_str()
    });
}

#[test]
fn strict_drops_plaintext_and_permissive_lets_it_through() {
    let lab = shared_lab();
    // data stays out of the mesh: what its pods send is plaintext.
    mesh(&lab, &[("frontend", "PERMISSIVE"), ("backend", "STRICT")]);
    lab.expect(
        &[
            deny("data/db-1", "backend/api-0"), // plaintext to STRICT, across nodes
            deny("data/db-0", "backend/api-2"), // plaintext to STRICT, same node
            allow("frontend/web-1", "backend/api-0"), // the tunnel reaches STRICT
            allow("frontend/web-0", "backend/api-2"), // also on one node
            allow("data/db-1", "frontend/web-0"), // plaintext to PERMISSIVE
            allow("backend/api-0", "data/db-1"), // meshed to unmeshed: plaintext
        ],
        SETTLE,
    );
    let db1 = lab.pod("data/db-1").ip4.to_string();
    let flow = flow_on(&lab, "node-1", "dropping db-1's plaintext", |f| {
        f["verdict"] == "DROPPED"
            && f["drop_reason_desc"] == "AUTH_REQUIRED"
            && f["IP"]["source"] == db1.as_str()
    });
    assert_eq!(flow["destination"]["namespace"], "backend", "{flow}");
}

#[test]
fn a_service_account_rule_admits_one_account_and_refuses_another() {
    let lab = shared_lab();
    mesh(
        &lab,
        &[
            ("frontend", "PERMISSIVE"),
            ("backend", "PERMISSIVE"),
            ("data", "PERMISSIVE"),
        ],
    );
    lab.write_manifest(
        "api-from-web-sa",
        &netpol::mesh_policy(
            "backend",
            "api-from-web-sa",
            &json!({
                "endpointSelector": {},
                "ingress": [{ "fromServiceAccounts": ["frontend/web"] }],
            }),
        ),
    )
    .unwrap();
    lab.expect(
        &[
            allow("frontend/web-1", "backend/api-0"),
            allow("frontend/web-0", "backend/api-0"),
            deny("data/db-1", "backend/api-0"),
            deny("data/db-0", "backend/api-2"),
        ],
        SETTLE,
    );
    let db1 = lab.pod("data/db-1").ip4.to_string();
    let flow = flow_on(&lab, "node-1", "refusing db-1's service account", |f| {
        f["Type"] == "TUNNEL" && f["verdict"] == "DROPPED" && f["IP"]["source"] == db1.as_str()
    });
    assert_eq!(flow["source"]["spiffe_id"], spiffe("data", "db"), "{flow}");
    assert_eq!(flow["policy"]["name"], "api-from-web-sa", "{flow}");
    assert_eq!(flow["drop_reason_desc"], "POLICY_DENIED", "{flow}");
    // The source's node learned of the refusal too. The probes above may have been admitted
    // before node-1 applied the policy and then revoked (node-2 saw a 200 then), so refuse one
    // more connection now that node-1's drop shows the policy in force.
    assert!(
        !lab.tcp_probe(
            "data/db-1",
            "backend/api-0",
            HTTP_PORT,
            Duration::from_secs(2)
        ),
        "db-1 -> api-0 passed under api-from-web-sa"
    );
    flow_on(&lab, "node-2", "of the refused CONNECT", |f| {
        f["Type"] == "TUNNEL" && f["verdict"] == "DROPPED" && f["IP"]["source"] == db1.as_str()
    });
}

#[test]
fn a_peer_with_a_certificate_from_a_foreign_ca_is_refused() {
    let mut lab = shared_lab();
    mesh(
        &lab,
        &[("frontend", "PERMISSIVE"), ("backend", "PERMISSIVE")],
    );
    lab.expect(&[allow("frontend/web-1", "backend/api-0")], SETTLE);

    let foreign = lab.state().dir.join("foreign-ca");
    let _ = std::fs::remove_dir_all(&foreign);
    let status = std::process::Command::new(nodeward_lab::paths::nodeward_bin().unwrap())
        .arg("ca-create")
        .arg("--dir")
        .arg(&foreign)
        .output()
        .unwrap();
    assert!(status.status.success(), "ca-create: {status:?}");
    let (cert, key) = (foreign.join("ca-cert.pem"), foreign.join("ca-key.pem"));
    lab.stop_agent("node-2").unwrap();
    lab.set_agent_args(&[
        "--ca-cert",
        cert.to_str().unwrap(),
        "--ca-key",
        key.to_str().unwrap(),
    ]);
    let started = lab.start_agent("node-2");
    lab.set_agent_args(&[]);
    started.unwrap();
    let refused_before = tunnel_stat(&lab, "node-1", &["handshake_failures", "server"]);
    lab.expect(&[deny("frontend/web-1", "backend/api-0")], SETTLE);
    assert!(
        tunnel_stat(&lab, "node-1", &["handshake_failures", "server"]) > refused_before,
        "node-1 did not count the foreign client's handshake as refused"
    );
    let log = std::fs::read_to_string(lab.agent_log("node-1")).unwrap_or_default();
    assert!(
        log.contains("HBONE: refused a connection"),
        "node-1's log does not say it refused the foreign peer"
    );

    // Back on the cluster's CA, the tunnel works again.
    lab.stop_agent("node-2").unwrap();
    lab.start_agent("node-2").unwrap();
    lab.expect(&[allow("frontend/web-1", "backend/api-0")], SETTLE);
}

#[test]
fn a_long_lived_connection_survives_certificate_renewals() {
    let mut lab = shared_lab();
    mesh(
        &lab,
        &[("frontend", "PERMISSIVE"), ("backend", "PERMISSIVE")],
    );
    for node in lab.node_names() {
        lab.stop_agent(&node).unwrap();
    }
    // Renewed at half-life: every ~2 s.
    lab.set_agent_args(&["--cert-ttl", "4s"]);
    for node in lab.node_names() {
        lab.start_agent(&node).unwrap();
    }
    lab.set_agent_args(&[]);
    lab.expect(&[allow("frontend/web-1", "backend/api-0")], SETTLE);

    let mut stream = lab
        .connect(
            "frontend/web-1",
            "backend/api-0",
            HTTP_PORT,
            Duration::from_secs(3),
        )
        .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let renewals = |lab: &Lab, node: &str| -> u64 {
        let text = lab.agent_http_get(node, "/metrics").unwrap_or_default();
        text.lines()
            .find(|l| l.starts_with("nodeward_certificate_renewals_total{result=\"success\"}"))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let before: Vec<u64> = ["node-1", "node-2"]
        .iter()
        .map(|n| renewals(&lab, n))
        .collect();
    let started = Instant::now();
    let mut rounds = 0u32;
    while started.elapsed() < Duration::from_secs(9) {
        let msg = format!("round {rounds} of a long-lived tunnelled connection\n");
        stream.write_all(msg.as_bytes()).unwrap();
        let mut got = vec![0u8; msg.len()];
        stream.read_exact(&mut got).unwrap_or_else(|e| {
            panic!(
                "the connection broke after {rounds} rounds ({:.1?}): {e}\n{}",
                started.elapsed(),
                lab.agent_logs_tail(20)
            )
        });
        assert_eq!(got, msg.as_bytes());
        rounds += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    for (node, before) in ["node-1", "node-2"].iter().zip(before) {
        let after = renewals(&lab, node);
        assert!(
            after >= before + 2,
            "{node}: only {} certificate renewals while the connection lived",
            after - before
        );
    }
    // New connections use the new certificates.
    lab.expect(&[allow("frontend/web-1", "backend/api-0")], SETTLE);
    drop(stream);
    for node in lab.node_names() {
        lab.stop_agent(&node).unwrap();
        lab.start_agent(&node).unwrap();
    }
}

#[test]
fn the_destination_agent_restarting_fails_fast_and_recovers_within_seconds() {
    let mut lab = shared_lab();
    mesh(
        &lab,
        &[("frontend", "PERMISSIVE"), ("backend", "PERMISSIVE")],
    );
    lab.expect(&[allow("frontend/web-1", "backend/api-0")], SETTLE);

    lab.kill_agent("node-1").unwrap();
    // No HBONE server on node-1: the client's connection is reset at once, not left hanging.
    let tried = Instant::now();
    let reached = lab.tcp_probe(
        "frontend/web-1",
        "backend/api-0",
        HTTP_PORT,
        Duration::from_secs(5),
    );
    let took = tried.elapsed();
    assert!(
        !reached,
        "web-1 reached api-0 although node-1's agent is down"
    );
    assert!(
        took < Duration::from_secs(2),
        "the failure took {took:.1?}: clients must fail promptly when the peer agent is down"
    );

    lab.start_agent("node-1").unwrap();
    let ready = Instant::now();
    let back = eventually(Duration::from_secs(10), Duration::from_millis(100), || {
        lab.tcp_probe(
            "frontend/web-1",
            "backend/api-0",
            HTTP_PORT,
            Duration::from_secs(1),
        )
    });
    assert!(
        back,
        "no new connection succeeded within 10 s of node-1's agent being ready"
    );
    eprintln!(
        "tunnel back {:.2?} after the agent was ready",
        ready.elapsed()
    );
}
