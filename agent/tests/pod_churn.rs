//! Random sequences of pod events (a pod added, relabelled, moved to another address or
//! removed, alone or in bursts) through the agent's kept pipeline: the manifest source (which
//! patches its inventory), the kept compiler (whose pod-event path patches its last state), the
//! mesh view patched with the pods the compiler saw change, and the diff sync against the maps
//! it wrote before. After every sync the inventory, compiled state, view and maps must be what
//! reading, compiling and building from scratch gives, and the maps what that writes into empty
//! maps.

use std::collections::BTreeMap;
use std::convert::Infallible;

use agent_common::{EndpointInfo, IpcacheValue, PolicyValue};
use ipnet::IpNet;
use nodeward::datapath::sync::Syncer;
use nodeward::datapath::{MapWriter, PolicyEntryKey};
use nodeward::identity::IdentityAllocator;
use nodeward::policy;
use nodeward::source::manifests::ManifestSource;
use nodeward::tunnel::MeshView;
use serde_json::json;
use std::sync::Arc;

const NODE: &str = "node-1";

/// Maps in memory.
#[derive(Default)]
struct Mem {
    endpoints: BTreeMap<u32, EndpointInfo>,
    policy: BTreeMap<PolicyEntryKey, PolicyValue>,
    ipcache: BTreeMap<IpNet, IpcacheValue>,
    cidrs: BTreeMap<IpNet, u32>,
    generation: u32,
}

impl MapWriter for Mem {
    type Error = Infallible;
    fn read_endpoints(&self) -> Result<BTreeMap<u32, EndpointInfo>, Infallible> {
        Ok(self.endpoints.clone())
    }
    fn read_policy(&self) -> Result<BTreeMap<PolicyEntryKey, PolicyValue>, Infallible> {
        Ok(self.policy.clone())
    }
    fn read_ipcache(&self) -> Result<BTreeMap<IpNet, IpcacheValue>, Infallible> {
        Ok(self.ipcache.clone())
    }
    fn read_policy_cidrs(&self) -> Result<BTreeMap<IpNet, u32>, Infallible> {
        Ok(self.cidrs.clone())
    }
    fn read_generation(&self) -> Result<u32, Infallible> {
        Ok(self.generation)
    }
    fn put_endpoint(&mut self, i: u32, info: &EndpointInfo) -> Result<(), Infallible> {
        self.endpoints.insert(i, *info);
        Ok(())
    }
    fn delete_endpoint(&mut self, i: u32) -> Result<(), Infallible> {
        self.endpoints.remove(&i);
        Ok(())
    }
    fn put_policy(&mut self, k: PolicyEntryKey, v: PolicyValue) -> Result<(), Infallible> {
        self.policy.insert(k, v);
        Ok(())
    }
    fn delete_policy(&mut self, k: PolicyEntryKey) -> Result<(), Infallible> {
        self.policy.remove(&k);
        Ok(())
    }
    fn put_ipcache(&mut self, p: IpNet, v: IpcacheValue) -> Result<(), Infallible> {
        self.ipcache.insert(p, v);
        Ok(())
    }
    fn delete_ipcache(&mut self, p: IpNet) -> Result<(), Infallible> {
        self.ipcache.remove(&p);
        Ok(())
    }
    fn put_policy_cidr(&mut self, p: IpNet, id: u32) -> Result<(), Infallible> {
        self.cidrs.insert(p, id);
        Ok(())
    }
    fn delete_policy_cidr(&mut self, p: IpNet) -> Result<(), Infallible> {
        self.cidrs.remove(&p);
        Ok(())
    }
    fn set_generation(&mut self, g: u32) -> Result<(), Infallible> {
        self.generation = g;
        Ok(())
    }
}

/// What the maps mean, independent of how the sync numbered the policy sets: per endpoint,
/// its map value without the set and the entries of its set without the set.
type Meaning = (
    BTreeMap<u32, (EndpointInfo, Vec<(PolicyEntryKey, PolicyValue)>)>,
    BTreeMap<IpNet, IpcacheValue>,
    BTreeMap<IpNet, u32>,
);

fn meaning(m: &Mem) -> Meaning {
    let endpoints = m
        .endpoints
        .iter()
        .map(|(ifindex, info)| {
            let set = info.policy_set.to_be();
            let entries = m
                .policy
                .iter()
                .filter(|(k, _)| k.key.policy_set_be == set)
                .map(|(k, v)| {
                    let mut k = *k;
                    k.key.policy_set_be = 0;
                    (k, *v)
                })
                .collect();
            let info = EndpointInfo {
                policy_set: 0,
                ..*info
            };
            (*ifindex, (info, entries))
        })
        .collect();
    (endpoints, m.ipcache.clone(), m.cidrs.clone())
}

#[derive(Clone, Debug)]
struct PodSpec {
    namespace: &'static str,
    node: &'static str,
    ip: u32,
    app: &'static str,
    tier: &'static str,
}

fn pod_yaml(name: &str, p: &PodSpec) -> String {
    let ip = std::net::Ipv4Addr::from(0x0a32_0000 + p.ip).to_string();
    let doc = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name, "namespace": p.namespace, "uid": format!("uid-{name}"),
                      "labels": { "app": p.app, "tier": p.tier } },
        "spec": { "nodeName": p.node, "containers": [{ "name": "c", "image": "none",
                  "ports": [{ "name": "http", "containerPort": 8080 }] }] },
        "status": { "phase": "Running", "podIP": ip, "podIPs": [{ "ip": ip }] },
    });
    serde_yaml_ng::to_string(&doc).expect("yaml")
}

const BASE: &str = r"
apiVersion: v1
kind: Namespace
metadata: {name: a, labels: {team: fe}}
---
apiVersion: v1
kind: Namespace
metadata: {name: b, labels: {team: be}}
---
kind: NetworkPolicy
apiVersion: networking.k8s.io/v1
metadata: {name: api, namespace: b}
spec:
  podSelector: {matchLabels: {app: api}}
  policyTypes: [Ingress, Egress]
  ingress:
  - from: [{namespaceSelector: {matchLabels: {team: fe}}, podSelector: {matchLabels: {app: web}}}]
    ports: [{port: http}]
  - from: [{podSelector: {matchExpressions: [{key: tier, operator: In, values: [x]}]}}]
    ports: [{port: 5432}]
  egress:
  - to: [{podSelector: {matchLabels: {app: db}}}]
  - to: [{ipBlock: {cidr: 10.9.0.0/16, except: [10.9.1.0/24]}}]
---
kind: NetworkPolicy
apiVersion: networking.k8s.io/v1
metadata: {name: web, namespace: a}
spec:
  podSelector: {matchLabels: {tier: y}}
  ingress: [{from: [{namespaceSelector: {}}], ports: [{port: 80, endPort: 90}]}]
";

fn pick<T: Copy>(rng: &mut fastrand::Rng, from: &[T]) -> T {
    from[rng.usize(..from.len())]
}

fn random_pod(rng: &mut fastrand::Rng, next_ip: &mut u32) -> PodSpec {
    // Now and then a new pod takes an address another pod had (or still has).
    let ip = if *next_ip > 1 && rng.u8(..10) == 0 {
        rng.u32(1..*next_ip)
    } else {
        *next_ip += 1;
        *next_ip
    };
    PodSpec {
        namespace: pick(rng, &["a", "b"]),
        // Mostly remote pods, as in a cluster: a burst that touches a local pod is compiled in
        // full, and the pod-event path under test is the remote pods'.
        node: pick(rng, &[NODE, "node-2", "node-3", "node-4", "node-5"]),
        ip,
        app: pick(rng, &["web", "api", "db"]),
        tier: pick(rng, &["x", "y", "z"]),
    }
}

/// The ipcache and the endpoints (interfaces numbered by pod name, the same on both sides) as
/// the agent hands them to the sync.
fn as_maps(
    c: &policy::CompiledState,
) -> (
    BTreeMap<IpNet, IpcacheValue>,
    BTreeMap<u32, &policy::EndpointPolicy>,
) {
    let ipcache = c
        .ipcache
        .iter()
        .map(|(n, identity)| {
            (
                *n,
                IpcacheValue {
                    identity: *identity,
                    flags: 0,
                },
            )
        })
        .collect();
    let desired = c
        .endpoints
        .iter()
        .map(|(r, ep)| {
            let n: u32 = r.name.trim_start_matches('p').parse().expect("pN");
            (n + 10, ep)
        })
        .collect();
    (ipcache, desired)
}

/// One random sequence; returns the number of syncs compared, and of those the compiler's
/// pod-event path patched.
fn run(seed: u64, steps: usize) -> (usize, usize) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("base.yaml"), BASE).expect("write");
    let mut pods: BTreeMap<String, PodSpec> = BTreeMap::new();
    let mut next_ip = 0;
    let mut next_name = 0;
    let mut source = ManifestSource::new(dir.path());
    let mut kept = policy::Compiler::default();
    let mut ids = [IdentityAllocator::new(), IdentityAllocator::new()];
    let mut syncer = Syncer::adopt(Mem::default()).expect("adopt");
    let mut view: Option<MeshView> = None;
    let mut compared = 0;
    let mut patched = 0;
    for step in 0..steps {
        // A burst of 1 to 4 pod events, then one sync.
        let mut events = Vec::new();
        for _ in 0..rng.usize(1..=4) {
            let existing: Vec<String> = pods.keys().cloned().collect();
            let event = if existing.is_empty() { 0 } else { rng.u8(..4) };
            match event {
                0 => {
                    next_name += 1;
                    let name = format!("p{next_name}");
                    let spec = random_pod(&mut rng, &mut next_ip);
                    events.push(format!("add {name} {spec:?}"));
                    pods.insert(name, spec);
                }
                1 => {
                    let name = existing[rng.usize(..existing.len())].clone();
                    let spec = pods.get_mut(&name).expect("pod");
                    spec.app = pick(&mut rng, &["web", "api", "db"]);
                    spec.tier = pick(&mut rng, &["x", "y", "z"]);
                    events.push(format!("relabel {name} to {spec:?}"));
                }
                2 => {
                    let name = existing[rng.usize(..existing.len())].clone();
                    let fresh = random_pod(&mut rng, &mut next_ip).ip;
                    pods.get_mut(&name).expect("pod").ip = fresh;
                    events.push(format!("readdress {name} to {fresh}"));
                }
                _ => {
                    let name = existing[rng.usize(..existing.len())].clone();
                    pods.remove(&name);
                    events.push(format!("remove {name}"));
                }
            }
        }
        // The directory as it should be now: one file per pod.
        for entry in std::fs::read_dir(dir.path()).expect("read dir") {
            let path = entry.expect("entry").path();
            let stem = path
                .file_stem()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            if stem != "base" && !pods.contains_key(&stem) {
                std::fs::remove_file(&path).expect("remove");
            }
        }
        for (name, spec) in &pods {
            let path = dir.path().join(format!("{name}.yaml"));
            let text = pod_yaml(name, spec);
            if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
                std::fs::write(&path, text).expect("write");
            }
        }

        let loaded = source.load();
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        let inv = loaded.inventory;
        let context = || format!("seed {seed}, step {step}, after {events:?}");
        let read = ManifestSource::new(dir.path()).load().inventory;
        assert_eq!(inv.pods, read.pods, "inventory: {}", context());
        assert_eq!(inv.origins, read.origins, "origins: {}", context());
        let models = policy::translate_inventory(&inv).expect("translate");
        let [kept_ids, fresh_ids] = &mut ids;
        let incremental = kept.compile(NODE, &inv, &models, kept_ids);
        let scratch = policy::compile(NODE, &inv, &models, fresh_ids);
        assert_eq!(incremental, scratch, "compiled state: {}", context());
        patched += usize::from(kept.pod_changes().is_some());

        let modes = BTreeMap::new();
        let build = |compiled: &policy::CompiledState| {
            MeshView::build(NODE, "td", &inv, Arc::new(compiled.clone()), &modes)
        };
        let next = match (&view, kept.pod_changes()) {
            (Some(last), Some(changes)) => last.patch(
                NODE,
                "td",
                &inv,
                Arc::new(incremental.clone()),
                &modes,
                changes,
            ),
            _ => build(&incremental),
        };
        assert_eq!(
            next.workloads,
            build(&scratch).workloads,
            "mesh view: {}",
            context()
        );
        view = Some(next);

        let (ipcache, desired) = as_maps(&incremental);
        syncer
            .apply(&desired, &ipcache, &incremental.policy_cidrs)
            .unwrap_or_else(|e| panic!("kept sync: {e}: {}", context()));
        let (ipcache, desired) = as_maps(&scratch);
        let mut fresh = Syncer::adopt(Mem::default()).expect("adopt");
        fresh
            .apply(&desired, &ipcache, &scratch.policy_cidrs)
            .unwrap_or_else(|e| panic!("fresh sync: {e}: {}", context()));
        assert_eq!(
            meaning(syncer.maps()),
            meaning(fresh.maps()),
            "map contents: {}",
            context()
        );
        compared += 1;
    }
    (compared, patched)
}

#[test]
fn random_pod_events_leave_the_maps_as_a_full_recompute_would() {
    let seeds: u64 = std::env::var("POD_CHURN_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12);
    let (mut compared, mut patched) = (0, 0);
    for seed in 0..seeds {
        let (c, p) = run(seed, 40);
        compared += c;
        patched += p;
    }
    assert_eq!(compared, usize::try_from(seeds).expect("small") * 40);
    // The pod-event path is what is under test: most bursts must have taken it (the others
    // touched a local pod, or changed a peer set).
    assert!(
        patched * 5 > compared,
        "{patched} of {compared} syncs patched"
    );
}
