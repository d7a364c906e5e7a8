//! Who is where, for the tunnel: every pod by address with its SPIFFE ID, mesh mode and node
//! addresses, and the compiled policy of the local ones. Built after every sync from the same
//! inventory and compiled state the datapath got, and swapped whole.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;

use crate::ca::SpiffeId;
use crate::policy::{CompiledState, EndpointPolicy, MeshMode, ObjectRef};
use crate::source::Inventory;

/// A pod as the tunnel sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    pub pod: ObjectRef,
    /// `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
    pub identity: SpiffeId,
    pub mode: MeshMode,
    /// On this node.
    pub local: bool,
    /// Its node's addresses (`status.hostIPs`, else the Node's `InternalIP`s).
    pub host_ips: Vec<IpAddr>,
}

/// The tunnel's snapshot of the cluster.
#[derive(Debug, Default)]
pub struct MeshView {
    pub workloads: HashMap<IpAddr, Arc<Workload>>,
    /// The same compiled state the datapath enforces.
    pub compiled: Arc<CompiledState>,
    /// HTTP Service ports and their routes (see [`crate::http`]); set by the control loop.
    pub http: Arc<crate::http::RouteTable>,
}

impl MeshView {
    /// Every pod with an address and a valid identity; `modes` gives each pod's mesh mode
    /// (missing: not in the mesh).
    #[must_use]
    pub fn build(
        node: &str,
        trust_domain: &str,
        inv: &Inventory,
        compiled: Arc<CompiledState>,
        modes: &BTreeMap<ObjectRef, MeshMode>,
    ) -> Self {
        let mut workloads = HashMap::new();
        for (r, pod, identity) in members(trust_domain, inv) {
            let spec_node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
            let workload = Arc::new(Workload {
                pod: r.clone(),
                identity,
                mode: modes.get(r).copied().unwrap_or_default(),
                local: spec_node == Some(node),
                host_ips: host_ips(pod, spec_node, inv),
            });
            for ip in pod_ips(pod) {
                workloads.entry(ip).or_insert_with(|| workload.clone());
            }
        }
        Self {
            workloads,
            compiled,
            http: Arc::default(),
        }
    }

    /// [`MeshView::build`] for when only the pods of `changes` (key, previous version) changed
    /// since `self` was built, from the same nodes and modes: `self`'s entries, with those of
    /// the changed pods taken out and put in again. An address two pods claim goes to the first
    /// in key order, as in `build`; where a changed pod gave one up, the pods are searched once
    /// for another claimant.
    #[must_use]
    pub fn patch(
        &self,
        node: &str,
        trust_domain: &str,
        inv: &Inventory,
        compiled: Arc<CompiledState>,
        modes: &BTreeMap<ObjectRef, MeshMode>,
        changes: &[crate::policy::PodChange],
    ) -> Self {
        let mut workloads = self.workloads.clone();
        let mut vacated: std::collections::BTreeSet<IpAddr> = std::collections::BTreeSet::new();
        for (key, old) in changes {
            for ip in old.iter().flat_map(|p| pod_ips(p)) {
                if workloads.get(&ip).is_some_and(|w| w.pod == *key) {
                    workloads.remove(&ip);
                    vacated.insert(ip);
                }
            }
        }
        let workload = |r: &ObjectRef, pod: &Pod, identity| {
            let spec_node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
            Arc::new(Workload {
                pod: r.clone(),
                identity,
                mode: modes.get(r).copied().unwrap_or_default(),
                local: spec_node == Some(node),
                host_ips: host_ips(pod, spec_node, inv),
            })
        };
        // Changed pods in key order: each address goes to the first claimant.
        for (key, _) in changes {
            let Some(pod) = inv.pods.get(key) else {
                continue;
            };
            let Ok(identity) = crate::ca::spiffe::pod_identity(trust_domain, &key.namespace, pod)
            else {
                continue;
            };
            let w = workload(key, pod, identity);
            for ip in pod_ips(pod) {
                match workloads.get(&ip) {
                    Some(held) if held.pod < *key => {}
                    _ => {
                        workloads.insert(ip, w.clone());
                    }
                }
            }
        }
        // An address a changed pod gave up may have an unchanged claimant it had hidden, before
        // or after a changed pod that claims it now: the first in key order has it.
        if !vacated.is_empty() {
            for (r, pod) in &inv.pods {
                // The addresses first: a pod's identity costs a string, its addresses do not.
                let ips: Vec<IpAddr> = pod_ips(pod)
                    .into_iter()
                    .filter(|ip| vacated.contains(ip))
                    .collect();
                if ips.is_empty() {
                    continue;
                }
                let Ok(identity) = crate::ca::spiffe::pod_identity(trust_domain, &r.namespace, pod)
                else {
                    continue;
                };
                let w = workload(r, pod, identity);
                for ip in ips {
                    vacated.remove(&ip);
                    workloads.insert(ip, w.clone());
                }
                if vacated.is_empty() {
                    break;
                }
            }
        }
        Self {
            workloads,
            compiled,
            http: self.http.clone(),
        }
    }

    /// Whether each pod address belongs to a meshed pod, as [`MeshView::build`] would say
    /// (`view.workload(ip).is_some_and(|w| w.mode.meshed())`) without building the view: the
    /// ipcache needs this before the maps are written, the view only after.
    #[must_use]
    pub fn meshed_addresses(
        trust_domain: &str,
        inv: &Inventory,
        modes: &BTreeMap<ObjectRef, MeshMode>,
    ) -> HashMap<IpAddr, bool> {
        let mut meshed = HashMap::new();
        // No pod in the mesh: every address would say no.
        if !modes.values().any(|m| m.meshed()) {
            return meshed;
        }
        for (r, pod, _) in members(trust_domain, inv) {
            let mode = modes.get(r).copied().unwrap_or_default();
            for ip in pod_ips(pod) {
                meshed.entry(ip).or_insert(mode.meshed());
            }
        }
        meshed
    }

    #[must_use]
    pub fn workload(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        // IPv4-mapped IPv6 (as a dual-stack socket reports IPv4 peers) is the IPv4 address.
        self.workloads.get(&ip.to_canonical())
    }

    /// The compiled policy of a local pod.
    #[must_use]
    pub fn endpoint_policy(&self, pod: &ObjectRef) -> Option<&EndpointPolicy> {
        self.compiled.endpoints.get(pod)
    }
}

impl Workload {
    /// The HBONE address of this workload's node, in the family of `towards` (the pod address
    /// being connected to), or any family when the node has no address of that one.
    #[must_use]
    pub fn hbone_peer(&self, towards: IpAddr, port: u16) -> Option<SocketAddr> {
        self.host_ips
            .iter()
            .find(|ip| ip.is_ipv4() == towards.is_ipv4())
            .or_else(|| self.host_ips.first())
            .map(|ip| SocketAddr::new(*ip, port))
    }
}

/// The pods that can take part in the mesh, with their identities: those with a valid one (the
/// control loop reports the others). The one rule for [`MeshView::build`] and
/// [`MeshView::meshed_addresses`].
fn members<'a>(
    trust_domain: &'a str,
    inv: &'a Inventory,
) -> impl Iterator<Item = (&'a ObjectRef, &'a Pod, SpiffeId)> + 'a {
    inv.pods.iter().filter_map(move |(r, pod)| {
        let identity = crate::ca::spiffe::pod_identity(trust_domain, &r.namespace, pod).ok()?;
        Some((r, pod.as_ref(), identity))
    })
}

/// A pod's addresses (`status.podIPs`, then `status.podIP`), the unparsable ones left out.
#[must_use]
pub fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let Some(status) = pod.status.as_ref() else {
        return Vec::new();
    };
    status
        .pod_ips
        .iter()
        .flatten()
        .map(|i| i.ip.as_str())
        .chain(status.pod_ip.as_deref())
        .filter_map(|ip| ip.parse().ok())
        .collect()
}

fn host_ips(pod: &Pod, node: Option<&str>, inv: &Inventory) -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = pod
        .status
        .iter()
        .flat_map(|s| {
            s.host_ips
                .iter()
                .flatten()
                .map(|i| i.ip.as_str())
                .chain(s.host_ip.as_deref())
        })
        .filter_map(|ip| ip.parse().ok())
        .collect();
    if ips.is_empty()
        && let Some(n) = node.and_then(|n| inv.nodes.get(n))
    {
        ips = n
            .status
            .iter()
            .flat_map(|s| s.addresses.iter().flatten())
            .filter(|a| a.type_ == "InternalIP")
            .filter_map(|a| a.address.parse().ok())
            .collect();
    }
    ips.dedup();
    ips
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inventory() -> Inventory {
        let mut inv = Inventory::default();
        for (name, node, ip, host) in [
            ("web", "n1", "10.0.1.2", Some("192.168.0.1")),
            ("api", "n2", "10.0.2.2", None),
        ] {
            let pod: Pod = serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "namespace": "shop"},
                "spec": {"nodeName": node, "serviceAccountName": name, "containers": []},
                "status": {"podIP": ip, "hostIP": host},
            }))
            .unwrap();
            inv.pods.insert(
                ObjectRef {
                    namespace: "shop".into(),
                    name: name.into(),
                },
                pod.into(),
            );
        }
        inv.nodes.insert(
            "n2".into(),
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "n2"},
                "status": {"addresses": [{"type": "Hostname", "address": "n2"}, {"type": "InternalIP", "address": "192.168.0.2"}]},
            }))
            .unwrap(),
        );
        inv
    }

    #[test]
    fn pods_are_found_by_address_with_their_identity_mode_and_node() {
        let inv = inventory();
        let modes = BTreeMap::from([(
            ObjectRef {
                namespace: "shop".into(),
                name: "api".into(),
            },
            MeshMode::Strict,
        )]);
        let view = MeshView::build("n1", "cluster.local", &inv, Arc::default(), &modes);
        let web = view.workload("10.0.1.2".parse().unwrap()).unwrap();
        assert!(web.local);
        assert_eq!(web.mode, MeshMode::Off, "no mode given: not in the mesh");
        assert_eq!(web.identity.uri(), "spiffe://cluster.local/ns/shop/sa/web");
        // An IPv4-mapped peer address (a dual-stack socket's view) finds the same pod.
        let api = view.workload("::ffff:10.0.2.2".parse().unwrap()).unwrap();
        assert!(!api.local);
        assert_eq!(api.mode, MeshMode::Strict);
        // No hostIP on the pod: the node's InternalIP.
        assert_eq!(
            api.hbone_peer("10.0.2.2".parse().unwrap(), 15008),
            Some("192.168.0.2:15008".parse().unwrap())
        );
        assert_eq!(
            web.hbone_peer("10.0.1.2".parse().unwrap(), 15008),
            Some("192.168.0.1:15008".parse().unwrap())
        );
    }

    /// The ipcache's meshed flags come from `meshed_addresses` before the view exists: it must
    /// say what the view says for every address, including a pod without a valid identity (not
    /// in the view at all) and an address two pods claim (the first one's).
    #[test]
    fn meshed_addresses_agree_with_the_view() {
        let mut inv = inventory();
        let extra = [
            ("bad", "Bad_Account!", "10.0.1.7", MeshMode::Strict),
            ("twin", "twin", "10.0.1.2", MeshMode::Permissive),
        ];
        let mut modes = BTreeMap::new();
        for (name, account, ip, mode) in extra {
            let pod: Pod = serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "namespace": "shop"},
                "spec": {"nodeName": "n1", "serviceAccountName": account, "containers": []},
                "status": {"podIP": ip},
            }))
            .unwrap();
            let key = ObjectRef {
                namespace: "shop".into(),
                name: name.into(),
            };
            inv.pods.insert(key.clone(), pod.into());
            modes.insert(key, mode);
        }
        modes.insert(
            ObjectRef {
                namespace: "shop".into(),
                name: "api".into(),
            },
            MeshMode::Strict,
        );
        let view = MeshView::build("n1", "cluster.local", &inv, Arc::default(), &modes);
        let meshed = MeshView::meshed_addresses("cluster.local", &inv, &modes);
        for ip in ["10.0.1.2", "10.0.2.2", "10.0.1.7"] {
            let ip: IpAddr = ip.parse().unwrap();
            let from_view = view.workload(ip).is_some_and(|w| w.mode.meshed());
            assert_eq!(meshed.get(&ip) == Some(&true), from_view, "{ip}");
        }
        assert_eq!(meshed.get(&"10.0.2.2".parse().unwrap()), Some(&true));
        // shop/twin sorts before shop/web, whose mode is off: the first claim is twin's.
        assert_eq!(
            meshed.get(&"10.0.1.2".parse().unwrap()),
            Some(&true),
            "the first claim"
        );
        assert_eq!(
            meshed.get(&"10.0.1.7".parse().unwrap()),
            None,
            "no valid identity"
        );
        // Nobody in the mesh: nothing to look up, and the view agrees.
        let off: BTreeMap<ObjectRef, MeshMode> =
            modes.into_keys().map(|k| (k, MeshMode::Off)).collect();
        assert!(MeshView::meshed_addresses("cluster.local", &inv, &off).is_empty());
        let view = MeshView::build("n1", "cluster.local", &inv, Arc::default(), &off);
        assert!(view.workloads.values().all(|w| !w.mode.meshed()));
    }
}
