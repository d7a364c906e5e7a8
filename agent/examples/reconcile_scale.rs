//! Where a reconciliation spends its time at `bench datapath`'s large size (1,000 remote pods,
//! 10 NetworkPolicies x 100 peers x 10 ports on one local pod), without a kernel: the manifests
//! are read from a temporary directory, translated and compiled, and the map diff is planned
//! against in-memory maps. A policy is toggled between rounds, as the benchmark does.
//!
//! `cargo run --release -p nodeward --example reconcile_scale [ROUNDS]`
//!
//! For the scale curve (issue 33), the environment changes the shape: `SCALE_PODS` remote pods
//! (default 1,000; beyond the rules' peers, pods come in deployments of 20 sharing their labels),
//! `SCALE_RULE_PEERS` of them selected by the rules, 10 ports each (default 1,000: 10k rules),
//! and `SCALE_CHANGE=pod` makes each round a pod event instead of a policy change: one remote
//! pod, in a file of its own, is relabelled into a replica of one of the rules' peers (its
//! ipcache entry takes that identity) and back. The last lines give
//! the agent-side figures: per-round milliseconds and the process's peak RSS.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::time::{Duration, Instant};

use agent_common::{EndpointInfo, IpcacheValue, PolicyValue};
use ipnet::IpNet;
use nodeward::datapath::sync::Syncer;
use nodeward::datapath::{MapWriter, PolicyEntryKey};
use nodeward::identity::IdentityAllocator;
use nodeward::policy;
use nodeward::source::manifests::ManifestSource;
use serde_json::{Value, json};

/// Counts live heap bytes, to say what each structure costs.
struct Counted;

static LIVE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

// SAFETY: forwards to the system allocator and only counts.
unsafe impl std::alloc::GlobalAlloc for Counted {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), std::sync::atomic::Ordering::Relaxed);
        // SAFETY: the caller's contract, passed on.
        unsafe { std::alloc::System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        LIVE.fetch_sub(layout.size(), std::sync::atomic::Ordering::Relaxed);
        // SAFETY: the caller's contract, passed on.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counted = Counted;

fn live_kib() -> usize {
    LIVE.load(std::sync::atomic::Ordering::Relaxed) / 1024
}

const PEERS: usize = 1000;
const POLICIES: usize = 10;
const PORTS: [u16; 10] = [6000, 6010, 6020, 6030, 6040, 6050, 6060, 6070, 6080, 6090];

/// Remote pods the rules select, each with labels of its own (`SCALE_RULE_PEERS`, default
/// [`PEERS`]): the rules are this many peers x 10 ports.
fn rule_peers() -> usize {
    std::env::var("SCALE_RULE_PEERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(PEERS)
}

/// Remote pods (`SCALE_PODS`, default [`PEERS`]).
fn pods() -> usize {
    std::env::var("SCALE_PODS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(PEERS)
}

/// Maps that only count what they are asked to do.
#[derive(Default)]
struct Counting {
    writes: usize,
}

impl MapWriter for Counting {
    type Error = Infallible;
    fn read_endpoints(&self) -> Result<BTreeMap<u32, EndpointInfo>, Infallible> {
        Ok(BTreeMap::new())
    }
    fn read_policy(&self) -> Result<BTreeMap<PolicyEntryKey, PolicyValue>, Infallible> {
        Ok(BTreeMap::new())
    }
    fn read_ipcache(&self) -> Result<BTreeMap<IpNet, IpcacheValue>, Infallible> {
        Ok(BTreeMap::new())
    }
    fn read_policy_cidrs(&self) -> Result<BTreeMap<IpNet, u32>, Infallible> {
        Ok(BTreeMap::new())
    }
    fn read_generation(&self) -> Result<u32, Infallible> {
        Ok(0)
    }
    fn put_endpoint(&mut self, _: u32, _: &EndpointInfo) -> Result<(), Infallible> {
        self.writes += 1;
        Ok(())
    }
    fn delete_endpoint(&mut self, _: u32) -> Result<(), Infallible> {
        self.writes += 1;
        Ok(())
    }
    fn put_policy(&mut self, _: PolicyEntryKey, _: PolicyValue) -> Result<(), Infallible> {
        self.writes += 1;
        Ok(())
    }
    fn delete_policy(&mut self, _: PolicyEntryKey) -> Result<(), Infallible> {
        self.writes += 1;
        Ok(())
    }
    fn put_ipcache(&mut self, _: IpNet, _: IpcacheValue) -> Result<(), Infallible> {
        self.writes += 1;
        Ok(())
    }
    fn delete_ipcache(&mut self, _: IpNet) -> Result<(), Infallible> {
        self.writes += 1;
        Ok(())
    }
    fn put_policy_cidr(&mut self, _: IpNet, _: u32) -> Result<(), Infallible> {
        self.writes += 1;
        Ok(())
    }
    fn delete_policy_cidr(&mut self, _: IpNet) -> Result<(), Infallible> {
        self.writes += 1;
        Ok(())
    }
    fn set_generation(&mut self, _: u32) -> Result<(), Infallible> {
        self.writes += 1;
        Ok(())
    }
    fn capacities(&self) -> nodeward::datapath::sizes::MapSizes {
        use nodeward::datapath::sizes as s;
        s::MapSizes {
            endpoints: s::DEFAULT_ENDPOINTS,
            policy: s::DEFAULT_POLICY,
            ipcache: s::DEFAULT_IPCACHE,
            policy_cidrs: s::DEFAULT_POLICY_CIDRS,
            conntrack: s::CONNTRACK_MIN,
        }
    }
}

fn yaml(docs: &[Value]) -> String {
    docs.iter()
        .map(|d| serde_yaml_ng::to_string(d).expect("yaml"))
        .collect::<Vec<_>>()
        .join("---\n")
}

fn pod(name: &str, ns: &str, node: &str, ip: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name, "namespace": ns, "uid": format!("uid-{ns}-{name}"), "labels": labels },
        "spec": { "nodeName": node, "containers": [{ "name": "c", "image": "none" }] },
        "status": { "phase": "Running", "podIP": ip, "podIPs": [{ "ip": ip }] },
    })
}

fn toggle(on: bool) -> Value {
    let port = if on { 7200 } else { 7201 };
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": { "name": "toggle", "namespace": "backend" },
        "spec": {
            "podSelector": { "matchLabels": { "app": "api" } },
            "policyTypes": ["Ingress"],
            "ingress": [{
                "from": [{ "namespaceSelector": { "matchLabels": { "kubernetes.io/metadata.name": "frontend" } } }],
                "ports": [{ "protocol": "TCP", "port": port }],
            }],
        },
    })
}

/// The remote peers (and their namespace): the first 1,000 are the rules' peers, each with
/// labels of its own; the rest come in deployments of 20 pods.
fn peer_objects() -> Vec<Value> {
    let mut objects = vec![json!({ "apiVersion": "v1", "kind": "Namespace",
        "metadata": { "name": "bench-peers", "labels": { "kubernetes.io/metadata.name": "bench-peers" } } })];
    objects.extend((0..pods()).map(|i| {
        let ip = std::net::Ipv4Addr::from(0x0af5_0001 + u32::try_from(i).expect("small"));
        let labels = if i < rule_peers() {
            json!({ "app": "peer", "peer": format!("p{i}") })
        } else {
            json!({ "app": "other", "deployment": format!("d{}", i / 20) })
        };
        pod(
            &format!("peer-{i}"),
            "bench-peers",
            "node-absent",
            &ip.to_string(),
            labels,
        )
    }));
    objects
}

/// The pod of `SCALE_CHANGE=pod`: a replica of a rules' peer in odd rounds, of no one's in even
/// ones.
fn churn(on: bool) -> Value {
    let labels = if on {
        json!({ "app": "peer", "peer": "p5" })
    } else {
        json!({ "app": "other", "deployment": "churn" })
    };
    pod(
        "churn-0",
        "bench-peers",
        "node-absent",
        "10.250.255.254",
        labels,
    )
}

/// 10 NetworkPolicies on backend's `app: api` pods, each allowing 100 peers on 10 ports.
fn rule_objects() -> Vec<Value> {
    let per = rule_peers() / POLICIES;
    (0..POLICIES)
        .map(|k| {
            let from: Vec<Value> = (k * per..(k + 1) * per)
                .map(|i| json!({
                    "namespaceSelector": { "matchLabels": { "kubernetes.io/metadata.name": "bench-peers" } },
                    "podSelector": { "matchLabels": { "peer": format!("p{i}") } },
                }))
                .collect();
            let ports: Vec<Value> = PORTS.iter().map(|p| json!({ "protocol": "TCP", "port": p })).collect();
            json!({
                "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": { "name": format!("rules-{k}"), "namespace": "backend" },
                "spec": { "podSelector": { "matchLabels": { "app": "api" } }, "policyTypes": ["Ingress"],
                          "ingress": [{ "from": from, "ports": ports }] },
            })
        })
        .collect()
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10);
    let dir = tempfile::tempdir().expect("tempdir");
    // `reconcile_scale 0 DIR` only writes the peers and rules into DIR (a lab's manifests).
    if let Some(out) = std::env::args().nth(2) {
        let out = std::path::Path::new(&out);
        std::fs::write(out.join("scale-peers.yaml"), yaml(&peer_objects())).expect("write");
        std::fs::write(out.join("scale-rules.yaml"), yaml(&rule_objects())).expect("write");
        return;
    }
    let mut lab = Vec::new();
    for ns in ["frontend", "backend"] {
        lab.push(json!({ "apiVersion": "v1", "kind": "Namespace",
            "metadata": { "name": ns, "labels": { "kubernetes.io/metadata.name": ns } } }));
    }
    lab.push(json!({ "apiVersion": "v1", "kind": "Node",
        "metadata": { "name": "node-2" }, "status": { "addresses": [{ "type": "InternalIP", "address": "10.250.0.2" }] } }));
    lab.push(pod(
        "api-0",
        "backend",
        "node-2",
        "10.244.2.2",
        json!({ "app": "api" }),
    ));
    lab.push(pod(
        "web-0",
        "frontend",
        "node-1",
        "10.244.1.2",
        json!({ "app": "web" }),
    ));
    std::fs::write(dir.path().join("lab.yaml"), yaml(&lab)).expect("write");
    std::fs::write(dir.path().join("peers.yaml"), yaml(&peer_objects())).expect("write");
    std::fs::write(dir.path().join("rules.yaml"), yaml(&rule_objects())).expect("write");

    let mut source = ManifestSource::new(dir.path());
    let mut ids = IdentityAllocator::new();
    let mut compiler = policy::Compiler::default();
    let mut syncer = Syncer::adopt(Counting::default()).expect("adopt");
    let mut totals: BTreeMap<&str, Duration> = BTreeMap::new();
    let pod_events = std::env::var("SCALE_CHANGE").is_ok_and(|v| v == "pod");
    println!(
        "{} remote pods, {} rules, a {} per round",
        pods(),
        rule_peers() * PORTS.len(),
        if pod_events {
            "pod event"
        } else {
            "policy change"
        }
    );
    let mut worst = Duration::ZERO;
    for round in 0..=rounds {
        let round_started = Instant::now();
        if pod_events {
            std::fs::write(
                dir.path().join("churn.yaml"),
                yaml(&[churn(round % 2 == 1)]),
            )
            .expect("write");
        } else {
            std::fs::write(
                dir.path().join("toggle.yaml"),
                yaml(&[toggle(round % 2 == 1)]),
            )
            .expect("write");
        }
        let mut t = Instant::now();
        let mut lap = |name: &'static str, t: &mut Instant| {
            if round > 0 {
                *totals.entry(name).or_default() += t.elapsed();
            }
            *t = Instant::now();
        };
        let before = live_kib();
        let loaded = source.load();
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        let inv = loaded.inventory;
        lap("1 load", &mut t);
        let after_load = live_kib();
        let models = policy::translate_inventory(&inv).expect("translate");
        lap("2 translate", &mut t);
        let after_translate = live_kib();
        let compiled = compiler.compile("node-2", &inv, &models, &mut ids);
        lap("3 compile", &mut t);
        let after_compile = live_kib();
        let compiled = std::sync::Arc::new(compiled);
        let view = nodeward::tunnel::MeshView::build(
            "node-2",
            "cluster.local",
            &inv,
            compiled.clone(),
            &BTreeMap::new(),
        );
        lap("4 mesh view", &mut t);
        let ipcache: BTreeMap<IpNet, IpcacheValue> = compiled
            .ipcache
            .iter()
            .map(|(n, id)| {
                (
                    *n,
                    IpcacheValue {
                        identity: *id,
                        flags: 0,
                    },
                )
            })
            .collect();
        let desired = compiled
            .endpoints
            .values()
            .enumerate()
            .map(|(i, ep)| (u32::try_from(i).expect("small") + 10, ep))
            .collect();
        let stats = syncer
            .apply(&desired, &ipcache, &compiled.policy_cidrs)
            .expect("apply");
        lap("5 sync (no syscalls)", &mut t);
        if round == 0 {
            println!(
                "heap KiB: before {before}, +load {}, +translate {}, +compile (and identities) {}, +sync mirror {}",
                after_load - before,
                after_translate - after_load,
                after_compile - after_translate,
                live_kib() - after_compile
            );
        }
        if round > 0 {
            worst = worst.max(round_started.elapsed());
        }
        drop((view, compiled, models, inv));
        lap("6 drop", &mut t);
        if round == rounds {
            println!(
                "last round: {} policy entries added, {} removed, {} map writes in all",
                stats.policy_added,
                stats.policy_removed,
                syncer.maps().writes
            );
        }
    }
    for (name, total) in &totals {
        println!(
            "{name:<22} {:>8.2} ms per round",
            total.as_secs_f64() * 1000.0 / rounds as f64
        );
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = |key: &str| -> String {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| v.trim().to_owned())
            .unwrap_or_default()
    };
    println!(
        "slowest round to the maps {:.1} ms; RSS {} (peak {})",
        worst.as_secs_f64() * 1000.0,
        kib("VmRSS:"),
        kib("VmHWM:")
    );
}
