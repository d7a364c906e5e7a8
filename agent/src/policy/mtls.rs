//! `MutualTLS` objects to the mutual TLS mode of every pod.
//!
//! What the modes mean for the selected pods (Istio's PeerAuthentication, per pod):
//!
//! - `DISABLE`: not in the mesh. The pod sends and receives plaintext only.
//! - `PERMISSIVE`: in the mesh. The pod accepts both the mTLS tunnel and plaintext.
//! - `STRICT`: in the mesh. Plaintext sent to the pod is dropped in the kernel; only the tunnel
//!   reaches it.
//!
//! A connection is tunneled when both ends are in the mesh. The source's node makes that choice,
//! from the destination's mode, so [`pod_modes`] gives the mode of every pod, local or remote.
//!
//! Which object sets a pod's mode: among the MutualTLS objects of the pod's namespace whose
//! selector matches its security labels (the same labels policy selectors match, see
//! [`crate::identity::security_labels`]), an object with a non-empty selector beats the
//! namespace-wide ones, and among equals the strictest mode wins (STRICT, then PERMISSIVE, then
//! DISABLE), so the result never depends on the order the objects were read in. A pod that no
//! object selects has the agent's default mode.

use std::collections::BTreeMap;

use super::compiled::ObjectRef;
use super::crd::{MutualTLS, MutualTlsMode};
use super::model::{FieldError, PolicyError};
use super::selector::LabelSelector;
use crate::identity::security_labels;
use crate::source::Inventory;

/// A MutualTLS object after validation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MtlsModel {
    /// The object's namespace and name; it applies only to pods of that namespace.
    pub origin: ObjectRef,
    /// Over the pods' security labels.
    pub selector: LabelSelector,
    /// The selector is not empty, so the object beats the namespace-wide ones.
    pub specific: bool,
    pub mode: MutualTlsMode,
}

/// Deserializes a MutualTLS, naming the field path of an unknown field or a wrong type.
///
/// # Errors
/// Wrong `apiVersion`/`kind`, unknown fields, wrong types.
pub fn parse_mutual_tls(value: serde_json::Value) -> Result<MutualTLS, PolicyError> {
    super::mesh::parse(value, "MutualTLS")
}

/// Translates and validates a MutualTLS.
///
/// # Errors
/// The first invalid field, named by its path (`spec.selector.matchExpressions[0].values`).
pub fn translate_mutual_tls(obj: &MutualTLS) -> Result<MtlsModel, PolicyError> {
    let origin = ObjectRef {
        namespace: obj
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned()),
        name: obj.metadata.name.clone().unwrap_or_default(),
    };
    let object = format!("MutualTLS {origin}");
    if origin.name.is_empty() {
        return Err(FieldError::new("metadata.name", "missing").in_object(&object));
    }
    let selector = super::mesh::selector(&obj.spec.selector, "spec.selector")
        .map_err(|e| e.in_object(&object))?;
    Ok(MtlsModel {
        origin,
        specific: !selector.is_everything(),
        selector,
        mode: obj.spec.mode,
    })
}

/// The effective mode of every pod of the inventory (see the module documentation for the
/// rules); `default` for a pod that no object selects.
#[must_use]
pub fn pod_modes(
    inv: &Inventory,
    models: &[MtlsModel],
    default: MutualTlsMode,
) -> BTreeMap<ObjectRef, MutualTlsMode> {
    let mut by_namespace: BTreeMap<&str, Vec<&MtlsModel>> = BTreeMap::new();
    for m in models {
        by_namespace
            .entry(m.origin.namespace.as_str())
            .or_default()
            .push(m);
    }
    inv.pods
        .iter()
        .map(|(key, pod)| {
            let ns = pod.metadata.namespace.as_deref().unwrap_or(&key.namespace);
            let candidates = by_namespace.get(ns).map(Vec::as_slice).unwrap_or_default();
            let mode = if candidates.is_empty() {
                default
            } else {
                let labels = security_labels(pod, inv.namespaces.get(ns).map(AsRef::as_ref));
                candidates
                    .iter()
                    .filter(|m| m.selector.matches(&labels))
                    // Equal keys have equal modes, so which of them `max_by_key` keeps does
                    // not matter.
                    .max_by_key(|m| (m.specific, strictness(m.mode)))
                    .map_or(default, |m| m.mode)
            };
            (key.clone(), mode)
        })
        .collect()
}

/// Orders modes for ties: the strictest wins.
fn strictness(mode: MutualTlsMode) -> u8 {
    match mode {
        MutualTlsMode::Disable => 0,
        MutualTlsMode::Permissive => 1,
        MutualTlsMode::Strict => 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    use MutualTlsMode::{Disable, Permissive, Strict};

    /// Namespace `shop` (team=a) with pods `web` (sa web, on n1) and `db` (on n2); namespace
    /// `other` with pod `client`.
    fn inventory() -> Inventory {
        let mut inv = Inventory::default();
        for (name, labels) in [("shop", json!({"team": "a"})), ("other", json!({}))] {
            inv.namespaces.insert(
                name.to_owned(),
                serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}}))
                    .expect("namespace"),
            );
        }
        for (ns, name, node, sa) in [
            ("shop", "web", "n1", "web"),
            ("shop", "db", "n2", "default"),
            ("other", "client", "n1", "default"),
        ] {
            let pod = json!({
                "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
                "spec": {"nodeName": node, "serviceAccountName": sa, "containers": []},
            });
            inv.pods.insert(
                ObjectRef {
                    namespace: ns.to_owned(),
                    name: name.to_owned(),
                },
                serde_json::from_value(pod).expect("pod"),
            );
        }
        inv
    }

    fn mtls(ns: &str, name: &str, spec: serde_json::Value) -> MutualTLS {
        parse_mutual_tls(json!({
            "apiVersion": "nodeward.io/v1alpha1",
            "kind": "MutualTLS",
            "metadata": {"name": name, "namespace": ns},
            "spec": spec,
        }))
        .expect("MutualTLS parses")
    }

    fn model(ns: &str, name: &str, spec: serde_json::Value) -> MtlsModel {
        translate_mutual_tls(&mtls(ns, name, spec)).expect("valid MutualTLS")
    }

    fn modes(models: &[MtlsModel]) -> Vec<(String, MutualTlsMode)> {
        pod_modes(&inventory(), models, Permissive)
            .into_iter()
            .map(|(k, m)| (k.to_string(), m))
            .collect()
    }

    #[test]
    fn a_pod_no_object_selects_has_the_default_mode() {
        let all = modes(&[model("other", "strict", json!({"mode": "STRICT"}))]);
        assert_eq!(
            all,
            [
                ("other/client".to_owned(), Strict),
                ("shop/db".to_owned(), Permissive),
                ("shop/web".to_owned(), Permissive),
            ],
            "an object applies to its own namespace only; the rest gets the default"
        );
    }

    #[test]
    fn every_pod_gets_a_mode_local_or_remote() {
        let m = modes(&[model("shop", "strict", json!({"mode": "STRICT"}))]);
        assert!(
            m.contains(&("shop/db".to_owned(), Strict)),
            "the pod on the other node: {m:?}"
        );
        assert!(m.contains(&("shop/web".to_owned(), Strict)), "{m:?}");
    }

    #[test]
    fn a_selector_beats_the_namespace_wide_objects_even_when_less_strict() {
        let m = modes(&[
            model("shop", "all", json!({"mode": "STRICT"})),
            model(
                "shop",
                "web",
                json!({"mode": "DISABLE", "selector": {"matchLabels": {"app": "web"}}}),
            ),
        ]);
        assert!(m.contains(&("shop/web".to_owned(), Disable)), "{m:?}");
        assert!(m.contains(&("shop/db".to_owned(), Strict)), "{m:?}");
    }

    #[test]
    fn among_equals_the_strictest_wins_whatever_the_order() {
        let wide = [
            model("shop", "a", json!({"mode": "PERMISSIVE"})),
            model("shop", "b", json!({"mode": "STRICT"})),
            model("shop", "c", json!({"mode": "DISABLE"})),
        ];
        let specific = [
            model(
                "shop",
                "d",
                json!({"mode": "DISABLE", "selector": {"matchLabels": {"app": "web"}}}),
            ),
            model(
                "shop",
                "e",
                json!({"mode": "PERMISSIVE", "selector": {"matchExpressions": [{"key": "app", "operator": "Exists"}]}}),
            ),
        ];
        for models in [
            wide.iter().chain(&specific).cloned().collect::<Vec<_>>(),
            wide.iter().chain(&specific).rev().cloned().collect(),
        ] {
            let m = modes(&models);
            assert!(m.contains(&("shop/db".to_owned(), Permissive)), "{m:?}");
            assert!(m.contains(&("shop/web".to_owned(), Permissive)), "{m:?}");
        }
        let m = modes(&wide);
        assert!(m.contains(&("shop/web".to_owned(), Strict)), "{m:?}");
    }

    #[test]
    fn selectors_match_security_labels() {
        let m = modes(&[
            model(
                "shop",
                "by-sa",
                json!({"mode": "STRICT", "selector": {"matchLabels": {"nodeward.io/serviceaccount": "web"}}}),
            ),
            model(
                "shop",
                "by-ns-label",
                json!({"mode": "DISABLE", "selector": {"matchLabels": {"nodeward.io/ns-label.team": "a"}}}),
            ),
        ]);
        assert!(m.contains(&("shop/web".to_owned(), Strict)), "{m:?}");
        assert!(m.contains(&("shop/db".to_owned(), Disable)), "{m:?}");
    }

    #[test]
    fn translation_keeps_origin_and_tells_specific_selectors_apart() {
        let wide = model("shop", "all", json!({"mode": "STRICT", "selector": {}}));
        assert_eq!(
            wide.origin,
            ObjectRef {
                namespace: "shop".into(),
                name: "all".into()
            }
        );
        assert!(!wide.specific);
        assert_eq!(wide.mode, Strict);
        let web = model(
            "shop",
            "web",
            json!({"mode": "DISABLE", "selector": {"matchLabels": {"app": "web"}}}),
        );
        assert!(web.specific);
    }

    #[test]
    fn invalid_selectors_name_the_object_and_the_field() {
        let e = translate_mutual_tls(&mtls(
            "shop",
            "bad",
            json!({"mode": "STRICT", "selector": {"matchExpressions": [{"key": "app", "operator": "In"}]}}),
        ))
        .expect_err("In without values");
        assert_eq!(
            e.to_string(),
            "MutualTLS shop/bad: spec.selector.matchExpressions[0].values: operator In requires at least one value"
        );
        let e = translate_mutual_tls(&mtls(
            "shop",
            "bad",
            json!({"mode": "STRICT", "selector": {"matchLabels": {"app": "-web"}}}),
        ))
        .expect_err("bad label value");
        assert_eq!(e.field, "spec.selector.matchLabels.app");
        let e = parse_mutual_tls(json!({
            "apiVersion": "nodeward.io/v1alpha1",
            "kind": "MutualTLS",
            "metadata": {"name": "bad", "namespace": "shop"},
            "spec": {"mode": "STRICT", "selector": {"matchExpressions": [{"key": "app", "operator": "Like"}]}},
        }))
        .expect_err("unknown operator");
        assert_eq!(e.object, "MutualTLS shop/bad");
        assert_eq!(e.field, "spec.selector.matchExpressions[0].operator");
    }
}
