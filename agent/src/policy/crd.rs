//! PLACEHOLDER: the `nodeward.io/v1alpha1` CRD types (being written).
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct MeshPolicy {}
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct ClusterMeshPolicy {}
