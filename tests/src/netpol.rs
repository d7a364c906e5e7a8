//! Kubernetes NetworkPolicy manifests for tests and the demo.

use serde_json::{Value, json};

use crate::manifests::documents;

/// A `networking.k8s.io/v1` NetworkPolicy with the given spec, as YAML.
pub fn network_policy(namespace: &str, name: &str, spec: &Value) -> String {
    documents([json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": { "name": name, "namespace": namespace },
        "spec": spec,
    })])
}

/// Selects every pod of `namespace` for ingress and allows nothing.
pub fn deny_all_ingress(namespace: &str) -> String {
    network_policy(
        namespace,
        "deny-all-ingress",
        &json!({ "podSelector": {}, "policyTypes": ["Ingress"] }),
    )
}

/// Selects every pod of `namespace` for egress and allows nothing.
pub fn deny_all_egress(namespace: &str) -> String {
    network_policy(
        namespace,
        "deny-all-egress",
        &json!({ "podSelector": {}, "policyTypes": ["Egress"] }),
    )
}

/// Ingress to the pods matching `pod_labels` (all pods if empty) from `from` peers on `ports`
/// (any port if empty).
pub fn allow_ingress(
    namespace: &str,
    name: &str,
    pod_labels: &Value,
    from: &[Value],
    ports: &[Value],
) -> String {
    let mut rule = json!({ "from": from });
    if !ports.is_empty() {
        rule["ports"] = json!(ports);
    }
    network_policy(
        namespace,
        name,
        &json!({
            "podSelector": { "matchLabels": pod_labels },
            "policyTypes": ["Ingress"],
            "ingress": [rule],
        }),
    )
}

/// A `nodeward.io/v1alpha1` MutualTLS for every pod of `namespace` (`STRICT`, `PERMISSIVE` or
/// `DISABLE`), as YAML.
pub fn mutual_tls(namespace: &str, mode: &str) -> String {
    documents([json!({
        "apiVersion": "nodeward.io/v1alpha1",
        "kind": "MutualTLS",
        "metadata": { "name": "mesh", "namespace": namespace },
        "spec": { "mode": mode },
    })])
}

/// A `nodeward.io/v1alpha1` MeshPolicy with the given spec, as YAML.
pub fn mesh_policy(namespace: &str, name: &str, spec: &Value) -> String {
    documents([json!({
        "apiVersion": "nodeward.io/v1alpha1",
        "kind": "MeshPolicy",
        "metadata": { "name": name, "namespace": namespace },
        "spec": spec,
    })])
}
