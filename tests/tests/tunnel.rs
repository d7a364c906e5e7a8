//! The mTLS tunnel in the lab (2 nodes): meshed pods talk through HBONE on port 15008, the
//! modes decide what plaintext may reach a pod, identities come from certificates, and the
//! tunnel survives certificate renewals and agent restarts. Between two pods of one node the
//! agent skips TLS (the same-node fast path) and keeps identities and policy.
//!
//! Pods: `frontend/web-N` (service account `web`), `backend/api-N` (`api`), `data/db-N` (`db`);
//! N = 0 and 2 on node-1, N = 1 on node-2. Nothing is meshed until a test writes a MutualTLS.

use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
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

/// `flow` names `frontend/web` as its source's SPIFFE ID and `backend/api` as its destination's.
fn assert_web_to_api_identities(flow: &Value) {
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
}

/// `backend` admits only the `frontend/web` service account (`fromServiceAccounts`).
fn admit_only_web_sa_to_backend(lab: &Lab) {
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
}

/// `echo_once` over IPv4, then over IPv6.
fn echo_once_v4_v6(lab: &Lab, from: &str, to: &str, port: u16, secret: &[u8]) {
    echo_once(lab, from, lab.addr(to, port), secret);
    echo_once(lab, from, lab.addr6(to, port), secret);
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
    echo_once_v4_v6(&lab, "frontend/web-1", "backend/api-0", HTTP_PORT, secret);
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
    assert_web_to_api_identities(&flow);
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

    // The nodes take connections to port 15008 of their pods (the HBONE dial), never a pod's
    // own connection from port 15008, across nodes either way: its SYN leaves (its node's
    // source check once dropped it as `IP_LOCAL_SOURCE`) and the replies reach the pod.
    for node in lab.node_names() {
        let rules = nodeward_lab::sys::in_netns(&lab.node(&node).netns, || {
            std::process::Command::new("ip").arg("rule").output()
        })
        .unwrap()
        .unwrap();
        let rules = String::from_utf8_lossy(&rules.stdout).into_owned();
        assert!(
            rules.contains("lookup 20056"),
            "{node} has no HBONE rule (pod dialling is the default):\n{rules}"
        );
    }
    for (from, to) in [("data/db-0", "data/db-1"), ("data/db-1", "data/db-0")] {
        let dst = lab.addr(to, HTTP_PORT);
        let stream = nodeward_lab::sys::in_netns(&lab.pod(from).netns, || {
            let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            socket.set_reuse_address(true)?;
            socket.bind(&SocketAddr::from(([0, 0, 0, 0], 15008)).into())?;
            socket.connect_timeout(&dst.into(), Duration::from_secs(3))?;
            Ok::<_, std::io::Error>(std::net::TcpStream::from(socket))
        })
        .unwrap();
        let mut stream = stream.unwrap_or_else(|e| panic!("{from}:15008 -> {dst}: connect: {e}"));
        assert!(
            nodeward_lab::probe::echo_roundtrip(&mut stream, Duration::from_secs(3)),
            "{from}:15008 -> {dst}: no echo"
        );
    }
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
    admit_only_web_sa_to_backend(&lab);
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

/// The churn tests' server pod (node-2) and client pod (node-1), and their two fixed ports: on
/// `SINK_PORT` the server closes first, so the source node's outbound socket is the one that
/// would keep TIME_WAIT; on `DRAIN_PORT` the client closes first, so the destination node's
/// transparent connect would.
const CHURN_CLIENT: &str = "frontend/web-0";
const CHURN_SERVER: &str = "backend/api-1";
const SINK_PORT: u16 = 7400;
const DRAIN_PORT: u16 = 7401;
/// How long each state holds once it is in force.
const DWELL: Duration = Duration::from_millis(1500);
/// The bar: every connection completes within 1 s (a lost SYN costs 1 s).
const SLOW_MS: &str = "1000";

/// What one load did during one phase.
#[derive(Clone, Copy, Default)]
struct Figures {
    connections: u64,
    errors: u64,
    slow: u64,
    max_ms: f64,
    secs: f64,
}

impl Figures {
    fn add(&mut self, line: &Value) {
        let n = |k: &str| line[k].as_u64().unwrap_or(0);
        self.connections += n("connections");
        self.errors += n("errors");
        self.slow += n("slow");
        self.max_ms = self.max_ms.max(line["max_ms"].as_f64().unwrap_or(0.0));
        self.secs += line["secs"].as_f64().unwrap_or(0.0);
    }
}

type PhaseFigures = std::sync::Arc<std::sync::Mutex<Vec<(String, [Figures; 2])>>>;

/// Two continuous connect/close loads from web-0 to api-1's fixed ports (server closes first,
/// client closes first), their per-interval reports filed under the phase that is current.
struct Churn {
    phases: PhaseFigures,
    loads: Vec<nodeward_lab::load::Crr>,
    _server: nodeward_lab::load::Process,
}

const LOADS: [(&str, u16, &str); 2] = [
    ("server closes first", SINK_PORT, "server"),
    ("client closes first", DRAIN_PORT, "client"),
];

impl Churn {
    fn start(lab: &Lab, first: &str) -> Self {
        let load = std::path::Path::new(env!("CARGO_BIN_EXE_nodeward-lab-load"));
        let (client, server) = (lab.pod(CHURN_CLIENT), lab.pod(CHURN_SERVER));
        // The client-closes load leaves its TIME_WAITs in the client pod: give it every port,
        // and let it reuse them after a second as busy clients do (else its port search slows
        // down as they pile up, and the rate with it).
        nodeward_lab::sys::sysctls(
            &client.netns,
            &[
                ("net/ipv4/ip_local_port_range".to_string(), "10000 65000"),
                ("net/ipv4/tcp_tw_reuse".to_string(), "1"),
            ],
        )
        .unwrap();
        let server_process = nodeward_lab::load::server(
            load,
            server,
            &[
                "--sink",
                &SINK_PORT.to_string(),
                "--drain",
                &DRAIN_PORT.to_string(),
            ],
            client,
            &[SINK_PORT, DRAIN_PORT],
        )
        .unwrap();
        let phases: PhaseFigures = std::sync::Arc::default();
        phases
            .lock()
            .unwrap()
            .push((first.to_string(), [Figures::default(); 2]));
        let loads = LOADS
            .iter()
            .enumerate()
            .map(|(i, (_, port, close))| {
                let addr = SocketAddr::new(server.ip4.into(), *port).to_string();
                let sink = phases.clone();
                nodeward_lab::load::Crr::start(
                    load,
                    client,
                    &[
                        "--addr",
                        &addr,
                        "--threads",
                        "2",
                        "--secs",
                        "60",
                        "--close",
                        close,
                        "--slow-ms",
                        SLOW_MS,
                    ],
                    250,
                    lab.state().dir.join("tmp").join(format!("churn-stop-{i}")),
                    move |line| {
                        if let Some(last) = sink.lock().unwrap().last_mut() {
                            last.1[i].add(line);
                        }
                    },
                )
                .unwrap()
            })
            .collect();
        Self {
            phases,
            loads,
            _server: server_process,
        }
    }

    /// From now on the loads' reports count for `name`.
    fn phase(&self, name: &str) {
        self.phases
            .lock()
            .unwrap()
            .push((name.to_string(), [Figures::default(); 2]));
    }

    /// Stops the loads; prints and returns the figures per phase, and the loads' summaries.
    fn finish(self) -> (Vec<(String, [Figures; 2])>, Vec<Value>) {
        let summaries: Vec<Value> = self
            .loads
            .into_iter()
            .map(|l| l.finish().unwrap())
            .collect();
        let phases = self.phases.lock().unwrap().clone();
        eprintln!("{:<22} {:>36} {:>36}", "phase", LOADS[0].0, LOADS[1].0);
        for (name, figures) in &phases {
            let cell = |f: &Figures| {
                format!(
                    "{:>6} conn {:>6.0}/s {:>2} err {:>5.0} ms max",
                    f.connections,
                    f.connections as f64 / f.secs.max(1e-9),
                    f.errors,
                    f.max_ms
                )
            };
            eprintln!(
                "{name:<22} {:>36} {:>36}",
                cell(&figures[0]),
                cell(&figures[1])
            );
        }
        for (summary, (what, _, _)) in summaries.iter().zip(LOADS) {
            eprintln!("{what}: {summary}");
        }
        (phases, summaries)
    }
}

/// Every connection of every load completed, none took 1 s or more, and each phase carried
/// connections of both loads.
fn assert_every_connection_completed(
    lab: &Lab,
    phases: &[(String, [Figures; 2])],
    summaries: &[Value],
) {
    for (summary, (what, _, _)) in summaries.iter().zip(LOADS) {
        assert!(
            summary["errors"] == 0 && summary["slow"] == 0,
            "{what}: connections failed or took {SLOW_MS} ms or more: {summary}\n{}",
            lab.agent_logs_tail(20)
        );
    }
    for (name, figures) in phases {
        for (f, (what, _, _)) in figures.iter().zip(LOADS) {
            assert!(
                f.connections > 0,
                "{name}: the load \"{what}\" completed no connection"
            );
        }
    }
}

/// The TIME_WAIT sockets in `node`'s namespace from `local` to `remote` (`ss`).
fn node_time_waits(lab: &Lab, node: &str, local: std::net::IpAddr, remote: &str) -> Vec<String> {
    let out = std::process::Command::new("nsenter")
        .arg(format!(
            "--net={}",
            nodeward_lab::sys::netns_path(&lab.node(node).netns).display()
        ))
        .args(["ss", "-Htan", "state", "time-wait", "src"])
        .arg(local.to_string())
        .arg("dst")
        .arg(remote)
        .output()
        .expect("running ss in the node's namespace");
    assert!(out.status.success(), "ss: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Meshes (PERMISSIVE) or unmeshes the client's and the server's namespaces and waits until both
/// agents count it.
fn set_mesh(lab: &Lab, on: bool) {
    if on {
        mesh(
            lab,
            &[("frontend", "PERMISSIVE"), ("backend", "PERMISSIVE")],
        );
        return;
    }
    for ns in ["frontend", "backend"] {
        lab.remove_manifest(&format!("mtls-{ns}")).unwrap();
    }
    for node in lab.node_names() {
        let off = eventually(SETTLE, Duration::from_millis(50), || {
            lab.status(&node)
                .is_ok_and(|s| s["tunnel"]["meshed_endpoints"].as_u64().unwrap_or(0) == 0)
        });
        assert!(off, "{node}: the agent still counts meshed endpoints");
    }
}

#[test]
fn connections_to_one_port_complete_while_the_mesh_turns_on_and_off() {
    let lab = shared_lab();
    let (client, server) = (lab.pod(CHURN_CLIENT), lab.pod(CHURN_SERVER));
    let counters = |lab: &Lab| {
        [
            tunnel_stat(lab, "node-1", &["time_wait", "removed"]),
            tunnel_stat(lab, "node-2", &["time_wait", "removed"]),
            tunnel_stat(lab, "node-1", &["time_wait", "failed"]),
            tunnel_stat(lab, "node-2", &["time_wait", "failed"]),
            tunnel_stat(lab, "node-1", &["outbound", "ok"]),
        ]
    };
    let before = counters(&lab);
    let churn = Churn::start(&lab, "plaintext");
    std::thread::sleep(DWELL);
    for round in 1..=3 {
        churn.phase(&format!("mesh on {round}"));
        set_mesh(&lab, true);
        std::thread::sleep(DWELL);
        churn.phase(&format!("mesh off {round}"));
        set_mesh(&lab, false);
        std::thread::sleep(DWELL);
    }
    let (phases, summaries) = churn.finish();
    assert_every_connection_completed(&lab, &phases, &summaries);

    // The tunnel carried the meshed phases, and its sockets left no TIME_WAIT behind with the
    // pods' addresses: the source node's outbound sockets (server closes first) and the
    // destination node's connects (client closes first).
    let after = counters(&lab);
    let delta: Vec<u64> = after.iter().zip(before).map(|(a, b)| a - b).collect();
    let removed = [delta[0], delta[1]];
    eprintln!(
        "tunnelled {}; TIME_WAITs removed: node-1 {}, node-2 {}; failed: node-1 {}, node-2 {}",
        delta[4], delta[0], delta[1], delta[2], delta[3]
    );
    assert!(
        removed[0] > 0 && removed[1] > 0,
        "the tunnel removed no TIME_WAIT on one of the nodes (node-1 {}, node-2 {}): the \
         meshed phases did not go through it, or each side's socket closed second",
        removed[0],
        removed[1]
    );
    let on_source = node_time_waits(
        &lab,
        &client.node,
        server.ip4.into(),
        &client.ip4.to_string(),
    );
    let on_destination = node_time_waits(
        &lab,
        &server.node,
        client.ip4.into(),
        &SocketAddr::new(server.ip4.into(), DRAIN_PORT).to_string(),
    );
    assert!(
        on_source.is_empty() && on_destination.is_empty(),
        "TIME_WAITs with pod addresses are left in the nodes' namespaces: {} on {} ({:?}...), \
         {} on {} ({:?}...)",
        on_source.len(),
        client.node,
        on_source.first(),
        on_destination.len(),
        server.node,
        on_destination.first()
    );
}

#[test]
fn tunnelled_connections_complete_while_the_destination_moves_between_strict_and_permissive() {
    let lab = shared_lab();
    mesh(
        &lab,
        &[("frontend", "PERMISSIVE"), ("backend", "PERMISSIVE")],
    );
    let outbound_before = tunnel_stat(&lab, "node-1", &["outbound", "ok"]);
    // An unmeshed pod on the client's node tells which mode is in force at the server.
    let outsider_gets_through =
        |lab: &Lab| lab.tcp_probe("data/db-0", CHURN_SERVER, HTTP_PORT, Duration::from_secs(1));
    let churn = Churn::start(&lab, "PERMISSIVE");
    std::thread::sleep(DWELL);
    for round in 1..=3 {
        for (mode, plaintext_passes) in [("STRICT", false), ("PERMISSIVE", true)] {
            churn.phase(&format!("{mode} {round}"));
            lab.write_manifest("mtls-backend", &netpol::mutual_tls("backend", mode))
                .unwrap();
            let in_force = eventually(SETTLE, Duration::from_millis(100), || {
                outsider_gets_through(&lab) == plaintext_passes
            });
            assert!(in_force, "backend did not become {mode} within {SETTLE:?}");
            std::thread::sleep(DWELL);
        }
    }
    let (phases, summaries) = churn.finish();
    assert_every_connection_completed(&lab, &phases, &summaries);
    // Both pods stayed meshed: every connection went through the tunnel.
    let carried = tunnel_stat(&lab, "node-1", &["outbound", "ok"]) - outbound_before;
    let made: u64 = summaries
        .iter()
        .map(|s| s["connections"].as_u64().unwrap_or(0))
        .sum();
    assert!(
        carried >= made,
        "the tunnel carried {carried} connections of the {made} the loads made"
    );
}

/// Sends `len` bytes from `from` to the echo server at `to` while reading the echo, then
/// half-closes and reads to the end: data and FINs both ways, under load.
fn echo_bulk_then_half_close(lab: &Lab, from: &str, to: SocketAddr, len: usize) {
    let mut stream =
        nodeward_lab::probe::connect_from(&lab.pod(from).netns, to, Duration::from_secs(3))
            .unwrap_or_else(|e| panic!("{from} -> {to}: connect: {e:#}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let payload: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
    let mut writer = stream.try_clone().unwrap();
    let sent = payload.clone();
    let sender = std::thread::spawn(move || {
        writer.write_all(&sent).unwrap();
        // Half-close: the echo server sees our FIN only after every byte, then closes too.
        writer.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut got = Vec::with_capacity(len);
    stream.read_to_end(&mut got).unwrap_or_else(|e| {
        panic!(
            "{from} -> {to}: reading the echo to its end: {e} after {} of {len} bytes\n{}",
            got.len(),
            lab.agent_logs_tail(15)
        )
    });
    sender.join().unwrap();
    assert!(
        got == payload,
        "{from} -> {to}: the echo differs ({} of {len} bytes back)",
        got.len()
    );
}

#[test]
fn same_node_meshed_pods_skip_tls_and_keep_identities_and_policy() {
    let lab = shared_lab();
    mesh(
        &lab,
        &[
            ("frontend", "PERMISSIVE"),
            ("backend", "STRICT"),
            ("data", "PERMISSIVE"),
        ],
    );
    admit_only_web_sa_to_backend(&lab);
    // web-0, db-0, api-0 and api-2 are all on node-1.
    lab.expect(
        &[
            allow("frontend/web-0", "backend/api-0"),
            deny("data/db-0", "backend/api-2"),
        ],
        SETTLE,
    );
    let status = lab.status("node-1").expect("status");
    assert_eq!(
        status["tunnel"]["local"]["redirect_attached"], true,
        "node-1 did not attach the same-node redirect: {}",
        status["tunnel"]
    );
    let kernel_before = tunnel_stat(&lab, "node-1", &["local", "kernel"]);

    let node1 = lab.node("node-1");
    let dir = lab.state().dir.join("tmp");
    let hbone = Capture::start(
        &node1.netns,
        "any",
        "tcp port 15008",
        &dir.join("node1-hbone.pcap"),
    )
    .unwrap();
    let api0 = lab.pod("backend/api-0").ip4.to_string();
    let underlay = Capture::start(
        &lab.state().underlay_netns,
        "br0",
        &format!("host {api0}"),
        &dir.join("underlay-local.pcap"),
    )
    .unwrap();
    let secret = b"nodeward-same-node-secret-51c0 stays on the node\n";
    echo_once_v4_v6(&lab, "frontend/web-0", "backend/api-0", HTTP_PORT, secret);
    // Bulk both ways with a half-close: the FIN must follow every redirected byte.
    echo_bulk_then_half_close(
        &lab,
        "frontend/web-0",
        lab.addr("backend/api-0", HTTP_PORT),
        8 << 20,
    );
    let (_, hbone_packets) = hbone.stop().unwrap();
    let (_, underlay_packets) = underlay.stop().unwrap();
    assert!(
        hbone_packets.trim().is_empty(),
        "node-1 saw HBONE (port 15008) traffic for a same-node connection:\n{hbone_packets}"
    );
    assert!(
        underlay_packets.trim().is_empty(),
        "a same-node connection to api-0 left node-1:\n{underlay_packets}"
    );
    assert!(
        tunnel_stat(&lab, "node-1", &["local", "kernel"]) >= kernel_before + 3,
        "node-1 joined fewer than 3 connections in the kernel: {}",
        lab.status("node-1").unwrap()["tunnel"]
    );

    let flow = flow_on(&lab, "node-1", "of the same-node tunnel into api-0", |f| {
        f["Type"] == "TUNNEL"
            && f["verdict"] == "FORWARDED"
            && f["traffic_direction"] == "INGRESS"
            && f["tunnel_local"] == true
            && f["IP"]["destination"] == api0.as_str()
    });
    assert_web_to_api_identities(&flow);
    assert_eq!(flow["source"]["pod_name"], "web-0", "{flow}");
    flow_on(
        &lab,
        "node-1",
        "of the same-node tunnel out of web-0",
        |f| {
            f["Type"] == "TUNNEL"
                && f["verdict"] == "FORWARDED"
                && f["traffic_direction"] == "EGRESS"
                && f["tunnel_local"] == true
                && f["destination"]["spiffe_id"] == spiffe("backend", "api").as_str()
        },
    );
    // One more refusal now, so its flow is among the latest.
    assert!(
        !lab.tcp_probe(
            "data/db-0",
            "backend/api-2",
            HTTP_PORT,
            Duration::from_secs(2)
        ),
        "db-0 -> api-2 passed under api-from-web-sa"
    );
    let db0 = lab.pod("data/db-0").ip4.to_string();
    let denied = flow_on(&lab, "node-1", "refusing db-0's service account", |f| {
        f["Type"] == "TUNNEL"
            && f["verdict"] == "DROPPED"
            && f["traffic_direction"] == "INGRESS"
            && f["tunnel_local"] == true
            && f["IP"]["source"] == db0.as_str()
    });
    assert_eq!(
        denied["source"]["spiffe_id"],
        spiffe("data", "db"),
        "{denied}"
    );
    assert_eq!(denied["policy"]["name"], "api-from-web-sa", "{denied}");

    // A reset from the client ends the joined pair: the agent carries nothing afterwards.
    let mut stream = nodeward_lab::probe::connect_from(
        &lab.pod("frontend/web-0").netns,
        lab.addr("backend/api-0", HTTP_PORT),
        Duration::from_secs(3),
    )
    .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    stream.write_all(b"ping\n").unwrap();
    let mut got = [0u8; 5];
    stream.read_exact(&mut got).unwrap();
    reset_on_close(&stream);
    drop(stream);
    let ended = eventually(Duration::from_secs(5), Duration::from_millis(50), || {
        tunnel_stat(&lab, "node-1", &["outbound", "active"]) == 0
            && tunnel_stat(&lab, "node-1", &["inbound", "active"]) == 0
    });
    assert!(
        ended,
        "node-1 still carries a connection after the client's reset: {}",
        lab.status("node-1").unwrap()["tunnel"]
    );
}

/// `SO_LINGER` 0: the next close sends a reset.
fn reset_on_close(stream: &std::net::TcpStream) {
    use std::os::fd::AsRawFd as _;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a `linger` on the stack, with its size.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER: {}", std::io::Error::last_os_error());
}
