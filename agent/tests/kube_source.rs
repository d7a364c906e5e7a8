//! The Kubernetes source against an in-process API server (`fakeapi`) that speaks list and
//! watch as the real one does: no cluster, no root.

mod fakeapi;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use fakeapi::FakeApi;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use nodeward::identity::IdentityAllocator;
use nodeward::policy::crd::{MeshPolicy, MutualTlsMode};
use nodeward::policy::{self, CompiledState};
use nodeward::source::Inventory;
use nodeward::source::kubernetes::report::PolicyOutcome;
use nodeward::source::kubernetes::{KubernetesOptions, KubernetesSource};
use nodeward::source::manifests::ManifestSource;
use serde_json::Value;
use tokio::sync::mpsc;

const NODE: &str = "n1";

const OBJECTS: &str = r"
apiVersion: v1
kind: Namespace
metadata: {name: prod, labels: {team: a, kubernetes.io/metadata.name: prod}}
---
apiVersion: v1
kind: Namespace
metadata: {name: other, labels: {kubernetes.io/metadata.name: other}}
---
apiVersion: v1
kind: Node
metadata: {name: n1}
status: {addresses: [{type: InternalIP, address: 192.168.50.1}]}
---
apiVersion: v1
kind: Node
metadata: {name: n2}
status: {addresses: [{type: InternalIP, address: 192.168.50.2}]}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: web, namespace: prod}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: prod, labels: {app: web}, uid: 11111111-0000-0000-0000-000000000001}
spec:
  nodeName: n1
  serviceAccountName: web
  containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]
status: {podIP: 10.1.0.2, podIPs: [{ip: 10.1.0.2}], hostIP: 192.168.50.1}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: prod, labels: {app: db}}
spec:
  nodeName: n2
  containers: [{name: c, ports: [{name: pg, containerPort: 5432}]}]
status: {podIP: 10.2.0.2, podIPs: [{ip: 10.2.0.2}], hostIP: 192.168.50.2}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: other, labels: {app: client}}
spec:
  nodeName: n1
  containers: [{name: c}]
status: {podIP: 10.1.0.3}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db-from-web, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  policyTypes: [Ingress]
  ingress:
  - from: [{podSelector: {matchLabels: {app: web}}}]
    ports: [{port: pg}]
---
apiVersion: nodeward.io/v1alpha1
kind: MeshPolicy
metadata: {name: web-ingress, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {nodeward.io/namespace: other}}]
    toPorts: [{port: http, protocol: TCP}]
---
apiVersion: nodeward.io/v1alpha1
kind: ClusterMeshPolicy
metadata: {name: no-world-egress}
spec:
  endpointSelector: {}
  egressDeny:
  - toCIDRSet: [{cidr: 203.0.113.0/24}]
---
apiVersion: nodeward.io/v1alpha1
kind: MutualTLS
metadata: {name: prod-strict, namespace: prod}
spec: {mode: STRICT}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: prod}
spec:
  clusterIP: 10.96.0.20
  ports: [{name: pg, port: 5432, targetPort: pg}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: db-1, namespace: prod, labels: {kubernetes.io/service-name: db}}
addressType: IPv4
ports: [{name: pg, port: 5432, protocol: TCP}]
endpoints:
- addresses: [10.2.0.2]
  conditions: {ready: true}
  nodeName: n2
";

/// Every document of `OBJECTS`, typed by k8s-openapi (or the CRD types), into the fake.
fn load_objects(fake: &FakeApi, yaml: &str) {
    for doc in serde_yaml_ng::Deserializer::from_str(yaml) {
        let value: Value = serde::Deserialize::deserialize(doc).expect("valid YAML");
        apply_typed(fake, value);
    }
}

fn apply_typed(fake: &FakeApi, value: Value) {
    let kind = value["kind"].as_str().expect("kind").to_owned();
    match kind.as_str() {
        "Namespace" => fake.apply(&serde_json::from_value::<Namespace>(value).unwrap()),
        "Node" => fake.apply(&serde_json::from_value::<Node>(value).unwrap()),
        "ServiceAccount" => fake.apply(&serde_json::from_value::<ServiceAccount>(value).unwrap()),
        "Pod" => fake.apply(&serde_json::from_value::<Pod>(value).unwrap()),
        "NetworkPolicy" => fake.apply(&serde_json::from_value::<NetworkPolicy>(value).unwrap()),
        "MeshPolicy" => fake.apply(&policy::parse_mesh_policy(value).unwrap()),
        "ClusterMeshPolicy" => fake.apply(&policy::parse_cluster_mesh_policy(value).unwrap()),
        "MutualTLS" => fake.apply(&policy::parse_mutual_tls(value).unwrap()),
        "Service" => fake.apply(&serde_json::from_value::<Service>(value).unwrap()),
        "EndpointSlice" => fake.apply(&serde_json::from_value::<EndpointSlice>(value).unwrap()),
        other => panic!("no typed object for kind {other}"),
    }
}

fn options() -> KubernetesOptions {
    KubernetesOptions {
        backoff: Some((Duration::from_millis(50), Duration::from_millis(400))),
        probe_interval: Duration::from_millis(100),
        report_interval: Duration::from_millis(20),
    }
}

fn start(fake: &FakeApi, node: &str) -> (KubernetesSource, mpsc::Receiver<()>) {
    let (tx, rx) = mpsc::channel(1);
    (
        KubernetesSource::start(fake.client(), node, tx, &options()),
        rx,
    )
}

/// Polls `check` until it holds; panics with `what` after 15 s.
async fn until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The inventory as JSON, without what only an API server sets (versions, uids, generations).
fn normalized(inv: &Inventory) -> Value {
    fn strip<T: serde::Serialize>(map: impl Iterator<Item = (String, T)>) -> Value {
        map.map(|(k, o)| {
            let mut v = serde_json::to_value(o).unwrap();
            if let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut) {
                meta.remove("resourceVersion");
                meta.remove("generation");
                meta.remove("uid");
            }
            (k, v)
        })
        .collect::<serde_json::Map<String, Value>>()
        .into()
    }
    serde_json::json!({
        "namespaces": strip(inv.namespaces.iter().map(|(k, o)| (k.clone(), o))),
        "pods": strip(inv.pods.iter().map(|(k, o)| (k.to_string(), o))),
        "nodes": strip(inv.nodes.iter().map(|(k, o)| (k.clone(), o))),
        "service_accounts": strip(inv.service_accounts.iter().map(|(k, o)| (k.to_string(), o))),
        "network_policies": strip(inv.network_policies.iter().map(|(k, o)| (k.to_string(), o))),
        "mesh_policies": strip(inv.mesh_policies.iter().map(|(k, o)| (k.to_string(), o))),
        "cluster_mesh_policies": strip(inv.cluster_mesh_policies.iter().map(|(k, o)| (k.clone(), o))),
        "mutual_tls": strip(inv.mutual_tls.iter().map(|(k, o)| (k.to_string(), o))),
        "services": strip(inv.services.iter().map(|(k, o)| (k.to_string(), o))),
        "endpoint_slices": strip(inv.endpoint_slices.iter().map(|(k, o)| (k.to_string(), o))),
    })
}

fn compiled(inv: &Inventory) -> CompiledState {
    let models = policy::translate_inventory(inv).expect("every policy translates");
    policy::compile(NODE, inv, &models, &mut IdentityAllocator::new())
}

fn write_manifests(dir: &Path, yaml: &str) {
    std::fs::write(dir.join("objects.yaml"), yaml).unwrap();
}

fn pod(name: &str, namespace: &str, node: &str, ip: &str, app: &str) -> Pod {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": app}},
        "spec": {"nodeName": node, "containers": [{"name": "c"}]},
        "status": {"podIP": ip},
    }))
    .unwrap()
}

fn ref_(namespace: &str, name: &str) -> nodeward::policy::ObjectRef {
    nodeward::policy::ObjectRef {
        namespace: namespace.into(),
        name: name.into(),
    }
}

fn has_ip(state: &CompiledState, ip: &str) -> bool {
    state.ipcache.keys().any(|net| net.addr().to_string() == ip)
}

fn rule_policies(state: &CompiledState) -> Vec<String> {
    let mut v: Vec<String> = state.rules.values().map(|r| r.policy()).collect();
    v.sort();
    v.dedup();
    v
}

/// Every request the source made, as (API group, resource, verb), must be one the ClusterRole in
/// `deploy/` grants (`nodeward::source::rbac`, which a deploy test keeps equal to the YAML): the
/// code side of "the RBAC rules cover exactly the verbs the code uses". Returns what was used.
fn assert_requests_within_rbac(requests: &[String]) -> BTreeSet<(String, String, String)> {
    let mut used = BTreeSet::new();
    for line in requests {
        let (method, rest) = line.split_once(' ').expect("METHOD path?query");
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        if path == "/version" {
            continue; // Non-resource URL, allowed to every authenticated user.
        }
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (group, rest) = match parts.as_slice() {
            ["api", "v1", rest @ ..] => ("", rest),
            ["apis", group, _version, rest @ ..] => (*group, rest),
            _ => panic!("unexpected request path {path}"),
        };
        let rest = match rest {
            ["namespaces", _ns, tail @ ..] if !tail.is_empty() => tail,
            other => other,
        };
        let (resource, named) = match rest {
            [resource] => ((*resource).to_owned(), false),
            [resource, _name] => ((*resource).to_owned(), true),
            [resource, _name, sub] => (format!("{resource}/{sub}"), true),
            other => panic!("unexpected resource path {other:?} in {path}"),
        };
        let verb = match (method, named) {
            ("GET", false) if query.contains("watch=true") || query.contains("watch=1") => "watch",
            ("GET", false) => "list",
            ("GET", true) => "get",
            ("POST", _) => "create",
            ("PATCH", _) => "patch",
            ("PUT", _) => "update",
            ("DELETE", _) => "delete",
            other => panic!("unexpected method {other:?}"),
        };
        assert!(
            nodeward::source::rbac::allows(group, &resource, verb),
            "the code did {verb} on {group}/{resource} ({line}), which deploy/clusterrole.yaml does not grant"
        );
        used.insert((group.to_owned(), resource, verb.to_owned()));
    }
    used
}

/// The other side: every resource the ClusterRole lets the agent read is listed and watched (a
/// grant nothing uses is a privilege to take away, or a watcher someone forgot). The first grant
/// not used, if any.
fn unused_read_grant(used: &BTreeSet<(String, String, String)>) -> Option<String> {
    for rule in nodeward::source::rbac::RBAC {
        if rule.verbs != nodeward::source::rbac::READ {
            continue;
        }
        for resource in rule.resources {
            for verb in ["list", "watch"] {
                let triple = (
                    rule.api_group.to_owned(),
                    (*resource).to_owned(),
                    verb.to_owned(),
                );
                if !used.contains(&triple) {
                    return Some(format!(
                        "deploy/clusterrole.yaml grants {verb} on {}/{resource} but the source never did it",
                        rule.api_group
                    ));
                }
            }
        }
    }
    None
}

#[tokio::test]
async fn initial_sync_gives_the_same_inventory_and_compiled_policy_as_the_manifests_source() {
    let fake = FakeApi::start().await;
    load_objects(&fake, OBJECTS);
    let (source, mut changed) = start(&fake, NODE);
    until("every kind is listed", || source.synced()).await;
    assert!(
        changed.try_recv().is_ok(),
        "the initial sync did not wake the control loop"
    );

    let dir = tempfile::tempdir().unwrap();
    write_manifests(dir.path(), OBJECTS);
    let from_files = ManifestSource::new(dir.path()).load();
    assert!(from_files.errors.is_empty(), "{:?}", from_files.errors);
    let from_api = source.load();
    assert!(from_api.errors.is_empty(), "{:?}", from_api.errors);

    assert_eq!(
        normalized(&from_api.inventory),
        normalized(&from_files.inventory),
        "the API server and the manifests directory gave different inventories"
    );
    assert_eq!(from_api.inventory.pods.len(), 3);
    assert_eq!(
        from_api
            .inventory
            .mutual_tls
            .keys()
            .cloned()
            .collect::<Vec<_>>(),
        vec![ref_("prod", "prod-strict")],
        "the MutualTLS object is in the inventory"
    );
    assert_eq!(
        compiled(&from_api.inventory),
        compiled(&from_files.inventory),
        "the same objects compiled to different maps"
    );
    let (services, errors) = nodeward::services::build(&from_api.inventory, NODE);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(
        (services.clone(), Vec::new()),
        nodeward::services::build(&from_files.inventory, NODE),
        "the same Services gave different service tables"
    );
    let backends: Vec<_> = services.ports.values().flat_map(|p| p.backends()).collect();
    assert_eq!(
        backends,
        vec![("10.2.0.2".parse().unwrap(), 5432)],
        "the Service from the API translates to its endpoint"
    );
    let state = compiled(&from_api.inventory);
    assert_eq!(
        state.endpoints.keys().cloned().collect::<Vec<_>>(),
        vec![ref_("other", "client"), ref_("prod", "web")],
        "the local endpoints are the pods of node n1"
    );

    // The watches resume from the list's version and ask for bookmarks. Each starts after its
    // list, which "synced" does not wait for: on a busy machine it may still be on its way.
    let resumable_pod_watch = |requests: &[String]| {
        requests.iter().any(|r| {
            r.starts_with("GET /api/v1/pods?")
                && r.contains("watch=true")
                && r.contains("allowWatchBookmarks=true")
                && r.contains("resourceVersion=")
        })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !resumable_pod_watch(&fake.requests()) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let requests = fake.requests();
    assert!(
        resumable_pod_watch(&requests),
        "no resumable pod watch among {requests:#?}"
    );
    let status = source.status();
    assert!(status.connected && status.synced, "{status:?}");
    // Every watch starts after its own list, which "synced" does not wait for either.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let unused = loop {
        let unused = unused_read_grant(&assert_requests_within_rbac(&fake.requests()));
        if unused.is_none() || tokio::time::Instant::now() >= deadline {
            break unused;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(unused.is_none(), "{}", unused.unwrap_or_default());
}

#[tokio::test]
async fn pod_and_policy_changes_reach_the_snapshot_and_the_compiled_policy() {
    let fake = FakeApi::start().await;
    load_objects(&fake, OBJECTS);
    let (source, _changed) = start(&fake, NODE);
    until("every kind is listed", || source.synced()).await;

    // Add a pod.
    fake.apply(&pod("api", "prod", NODE, "10.1.0.9", "api"));
    until("the new pod is in the snapshot", || {
        source.snapshot().pods.contains_key(&ref_("prod", "api"))
    })
    .await;
    let state = compiled(&source.snapshot());
    assert!(
        has_ip(&state, "10.1.0.9"),
        "the new pod is not in the ipcache"
    );
    assert!(state.endpoints.contains_key(&ref_("prod", "api")));

    // Modify it: new address.
    fake.apply(&pod("api", "prod", NODE, "10.1.0.10", "api"));
    until("the pod's new address is in the snapshot", || {
        has_ip(&compiled(&source.snapshot()), "10.1.0.10")
    })
    .await;
    assert!(!has_ip(&compiled(&source.snapshot()), "10.1.0.9"));

    // Delete it.
    fake.delete("v1", "Pod", Some("prod"), "api");
    until("the deleted pod leaves the snapshot", || {
        !source.snapshot().pods.contains_key(&ref_("prod", "api"))
    })
    .await;
    assert!(!has_ip(&compiled(&source.snapshot()), "10.1.0.10"));

    // Add a policy, change it, delete it.
    let mut policy: MeshPolicy = policy::parse_mesh_policy(serde_json::json!({
        "apiVersion": "nodeward.io/v1alpha1", "kind": "MeshPolicy",
        "metadata": {"name": "client-egress", "namespace": "other"},
        "spec": {"endpointSelector": {}, "egress": [{"toPorts": [{"port": "53", "protocol": "UDP"}]}]},
    }))
    .unwrap();
    fake.apply(&policy);
    until("the new policy compiles into rules", || {
        rule_policies(&compiled(&source.snapshot()))
            .contains(&"MeshPolicy/other/client-egress".into())
    })
    .await;
    let before = compiled(&source.snapshot()).endpoints[&ref_("other", "client")].clone();
    policy.spec.egress.as_mut().unwrap()[0]
        .to_ports
        .as_mut()
        .unwrap()[0]
        .port =
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("5353".into()));
    fake.apply(&policy);
    until("the changed policy changes the endpoint's entries", || {
        compiled(&source.snapshot()).endpoints[&ref_("other", "client")] != before
    })
    .await;
    fake.delete(
        "nodeward.io/v1alpha1",
        "MeshPolicy",
        Some("other"),
        "client-egress",
    );
    until("the deleted policy's rules disappear", || {
        !rule_policies(&compiled(&source.snapshot()))
            .contains(&"MeshPolicy/other/client-egress".into())
    })
    .await;
}

#[tokio::test]
async fn mutual_tls_changes_reach_the_snapshot() {
    let fake = FakeApi::start().await;
    load_objects(&fake, OBJECTS);
    let (source, _changed) = start(&fake, NODE);
    until("every kind is listed", || source.synced()).await;
    let mode = |source: &KubernetesSource, name: &str| {
        source
            .snapshot()
            .mutual_tls
            .get(&ref_("other", name))
            .map(|m| m.spec.mode)
    };

    let mut mtls = policy::parse_mutual_tls(serde_json::json!({
        "apiVersion": "nodeward.io/v1alpha1", "kind": "MutualTLS",
        "metadata": {"name": "client", "namespace": "other"},
        "spec": {"mode": "PERMISSIVE", "selector": {"matchLabels": {"app": "client"}}},
    }))
    .unwrap();
    fake.apply(&mtls);
    until("the new MutualTLS is in the snapshot", || {
        mode(&source, "client") == Some(MutualTlsMode::Permissive)
    })
    .await;

    mtls.spec.mode = MutualTlsMode::Disable;
    fake.apply(&mtls);
    until("the changed mode is in the snapshot", || {
        mode(&source, "client") == Some(MutualTlsMode::Disable)
    })
    .await;

    // Applied without the schema: reported by object and field, the last good version stays.
    let mut bad = serde_json::to_value(&mtls).unwrap();
    bad["spec"]["mode"] = serde_json::json!("STRICTER");
    fake.apply(&bad);
    until("the invalid MutualTLS is reported", || {
        !source.load().errors.is_empty()
    })
    .await;
    let errors = source.load().errors;
    assert!(
        errors[0].contains("MutualTLS other/client") && errors[0].contains("spec.mode"),
        "the error does not name the object and the field: {errors:?}"
    );
    assert_eq!(mode(&source, "client"), Some(MutualTlsMode::Disable));

    fake.delete("nodeward.io/v1alpha1", "MutualTLS", Some("other"), "client");
    until("the deleted MutualTLS leaves the snapshot", || {
        mode(&source, "client").is_none()
    })
    .await;
    assert!(
        source.load().errors.is_empty(),
        "the deleted object's error stays"
    );
    assert!(
        source
            .snapshot()
            .mutual_tls
            .contains_key(&ref_("prod", "prod-strict")),
        "another MutualTLS went with it"
    );
}

#[tokio::test]
async fn an_invalid_policy_is_reported_by_field_and_skipped_and_its_last_good_version_stays() {
    let fake = FakeApi::start().await;
    load_objects(&fake, OBJECTS);
    let (source, _changed) = start(&fake, NODE);
    until("every kind is listed", || source.synced()).await;

    // A CRD object applied without the schema: an unknown field the API server let through.
    let mut bad: Value =
        serde_json::to_value(source.snapshot().mesh_policies[&ref_("prod", "web-ingress")].clone())
            .unwrap();
    bad["spec"]["ingress"][0]["fromEndpointz"] = serde_json::json!([{}]);
    fake.apply(&bad);
    until("the invalid object is reported", || {
        !source.load().errors.is_empty()
    })
    .await;
    let errors = source.load().errors;
    assert!(
        errors[0].contains("MeshPolicy prod/web-ingress") && errors[0].contains("spec.ingress[0]"),
        "the error does not name the object and the field: {errors:?}"
    );
    assert!(
        source
            .snapshot()
            .mesh_policies
            .contains_key(&ref_("prod", "web-ingress")),
        "the last good version of the policy was dropped"
    );
    // A brand-new invalid policy is skipped, the rest stays.
    let mut new_bad = bad.clone();
    new_bad["metadata"] = serde_json::json!({"name": "broken", "namespace": "prod"});
    fake.apply(&new_bad);
    until("both invalid objects are reported", || {
        source.load().errors.len() == 2
    })
    .await;
    assert!(
        !source
            .snapshot()
            .mesh_policies
            .contains_key(&ref_("prod", "broken"))
    );
    assert_eq!(source.status().invalid_objects, 2);
}

#[tokio::test]
async fn an_expired_watch_is_resumed_by_a_relist_without_losing_state() {
    let fake = FakeApi::start().await;
    load_objects(&fake, OBJECTS);
    let (source, _changed) = start(&fake, NODE);
    until("every kind is listed", || source.synced()).await;
    let pod_lists = |fake: &FakeApi| {
        fake.requests()
            .iter()
            .filter(|r| r.starts_with("GET /api/v1/pods?") && !r.contains("watch=true"))
            .count()
    };
    let lists_before = pod_lists(&fake);

    // Changes the open watches never deliver, then the history is compacted away: only a relist
    // can find them (a deletion most of all).
    fake.hold();
    fake.apply(&pod("late", "prod", "n2", "10.2.0.7", "late"));
    fake.delete("v1", "Pod", Some("other"), "client");
    fake.delete(
        "networking.k8s.io/v1",
        "NetworkPolicy",
        Some("prod"),
        "db-from-web",
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !source.snapshot().pods.contains_key(&ref_("prod", "late")),
        "a held change was delivered"
    );
    fake.expire();

    let mut fewest_pods = usize::MAX;
    until("the relist brings the changes", || {
        let inv = source.snapshot();
        fewest_pods = fewest_pods.min(inv.pods.len());
        inv.pods.contains_key(&ref_("prod", "late"))
            && !inv.pods.contains_key(&ref_("other", "client"))
            && inv.network_policies.is_empty()
    })
    .await;
    assert!(fake.expired_sent() >= 1, "no watch was told 410 Expired");
    assert!(
        pod_lists(&fake) > lists_before,
        "the pods were not listed again after the 410"
    );
    assert!(
        fewest_pods >= 3,
        "the store dropped objects during the relist (saw {fewest_pods} pods)"
    );
    assert!(source.synced());

    // And the watch after the relist delivers again.
    fake.apply(&pod("later", "prod", "n2", "10.2.0.8", "later"));
    until("a change after the relist arrives", || {
        source.snapshot().pods.contains_key(&ref_("prod", "later"))
    })
    .await;
}

#[tokio::test]
async fn the_api_server_going_away_keeps_the_state_and_updates_arrive_when_it_returns() {
    let mut fake = FakeApi::start().await;
    load_objects(&fake, OBJECTS);
    let (source, _changed) = start(&fake, NODE);
    until("every kind is listed", || source.synced()).await;
    let before = normalized(&source.snapshot());

    fake.stop();
    until("the source says it is disconnected", || {
        !source.status().connected
    })
    .await;
    let status = source.status();
    assert!(
        status.last_error.is_some(),
        "no error in the status: {status:?}"
    );
    assert_eq!(
        normalized(&source.snapshot()),
        before,
        "the state changed while the API server was away"
    );
    assert!(source.synced(), "an outage must not unsync the source");

    // Written while the agent cannot see it; the watches resume from their version.
    fake.apply(&pod("while-away", "prod", "n2", "10.2.0.9", "x"));
    fake.restart().await;
    until("the update made during the outage arrives", || {
        source
            .snapshot()
            .pods
            .contains_key(&ref_("prod", "while-away"))
    })
    .await;
    until("the source says it is connected again", || {
        source.status().connected
    })
    .await;
    fake.delete("v1", "Pod", Some("prod"), "while-away");
    until("a later update arrives too", || {
        !source
            .snapshot()
            .pods
            .contains_key(&ref_("prod", "while-away"))
    })
    .await;
}

#[tokio::test]
async fn an_unreachable_api_server_at_start_is_not_synced_until_it_answers() {
    let mut fake = FakeApi::start().await;
    load_objects(&fake, OBJECTS);
    fake.stop();
    let (source, _changed) = start(&fake, NODE);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!source.synced(), "synced without an API server");
    let status = source.status();
    assert!(
        !status.connected && status.last_error.is_some(),
        "{status:?}"
    );
    assert_eq!(
        status.waiting_for.len(),
        nodeward::source::kubernetes::watched_kinds().len(),
        "{status:?}"
    );
    assert!(source.snapshot().pods.is_empty());

    fake.restart().await;
    until("the source syncs once the API server answers", || {
        source.synced()
    })
    .await;
    assert_eq!(source.snapshot().pods.len(), 3);
}

#[tokio::test]
async fn policy_status_is_applied_per_node_and_failures_become_events() {
    let fake = FakeApi::start().await;
    load_objects(&fake, OBJECTS);
    let (n1, _c1) = start(&fake, "n1");
    let (n2, _c2) = start(&fake, "n2");
    until("both sources are synced", || n1.synced() && n2.synced()).await;

    let enforced = PolicyOutcome {
        enforced: true,
        error: None,
    };
    let mut outcomes = BTreeMap::new();
    outcomes.insert("MeshPolicy prod/web-ingress".to_owned(), enforced.clone());
    outcomes.insert(
        "ClusterMeshPolicy no-world-egress".to_owned(),
        enforced.clone(),
    );
    outcomes.insert(
        "NetworkPolicy prod/db-from-web".to_owned(),
        enforced.clone(),
    );
    n1.report_policies(&outcomes);
    let failed = PolicyOutcome {
        enforced: false,
        error: Some(
            "MeshPolicy prod/web-ingress: spec.ingress[0]: the policy set overflows".into(),
        ),
    };
    let mut outcomes2 = outcomes.clone();
    outcomes2.insert("MeshPolicy prod/web-ingress".to_owned(), failed);
    n2.report_policies(&outcomes2);

    let status_of = |fake: &FakeApi| {
        fake.get(
            "nodeward.io/v1alpha1",
            "MeshPolicy",
            Some("prod"),
            "web-ingress",
        )
        .unwrap()["status"]
            .clone()
    };
    until("both nodes' entries are in the status", || {
        let s = status_of(&fake);
        s["nodes"]["n1"]["enforced"] == true && s["nodes"]["n2"]["enforced"] == false
    })
    .await;
    let status = status_of(&fake);
    assert!(
        status["nodes"]["n2"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("spec.ingress[0]")),
        "{status:#}"
    );
    assert_eq!(status["nodes"]["n1"]["observedGeneration"], 1, "{status:#}");
    let applies = fake.status_applies();
    let managers: std::collections::BTreeSet<&str> =
        applies.iter().map(|(_, m, _)| m.as_str()).collect();
    assert_eq!(
        managers,
        ["nodeward-n1", "nodeward-n2"].into_iter().collect(),
        "each node applies with its own field manager"
    );
    assert!(
        applies.iter().all(
            |(_, m, body)| body["status"]["nodes"].as_object().unwrap().len() == 1
                && body["status"]["nodes"]
                    .get(&m["nodeward-".len()..])
                    .is_some()
        ),
        "an agent applied another node's entry: {applies:#?}"
    );
    until("the cluster policy has n1's entry", || {
        fake.get(
            "nodeward.io/v1alpha1",
            "ClusterMeshPolicy",
            None,
            "no-world-egress",
        )
        .unwrap()["status"]["nodes"]["n1"]["enforced"]
            == true
    })
    .await;

    // The failure is an Event on the policy; NetworkPolicies get no status.
    until("a Warning event names the failing policy", || {
        fake.events().iter().any(|e| {
            e["type"] == "Warning"
                && e["regarding"]["name"] == "web-ingress"
                && e["reportingInstance"] == "n2"
                && e["note"].as_str().is_some_and(|n| n.contains("overflows"))
        })
    })
    .await;
    assert!(
        fake.get(
            "networking.k8s.io/v1",
            "NetworkPolicy",
            Some("prod"),
            "db-from-web"
        )
        .unwrap()
        .get("status")
        .is_none()
    );

    // Only changes are written: the same outcomes again write nothing.
    let writes = fake.status_applies().len();
    n1.report_policies(&outcomes);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        fake.status_applies().len(),
        writes,
        "an unchanged outcome was written again"
    );

    // n2 recovers: its entry changes, a Normal event says so.
    n2.report_policies(&outcomes);
    until("n2's entry is enforced again, without error", || {
        let s = status_of(&fake);
        s["nodes"]["n2"]["enforced"] == true && s["nodes"]["n2"].get("error").is_none()
    })
    .await;
    assert!(
        fake.events()
            .iter()
            .any(|e| e["type"] == "Normal" && e["reason"] == "PolicyEnforced")
    );
    // Status applies and events included, nothing the ClusterRole does not grant.
    assert_requests_within_rbac(&fake.requests());
}

#[tokio::test]
async fn an_http_route_from_the_api_reaches_the_inventory() {
    let fake = FakeApi::start().await;
    load_objects(&fake, OBJECTS);
    let (source, _changed) = start(&fake, NODE);
    until("the source is synced", || source.synced()).await;
    fake.apply(&serde_json::json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": { "name": "canary", "namespace": "prod" },
        "spec": {
            "parentRefs": [{ "group": "", "kind": "Service", "name": "web" }],
            "rules": [{ "backendRefs": [{ "name": "web-v2", "port": 80, "weight": 10 }] }],
        },
    }));
    until("the route is in the snapshot", || {
        source
            .snapshot()
            .http_routes
            .get(&ref_("prod", "canary"))
            .is_some_and(|r| r.spec.rules[0].backend_refs[0].weight == Some(10))
    })
    .await;
    fake.delete(
        "gateway.networking.k8s.io/v1",
        "HTTPRoute",
        Some("prod"),
        "canary",
    );
    until("the route is gone", || {
        source.snapshot().http_routes.is_empty()
    })
    .await;
}

/// A cluster without the Gateway API CRDs: the first sync does not wait for them, the source
/// stays connected, and routes arrive once the CRD is installed.
#[tokio::test]
async fn a_missing_http_route_crd_does_not_hold_the_sync_and_routes_arrive_once_it_is_installed() {
    let fake = FakeApi::start().await;
    load_objects(&fake, OBJECTS);
    fake.set_served("gateway.networking.k8s.io/v1", "httproutes", false);
    let (source, _changed) = start(&fake, NODE);
    until("the source is synced without the CRD", || source.synced()).await;
    let status = source.status();
    assert!(
        status.connected && status.last_error.is_none(),
        "a missing optional CRD is no error: {status:?}"
    );
    assert_eq!(source.snapshot().pods.len(), 3);
    fake.apply(&serde_json::json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": { "name": "canary", "namespace": "prod" },
        "spec": { "parentRefs": [{ "group": "", "kind": "Service", "name": "web" }] },
    }));
    fake.set_served("gateway.networking.k8s.io/v1", "httproutes", true);
    until("the route arrives once the CRD is served", || {
        source
            .snapshot()
            .http_routes
            .contains_key(&ref_("prod", "canary"))
    })
    .await;
}

/// A `TrafficPolicy` from the API reaches the inventory, and its outcome on a node is written to
/// its status (`status.nodes.<node>`), naming the bad field.
#[tokio::test]
async fn a_traffic_policy_from_the_api_reaches_the_inventory_and_gets_its_status() {
    let fake = FakeApi::start().await;
    load_objects(&fake, OBJECTS);
    let (source, _changed) = start(&fake, NODE);
    until("the source is synced", || source.synced()).await;
    fake.apply(&serde_json::json!({
        "apiVersion": "nodeward.io/v1alpha1",
        "kind": "TrafficPolicy",
        "metadata": { "name": "web", "namespace": "prod" },
        "spec": {
            "targetRefs": [{ "group": "", "kind": "Service", "name": "web" }],
            "connectionPool": { "maxConnections": 10 },
            "fault": { "abort": { "percentage": 150, "httpStatus": 503 } },
        },
    }));
    until("the policy is in the snapshot", || {
        source
            .snapshot()
            .traffic_policies
            .get(&ref_("prod", "web"))
            .is_some_and(|p| {
                p.spec
                    .connection_pool
                    .as_ref()
                    .and_then(|c| c.max_connections)
                    == Some(10)
            })
    })
    .await;
    let outcome = PolicyOutcome {
        enforced: false,
        error: Some(
            "TrafficPolicy prod/web: field spec.fault.abort.percentage: 150 is not a percentage from 0 to 100".into(),
        ),
    };
    source.report_policies(&BTreeMap::from([(
        "TrafficPolicy prod/web".to_owned(),
        outcome,
    )]));
    until("the node's entry names the field", || {
        fake.get("nodeward.io/v1alpha1", "TrafficPolicy", Some("prod"), "web")
            .unwrap()["status"]["nodes"][NODE]["error"]
            .as_str()
            .is_some_and(|e| e.contains("spec.fault.abort.percentage"))
    })
    .await;
    assert_requests_within_rbac(&fake.requests());
}
