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
//! ipcache entry takes that identity) and back. `SCALE_RATE=N` (with `SCALE_CHANGE=pod`) instead
//! sends N pod events a second for `SCALE_SECONDS` (default 5), spread over 200 pods each in a
//! file of its own (added with a label set of its own, relabelled into a replica of a rules'
//! peer, moved to another address, removed); events that arrive during a sync wait for the next
//! one, as in the agent, and each event's time runs from when it was due to when the sync that
//! carried it wrote the maps (not counting the time spent writing the files). The last lines give the agent-side figures: per-round
//! milliseconds, p50/p99/max of the time to the maps, and the process's peak RSS.

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

mod heap;

use heap::live_kib;

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

/// The agent's pipeline from the manifests to the maps, with what it keeps between syncs.
struct Pipeline {
    source: ManifestSource,
    ids: IdentityAllocator,
    compiler: policy::Compiler,
    syncer: Syncer<Counting>,
    /// Each policy last translated, and its model (the agent translates only what changed).
    translated: BTreeMap<
        policy::ObjectRef,
        (
            std::sync::Arc<k8s_openapi::api::networking::v1::NetworkPolicy>,
            policy::PolicyModel,
        ),
    >,
    totals: BTreeMap<&'static str, Duration>,
    view: Option<nodeward::tunnel::MeshView>,
}

impl Pipeline {
    /// One sync; the phases' times are added to `totals` when `count`.
    /// Returns when the maps were written.
    fn sync(&mut self, count: bool) -> (nodeward::datapath::sync::SyncStats, Instant) {
        let mut t = Instant::now();
        let totals = &mut self.totals;
        let mut heap = live_kib();
        let mut lap = |name: &'static str, t: &mut Instant| {
            if count {
                *totals.entry(name).or_default() += t.elapsed();
            } else {
                // The first sync: what each step keeps (or frees).
                let now = live_kib();
                println!(
                    "  heap after {name}: {:+} MiB",
                    (now as i64 - heap as i64) / 1024
                );
                heap = now;
            }
            *t = Instant::now();
        };
        let loaded = self.source.load();
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        let inv = loaded.inventory;
        lap("1 load", &mut t);
        // As the agent: only a changed policy object is translated again.
        self.translated
            .retain(|key, _| inv.network_policies.contains_key(key));
        for (key, object) in &inv.network_policies {
            if self
                .translated
                .get(key)
                .is_none_or(|(from, _)| !std::sync::Arc::ptr_eq(from, object))
            {
                let model = policy::translate_network_policy(object).expect("translate");
                self.translated.insert(key.clone(), (object.clone(), model));
            }
        }
        let models = self.translated.values().map(|(_, m)| m);
        lap("2 translate", &mut t);
        let compiled = self.compiler.compile("node-2", &inv, models, &mut self.ids);
        lap("3 compile", &mut t);
        let compiled = std::sync::Arc::new(compiled);
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
        let stats = self
            .syncer
            .apply(&desired, &ipcache, &compiled.policy_cidrs)
            .expect("apply");
        lap("4 sync (no syscalls)", &mut t);
        let written = Instant::now();
        // After the maps, as in the agent: patched with the pods the compiler saw change.
        let modes = BTreeMap::new();
        let view = match (self.view.take(), self.compiler.pod_changes()) {
            (Some(last), Some(changes)) => last.patch(
                "node-2",
                "cluster.local",
                &inv,
                compiled.clone(),
                &modes,
                changes,
            ),
            _ => nodeward::tunnel::MeshView::build(
                "node-2",
                "cluster.local",
                &inv,
                compiled.clone(),
                &modes,
            ),
        };
        self.view = Some(view);
        lap("5 mesh view", &mut t);
        drop((compiled, inv, ipcache));
        lap("6 drop", &mut t);
        (stats, written)
    }
}

/// p50, p99 and max, in milliseconds.
fn percentiles(mut samples: Vec<Duration>) -> String {
    samples.sort();
    let at = |q: f64| {
        let i = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
        samples[i].as_secs_f64() * 1000.0
    };
    format!(
        "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms over {}",
        at(0.5),
        at(0.99),
        at(1.0),
        samples.len()
    )
}

/// The `SCALE_RATE` pods: `churn-K` for K below this.
const CHURNERS: usize = 200;

/// Event `n` of `SCALE_RATE`: the churn pod it touches and the pod it becomes (`None`: removed).
/// Each pod goes: added (labels of its own), relabelled into a replica of a rules' peer, moved
/// to another address, removed.
fn rate_event(n: usize) -> (usize, Option<Value>) {
    let k = n % CHURNERS;
    let step = (n / CHURNERS) % 4;
    let ip = |second: bool| {
        let base: u32 = if second { 0x0afa_0000 } else { 0x0afb_0000 };
        std::net::Ipv4Addr::from(base + u32::try_from(k).expect("small")).to_string()
    };
    let pod = |labels: Value, second: bool| {
        pod(
            &format!("churn-{k}"),
            "bench-peers",
            "node-absent",
            &ip(second),
            labels,
        )
    };
    let peer = json!({ "app": "peer", "peer": format!("p{}", k % rule_peers().max(1)) });
    match step {
        0 => (
            k,
            Some(pod(
                json!({ "app": "other", "deployment": format!("churn-{k}") }),
                false,
            )),
        ),
        1 => (k, Some(pod(peer, false))),
        2 => (k, Some(pod(peer, true))),
        _ => (k, None),
    }
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

    let mut pipeline = Pipeline {
        source: ManifestSource::new(dir.path()),
        ids: IdentityAllocator::new(),
        compiler: policy::Compiler::default(),
        syncer: Syncer::adopt(Counting::default()).expect("adopt"),
        translated: BTreeMap::new(),
        totals: BTreeMap::new(),
        view: None,
    };
    let pod_events = std::env::var("SCALE_CHANGE").is_ok_and(|v| v == "pod");
    let rate: Option<usize> = std::env::var("SCALE_RATE")
        .ok()
        .and_then(|v| v.parse().ok());
    println!(
        "{} remote pods, {} rules, {}",
        pods(),
        rule_peers() * PORTS.len(),
        match (pod_events, rate) {
            (true, Some(r)) => format!("{r} pod events a second"),
            (true, None) => "a pod event per round".into(),
            _ => "a policy change per round".into(),
        }
    );
    let before = live_kib();
    pipeline.sync(false);
    println!(
        "first sync: heap {} MiB (+{} MiB)",
        live_kib() / 1024,
        (live_kib() - before) / 1024
    );
    let mut times = Vec::new();
    let mut syncs = 0usize;
    if let (true, Some(rate)) = (pod_events, rate) {
        let seconds: f64 = std::env::var("SCALE_SECONDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(5.0);
        let total = (seconds * rate as f64) as usize;
        // The files stand in for the API server: the clock stops while they are written (on
        // this shared machine a write takes about a millisecond, and the agent gets its events
        // from a watch, not a disk).
        let texts: Vec<(usize, Option<String>)> = (0..total)
            .map(|n| {
                let (k, pod) = rate_event(n);
                (k, pod.map(|p| yaml(&[p])))
            })
            .collect();
        let start = Instant::now();
        let mut paused = Duration::ZERO;
        let due = |n: usize| Duration::from_secs_f64(n as f64 / rate as f64);
        let mut next = 0;
        while next < total {
            let now = start.elapsed() - paused;
            if due(next) > now {
                std::thread::sleep(due(next) - now);
                continue;
            }
            // Everything due by now goes into this sync.
            let mut carried = Vec::new();
            let writing = Instant::now();
            while next < total && due(next) <= now {
                let (k, text) = &texts[next];
                let path = dir.path().join(format!("churn-{k}.yaml"));
                match text {
                    Some(t) => std::fs::write(&path, t).expect("write"),
                    None => std::fs::remove_file(&path).expect("remove"),
                }
                carried.push(due(next));
                next += 1;
            }
            paused += writing.elapsed();
            let (_, done) = pipeline.sync(true);
            syncs += 1;
            let done = done.duration_since(start) - paused;
            times.extend(carried.into_iter().map(|d| done.saturating_sub(d)));
        }
        println!("{syncs} syncs for {total} events");
    } else {
        for round in 1..=rounds {
            let started = Instant::now();
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
            let (stats, written) = pipeline.sync(true);
            times.push(written - started);
            syncs += 1;
            if round == rounds {
                println!(
                    "last round: {} policy entries added, {} removed, {} ipcache changed",
                    stats.policy_added, stats.policy_removed, stats.ipcache_changed
                );
            }
        }
    }
    for (name, total) in &pipeline.totals {
        println!(
            "{name:<22} {:>8.2} ms per sync",
            total.as_secs_f64() * 1000.0 / syncs.max(1) as f64
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
        "to the maps: {}; heap {} MiB; RSS {} (peak {})",
        percentiles(times),
        live_kib() / 1024,
        kib("VmRSS:"),
        kib("VmHWM:")
    );
}
