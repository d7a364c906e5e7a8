//! Where the cluster's objects come from: a manifests directory (standalone mode) or the
//! Kubernetes API server (`--kubernetes`). Both produce an [`Inventory`]: the same objects, the
//! same result.

pub mod kubernetes;
pub mod manifests;
pub mod rbac;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;

use crate::policy::ObjectRef;
use crate::policy::crd::{ClusterMeshPolicy, MeshPolicy, MutualTLS};

/// Everything nodeward reads, keyed for stable iteration order.
#[derive(Clone, Debug, Default)]
///
/// Objects are shared (`Arc`): a round's inventory is assembled from what the source holds
/// without copying a thousand pods.
pub struct Inventory {
    pub namespaces: BTreeMap<String, Arc<Namespace>>,
    pub pods: BTreeMap<ObjectRef, Arc<Pod>>,
    pub nodes: BTreeMap<String, Arc<Node>>,
    pub service_accounts: BTreeMap<ObjectRef, Arc<ServiceAccount>>,
    pub network_policies: BTreeMap<ObjectRef, Arc<NetworkPolicy>>,
    pub mesh_policies: BTreeMap<ObjectRef, Arc<MeshPolicy>>,
    /// Cluster scoped: `namespace` is empty.
    pub cluster_mesh_policies: BTreeMap<String, Arc<ClusterMeshPolicy>>,
    /// Mutual TLS modes (see [`crate::policy::mtls`]).
    pub mutual_tls: BTreeMap<ObjectRef, Arc<MutualTLS>>,
    /// `v1` Services and `discovery.k8s.io/v1` EndpointSlices (see [`crate::services`]).
    pub services: BTreeMap<ObjectRef, Arc<Service>>,
    pub endpoint_slices: BTreeMap<ObjectRef, Arc<EndpointSlice>>,
    /// Gateway API `HTTPRoute`s (see [`crate::http`]).
    pub http_routes: BTreeMap<ObjectRef, Arc<crate::http::gateway::HttpRoute>>,
    /// `nodeward.io` `TrafficPolicy`s (see [`crate::http::traffic`]).
    pub traffic_policies: BTreeMap<ObjectRef, Arc<crate::http::traffic::TrafficPolicy>>,
    /// The file each object was read from (for error messages), keyed by `Kind/ns/name`.
    pub origins: BTreeMap<String, PathBuf>,
}

/// What a source gives the control loop on each round.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Shared: a source may keep it and patch it for the next round.
    pub inventory: Arc<Inventory>,
    /// Every current problem with an object, one line each (naming the object and field).
    pub errors: Vec<String>,
}

/// The source's own health, for `nodeward status`.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SourceStatus {
    /// `manifests` or `kubernetes`.
    pub kind: String,
    /// The API server answered the last request (always true for manifests).
    pub connected: bool,
    /// Every kind has been read in full once.
    pub synced: bool,
    /// Kinds whose first list has not completed yet.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub waiting_for: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error_at: Option<String>,
    /// Watch events received (Kubernetes).
    pub events: u64,
    /// Objects skipped (or kept at their last good version) because they are invalid.
    pub invalid_objects: usize,
}

/// The source the agent was started with; `app.rs` talks only to this.
#[derive(Debug)]
pub enum Source {
    Manifests(manifests::ManifestSource),
    Kubernetes(kubernetes::KubernetesSource),
}

impl Source {
    /// The objects as of now (re-reading what changed, for manifests).
    pub fn load(&mut self) -> Snapshot {
        match self {
            Self::Manifests(m) => {
                let loaded = m.load();
                Snapshot {
                    inventory: loaded.inventory,
                    errors: loaded.errors.iter().map(ToString::to_string).collect(),
                }
            }
            Self::Kubernetes(k) => k.load(),
        }
    }

    /// Whether the source has seen everything once. Before that, reconciling would take away
    /// enforcement from objects not read yet, so the agent waits (and keeps the pinned state).
    #[must_use]
    pub fn synced(&self) -> bool {
        match self {
            Self::Manifests(_) => true,
            Self::Kubernetes(k) => k.synced(),
        }
    }

    #[must_use]
    pub fn status(&self) -> SourceStatus {
        match self {
            Self::Manifests(_) => SourceStatus {
                kind: "manifests".into(),
                connected: true,
                synced: true,
                ..SourceStatus::default()
            },
            Self::Kubernetes(k) => k.status(),
        }
    }

    /// Publishes each policy's outcome on this node where the source can (Kubernetes: policy
    /// status and Events; manifests: nowhere, `nodeward status` shows it).
    pub fn report_policies(&self, outcomes: &BTreeMap<String, kubernetes::report::PolicyOutcome>) {
        if let Self::Kubernetes(k) = self {
            k.report_policies(outcomes);
        }
    }
}
