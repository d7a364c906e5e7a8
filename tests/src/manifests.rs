//! The Kubernetes objects of a lab (what `kubectl apply -f` would create), as YAML.
//!
//! The lab's own objects go to `<manifests>/lab/`; policies that tests or the demo add go next to
//! that directory as separate files.

use serde_json::{Value, json};

use crate::topology::{DNS_PORT, HTTP_PORT, LabState, METRICS_PORT};

/// `(file name, multi-document YAML)` for the lab's Namespaces, Nodes, ServiceAccounts and Pods.
pub fn lab_objects(lab: &LabState) -> Vec<(&'static str, String)> {
    let namespaces = lab.namespaces.iter().map(|ns| {
        json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": { "name": ns.name, "labels": ns.labels },
        })
    });
    let nodes = lab.nodes.iter().map(|node| {
        let mut addresses = vec![json!({ "type": "InternalIP", "address": node.ip4.to_string() })];
        let mut cidrs = vec![json!(node.pod_cidr4)];
        if lab.ipv6 {
            addresses.push(json!({ "type": "InternalIP", "address": node.ip6.to_string() }));
            cidrs.push(json!(node.pod_cidr6));
        }
        addresses.push(json!({ "type": "Hostname", "address": node.name }));
        json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": { "name": node.name, "labels": { "kubernetes.io/hostname": node.name } },
            "spec": { "podCIDR": node.pod_cidr4, "podCIDRs": cidrs },
            "status": { "addresses": addresses },
        })
    });
    let service_accounts = lab.namespaces.iter().flat_map(|ns| {
        ["default", ns.app.as_str()].map(|sa| {
            json!({
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "metadata": { "name": sa, "namespace": ns.name },
            })
        })
    });
    let pods = lab.pods.iter().map(|pod| {
        let node = lab.node(&pod.node).expect("a pod's node is in the lab");
        let mut ips = vec![json!({ "ip": pod.ip4.to_string() })];
        let mut host_ips = vec![json!({ "ip": node.ip4.to_string() })];
        if lab.ipv6 {
            ips.push(json!({ "ip": pod.ip6.to_string() }));
            host_ips.push(json!({ "ip": node.ip6.to_string() }));
        }
        let mut ports = vec![
            json!({ "name": "http", "containerPort": HTTP_PORT, "protocol": "TCP" }),
            json!({ "name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP" }),
            json!({ "name": "dns", "containerPort": DNS_PORT, "protocol": "UDP" }),
        ];
        for (name, port) in &pod.extra_tcp_ports {
            ports.push(json!({ "name": name, "containerPort": port, "protocol": "TCP" }));
        }
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": pod.name,
                "namespace": pod.namespace,
                "uid": pod.uid,
                "labels": pod.labels,
            },
            "spec": {
                "nodeName": pod.node,
                "serviceAccountName": pod.service_account,
                "containers": [{
                    "name": pod.labels.get("app").map_or("app", String::as_str),
                    "image": "nodeward-lab/echo:latest",
                    "ports": ports,
                }],
            },
            "status": {
                "phase": "Running",
                "podIP": pod.ip4.to_string(),
                "podIPs": ips,
                "hostIP": node.ip4.to_string(),
                "hostIPs": host_ips,
            },
        })
    });
    vec![
        ("00-namespaces.yaml", documents(namespaces)),
        ("10-nodes.yaml", documents(nodes)),
        ("20-serviceaccounts.yaml", documents(service_accounts)),
        ("30-pods.yaml", documents(pods)),
        ("40-services.yaml", documents(services(lab))),
    ]
}

/// The lab's ClusterIP of the Service of namespace number `n` (0-based): `10.96.0.(10 + n)`.
pub fn cluster_ip(n: usize) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::new(10, 96, 0, u8::try_from(10 + n).expect("few namespaces"))
}

/// Its IPv6 ClusterIP: `fd00:96::(10 + n)` (hex).
pub fn cluster_ip6(n: usize) -> std::net::Ipv6Addr {
    std::net::Ipv6Addr::new(
        0xfd00,
        0x96,
        0,
        0,
        0,
        0,
        0,
        u16::try_from(10 + n).expect("few"),
    )
}

/// One Service per namespace, named for its app (`web`, `api`, `db`), with every pod of the
/// namespace ready in its EndpointSlices (one per address family), as the endpoints controller
/// writes them: `http` 80 to the pods' named port `http` (8080), `dns` 53/UDP to 5353.
fn services(lab: &LabState) -> Vec<Value> {
    let mut out = Vec::new();
    for (n, ns) in lab.namespaces.iter().enumerate() {
        let mut ips = vec![json!(cluster_ip(n).to_string())];
        if lab.ipv6 {
            ips.push(json!(cluster_ip6(n).to_string()));
        }
        out.push(json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": { "name": ns.app, "namespace": ns.name },
            "spec": {
                "selector": { "app": ns.app },
                "clusterIP": ips[0],
                "clusterIPs": ips,
                "ipFamilyPolicy": if lab.ipv6 { "PreferDualStack" } else { "SingleStack" },
                "ports": [
                    { "name": "http", "port": 80, "targetPort": "http", "protocol": "TCP" },
                    { "name": "dns", "port": 53, "targetPort": "dns", "protocol": "UDP" },
                ],
            },
        }));
        let families: &[(&str, bool)] = if lab.ipv6 {
            &[("IPv4", false), ("IPv6", true)]
        } else {
            &[("IPv4", false)]
        };
        for (family, v6) in families {
            let endpoints: Vec<Value> = lab
                .pods
                .iter()
                .filter(|p| p.namespace == ns.name)
                .map(|p| {
                    let addr = if *v6 {
                        p.ip6.to_string()
                    } else {
                        p.ip4.to_string()
                    };
                    json!({
                        "addresses": [addr],
                        "conditions": { "ready": true, "serving": true, "terminating": false },
                        "nodeName": p.node,
                        "targetRef": { "kind": "Pod", "name": p.name, "namespace": p.namespace },
                    })
                })
                .collect();
            out.push(json!({
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": format!("{}-{}", ns.app, family.to_lowercase()),
                    "namespace": ns.name,
                    "labels": { "kubernetes.io/service-name": ns.app },
                },
                "addressType": family,
                "endpoints": endpoints,
                "ports": [
                    { "name": "http", "port": HTTP_PORT, "protocol": "TCP" },
                    { "name": "dns", "port": DNS_PORT, "protocol": "UDP" },
                ],
            }));
        }
    }
    out
}

/// A ClusterIP Service over ready IPv4 endpoints, TCP only, as one Service and one
/// EndpointSlice: what [`bulk_services`] makes in bulk, and what a benchmark's kube-proxy
/// rules are written from.
#[derive(Clone, Debug)]
pub struct SimpleService {
    pub namespace: String,
    pub name: String,
    pub cluster_ip: std::net::Ipv4Addr,
    /// `(name, port, target port)`: the Service's `targetPort` is the name, the slice's port
    /// of that name is the target.
    pub ports: Vec<(String, u16, u16)>,
    /// Ready endpoints.
    pub backends: Vec<std::net::Ipv4Addr>,
}

impl SimpleService {
    /// The Service and its EndpointSlice, as the endpoints controller would write them.
    pub fn documents(&self) -> [Value; 2] {
        let ports: Vec<Value> = self
            .ports
            .iter()
            .map(|(name, port, _)| {
                json!({ "name": name, "port": port, "targetPort": name, "protocol": "TCP" })
            })
            .collect();
        let slice_ports: Vec<Value> = self
            .ports
            .iter()
            .map(|(name, _, target)| json!({ "name": name, "port": target, "protocol": "TCP" }))
            .collect();
        let endpoints: Vec<Value> = self
            .backends
            .iter()
            .map(|ip| json!({ "addresses": [ip.to_string()], "conditions": { "ready": true } }))
            .collect();
        [
            json!({
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": { "name": self.name, "namespace": self.namespace },
                "spec": { "clusterIP": self.cluster_ip.to_string(), "ports": ports },
            }),
            json!({
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": format!("{}-1", self.name),
                    "namespace": self.namespace,
                    "labels": { "kubernetes.io/service-name": self.name },
                },
                "addressType": "IPv4",
                "endpoints": endpoints,
                "ports": slice_ports,
            }),
        ]
    }
}

/// `count` Services `bulk-N` in `namespace` (ClusterIPs from 10.97.0.1, 250 per /24), each
/// `http` 80 to [`HTTP_PORT`] on `backends` endpoints of its own: 10,000 backends for 1,000
/// Services at most, at 10.240.0.1 onwards, addresses no lab pod has (nothing is ever sent to
/// them: they only fill the tables).
pub fn bulk_services(namespace: &str, count: u32, backends: u32) -> Vec<SimpleService> {
    let addr = |n: u32, second: u8| {
        let third = u8::try_from(n / 250).expect("at most 64,000 addresses");
        std::net::Ipv4Addr::new(10, second, third, u8::try_from(n % 250 + 1).expect("< 251"))
    };
    (0..count)
        .map(|i| SimpleService {
            namespace: namespace.to_string(),
            name: format!("bulk-{i}"),
            cluster_ip: addr(i, 97),
            ports: vec![("http".to_string(), 80, HTTP_PORT)],
            backends: (0..backends).map(|j| addr(i * backends + j, 240)).collect(),
        })
        .collect()
}

/// The documents of `yaml` that are not Namespaces (the lab defines its own), or `None` if there
/// are none left.
pub fn without_namespaces(yaml: &str) -> anyhow::Result<Option<String>> {
    let mut kept = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(yaml) {
        let value: Value = serde::Deserialize::deserialize(doc)?;
        if !value.is_null() && value["kind"] != "Namespace" {
            kept.push(value);
        }
    }
    Ok((!kept.is_empty()).then(|| documents(kept)))
}

/// Joins objects into one multi-document YAML file.
pub fn documents(objects: impl IntoIterator<Item = Value>) -> String {
    objects
        .into_iter()
        .map(|o| {
            format!(
                "---\n{}",
                serde_yaml_ng::to_string(&o).expect("JSON values serialize to YAML")
            )
        })
        .collect()
}

/// A Service at `vip:80` whose one port is named `port_name` (an HTTP port when it starts with
/// `http`), to `target` on `pods`, and its EndpointSlice naming each pod and its node, as the
/// endpoints controller writes them: what the HTTP routes of the demo and `bench http` attach
/// to.
pub fn pod_service(
    name: &str,
    namespace: &str,
    vip: std::net::Ipv4Addr,
    port_name: &str,
    target: u16,
    pods: &[&crate::PodState],
) -> String {
    let endpoints: Vec<Value> = pods
        .iter()
        .map(|p| {
            json!({
                "addresses": [p.ip4.to_string()],
                "conditions": { "ready": true },
                "nodeName": p.node,
                "targetRef": { "kind": "Pod", "name": p.name, "namespace": p.namespace },
            })
        })
        .collect();
    documents([
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": { "name": name, "namespace": namespace },
            "spec": {
                "clusterIP": vip.to_string(),
                "ports": [{ "name": port_name, "port": 80, "targetPort": target }],
            },
        }),
        json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {
                "name": format!("{name}-1"), "namespace": namespace,
                "labels": { "kubernetes.io/service-name": name },
            },
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": [{ "name": port_name, "port": target, "protocol": "TCP" }],
        }),
    ])
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::topology::{LabSpec, plan};

    #[test]
    fn pod_manifest_carries_node_ips_ports_and_labels() {
        let lab = plan(
            &LabSpec::default(),
            "t",
            Path::new("/l"),
            Path::new("/c"),
            Path::new("/b"),
            None,
            0,
        )
        .unwrap();
        let files = lab_objects(&lab);
        let pods: Vec<Value> = serde_yaml_ng::Deserializer::from_str(&files[3].1)
            .map(|d| serde::Deserialize::deserialize(d).unwrap())
            .collect();
        assert_eq!(pods.len(), 9);
        let api1 = pods
            .iter()
            .find(|p| p["metadata"]["name"] == "api-1")
            .unwrap();
        assert_eq!(api1["metadata"]["namespace"], "backend");
        assert_eq!(api1["metadata"]["labels"]["app"], "api");
        assert_eq!(api1["spec"]["nodeName"], "node-2");
        assert_eq!(api1["status"]["hostIP"], "10.250.0.12");
        assert_eq!(api1["status"]["podIP"], "10.244.2.11");
        assert_eq!(api1["spec"]["containers"][0]["ports"][2]["name"], "dns");
        assert!(files[0].1.contains("team: backend"));
        let db0 = pods
            .iter()
            .find(|p| p["metadata"]["name"] == "db-0")
            .unwrap();
        assert_eq!(db0["spec"]["containers"][0]["ports"][3]["name"], "postgres");
        let services: Vec<Value> = serde_yaml_ng::Deserializer::from_str(&files[4].1)
            .map(|d| serde::Deserialize::deserialize(d).unwrap())
            .collect();
        // A Service and two slices (IPv4, IPv6) per namespace.
        assert_eq!(services.len(), 9);
        assert_eq!(services[0]["spec"]["clusterIP"], "10.96.0.10");
        assert_eq!(services[1]["endpoints"].as_array().unwrap().len(), 3);
    }

    #[test]
    fn namespaces_are_filtered_out_of_example_files() {
        let yaml =
            "kind: Namespace\nmetadata: {name: a}\n---\nkind: NetworkPolicy\nmetadata: {name: p}\n";
        let kept = without_namespaces(yaml).unwrap().unwrap();
        assert!(kept.contains("NetworkPolicy") && !kept.contains("Namespace\n"));
        assert_eq!(without_namespaces("kind: Namespace\n").unwrap(), None);
    }
}
