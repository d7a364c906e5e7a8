//! Flows you can follow: `nodeward observe` (follow, filters, JSON), the flow log, `--node`,
//! metrics and status, checked against traffic the test makes itself.
//!
//! Pods: `frontend/web-N`, `backend/api-N`, `data/db-N`; N = 0 and 2 on node-1, N = 1 on node-2.
//! Denied probes make exactly one SYN (a connect timeout below TCP's first retransmission), so
//! each is exactly one dropped packet and one DROPPED flow.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use nodeward_lab::shared::shared_lab;
use nodeward_lab::{Case, DNS_PORT, HTTP_PORT, Lab, METRICS_PORT, netpol, probe};
use serde_json::Value;

const SETTLE: Duration = Duration::from_secs(10);
/// Below the first SYN retransmission (1 s): a denied connect sends exactly one SYN.
const ONE_SYN: Duration = Duration::from_millis(400);

/// Now, as `--since` takes it.
fn now_rfc3339() -> String {
    humantime_like(SystemTime::now())
}

fn humantime_like(t: SystemTime) -> String {
    // Seconds are enough for --since; the agent compares full timestamps.
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
        .saturating_sub(1);
    let out = std::process::Command::new("date")
        .args(["-u", "-d", &format!("@{secs}"), "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .expect("date");
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_owned()
}

/// `t` as the flows write their time: RFC 3339 in UTC with nine fraction digits, so that two
/// such strings compare as the instants do.
fn precise_rfc3339(t: SystemTime) -> String {
    let since = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("after 1970");
    let out = std::process::Command::new("date")
        .args([
            "-u",
            "-d",
            &format!("@{}.{:09}", since.as_secs(), since.subsec_nanos()),
            "+%Y-%m-%dT%H:%M:%S.%NZ",
        ])
        .output()
        .expect("date");
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_owned()
}

/// One SYN from `from` to `to:port` that the policy drops (the connect must fail).
fn denied_syn(lab: &Lab, from: &str, to: &str, port: u16) {
    let connected = probe::connect_from(&lab.pod(from).netns, lab.addr(to, port), ONE_SYN);
    assert!(
        connected.is_err(),
        "{from} -> {to}:{port} connected, but the policy should deny it"
    );
}

fn allowed(lab: &Lab, from: &str, to: &str, port: u16) {
    assert!(
        lab.tcp_probe(from, to, port, SETTLE),
        "{from} -> {to}:{port} should be allowed"
    );
}

fn pod_of(flow: &Value, end: &str) -> String {
    format!(
        "{}/{}",
        flow[end]["namespace"].as_str().unwrap_or(""),
        flow[end]["pod_name"].as_str().unwrap_or("")
    )
}

/// Installs `deny_all_ingress("data")` and waits until it drops.
fn deny_data(lab: &Lab) {
    lab.write_manifest("deny-data", &netpol::deny_all_ingress("data"))
        .unwrap();
    lab.expect(
        &[Case::tcp("frontend/web-0", "data/db-0", HTTP_PORT, false)],
        SETTLE,
    );
}

#[test]
fn a_denied_connection_is_followed_as_dropped_with_its_policy_within_a_second() {
    let lab = shared_lab();
    deny_data(&lab);
    let follow = lab
        .follow("node-1", &["--verdict", "DROPPED", "--to-pod", "data/db-2"])
        .unwrap();
    // Let the follower connect before the probe (it subscribes before it reads anything).
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    denied_syn(&lab, "frontend/web-0", "data/db-2", HTTP_PORT);
    let flow = follow
        .next_matching(started + Duration::from_secs(1), |f| {
            pod_of(f, "source") == "frontend/web-0"
        })
        .unwrap_or_else(|| {
            panic!(
                "no DROPPED flow web-0 -> db-2 within 1 s of the probe; agent logs:\n{}",
                lab.agent_logs_tail(20)
            )
        });
    eprintln!("followed within {:.0?}", started.elapsed());
    assert_eq!(flow["verdict"], "DROPPED", "{flow}");
    assert_eq!(flow["drop_reason_desc"], "POLICY_DENIED", "{flow}");
    assert_eq!(flow["policy"]["name"], "deny-all-ingress", "{flow}");
    assert_eq!(flow["policy"]["namespace"], "data", "{flow}");
    assert_eq!(flow["policy"]["kind"], "NetworkPolicy", "{flow}");
}

/// Known traffic on node-1 (all pods there): web-0 -> api-0 allowed (TCP and UDP), web-0 -> db-0 denied
/// (HTTP and metrics port), api-2 -> db-2 denied.
/// Waits until node-1 records no new flow for a while. A probe that was waiting for a policy
/// to take effect may still send (a retransmitted SYN after 1 s, the FIN of a connection the
/// policy cut), and its drop is recorded then: a test that counts flows starts after those.
fn settle_flows(lab: &Lab) {
    let total = || lab.status("node-1").expect("status")["flows"]["total"].as_u64();
    let mut last = total();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        std::thread::sleep(Duration::from_millis(1200));
        let now = total();
        if now == last {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "node-1 kept recording flows for 10 s"
        );
        last = now;
    }
}

fn known_traffic(lab: &Lab) -> String {
    deny_data(lab);
    settle_flows(lab);
    let since = now_rfc3339();
    allowed(lab, "frontend/web-0", "backend/api-0", HTTP_PORT);
    assert!(
        lab.udp_probe("frontend/web-0", "backend/api-0", DNS_PORT, SETTLE),
        "web-0 -> api-0 UDP should be allowed"
    );
    denied_syn(lab, "frontend/web-0", "data/db-0", HTTP_PORT);
    denied_syn(lab, "frontend/web-0", "data/db-0", METRICS_PORT);
    denied_syn(lab, "backend/api-2", "data/db-2", HTTP_PORT);
    // The flows are in the store within milliseconds; leave room for a slow machine.
    std::thread::sleep(Duration::from_millis(300));
    since
}

#[test]
fn each_filter_narrows_as_documented() {
    let lab = shared_lab();
    let since = known_traffic(&lab);
    let observe = |extra: &[&str]| -> Vec<Value> {
        let mut args = vec!["--last", "10000", "--since", since.as_str()];
        args.extend_from_slice(extra);
        lab.observe("node-1", &args).expect("observe")
    };
    let all = observe(&[]);
    assert!(
        all.iter().any(|f| f["verdict"] == "FORWARDED")
            && all.iter().any(|f| f["verdict"] == "DROPPED"),
        "the known traffic should give both verdicts: {all:#?}"
    );
    let db0 = lab.pod("data/db-0").ip4.to_string();
    let identity_db0 = lab.status("node-1").unwrap()["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["pod"] == "data/db-0")
        .map(|e| e["identity"].as_u64().unwrap())
        .expect("db-0 endpoint");
    let identity = identity_db0.to_string();
    let metrics_port = METRICS_PORT.to_string();
    type Check = Box<dyn Fn(&Value) -> bool>;
    let pods = |f: &Value| (pod_of(f, "source"), pod_of(f, "destination"));
    let has_label = |f: &Value, end: &str, l: &str| {
        f[end]["labels"]
            .as_array()
            .is_some_and(|ls| ls.iter().any(|x| x == l))
    };
    let cases: Vec<(Vec<&str>, Check)> = vec![
        (
            vec!["--verdict", "DROPPED"],
            Box::new(|f| f["verdict"] == "DROPPED"),
        ),
        (
            vec!["--not", "--verdict", "DROPPED"],
            Box::new(|f| f["verdict"] == "FORWARDED"),
        ),
        (
            vec!["--from-pod", "frontend/web-0"],
            Box::new(move |f| pods(f).0 == "frontend/web-0"),
        ),
        (
            vec!["--to-pod", "data/db"],
            Box::new(move |f| pods(f).1.starts_with("data/db-")),
        ),
        (
            vec!["--pod", "backend/api-2"],
            Box::new(move |f| {
                let (s, d) = pods(f);
                s == "backend/api-2" || d == "backend/api-2"
            }),
        ),
        (
            vec!["--namespace", "backend"],
            Box::new(|f| {
                f["source"]["namespace"] == "backend" || f["destination"]["namespace"] == "backend"
            }),
        ),
        (vec!["--to-ip", db0.as_str()], {
            let db0 = db0.clone();
            Box::new(move |f| f["IP"]["destination"] == db0.as_str())
        }),
        (
            vec![
                "--from-ip",
                "10.244.0.0/16",
                "--port",
                metrics_port.as_str(),
            ],
            Box::new(|f| {
                f["l4"]["TCP"]["destination_port"] == METRICS_PORT
                    || f["l4"]["TCP"]["source_port"] == METRICS_PORT
            }),
        ),
        (
            vec!["--protocol", "tcp"],
            Box::new(|f| f["l4"]["TCP"].is_object()),
        ),
        (
            vec!["--identity", identity.as_str()],
            Box::new(move |f| {
                f["source"]["identity"] == identity_db0
                    || f["destination"]["identity"] == identity_db0
            }),
        ),
        (
            vec!["--from-label", "app=web"],
            Box::new(move |f| has_label(f, "source", "k8s:app=web")),
        ),
        (
            vec!["--to-label", "k8s:app=db"],
            Box::new(move |f| has_label(f, "destination", "k8s:app=db")),
        ),
        (
            vec!["--not", "--to-label", "app=db"],
            Box::new(move |f| !has_label(f, "destination", "k8s:app=db")),
        ),
    ];
    for (args, check) in &cases {
        let got = observe(args);
        assert!(
            !got.is_empty(),
            "{args:?} matched nothing of the known traffic"
        );
        assert!(
            got.len() < all.len(),
            "{args:?} did not narrow: {} of {} flows",
            got.len(),
            all.len()
        );
        if let Some(bad) = got.iter().find(|f| !check(f)) {
            panic!("{args:?} let through a flow it should not have: {bad}");
        }
        // Exactly the flows of the unfiltered list that pass the check.
        let want = all.iter().filter(|f| check(f)).count();
        assert_eq!(got.len(), want, "{args:?}: {got:#?}");
    }
    // No DNS proxy yet: no flow carries names, so --to-fqdn is accepted and matches nothing.
    assert!(observe(&["--to-fqdn", "api.example.com"]).is_empty());
    // Unknown values are errors that list the valid ones.
    let err = lab
        .observe("node-1", &["--verdict", "ALLOWED"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("FORWARDED, DROPPED"), "{err}");
    let err = lab
        .observe("node-1", &["--protocol", "tcpp"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("TCP, UDP"), "{err}");
}

#[test]
fn json_lines_carry_the_documented_fields() {
    let lab = shared_lab();
    let since = known_traffic(&lab);
    let flows = lab
        .observe(
            "node-1",
            &["--since", &since, "--last", "100", "--to-pod", "data/db-0"],
        )
        .unwrap();
    let flow = flows
        .iter()
        .find(|f| {
            f["verdict"] == "DROPPED"
                && f["l4"]["TCP"]["destination_port"] == HTTP_PORT
                && f["l4"]["TCP"]["flags"]["SYN"] == true
        })
        .unwrap_or_else(|| panic!("no dropped web-0 -> db-0:{HTTP_PORT} flow in {flows:#?}"));
    for path in [
        "/time",
        "/verdict",
        "/drop_reason_desc",
        "/IP/source",
        "/IP/destination",
        "/l4/TCP/source_port",
        "/l4/TCP/destination_port",
        "/l4/TCP/flags",
        "/source/namespace",
        "/source/pod_name",
        "/source/identity",
        "/source/labels",
        "/destination/namespace",
        "/destination/pod_name",
        "/destination/identity",
        "/destination/labels",
        "/traffic_direction",
        "/is_reply",
        "/node_name",
    ] {
        assert!(flow.pointer(path).is_some(), "{path} missing in {flow}");
    }
    assert!(humantime_parse_ok(flow["time"].as_str().unwrap()), "{flow}");
    assert_eq!(
        flow["IP"]["source"],
        lab.pod("frontend/web-0").ip4.to_string()
    );
    assert_eq!(
        flow["IP"]["destination"],
        lab.pod("data/db-0").ip4.to_string()
    );
    assert_eq!(flow["l4"]["TCP"]["flags"]["SYN"], true);
    assert_eq!(flow["source"]["pod_name"], "web-0");
    assert_eq!(flow["destination"]["namespace"], "data");
    assert_eq!(flow["traffic_direction"], "INGRESS");
    assert_eq!(flow["is_reply"], false);
    assert_eq!(flow["node_name"], "node-1");
    assert!(flow["source"]["identity"].as_u64().unwrap() > 0);
}

fn humantime_parse_ok(t: &str) -> bool {
    t.len() > 20 && t.ends_with('Z') && t.as_bytes()[4] == b'-' && t.contains('T')
}

#[test]
fn the_flow_log_holds_flows_across_an_agent_restart() {
    let mut lab = shared_lab();
    deny_data(&lab);
    let since = now_rfc3339();
    denied_syn(&lab, "frontend/web-0", "data/db-0", HTTP_PORT);
    std::thread::sleep(Duration::from_millis(500));
    lab.stop_agent("node-1").unwrap();
    lab.start_agent("node-1").unwrap();
    denied_syn(&lab, "frontend/web-0", "data/db-2", HTTP_PORT);
    let dir = lab.flow_log_dir("node-1");
    let dir_arg = dir.to_str().unwrap().to_owned();
    let read = || {
        lab.observe(
            "node-1",
            &[
                "--flow-log",
                &dir_arg,
                "--since",
                &since,
                "--verdict",
                "DROPPED",
            ],
        )
        .unwrap()
    };
    // The writer flushes at least every 200 ms.
    let ok = nodeward_lab::eventually(SETTLE, Duration::from_millis(200), || {
        let flows = read();
        ["data/db-0", "data/db-2"]
            .iter()
            .all(|d| flows.iter().any(|f| pod_of(f, "destination") == *d))
    });
    assert!(
        ok,
        "the flow log {} should hold the drop before the restart (db-0) and after it (db-2): {:#?}",
        dir.display(),
        read()
    );
    // The socket API only knows the new agent's flows; the log knows both.
    let live = lab
        .observe(
            "node-1",
            &[
                "--since",
                &since,
                "--to-pod",
                "data/db-0",
                "--verdict",
                "DROPPED",
            ],
        )
        .unwrap();
    // Only the denied SYN counts: a late FIN of an earlier test's connection to db-0 (its
    // conntrack entry closed) may be dropped, and recorded, after the restart.
    let replayed: Vec<&Value> = live
        .iter()
        .filter(|f| f["Summary"].as_str().is_some_and(|s| s.contains("SYN")))
        .collect();
    assert!(
        replayed.is_empty(),
        "a restarted agent starts with an empty ring: {replayed:#?}"
    );
    let status = lab.status("node-1").unwrap();
    assert!(status["flow_log"]["error"].is_null(), "{status}");
    assert_eq!(status["flow_log"]["dir"], dir_arg.as_str(), "{status}");
}

/// Prometheus text format: `name{labels} value` samples, `# HELP` and `# TYPE` comments.
fn parse_prometheus(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        if line.is_empty() || line.starts_with('#') {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let kind = rest.split_whitespace().nth(1).unwrap_or("");
                assert!(
                    ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                    "line {n}: unknown type: {line}"
                );
            }
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("line {n}: no value: {line}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("line {n}: value is not a number: {line}")),
        };
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "line {n}: bad metric name: {line}"
        );
        if name_end < series.len() {
            assert!(series.ends_with('}'), "line {n}: unclosed labels: {line}");
            for pair in series[name_end + 1..series.len() - 1]
                .split("\",")
                .filter(|p| !p.is_empty())
            {
                let (k, v) = pair
                    .split_once('=')
                    .unwrap_or_else(|| panic!("line {n}: bad label {pair:?}: {line}"));
                assert!(
                    v.starts_with('"') && !k.is_empty(),
                    "line {n}: bad label {pair:?}"
                );
            }
        }
        out.insert(series.to_owned(), value);
    }
    out
}

fn sum(metrics: &BTreeMap<String, f64>, prefix: &str, label: &str) -> f64 {
    metrics
        .iter()
        .filter(|(k, _)| k.starts_with(prefix) && k.contains(label))
        .map(|(_, v)| *v)
        .sum()
}

#[test]
fn metrics_parse_and_the_drop_counter_moves_by_the_denied_probes() {
    let lab = shared_lab();
    deny_data(&lab);
    settle_flows(&lab);
    // The counters' snapshot, and the instant it was taken to the nanosecond: the flows compared
    // with it are those recorded after it (`--since` only has whole seconds and would also take
    // drops of the second before, which the snapshot already counted).
    let snapshot = precise_rfc3339(SystemTime::now());
    let before = parse_prometheus(&lab.agent_http_get("node-1", "/metrics").unwrap());
    for name in [
        "nodeward_flows_total",
        "nodeward_map_entries",
        "nodeward_map_capacity",
        "nodeward_lost_events",
        "nodeward_map_sync_duration_seconds_bucket",
    ] {
        assert!(
            before.keys().any(|k| k.starts_with(name)),
            "{name} missing from /metrics"
        );
    }
    assert!(
        before
            .keys()
            .any(|k| k.contains("place=\"flow_log_dropped\"")),
        "lost events by place should include the flow log"
    );
    assert!(
        !before.keys().any(|k| k.contains("10.244.")),
        "metrics must not carry addresses"
    );
    let drops = |m: &BTreeMap<String, f64>| sum(m, "nodeward_drops_total", "POLICY_DENIED");
    let policy = |m: &BTreeMap<String, f64>| {
        sum(
            m,
            "nodeward_policy_verdicts_total",
            "policy=\"NetworkPolicy/data/deny-all-ingress\",verdict=\"DROPPED\"",
        )
    };
    let since = now_rfc3339();
    const PROBES: u16 = 5;
    for i in 0..PROBES {
        let to = if i % 2 == 0 { "data/db-0" } else { "data/db-2" };
        denied_syn(&lab, "backend/api-0", to, HTTP_PORT);
    }
    let want = f64::from(PROBES);
    let mut after = BTreeMap::new();
    let moved =
        nodeward_lab::eventually(Duration::from_secs(3), Duration::from_millis(100), || {
            after = parse_prometheus(&lab.agent_http_get("node-1", "/metrics").unwrap());
            drops(&after) - drops(&before) >= want
        });
    assert!(
        moved,
        "drops did not move by {want}: before {}, after {}",
        drops(&before),
        drops(&after)
    );
    // Then exactly, against the drops node-1 recorded meanwhile: each probe's SYN, and its
    // retransmission too if a stalled host kept the probe's socket open past 1 s. Any drop the
    // counters count and the flows do not (or the other way round) fails.
    settle_flows(&lab);
    after = parse_prometheus(&lab.agent_http_get("node-1", "/metrics").unwrap());
    let recorded = lab
        .observe(
            "node-1",
            &["--since", &since, "--last", "1000", "--verdict", "DROPPED"],
        )
        .unwrap();
    let denied: Vec<&Value> = recorded
        .iter()
        .filter(|f| f["drop_reason_desc"] == "POLICY_DENIED")
        .filter(|f| f["time"].as_str().is_some_and(|t| t >= snapshot.as_str()))
        .collect();
    let probes = denied
        .iter()
        .filter(|f| {
            pod_of(f, "source") == "backend/api-0"
                && f["l4"]["TCP"]["destination_port"] == HTTP_PORT
        })
        .count();
    assert!(
        probes >= usize::from(PROBES),
        "{probes} recorded drops for {PROBES} denied probes: {denied:#?}"
    );
    let recorded_drops = denied.len() as f64;
    assert_eq!(
        drops(&after) - drops(&before),
        recorded_drops,
        "nodeward_drops_total{{reason=POLICY_DENIED}} against the recorded POLICY_DENIED drops: \
         {denied:#?}"
    );
    assert_eq!(
        policy(&after) - policy(&before),
        recorded_drops,
        "nodeward_policy_verdicts_total against the recorded POLICY_DENIED drops: {denied:#?}"
    );
}

#[test]
fn status_reports_a_policy_that_failed_to_compile() {
    let lab = shared_lab();
    let bad = netpol::network_policy(
        "backend",
        "bad-range",
        &serde_json::json!({
            "podSelector": {},
            "policyTypes": ["Ingress"],
            "ingress": [{ "ports": [{ "protocol": "TCP", "port": 80, "endPort": 79 }] }],
        }),
    );
    lab.write_manifest("bad-range", &bad).unwrap();
    let mut last = Value::Null;
    let reported = nodeward_lab::eventually(SETTLE, Duration::from_millis(100), || {
        last = lab.status("node-1").unwrap();
        last["policies"]["failed"].as_array().is_some_and(|f| {
            f.iter()
                .any(|p| p["object"] == "NetworkPolicy backend/bad-range")
        })
    });
    assert!(
        reported,
        "status should list backend/bad-range as failed: {last}"
    );
    let failure = last["policies"]["failed"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["object"] == "NetworkPolicy backend/bad-range")
        .unwrap();
    let error = failure["error"].as_str().unwrap();
    assert!(
        error.contains("endPort"),
        "the reason should name the field: {error}"
    );
    let text = lab.status_text("node-1").unwrap();
    assert!(
        text.contains("1 failed") && text.contains("bad-range"),
        "status text: {text}"
    );
}

#[test]
fn node_reads_other_agents_through_their_flows_ports_in_time_order() {
    let lab = shared_lab();
    deny_data(&lab);
    let since = now_rfc3339();
    // Across nodes: web-1 (node-2) -> db-0 (node-1): node-2 forwards on egress, node-1 drops.
    denied_syn(&lab, "frontend/web-1", "data/db-0", HTTP_PORT);
    std::thread::sleep(Duration::from_millis(300));
    let addrs: Vec<String> = lab
        .node_names()
        .iter()
        .map(|n| lab.node(n).flows_addr.clone())
        .collect();
    let observer = lab.observer_dir().unwrap();
    let observer = observer.to_str().unwrap();
    let mut args = vec![
        "--tls-dir",
        observer,
        "--since",
        since.as_str(),
        "--last",
        "1000",
        "--from-pod",
        "frontend/web-1",
    ];
    for a in &addrs {
        args.extend(["--node", a.as_str()]);
    }
    let flows = lab.observe_in("node-1", &args).unwrap();
    let nodes: std::collections::BTreeSet<&str> = flows
        .iter()
        .filter_map(|f| f["node_name"].as_str())
        .collect();
    assert_eq!(
        nodes.into_iter().collect::<Vec<_>>(),
        ["node-1", "node-2"],
        "flows from both nodes: {flows:#?}"
    );
    let times: Vec<&str> = flows.iter().filter_map(|f| f["time"].as_str()).collect();
    assert!(
        times.windows(2).all(|w| w[0] <= w[1]),
        "not in time order: {times:#?}"
    );
    assert!(
        flows
            .iter()
            .any(|f| f["node_name"] == "node-1" && f["verdict"] == "DROPPED"),
        "{flows:#?}"
    );
    // A bad filter comes back as the agent's error.
    let err = lab
        .observe_in(
            "node-1",
            &[
                "--tls-dir",
                observer,
                "--node",
                &addrs[1],
                "--protocol",
                "nope",
            ],
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("TCP, UDP"), "{err}");
    let _: SocketAddr = addrs[0].parse().unwrap();
}
