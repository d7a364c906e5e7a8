//! `nodeward issuer` in the lab (2 nodes): the agents run with `--ca-mode issuer` and hold no
//! CA key; the issuer signs only identities of pods on the asking node; it can die and come
//! back while connections live and certificates rotate.
//!
//! Pods: `frontend/web-N` (service account `web`), `backend/api-N` (`api`); N = 0 and 2 on
//! node-1, N = 1 on node-2.

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use nodeward_lab::shared::shared_lab;
use nodeward_lab::{Case, HTTP_PORT, Lab, eventually, netpol};

const SETTLE: Duration = Duration::from_secs(10);

/// Restarts the issuer (with `issuer_args`) and both agents in `--ca-mode issuer` and
/// `--hbone-dial pod`, then meshes
/// frontend and backend and waits until web-1 (node-2) reaches api-0 (node-1).
fn with_issuer(lab: &mut Lab, issuer_args: &[&str]) {
    for node in lab.node_names() {
        lab.stop_agent(&node).unwrap();
    }
    let _ = lab.kill_issuer();
    lab.start_issuer(issuer_args).unwrap();
    let mut args = lab.issuer_agent_args().unwrap();
    // Zero trust as ambient wires it: HBONE to the destination pod's own address.
    args.extend(["--hbone-dial".to_owned(), "pod".to_owned()]);
    lab.set_agent_args(&args.iter().map(String::as_str).collect::<Vec<_>>());
    for node in lab.node_names() {
        let started = lab.start_agent(&node);
        if let Err(e) = started {
            lab.set_agent_args(&[]);
            panic!(
                "{node}: the agent did not start with the issuer: {e:#}\nissuer log:\n{}",
                std::fs::read_to_string(lab.issuer_log()).unwrap_or_default()
            );
        }
    }
    lab.set_agent_args(&[]);
    for ns in ["frontend", "backend"] {
        lab.write_manifest(&format!("mtls-{ns}"), &netpol::mutual_tls(ns, "PERMISSIVE"))
            .unwrap();
    }
    for node in lab.node_names() {
        let want = lab.pods_on(&node).len() as u64;
        let meshed = eventually(SETTLE, Duration::from_millis(50), || {
            lab.status(&node)
                .is_ok_and(|s| s["tunnel"]["meshed_endpoints"].as_u64().unwrap_or(0) >= want.min(2))
        });
        assert!(meshed, "{node}: the agent did not mesh its pods");
    }
    lab.expect(
        &[Case::tcp(
            "frontend/web-1",
            "backend/api-0",
            HTTP_PORT,
            true,
        )],
        SETTLE,
    );
}

/// Back to the lab's usual agents (their own CA), for the tests that follow in this binary.
fn back_to_local_ca(lab: &mut Lab) {
    for node in lab.node_names() {
        lab.stop_agent(&node).unwrap();
        lab.start_agent(&node).unwrap();
    }
    let _ = lab.kill_issuer();
}

fn tunnel_ok(lab: &Lab, node: &str) -> u64 {
    lab.status(node).unwrap()["tunnel"]["outbound"]["ok"]
        .as_u64()
        .unwrap_or(0)
}

/// Every file under `dir` (recursively) that holds a private key.
fn private_keys_under(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(private_keys_under(&path));
        } else if std::fs::read(&path).is_ok_and(|b| b.windows(11).any(|w| w == b"PRIVATE KEY")) {
            found.push(path.display().to_string());
        }
    }
    found
}

#[test]
fn with_the_issuer_meshed_pods_talk_and_no_node_holds_a_ca_key() {
    let mut lab = shared_lab();
    with_issuer(&mut lab, &[]);
    let before = tunnel_ok(&lab, "node-2");
    lab.expect(
        &[
            Case::tcp("frontend/web-1", "backend/api-0", HTTP_PORT, true),
            Case::tcp("frontend/web-0", "backend/api-1", HTTP_PORT, true),
        ],
        SETTLE,
    );
    assert!(
        tunnel_ok(&lab, "node-2") > before,
        "node-2 carried no connection through the tunnel"
    );
    for node in lab.node_names() {
        let certs = lab.certs_text(&node).unwrap();
        assert!(
            certs.contains(&format!("issuer at {}", nodeward_lab::ISSUER_ADDR)),
            "{node}: `nodeward certs` does not name the issuer:\n{certs}"
        );
        let pid = lab.agent_pid(&node).expect("the agent runs");
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(
            !cmdline.contains("--ca-key") && cmdline.contains("--ca-mode issuer"),
            "{node}: the agent was given a CA key: {cmdline}"
        );
        let state_dir = lab.node(&node).state_dir.clone();
        let keys = private_keys_under(&state_dir);
        assert!(
            keys.is_empty(),
            "{node}: private keys on the node's disk: {keys:?}"
        );
    }
    back_to_local_ca(&mut lab);
}

/// Sends a line from `from` to `to` and checks the echo.
fn echo(lab: &Lab, from: &str, to: std::net::SocketAddr) {
    let mut stream =
        nodeward_lab::probe::connect_from(&lab.pod(from).netns, to, Duration::from_secs(3))
            .unwrap_or_else(|e| panic!("{from} -> {to}: {e:#}\n{}", lab.agent_logs_tail(10)));
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let line = b"dialled at the pod\n";
    stream.write_all(line).unwrap();
    let mut got = vec![0u8; line.len()];
    stream
        .read_exact(&mut got)
        .unwrap_or_else(|e| panic!("{from} -> {to}: no echo: {e}"));
    assert_eq!(&got, line);
}

#[test]
fn hbone_dials_the_destination_pods_address_and_the_pod_never_sees_port_15008() {
    let mut lab = shared_lab();
    with_issuer(&mut lab, &[]);
    // web-1 is on node-2, api-0 on node-1.
    let api0 = lab.pod("backend/api-0").clone();
    let node2 = lab.node("node-2").clone();
    // Something of api-0's own on port 15008: it must never get a connection.
    let own = nodeward_lab::sys::in_netns(&api0.netns, || {
        TcpListener::bind((std::net::Ipv6Addr::UNSPECIFIED, 15008))
    })
    .unwrap()
    .expect("a listener on port 15008 in api-0's namespace");
    own.set_nonblocking(true).unwrap();

    let pcap = lab.state().dir.join("tmp").join("hbone-dial.pcap");
    let capture =
        nodeward_lab::capture::Capture::start(&lab.state().underlay_netns, "br0", "tcp", &pcap)
            .unwrap();
    echo(&lab, "frontend/web-1", lab.addr("backend/api-0", HTTP_PORT));
    echo(
        &lab,
        "frontend/web-1",
        lab.addr6("backend/api-0", HTTP_PORT),
    );
    // Plaintext to api-0's port 15008 from node-2 itself: node-1 hands it to its agent, whose
    // TLS server answers no plaintext.
    let plaintext = nodeward_lab::sys::in_netns(&node2.netns, || {
        let to = std::net::SocketAddr::from((api0.ip4, 15008));
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"GET / HTTP/1.1\r\nHost: api-0\r\n\r\n")?;
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        Ok::<_, std::io::Error>(got)
    })
    .unwrap();
    let (_, packets) = capture.stop().unwrap();

    for ip in [api0.ip4.to_string(), api0.ip6.to_string()] {
        assert!(
            packets
                .lines()
                .any(|l| l.contains(&format!("> {ip}.15008"))),
            "no HBONE connection was dialled at {ip}.15008:\n{packets}"
        );
    }
    let answer = plaintext.expect("node-1's agent accepts a connection to api-0:15008");
    assert!(
        !answer.starts_with(b"HTTP/"),
        "plaintext to api-0:15008 got an HTTP answer: {}",
        String::from_utf8_lossy(&answer)
    );
    match own.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("api-0 itself received a connection to its port 15008: {other:?}"),
    }
    drop(own);
    back_to_local_ca(&mut lab);
}

#[test]
fn node_1s_agent_cannot_obtain_a_certificate_for_a_pod_on_node_2() {
    let mut lab = shared_lab();
    with_issuer(&mut lab, &[]);
    // A service account only node-2 runs.
    lab.write_manifest(
        "solo",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: solo-1, namespace: backend}\n\
         spec: {nodeName: node-2, serviceAccountName: solo, containers: [{name: c}]}\n",
    )
    .unwrap();
    let solo = "spiffe://cluster.local/ns/backend/sa/solo";
    let refused = lab
        .issuer_request("node-1", solo)
        .expect_err("node-1's token got a certificate for node-2's pod");
    let refused = format!("{refused:#}");
    assert!(
        refused.contains("403") && refused.contains("node node-1"),
        "the refusal should say the identity is not on node-1: {refused}"
    );
    let signed = lab
        .issuer_request("node-2", solo)
        .unwrap_or_else(|e| panic!("node-2's own pod: {e:#}"));
    assert!(signed.contains(solo), "{signed}");
    // The same token for a pod node-1 does run is signed.
    lab.issuer_request("node-1", "spiffe://cluster.local/ns/backend/sa/api")
        .unwrap_or_else(|e| panic!("node-1's own pod: {e:#}"));
    let log = std::fs::read_to_string(lab.issuer_log()).unwrap_or_default();
    assert!(
        log.contains("refused a CSR") && log.contains("not_on_node"),
        "the issuer did not log the refusal"
    );
    back_to_local_ca(&mut lab);
}

/// Removes the DNAT rule when dropped, even on panic.
struct Dnat {
    netns: String,
    rule: Vec<String>,
}

impl Drop for Dnat {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "exec", &self.netns, "iptables", "-t", "nat", "-D"])
            .args(&self.rule)
            .status();
    }
}

#[test]
fn a_forged_agent_with_a_node_1_workloads_certificate_cannot_terminate_a_connection_to_node_2() {
    let mut lab = shared_lab();
    with_issuer(&mut lab, &[]);
    // What a stolen node-1 can get: a valid certificate of one of its own workloads
    // (frontend/web: web-0 runs there), with its key.
    let forged = lab.state().dir.join("forged");
    let _ = std::fs::remove_dir_all(&forged);
    lab.issuer_request_to(
        "node-1",
        "spiffe://cluster.local/ns/frontend/sa/web",
        Some(&forged),
    )
    .unwrap_or_else(|e| panic!("node-1's own workload: {e:#}"));
    // The forged agent: a TLS server in node-1's namespace presenting that certificate, and
    // node-1's HBONE connections to api-1 (dialled at api-1's own address, port 15008, as
    // ambient does) diverted to it.
    let node1 = lab.node("node-1").clone();
    let api1 = lab.pod("backend/api-1").ip4;
    let forged_port = "15999";
    let mut server = std::process::Command::new("nsenter")
        .arg(format!(
            "--net={}",
            nodeward_lab::sys::netns_path(&node1.netns).display()
        ))
        .args([
            "--", "openssl", "s_server", "-quiet", "-tls1_3", "-alpn", "h2",
        ])
        .args(["-4", "-accept", forged_port])
        .arg("-cert")
        .arg(forged.join("cert.pem"))
        .arg("-key")
        .arg(forged.join("key.pem"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("openssl s_server");
    let listening = eventually(Duration::from_secs(5), Duration::from_millis(50), || {
        nodeward_lab::sys::in_netns(&node1.netns, || {
            TcpStream::connect((node1.ip4, 15999)).is_ok()
        })
        .unwrap_or(false)
    });
    assert!(listening, "the forged server does not listen");
    let rule: Vec<String> = [
        "OUTPUT",
        "-p",
        "tcp",
        "-d",
        &api1.to_string(),
        "--dport",
        "15008",
        "-j",
        "DNAT",
        "--to-destination",
        &format!("{}:{forged_port}", node1.ip4),
    ]
    .iter()
    .map(ToString::to_string)
    .collect();
    let added = std::process::Command::new("ip")
        .args(["netns", "exec", &node1.netns, "iptables", "-t", "nat", "-A"])
        .args(&rule)
        .status()
        .unwrap();
    assert!(added.success(), "adding the DNAT rule");
    let dnat = Dnat {
        netns: node1.netns.clone(),
        rule,
    };
    let refused_before = lab.status("node-1").unwrap()["tunnel"]["handshake_failures"]["client"]
        .as_u64()
        .unwrap_or(0);
    // web-0 (node-1) to api-1 (node-2): the tunnel reaches the forged server, which proves
    // frontend/web, not backend/api; the client refuses it and the connection fails.
    lab.expect(
        &[Case::tcp(
            "frontend/web-0",
            "backend/api-1",
            HTTP_PORT,
            false,
        )],
        SETTLE,
    );
    let refused = lab.status("node-1").unwrap()["tunnel"]["handshake_failures"]["client"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        refused > refused_before,
        "node-1's agent counted no refused server handshake (the forged server {}):\n{}",
        match server.try_wait() {
            Ok(None) => "runs".to_owned(),
            other => format!("exited: {other:?}"),
        },
        lab.agent_logs_tail(10)
    );
    let log = std::fs::read_to_string(lab.agent_log("node-1")).unwrap_or_default();
    assert!(
        log.contains("spiffe://cluster.local/ns/frontend/sa/web, not one of the identities expected (spiffe://cluster.local/ns/backend/sa/api)"),
        "node-1's log does not say why it refused the forged server:
{}",
        lab.agent_logs_tail(10)
    );
    drop(dnat);
    let _ = server.kill();
    let _ = server.wait();

    // Node-1's own agent, asked for api-1 (node-1's HBONE connections to api-1 diverted to its
    // own HBONE server), has no certificate for a pod that is not on its node: nothing
    // terminates.
    const NOT_HERE: &str = "a client asked for a pod that is not on this node";
    let not_here = |lab: &Lab| {
        std::fs::read_to_string(lab.agent_log("node-1"))
            .unwrap_or_default()
            .matches(NOT_HERE)
            .count()
    };
    let not_here_before = not_here(&lab);
    let own_rule: Vec<String> = [
        "OUTPUT",
        "-p",
        "tcp",
        "-d",
        &api1.to_string(),
        "--dport",
        "15008",
        "-j",
        "DNAT",
        "--to-destination",
        &format!("{}:15008", node1.ip4),
    ]
    .iter()
    .map(ToString::to_string)
    .collect();
    let added = std::process::Command::new("ip")
        .args(["netns", "exec", &node1.netns, "iptables", "-t", "nat", "-A"])
        .args(&own_rule)
        .status()
        .unwrap();
    assert!(added.success(), "adding the DNAT rule to node-1's agent");
    let route = Dnat {
        netns: node1.netns.clone(),
        rule: own_rule,
    };
    lab.expect(
        &[Case::tcp(
            "frontend/web-0",
            "backend/api-1",
            HTTP_PORT,
            false,
        )],
        SETTLE,
    );
    assert!(
        not_here(&lab) > not_here_before,
        "node-1's HBONE server did not refuse to answer for api-1:\n{}",
        lab.agent_logs_tail(10)
    );
    drop(route);

    // Without the diversion, the real node-2 agent proves backend/api.
    lab.expect(
        &[Case::tcp(
            "frontend/web-0",
            "backend/api-1",
            HTTP_PORT,
            true,
        )],
        SETTLE,
    );
    back_to_local_ca(&mut lab);
}

fn renewals(lab: &Lab, node: &str, result: &str) -> u64 {
    let text = lab.agent_http_get(node, "/metrics").unwrap_or_default();
    let prefix = format!("nodeward_certificate_renewals_total{{result=\"{result}\"}}");
    text.lines()
        .find(|l| l.starts_with(&prefix))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Writes a line on `stream` and reads its echo, or panics saying when.
fn round(lab: &Lab, stream: &mut TcpStream, what: &str, started: Instant) {
    let msg = format!("{what} at {:.1?}\n", started.elapsed());
    stream.write_all(msg.as_bytes()).unwrap();
    let mut got = vec![0u8; msg.len()];
    stream.read_exact(&mut got).unwrap_or_else(|e| {
        panic!(
            "the live connection broke ({what}, {:.1?}): {e}\n{}",
            started.elapsed(),
            lab.agent_logs_tail(20)
        )
    });
    assert_eq!(got, msg.as_bytes());
}

#[test]
fn the_issuer_killed_and_restarted_live_connections_continue_and_renewals_resume() {
    let mut lab = shared_lab();
    // Renewed at about half-life: every 3-4 s.
    with_issuer(&mut lab, &["--cert-ttl", "8s"]);
    let nodes = ["node-1", "node-2"];
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
    let started = Instant::now();
    // Short-TTL rotation through the issuer.
    let first: Vec<u64> = nodes.iter().map(|n| renewals(&lab, n, "success")).collect();
    while nodes
        .iter()
        .zip(&first)
        .any(|(n, f)| renewals(&lab, n, "success") <= *f)
    {
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "no renewal through the issuer within 8 s\n{}",
            lab.agent_logs_tail(20)
        );
        round(&lab, &mut stream, "before the issuer's crash", started);
        std::thread::sleep(Duration::from_millis(200));
    }

    lab.kill_issuer().unwrap();
    let failed_before: u64 = nodes.iter().map(|n| renewals(&lab, n, "failure")).sum();
    let down = Instant::now();
    while down.elapsed() < Duration::from_millis(2500) {
        round(&lab, &mut stream, "while the issuer is down", started);
        std::thread::sleep(Duration::from_millis(200));
    }
    let failed: u64 = nodes.iter().map(|n| renewals(&lab, n, "failure")).sum();
    assert!(
        failed > failed_before,
        "no renewal failed while the issuer was down: the test did not test the outage"
    );

    let at_restart: Vec<u64> = nodes.iter().map(|n| renewals(&lab, n, "success")).collect();
    lab.start_issuer(&["--cert-ttl", "8s"]).unwrap();
    let back = Instant::now();
    while nodes
        .iter()
        .zip(&at_restart)
        .any(|(n, f)| renewals(&lab, n, "success") <= *f)
    {
        assert!(
            back.elapsed() < Duration::from_secs(6),
            "renewals did not resume within 6 s of the issuer's restart\n{}",
            lab.agent_logs_tail(20)
        );
        round(&lab, &mut stream, "after the issuer's restart", started);
        std::thread::sleep(Duration::from_millis(200));
    }
    round(&lab, &mut stream, "at the end", started);
    // New connections get the renewed certificates.
    lab.expect(
        &[Case::tcp(
            "frontend/web-1",
            "backend/api-0",
            HTTP_PORT,
            true,
        )],
        SETTLE,
    );
    drop(stream);
    back_to_local_ca(&mut lab);
}
