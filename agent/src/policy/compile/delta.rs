//! The pod-event path of [`Compiler::compile`]: when only pods changed since the last
//! compilation (the same policies, nodes, namespaces and learned names), the kept state is
//! patched instead of compiled again. Only the changed pods are looked at:
//! - their ipcache entries (an address's owner is recomputed only where two pods claim it);
//! - the identities they create or leave unused, which enter or leave the cached peer sets of
//!   the selectors that match them.
//!
//! Everything else falls back to the full compilation, which then finds every unchanged pod and
//! peer in its caches: a change to a local pod (its endpoint policy), a peer set that changed
//! (the endpoints' slices), an egress rule on a named port (a peer pod's ports matter, not only
//! its identity), an address the DNS proxy learned (FQDN identities yield to pods), or a burst
//! touching more than a sixteenth of the pods. The output is the full compilation's, and
//! `tests/pod_churn.rs` holds it to that over random pod events.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};

use super::{CachedPod, Compiler, PodChange, pod_facts};
use crate::identity::{IdentityAllocator, Labels, namespace_labels};
use crate::policy::compiled::{CompiledState, ObjectRef};
use crate::policy::fqdn::LearnedNames;
use crate::policy::model::{Direction, Entity, Peer, PolicyModel, PortSpec};
use crate::source::Inventory;

/// What the last compilation was made from and gave, for the next one to patch.
pub(super) struct Last {
    state: CompiledState,
    policies: Vec<PolicyModel>,
    nodes: BTreeMap<String, Arc<Node>>,
    namespaces: BTreeMap<String, Arc<Namespace>>,
    names: Arc<LearnedNames>,
    /// The identity allocator's revision the state was made with.
    revision: u64,
    /// Workloads per pod identity.
    members: BTreeMap<u32, usize>,
    /// Workloads per address (more than one: the first in key order has it in the ipcache).
    claims: HashMap<IpAddr, u32>,
    /// Node addresses: they win over any pod's.
    node_ips: BTreeSet<IpNet>,
    /// Some egress rule names a port: then a peer pod's ports matter, not only its identity.
    named_egress: bool,
    /// Some rule has a `toFQDNs` peer.
    fqdn_peers: bool,
}

/// Workloads per identity and per address.
pub(super) type Counts = (BTreeMap<u32, usize>, HashMap<IpAddr, u32>);

impl Last {
    /// The workload counts, for a compilation over the same pods and identities.
    pub(super) fn into_counts(self) -> Counts {
        (self.members, self.claims)
    }
}

/// Records what the full compilation of `state` was made from; `counts` are the pods' when
/// they are known to be unchanged.
pub(super) fn remember(
    cache: &mut Compiler,
    inv: &Inventory,
    policies: &[&PolicyModel],
    state: &CompiledState,
    ids: &IdentityAllocator,
    counts: Option<Counts>,
) {
    let (members, claims) = counts.unwrap_or_else(|| {
        let mut members: BTreeMap<u32, usize> = BTreeMap::new();
        let mut claims: HashMap<IpAddr, u32> = HashMap::with_capacity(cache.pods.len());
        for facts in cache.pods.values().filter_map(|c| c.facts.as_ref()) {
            *members.entry(facts.identity).or_default() += 1;
            for ip in &facts.ips {
                *claims.entry(*ip).or_default() += 1;
            }
        }
        (members, claims)
    });
    let node_ips = inv
        .nodes
        .values()
        .filter_map(|n| n.status.as_ref()?.addresses.as_ref())
        .flatten()
        .filter_map(|a| a.address.parse::<IpAddr>().ok())
        .map(IpNet::from)
        .collect();
    let rules = || policies.iter().flat_map(|p| &p.rules);
    cache.last = Some(Last {
        state: state.clone(),
        policies: policies.iter().map(|p| (*p).clone()).collect(),
        nodes: inv.nodes.clone(),
        namespaces: inv.namespaces.clone(),
        names: cache.names.clone(),
        revision: ids.revision(),
        members,
        claims,
        node_ips,
        named_egress: rules().any(|r| {
            r.direction == Direction::Egress
                && r.ports.iter().any(|p| matches!(p, PortSpec::Named { .. }))
        }),
        fqdn_peers: rules().any(|r| r.peers.iter().any(|p| matches!(p, Peer::Fqdn(_)))),
    });
}

/// The same objects, by allocation.
fn same<T>(a: &BTreeMap<String, Arc<T>>, b: &BTreeMap<String, Arc<T>>) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|((ka, va), (kb, vb))| ka == kb && Arc::ptr_eq(va, vb))
}

/// Every address a pod lists (a superset of its workload addresses).
fn listed_ips(pod: &Pod) -> impl Iterator<Item = IpAddr> + '_ {
    let status = pod.status.as_ref();
    status
        .and_then(|s| s.pod_ip.as_deref())
        .into_iter()
        .chain(
            status
                .and_then(|s| s.pod_ips.as_ref())
                .into_iter()
                .flatten()
                .map(|p| p.ip.as_str()),
        )
        .filter_map(|ip| ip.parse().ok())
}

/// The keys of the pods added, changed or removed since the cache was made (in key order).
fn changed_pods(
    cache: &BTreeMap<ObjectRef, CachedPod>,
    pods: &BTreeMap<ObjectRef, Arc<Pod>>,
) -> Vec<ObjectRef> {
    let mut out = Vec::new();
    let mut old = cache.iter().peekable();
    let mut new = pods.iter().peekable();
    loop {
        match (old.peek(), new.peek()) {
            (None, None) => break,
            (Some((k, _)), None) => {
                out.push((*k).clone());
                old.next();
            }
            (None, Some((k, _))) => {
                out.push((*k).clone());
                new.next();
            }
            (Some((ko, c)), Some((kn, p))) => match ko.cmp(kn) {
                std::cmp::Ordering::Less => {
                    out.push((*ko).clone());
                    old.next();
                }
                std::cmp::Ordering::Greater => {
                    out.push((*kn).clone());
                    new.next();
                }
                std::cmp::Ordering::Equal => {
                    if !Arc::ptr_eq(&c.pod, p) {
                        out.push((*kn).clone());
                    }
                    old.next();
                    new.next();
                }
            },
        }
    }
    out
}

/// What [`pods_only`] did.
pub(super) enum Outcome {
    /// The state, patched for these pod changes.
    Patched(CompiledState, Vec<PodChange>),
    /// A full compilation is needed; the pods that changed since the last one, when the nodes
    /// are the same (the mesh view and the flows' index can still be patched with them).
    Full(Option<Vec<PodChange>>),
}

/// The compiled state patched for the pods that changed since the last compilation, or what a
/// full compilation needs to know (it then reuses the pods and peers updated here).
pub(super) fn pods_only(
    cache: &mut Compiler,
    node: &str,
    inv: &Inventory,
    policies: &[&PolicyModel],
    ids: &mut IdentityAllocator,
) -> Outcome {
    let Some(last) = cache.last.as_ref() else {
        return Outcome::Full(None);
    };
    if cache.node != node || !same(&last.nodes, &inv.nodes) {
        return Outcome::Full(None);
    }
    let changed = changed_pods(&cache.pods, &inv.pods);
    let changes = |cache: &Compiler| -> Vec<PodChange> {
        changed
            .iter()
            .map(|k| (k.clone(), cache.pods.get(k).map(|c| c.pod.clone())))
            .collect()
    };
    let unchanged = cache.revision == Some(ids.revision())
        && last.revision == ids.revision()
        && Arc::ptr_eq(&last.names, &cache.names)
        && same(&last.namespaces, &inv.namespaces)
        && last.policies.len() == policies.len()
        && last.policies.iter().zip(policies).all(|(a, b)| a == *b);
    if !unchanged {
        return Outcome::Full(Some(changes(cache)));
    }
    if changed.is_empty() {
        return Outcome::Patched(last.state.clone(), Vec::new());
    }
    if changed.len() > (inv.pods.len() / 16).max(64) {
        return Outcome::Full(Some(changes(cache)));
    }
    // What the pod path cannot patch, checked before anything is touched.
    for key in &changed {
        let old = cache.pods.get(key).and_then(|c| c.facts.as_ref());
        if old.is_some_and(|f| f.local) {
            return Outcome::Full(Some(changes(cache)));
        }
        let new = inv.pods.get(key);
        if new.is_some_and(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node)) {
            return Outcome::Full(Some(changes(cache)));
        }
        if last.fqdn_peers && !cache.names.is_empty() {
            let learned = old
                .into_iter()
                .flat_map(|f| f.ips.iter().copied())
                .chain(new.into_iter().flat_map(|p| listed_ips(p)))
                .any(|ip| cache.names.contains_key(&ip));
            if learned {
                return Outcome::Full(Some(changes(cache)));
            }
        }
    }
    let Some(mut last) = cache.last.take() else {
        return Outcome::Full(None);
    };

    // The pods, in key order (identities are allocated in the order a full compilation would).
    let mut present_before: BTreeMap<u32, bool> = BTreeMap::new();
    let mut labels_of: BTreeMap<u32, Arc<Labels>> = BTreeMap::new();
    let mut touched: BTreeSet<IpAddr> = BTreeSet::new();
    // Per address, the changed pods that claim it now: (how many, the first one's identity).
    let mut claimed: HashMap<IpAddr, (u32, u32)> = HashMap::new();
    let mut by_namespace: BTreeMap<String, Labels> = BTreeMap::new();
    let mut changes = Vec::with_capacity(changed.len());
    for key in changed {
        let old = cache.pods.remove(&key);
        changes.push((key.clone(), old.as_ref().map(|c| c.pod.clone())));
        if let Some(facts) = old.and_then(|c| c.facts) {
            present_before.entry(facts.identity).or_insert(true);
            if let Some(n) = last.members.get_mut(&facts.identity) {
                *n -= 1;
                if *n == 0 {
                    last.members.remove(&facts.identity);
                }
            }
            for ip in facts.ips {
                if let Some(n) = last.claims.get_mut(&ip) {
                    *n -= 1;
                    if *n == 0 {
                        last.claims.remove(&ip);
                    }
                }
                touched.insert(ip);
            }
        }
        let Some(pod) = inv.pods.get(&key) else {
            continue;
        };
        let ns = pod.metadata.namespace.as_deref().unwrap_or(&key.namespace);
        let namespace = inv.namespaces.get(ns);
        let ns_labels = by_namespace
            .entry(ns.to_owned())
            .or_insert_with(|| namespace_labels(ns, namespace.map(AsRef::as_ref)));
        let facts = pod_facts(node, pod, ns_labels, ids);
        if let Some(f) = &facts {
            let members = last.members.entry(f.identity).or_default();
            present_before.entry(f.identity).or_insert(*members > 0);
            *members += 1;
            labels_of
                .entry(f.identity)
                .or_insert_with(|| f.labels.clone());
            for ip in &f.ips {
                *last.claims.entry(*ip).or_default() += 1;
                claimed
                    .entry(*ip)
                    .and_modify(|(n, _)| *n += 1)
                    .or_insert((1, f.identity));
                touched.insert(*ip);
            }
        }
        cache.pods.insert(
            key,
            CachedPod {
                pod: pod.clone(),
                namespace: namespace.cloned(),
                facts,
            },
        );
    }
    cache.revision = Some(ids.revision());

    // Identities that appeared or went: the peers whose selectors match them change.
    let mut added = Vec::new();
    let mut removed = Vec::new();
    for (id, before) in present_before {
        match (before, last.members.contains_key(&id)) {
            (false, true) => added.push((id, labels_of.remove(&id).unwrap_or_default())),
            (true, false) => removed.push(id),
            _ => {}
        }
    }
    let mut peers_changed = false;
    if !added.is_empty() || !removed.is_empty() {
        let peers = &mut cache.peers;
        for id in &removed {
            peers.identities.remove(id);
        }
        peers.identities.extend(added.iter().map(|(id, _)| *id));
        for (peer, (used, set)) in &mut peers.resolved {
            let matches = |labels: &Labels| match peer {
                Peer::Endpoints(sel) => sel.matches(labels),
                Peer::Entity(Entity::Cluster) => true,
                _ => false,
            };
            let mut changed = false;
            for id in &removed {
                changed |= set.remove(id);
            }
            for (id, labels) in &added {
                if matches(labels) {
                    changed |= set.insert(*id);
                }
            }
            peers_changed |= changed && *used == peers.round;
        }
    }
    // The endpoints' slices change: the full compilation redoes them from the caches.
    if peers_changed || last.named_egress {
        return Outcome::Full(Some(changes));
    }

    // The ipcache entries of the addresses the changed pods held or hold.
    for ip in touched {
        let net = IpNet::from(ip);
        if last.node_ips.contains(&net) {
            continue;
        }
        let now = last.claims.get(&ip).copied().unwrap_or(0);
        let owner = match claimed.get(&ip) {
            _ if now == 0 => None,
            Some((n, first)) if *n == now => Some(*first),
            // An unchanged pod claims it too: the first claimant in key order has it.
            _ => cache
                .pods
                .values()
                .filter_map(|c| c.facts.as_ref())
                .find(|f| f.ips.contains(&ip))
                .map(|f| f.identity),
        };
        match owner {
            Some(id) => last.state.ipcache.insert(net, id),
            None => last.state.ipcache.remove(&net),
        };
    }
    if !removed.is_empty() {
        let state = &last.state;
        let in_use: BTreeSet<u32> = last
            .members
            .keys()
            .copied()
            .chain(state.policy_cidrs.values().copied())
            .chain(state.principals.values().copied())
            .chain(state.fqdn_identities.keys().copied())
            .collect();
        ids.gc(&in_use);
    }
    last.revision = ids.revision();
    cache.revision = Some(ids.revision());
    let state = last.state.clone();
    cache.last = Some(last);
    Outcome::Patched(state, changes)
}
