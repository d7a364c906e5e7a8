//! Where the cluster's objects come from: a manifests directory (standalone mode) and, later, the
//! Kubernetes API. Both produce an [`Inventory`]: the same objects, the same result.

pub mod manifests;

use std::collections::BTreeMap;
use std::path::PathBuf;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;

use crate::policy::ObjectRef;
use crate::policy::crd::{ClusterMeshPolicy, MeshPolicy};

/// Everything nodeward reads, keyed for stable iteration order.
#[derive(Clone, Debug, Default)]
pub struct Inventory {
    pub namespaces: BTreeMap<String, Namespace>,
    pub pods: BTreeMap<ObjectRef, Pod>,
    pub nodes: BTreeMap<String, Node>,
    pub service_accounts: BTreeMap<ObjectRef, ServiceAccount>,
    pub network_policies: BTreeMap<ObjectRef, NetworkPolicy>,
    pub mesh_policies: BTreeMap<ObjectRef, MeshPolicy>,
    /// Cluster scoped: `namespace` is empty.
    pub cluster_mesh_policies: BTreeMap<String, ClusterMeshPolicy>,
    /// The file each object was read from (for error messages), keyed by `Kind/ns/name`.
    pub origins: BTreeMap<String, PathBuf>,
}
