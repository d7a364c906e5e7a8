//! The agent's life: live policy changes, a crash and a restart, a broken manifest. Enforcement
//! must never lapse (DESIGN: "fail closed, never partial", "state survives the agent").

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nodeward_lab::shared::shared_lab;
use nodeward_lab::{Case, HTTP_PORT, Lab, netpol, probe};
use serde_json::json;

const SETTLE: Duration = Duration::from_secs(10);

fn allow(from: &str, to: &str) -> Case {
    Case::tcp(from, to, HTTP_PORT, true)
}

fn deny(from: &str, to: &str) -> Case {
    Case::tcp(from, to, HTTP_PORT, false)
}

fn from_frontend(namespace: &str) -> String {
    let from = [json!({ "namespaceSelector": { "matchLabels": { "team": "frontend" } } })];
    netpol::allow_ingress(namespace, "from-frontend", &json!({}), &from, &[])
}

#[test]
fn live_policy_change_takes_effect_without_restart() {
    let lab = shared_lab();
    let pids: Vec<_> = lab.node_names().iter().map(|n| lab.agent_pid(n)).collect();
    lab.write_manifest("data-policy", &netpol::deny_all_ingress("data"))
        .unwrap();
    lab.expect(
        &[
            deny("frontend/web-0", "data/db-1"),
            deny("backend/api-0", "data/db-0"),
        ],
        SETTLE,
    );

    let changed = Instant::now();
    lab.write_manifest("data-policy", &from_frontend("data"))
        .unwrap();
    lab.expect(
        &[
            allow("frontend/web-0", "data/db-1"),
            deny("backend/api-0", "data/db-1"),
        ],
        SETTLE,
    );
    eprintln!("replaced policy enforced within {:.2?}", changed.elapsed());

    lab.remove_manifest("data-policy").unwrap();
    lab.expect(
        &[
            allow("backend/api-0", "data/db-1"),
            allow("backend/api-1", "data/db-0"),
        ],
        SETTLE,
    );
    let after: Vec<_> = lab.node_names().iter().map(|n| lab.agent_pid(n)).collect();
    assert_eq!(pids, after, "the agents restarted");
}

#[derive(Default, Debug)]
struct Tally {
    rounds: u32,
    denied_passed: Vec<String>,
    established_broken: Vec<String>,
    new_allowed_failed: Vec<String>,
}

/// Probes continuously while `restart` runs: an established allowed connection (web-1 on
/// node-2 to api-0 on node-1) keeps working, new allowed connections (web-0) succeed, denied
/// ones (db-1, db-2) fail, in every round. Leaves backend's policy in place.
fn enforced_throughout(lab: &mut Lab, restart: impl FnOnce(&mut Lab)) {
    lab.write_manifest("backend-policy", &from_frontend("backend"))
        .unwrap();
    // api-0 is on node-1; web-1 and db-1 on node-2, web-0 and db-2 on node-1.
    lab.expect(
        &[
            allow("frontend/web-1", "backend/api-0"),
            deny("data/db-1", "backend/api-0"),
            deny("data/db-2", "backend/api-0"),
        ],
        SETTLE,
    );
    let mut established = lab
        .connect(
            "frontend/web-1",
            "backend/api-0",
            HTTP_PORT,
            Duration::from_secs(2),
        )
        .expect("allowed connection");
    assert!(probe::echo_roundtrip(
        &mut established,
        Duration::from_secs(2)
    ));

    let netns = |pod: &str| lab.pod(pod).netns.clone();
    let (db1, db2, web0) = (
        netns("data/db-1"),
        netns("data/db-2"),
        netns("frontend/web-0"),
    );
    let api0 = lab.addr("backend/api-0", HTTP_PORT);
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    let tally = std::thread::scope(|scope| {
        let monitor = scope.spawn(|| {
            let mut t = Tally::default();
            while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(120) {
                let at = format!("{:.2?}", started.elapsed());
                if !probe::echo_roundtrip(&mut established, Duration::from_secs(1)) {
                    t.established_broken.push(at.clone());
                }
                for (name, ns) in [("db-1", &db1), ("db-2", &db2)] {
                    if probe::tcp_probe(ns, api0, Duration::from_millis(300)) {
                        t.denied_passed.push(format!("{name} at {at}"));
                    }
                }
                if !probe::tcp_probe(&web0, api0, Duration::from_millis(500)) {
                    t.new_allowed_failed.push(at);
                }
                t.rounds += 1;
            }
            t
        });
        restart(lab);
        stop.store(true, Ordering::Relaxed);
        monitor.join().expect("monitor thread")
    });
    eprintln!("{tally:?}");
    assert!(
        tally.rounds >= 5,
        "too few probe rounds to prove anything: {tally:?}"
    );
    assert!(
        tally.denied_passed.is_empty(),
        "denied flows passed during the restart: {tally:?}"
    );
    assert!(
        tally.established_broken.is_empty(),
        "the established allowed connection broke: {tally:?}"
    );
    assert!(
        tally.new_allowed_failed.is_empty(),
        "new allowed connections failed during the restart: {tally:?}"
    );
    lab.expect(
        &[
            allow("frontend/web-1", "backend/api-0"),
            deny("data/db-1", "backend/api-0"),
        ],
        SETTLE,
    );
}

fn pause() {
    std::thread::sleep(Duration::from_millis(700));
}

#[test]
fn killing_and_restarting_the_agent_keeps_enforcing() {
    let mut lab = shared_lab();
    enforced_throughout(&mut lab, |lab| {
        pause();
        // node-1 (api-0's node) crashes and stays down a while, then comes back ...
        lab.kill_agent("node-1").expect("kill agent");
        pause();
        lab.start_agent("node-1").expect("restart agent");
        pause();
        // ... and node-2 is restarted the way a rollout would.
        lab.stop_agent("node-2").expect("stop agent");
        pause();
        lab.start_agent("node-2").expect("restart agent");
        pause();
    });
}

/// The sizes a status reports for the ipcache and conntrack maps.
fn map_sizes(lab: &Lab, node: &str) -> (u64, u64) {
    let status = lab.status(node).expect("status");
    let size = |m: &str| {
        status["map_sizes"][m]
            .as_u64()
            .unwrap_or_else(|| panic!("status without map_sizes.{m}: {status}"))
    };
    (size("ipcache"), size("conntrack"))
}

#[test]
fn restarting_with_larger_maps_adopts_the_pinned_state_without_a_gap() {
    let mut lab = shared_lab();
    let before = map_sizes(&lab, "node-1");
    let larger = (before.0 * 2).to_string();
    let conntrack = (before.1 * 2).to_string();
    enforced_throughout(&mut lab, |lab| {
        pause();
        lab.stop_agent("node-1").expect("stop agent");
        lab.set_agent_args(&[
            "--map-ipcache-entries",
            &larger,
            "--map-conntrack-entries",
            &conntrack,
        ]);
        let started = lab.start_agent("node-1");
        lab.set_agent_args(&[]);
        started.expect("restart agent with larger maps");
        pause();
        assert_eq!(
            map_sizes(lab, "node-1"),
            (before.0 * 2, before.1 * 2),
            "the restarted agent's maps have the new sizes"
        );
        // And back, the way a rollback would.
        lab.stop_agent("node-1").expect("stop agent");
        lab.start_agent("node-1")
            .expect("restart agent with the default sizes");
        pause();
    });
    assert_eq!(map_sizes(&lab, "node-1"), before);
    let log = std::fs::read_to_string(lab.agent_log("node-1")).unwrap_or_default();
    assert!(
        log.contains("pinned map resized"),
        "the agent says that it moved its maps"
    );
}

/// An upgrade from an agent whose conntrack was an LRU hash (before the preallocated hash): the
/// node's pinned conntrack is put back into that shape, with its live flows, while the agent is
/// down; the new agent moves the entries into its hash before it attaches its programs, and
/// enforcement (the established connection, new allowed and denied ones) never lapses.
#[test]
fn upgrading_from_the_lru_conntrack_keeps_enforcing() {
    use nodeward_lab::bpf;
    let mut lab = shared_lab();
    let pin = lab.node("node-1").bpffs_dir.join("maps/NW_CONNTRACK");
    enforced_throughout(&mut lab, |lab| {
        pause();
        lab.stop_agent("node-1").expect("stop agent");
        let copied = bpf::replace_with_lru(&pin).expect("pinning an LRU conntrack");
        assert!(copied > 0, "the node had live flows to move");
        lab.start_agent("node-1")
            .expect("start the new agent on the LRU pin");
        pause();
    });
    assert_eq!(
        bpf::pinned_map_type(&pin).expect("reading the pinned conntrack"),
        bpf::MAP_TYPE_HASH,
        "the pin is the new agent's hash again"
    );
    let log = without_ansi(&std::fs::read_to_string(lab.agent_log("node-1")).unwrap_or_default());
    assert!(
        log.lines()
            .any(|l| l.contains("pinned map resized") && l.contains("from_lru=true")),
        "the agent says that it moved the LRU conntrack: {}",
        log.lines()
            .filter(|l| l.contains("pinned map resized"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// `text` without terminal colour sequences (`ESC [ ... m`).
fn without_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A node whose conntrack is full refuses new flows (fail closed), says why in its flows and
/// metrics, and lets them in again once closed flows expire and the collector sweeps them.
#[test]
fn a_full_conntrack_refuses_new_flows_and_recovers_as_entries_expire() {
    use std::io::ErrorKind;
    use std::net::{SocketAddr, TcpStream};
    let mut lab = shared_lab();
    lab.write_manifest("backend-policy", &from_frontend("backend"))
        .unwrap();
    lab.expect(&[allow("frontend/web-0", "backend/api-0")], SETTLE);
    lab.stop_agent("node-1").expect("stop agent");
    lab.set_agent_args(&[
        "--map-conntrack-entries",
        "1024",
        "--conntrack-gc-interval",
        "1s",
    ]);
    let started = lab.start_agent("node-1");
    lab.set_agent_args(&[]);
    started.expect("restart with a 1,024-entry conntrack");

    // Fill node-1's table from web-0 (on node-1) with connections to closed ports of its node:
    // each is answered by a RST, so its entry lives 10 s. The first that times out was refused.
    let node_ip = lab.node("node-1").ip4;
    let web0 = lab.pod("frontend/web-0").netns.clone();
    let fill_started = Instant::now();
    let (answered, refused_port) = nodeward_lab::sys::in_netns(&web0, || {
        let mut answered = 0;
        for port in 20_000..22_000u16 {
            let to = SocketAddr::new(node_ip.into(), port);
            match TcpStream::connect_timeout(&to, Duration::from_millis(300)) {
                Err(e) if e.kind() == ErrorKind::TimedOut => return (answered, Some(port)),
                _ => answered += 1,
            }
        }
        (answered, None)
    })
    .expect("connecting from web-0");
    let refused_port = refused_port.unwrap_or_else(|| {
        panic!("the table never filled: {answered} connections were all answered")
    });
    eprintln!(
        "full after {answered} connections in {:.2?}",
        fill_started.elapsed()
    );

    let drops = |lab: &Lab| {
        lab.observe("node-1", &["--verdict", "DROPPED", "--last", "2000"])
            .expect("observe")
            .into_iter()
            .filter(|f| f["drop_reason_desc"] == "CT_MAP_INSERTION_FAILED")
            .collect::<Vec<_>>()
    };
    let refused = drops(&lab);
    assert!(
        refused
            .iter()
            .any(|f| f["l4"]["TCP"]["destination_port"] == refused_port),
        "the refused connection to port {refused_port} is a CT_MAP_INSERTION_FAILED drop: \
         {refused:?}"
    );
    let metrics = lab.agent_http_get("node-1", "/metrics").expect("metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("nodeward_drops_total{reason=\"CT_MAP_INSERTION_FAILED\"}")),
        "the drop is counted in nodeward_drops_total"
    );

    // The closed flows expire after 10 s and the collector sweeps every second: an allowed
    // connection gets through again.
    let deadline = Instant::now() + Duration::from_secs(40);
    let recovered = loop {
        if lab.tcp_probe(
            "frontend/web-0",
            "backend/api-0",
            HTTP_PORT,
            Duration::from_millis(500),
        ) {
            break Some(fill_started.elapsed());
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let status = lab.status("node-1").expect("status");
    let recovered = recovered.unwrap_or_else(|| {
        panic!(
            "new flows were still refused 40 s after the table filled; conntrack_gc: {}",
            status["conntrack_gc"]
        )
    });
    eprintln!(
        "recovered {recovered:.2?} after the fill began; conntrack_gc: {}",
        status["conntrack_gc"]
    );
    assert!(
        status["conntrack_gc"]["runs"].as_u64().unwrap_or(0) > 0,
        "the collector ran: {status}"
    );
    let metrics = lab.agent_http_get("node-1", "/metrics").expect("metrics");
    let removed: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("nodeward_conntrack_gc_entries_removed_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(
        removed > 0,
        "the collector removed the expired entries (metrics)"
    );

    lab.stop_agent("node-1").expect("stop agent");
    lab.start_agent("node-1")
        .expect("restart with the default conntrack");
    lab.expect(
        &[
            allow("frontend/web-0", "backend/api-0"),
            deny("data/db-1", "backend/api-0"),
        ],
        SETTLE,
    );
}

#[test]
fn broken_manifest_leaves_the_previous_enforcement_in_place() {
    let lab = shared_lab();
    lab.write_manifest("data-policy", &netpol::deny_all_ingress("data"))
        .unwrap();
    lab.expect(
        &[
            deny("frontend/web-0", "data/db-1"),
            deny("backend/api-1", "data/db-0"),
        ],
        SETTLE,
    );
    let pids: Vec<_> = lab.node_names().iter().map(|n| lab.agent_pid(n)).collect();

    // The same file, now unparseable: the policy it held stays enforced.
    lab.write_manifest(
        "data-policy",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny-all-ingress, namespace: data\nspec: [\n",
    )
    .unwrap();
    // A new, well-formed YAML file whose policy cannot be compiled (endPort below port).
    let invalid = netpol::allow_ingress(
        "backend",
        "bad-range",
        &json!({}),
        &[json!({ "namespaceSelector": {} })],
        &[json!({ "protocol": "TCP", "port": 9000, "endPort": 8000 })],
    );
    lab.write_manifest("backend-bad-range", &invalid).unwrap();

    for node in lab.node_names() {
        let reported = nodeward_lab::eventually(SETTLE, Duration::from_millis(200), || {
            lab.status(&node).is_ok_and(|s| {
                let failed = s["policies"]["failed"].to_string();
                failed.contains("bad-range") || failed.contains("backend-bad-range")
            })
        });
        assert!(
            reported,
            "{node} does not report the invalid policy: {:?}",
            lab.status(&node)
        );
    }
    // Nothing changed: data stays isolated, backend (whose only policy is invalid) stays open.
    lab.expect(
        &[
            deny("frontend/web-0", "data/db-1"),
            deny("backend/api-1", "data/db-0"),
            allow("data/db-0", "backend/api-1"),
        ],
        Duration::from_secs(2),
    );
    let after: Vec<_> = lab.node_names().iter().map(|n| lab.agent_pid(n)).collect();
    assert_eq!(pids, after, "an agent exited on a broken manifest");

    // Fixing the file applies it.
    lab.write_manifest("data-policy", &from_frontend("data"))
        .unwrap();
    lab.remove_manifest("backend-bad-range").unwrap();
    lab.expect(
        &[
            allow("frontend/web-0", "data/db-1"),
            deny("backend/api-1", "data/db-0"),
        ],
        SETTLE,
    );
    for node in lab.node_names() {
        let clean = nodeward_lab::eventually(SETTLE, Duration::from_millis(200), || {
            lab.status(&node).is_ok_and(|s| {
                s["policies"]["failed"]
                    .as_array()
                    .is_some_and(Vec::is_empty)
            })
        });
        assert!(
            clean,
            "{node} still reports failures after the fix: {:?}",
            lab.status(&node)
        );
    }
}

#[test]
fn a_small_map_warns_first_then_refuses_an_overflow_and_keeps_enforcing() {
    let mut lab = shared_lab();
    // web-0, api-0 and db-2 are on node-1.
    lab.write_manifest("data-deny", &netpol::deny_all_ingress("data"))
        .unwrap();
    let before = [
        allow("frontend/web-0", "backend/api-0"),
        deny("frontend/web-0", "data/db-2"),
    ];
    lab.expect(&before, SETTLE);
    let status = lab.status("node-1").expect("status");
    let ipcache = |s: &serde_json::Value| {
        s["maps"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["name"] == "ipcache")
            .cloned()
            .unwrap_or_else(|| panic!("no ipcache in the status: {s}"))
    };
    let entries = ipcache(&status)["entries"].as_u64().expect("entries");
    assert!(entries >= 9, "at least 90% of entries + 1: {status}");
    // node-1 restarts with one free ipcache entry: past the warning mark, not full.
    let size = (entries + 1).to_string();
    lab.stop_agent("node-1").expect("stop agent");
    lab.set_agent_args(&["--map-ipcache-entries", &size]);
    let started = lab.start_agent("node-1");
    lab.set_agent_args(&[]);
    started.expect("restart with a small ipcache");
    let status = lab.status("node-1").expect("status");
    assert_eq!(
        ipcache(&status)["nearly_full"],
        true,
        "the status flags the map: {status}"
    );
    let metrics = lab.agent_http_get("node-1", "/metrics").expect("metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l == "nodeward_map_fill_warnings_total{map=\"ipcache\"} 1"),
        "the warning is counted once: {}",
        metrics
            .lines()
            .filter(|l| l.contains("fill_warnings"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let log = std::fs::read_to_string(lab.agent_log("node-1")).unwrap_or_default();
    assert!(
        log.contains("90% full") && log.contains("--map-ipcache-entries"),
        "the warning is logged with the flag to raise"
    );

    // Two more remote pods than fit, together with a policy change: refused whole.
    let extra: String = (1..=2)
        .map(|i| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: extra-{i}, namespace: data, labels: {{app: extra}}}}\n\
                 spec: {{nodeName: node-absent, containers: [{{name: c, image: none}}]}}\n\
                 status: {{phase: Running, podIP: 10.77.0.{i}, podIPs: [{{ip: 10.77.0.{i}}}]}}\n---\n"
            )
        })
        .collect();
    lab.write_manifest("extra-pods", &extra).unwrap();
    lab.remove_manifest("data-deny").unwrap();
    lab.write_manifest("backend-deny", &netpol::deny_all_ingress("backend"))
        .unwrap();
    let refused = nodeward_lab::eventually(SETTLE, Duration::from_millis(100), || {
        lab.status("node-1").is_ok_and(|s| {
            s["last_sync"]["error"]
                .as_str()
                .is_some_and(|e| e.contains("map ipcache would overflow"))
        })
    });
    let status = lab.status("node-1").expect("status");
    assert!(refused, "the overflow is reported: {}", status["last_sync"]);
    let error = status["last_sync"]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("--map-ipcache-entries") && error.contains("previous state stays"),
        "the error says what to raise and what happens: {error}"
    );
    assert_eq!(
        lab.probe_all(&before),
        vec![true, false],
        "the previous state stays enforced (neither the removed deny goes nor the new one applies)"
    );
    assert_eq!(ipcache(&status)["entries"], entries, "nothing was written");

    // Once the change fits again, the agent follows the cluster again.
    lab.remove_manifest("extra-pods").unwrap();
    lab.expect(
        &[
            deny("frontend/web-0", "backend/api-0"),
            allow("frontend/web-0", "data/db-2"),
        ],
        SETTLE,
    );
    // Back to the default sizes for the tests after this one.
    lab.stop_agent("node-1").expect("stop agent");
    lab.start_agent("node-1")
        .expect("restart with the default sizes");
}
