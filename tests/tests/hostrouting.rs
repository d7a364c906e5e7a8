//! eBPF host routing (`--host-routing=ebpf`, the default): allowed pod-to-pod packets leave
//! the datapath by `bpf_redirect_peer` (same node, and from the underlay into the pod) and
//! `bpf_redirect_neigh` (to another node), which the agents count; traffic to the node and to
//! addresses that are no pod's still takes the stack. With `NODEWARD_LAB_HOST_ROUTING=kernel`
//! (the suite's second run) the same traffic works and no packet is redirected.

use std::net::SocketAddr;
use std::time::Duration;

use nodeward_lab::lab::HOST_ROUTING_ENV;
use nodeward_lab::shared::shared_lab;
use nodeward_lab::{DNS_PORT, HTTP_PORT, Lab, probe};
use serde_json::Value;

const ROUNDTRIPS: u64 = 20;

fn host_routing(lab: &Lab, node: &str) -> Value {
    let status = lab
        .status(node)
        .unwrap_or_else(|e| panic!("status of {node}: {e:#}"));
    status["host_routing"].clone()
}

fn packets(v: &Value, path: &str) -> u64 {
    v["packets"][path].as_u64().unwrap_or(0)
}

/// `ROUNDTRIPS` request/response exchanges on one connection from `from` to `to`.
fn talk(lab: &Lab, from: &str, to: &str) {
    let mut conn = lab
        .connect(from, to, HTTP_PORT, Duration::from_secs(2))
        .unwrap_or_else(|e| panic!("connecting {from} -> {to}: {e:#}"));
    for i in 0..ROUNDTRIPS {
        assert!(
            probe::echo_roundtrip(&mut conn, Duration::from_secs(2)),
            "round trip {i} of {from} -> {to} failed"
        );
    }
}

/// `GET /healthz` of an agent from inside `netns`: the answer, or the error.
fn healthz(netns: &str, to: SocketAddr) -> String {
    use std::io::{Read as _, Write as _};
    let mut stream = match probe::connect_from(netns, to, Duration::from_secs(2)) {
        Ok(s) => s,
        Err(e) => return format!("{e:#}"),
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if let Err(e) = write!(stream, "GET /healthz HTTP/1.0\r\nHost: {to}\r\n\r\n") {
        return e.to_string();
    }
    let mut text = String::new();
    match stream.read_to_string(&mut text) {
        Ok(_) => text,
        Err(e) => format!("{e} after {text:?}"),
    }
}

#[test]
fn pod_to_pod_packets_take_the_redirect_and_the_node_and_other_addresses_still_work() {
    let lab = shared_lab();
    let ebpf = std::env::var(HOST_ROUTING_ENV).map_or(true, |m| m.is_empty() || m == "ebpf");
    let nodes = lab.node_names();
    let (n0, n1) = (&nodes[0], &nodes[1]);
    let here = lab.pods_on(n0);
    let (a, b) = (here[0].key(), here[1].key());
    let c = lab.pods_on(n1)[0].key();

    for (node, status) in [(n0, host_routing(&lab, n0)), (n1, host_routing(&lab, n1))] {
        let devices: Vec<&str> = status["devices"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        if ebpf {
            assert_eq!(status["mode"], "ebpf", "{node}: {status}");
            assert_eq!(
                devices,
                ["eth0"],
                "{node}: the underlay device is the one toward the other node's pods: {status}"
            );
        } else {
            assert_eq!(status["mode"], "kernel", "{node}: {status}");
            assert!(devices.is_empty(), "{node}: {status}");
        }
    }

    // The first packets of a pair may take the stack while the node resolves the pod's MAC.
    for (from, to) in [(&a, &b), (&a, &c), (&c, &a)] {
        assert!(
            lab.tcp_probe(from, to, HTTP_PORT, Duration::from_secs(2)),
            "{from} -> {to} before counting"
        );
    }
    let (before0, before1) = (host_routing(&lab, n0), host_routing(&lab, n1));
    talk(&lab, &a, &b);
    talk(&lab, &a, &c);
    assert!(
        lab.udp_probe(&a, &c, DNS_PORT, Duration::from_secs(2)),
        "udp {a} -> {c}"
    );
    let (after0, after1) = (host_routing(&lab, n0), host_routing(&lab, n1));
    let delta = |before: &Value, after: &Value, path: &str| {
        packets(after, path).saturating_sub(packets(before, path))
    };
    let local = delta(&before0, &after0, "local_peer");
    let out0 = delta(&before0, &after0, "neigh");
    let in1 = delta(&before1, &after1, "underlay_peer");
    let out1 = delta(&before1, &after1, "neigh");
    let in0 = delta(&before0, &after0, "underlay_peer");
    let counts = format!(
        "local_peer {local}, {n0} neigh {out0} underlay_peer {in0}, {n1} neigh {out1} underlay_peer {in1}\nbefore {before0} {before1}\nafter {after0} {after1}"
    );
    if ebpf {
        // Each round trip is a request and a reply, each redirected once on each node.
        for (what, n) in [
            ("same node, both ways", local),
            ("out of the source node", out0),
            ("into the destination pod", in1),
            ("replies out of the destination node", out1),
            ("replies into the source pod", in0),
        ] {
            assert!(
                n >= ROUNDTRIPS,
                "{what}: expected at least {ROUNDTRIPS} redirected packets: {counts}"
            );
        }
        let metrics = lab.agent_http_get(n0, "/metrics").expect("metrics");
        let line = metrics
            .lines()
            .find(|l| l.starts_with("nodeward_host_routed_packets_total{path=\"local_peer\"}"))
            .unwrap_or_else(|| panic!("no local_peer series in the metrics:\n{metrics}"));
        let value: u64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        assert!(value >= local, "{line} against {counts}");
    } else {
        assert_eq!(
            (local, out0, in1, out1, in0),
            (0, 0, 0, 0, 0),
            "host routing off redirected packets: {counts}"
        );
    }

    // The node itself, and the other node (an address that is no pod's): the stack's.
    let left0 = packets(&after0, "stack") + packets(&after0, "fib_miss");
    for node in [n0, n1] {
        let to: SocketAddr = lab.node(node).metrics_addr.parse().expect("node address");
        let answer = healthz(&lab.pod(&a).netns, to);
        assert!(
            answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.0 200"),
            "{a} -> GET /healthz of node {node} at {to}: {answer:?}"
        );
    }
    let after = host_routing(&lab, n0);
    let left = packets(&after, "stack") + packets(&after, "fib_miss");
    if ebpf {
        assert!(
            left > left0,
            "traffic to the nodes was not left to the stack: {after}"
        );
        assert_eq!(
            packets(&after, "neigh"),
            packets(&after0, "neigh"),
            "traffic to a node was redirected: {after}"
        );
    }
}
