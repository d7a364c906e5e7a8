//! Standalone mode: every YAML document under a directory, as `kubectl apply -f DIR` would
//! create them.
//!
//! Files are re-read only when their size or modification time changed. A file that no longer
//! parses keeps the objects it last gave (and the error is reported once); a document that
//! parses but does not deserialize keeps the previous version of that one object. So a broken
//! edit never takes away enforcement that was in place.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde::Deserialize as _;
use serde::de::DeserializeOwned;

use super::Inventory;
use crate::policy::ObjectRef;
use crate::policy::PolicyError;
use crate::policy::crd::{ClusterMeshPolicy, MeshPolicy, MutualTLS};

/// A problem with one file or one object in it. Displayed as one line.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ManifestError {
    pub file: PathBuf,
    /// `Kind namespace/name` when the document got that far.
    pub object: Option<String>,
    /// Path of the offending field (`spec.ingress[0].ports[0].port`), when known.
    pub field: Option<String>,
    pub message: String,
}

impl std::fmt::Display for ManifestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(object) = &self.object {
            write!(f, ": {object}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": field {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// One object read from a manifest.
#[derive(Clone, Debug)]
pub enum Object {
    Namespace(Arc<Namespace>),
    Pod(Arc<Pod>),
    Node(Arc<Node>),
    ServiceAccount(Arc<ServiceAccount>),
    NetworkPolicy(Arc<NetworkPolicy>),
    MeshPolicy(Arc<MeshPolicy>),
    ClusterMeshPolicy(Arc<ClusterMeshPolicy>),
    MutualTLS(Arc<MutualTLS>),
    Service(Arc<Service>),
    EndpointSlice(Arc<EndpointSlice>),
    HttpRoute(Arc<crate::http::gateway::HttpRoute>),
    TrafficPolicy(Arc<crate::http::traffic::TrafficPolicy>),
}

#[derive(Clone, Debug)]
struct FileState {
    stamp: (SystemTime, u64),
    /// Objects by `Kind ns/name`, the last good version of each.
    objects: BTreeMap<String, Object>,
    errors: Vec<ManifestError>,
}

/// The manifests directory and what was last read from it.
#[derive(Debug)]
pub struct ManifestSource {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    /// The inventory of `files`, patched where files change (see [`ManifestSource::load`]).
    inventory: Option<Arc<Inventory>>,
}

/// What a [`ManifestSource::load`] found.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Shared with the source, which patches it in place on the next load when the caller has
    /// let go of it (else that load copies it once).
    pub inventory: Arc<Inventory>,
    /// Every current problem (also the ones reported before).
    pub errors: Vec<ManifestError>,
    /// Problems not seen in the previous load: log these.
    pub new_errors: Vec<ManifestError>,
}

impl ManifestSource {
    #[must_use]
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            files: BTreeMap::new(),
            inventory: None,
        }
    }

    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads what changed since the last call and returns the whole inventory: the last one with
    /// the changed files' objects swapped, as long as no key is in two files (else it is built
    /// again from every file, since the file order decides which one wins).
    pub fn load(&mut self) -> Loaded {
        let mut loaded = Loaded::default();
        let mut seen = Vec::new();
        match manifest_files(&self.dir) {
            Ok(paths) => seen = paths,
            Err(e) => loaded.errors.push(ManifestError {
                file: self.dir.clone(),
                object: None,
                field: None,
                message: format!("cannot read the manifests directory: {e}"),
            }),
        }
        // A directory that cannot be listed keeps everything: never drop state on an I/O error.
        // Each file read again or gone, with the objects it gave before, for the patch below.
        let mut changed: Vec<(PathBuf, Option<FileState>)> = Vec::new();
        if loaded.errors.is_empty() {
            let gone: Vec<PathBuf> = self
                .files
                .keys()
                .filter(|path| seen.binary_search(path).is_err())
                .cloned()
                .collect();
            for path in gone {
                let previous = self.files.remove(&path);
                changed.push((path, previous));
            }
        }
        for path in seen {
            let stamp = match std::fs::metadata(&path) {
                Ok(m) => (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()),
                Err(_) => continue, // removed between listing and reading
            };
            if self.files.get(&path).is_some_and(|f| f.stamp == stamp) {
                continue;
            }
            let previous = self.files.remove(&path);
            let state = read_file(&path, stamp, previous.as_ref());
            for e in &state.errors {
                if !previous.as_ref().is_some_and(|p| p.errors.contains(e)) {
                    loaded.new_errors.push(e.clone());
                }
            }
            self.files.insert(path.clone(), state);
            changed.push((path, previous));
        }
        for file in self.files.values() {
            loaded.errors.extend(file.errors.iter().cloned());
        }
        let patched = self
            .inventory
            .take()
            .filter(|inv| {
                // No key in two files (the origins would have fewer keys than the objects).
                let objects: usize = self.files.values().map(|f| f.objects.len()).sum();
                let changed_now: usize = changed
                    .iter()
                    .filter_map(|(p, _)| self.files.get(p))
                    .map(|f| f.objects.len())
                    .sum();
                let changed_before: usize = changed
                    .iter()
                    .filter_map(|(_, f)| f.as_ref())
                    .map(|f| f.objects.len())
                    .sum();
                objects + changed_before == inv.origins.len() + changed_now
            })
            .and_then(|mut inv| self.patch(Arc::make_mut(&mut inv), &changed).then_some(inv));
        let inventory = patched.unwrap_or_else(|| {
            let mut inventory = InventoryBuilder::default();
            for (path, file) in &self.files {
                for (key, object) in &file.objects {
                    inventory.origin(key.clone(), path.clone());
                    inventory.add(object.clone());
                }
            }
            Arc::new(inventory.build())
        });
        self.inventory = Some(inventory.clone());
        loaded.inventory = inventory;
        loaded
    }

    /// Takes `inv` from what `changed` files held before to what they hold now, unless an object
    /// of theirs has its key in another file too (then which one wins depends on the file
    /// order, and the caller builds the inventory again): whether it could.
    fn patch(&self, inv: &mut Inventory, changed: &[(PathBuf, Option<FileState>)]) -> bool {
        // Checked before anything is touched: every key the changed files had or have must be
        // theirs alone.
        for (path, previous) in changed {
            let now = self.files.get(path);
            let keys = previous.iter().chain(now).flat_map(|f| f.objects.keys());
            for key in keys {
                if inv.origins.get(key).is_some_and(|p| p != path) {
                    return false;
                }
                let elsewhere = changed
                    .iter()
                    .filter(|(other, _)| other != path)
                    .filter_map(|(other, _)| self.files.get(other))
                    .any(|f| f.objects.contains_key(key));
                if elsewhere {
                    return false;
                }
            }
        }
        for (path, previous) in changed {
            for (key, object) in previous.iter().flat_map(|f| &f.objects) {
                inv.origins.remove(key);
                remove(inv, object);
            }
            for (key, object) in self.files.get(path).iter().flat_map(|f| &f.objects) {
                inv.origins.insert(key.clone(), path.clone());
                insert(inv, object.clone());
            }
        }
        true
    }
}

/// Takes `object`'s key out of its kind's map.
fn remove(inv: &mut Inventory, object: &Object) {
    let name = |meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
        meta.name.clone().unwrap_or_default()
    };
    match object {
        Object::Namespace(o) => drop(inv.namespaces.remove(&name(&o.metadata))),
        Object::Pod(o) => drop(inv.pods.remove(&namespaced(&o.metadata))),
        Object::Node(o) => drop(inv.nodes.remove(&name(&o.metadata))),
        Object::ServiceAccount(o) => drop(inv.service_accounts.remove(&namespaced(&o.metadata))),
        Object::NetworkPolicy(o) => drop(inv.network_policies.remove(&namespaced(&o.metadata))),
        Object::MeshPolicy(o) => drop(inv.mesh_policies.remove(&namespaced(&o.metadata))),
        Object::ClusterMeshPolicy(o) => {
            drop(inv.cluster_mesh_policies.remove(&name(&o.metadata)));
        }
        Object::MutualTLS(o) => drop(inv.mutual_tls.remove(&namespaced(&o.metadata))),
        Object::Service(o) => drop(inv.services.remove(&namespaced(&o.metadata))),
        Object::EndpointSlice(o) => drop(inv.endpoint_slices.remove(&namespaced(&o.metadata))),
        Object::HttpRoute(o) => drop(inv.http_routes.remove(&namespaced(&o.metadata))),
        Object::TrafficPolicy(o) => drop(inv.traffic_policies.remove(&namespaced(&o.metadata))),
    }
}

/// Puts `object` into its kind's map, as [`InventoryBuilder::add`] would.
fn insert(inv: &mut Inventory, object: Object) {
    let mut one = InventoryBuilder::default();
    one.add(object);
    let InventoryBuilder {
        namespaces,
        pods,
        nodes,
        service_accounts,
        network_policies,
        mesh_policies,
        cluster_mesh_policies,
        mutual_tls,
        services,
        endpoint_slices,
        http_routes,
        traffic_policies,
        origins: _,
    } = one;
    inv.namespaces.extend(namespaces);
    inv.pods.extend(pods);
    inv.nodes.extend(nodes);
    inv.service_accounts.extend(service_accounts);
    inv.network_policies.extend(network_policies);
    inv.mesh_policies.extend(mesh_policies);
    inv.cluster_mesh_policies.extend(cluster_mesh_policies);
    inv.mutual_tls.extend(mutual_tls);
    inv.services.extend(services);
    inv.endpoint_slices.extend(endpoint_slices);
    inv.http_routes.extend(http_routes);
    inv.traffic_policies.extend(traffic_policies);
}

/// Every `.yaml`, `.yml` and `.json` file under `dir`, recursively, sorted, hidden files skipped
/// (editors' swap files, `..data` of mounted ConfigMaps is followed through its symlinks).
fn manifest_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    // Bounded: a symlink loop must not hang the agent.
    let mut budget = 100_000usize;
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            budget = budget.saturating_sub(1);
            if budget == 0 {
                return Err(std::io::Error::other(
                    "more than 100000 entries under the directory",
                ));
            }
            let entry = entry?;
            let name = entry.file_name();
            if name.to_string_lossy().starts_with('.') {
                continue;
            }
            let path = entry.path();
            let meta = std::fs::metadata(&path)?;
            if meta.is_dir() {
                stack.push(path);
            } else if path
                .extension()
                .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
            {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

fn read_file(path: &Path, stamp: (SystemTime, u64), previous: Option<&FileState>) -> FileState {
    let error = |object: Option<String>, field: Option<String>, message: String| ManifestError {
        file: path.to_path_buf(),
        object,
        field,
        message,
    };
    let keep_previous = |e: ManifestError| FileState {
        stamp,
        objects: previous.map(|p| p.objects.clone()).unwrap_or_default(),
        errors: vec![e],
    };
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => return keep_previous(error(None, None, format!("cannot read: {e}"))),
    };
    let mut state = FileState {
        stamp,
        objects: BTreeMap::new(),
        errors: Vec::new(),
    };
    // Each document becomes its object before the next is parsed: holding every document's
    // JSON form at once costs twice the objects (21 MiB for 1,000 Services with 10,000
    // endpoints), and what the heap grew to stays resident. A YAML error in any document still
    // keeps the whole previous state of the file.
    for (index, doc) in serde_yaml_ng::Deserializer::from_str(&text).enumerate() {
        let value = match serde_json::Value::deserialize(doc) {
            Ok(value) => value,
            Err(e) => {
                let message = format!("document {}: not valid YAML: {e}", index + 1);
                return keep_previous(error(None, None, message));
            }
        };
        // `kind: List` (what `kubectl get -o yaml` writes) holds its objects in `items`, in
        // order.
        let mut pending = vec![value];
        while let Some(mut doc) = pending.pop() {
            if doc.is_null() {
                continue;
            }
            if doc.get("kind").and_then(|k| k.as_str()) == Some("List") {
                if let Some(serde_json::Value::Array(items)) = doc.get_mut("items") {
                    pending.extend(std::mem::take(items).into_iter().rev());
                }
                continue;
            }
            match parse_object(doc) {
                Ok(None) => {}
                Ok(Some((key, object))) => {
                    if state.objects.contains_key(&key) {
                        state.errors.push(error(
                            Some(key.clone()),
                            None,
                            "defined twice in this file; the later one wins".into(),
                        ));
                    }
                    state.objects.insert(key, object);
                }
                Err((key, field, message)) => {
                    if let Some(key) = &key
                        && let Some(old) = previous.and_then(|p| p.objects.get(key))
                    {
                        state.objects.insert(key.clone(), old.clone());
                    }
                    state.errors.push(error(key, field, message));
                }
            }
        }
    }
    state
}

/// `(object key, field path, message)` of a document that did not become an object.
pub(crate) type ParseError = (Option<String>, Option<String>, String);

/// `Kind ns/name` (or `Kind name` when cluster scoped) of a raw document.
pub(crate) fn object_key(kind: &str, doc: &serde_json::Value) -> Option<String> {
    let meta = doc.get("metadata")?;
    let name = meta.get("name")?.as_str()?;
    Some(match meta.get("namespace").and_then(|n| n.as_str()) {
        Some(ns) if !matches!(kind, "Namespace" | "Node" | "ClusterMeshPolicy") => {
            format!("{kind} {ns}/{name}")
        }
        _ if matches!(kind, "Namespace" | "Node" | "ClusterMeshPolicy") => format!("{kind} {name}"),
        _ => format!("{kind} default/{name}"),
    })
}

/// Shared with the Kubernetes source, so both read an object the same way.
pub(crate) fn parse_object(doc: serde_json::Value) -> Result<Option<(String, Object)>, ParseError> {
    let api_version = doc
        .get("apiVersion")
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_owned();
    let Some(kind) = doc.get("kind").and_then(|v| v.as_str()).map(str::to_owned) else {
        return Err((None, Some("kind".into()), "missing `kind`".into()));
    };
    let key = object_key(&kind, &doc);
    let Some(key) = key else {
        return Err((
            Some(kind),
            Some("metadata.name".into()),
            "missing `metadata.name`".into(),
        ));
    };
    // A policy's `status` is written by the agents (per node), never read: an old or foreign
    // status must not make the policy itself invalid.
    let mut doc = doc;
    if api_version.starts_with("nodeward.io/")
        && let Some(map) = doc.as_object_mut()
    {
        map.remove("status");
    }
    let object = match (api_version.as_str(), kind.as_str()) {
        ("v1", "Namespace") => Object::Namespace(Arc::new(typed(doc, &key)?)),
        ("v1", "Pod") => Object::Pod(Arc::new(slim_pod(typed(doc, &key)?))),
        ("v1", "Node") => Object::Node(Arc::new(typed(doc, &key)?)),
        ("v1", "ServiceAccount") => Object::ServiceAccount(Arc::new(typed(doc, &key)?)),
        ("networking.k8s.io/v1", "NetworkPolicy") => {
            Object::NetworkPolicy(Arc::new(typed(doc, &key)?))
        }
        ("v1", "Service") => {
            Object::Service(Arc::new(crate::services::slim_service(typed(doc, &key)?)))
        }
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            Object::EndpointSlice(Arc::new(crate::services::slim_slice(typed(doc, &key)?)))
        }
        (crate::http::gateway::API_VERSION, crate::http::gateway::KIND) => {
            Object::HttpRoute(Arc::new(typed(doc, &key)?))
        }
        ("nodeward.io/v1alpha1", "MeshPolicy") => {
            Object::MeshPolicy(ours(crate::policy::parse_mesh_policy(doc), &key)?)
        }
        ("nodeward.io/v1alpha1", "ClusterMeshPolicy") => {
            Object::ClusterMeshPolicy(ours(crate::policy::parse_cluster_mesh_policy(doc), &key)?)
        }
        ("nodeward.io/v1alpha1", "MutualTLS") => {
            Object::MutualTLS(ours(crate::policy::parse_mutual_tls(doc), &key)?)
        }
        ("nodeward.io/v1alpha1", "TrafficPolicy") => {
            Object::TrafficPolicy(Arc::new(crate::http::traffic::parse(doc).map_err(
                |(field, e)| (Some(key.clone()), (!field.is_empty()).then_some(field), e),
            )?))
        }
        (_, "MeshPolicy" | "ClusterMeshPolicy" | "MutualTLS" | "TrafficPolicy")
            if api_version.starts_with("nodeward.io/") =>
        {
            return Err((
                Some(key),
                Some("apiVersion".into()),
                format!("unsupported version {api_version:?}, expected nodeward.io/v1alpha1"),
            ));
        }
        // Deployments, ConfigMaps...: not ours to read.
        _ => return Ok(None),
    };
    Ok(Some((key, object)))
}

/// The parts of a pod nodeward reads: identity (name, namespace, uid, labels), placement
/// (node, host network), service account, container ports (named ports), phase and addresses.
/// The rest (images, commands, env, volumes, managed fields...) is dropped when the pod is
/// read: a node's agent holds every pod of the cluster, and a full `Pod` is kilobytes.
#[must_use]
pub fn slim_pod(pod: Pod) -> Pod {
    use k8s_openapi::api::core::v1::{Container, PodIP, PodSpec, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    let m = pod.metadata;
    let metadata = ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        uid: m.uid,
        resource_version: m.resource_version,
        labels: m.labels,
        ..ObjectMeta::default()
    };
    let spec = pod.spec.map(|s| {
        // Only containers with ports matter (named ports), and of them only the ports. A
        // fresh Vec: collecting in place would keep the old buffer (kilobytes per container).
        let mut containers = Vec::new();
        for c in s.containers {
            if c.ports.as_ref().is_some_and(|p| !p.is_empty()) {
                containers.push(Container {
                    name: c.name,
                    ports: c.ports,
                    ..Container::default()
                });
            }
        }
        PodSpec {
            node_name: s.node_name,
            host_network: s.host_network,
            service_account_name: s.service_account_name,
            service_account: s.service_account,
            containers,
            ..PodSpec::default()
        }
    });
    let status = pod.status.map(|s| PodStatus {
        phase: s.phase,
        pod_ip: s.pod_ip,
        pod_ips: s
            .pod_ips
            .map(|ips| ips.into_iter().map(|p| PodIP { ip: p.ip }).collect()),
        host_ip: s.host_ip,
        host_ips: s.host_ips,
        ..PodStatus::default()
    });
    Pod {
        metadata,
        spec,
        status,
    }
}

/// A `nodeward.io` object from its own parser, whose errors already name the field.
fn ours<T>(parsed: Result<T, PolicyError>, key: &str) -> Result<Arc<T>, ParseError> {
    parsed.map(Arc::new).map_err(|e| {
        (
            Some(key.to_owned()),
            (!e.field.is_empty()).then_some(e.field),
            e.message,
        )
    })
}

fn typed<T: DeserializeOwned>(doc: serde_json::Value, key: &str) -> Result<T, ParseError> {
    serde_path_to_error::deserialize(doc).map_err(|e| {
        let field = e.path().to_string();
        (
            Some(key.to_owned()),
            (field != ".").then_some(field),
            e.into_inner().to_string(),
        )
    })
}

fn namespaced(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> ObjectRef {
    ObjectRef {
        namespace: meta.namespace.clone().unwrap_or_else(|| "default".into()),
        name: meta.name.clone().unwrap_or_default(),
    }
}

/// Assembles an [`Inventory`] from objects in order, a later object replacing an earlier one
/// with the same key. Collected first and sorted once: inserting thousands of objects one by
/// one into the maps compared their long, alike keys at every level of every descent, which was
/// most of a load at 1,000 pods.
#[derive(Default)]
pub(crate) struct InventoryBuilder {
    namespaces: Vec<(String, Arc<Namespace>)>,
    pods: Vec<(ObjectRef, Arc<Pod>)>,
    nodes: Vec<(String, Arc<Node>)>,
    service_accounts: Vec<(ObjectRef, Arc<ServiceAccount>)>,
    network_policies: Vec<(ObjectRef, Arc<NetworkPolicy>)>,
    mesh_policies: Vec<(ObjectRef, Arc<MeshPolicy>)>,
    cluster_mesh_policies: Vec<(String, Arc<ClusterMeshPolicy>)>,
    mutual_tls: Vec<(ObjectRef, Arc<MutualTLS>)>,
    services: Vec<(ObjectRef, Arc<Service>)>,
    endpoint_slices: Vec<(ObjectRef, Arc<EndpointSlice>)>,
    http_routes: Vec<(ObjectRef, Arc<crate::http::gateway::HttpRoute>)>,
    traffic_policies: Vec<(ObjectRef, Arc<crate::http::traffic::TrafficPolicy>)>,
    origins: Vec<(String, PathBuf)>,
}

impl InventoryBuilder {
    pub(crate) fn add(&mut self, object: Object) {
        let name = |meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
            meta.name.clone().unwrap_or_default()
        };
        match object {
            Object::Namespace(o) => self.namespaces.push((name(&o.metadata), o)),
            Object::Pod(o) => self.pods.push((namespaced(&o.metadata), o)),
            Object::Node(o) => self.nodes.push((name(&o.metadata), o)),
            Object::ServiceAccount(o) => self.service_accounts.push((namespaced(&o.metadata), o)),
            Object::NetworkPolicy(o) => self.network_policies.push((namespaced(&o.metadata), o)),
            Object::MeshPolicy(o) => self.mesh_policies.push((namespaced(&o.metadata), o)),
            Object::ClusterMeshPolicy(o) => {
                self.cluster_mesh_policies.push((name(&o.metadata), o));
            }
            Object::MutualTLS(o) => self.mutual_tls.push((namespaced(&o.metadata), o)),
            Object::Service(o) => self.services.push((namespaced(&o.metadata), o)),
            Object::EndpointSlice(o) => self.endpoint_slices.push((namespaced(&o.metadata), o)),
            Object::HttpRoute(o) => self.http_routes.push((namespaced(&o.metadata), o)),
            Object::TrafficPolicy(o) => self.traffic_policies.push((namespaced(&o.metadata), o)),
        }
    }

    /// Records the file an object came from, under its `Kind ns/name` key.
    fn origin(&mut self, key: String, path: PathBuf) {
        self.origins.push((key, path));
    }

    pub(crate) fn build(self) -> Inventory {
        Inventory {
            namespaces: last_wins(self.namespaces),
            pods: last_wins(self.pods),
            nodes: last_wins(self.nodes),
            service_accounts: last_wins(self.service_accounts),
            network_policies: last_wins(self.network_policies),
            mesh_policies: last_wins(self.mesh_policies),
            cluster_mesh_policies: last_wins(self.cluster_mesh_policies),
            mutual_tls: last_wins(self.mutual_tls),
            services: last_wins(self.services),
            endpoint_slices: last_wins(self.endpoint_slices),
            http_routes: last_wins(self.http_routes),
            traffic_policies: last_wins(self.traffic_policies),
            origins: last_wins(self.origins),
        }
    }
}

/// The map of `items`, the last of equal keys winning (as inserting them in order would).
fn last_wins<K: Ord, V>(mut items: Vec<(K, V)>) -> BTreeMap<K, V> {
    // Stable, so equal keys keep their order; then each run of equal keys keeps its last.
    items.sort_by(|a, b| a.0.cmp(&b.0));
    let mut unique: Vec<(K, V)> = Vec::with_capacity(items.len());
    for item in items {
        match unique.last_mut() {
            Some(last) if last.0 == item.0 => *last = item,
            _ => unique.push(item),
        }
    }
    // Sorted and unique: built in one pass, without a search per key.
    unique.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the policy compiler, the tunnel and the CA read survives; the bulk does not.
    #[test]
    fn a_pod_is_kept_slim() {
        let doc = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": "api-0", "namespace": "shop", "uid": "u-1",
                "labels": { "app": "api" },
                "annotations": { "big": "x".repeat(4096) },
                "managedFields": [{ "manager": "kubectl", "operation": "Apply" }],
            },
            "spec": {
                "nodeName": "node-1", "serviceAccountName": "api",
                "containers": [
                    { "name": "sidecar", "image": "busybox", "command": ["sleep", "1d"] },
                    { "name": "app", "image": "api:1",
                      "env": [{ "name": "A", "value": "b" }],
                      "ports": [{ "name": "http", "containerPort": 8080 }] },
                ],
                "volumes": [{ "name": "data", "emptyDir": {} }],
            },
            "status": {
                "phase": "Running", "podIP": "10.0.0.5", "podIPs": [{ "ip": "10.0.0.5" }],
                "hostIP": "192.168.0.1",
                "conditions": [{ "type": "Ready", "status": "True" }],
            },
        });
        let Some((_, Object::Pod(pod))) = parse_object(doc).unwrap() else {
            panic!("not a pod");
        };
        let spec = pod.spec.as_ref().unwrap();
        let status = pod.status.as_ref().unwrap();
        assert_eq!(pod.metadata.labels.as_ref().unwrap()["app"], "api");
        assert_eq!(pod.metadata.uid.as_deref(), Some("u-1"));
        assert!(pod.metadata.annotations.is_none() && pod.metadata.managed_fields.is_none());
        assert_eq!(spec.node_name.as_deref(), Some("node-1"));
        assert_eq!(spec.service_account_name.as_deref(), Some("api"));
        assert_eq!(spec.containers.len(), 1, "only the container with ports");
        let app = &spec.containers[0];
        assert_eq!(app.ports.as_ref().unwrap()[0].name.as_deref(), Some("http"));
        assert!(app.image.is_none() && app.env.is_none() && spec.volumes.is_none());
        assert_eq!(status.pod_ips.as_ref().unwrap()[0].ip, "10.0.0.5");
        assert_eq!(status.host_ip.as_deref(), Some("192.168.0.1"));
        assert!(status.conditions.is_none());
    }

    fn write(dir: &Path, name: &str, text: &str) {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        // Make the change visible even within the file system's timestamp granularity.
        let later = SystemTime::now()
            + std::time::Duration::from_secs(u64::try_from(name.len()).unwrap() + 1);
        let f = std::fs::File::options().write(true).open(&path).unwrap();
        f.set_modified(later).unwrap();
    }

    const PODS: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: prod, labels: {team: a}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: prod, labels: {app: web}}
spec:
  nodeName: n1
  containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]
status: {podIP: 10.0.0.2}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: ignored}
";

    #[test]
    fn reads_multi_document_files_recursively_and_ignores_foreign_kinds() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a/b/pods.yaml", PODS);
        write(
            dir.path(),
            "np.yml",
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: prod}\nspec: {podSelector: {}}\n",
        );
        let loaded = ManifestSource::new(dir.path()).load();
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        assert_eq!(loaded.inventory.namespaces.len(), 1);
        assert_eq!(loaded.inventory.pods.len(), 1);
        assert_eq!(loaded.inventory.network_policies.len(), 1);
    }

    #[test]
    fn a_list_is_read_in_order_and_a_later_yaml_error_keeps_the_previous_file() {
        let dir = tempfile::tempdir().unwrap();
        let ns = |name: &str, team: &str| {
            format!(
                "{{apiVersion: v1, kind: Namespace, metadata: {{name: {name}, labels: {{team: {team}}}}}}}"
            )
        };
        let text = format!(
            "apiVersion: v1\nkind: List\nitems:\n- {}\n- {}\n---\n{}\n",
            ns("prod", "first"),
            ns("prod", "second"),
            ns("dev", "x")
        );
        write(dir.path(), "list.yaml", &text);
        let mut source = ManifestSource::new(dir.path());
        let loaded = source.load();
        let team = |inv: &Inventory| {
            inv.namespaces["prod"].metadata.labels.as_ref().unwrap()["team"].clone()
        };
        assert_eq!(loaded.inventory.namespaces.len(), 2);
        assert_eq!(team(&loaded.inventory), "second", "the later item wins");
        // Objects before a document that is not YAML do not replace the file's last state.
        write(
            dir.path(),
            "list.yaml",
            &format!("{}\n---\n{{ not: [yaml\n", ns("prod", "third")),
        );
        let loaded = source.load();
        assert_eq!(loaded.errors.len(), 1, "{:?}", loaded.errors);
        assert_eq!(loaded.inventory.namespaces.len(), 2);
        assert_eq!(team(&loaded.inventory), "second");
    }

    #[test]
    fn a_bad_field_names_file_object_and_field_and_keeps_the_last_good_object() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "pods.yaml", PODS);
        let mut source = ManifestSource::new(dir.path());
        assert!(source.load().errors.is_empty());
        write(
            dir.path(),
            "pods.yaml",
            &PODS.replace("containerPort: 8080", "containerPort: eighty"),
        );
        let loaded = source.load();
        assert_eq!(loaded.new_errors.len(), 1, "{:?}", loaded.new_errors);
        let line = loaded.new_errors[0].to_string();
        assert!(line.contains("pods.yaml"), "{line}");
        assert!(line.contains("Pod prod/web"), "{line}");
        assert!(
            line.contains("spec.containers[0].ports[0].containerPort"),
            "{line}"
        );
        assert_eq!(
            loaded.inventory.pods.len(),
            1,
            "the last good pod was dropped"
        );
        // Reported once: the next load knows it already.
        assert!(source.load().new_errors.is_empty());
    }

    const MTLS: &str = "
apiVersion: nodeward.io/v1alpha1
kind: MutualTLS
metadata: {name: strict, namespace: prod}
spec: {mode: STRICT, selector: {matchLabels: {app: web}}}
";

    #[test]
    fn mutual_tls_objects_reach_the_inventory_with_their_origin() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "mtls.yaml", MTLS);
        let loaded = ManifestSource::new(dir.path()).load();
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        let key = ObjectRef {
            namespace: "prod".into(),
            name: "strict".into(),
        };
        let mtls = &loaded.inventory.mutual_tls[&key];
        assert_eq!(mtls.spec.mode, crate::policy::crd::MutualTlsMode::Strict);
        assert_eq!(
            loaded.inventory.origins.get("MutualTLS prod/strict"),
            Some(&dir.path().join("mtls.yaml"))
        );
    }

    #[test]
    fn a_mutual_tls_with_an_unknown_field_names_file_object_and_field() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "mtls.yaml", &MTLS.replace("mode:", "mood:"));
        let loaded = ManifestSource::new(dir.path()).load();
        assert!(loaded.inventory.mutual_tls.is_empty());
        let line = loaded.errors.first().map(ToString::to_string);
        let line = line.as_deref().unwrap_or("no error");
        assert!(
            line.contains("mtls.yaml: MutualTLS prod/strict: field spec.mood")
                && line.contains("unknown field `mood`"),
            "{line}"
        );
        write(
            dir.path(),
            "mtls.yaml",
            &MTLS.replace("v1alpha1", "v1beta1"),
        );
        let loaded = ManifestSource::new(dir.path()).load();
        assert!(
            loaded.errors[0].to_string().contains("field apiVersion"),
            "{}",
            loaded.errors[0]
        );
    }

    #[test]
    fn a_file_that_no_longer_parses_keeps_its_objects() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "pods.yaml", PODS);
        let mut source = ManifestSource::new(dir.path());
        source.load();
        write(dir.path(), "pods.yaml", "kind: [unclosed\n");
        let loaded = source.load();
        assert_eq!(loaded.errors.len(), 1);
        assert!(loaded.errors[0].message.contains("not valid YAML"));
        assert_eq!(loaded.inventory.pods.len(), 1);
    }

    #[test]
    fn a_removed_file_removes_its_objects() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "pods.yaml", PODS);
        let mut source = ManifestSource::new(dir.path());
        source.load();
        std::fs::remove_file(dir.path().join("pods.yaml")).unwrap();
        assert!(source.load().inventory.pods.is_empty());
    }

    /// As `kubectl apply -f DIR` would leave it: an object in two files is the version of the
    /// file applied last (path order), whichever file was read or changed first.
    #[test]
    fn an_object_in_two_files_is_the_later_files_version() {
        let pod = |app: &str| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: web, namespace: prod, labels: {{app: {app}}}}}\nstatus: {{podIP: 10.0.0.2}}\n"
            )
        };
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "b.yaml", &pod("from-b"));
        write(dir.path(), "a.yaml", &pod("from-a"));
        write(dir.path(), "c/other.yaml", PODS);
        let mut source = ManifestSource::new(dir.path());
        let app = |inv: &Inventory| {
            let key = ObjectRef {
                namespace: "prod".into(),
                name: "web".into(),
            };
            let labels = inv.pods[&key].metadata.labels.clone().unwrap();
            (labels["app"].clone(), inv.origins["Pod prod/web"].clone())
        };
        // c/other.yaml sorts last: its web wins over both.
        let inv = source.load().inventory;
        assert_eq!(app(&inv), ("web".into(), dir.path().join("c/other.yaml")));
        assert_eq!(inv.pods.len(), 1);
        assert_eq!(inv.namespaces.len(), 1);
        std::fs::remove_file(dir.path().join("c/other.yaml")).unwrap();
        let inv = source.load().inventory;
        assert_eq!(app(&inv), ("from-b".into(), dir.path().join("b.yaml")));
        // An edit to the earlier file does not take the object back from the later one.
        write(dir.path(), "a.yaml", &pod("from-a-again"));
        let inv = source.load().inventory;
        assert_eq!(app(&inv), ("from-b".into(), dir.path().join("b.yaml")));
    }
}
