//! What `bench datapath` enforces: the client's allow, and 10,000 rules over 1,000 identities,
//! as nodeward manifests and as the equivalent iptables rules. Pure text generation.

use std::net::Ipv4Addr;

use serde_json::{Value, json};

/// iperf3's port on the server pod.
pub const IPERF_PORT: u16 = 5201;
/// The load server's echo port (request/response latency).
pub const ECHO_PORT: u16 = 7000;
/// The load server's accept-and-close ports (connection rate). With [`SinkPorts::Fresh`] one per
/// run, so that no 4-tuple repeats within a benchmark; 64 of them (`bench datapath` makes 36
/// runs: 5 scenarios x 7 rounds and the BPF run), aligned to 64 so that the allow is one port
/// prefix. With [`SinkPorts::Reuse`] every run uses the first.
pub const SINK_PORTS: (u16, u16) = (7232, 7295);

/// Which server port each connections run (`crr`) uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SinkPorts {
    /// One server port for every run and scenario, as real clients of a service meet it: the
    /// client's 4-tuples come round again across runs, including right after the mesh was
    /// switched off (issue 25's black hole would show here). The run of record.
    Reuse,
    /// A port no earlier run used, so no 4-tuple repeats within the benchmark (how the
    /// benchmarks ran before issue 25).
    Fresh,
}

impl SinkPorts {
    /// How the README's "How:" line says it.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Reuse => "one server port for every run, so 4-tuples repeat as real clients' do",
            Self::Fresh => "a fresh server port per run, so no 4-tuple repeats",
        }
    }
}

/// The sink port of each connections run, by [`SinkPorts`].
pub struct Sinks {
    mode: SinkPorts,
    next: u16,
}

impl Sinks {
    pub fn new(mode: SinkPorts) -> Self {
        Self {
            mode,
            next: SINK_PORTS.0,
        }
    }

    pub fn mode(&self) -> SinkPorts {
        self.mode
    }

    /// The port for the next run.
    pub fn take(&mut self) -> anyhow::Result<u16> {
        match self.mode {
            SinkPorts::Reuse => Ok(SINK_PORTS.0),
            SinkPorts::Fresh => {
                anyhow::ensure!(self.next <= SINK_PORTS.1, "out of fresh sink ports");
                self.next += 1;
                Ok(self.next - 1)
            }
        }
    }
}
/// A sink port that only the toggled policy allows (policy change latency); the load server
/// serves the sinks up to it.
pub const TOGGLE_PORT: u16 = SINK_PORTS.1 + 1;
/// The lab echo server's port, used for the "is anything enforced" check.
pub const LAB_HTTP_PORT: u16 = 8080;

/// 1,000 peers (one identity each) x 10 ports, split over 10 policies.
pub const PEERS: usize = 1000;
pub const POLICIES: usize = 10;
/// Ten ports that are not adjacent, so that each (identity, port) rule is its own map entry
/// (adjacent ports would be merged into port prefixes: 6000-6009 is two entries, not ten).
pub const RULE_PORTS: [u16; 10] = [6000, 6010, 6020, 6030, 6040, 6050, 6060, 6070, 6080, 6090];
pub const PEER_NAMESPACE: &str = "bench-peers";

/// Who the rules are for.
pub struct Target<'a> {
    /// The server pod.
    pub namespace: &'a str,
    pub instance: &'a str,
    pub ip: Ipv4Addr,
    /// The client pods' namespace, app label and addresses (all pods of that app are allowed,
    /// as the policy's selector would match them).
    pub client_namespace: &'a str,
    pub client_app: &'a str,
    pub client_ips: Vec<Ipv4Addr>,
}

pub fn rule_count() -> usize {
    PEERS * RULE_PORTS.len()
}

/// Peer `i`'s address: 10.245.0.0/16 is not used by the lab (pods are 10.244.N.0/24).
pub fn peer_ip(i: usize) -> Ipv4Addr {
    let i = u32::try_from(i).expect("small");
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 245, 0, 0)) + 1 + i)
}

/// A NetworkPolicy selecting the server that allows the clients on `ports` (`(port, endPort)`).
pub fn client_allow(t: &Target, name: &str, ports: &[(u16, Option<u16>)]) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(port, end)| match end {
            Some(end) => json!({ "protocol": "TCP", "port": port, "endPort": end }),
            None => json!({ "protocol": "TCP", "port": port }),
        })
        .collect();
    json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": { "name": name, "namespace": t.namespace },
        "spec": {
            "podSelector": { "matchLabels": { "instance": t.instance } },
            "policyTypes": ["Ingress"],
            "ingress": [{
                "from": [{
                    "namespaceSelector": {
                        "matchLabels": { "kubernetes.io/metadata.name": t.client_namespace }
                    },
                    "podSelector": { "matchLabels": { "app": t.client_app } },
                }],
                "ports": ports,
            }],
        },
    })
}

/// The ports the benchmark's client uses, as `(port, endPort)`.
pub fn client_ports() -> Vec<(u16, Option<u16>)> {
    vec![
        (IPERF_PORT, None),
        (ECHO_PORT, None),
        (SINK_PORTS.0, Some(SINK_PORTS.1)),
        (LAB_HTTP_PORT, None),
    ]
}

/// The peers' Namespace and 1,000 Pods on a node that does not exist (remote peers for both
/// agents), each with its own labels and so its own identity.
pub fn peer_objects() -> Vec<Value> {
    let mut objects = vec![json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": PEER_NAMESPACE,
            "labels": { "kubernetes.io/metadata.name": PEER_NAMESPACE },
        },
    })];
    objects.extend((0..PEERS).map(|i| {
        let ip = peer_ip(i).to_string();
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": format!("peer-{i}"),
                "namespace": PEER_NAMESPACE,
                "uid": format!("00000000-0000-4000-8000-{i:012}"),
                "labels": { "app": "peer", "peer": format!("p{i}") },
            },
            "spec": {
                "nodeName": "node-absent",
                "serviceAccountName": "default",
                "containers": [{ "name": "peer", "image": "nodeward-lab/none:latest" }],
            },
            "status": {
                "phase": "Running",
                "podIP": ip,
                "podIPs": [{ "ip": ip }],
                "hostIP": "10.250.0.250",
            },
        })
    }));
    objects
}

/// 10 NetworkPolicies on the server, policy `k` allowing peers `100k..100k+99` on 10 ports:
/// 10,000 (identity, port) rules.
pub fn rule_policies(t: &Target) -> Vec<Value> {
    let per = PEERS / POLICIES;
    (0..POLICIES)
        .map(|k| {
            let from: Vec<Value> = (k * per..(k + 1) * per)
                .map(|i| {
                    json!({
                        "namespaceSelector": {
                            "matchLabels": { "kubernetes.io/metadata.name": PEER_NAMESPACE }
                        },
                        "podSelector": { "matchLabels": { "peer": format!("p{i}") } },
                    })
                })
                .collect();
            let ports: Vec<Value> = RULE_PORTS
                .iter()
                .map(|p| json!({ "protocol": "TCP", "port": p }))
                .collect();
            json!({
                "apiVersion": "networking.k8s.io/v1",
                "kind": "NetworkPolicy",
                "metadata": { "name": format!("bench-rules-{k}"), "namespace": t.namespace },
                "spec": {
                    "podSelector": { "matchLabels": { "instance": t.instance } },
                    "policyTypes": ["Ingress"],
                    "ingress": [{ "from": from, "ports": ports }],
                },
            })
        })
        .collect()
}

/// The same policy as iptables rules for the server's node (`iptables-restore --noflush`), in
/// their own chain jumped to from FORWARD: established traffic first (the conntrack shortcut),
/// then the 10,000 peer rules, then the client's allow, then a drop for the rest of the
/// server's traffic (a selected pod is default-deny). The client's rule comes after the 10,000,
/// as in a chain that grew by appending: the worst case for a linear scan.
pub fn iptables_restore(t: &Target, chain: &str) -> String {
    use std::fmt::Write as _;
    let server = t.ip;
    let mut out = format!(
        "*filter\n:{chain} - [0:0]\n-A FORWARD -j {chain}\n\
         -A {chain} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\n"
    );
    for i in 0..PEERS {
        let peer = peer_ip(i);
        for port in RULE_PORTS {
            let _ = writeln!(
                out,
                "-A {chain} -s {peer}/32 -d {server}/32 -p tcp -m tcp --dport {port} -j ACCEPT"
            );
        }
    }
    let dports: Vec<String> = client_ports()
        .iter()
        .map(|(p, end)| end.map_or_else(|| p.to_string(), |e| format!("{p}:{e}")))
        .collect();
    for client in &t.client_ips {
        let _ = writeln!(
            out,
            "-A {chain} -s {client}/32 -d {server}/32 -p tcp -m multiport --dports {} -j ACCEPT",
            dports.join(",")
        );
    }
    let _ = writeln!(out, "-A {chain} -d {server}/32 -j DROP\nCOMMIT");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reused_sink_ports_repeat_and_fresh_ones_run_out_loudly() {
        let mut reuse = Sinks::new(SinkPorts::Reuse);
        let ports: Vec<u16> = (0..100).map(|_| reuse.take().unwrap()).collect();
        assert!(ports.iter().all(|&p| p == SINK_PORTS.0));
        let mut fresh = Sinks::new(SinkPorts::Fresh);
        let count = usize::from(SINK_PORTS.1 - SINK_PORTS.0) + 1;
        let ports: Vec<u16> = (0..count).map(|_| fresh.take().unwrap()).collect();
        assert_eq!(ports, (SINK_PORTS.0..=SINK_PORTS.1).collect::<Vec<_>>());
        let err = fresh.take().unwrap_err().to_string();
        assert!(err.contains("out of fresh sink ports"), "{err}");
    }

    fn target() -> Target<'static> {
        Target {
            namespace: "backend",
            instance: "api-1",
            ip: Ipv4Addr::new(10, 244, 2, 11),
            client_namespace: "frontend",
            client_app: "web",
            client_ips: vec![Ipv4Addr::new(10, 244, 1, 10), Ipv4Addr::new(10, 244, 2, 10)],
        }
    }

    #[test]
    fn ten_thousand_rules_over_a_thousand_distinct_peers() {
        assert_eq!(rule_count(), 10_000);
        let pods = peer_objects();
        assert_eq!(pods.len(), PEERS + 1);
        let mut ips: Vec<_> = (0..PEERS).map(peer_ip).collect();
        ips.dedup();
        assert_eq!(ips.len(), PEERS);
        assert_eq!(peer_ip(0), Ipv4Addr::new(10, 245, 0, 1));
        assert_eq!(peer_ip(999), Ipv4Addr::new(10, 245, 3, 232));
        let policies = rule_policies(&target());
        let rules: usize = policies
            .iter()
            .map(|p| {
                let rule = &p["spec"]["ingress"][0];
                rule["from"].as_array().unwrap().len() * rule["ports"].as_array().unwrap().len()
            })
            .sum();
        assert_eq!(rules, rule_count());
    }

    #[test]
    fn iptables_has_the_shortcut_first_and_the_same_rules() {
        let text = iptables_restore(&target(), "NWBENCH");
        let rules: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("-A NWBENCH"))
            .collect();
        assert!(rules[0].contains("ESTABLISHED,RELATED"));
        assert_eq!(rules.len(), 1 + rule_count() + 2 + 1);
        assert!(rules[rules.len() - 2].contains("--dports 5201,7000,7232:7295,8080"));
        assert!(rules.last().unwrap().ends_with("-j DROP"));
        assert!(text.ends_with("COMMIT\n"));
    }
}
