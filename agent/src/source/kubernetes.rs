//! Cluster mode: the same objects as the manifests source, from the Kubernetes API server.
//!
//! One kube-runtime watcher per kind (Namespaces, Pods, Nodes, ServiceAccounts,
//! NetworkPolicies, MeshPolicies, ClusterMeshPolicies, MutualTLSes) feeds one store. Every
//! object, whatever its kind, is read as raw JSON and goes through the manifests source's own
//! parser ([`super::manifests::parse_object`]), so both sources give the same [`Inventory`] for
//! the same objects, and an invalid object (a CRD applied without its schema) is reported by
//! object and field and skipped; its last good version, if any, stays.
//!
//! Pods are watched cluster-wide, not field-selected to this node: the compiler needs every pod
//! (local ones are endpoints, the others are peers in the ipcache), so a second, node-selected
//! watch would only duplicate a subset of the same stream.
//!
//! Watch restarts, `410 Gone` and relists are kube-runtime's watcher's job (with backoff). A
//! relist is buffered and replaces a kind's objects in one step when it completes, so the store
//! never shows a half-listed kind; while the API server is unreachable the store keeps the last
//! state and the agent keeps enforcing it. The source is [`synced`](KubernetesSource::synced)
//! once every kind has completed its first list; the agent does not reconcile before that (an
//! empty inventory would take enforcement away from the pinned state).

pub mod report;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Namespace, Node, ObjectReference, Pod, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, ApiResource, DynamicObject};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::manifests::{self, Object};
use super::{Inventory, Snapshot, SourceStatus};
use crate::policy::crd::{ClusterMeshPolicy, MeshPolicy, MutualTLS};

/// Creating the API client failed (no in-cluster environment, unreadable kubeconfig...).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("reading the kubeconfig {path}")]
    Kubeconfig {
        path: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error(
        "no in-cluster service account environment (KUBERNETES_SERVICE_HOST) and no usable kubeconfig"
    )]
    Infer(#[source] kube::config::InferConfigError),
    #[error("creating the API client")]
    Client(#[source] kube::Error),
}

/// The API client: from `--kubeconfig`, or in-cluster (then `$KUBECONFIG`, `~/.kube/config`).
///
/// # Errors
/// No usable configuration. Never contacts the API server (that is retried later).
pub async fn client(kubeconfig: Option<&Path>) -> Result<kube::Client, ClientError> {
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|source| {
                ClientError::Kubeconfig {
                    path: path.display().to_string(),
                    source,
                }
            })?;
            kube::Config::from_custom_kubeconfig(
                kubeconfig,
                &kube::config::KubeConfigOptions::default(),
            )
            .await
            .map_err(|source| ClientError::Kubeconfig {
                path: path.display().to_string(),
                source,
            })?
        }
        None => kube::Config::infer().await.map_err(ClientError::Infer)?,
    };
    kube::Client::try_from(config).map_err(ClientError::Client)
}

/// Tunables; the defaults are for production, tests shorten them.
#[derive(Clone, Debug)]
pub struct KubernetesOptions {
    /// `(first, max)` delay between retries of a failed list or watch. `None`: kube-runtime's
    /// default (client-go's: 0.8 s doubling to 30 s, with jitter, so that a thousand agents do
    /// not retry in step against a recovering API server).
    pub backoff: Option<(Duration, Duration)>,
    /// How often the API server's reachability is probed (`GET /version`), so that `status`
    /// says "disconnected" even while every watch is quiet.
    pub probe_interval: Duration,
    /// Least time between two rounds of policy status writes.
    pub report_interval: Duration,
}

impl Default for KubernetesOptions {
    fn default() -> Self {
        Self {
            backoff: None,
            probe_interval: Duration::from_secs(10),
            report_interval: Duration::from_secs(1),
        }
    }
}

/// The kinds nodeward watches, in the order they are listed.
#[must_use]
pub fn watched_kinds() -> Vec<ApiResource> {
    vec![
        ApiResource::erase::<Namespace>(&()),
        ApiResource::erase::<Node>(&()),
        ApiResource::erase::<ServiceAccount>(&()),
        ApiResource::erase::<Pod>(&()),
        ApiResource::erase::<NetworkPolicy>(&()),
        ApiResource::erase::<MeshPolicy>(&()),
        ApiResource::erase::<ClusterMeshPolicy>(&()),
        ApiResource::erase::<MutualTLS>(&()),
        ApiResource::erase::<Service>(&()),
        ApiResource::erase::<EndpointSlice>(&()),
        ApiResource::erase::<crate::http::gateway::HttpRoute>(&()),
        ApiResource::erase::<crate::http::traffic::TrafficPolicy>(&()),
    ]
}

/// Kinds a cluster may not serve (their CRDs are someone else's to install): while the API
/// answers 404 for one, it counts as listed and empty, and the watch keeps retrying, so the
/// objects arrive once the CRD does. The Gateway API's `HTTPRoute` is one.
fn optional(resource: &ApiResource) -> bool {
    resource.group == "gateway.networking.k8s.io"
}

/// The API server does not serve the resource (no such CRD).
fn not_served(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s.code == 404,
        watcher::Error::WatchError(s) => s.code == 404,
        _ => false,
    }
}

/// One kind's objects, by `Kind ns/name` (the manifests source's keys).
#[derive(Debug, Default)]
struct KindState {
    objects: BTreeMap<String, Object>,
    /// Objects that did not parse: the error line, by key.
    errors: BTreeMap<String, String>,
    /// Every object seen (valid or not), for Events and status writes.
    refs: BTreeMap<String, report::Seen>,
    /// A relist in progress: what it has given so far. Replaces the above at `InitDone`.
    relist: Option<KindBuffer>,
    /// The first list completed.
    synced: bool,
}

#[derive(Debug, Default)]
struct KindBuffer {
    objects: BTreeMap<String, Object>,
    errors: BTreeMap<String, String>,
    refs: BTreeMap<String, report::Seen>,
}

#[derive(Debug, Default)]
struct Store {
    kinds: BTreeMap<String, KindState>,
    connected: bool,
    last_error: Option<String>,
    last_error_at: Option<SystemTime>,
    /// Watch events applied (for status; tests wait on it).
    events: u64,
}

impl Store {
    fn note_error(&mut self, line: String) -> bool {
        let changed = self.connected || self.last_error.as_ref() != Some(&line);
        self.connected = false;
        self.last_error = Some(line);
        self.last_error_at = Some(SystemTime::now());
        changed
    }

    /// Applies one watch event; returns whether the inventory (or sync state) changed.
    fn apply(&mut self, resource: &ApiResource, event: watcher::Event<DynamicObject>) -> bool {
        self.events += 1;
        let state = self.kinds.entry(resource.kind.clone()).or_default();
        match event {
            watcher::Event::Init => {
                state.relist = Some(KindBuffer::default());
                false
            }
            watcher::Event::InitApply(object) => {
                let parsed = parse(resource, object);
                match &mut state.relist {
                    Some(buffer) => {
                        buffer.refs.insert(parsed.key.clone(), parsed.reference);
                        match parsed.outcome {
                            Ok(Some(object)) => {
                                buffer.objects.insert(parsed.key, object);
                            }
                            Ok(None) => {}
                            Err(line) => {
                                // Keep the last good version across the relist.
                                if let Some(old) = state.objects.get(&parsed.key) {
                                    buffer.objects.insert(parsed.key.clone(), old.clone());
                                }
                                buffer.errors.insert(parsed.key, line);
                            }
                        }
                        false
                    }
                    // Cannot happen (kube-runtime always sends Init first); treat as an update.
                    None => state.update(parsed),
                }
            }
            watcher::Event::InitDone => {
                let buffer = state.relist.take().unwrap_or_default();
                state.objects = buffer.objects;
                state.errors = buffer.errors;
                state.refs = buffer.refs;
                state.synced = true;
                true
            }
            watcher::Event::Apply(object) => {
                let parsed = parse(resource, object);
                state.update(parsed)
            }
            watcher::Event::Delete(object) => {
                let parsed = parse(resource, object);
                state.refs.remove(&parsed.key);
                state.errors.remove(&parsed.key);
                state.objects.remove(&parsed.key).is_some() || parsed.outcome.is_err()
            }
        }
    }
}

impl KindState {
    fn update(&mut self, parsed: Parsed) -> bool {
        self.refs.insert(parsed.key.clone(), parsed.reference);
        match parsed.outcome {
            Ok(Some(object)) => {
                self.errors.remove(&parsed.key);
                self.objects.insert(parsed.key, object);
                true
            }
            Ok(None) => false,
            Err(line) => self.errors.insert(parsed.key, line.clone()).as_ref() != Some(&line),
        }
    }
}

struct Parsed {
    key: String,
    reference: report::Seen,
    /// The object, or the error line naming object and field.
    outcome: Result<Option<Object>, String>,
}

/// Reads an object from the API server exactly as the manifests source reads a document.
fn parse(resource: &ApiResource, object: DynamicObject) -> Parsed {
    let reference = report::Seen::new(
        ObjectReference {
            api_version: Some(resource.api_version.clone()),
            kind: Some(resource.kind.clone()),
            name: object.metadata.name.clone(),
            namespace: object.metadata.namespace.clone(),
            uid: object.metadata.uid.clone(),
            resource_version: object.metadata.resource_version.clone(),
            field_path: None,
        },
        object.metadata.generation,
        object.data.get("status"),
    );
    let mut value = serde_json::to_value(&object).unwrap_or_default();
    // List items carry no apiVersion/kind; the watched resource says what they are.
    if let Some(map) = value.as_object_mut() {
        map.insert("apiVersion".into(), resource.api_version.clone().into());
        map.insert("kind".into(), resource.kind.clone().into());
    }
    let key = manifests::object_key(&resource.kind, &value)
        .unwrap_or_else(|| format!("{} <unnamed>", resource.kind));
    let outcome = match manifests::parse_object(value) {
        Ok(Some((key, object))) => {
            return Parsed {
                key,
                reference,
                outcome: Ok(Some(object)),
            };
        }
        Ok(None) => Ok(None),
        Err((object, field, message)) => {
            let mut line = object.unwrap_or_else(|| key.clone());
            if let Some(field) = field {
                line.push_str(": field ");
                line.push_str(&field);
            }
            line.push_str(": ");
            line.push_str(&message);
            Err(line)
        }
    };
    Parsed {
        key,
        reference,
        outcome,
    }
}

/// The Kubernetes source: watchers running in the background and the store they fill.
pub struct KubernetesSource {
    store: Arc<Mutex<Store>>,
    kinds: Vec<String>,
    tasks: Vec<JoinHandle<()>>,
    reporter: report::Reporter,
}

impl std::fmt::Debug for KubernetesSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubernetesSource")
            .field("kinds", &self.kinds)
            .finish_non_exhaustive()
    }
}

impl Drop for KubernetesSource {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn lock(store: &Mutex<Store>) -> std::sync::MutexGuard<'_, Store> {
    store.lock().unwrap_or_else(PoisonError::into_inner)
}

impl KubernetesSource {
    /// Starts the watchers (and the policy status reporter for node `node`). `changed` gets a
    /// message after every change of the inventory or of the connection state; a full channel
    /// means a wake-up is already pending.
    ///
    /// Must be called inside a tokio runtime.
    #[must_use]
    pub fn start(
        client: kube::Client,
        node: &str,
        changed: mpsc::Sender<()>,
        options: &KubernetesOptions,
    ) -> Self {
        let store = Arc::new(Mutex::new(Store::default()));
        let resources = watched_kinds();
        {
            let mut s = lock(&store);
            for r in &resources {
                s.kinds.entry(r.kind.clone()).or_default();
            }
        }
        let mut tasks = Vec::new();
        for resource in &resources {
            tasks.push(tokio::spawn(watch_kind(
                client.clone(),
                resource.clone(),
                store.clone(),
                changed.clone(),
                options.backoff,
            )));
        }
        tasks.push(tokio::spawn(probe(
            client.clone(),
            store.clone(),
            changed,
            options.probe_interval,
        )));
        let reporter = report::Reporter::start(client, node, options.report_interval);
        Self {
            store,
            kinds: resources.into_iter().map(|r| r.kind).collect(),
            tasks,
            reporter,
        }
    }

    /// Every watched kind has completed its first list.
    #[must_use]
    pub fn synced(&self) -> bool {
        lock(&self.store).kinds.values().all(|k| k.synced)
    }

    /// The objects as last seen, in the manifests source's shape.
    #[must_use]
    pub fn snapshot(&self) -> Inventory {
        Arc::unwrap_or_clone(self.load().inventory)
    }

    /// The inventory and the objects that are currently invalid.
    #[must_use]
    pub fn load(&self) -> Snapshot {
        let store = lock(&self.store);
        let mut snapshot = Snapshot::default();
        let mut inventory = manifests::InventoryBuilder::default();
        for kind in store.kinds.values() {
            for object in kind.objects.values() {
                inventory.add(object.clone());
            }
            snapshot.errors.extend(kind.errors.values().cloned());
        }
        snapshot.inventory = Arc::new(inventory.build());
        snapshot
    }

    /// Connection and sync state, for `nodeward status`.
    #[must_use]
    pub fn status(&self) -> SourceStatus {
        let store = lock(&self.store);
        SourceStatus {
            kind: "kubernetes".into(),
            connected: store.connected,
            synced: store.kinds.values().all(|k| k.synced),
            waiting_for: store
                .kinds
                .iter()
                .filter(|(_, k)| !k.synced)
                .map(|(name, _)| name.clone())
                .collect(),
            last_error: store.last_error.clone(),
            last_error_at: store
                .last_error_at
                .map(|t| humantime::format_rfc3339_seconds(t).to_string()),
            events: store.events,
            invalid_objects: store.kinds.values().map(|k| k.errors.len()).sum(),
        }
    }

    /// Publishes this node's outcome of every policy (`Kind ns/name` → outcome) as policy status
    /// and Events, in the background, only what changed. Objects that did not even parse are
    /// added here as failures.
    pub fn report_policies(&self, outcomes: &BTreeMap<String, report::PolicyOutcome>) {
        let mut all = outcomes.clone();
        let store = lock(&self.store);
        let mut refs = BTreeMap::new();
        for kind in [
            "NetworkPolicy",
            "MeshPolicy",
            "ClusterMeshPolicy",
            "TrafficPolicy",
        ] {
            let Some(state) = store.kinds.get(kind) else {
                continue;
            };
            for (key, line) in &state.errors {
                // The current version did not even parse: whatever is enforced is older.
                let outcome = all.entry(key.clone()).or_default();
                let kept = std::mem::take(&mut outcome.enforced);
                outcome.error = Some(match &outcome.error {
                    Some(e) => format!("{line}; {e}"),
                    None if kept => {
                        format!("{line} (the previous version stays enforced)")
                    }
                    None => line.clone(),
                });
            }
            refs.extend(
                state
                    .refs
                    .iter()
                    .filter(|(k, _)| all.contains_key(*k))
                    .map(|(k, r)| (k.clone(), r.clone())),
            );
        }
        drop(store);
        self.reporter.publish(all, refs);
    }
}

/// A simple doubling backoff (tests; production uses kube-runtime's jittered default).
struct Doubling {
    first: Duration,
    next: Duration,
    max: Duration,
}

impl Iterator for Doubling {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        Some(delay)
    }
}

impl kube::runtime::utils::Backoff for Doubling {
    fn reset(&mut self) {
        self.next = self.first;
    }
}

async fn watch_kind(
    client: kube::Client,
    resource: ApiResource,
    store: Arc<Mutex<Store>>,
    changed: mpsc::Sender<()>,
    backoff: Option<(Duration, Duration)>,
) {
    let api: Api<DynamicObject> = Api::all_with(client, &resource);
    let backoff: Box<dyn kube::runtime::utils::Backoff> = match backoff {
        Some((first, max)) => Box::new(Doubling {
            first,
            next: first,
            max,
        }),
        None => Box::new(watcher::DefaultBackoff::default()),
    };
    let mut stream = std::pin::pin!(watcher(api, watcher::Config::default()).backoff(backoff));
    while let Some(event) = stream.next().await {
        let wake = match event {
            Ok(event) => {
                let mut s = lock(&store);
                let was_connected = std::mem::replace(&mut s.connected, true);
                let synced_before = s.kinds.get(&resource.kind).is_some_and(|k| k.synced);
                let changed = s.apply(&resource, event);
                if !synced_before && s.kinds.get(&resource.kind).is_some_and(|k| k.synced) {
                    tracing::info!(kind = %resource.kind, "initial list done");
                }
                changed || !was_connected
            }
            Err(e) if optional(&resource) && not_served(&e) => {
                let mut s = lock(&store);
                let state = s.kinds.entry(resource.kind.clone()).or_default();
                let first = !state.synced;
                if first {
                    tracing::info!(kind = %resource.kind, "not served by the API server (its CRD is not installed); treated as empty");
                }
                let had = !state.objects.is_empty();
                state.synced = true;
                state.objects.clear();
                state.errors.clear();
                state.relist = None;
                first || had
            }
            Err(e) => {
                let line = format!("watching {}: {}", resource.plural, crate::error_chain(&e));
                tracing::warn!(kind = %resource.kind, error = %line, "watch failed; retrying with backoff, the last known state stays enforced");
                lock(&store).note_error(line)
            }
        };
        if wake {
            // Full: a wake-up is already pending and will see this too.
            let _ = changed.try_send(());
        }
    }
}

async fn probe(
    client: kube::Client,
    store: Arc<Mutex<Store>>,
    changed: mpsc::Sender<()>,
    interval: Duration,
) {
    loop {
        let result = client.apiserver_version().await;
        let wake = {
            let mut s = lock(&store);
            match result {
                Ok(_) => !std::mem::replace(&mut s.connected, true),
                Err(e) => s.note_error(format!(
                    "reaching the API server: {}",
                    crate::error_chain(&e)
                )),
            }
        };
        if wake {
            let _ = changed.try_send(());
        }
        tokio::time::sleep(interval).await;
    }
}
