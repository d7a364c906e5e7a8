//! The lab's plan: every name, address and path, computed from a [`LabSpec`] and a lab id before
//! anything is created. Pure data; it is also the state file that `status` and `down` read.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use anyhow::{Result, bail, ensure};
use serde::{Deserialize, Serialize};

/// Every lab object (network namespace, cgroup, bpffs directory) starts with this, followed by the
/// lab id; `down` sweeps leftovers of crashed runs by it.
pub const PREFIX: &str = "nwl-";
/// Interface names are short (IFNAMSIZ is 16 with the NUL): `nw<id>p<n>`.
pub const IFNAME_PREFIX: &str = "nw";
/// The pods' default gateway: link-local, answered by the host-side veth (Calico style).
pub const GATEWAY4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
pub const GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
/// Fixed MAC of every host-side veth (Calico does the same); pods get a permanent neighbour entry.
pub const HOST_VETH_MAC: &str = "ee:ee:ee:ee:ee:ee";
/// The echo server's ports, named in the pod manifests.
pub const HTTP_PORT: u16 = 8080;
pub const METRICS_PORT: u16 = 9090;
pub const DNS_PORT: u16 = 5353;
pub const AGENT_METRICS_PORT: u16 = 9962;
/// The agents' flows port (`--flows-addr`, mutual TLS), on the node address.
pub const AGENT_FLOWS_PORT: u16 = 4244;
/// Extra ports by app, so that `policies/examples/` (named port `postgres`, api debug ports) have
/// something to select: `db` pods serve `postgres`, `api` pods `debug`.
pub const POSTGRES_PORT: u16 = 5432;
pub const DEBUG_PORT: u16 = 6060;
/// Well-known namespaces and their apps, so that `policies/examples/` match the lab.
pub const NAMESPACES: [(&str, &str); 3] = [("frontend", "web"), ("backend", "api"), ("data", "db")];

#[derive(Clone, Debug)]
pub struct LabSpec {
    /// Lab id: `[a-z0-9]{1,6}`. `None` picks a random one (tests).
    pub name: Option<String>,
    pub nodes: usize,
    pub namespaces: usize,
    /// Pods per namespace, spread round-robin over the nodes.
    pub pods: usize,
    /// Start one agent per node (and wait until it is ready).
    pub agents: bool,
    pub ipv6: bool,
    /// A lab made by `cargo xtask lab up`: it outlives the process and only `down` removes it.
    /// A non-persistent lab is owned by the process that made it; once that process is gone, the
    /// next lab's sweep removes whatever it left.
    pub persistent: bool,
}

impl Default for LabSpec {
    fn default() -> Self {
        Self {
            name: None,
            nodes: 2,
            namespaces: 3,
            pods: 3,
            agents: true,
            ipv6: true,
            persistent: false,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Owner {
    pub pid: u32,
    /// `starttime` from `/proc/<pid>/stat`, so a recycled pid is not mistaken for the owner.
    pub start_time: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LabState {
    pub id: String,
    pub prefix: String,
    pub dir: PathBuf,
    pub owner: Option<Owner>,
    pub created_unix: u64,
    pub ipv6: bool,
    pub manifests_dir: PathBuf,
    /// `<cgroup2 root>/<prefix>`: the nodes' cgroups are its children.
    pub cgroup_dir: PathBuf,
    /// `/sys/fs/bpf/<prefix>`: the nodes' bpffs directories are its children.
    pub bpffs_dir: PathBuf,
    pub underlay_netns: String,
    pub namespaces: Vec<NamespaceState>,
    pub nodes: Vec<NodeState>,
    pub pods: Vec<PodState>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NamespaceState {
    pub name: String,
    pub app: String,
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeState {
    pub name: String,
    pub index: usize,
    pub netns: String,
    /// Bridge port in the underlay namespace; the node side is `eth0`.
    pub underlay_ifname: String,
    pub ip4: Ipv4Addr,
    pub ip6: Ipv6Addr,
    pub pod_cidr4: String,
    pub pod_cidr6: String,
    pub cgroup: PathBuf,
    pub bpffs_dir: PathBuf,
    pub state_dir: PathBuf,
    pub api_socket: PathBuf,
    pub metrics_addr: String,
    /// `--flows-addr`: flows over mutual TLS (`observe --node` with the lab's observer).
    #[serde(default)]
    pub flows_addr: String,
    pub agent_log: PathBuf,
    pub agent_pid: Option<u32>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PodState {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub netns: String,
    /// Host-side veth in the node namespace; the pod side is `eth0`.
    pub host_ifname: String,
    pub ip4: Ipv4Addr,
    pub ip6: Ipv6Addr,
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
    /// Named TCP ports beyond `http` and `metrics` (all pods serve those and UDP `dns`).
    #[serde(default)]
    pub extra_tcp_ports: Vec<(String, u16)>,
    pub uid: String,
    pub cgroup: PathBuf,
    pub log: PathBuf,
    pub echo_pid: Option<u32>,
}

impl PodState {
    /// `namespace/name`, the form `nodeward status` uses.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

impl LabState {
    pub fn state_file(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    pub fn node(&self, name: &str) -> Option<&NodeState> {
        self.nodes.iter().find(|n| n.name == name)
    }

    pub fn pod(&self, key: &str) -> Option<&PodState> {
        self.pods.iter().find(|p| p.key() == key)
    }

    /// Every network namespace of the lab, pods first (the order teardown uses).
    pub fn all_netns(&self) -> Vec<String> {
        let pods = self.pods.iter().map(|p| p.netns.clone());
        let nodes = self.nodes.iter().map(|n| n.netns.clone());
        pods.chain(nodes)
            .chain([self.underlay_netns.clone()])
            .collect()
    }
}

pub fn validate_id(id: &str) -> Result<()> {
    ensure!(
        !id.is_empty()
            && id.len() <= 6
            && id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
        "lab name {id:?} must be 1 to 6 characters of [a-z0-9] (it goes into interface names)"
    );
    Ok(())
}

/// Computes the whole lab from the spec.
pub fn plan(
    spec: &LabSpec,
    id: &str,
    lab_root: &Path,
    cgroup2_root: &Path,
    bpffs_root: &Path,
    owner: Option<Owner>,
    created_unix: u64,
) -> Result<LabState> {
    validate_id(id)?;
    if spec.nodes == 0 || spec.nodes > 200 || spec.namespaces == 0 || spec.pods == 0 {
        bail!("a lab needs 1..=200 nodes, at least one namespace and one pod per namespace");
    }
    let prefix = format!("{PREFIX}{id}");
    let dir = lab_root.join(&prefix);
    let cgroup_dir = cgroup2_root.join(&prefix);
    let bpffs_dir = bpffs_root.join(&prefix);
    let nodes: Vec<NodeState> = (1..=spec.nodes)
        .map(|i| {
            let name = format!("node-{i}");
            let node_dir = dir.join(&name);
            let ip4 = Ipv4Addr::new(10, 250, 0, u8::try_from(10 + i).expect("at most 200 nodes"));
            NodeState {
                netns: format!("{prefix}-{name}"),
                underlay_ifname: format!("{IFNAME_PREFIX}{id}u{i}"),
                ip4,
                ip6: Ipv6Addr::new(
                    0xfd00,
                    0x250,
                    0,
                    0,
                    0,
                    0,
                    0,
                    u16::try_from(i).expect("small"),
                ),
                pod_cidr4: format!("10.244.{i}.0/24"),
                pod_cidr6: format!("fd00:244:{i:x}::/64"),
                cgroup: cgroup_dir.join(&name),
                bpffs_dir: bpffs_dir.join(&name),
                state_dir: node_dir.join("state"),
                api_socket: node_dir.join("nodeward.sock"),
                metrics_addr: format!("{ip4}:{AGENT_METRICS_PORT}"),
                flows_addr: format!("{ip4}:{AGENT_FLOWS_PORT}"),
                agent_log: node_dir.join("agent.log"),
                agent_pid: None,
                index: i,
                name,
            }
        })
        .collect();
    let mut namespaces = Vec::new();
    let mut pods = Vec::new();
    let mut next_host = vec![10u16; spec.nodes];
    for n in 0..spec.namespaces {
        let (ns, app) = match NAMESPACES.get(n) {
            Some((ns, app)) => ((*ns).to_string(), (*app).to_string()),
            None => (format!("ns{}", n + 1), format!("app{}", n + 1)),
        };
        let labels = BTreeMap::from([
            ("team".to_string(), ns.clone()),
            ("tier".to_string(), ns.clone()),
            ("kubernetes.io/metadata.name".to_string(), ns.clone()),
        ]);
        for k in 0..spec.pods {
            let node = &nodes[k % spec.nodes];
            let host = next_host[k % spec.nodes];
            next_host[k % spec.nodes] += 1;
            ensure!(
                host < 255,
                "too many pods on {}: a node has a /24",
                node.name
            );
            let name = format!("{app}-{k}");
            let index = pods.len();
            let node_index = u8::try_from(node.index).expect("at most 200 nodes");
            pods.push(PodState {
                netns: format!("{prefix}-{ns}-{name}"),
                host_ifname: format!("{IFNAME_PREFIX}{id}p{index}"),
                ip4: Ipv4Addr::new(10, 244, node_index, u8::try_from(host).expect("< 255")),
                ip6: Ipv6Addr::new(0xfd00, 0x244, u16::from(node_index), 0, 0, 0, 0, host),
                labels: BTreeMap::from([
                    ("app".to_string(), app.clone()),
                    ("instance".to_string(), name.clone()),
                ]),
                service_account: app.clone(),
                extra_tcp_ports: match app.as_str() {
                    "db" => vec![("postgres".to_string(), POSTGRES_PORT)],
                    "api" => vec![("debug".to_string(), DEBUG_PORT)],
                    _ => Vec::new(),
                },
                uid: pod_uid(id, &ns, &name),
                cgroup: node.cgroup.join(format!("{ns}.{name}")),
                log: dir.join("pods").join(format!("{ns}.{name}.log")),
                echo_pid: None,
                node: node.name.clone(),
                namespace: ns.clone(),
                name,
            });
        }
        namespaces.push(NamespaceState {
            name: ns,
            app,
            labels,
        });
    }
    for pod in &pods {
        ensure!(
            pod.host_ifname.len() <= 15,
            "interface name {} is too long",
            pod.host_ifname
        );
    }
    Ok(LabState {
        id: id.to_string(),
        underlay_netns: format!("{prefix}-underlay"),
        manifests_dir: dir.join("manifests"),
        prefix,
        dir,
        owner,
        created_unix,
        ipv6: spec.ipv6,
        cgroup_dir,
        bpffs_dir,
        namespaces,
        nodes,
        pods,
    })
}

/// A stable, UUID-shaped uid (deterministic, so that a restarted agent sees the same pods).
fn pod_uid(id: &str, ns: &str, name: &str) -> String {
    // FNV-1a, twice with different seeds, is plenty for uniqueness inside one lab.
    let hash = |seed: u64| {
        format!("{id}/{ns}/{name}").bytes().fold(seed, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
    };
    let (a, b) = (hash(0xcbf2_9ce4_8422_2325), hash(0x8422_2325_cbf2_9ce4));
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        b >> 52,
        b & 0xffff_ffff_ffff
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lab(spec: &LabSpec) -> LabState {
        plan(
            spec,
            "t1",
            Path::new("/tmp/l"),
            Path::new("/cg"),
            Path::new("/sys/fs/bpf"),
            None,
            0,
        )
        .unwrap()
    }

    #[test]
    fn pods_spread_over_nodes_with_unique_addresses_and_short_ifnames() {
        let state = lab(&LabSpec {
            nodes: 2,
            namespaces: 3,
            pods: 3,
            ..LabSpec::default()
        });
        assert_eq!(state.pods.len(), 9);
        let on_node1 = state.pods.iter().filter(|p| p.node == "node-1").count();
        assert_eq!(on_node1, 6, "pods 0 and 2 of each namespace go to node-1");
        let mut ips: Vec<_> = state.pods.iter().map(|p| p.ip4).collect();
        ips.sort();
        ips.dedup();
        assert_eq!(ips.len(), 9);
        let web0 = state.pod("frontend/web-0").unwrap();
        assert_eq!(web0.ip4, Ipv4Addr::new(10, 244, 1, 10));
        assert_eq!(web0.host_ifname, "nwt1p0");
        assert_eq!(state.pod("backend/api-1").unwrap().node, "node-2");
        assert_eq!(state.nodes[1].metrics_addr, "10.250.0.12:9962");
        assert_eq!(state.nodes[1].flows_addr, "10.250.0.12:4244");
        assert!(state.all_netns().iter().all(|n| n.starts_with("nwl-t1-")));
    }

    #[test]
    fn lab_names_that_would_overflow_ifnames_are_rejected() {
        assert!(validate_id("abcdefg").is_err());
        assert!(validate_id("Dev").is_err());
        assert!(validate_id("dev").is_ok());
        let spec = LabSpec {
            namespaces: 5,
            pods: 40,
            nodes: 3,
            ..LabSpec::default()
        };
        let state = plan(
            &spec,
            "abcdef",
            Path::new("/l"),
            Path::new("/c"),
            Path::new("/b"),
            None,
            0,
        )
        .unwrap();
        assert!(state.pods.iter().all(|p| p.host_ifname.len() <= 15));
        assert_eq!(state.namespaces[4].name, "ns5");
    }

    #[test]
    fn pod_uids_are_stable_and_distinct() {
        assert_eq!(pod_uid("a", "b", "c"), pod_uid("a", "b", "c"));
        assert_ne!(pod_uid("a", "b", "c"), pod_uid("a", "b", "d"));
        assert_eq!(pod_uid("a", "b", "c").len(), 36);
    }
}
