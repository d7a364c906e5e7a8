//! Who can read flows (issue 32): nobody through the metrics port; on the flows port only a
//! client with a certificate of the cluster's CA for an allowed identity; and a follower that
//! never reads costs the agent no memory to speak of.
//!
//! Pods: `frontend/web-N`, `backend/api-N`, `data/db-N`; N = 0 and 2 on node-1, N = 1 on node-2.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use nodeward_lab::shared::shared_lab;
use nodeward_lab::{DNS_PORT, HTTP_PORT, Lab, paths, sys};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(15);

/// `nodeward ARGS...` inside network namespace `netns`, with `env` added.
fn nodeward_in(netns: &str, args: &[&str], env: &[(&str, &Path)]) -> Result<String> {
    let bin = paths::nodeward_bin()?;
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", sys::netns_path(netns).display()))
        .arg("--")
        .arg(&bin)
        .args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    sys::run_timeout(&mut cmd, TIMEOUT)
}

fn json_lines(out: &str) -> Vec<Value> {
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// A fresh directory under the lab's (removed with the lab).
fn scratch(lab: &Lab, name: &str) -> PathBuf {
    let dir = lab.state().dir.join("tmp").join(format!(
        "{name}-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The directory of the lab's CA (`ca-cert.pem`, `ca-key.pem`), as `ca-issue --ca-dir` takes it.
fn lab_ca_dir(lab: &Lab) -> PathBuf {
    let (cert, _) = lab.ca_files().unwrap();
    cert.parent().unwrap().to_path_buf()
}

/// Plain HTTP/1.0 `GET path` to `addr` from inside `netns`: the status line and the body.
fn http_get(netns: &str, addr: &str, path: &str) -> Result<(String, String)> {
    let addr: SocketAddr = addr.parse()?;
    let mut stream = sys::in_netns(netns, || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(2))
    })?
    .with_context(|| format!("connecting to {addr} from {netns}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    Ok((
        head.lines().next().unwrap_or_default().to_owned(),
        body.to_owned(),
    ))
}

/// What a plaintext `GET path` to `addr` from inside `netns` reads back; the server may
/// close the connection at any point, which is not an error here (connecting is).
fn plaintext_get(netns: &str, addr: &str, path: &str) -> String {
    let addr: SocketAddr = addr.parse().unwrap();
    let mut stream = sys::in_netns(netns, || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(2))
    })
    .unwrap()
    .unwrap_or_else(|e| panic!("connecting to {addr} from {netns}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut raw = Vec::new();
    if write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").is_ok() {
        let _ = stream.read_to_end(&mut raw);
    }
    String::from_utf8_lossy(&raw).into_owned()
}

/// `nodeward_flows_api_refused_total` by reason, from `node`'s metrics.
fn refused(lab: &Lab, node: &str) -> std::collections::BTreeMap<String, u64> {
    let metrics = lab.agent_http_get(node, "/metrics").unwrap();
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix("nodeward_flows_api_refused_total{reason=\""))
        .filter_map(|l| {
            let (reason, value) = l.split_once("\"} ")?;
            Some((reason.to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

#[test]
fn a_pod_gets_no_flow_from_any_nodes_metrics_port() {
    let lab = shared_lab();
    // Flows on both nodes: web-0 (node-1) -> api-1 (node-2).
    // A flow reaches a node's store a moment after the packet (the ring buffer is read in
    // batches), and on a busy machine the first probe may not be the one recorded: probe until
    // both nodes hold one.
    for node in lab.node_names() {
        let has_flows = nodeward_lab::eventually(TIMEOUT, Duration::from_millis(200), || {
            lab.tcp_probe("frontend/web-0", "backend/api-1", HTTP_PORT, TIMEOUT)
                && !lab.observe(&node, &["--last", "5"]).unwrap().is_empty()
        });
        assert!(has_flows, "{node} has flows to leak");
    }
    let pod = lab.pod("data/db-1").netns.clone();
    for node in lab.nodes() {
        for path in [
            "/v1/flows?last=2",
            "/v1/flows?follow=true&last=5",
            "/v1/flows",
            "/flows",
        ] {
            let (status, body) = http_get(&pod, &node.metrics_addr, path).unwrap();
            assert!(
                status.ends_with("404 Not Found"),
                "GET {path} on {}'s metrics port from a pod: {status}\n{body}",
                node.name
            );
            assert!(!body.contains("pod_name"), "{body}");
        }
        // The same pod does reach the metrics and health endpoints.
        let (status, body) = http_get(&pod, &node.metrics_addr, "/metrics").unwrap();
        assert!(status.ends_with("200 OK"), "{status}");
        assert!(body.contains("nodeward_flows_total"), "{body}");
        let (status, _) = http_get(&pod, &node.metrics_addr, "/healthz").unwrap();
        assert!(status.ends_with("200 OK"), "{status}");
    }
}

/// Accepts any server certificate: this client only wants to see what the agent does with a
/// client that has none.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A TLS client without a certificate asks `addr` for flows from inside `netns`: what it read,
/// and how the exchange ended.
fn tls_without_certificate(netns: &str, addr: &str) -> (Vec<u8>, Result<(), String>) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let conn =
        rustls::ClientConnection::new(Arc::new(config), "nodeward.invalid".try_into().unwrap())
            .unwrap();
    let addr: SocketAddr = addr.parse().unwrap();
    let tcp = sys::in_netns(netns, || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(2))
    })
    .unwrap()
    .unwrap_or_else(|e| panic!("the flows port {addr} should accept TCP: {e}"));
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let mut got = Vec::new();
    let result = tls
        .write_all(b"GET /v1/flows?last=5 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .and_then(|()| tls.read_to_end(&mut got).map(drop))
        .map_err(|e| e.to_string());
    (got, result)
}

#[test]
fn the_flows_port_refuses_clients_without_an_allowed_certificate() {
    let lab = shared_lab();
    assert!(lab.tcp_probe("frontend/web-0", "backend/api-1", HTTP_PORT, TIMEOUT));
    let pod = lab.pod("data/db-1").netns.clone();
    let lab_ca = lab.ca_files().unwrap().0;

    // Certificates: the observer identity from a CA the cluster does not trust, and an
    // identity that may not read flows from the cluster's CA.
    let foreign_ca = scratch(&lab, "foreign-ca");
    nodeward_in(
        &pod,
        &["ca-create", "--dir", foreign_ca.to_str().unwrap()],
        &[],
    )
    .unwrap();
    let foreign = scratch(&lab, "foreign-observer");
    nodeward_in(
        &pod,
        &[
            "ca-issue",
            "--ca-dir",
            foreign_ca.to_str().unwrap(),
            "--out",
            foreign.to_str().unwrap(),
        ],
        &[],
    )
    .unwrap();
    let db = scratch(&lab, "db-identity");
    nodeward_in(
        &pod,
        &[
            "ca-issue",
            "--ca-dir",
            lab_ca_dir(&lab).to_str().unwrap(),
            "--identity",
            "spiffe://cluster.local/ns/data/sa/db",
            "--out",
            db.to_str().unwrap(),
        ],
        &[],
    )
    .unwrap();

    for node in lab.nodes() {
        let before = refused(&lab, &node.name);
        let at =
            |m: &std::collections::BTreeMap<String, u64>, r: &str| m.get(r).copied().unwrap_or(0);

        // Plaintext: no HTTP answer at all.
        let answer = plaintext_get(&pod, &node.flows_addr, "/v1/flows?last=5");
        assert!(
            !answer.starts_with("HTTP/") && !answer.contains("pod_name"),
            "plaintext on {}'s flows port got an answer: {answer}",
            node.flows_addr
        );

        // TLS without a client certificate: the handshake is refused with an alert.
        let (got, result) = tls_without_certificate(&pod, &node.flows_addr);
        assert!(got.is_empty(), "read {:?}", String::from_utf8_lossy(&got));
        let err = result.expect_err("a client without a certificate was served");
        assert!(
            err.contains("CertificateRequired") || err.contains("alert"),
            "expected the agent's TLS alert, got: {err}"
        );

        // `observe --node` with the files of `dir`, trusting the agents (so that the agent is
        // the one to refuse): the error it ends with.
        let refused_observe = |dir: &Path| {
            let err = nodeward_in(
                &pod,
                &[
                    "observe",
                    "--tls-dir",
                    dir.to_str().unwrap(),
                    "--ca-cert",
                    lab_ca.to_str().unwrap(),
                    "--node",
                    &node.flows_addr,
                ],
                &[],
            )
            .expect_err("observe read flows");
            format!("{err:#}")
        };
        // A certificate from a foreign CA.
        let err = refused_observe(&foreign);
        assert!(
            err.contains("the agent refused this client's certificate"),
            "{err}"
        );
        // The cluster's CA, an identity the agent does not allow.
        let err = refused_observe(&db);
        assert!(
            err.contains("spiffe://cluster.local/ns/data/sa/db may not read flows"),
            "{err}"
        );

        // Counted by reason, and logged.
        let counted = nodeward_lab::eventually(TIMEOUT, Duration::from_millis(100), || {
            let now = refused(&lab, &node.name);
            at(&now, "handshake") >= at(&before, "handshake") + 3
                && at(&now, "identity") > at(&before, "identity")
        });
        assert!(
            counted,
            "{}: refusals before {before:?}, after {:?}",
            node.name,
            refused(&lab, &node.name)
        );
        let log = std::fs::read_to_string(lab.agent_log(&node.name)).unwrap();
        assert!(
            log.contains("flows port: refused a client")
                && log.contains("spiffe://cluster.local/ns/data/sa/db"),
            "{} logs no refusal",
            node.name
        );
    }
}

#[test]
fn observe_node_with_the_observer_identity_reads_flows_from_both_nodes() {
    let lab = shared_lab();
    // As the README shows it: an observer certificate from the cluster's CA in the default
    // directory, then `observe --node` by node address (port 4244 by default).
    let dir = scratch(&lab, "observer-home");
    let issued = nodeward_in(
        &lab.nodes()[0].netns,
        &["ca-issue", "--ca-dir", lab_ca_dir(&lab).to_str().unwrap()],
        &[("NODEWARD_OBSERVER_DIR", &dir)],
    )
    .unwrap();
    assert!(
        issued.contains("spiffe://cluster.local/ns/nodeward-system/sa/nodeward-observer"),
        "{issued}"
    );
    assert!(lab.tcp_probe("frontend/web-0", "backend/api-1", HTTP_PORT, TIMEOUT));
    std::thread::sleep(Duration::from_millis(300));
    let mut args = vec!["observe", "-o", "json", "--last", "50"];
    let ips: Vec<String> = lab.nodes().iter().map(|n| n.ip4.to_string()).collect();
    for ip in &ips {
        args.extend(["--node", ip.as_str()]);
    }
    // From a pod: the flows port is meant to be reached from anywhere in the cluster.
    let out = nodeward_in(
        &lab.pod("frontend/web-2").netns,
        &args,
        &[("NODEWARD_OBSERVER_DIR", &dir)],
    )
    .unwrap();
    let flows = json_lines(&out);
    let nodes: std::collections::BTreeSet<&str> = flows
        .iter()
        .filter_map(|f| f["node_name"].as_str())
        .collect();
    assert_eq!(
        nodes.into_iter().collect::<Vec<_>>(),
        ["node-1", "node-2"],
        "flows from both nodes: {flows:#?}"
    );
    assert!(
        flows
            .iter()
            .any(|f| f["source"]["pod_name"] == "web-0" && f["destination"]["pod_name"] == "api-1"),
        "the probe's flow: {flows:#?}"
    );
}

/// `nodeward observe --follow` processes whose output nobody reads: once their pipe is full
/// they stop reading from the agent.
struct StalledFollowers(Vec<Child>);

impl Drop for StalledFollowers {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}

/// `count` UDP datagrams from `from` to `to:5353`, each from its own source port: every one a
/// new flow on both ends. Paced (about 4,000 flows a second), so that a follower that reads
/// keeps up: what followers miss here, they miss because they stopped reading.
fn udp_flows(lab: &Lab, from: &str, to: &str, ports: std::ops::Range<u16>) -> usize {
    let dst = lab.addr(to, DNS_PORT);
    sys::in_netns(&lab.pod(from).netns, || {
        let mut sent = 0;
        for (i, port) in ports.enumerate() {
            let Ok(socket) = UdpSocket::bind(("0.0.0.0", port)) else {
                continue;
            };
            if socket.send_to(b"flow\n", dst).is_ok() {
                sent += 1;
            }
            if i % 200 == 199 {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        sent
    })
    .unwrap()
}

#[test]
fn a_follower_that_never_reads_does_not_grow_the_agents_rss() {
    /// Followers opened, each with a stalled output.
    const FOLLOWERS: usize = 4;
    /// What the agent's RSS may grow by while they stall. Buffering what they miss would take
    /// about 1 KiB per flow per follower: some 200 MiB here.
    const BOUND_MIB: u64 = 48;
    let lab = shared_lab();
    let node = lab.node("node-1").clone();
    let pid = lab.agent_pid("node-1").expect("node-1's agent");
    let observer = lab.observer_dir().unwrap();
    // Fill the flow ring (and the allocator's arenas) first, so what follows is the followers'.
    udp_flows(&lab, "frontend/web-0", "backend/api-0", 30_000..34_000);
    std::thread::sleep(Duration::from_secs(1));
    let lagged_before = lab.status("node-1").unwrap()["flows"]["lost"]["follower_lagged"]
        .as_u64()
        .unwrap_or(0);
    let rss_before = rss_kib(pid);

    let bin = paths::nodeward_bin().unwrap();
    let mut followers = StalledFollowers(Vec::new());
    for _ in 0..FOLLOWERS {
        let child = Command::new("nsenter")
            .arg(format!(
                "--net={}",
                sys::netns_path(&lab.node("node-2").netns).display()
            ))
            .arg("--")
            .arg(&bin)
            .args(["observe", "--follow", "-o", "json", "--tls-dir"])
            .arg(&observer)
            .args(["--node", &node.flows_addr])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        followers.0.push(child);
    }
    let streams = || lab.status("node-1").unwrap()["flows_api"]["streams"].as_u64();
    assert!(
        nodeward_lab::eventually(TIMEOUT, Duration::from_millis(100), || streams()
            == Some(FOLLOWERS as u64)),
        "expected {FOLLOWERS} streams on node-1, status says {:?}",
        streams()
    );

    let started = Instant::now();
    let sent = udp_flows(&lab, "frontend/web-0", "backend/api-0", 34_000..58_000);
    std::thread::sleep(Duration::from_secs(2));
    let status = lab.status("node-1").unwrap();
    let lagged = status["flows"]["lost"]["follower_lagged"]
        .as_u64()
        .unwrap_or(0)
        - lagged_before;
    let rss_after = rss_kib(pid);
    let grew_kib = rss_after.saturating_sub(rss_before);
    eprintln!(
        "{sent} datagrams in {:.1?}; node-1 recorded {} flows in all; followers missed {lagged}; agent RSS {} -> {} KiB (+{grew_kib} KiB)",
        started.elapsed(),
        status["flows"]["total"],
        rss_before,
        rss_after
    );
    assert_eq!(
        streams(),
        Some(FOLLOWERS as u64),
        "the stalled followers are still connected"
    );
    assert!(
        lagged > (FOLLOWERS as u64) * 10_000,
        "the followers missed only {lagged} flows: they were not stalled, or few flows were made"
    );
    assert!(
        grew_kib < BOUND_MIB * 1024,
        "the agent's RSS grew by {grew_kib} KiB (bound {BOUND_MIB} MiB) while {FOLLOWERS} followers stalled"
    );
}
